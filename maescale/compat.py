"""Every private name of DeepSpeed, torch and submitit that maescale touches, in one place.

Each accessor says why maescale needs the name and what it relies on. ``tests/test_compat.py``
touches every one of them against the installed versions and fails naming the name when an
upgrade removes or changes it: a DeepSpeed, torch or submitit upgrade starts there.

Nothing here imports torch, DeepSpeed or submitit at module import time: the login-node side
(``tools/submit.py``) uses the submitit part without paying for torch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

# --------------------------------------------------------------------------------------------
# DeepSpeed's ZeRO-1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer)
# --------------------------------------------------------------------------------------------

# maescale's ZeRO-1 step (maescale.gradsync) keeps DeepSpeed's partitioned optimizer state and
# checkpoint format and runs the gradient communication and the update itself. It reads:
ZERO_OPTIMIZER_ATTRS = (
    "bit16_groups",  # per param group: the model parameters, in flat-buffer order
    "bit16_groups_flat",  # per group: the flat buffer the parameters' .data live in (padded)
    "parallel_partitioned_bit16_groups",  # per group: views of that buffer, one per data-parallel rank
    "single_partition_of_fp32_groups",  # per group: this rank's fp32 master partition (the client optimizer's param)
    "real_dp_process_group",  # per group: the data-parallel process group
    "optimizer",  # the client (torch) optimizer whose param groups hold the fp32 partitions
)
# DeepSpeed's lean-step path (ZeRO-2, or ZeRO-1 with maescale's step off) reads the reduced
# gradient partition and the data-parallel group:
ZERO_LEAN_ATTRS = ("averaged_gradients", "dp_process_group", "optimizer")
# Called once after maescale's first optimizer step, as DeepSpeed's own step does, so that the
# optimizer state is linked to each parameter's fp32 fragment (DeepSpeed's safe_get_* APIs).
ZERO_LAZY_INIT = "_lazy_init_hp_params_optimizer_state"


class CompatError(RuntimeError):
    """A private name maescale relies on is missing in the installed version."""


def _need(obj: Any, name: str, owner: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise CompatError(f"{owner} has no attribute {name!r}: this DeepSpeed/torch/submitit version changed a "
                          "private name maescale relies on (see maescale/compat.py)") from None


@dataclass
class ZeroGroup:
    """One parameter group of DeepSpeed's ZeRO-1/2 optimizer, as maescale's step sees it."""

    params: list[Any]  # model parameters (views into ``flat``)
    flat: Any  # the flat 16-bit (or fp32) buffer of the group, padded to a multiple of the world size
    partitions: list[Any]  # ``flat`` split into one view per data-parallel rank
    master: Any  # this rank's fp32 partition: the client optimizer's parameter
    process_group: Any  # the data-parallel group


def zero_groups(zero_optimizer: Any) -> list[ZeroGroup]:
    """The parameter groups of a DeepSpeed ZeRO-1/2 optimizer (``engine.optimizer``)."""
    owner = type(zero_optimizer).__name__
    attrs = {name: _need(zero_optimizer, name, owner) for name in ZERO_OPTIMIZER_ATTRS}
    return [ZeroGroup(list(params), flat, list(parts), master, pg)
            for params, flat, parts, master, pg in zip(attrs["bit16_groups"], attrs["bit16_groups_flat"],
                                                        attrs["parallel_partitioned_bit16_groups"],
                                                        attrs["single_partition_of_fp32_groups"],
                                                        attrs["real_dp_process_group"])]


def client_optimizer(zero_optimizer: Any) -> Any:
    """The torch optimizer DeepSpeed's ZeRO optimizer wraps (``.optimizer``)."""
    return _need(zero_optimizer, "optimizer", type(zero_optimizer).__name__)


def link_optimizer_state(zero_optimizer: Any) -> None:
    """DeepSpeed's own step calls this after the first update; maescale's step does the same."""
    _need(zero_optimizer, ZERO_LAZY_INIT, type(zero_optimizer).__name__)()


