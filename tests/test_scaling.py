"""maescale.scaling: the comm.json reader and the step-time model, against hand computations."""

from __future__ import annotations

import json

import pytest

from maescale.flops import mae_flops_per_image
from maescale.models.presets import PRESETS
from maescale.scaling import DGX_H100_NDR, CommFormatError, estimate, load_comm
from tests.helpers import REPO

FIXTURE = REPO / "tests" / "fixtures" / "comm.json"
P = 656_613_964  # ViT-H/14 MAE, trainable parameters
H = "mae_vit_huge_patch14"


def vit_h_backward_share() -> float:
    f = mae_flops_per_image(PRESETS[H])
    return (f.train - f.forward) / f.train


@pytest.fixture(scope="module")
def comm():
    return load_comm(FIXTURE)


def test_reads_the_fixture(comm):
    assert comm.meta["script"] == "tools/bench_comm.py"
    one, two = comm.run_for(1), comm.run_for(2)
    assert (one.zero_stage, one.world_size, one.params, one.bucket_elements) == (1, 2, 123456, 50000)
    assert [c.kind for c in one.per_step] == ["all_reduce", "all_gather"]  # the file's order
    assert one.per_step[0].issued_in_backward == 0.8 and one.control[0].bytes == 32
    assert [c.kind for c in two.per_step] == ["reduce_scatter", "all_gather"]
    assert comm.run_for(3) is None


def test_missing_file_is_none(tmp_path):
    assert load_comm(tmp_path / "comm.json") is None


