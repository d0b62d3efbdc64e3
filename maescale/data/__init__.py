"""The WebDataset input pipeline: shards -> rank/worker split -> shuffle -> decode ->
RandomResizedCrop + flip -> uint8 batches with a resumable position.

The trainer uses::

    loader = build_train_loader(cfg.data, img_size=..., micro_batch_size=..., rank=..., world_size=...,
                                seed=..., state=saved_state_or_None)
    for batch in loader:                      # infinite; uint8 (B, 3, S, S)
        x = normalize_batch(batch.to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
        # with data.gpu_decode: true the batch is an EncodedBatch (JPEG bytes + crop boxes):
        # .to() moves it, normalize_batch decodes it there (nvjpeg on CUDA)
        ...
        save(loader.state_dict())             # position after the last batch handed out

See :mod:`maescale.data.plan` for what an epoch guarantees, :mod:`maescale.data.pipeline` for how
resuming works, :mod:`maescale.data.worker` for bad data, and :mod:`maescale.data.shards` for
writing shards. Names are imported lazily, so that the shard
tools (``maescale.data.shards``, ``maescale.data.demo``) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "build_train_loader": "maescale.data.pipeline",
    "TrainLoader": "maescale.data.pipeline",
    "normalize_batch": "maescale.data.pipeline",
    "TooManyBadSamples": "maescale.data.worker",
    "check_bad_fraction": "maescale.data.worker",
    "DataError": "maescale.data.errors",
    "Decoder": "maescale.data.decode",
    "BadSample": "maescale.data.decode",
    "crop_box": "maescale.data.decode",
    "EncodedBatch": "maescale.data.gpu_decode",
    "decode_on_device": "maescale.data.gpu_decode",
    "to_device_images": "maescale.data.gpu_decode",
    "expand_shards": "maescale.data.sources",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from maescale.data.decode import BadSample, Decoder, crop_box
    from maescale.data.errors import DataError
    from maescale.data.gpu_decode import EncodedBatch, decode_on_device, to_device_images
    from maescale.data.pipeline import TrainLoader, build_train_loader, normalize_batch
    from maescale.data.worker import TooManyBadSamples, check_bad_fraction
    from maescale.data.sources import expand_shards


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maescale.data' has no attribute {name!r}")