def zero_reduced_gradients(zero_optimizer: Any) -> list[Any]:
    """This rank's partition of the reduced gradients at the accumulation boundary (DeepSpeed's
    ``averaged_gradients``), as DeepSpeed's own overflow check reads it."""
    averaged = _need(zero_optimizer, "averaged_gradients", type(zero_optimizer).__name__)
    return [g for i in sorted(averaged) for g in (averaged[i] or []) if g is not None]


def zero_dp_group(zero_optimizer: Any) -> Any:
    """The data-parallel process group of DeepSpeed's ZeRO optimizer."""
    return _need(zero_optimizer, "dp_process_group", type(zero_optimizer).__name__)


# --------------------------------------------------------------------------------------------
# DeepSpeed's communication backend (deepspeed/comm/torch.py, TorchBackend)
# --------------------------------------------------------------------------------------------

# DeepSpeed looks up torch's all-gather / reduce-scatter functions once, when its backend starts,
# and keeps the function objects; a recorder that wraps ``torch.distributed`` must wrap these too.
DS_CAPTURED_COMM_FUNCTIONS = ("all_gather_function", "reduce_scatter_function")


def deepspeed_comm_backend() -> Any | None:
    """DeepSpeed's communication backend object (``deepspeed.comm.comm.cdb``), None before it starts."""
    import deepspeed.comm.comm as ds_comm

    return _need(ds_comm, "cdb", "deepspeed.comm.comm")


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


def set_found_inf(optimizer: Any, flag: Any) -> None:
    """Hand a device-side "this step is not finite" flag to a fused torch Adam/AdamW.

    torch's fused Adam(W) ``step()`` reads the ``found_inf`` attribute (the hook that
    ``torch.amp.GradScaler`` uses) and skips the update on the device where it is non-zero, with
    the step counters put back: the non-finite guard without a host synchronisation.
    """
    if not getattr(optimizer, "defaults", {}).get("fused"):
        raise CompatError("the non-finite guard needs a fused torch Adam/AdamW (fused=True)")
    optimizer.found_inf = flag


def fp32_norms(tensors: list[Any]) -> list[Any]:
    """The 2-norm of each tensor, accumulated in float32 whatever the tensors' dtype (bf16 norms
    accumulated in bf16 lose ~1% of a large gradient's norm).

    ``torch._foreach_norm(..., dtype=)`` does it in one launch per device and dtype; where that
    private op or its ``dtype`` argument is missing, one ``linalg.vector_norm`` per tensor.
    """
    import torch

    foreach = getattr(torch, "_foreach_norm", None)
    if foreach is not None and tensors:
        try:
            return list(foreach(tensors, 2, dtype=torch.float32))
        except TypeError:  # an older signature without dtype
            pass
    return [torch.linalg.vector_norm(t, 2, dtype=torch.float32) for t in tensors]


def reduce_scatter_function() -> Callable[..., Any]:
    """``torch.distributed.reduce_scatter_single`` (torch >= 2.14), else ``reduce_scatter_tensor``
    (the older name, which 2.14 deprecates with a warning on every call)."""
    import torch.distributed as dist

    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_function() -> Callable[..., Any]:
    """``torch.distributed.all_gather_single`` (torch >= 2.14), else ``all_gather_into_tensor``."""
    import torch.distributed as dist

    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# Deprecation warnings torch 2.14 prints on every call of the old collective names, which
# DeepSpeed still uses: at one line per call and rank they would fill a 128-rank job's logs.
TORCH_COLLECTIVE_DEPRECATIONS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)


def silence_collective_deprecations() -> None:
    """Ignore exactly the deprecation warnings of :data:`TORCH_COLLECTIVE_DEPRECATIONS`."""
    import warnings

    for message in TORCH_COLLECTIVE_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def default_store() -> Any | None:
    """The c10d key-value store of the default process group (``_get_default_store``): the stall
    watchdog raises a flag there that every rank's watchdog sees within a second, without a
    collective (the store's server is a C++ thread of rank 0's process). None without one."""
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (single process), or the private name is gone
        return None


