"""The README's demo command, run as written: `make demo`."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO, clean_env, tb_images, tb_scalars

pytestmark = pytest.mark.slow


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
    proc = subprocess.run(["make", "demo"], cwd=repo, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = repo / "runs" / "demo"
    out = proc.stdout
    assert f"checkpoint:      {run.relative_to(repo)}/checkpoints/step_00001000" in out
    assert "tensorboard --logdir runs/demo/tensorboard" in out
    assert "reconstruction:  runs/demo/reconstruction.png" in out
    losses = [v for _, v in tb_scalars(run)["train/loss"]]
    assert losses[-1] < 0.5 * losses[0], losses  # the loss visibly falls
    assert tb_images(run)["reconstruction"]
    png = run / "reconstruction.png"
    assert png.stat().st_size > 10_000
    assert (run / "checkpoints" / "latest").read_text() == "step_00001000"
