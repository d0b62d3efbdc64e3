"""The README's demo command, run as written: `make demo`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.helpers import REPO, clean_env, tb_images, tb_scalars

pytestmark = pytest.mark.slow

DEMO_KNN_MARGIN = 0.08  # trained minus at-init kNN top-1 that the demo must show (see below)


def checkout_copy(dest):
    """The checkout without its outputs (runs/, demo_data/), sharing its virtual environment, so
    that running the README's commands here never touches the user's files."""
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "demo_data", "__pycache__", ".pytest_cache",
                                  ".hypothesis", ".whl")
    shutil.copytree(REPO, dest, ignore=skip)  # copy2 keeps mtimes: make sees the venv as up to date
    if (REPO / ".venv").exists():
        (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme
    repo = checkout_copy(tmp_path / "checkout")
    env = {k: v for k, v in clean_env().items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}  # as from a shell,
    # also when the suite itself runs under `make test` (a sub-make prints "Entering directory" lines)
    proc = subprocess.run(["make", "demo"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = repo / "runs" / "demo"
    out = proc.stdout
    assert f"checkpoint:      {run.relative_to(repo)}/checkpoints/step_00000500" in out
    assert "tensorboard --logdir runs/demo/tensorboard" in out
    assert "reconstruction:  runs/demo/reconstruction.png" in out
    losses = [v for _, v in tb_scalars(run)["train/loss"]]
    assert losses[-1] < 0.5 * losses[0], losses  # the loss visibly falls
    assert tb_images(run)["reconstruction"]
    png = run / "reconstruction.png"
    assert png.stat().st_size > 10_000
    assert (run / "checkpoints" / "latest").read_text() == "step_00000500"
    # It ends with the kNN accuracy of the trained encoder on the held-out images against the same
    # encoder at initialisation (evaluated at step 0 with the same seed).
    last = out.rstrip().splitlines()[-1]
    m = re.fullmatch(r"kNN top-1 on (\d+) held-out images: trained (\d\.\d\d), at init (\d\.\d\d) \(.*\)", last)
    assert m, out[-2000:]
    held_out, trained, init = int(m[1]), float(m[2]), float(m[3])
    assert held_out == 128
    # Measured on a 2-core CPU (cls features, k=20, 500 steps, 2026-12-07): trained 0.445 vs 0.313 at
    # init, a margin of 0.13 (the curve at steps 0, 250, 500: 0.31 0.38 0.45); with train.seed=1
    # instead, 0.375 vs 0.258, a margin of 0.12. One held-out image is 0.008 and the steps of the
    # curve wobble by ~0.04, so the test asserts a margin of about two thirds of the smaller one.
    assert trained - init >= DEMO_KNN_MARGIN, (trained, init)
    history = json.loads((run / "eval" / "knn.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 250, 500]
    assert [s for s, _ in tb_scalars(run)["eval/knn_top1"]] == [0, 250, 500]
