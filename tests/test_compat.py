"""Every private name of DeepSpeed, torch and submitit that maescale touches (maescale/compat.py)
exists in the installed versions and means what maescale relies on: an upgrade that renames or
changes one fails here, naming it."""

from __future__ import annotations

import inspect

import pytest
import torch

from maescale import compat


@pytest.fixture(scope="module")
def zero1_engine():
    """A real single-process DeepSpeed ZeRO-1 engine (gloo, CPU) over the tiny preset, bucketed."""
    from maescale.config import load_config
    from maescale.distributed import init_distributed, shutdown
    from maescale.models import build_model
    from maescale.optim import build_engine

    cfg = load_config("configs/tiny.yaml", ["deepspeed.bucket_elements=20000", "train.precision=bf16"])
    ctx = init_distributed("cpu")
    built = build_engine(cfg, build_model(cfg.model, device=ctx.device), 1, ctx.device)
    yield built
    built.engine.destroy()
    shutdown()


def test_zero_optimizer_attributes(zero1_engine):
    zero = zero1_engine.engine.optimizer
    for name in (*compat.ZERO_OPTIMIZER_ATTRS, *compat.ZERO_LEAN_ATTRS, compat.ZERO_LAZY_INIT):
        assert hasattr(zero, name), f"DeepSpeed's ZeRO optimizer lost {name!r}: see maescale/compat.py"
    groups = compat.zero_groups(zero)
    assert len(groups) == len(zero1_engine.groups) > 2  # one DeepSpeed group per maescale bucket
    for g, recorded in zip(groups, zero1_engine.groups):
        # the parameters live in the flat buffer; the partitions tile it; the master is fp32
        base = g.flat.data_ptr()
        assert all(base <= p.data_ptr() < base + g.flat.numel() * g.flat.element_size() for p in g.params)
        assert sum(part.numel() for part in g.partitions) == g.flat.numel()
        assert g.master.dtype == torch.float32 and g.master.numel() == g.partitions[0].numel()
        assert len(g.params) == len(recorded["params"])
    client = compat.client_optimizer(zero)
    assert isinstance(client, torch.optim.AdamW)
    assert [pg["params"][0] for pg in client.param_groups] == [g.master for g in groups]
    compat.link_optimizer_state(zero)  # callable as DeepSpeed's own step calls it


def test_fused_adamw_reads_found_inf(zero1_engine):
    """torch's fused AdamW skips the update where the ``found_inf`` attribute is non-zero."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(4)
    compat.set_found_inf(opt, torch.ones(()))
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))  # skipped
    compat.set_found_inf(opt, torch.zeros(()))
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(4))  # applied
    with pytest.raises(compat.CompatError, match="fused"):
        compat.set_found_inf(torch.optim.AdamW([p], lr=0.1), torch.zeros(()))


def test_torch_collectives_and_norms():
    import torch.distributed as dist

    rs, ag = compat.reduce_scatter_function(), compat.all_gather_function()
    assert compat.signature_names(rs)[:2] == ["output", "input"] and "async_op" in compat.signature_names(rs)
    assert "async_op" in compat.signature_names(ag)
    assert rs in (getattr(dist, "reduce_scatter_single", None), dist.reduce_scatter_tensor)
    x = [torch.full((3,), 300.0, dtype=torch.bfloat16), torch.full((2,), 7.0, dtype=torch.bfloat16)]
    norms = compat.fp32_norms(x)
    assert all(n.dtype == torch.float32 for n in norms)
    assert torch.allclose(torch.stack(norms), torch.tensor([300.0 * 3 ** 0.5, 7.0 * 2 ** 0.5]))
    assert compat.dump_nccl_flight_recorder() is None or isinstance(compat.dump_nccl_flight_recorder(), bytes)


def test_deepspeed_captured_comm_functions(zero1_engine):
    backend = compat.deepspeed_comm_backend()
    assert backend is not None, "deepspeed.comm.comm.cdb is gone: see maescale/compat.py"
    for name in compat.DS_CAPTURED_COMM_FUNCTIONS:
        assert callable(getattr(backend, name, None)), f"DeepSpeed's backend lost {name!r}"


def test_submitit_private_names():
    from submitit import SlurmExecutor

    for name in compat.SUBMITIT_SCRIPT_MEMBERS:
        assert hasattr(SlurmExecutor, name), f"submitit's SlurmExecutor lost {name!r}: see maescale/compat.py"
    assert list(inspect.signature(SlurmExecutor._make_submission_file_text).parameters) == ["self", "command", "uid"]
    assert isinstance(inspect.getattr_static(SlurmExecutor, "_submitit_command_str"), property)
    cls = compat.submitit_signal_handler_class()
    assert callable(getattr(cls, "checkpoint_and_try_requeue", None))


def test_a_missing_name_is_named(monkeypatch):
    class Fake:
        bit16_groups = []

    with pytest.raises(compat.CompatError, match="bit16_groups_flat"):
        compat.zero_groups(Fake())


def test_compiler_and_fp8_names():
    compat.compiler_reset()
    compat.raise_recompile_limit(64)
    x = torch.zeros(4, 3)
    compat.mark_dynamic(x, 0)
    out, code = compat.run_and_get_code(torch.compile(lambda t: (t * 2).sum()), torch.ones(3))
    assert float(out) == 6.0 and code and isinstance(code[0], str)
    compat.compiler_reset()
    assert compat.has_scaled_mm()
    cls = compat.float8_linear_class()
    assert issubclass(cls, torch.nn.Linear)
