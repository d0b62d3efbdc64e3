"""What the training loop iterates: normalised float image batches on the training device.

:func:`build_feed` gives one of two feeds with the same interface:

* :class:`DeviceFeed` over the shard pipeline (:mod:`maescale.data.pipeline`): each uint8 batch
  (or, with ``data.gpu_decode``, each batch of JPEG bytes) is moved to the device, decoded there
  if needed, and normalised;
* :class:`SyntheticFeed` (``data.synthetic: true``): random uint8 images made on the device, no
  files and no workers: the same loop with the input pipeline taken out, to tell a data
  bottleneck from a compute one.

Both keep the data position of the last batch handed to the loop (:meth:`state_dict`), which is
what a checkpoint stores, whatever the feed has fetched ahead.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from maescale.data.pipeline import TrainLoader, build_train_loader, normalize_batch


class DeviceFeed:
    """Batches of a :class:`~maescale.data.pipeline.TrainLoader`, normalised on ``device``."""

    def __init__(self, loader: TrainLoader, device: torch.device, mean: Sequence[float], std: Sequence[float]):
        self.loader, self.device, self.mean, self.std = loader, device, tuple(mean), tuple(std)
        self.batches_per_epoch: int | None = loader.batches_per_epoch
        self._iter = None
        self._position = loader.state_dict()
        self._epoch = loader.epoch

    def __iter__(self) -> "DeviceFeed":
        return self

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        self._position, self._epoch = self.loader.state_dict(), self.loader.epoch
        return normalize_batch(batch.to(self.device, non_blocking=True), self.mean, self.std)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """The loader position after the last batch this feed handed out."""
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (or a ``{"ranks": [...]}`` list, see the loader). Call
        before iterating."""
        self.loader.load_state_dict(state)
        self._position, self._epoch = self.loader.state_dict(), self.loader.epoch

    def stats(self) -> dict[str, int]:
        """The loader's counters (good/bad samples, shards)."""
        return self.loader.stats()

    def close(self) -> None:
        """Stop the loader's worker processes."""
        self.loader.close()
        self._iter = None


class SyntheticFeed:
    """Uniform random uint8 images made on ``device`` (then normalised as real ones are).

    Batch ``n`` of a rank is a pure function of ``(seed, rank, n)``, so the position is just
    ``n`` and resume is exact. An epoch is ``data.num_samples`` images when that is set.
    """

    def __init__(self, batch_size: int, img_size: int, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], seed: int, rank: int, world_size: int, num_samples: int | None = None):
        self.batch_size, self.img_size, self.device = batch_size, img_size, device
        self.mean, self.std, self.seed, self.rank = tuple(mean), tuple(std), seed, rank
        self.batches_per_epoch = num_samples // (world_size * batch_size) if num_samples else None
        if self.batches_per_epoch == 0:
            self.batches_per_epoch = 1
        self._next = 0
        self._gen = torch.Generator(device=device)

    def __iter__(self) -> "SyntheticFeed":
        return self

    def __next__(self) -> torch.Tensor:
        key = hashlib.blake2b(repr(("synthetic", self.seed, self.rank, self._next)).encode(), digest_size=8)
        self._gen.manual_seed(int.from_bytes(key.digest(), "little") >> 1)
        self._next += 1
        shape = (self.batch_size, 3, self.img_size, self.img_size)
        batch = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device, generator=self._gen)
        return normalize_batch(batch, self.mean, self.std)

    @property
    def epoch(self) -> int:
        return self._next // self.batches_per_epoch if self.batches_per_epoch else 0

    def state_dict(self) -> dict[str, Any]:
        return {"synthetic": True, "batch": self._next, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" in state:  # saved by a job of another size: the same global position
            ranks = [s for s in state["ranks"] if s is not None]
            mine = [s for s in ranks if s.get("rank") == self.rank]
            state = (mine or ranks)[0]
        if not state.get("synthetic"):
            from maescale.data.errors import DataError

            raise DataError("the checkpoint's data position is of real shards, but data.synthetic is true: "
                            "resume with data.synthetic=false, or start a new output_dir", key="data.synthetic")
        self._next = int(state["batch"])

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def build_feed(cfg: Any, rank: int, world_size: int, device: torch.device) -> DeviceFeed | SyntheticFeed:
    """The feed a :class:`maescale.config.Config` asks for, on ``device``."""
    d = cfg.data
    if d.synthetic:
        return SyntheticFeed(cfg.train.micro_batch_size, cfg.model.img_size, device, d.mean, d.std,
                             cfg.train.seed, rank, world_size, d.num_samples)
    loader = build_train_loader(d, img_size=cfg.model.img_size, micro_batch_size=cfg.train.micro_batch_size,
                                rank=rank, world_size=world_size, seed=cfg.train.seed)
    return DeviceFeed(loader, device, d.mean, d.std)
