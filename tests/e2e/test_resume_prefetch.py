"""End to end: with data.gpu_decode the feed prepares the next batch (JPEG decode, batched crop and
resize, normalisation; here the CPU stands in for the device) while the step runs. A run stopped
by a signal mid-run -- a batch prepared ahead and never trained on -- resumes to the same weights
as an uninterrupted run: the checkpoint stores the position of the last batch handed to the loop."""

from __future__ import annotations

import pytest

from tests.data.conftest import write_jpeg_shards
from tests.e2e.test_train import _interrupt_and_resume
from tests.helpers import TINY, assert_same_weights, base_overrides, final_weights, run_train

pytestmark = pytest.mark.slow


def test_exact_resume_with_gpu_decode_and_prefetch(tmp_path):
    shards = write_jpeg_shards(tmp_path / "shards", count=96, per_shard=24, sizes=[(64, 48), (96, 72), (40, 40)])
    extra = {"data.gpu_decode": "true", "data.num_workers": 2}
    ref = tmp_path / "ref"
    run_train(TINY, base_overrides(shards, ref, 20, **extra))
    out = tmp_path / "resumed"
    stopped = _interrupt_and_resume(shards, out, base_overrides(shards, out, 20, **extra), nproc=1)
    assert stopped < 20
    log = (out / "logs" / "train.log").read_text()
    assert "gpu_decode: true" in (out / "config.yaml").read_text()
    assert "bad sample" not in log
    assert_same_weights(final_weights(ref), final_weights(out))