@pytest.mark.parametrize("mangle,needle", [
    (lambda d: d["runs"][0]["per_step"]["all_reduce"].pop("bytes"), "per_step.all_reduce: missing 'bytes'"),
    (lambda d: d["runs"][0]["per_step"].update(gossip={"calls": 1, "elements": 1, "bytes": 1, "issued_in_backward": 0}),
     "per_step.gossip: unknown operation kind"),
    (lambda d: d["runs"][0]["per_step"]["all_gather"].update(issued_in_backward=1.5),
     "per_step.all_gather.issued_in_backward: expected a number in [0, 1]"),
    (lambda d: d["runs"][1].pop("params"), "runs[1]: missing 'params'"),
])
def test_malformed_file_names_the_field(tmp_path, mangle, needle):
    data = json.loads(FIXTURE.read_text())
    mangle(data)
    path = tmp_path / "comm.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CommFormatError) as err:
        load_comm(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_sixteen_nodes_zero1_by_hand(comm):
    """ViT-H, micro-batch 32, 16 x 8 GPUs, 636 img/s, the ZeRO-1 fixture run."""
    e = estimate(H, 32, 16, 8, rate=636.0, comm=comm.run_for(1), steps=1000)
    busbw = 8 * 50e9 * 0.8  # eight 400 Gb/s NICs per node (below NVLink's 450 GB/s), 80%
    lat_ar = (8.4 + (254 - 30) * 3.4 + 30 * 9.6) * 1e-6  # 2(n-1) ring steps, 2(N-1) of them across nodes
    lat_ag = (8.4 + (127 - 15) * 3.4 + 15 * 9.6) * 1e-6
    t_ar = 3 * lat_ar + (123457 / 123456 * P * 2) * (2 * 127 / 128) / busbw
    t_ag = 2 * lat_ag + (P * 2) * (127 / 128) / busbw
    window = vit_h_backward_share() * 32 / 636
    hidden = min(0.8 * t_ar, window)
    assert e.bus_bandwidth == pytest.approx(busbw)
    assert e.comm_s == pytest.approx(t_ar + t_ag, rel=1e-9)
    assert e.hidden_s == pytest.approx(hidden, rel=1e-9) and hidden == 0.8 * t_ar  # all of it hides
    assert e.exposed_s == pytest.approx(t_ar + t_ag - hidden, rel=1e-9)
    step = 32 / 636 + t_ar + t_ag - hidden
    assert e.step_s == pytest.approx(step, rel=1e-9)
    assert e.wall_s == pytest.approx(1000 * step, rel=1e-9)
    assert e.gpu_hours == pytest.approx(1000 * step * 128 / 3600, rel=1e-9)
    assert e.images_per_s == pytest.approx(4096 / step, rel=1e-9)
    ar = [c for c in e.collectives if c.kind == "all_reduce"][0]
    assert ar.latency_s == pytest.approx(3 * lat_ar) and ar.bytes == pytest.approx(123457 / 123456 * P * 2)
    # roughly: 11.3 ms of all-reduce, 9.1 of it hidden; 5.1 ms of all-gather after the step
    assert 7.0e-3 < e.exposed_s < 7.8e-3


def test_window_caps_what_hides(comm):
    """A fast GPU has a short backward: only that much of the gradient traffic hides."""
    e = estimate(H, 32, 16, 8, rate=50_000.0, comm=comm.run_for(1), steps=1)
    window = vit_h_backward_share() * 32 / 50_000
    assert e.hidden_s == pytest.approx(window, rel=1e-9)
    assert e.exposed_s == pytest.approx(e.comm_s - window, rel=1e-9)


def test_zero2_with_accumulation_by_hand(comm):
    """ZeRO-2 reduces the gradients every micro-batch; each micro-batch's backward hides its own."""
    e = estimate(H, 32, 2, 8, rate=636.0, comm=comm.run_for(2), steps=10, grad_accum_steps=4)
    busbw = 400e9 * 0.8
    lat = (8.4 + (15 - 1) * 3.4 + 1 * 9.6) * 1e-6  # n-1 = 15 steps, one across the two nodes
    t_rs = 3 * lat + 2 * P * (15 / 16) / busbw
    t_ag = 2 * lat + 2 * P * (15 / 16) / busbw
    assert e.comm_s == pytest.approx(4 * t_rs + t_ag, rel=1e-9)
    assert e.hidden_s == pytest.approx(4 * t_rs, rel=1e-9)
    assert e.exposed_s == pytest.approx(t_ag, rel=1e-9)
    assert e.compute_s == pytest.approx(4 * 32 / 636)
    assert e.images_per_step == 32 * 4 * 16


def test_one_node_uses_nvlink_and_one_gpu_communicates_nothing(comm):
    e = estimate(H, 128, 1, 8, rate=1183.0, comm=comm.run_for(1), steps=1)
    assert e.bus_bandwidth == pytest.approx(450e9 * 0.8)
    t_ag = 2 * (8.4 + 7 * 3.4) * 1e-6 + 2 * P * (7 / 8) / (450e9 * 0.8)
    assert [c for c in e.collectives if c.kind == "all_gather"][0].seconds == pytest.approx(t_ag, rel=1e-9)
    solo = estimate(H, 128, 1, 1, rate=1183.0, comm=comm.run_for(1), steps=1)
    assert solo.comm_s == 0 and solo.step_s == pytest.approx(128 / 1183)


def test_without_measured_collectives_the_step_is_the_compute():
    e = estimate(H, 32, 16, 8, rate=636.0, comm=None, steps=499_200)
    assert e.comm_s is None and e.exposed_s is None
    assert e.wall_s == pytest.approx(499_200 * 32 / 636)
    assert e.gpu_hours == pytest.approx(499_200 * 32 / 636 * 128 / 3600)


def test_network_sources_are_stated():
    text = " ".join(DGX_H100_NDR.sources)
    for needle in ("DGX H100 datasheet", "nccl-tests doc/PERFORMANCE.md", "tuning.cc", "assumption"):
        assert needle in text


def test_bad_arguments():
    with pytest.raises(ValueError):
        estimate(H, 32, 0, 8, rate=636.0, comm=None, steps=1)
    with pytest.raises(ValueError):
        estimate(H, 32, 1, 8, rate=0.0, comm=None, steps=1)


def _has_history() -> bool:
    import subprocess

    out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--before=2026-11-29T22:41:11+00:00", "--format=%H",
                          "--", "configs"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


@pytest.mark.skipif(not _has_history(), reason="no git history of configs/ (shallow clone?)")
def test_scaling_doc_from_the_function(tmp_path, comm):
    from maescale.planning.scaling_doc import scaling_doc, write_scaling_doc

    text = scaling_doc(comm_path=FIXTURE, today="2026-12-07")
    assert "| `all_reduce` | 3 | 1.000 | 2 | 80% | 1.31 GB |" in text and "| `all_gather` | 2 | 1.000 | 2 | 0% |" in text
    e = estimate(H, 32, 16, 8, rate=636.1686640421128, comm=comm.run_for(1), steps=499_200)
    row = [line for line in text.splitlines() if line.startswith("| 16 | 128 | 32 x 1 |")][0]
    assert f"| {e.comm_s * 1e3:.1f} / {e.exposed_s * 1e3:.1f} | {e.step_s * 1e3:.1f} |" in row
    assert f"| {e.gpu_hours:,.0f} |" in row and "**measured**" in text and "assumed" in text
    bare = scaling_doc(comm_path=tmp_path / "absent.json")
    assert "**Not measured yet**" in bare and "GB |" not in bare
    rows = [line for line in bare.splitlines() if " x " in line and line.startswith("| ") and "ms" not in line]
    assert len(rows) == 10 and all("| not measured |" in r for r in rows)
    path = write_scaling_doc(tmp_path / "SCALING.md", comm_path=FIXTURE)
    assert path.read_text().startswith("# Scaling: MAE ViT-H/14")
