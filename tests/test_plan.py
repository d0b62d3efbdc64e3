"""The plan before submitting (maescale/planning, tools/plan.py): arithmetic against hand
computations, measured rates (and their absence), memory fit and its fixes, the data check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from maescale.config import ConfigError, load_config
from maescale.data.shards import Record, write_records
from maescale.planning.memory import (GIB, GPUS, MemorySetup, block_model, estimate_memory, find_profile, fixes,
                                      gpu_memory, load_profiles)
from maescale.planning.plan import count_steps, format_plan, make_plan
from tests.helpers import REPO

HUGE = REPO / "configs" / "vit_huge.yaml"
TINY = REPO / "configs" / "tiny.yaml"
FIXTURE_COMM = REPO / "tests" / "fixtures" / "comm.json"
P_HUGE = 656_613_964
IMAGENET = 1_281_167


def _has_history() -> bool:
    """The measured rates are attributed through the git history of configs/ (planning.rates)."""
    out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--before=2026-11-29T22:32:01+00:00", "--format=%H",
                          "--", "configs"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


needs_history = pytest.mark.skipif(not _has_history(), reason="no git history of configs/ (shallow clone?)")


def huge(*overrides: str, nodes: int = 16):
    return load_config(HUGE, [f"slurm.nodes={nodes}", *overrides])


def plan_of(cfg, tmp_path: Path, **kw):
    kw.setdefault("comm_path", tmp_path / "no-comm.json")
    kw.setdefault("decode_samples", 0)
    return make_plan(cfg, "test", **kw)


# --------------------------------------------------------------------------------------------
# Length
# --------------------------------------------------------------------------------------------


def test_count_steps_by_hand():
    L = count_steps(IMAGENET, 128, 32, 1, None, 1600)  # the ViT-H recipe on 16 nodes
    assert (L.batches_per_epoch, L.steps_per_epoch, L.total_steps) == (312, 312, 499_200)  # 1281167 // 4096
    assert L.images == 499_200 * 4096 and L.epochs == 1600
    L = count_steps(1000, 4, 8, 2, None, 3)  # 1000 // 32 = 31 batches, 15.5 steps per epoch
    assert (L.batches_per_epoch, L.steps_per_epoch, L.total_steps, L.images) == (31, 15.5, 46, 46 * 64)
    L = count_steps(1000, 4, 8, 2, 100, None)
    assert L.total_steps == 100 and L.epochs == pytest.approx(100 / 15.5) and L.images == 6400
    assert count_steps(None, 4, 8, 1, None, 3).total_steps is None


def test_count_steps_agrees_with_the_loader_and_the_trainer(tmp_path):
    from maescale.data.pipeline import build_train_loader
    from maescale.train import plan_length

    write_records((Record(f"x{i}", {"jpg": b"x"}) for i in range(100)), tmp_path, maxcount=30)
    for ranks, mb, accum, epochs in [(3, 4, 1, 2.0), (2, 5, 3, 7.5), (1, 7, 2, 1.0)]:
        cfg = load_config(TINY, [f"data.train_shards={tmp_path}/shard-*.tar", f"train.micro_batch_size={mb}",
                                 f"train.grad_accum_steps={accum}", f"train.epochs={epochs}"])
        loader = build_train_loader(cfg.data, img_size=32, micro_batch_size=mb, rank=0, world_size=ranks, seed=0)
        mine = count_steps(100, ranks, mb, accum, None, epochs)
        assert mine.batches_per_epoch == loader.batches_per_epoch
        assert (mine.total_steps, mine.steps_per_epoch) == plan_length(cfg, loader.batches_per_epoch)


# --------------------------------------------------------------------------------------------
# Rates, time and cost
# --------------------------------------------------------------------------------------------


@needs_history
def test_time_and_gpu_hours_at_the_measured_rate(tmp_path):
    plan = plan_of(huge(f"data.num_samples={IMAGENET}"), tmp_path)
    assert plan.rate_source == "measured" and [m.rate for m in plan.rates] == [pytest.approx(636.17, abs=0.01)]
    m = plan.rates[0]
    assert (m.device, m.date[:10], m.file) == ("NVIDIA H200", "2026-11-29", "bench/h200/run2/loop_compile.json")
    (e,) = plan.estimates
    wall = 499_200 * 32 / m.rate  # no measured collectives given: the compute alone
    assert e.wall_s == pytest.approx(wall) and e.gpu_hours == pytest.approx(wall * 128 / 3600)
    text = format_plan(plan)
    assert "636 img/s per GPU, measured on NVIDIA H200 2026-11-29" in text
    assert f"{wall / 3600:,.1f} h, {wall * 128 / 3600:,.0f} GPU-hours" in text and "(compute only)" in text
    assert "499,200 steps = 1600 epochs" in text and "communication not measured" in text


@needs_history
def test_communication_is_added_from_the_measured_collectives(tmp_path):
    plan = plan_of(huge(f"data.num_samples={IMAGENET}"), tmp_path, comm_path=FIXTURE_COMM)
    (e,) = plan.estimates
    assert e.exposed_s > 0 and e.step_s == pytest.approx(32 / plan.rates[0].rate + e.exposed_s)
    text = format_plan(plan)
    assert "exposed communication" in text and "collectives as measured in comm.json" in text
    assert "(compute only)" not in text


@needs_history
def test_each_variant_gets_its_own_measurement(tmp_path):
    """The eager rates were measured before configs/vit_huge.yaml turned on CUDA graphs: they
    belong to model.compile=false, not to today's file."""
    eager = plan_of(huge("model.compile=false", f"data.num_samples={IMAGENET}"), tmp_path)
    assert sorted(round(m.rate) for m in eager.rates) == [360, 426]
    assert len(eager.estimates) == 2  # the slowest and the fastest measurement
    walls = sorted(e.wall_s for e in eager.estimates)
    assert walls == [pytest.approx(499_200 * 32 / r) for r in sorted((m.rate for m in eager.rates), reverse=True)]
    big = plan_of(huge("train.micro_batch_size=128", f"data.num_samples={IMAGENET}", nodes=4), tmp_path)
    assert [round(m.rate) for m in big.rates] == [1183]


