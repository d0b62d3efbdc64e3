"""Checkpoint pieces: RNG state as JSON, manifest validation, public MAE weights in."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from maescale.checkpoint import (CheckpointError, capture_rng, file_crc32, load_pretrained_into, restore_rng,
                                 validate_checkpoint)
from maescale.models import create_model


def test_rng_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    gen2 = torch.Generator()
    state = json.loads(json.dumps(capture_rng(gen)))
    a = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen))
    restore_rng(state, gen2)
    b = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def _fake_ckpt(path):
    path.mkdir()
    (path / "a.pt").write_bytes(b"x" * 100)
    (path / "b.json").write_text("{}")
    files = {n: {"size": (path / n).stat().st_size, "crc32": file_crc32(path / n)} for n in ("a.pt", "b.json")}
    (path / "MANIFEST.json").write_text(json.dumps({"format": 1, "files": files}))


def test_validation_detects_truncation_corruption_and_missing(tmp_path):
    good = tmp_path / "good"
    _fake_ckpt(good)
    validate_checkpoint(good)
    t = tmp_path / "trunc"
    _fake_ckpt(t)
    (t / "a.pt").write_bytes(b"x" * 50)
    with pytest.raises(CheckpointError, match="a.pt is 50 bytes.*truncated"):
        validate_checkpoint(t)
    c = tmp_path / "corrupt"
    _fake_ckpt(c)
    (c / "a.pt").write_bytes(b"y" * 100)
    with pytest.raises(CheckpointError, match="a.pt fails its CRC32"):
        validate_checkpoint(c)
    m = tmp_path / "missing"
    _fake_ckpt(m)
    (m / "b.json").unlink()
    with pytest.raises(CheckpointError, match="b.json is missing"):
        validate_checkpoint(m)
    n = tmp_path / "nomanifest"
    _fake_ckpt(n)
    (n / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no MANIFEST.json"):
        validate_checkpoint(n)


def test_public_mae_checkpoint_initialises_model(tmp_path):
    torch.manual_seed(0)
    src = create_model("mae_vit_tiny_patch4", img_size=32)
    full = tmp_path / "mae_full.pth"
    torch.save({"model": src.state_dict()}, full)
    dst = create_model("mae_vit_tiny_patch4", img_size=32)
    load_pretrained_into(dst, full)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # encoder-only file: encoder filled, decoder left as initialised
    enc = tmp_path / "mae_encoder.pth"
    torch.save({"model": src.encoder_state_dict()}, enc)
    dst2 = create_model("mae_vit_tiny_patch4", img_size=32)
    before = dst2.decoder_embed.weight.clone()
    result = load_pretrained_into(dst2, enc)
    assert "mask_token" in result["missing"]
    assert torch.equal(dst2.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(dst2.decoder_embed.weight, before)


def test_public_checkpoint_errors(tmp_path):
    model = create_model("mae_vit_tiny_patch4", img_size=32)
    with pytest.raises(CheckpointError, match="file not found"):
        load_pretrained_into(model, tmp_path / "nope.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_pretrained_into(model, bad)
    other = tmp_path / "other.pth"
    torch.save({"model": create_model("mae_vit_mini_patch8", img_size=32).state_dict()}, other)
    with pytest.raises(CheckpointError, match="does not fit model.name"):
        load_pretrained_into(model, other)


class _Payload:
    def __reduce__(self):  # would create a file if unpickled without weights_only
        return (open, ("/tmp/maescale_pwned_marker", "w"))


def test_init_from_never_unpickles_arbitrary_objects(tmp_path):
    import os

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload()}, evil)
    if os.path.exists("/tmp/maescale_pwned_marker"):
        os.remove("/tmp/maescale_pwned_marker")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_pretrained_into(create_model("mae_vit_tiny_patch4", img_size=32), evil)
    assert not os.path.exists("/tmp/maescale_pwned_marker")
