"""What the training loop iterates: normalised float image batches on the training device.

:func:`build_feed` gives one of two feeds with the same interface:

* :class:`DeviceFeed` over the shard pipeline (:mod:`maescale.data.pipeline`): each uint8 batch
  (or, with ``data.gpu_decode``, each batch of JPEG bytes) is moved to the device, decoded there
  if needed, and normalised -- one batch ahead of the loop, on a side CUDA stream;
* :class:`SyntheticFeed` (``data.synthetic: true``): random uint8 images made on the device, no
  files and no workers: the same loop with the input pipeline taken out, to tell a data
  bottleneck from a compute one.

Both keep the data position of the last batch handed to the loop (:meth:`state_dict`), which is
what a checkpoint stores, whatever the feed has fetched ahead.

Overlap (:class:`DeviceFeed`). A producer thread takes the next loader batch and prepares it
while the loop trains on the current one: on CUDA everything it queues (the host-to-device copies
from pinned memory, nvjpeg's decode, the batched crop/resize, the normalisation) runs on a side
stream of its own, and the batch is handed over with an event that the training stream waits on
(``wait_event``: the GPU orders the work, the host never waits) plus ``record_stream``, so the
caching allocator does not give the batch's memory to the side stream again before the training
stream is done with it. The thread is what hides the host-side part of the device work too:
torchvision's ``decode_jpeg`` on CUDA waits on the host for its own stream, and launching the
kernels costs CPU time; both now happen while the loop's own thread launches the step.
``prefetch`` batches at most are prepared ahead (default 1); ``prefetch=0`` prepares each batch
in the calling thread, through the same code. On the CPU the same thread and code run without
streams and events.

The position handed to the loop travels with each batch: the producer snapshots
``loader.state_dict()`` right after taking the batch from the loader, and :meth:`state_dict`
returns the snapshot of the last batch handed out, never that of a batch still queued, so a
checkpoint resumes exactly where the loop was. Errors raised while preparing a batch (too many bad
samples, a dead worker) are raised by the ``next()`` that would have returned that batch.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from maescale.data.pipeline import TrainLoader, build_train_loader, normalize_batch

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a waiting producer looks at the stop flag
_JOIN_TIMEOUT_S = 120.0  # a producer inside loader.next() finishes that batch first


@dataclass
class _Prepared:
    """One batch made ready by the producer, with the position after it."""

    images: torch.Tensor | None
    event: Any  # torch.cuda.Event recorded on the side stream after the batch's work, or None
    position: dict[str, Any]
    epoch: int
    error: BaseException | None = None


class DeviceFeed:
    """Batches of a :class:`~maescale.data.pipeline.TrainLoader`, normalised on ``device``,
    prepared ``prefetch`` batches ahead (see the module doc)."""

    def __init__(self, loader: TrainLoader, device: torch.device, mean: Sequence[float], std: Sequence[float],
                 prefetch: int = 1):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the producer thread must not fall back to cuda:0
            device = torch.device("cuda", torch.cuda.current_device())
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, not {prefetch}")
        self.loader, self.device, self.prefetch = loader, device, int(prefetch)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batches_per_epoch: int | None = loader.batches_per_epoch
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._iter = None
        self._position = loader.state_dict()
        self._epoch = loader.epoch
        self._thread: threading.Thread | None = None
        self._ready: queue.Queue[_Prepared] = queue.Queue()
        self._slots = threading.Semaphore(0)
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def __iter__(self) -> "DeviceFeed":
        return self

    # ---- producing ---------------------------------------------------------------------------

    def _prepare(self, batch: Any) -> torch.Tensor:
        """Device work of one loader batch, queued on the current stream."""
        return normalize_batch(batch.to(self.device, non_blocking=True), self.mean, self.std)

    def _produce(self) -> _Prepared:
        """Take the next loader batch and queue its device work (on the side stream on CUDA)."""
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        position, epoch = self.loader.state_dict(), self.loader.epoch  # after this batch, before any later one
        if self._stream is None:
            return _Prepared(self._prepare(batch), None, position, epoch)
        with torch.cuda.stream(self._stream):
            images = self._prepare(batch)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _Prepared(images, event, position, epoch)

    def _run(self) -> None:
        """The producer thread: up to ``prefetch`` prepared batches ahead of the loop."""
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # per thread in CUDA: ours starts on device 0
            while not self._stop.is_set():
                if not self._slots.acquire(timeout=_POLL_S):
                    continue
                if self._stop.is_set():
                    return
                self._ready.put(self._produce())
        except BaseException as exc:  # handed to the loop at the batch it concerns
            self._ready.put(_Prepared(None, None, {}, 0, exc))

    def _start(self) -> None:
        self._stop.clear()
        self._slots = threading.Semaphore(self.prefetch)
        self._ready = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="maescale-feed", daemon=True)
        self._thread.start()

    def _stop_producer(self) -> bool:
        """Stop the producer thread and drop what it prepared; False if it did not stop in time."""
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._stop.set()
        self._slots.release()
        thread.join(timeout=_JOIN_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("data feed: the producer thread did not stop within %.0f s; leaving it", _JOIN_TIMEOUT_S)
            return False
        self._ready = queue.Queue()
        return True

    # ---- the loop's interface ------------------------------------------------------------------

    def __next__(self) -> torch.Tensor:
        if self._error is not None:
            raise self._error
        if self.prefetch == 0:
            item = self._produce()
        else:
            if self._thread is None:
                self._start()
            item = self._ready.get()
            if item.error is None:
                self._slots.release()  # room for the next one: it is prepared while this one trains
        if item.error is not None:
            self._error = item.error
            raise item.error
        assert item.images is not None
        if item.event is not None:  # the training stream waits on the GPU, the host does not
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.event)
            item.images.record_stream(current)
        self._position, self._epoch = item.position, item.epoch
        return item.images

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """The loader position after the last batch this feed handed out (not after the batches
        it prepared ahead)."""
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (or a ``{"ranks": [...]}`` list, see the loader). Batches
        prepared ahead are dropped; the next one is the one after ``state``."""
        if self._stop_producer():
            self.loader.close()
            self._iter = None
        self._error = None
        self.loader.load_state_dict(state)
        self._position, self._epoch = self.loader.state_dict(), self.loader.epoch

    def stats(self) -> dict[str, int]:
        """The loader's counters (good/bad samples, shards); they include the batches prepared
        ahead."""
        return self.loader.stats()

    def close(self) -> None:
        """Stop the producer thread and the loader's worker processes."""
        if self._stop_producer():
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