def test_a_rate_that_was_not_measured_is_said_so(tmp_path):
    plan = plan_of(huge("train.micro_batch_size=64", f"data.num_samples={IMAGENET}"), tmp_path)
    assert plan.rate_source == "not measured" and plan.rates == [] and plan.estimates == []
    text = format_plan(plan)
    assert "rate      not measured: no committed loop benchmark of mae_vit_huge_patch14 at micro-batch 64" in text
    assert "time      not measured" in text and "GPU-hours" not in text and "img/s;" not in text
    given = plan_of(huge("train.micro_batch_size=64", f"data.num_samples={IMAGENET}"), tmp_path, rate=500.0)
    (e,) = given.estimates
    assert e.wall_s == pytest.approx(count_steps(IMAGENET, 128, 64, 1, None, 1600).total_steps * 64 / 500)
    assert "500 img/s per GPU, given with --rate" in format_plan(given)


def test_too_few_requeues_for_the_run_is_a_warning(tmp_path):
    plan = plan_of(huge(f"data.num_samples={IMAGENET}", "slurm.time=01:00:00", "slurm.max_requeues=2"), tmp_path,
                   rate=636.0)
    assert any("slurm.max_requeues=2" in w and "slurm.time=01:00:00" in w for w in plan.warnings)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _profile(k: int = 0, preset: str = "mae_vit_huge_patch14"):
    _, profiles = load_profiles()
    return find_profile(profiles, preset, 224, 0.75, k)


def test_memory_by_hand(tmp_path):
    plan = plan_of(huge(), tmp_path)
    prof = _profile(0)
    states = P_HUGE * 2 + P_HUGE * 2 + P_HUGE * 12 / 128  # ZeRO-1 over 128 ranks shards the 12 optimizer bytes
    act = prof.peak_fixed + 32 * prof.peak_per_image
    me = plan.memory
    assert me.states.total == pytest.approx(states) and me.activations == pytest.approx(act)
    assert me.total == pytest.approx(states + act + 8 * GIB) and me.fits
    assert me.gpu.name == "NVIDIA H100 80GB" and me.gpu.gib == pytest.approx(81_559 / 1024)
    assert "fits" in format_plan(plan) and not plan.warnings


def test_memory_model_against_the_h200_measurement():
    """The one-GPU loop's max_memory_allocated (bench/h200/run2/loop_compile.json) against states
    (ZeRO-1 on one GPU: all 16 bytes per parameter) + profiled activations, without the reserve."""
    record = json.loads((REPO / "bench/h200/run2/loop_compile.json").read_text())
    prof = _profile(0)
    for r in record["results"]:
        if r["overrides"] == ["model.compile=graphs"]:
            model = (16 * P_HUGE + prof.peak_fixed + r["micro_batch"] * prof.peak_per_image) / GIB
            assert model == pytest.approx(r["peak_mem_gib"], rel=0.06), r["micro_batch"]


