"""Decoder warm-up (model.decoder_warmup_steps): a run that starts from an encoder alone trains its
fresh decoder first, leaving the loaded encoder bitwise unchanged for those steps."""

from __future__ import annotations

import pytest
import torch

from maescale.checkpoint import consolidated_state_dict
from maescale.models import DECODER_KEYS, create_model
from maescale.rundir import RunDir
from tests.helpers import TINY, base_overrides, run_train

pytestmark = pytest.mark.slow


def test_encoder_stays_bitwise_during_the_decoder_warmup(shards, tmp_path):
    torch.manual_seed(123)
    donor = create_model("mae_vit_tiny_patch4", img_size=32)
    encoder = donor.encoder_state_dict()  # a release-style encoder-only file
    path = tmp_path / "encoder.pth"
    torch.save({"model": encoder}, path)
    out = tmp_path / "run"
    overrides = base_overrides(shards, out, 5, **{"model.init_from": path, "model.decoder_warmup_steps": 3,
                                                  "checkpoint.every_steps": 1, "checkpoint.keep_last": 10,
                                                  "optim.warmup_steps": 0})
    proc = run_train(TINY, overrides)
    assert "encoder only" in proc.stderr
    weights = {s: consolidated_state_dict(RunDir(out).checkpoint(s)) for s in range(1, 6)}
    enc_names = [k for k in encoder if k not in ("pos_embed",)]
    for step in (1, 2, 3):
        changed = [k for k in enc_names if not torch.equal(weights[step][k], encoder[k].float())]
        assert changed == [], f"step {step}: encoder tensors moved during the warm-up: {changed[:3]}"
    dec = [k for k in weights[1] if k.startswith(DECODER_KEYS) and k != "decoder_pos_embed"]
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in dec)  # the decoder trains
    assert any(not torch.equal(weights[4][k], encoder[k].float()) for k in enc_names)  # then the encoder too