def dump_nccl_flight_recorder() -> bytes | None:
    """The NCCL flight recorder's trace (pickled), or None where there is none (no NCCL, off).

    ``torch._C._distributed_c10d._dump_nccl_trace`` is the call behind torch's own dump on a
    collective timeout; the stall watchdog asks for it itself because it ends the job before
    that timeout could fire.
    """
    try:
        import torch.distributed as dist
        import torch._C._distributed_c10d as c10d

        if not dist.is_initialized() or dist.get_backend() != "nccl":
            return None
    except (ImportError, RuntimeError):
        return None
    dump = getattr(c10d, "_dump_nccl_trace", None)
    if dump is None:
        return None
    try:
        return dump()
    except Exception:  # noqa: BLE001 - no NCCL process group, recorder off, CPU build
        return None


def compiler_reset() -> None:
    """Forget every compiled graph (``torch.compiler.reset``; ``torch._dynamo.reset`` before it)."""
    import torch

    reset = getattr(getattr(torch, "compiler", None), "reset", None)
    if reset is None:
        import torch._dynamo

        reset = torch._dynamo.reset
    reset()


def raise_recompile_limit(at_least: int = 64) -> None:
    """Let dynamo recompile one code object ``at_least`` times (benchmarks compile the same block
    code once per variant; the default limit would fall back to eager). ``torch._dynamo.config``'s
    ``recompile_limit`` (``cache_size_limit`` before torch 2.6)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(at_least, getattr(torch._dynamo.config, name)))


def mark_dynamic(tensor: Any, dim: int) -> None:
    """Tell the compiler that ``tensor``'s ``dim`` varies (``torch._dynamo.mark_dynamic``)."""
    import torch._dynamo

    torch._dynamo.mark_dynamic(tensor, dim)


def run_and_get_code(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
    """Run ``fn`` and return inductor's generated source too (``torch._inductor.utils.run_and_get_code``;
    the kernel check reads which ops inductor fused)."""
    from torch._inductor.utils import run_and_get_code as run

    return run(fn, *args)


def has_scaled_mm() -> bool:
    """Whether torch has float8 dtypes and ``torch._scaled_mm``, the GEMM of FP8 training."""
    import torch

    return hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")


def float8_linear_class() -> type:
    """torchao's ``Float8Linear`` (``torchao.float8.float8_linear``, not in its public API): what
    ``convert_to_float8_training`` swaps in, to list the converted layers."""
    from torchao.float8 import float8_linear

    return _need(float8_linear, "Float8Linear", "torchao.float8.float8_linear")


# --------------------------------------------------------------------------------------------
# submitit
# --------------------------------------------------------------------------------------------

# submitit renders the sbatch script only inside ``submit``; the dry run calls the same two
# private members to print it without submitting.
SUBMITIT_SCRIPT_MEMBERS = ("_make_submission_file_text", "_submitit_command_str")


def render_sbatch_script(executor: Any) -> str:
    """The sbatch script a submitit ``SlurmExecutor`` would submit (no submission)."""
    make = _need(executor, "_make_submission_file_text", type(executor).__name__)
    command = _need(executor, "_submitit_command_str", type(executor).__name__)
    return make(command, "dry-run")


def submitit_signal_handler_class() -> type:
    """submitit's handler class of the requeue signal (``submitit.core.job_environment.SignalHandler``):
    the job recognises it among the installed handlers and calls its
    ``checkpoint_and_try_requeue`` to requeue exactly as submitit would."""
    from submitit.core import job_environment

    cls = _need(job_environment, "SignalHandler", "submitit.core.job_environment")
    _need(cls, "checkpoint_and_try_requeue", "submitit SignalHandler")
    return cls


def signature_names(fn: Callable[..., Any]) -> list[str]:
    """Parameter names of ``fn`` (for the compatibility test)."""
    return list(inspect.signature(fn).parameters)