def test_a_run_that_cannot_fit_is_warned_with_the_keys_that_fix_it(tmp_path):
    plan = plan_of(huge("train.micro_batch_size=1024", nodes=1), tmp_path, gpu="a100-40gb")
    assert plan.memory.fits is False
    (warning,) = [w for w in plan.warnings if "does not fit" in w]
    assert "NVIDIA A100 40GB" in warning
    assert "model.act_ckpt_every=1" in warning
    assert "train.micro_batch_size=128 train.grad_accum_steps=8" in warning
    assert "WARNING: does not fit in GPU memory" in format_plan(plan)
    # each fix, applied, fits
    for fix in (["model.act_ckpt_every=1", "train.micro_batch_size=1024"],
                ["train.micro_batch_size=128", "train.grad_accum_steps=8"]):
        fixed = plan_of(huge(*fix, nodes=1), tmp_path, gpu="a100-40gb")
        assert fixed.memory.fits and not [w for w in fixed.warnings if "does not fit" in w]


def test_zero_stage_is_named_when_it_is_the_fix():
    """Unsharded states fill a small GPU: neither recompute nor a smaller micro-batch help."""
    setup = MemorySetup("mae_vit_huge_patch14", P_HUGE, 224, 0.75, 0, "bf16", zero_stage=0, world_size=8,
                        micro_batch=1)
    gpu = gpu_memory(17.5)
    _, profiles = load_profiles()
    assert estimate_memory(setup, gpu, profiles).fits is False  # 16 bytes x P = 9.8 GiB + 8 GiB reserve
    (fix,) = fixes(setup, 1, gpu, profiles)
    assert fix.startswith("deepspeed.zero_stage=1 ")
    assert estimate_memory(replace(setup, zero_stage=1), gpu, profiles).fits


def test_block_model_reproduces_the_measured_intervals():
    _, profiles = load_profiles()
    for preset in ("mae_vit_base_patch16", "mae_vit_huge_patch14"):
        same = [p for p in profiles if p.preset == preset]
        by_k = {p.act_ckpt_every: p for p in same}
        for k in (2, 4):
            model = block_model(by_k[0], by_k[1], same, k)
            assert model.saved_per_image == pytest.approx(by_k[k].saved_per_image, rel=0.01), (preset, k)
            assert model.peak_per_image == pytest.approx(by_k[k].peak_per_image, rel=0.03), (preset, k)
    assert find_profile(profiles, "mae_vit_huge_patch14", 224, 0.75, 3).derived  # not measured: derived


def test_the_profile_file_says_how_it_was_made():
    meta, profiles = load_profiles()
    assert meta["made_by"] == "python -m maescale.devtools.memory --write-profiles"
    assert profiles and all(p.made.get("date") and p.made.get("device") and p.made.get("versions", {}).get("torch")
                            for p in profiles)


def test_gpu_memory_spec():
    assert gpu_memory(None) is GPUS["h100"] and gpu_memory("H200").gib == pytest.approx(143_771 / 1024)
    assert gpu_memory("96").gib == 96 and gpu_memory("40GiB").gib == 40
    with pytest.raises(ValueError, match="h100, h200"):
        gpu_memory("h300")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def jpeg_shards(folder: Path, count: int = 72, per_shard: int = 24, bad: int = 0) -> str:
    from maescale.data.demo import demo_records

    records = list(demo_records(count - bad, 48))
    records += [Record(f"bad{i}", {"jpg": b"\xff\xd8 not really a jpeg"}) for i in range(bad)]
    write_records(records, folder, maxcount=per_shard)
    return f"{folder}/shard-*.tar"


def tiny(shards: str, *overrides: str):
    return load_config(TINY, [f"data.train_shards={shards}", "slurm.nodes=1", "slurm.gpus_per_node=2",
                              "data.num_workers=4", *overrides])


def test_fewer_shards_than_readers_with_sizes_is_fine(tmp_path):
    plan = plan_of(tiny(jpeg_shards(tmp_path)), tmp_path, decode_samples=8)
    d = plan.data
    assert len(d.urls) == 3 and d.sizes == [24, 24, 24] and d.readers == 8 and d.samples_per_epoch == 72
    assert "sizes known" in d.split and any("fewer shards (3) than readers (8)" in n for n in d.notes)
    assert not plan.warnings
    assert d.decode.images == 8 and not d.decode.bad and d.decode.per_core > 0


