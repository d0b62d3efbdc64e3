"""The WebDataset input pipeline: shards -> rank/worker split -> shuffle -> decode ->
RandomResizedCrop + flip -> uint8 batches with a resumable position.

The trainer uses::

    loader = build_train_loader(cfg.data, img_size=..., micro_batch_size=..., rank=..., world_size=...,
                                seed=..., state=saved_state_or_None)
    for batch in loader:                      # infinite; uint8 (B, 3, S, S)
        x = normalize_batch(batch.to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
        ...
        save(loader.state_dict())             # position after the last batch handed out

See :mod:`maescale.data.pipeline` for what an epoch guarantees and how resuming works, and
:mod:`maescale.data.shards` for writing shards.
"""

from maescale.data.decode import BadSample, Decoder, crop_box
from maescale.data.errors import DataError
from maescale.data.pipeline import (TooManyBadSamples, TrainLoader, build_train_loader, check_bad_fraction,
                                    normalize_batch)
from maescale.data.sources import expand_shards

__all__ = [
    "build_train_loader",
    "TrainLoader",
    "normalize_batch",
    "DataError",
    "TooManyBadSamples",
    "Decoder",
    "BadSample",
    "crop_box",
    "expand_shards",
    "check_bad_fraction",
]