def test_a_shard_set_too_small_for_the_readers_is_reported(tmp_path):
    shards = jpeg_shards(tmp_path)
    os.remove(tmp_path / "sizes.json")
    plan = plan_of(tiny(shards, "data.num_samples=72"), tmp_path)
    (w,) = plan.warnings
    assert "3 shards for 8 readers without per-shard sizes: 5 readers have no shard of their own" in w
    assert "62%" in w and "data.sizes_file" in w and "data.num_workers" in w
    unknown = plan_of(tiny(shards), tmp_path)
    assert any("the job will stop at start-up" in w and "data.num_samples" in w for w in unknown.warnings)
    assert "epoch size unknown" in format_plan(unknown)


def test_undecodable_images_are_reported(tmp_path):
    plan = plan_of(tiny(jpeg_shards(tmp_path, count=24, per_shard=24, bad=3)), tmp_path, decode_samples=24)
    assert len(plan.data.decode.bad) == 3 and plan.data.decode.images == 21
    assert any("3 of 24 sampled images did not decode" in w and "data.max_bad_fraction" in w for w in plan.warnings)


def test_decode_that_cannot_keep_up_is_a_warning(tmp_path):
    plan = plan_of(tiny(jpeg_shards(tmp_path), "train.device=auto"), tmp_path, decode_samples=8, rate=1e7)
    (w,) = [w for w in plan.warnings if "decode cannot keep up" in w]
    assert "data.num_workers=4" in w and "slurm.cpus_per_task=10" in w and "data.gpu_decode=true" in w


# --------------------------------------------------------------------------------------------
# The command lines
# --------------------------------------------------------------------------------------------


def test_plan_modules_and_the_config_load_without_torch():
    code = ("import sys; import maescale.config as c; c.load_config('configs/vit_huge.yaml');"
            "import maescale.planning.plan, maescale.planning.cli, maescale.planning.scaling_doc, maescale.scaling;"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_the_plan_command_is_fast(tmp_path):
    shards = jpeg_shards(tmp_path)
    cmd = [sys.executable, str(REPO / "tools/plan.py"), str(TINY), f"data.train_shards={shards}", "--nodes", "2",
           "--decode-samples", "16"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "plan: " in out.stdout and "decoded 16 of 16 sampled images" in out.stdout
    without = subprocess.run(cmd[:-1] + ["0"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert without.returncode == 0 and "decoded" not in without.stdout
    print(f"tools/plan.py with a decoded sample: {seconds:.1f} s")
    assert seconds < 30  # ~1 s on an idle 2-core VM (torch is imported for the decode only)


def test_bad_input_on_the_command_line(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "tools/plan.py"), *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    bad = run(str(HUGE), "--gpu-mem", "h300")
    assert bad.returncode == 2 and "--gpu-mem 'h300'" in bad.stderr
    typo = run(str(HUGE), "train.micro_batch_sise=8")
    assert typo.returncode == 2 and "micro_batch_sise" in typo.stderr


def test_submit_dry_run_prints_the_plan(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools/submit.py"), "--nodes", "16", str(HUGE),
                          f"output_dir={tmp_path / 'run'}", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH" in out.stdout and "plan: " in out.stdout and "memory " in out.stdout
    assert not (tmp_path / "run").exists()  # nothing written


def test_profile_writer_merges_and_records_its_provenance(tmp_path):
    from maescale.devtools.memory import write_profiles

    path = tmp_path / "profiles.json"
    write_profiles(str(path), ["mae_vit_tiny_patch4"], (0,))
    write_profiles(str(path), ["mae_vit_tiny_patch4"], (1,))  # adds, keeps the first
    meta, profiles = load_profiles(path)
    assert meta["made_by"] == "python -m maescale.devtools.memory --write-profiles"
    assert sorted(p.act_ckpt_every for p in profiles) == [0, 1]
    off = find_profile(profiles, "mae_vit_tiny_patch4", 32, 0.75, 0)
    assert off.depth == {"encoder": 2, "decoder": 1} and off.made["versions"]["torch"]
    assert off.peak_per_image > find_profile(profiles, "mae_vit_tiny_patch4", 32, 0.75, 1).saved_per_image
