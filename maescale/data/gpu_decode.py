"""``data.gpu_decode: true``: the workers ship JPEG bytes, the device decodes, crops and resizes.

For nodes whose CPUs cannot keep up with the GPUs. Split of the work:

Worker (CPU, no CUDA): :func:`prepare_sample` opens each image lazily (PIL reads the header only),
draws the crop box and the flip with exactly the law and the per-sample RNG of the CPU path
(:meth:`maescale.data.decode.Decoder.draw` on the image size from the header, so a seed gives the
same boxes with and without this option), and

* for a baseline or progressive JPEG in YCbCr/RGB or grayscale whose stream ends with an EOI
  marker: keeps the encoded bytes, the box and the flip (no decode);
* for anything else -- PNG, WebP, ..., CMYK/YCCK JPEGs, JPEGs without an EOI marker (truncated):
  decodes on the CPU exactly as the CPU path does, so the image is shipped ready (cropped,
  resized, flipped), or the sample is a bad sample, counted and skipped as today.

:class:`EncodedBatchBuilder` packs a batch into one :class:`EncodedBatch`: one contiguous byte
buffer (one shared-memory block per batch, not one per image) with offsets, the boxes and flips,
and the ready images.

Device (main process): ``batch.to(device, non_blocking=True)`` moves the ready images (the bytes
stay on the host: nvjpeg reads host memory); :func:`decode_on_device` (called by
:func:`maescale.data.normalize_batch` and :func:`to_device_images`) decodes all the JPEGs of the
batch with one ``torchvision.io.decode_jpeg(list, device=device, mode=RGB)`` call (batched nvjpeg
on CUDA; libjpeg-turbo on CPU), crops each to its box, resizes it to ``img_size`` with
antialiased bicubic (or bilinear) on float32 (rounded and clamped back to uint8) and flips it.

Failures on the device never stop the run: when the batched call raises, the JPEGs are decoded
one by one on the device, then on the CPU; an image that still fails, or whose decoded size
differs from its header's, is a bad sample: it is counted in the loader's ``samples_bad`` (and
``data.max_bad_fraction`` applies), logged, and its slot in the batch is filled with a copy of
another image of the same batch (mid-grey if none decoded). The batch size never changes, so the
position and the exact resume (which only depend on what the workers read) are unaffected.

Images differ slightly from the CPU path's for the same box (another JPEG decoder -- nvjpeg or
libjpeg-turbo at full resolution instead of the DCT-scaled ``draft()`` decode -- and a float
resize instead of the uint8 one): within a few grey levels on average (see the tests).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from maescale.data.decode import Decoder

logger = logging.getLogger(__name__)

DEVICE_JPEG_MODES = ("RGB", "L")  # PIL modes of JPEGs decoded on the device (YCbCr/RGB, grayscale)
_EOI = b"\xff\xd9"


@dataclass
class Encoded:
    """A JPEG sample left encoded by the worker."""

    data: bytes  # (or any buffer: bytearray, memoryview)
    box: tuple[int, int, int, int]  # top, left, h, w in the full image
    flip: bool
    size: tuple[int, int]  # (height, width) from the header


@dataclass
class Ready:
    """A sample decoded (cropped, resized, flipped) by the worker."""

    image: torch.Tensor  # uint8 (3, S, S)
    box: tuple[int, int, int, int]
    flip: bool


def device_decodable(img: Any, data: bytes) -> bool:
    """Whether a lazily opened image goes to the device: a JPEG that torchvision/nvjpeg decode to
    RGB (YCbCr/RGB or grayscale; not CMYK/YCCK) whose stream ends with an EOI marker (a truncated
    file is left to the CPU path, which makes it a bad sample as before)."""
    return img.format == "JPEG" and img.mode in DEVICE_JPEG_MODES and _EOI in data[-64:]


def prepare_sample(decoder: Decoder, data: bytes, rng: random.Random) -> Encoded | Ready:
    """The worker's share of one sample: header, box and flip (the CPU path's law and RNG use), and
    the bytes, or the decoded image when the device will not decode it. Raises
    :class:`maescale.data.decode.BadSample` like the CPU path."""
    img = decoder.open(data)
    box, flip = decoder.draw(rng, *img.size)
    if device_decodable(img, data):
        w, h = img.size
        return Encoded(data, box, flip, (h, w))
    return Ready(decoder.render(img, data, box, flip), box, flip)


@dataclass
class EncodedBatch:
    """A batch of ``len(self)`` samples, some still JPEG bytes (decoded by :func:`decode_on_device`).

    All tensors but ``ready`` stay on the CPU; ``ready`` (and ``device``) follow :meth:`to`.
    """

    data: torch.Tensor  # uint8 (N,): the JPEG bytes of the encoded samples, concatenated
    offsets: torch.Tensor  # int64 (J + 1,): JPEG j is data[offsets[j]:offsets[j + 1]]
    jpeg_pos: torch.Tensor  # int64 (J,): batch positions of the JPEGs
    sizes: torch.Tensor  # int64 (J, 2): (height, width) of each JPEG, from its header
    boxes: torch.Tensor  # int64 (B, 4): top, left, h, w of every sample (also the ready ones)
    flips: torch.Tensor  # bool (B,)
    ready: torch.Tensor  # uint8 (R, 3, S, S): samples decoded by the worker
    ready_pos: torch.Tensor  # int64 (R,)
    img_size: int
    interpolation: str = "bicubic"
    keys: list[str] = field(default_factory=list)  # "shard/key" of each sample (for error messages)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # set by the TrainLoader in the main process: called with (key, reason) for each bad sample
    on_bad: Callable[[str, str], None] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.flips.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the decoded batch."""
        return (len(self), 3, self.img_size, self.img_size)

    @property
    def num_jpegs(self) -> int:
        return int(self.jpeg_pos.shape[0])

    def jpeg_bytes(self) -> list[torch.Tensor]:
        """The encoded JPEGs, as 1-D uint8 CPU tensors (views of :attr:`data`)."""
        off = self.offsets.tolist()
        return [self.data[off[j]:off[j + 1]] for j in range(len(off) - 1)]

    def pin_memory(self, device: Any = None) -> "EncodedBatch":
        """Called by the DataLoader's pin-memory thread."""
        return dataclasses.replace(self, ready=self.ready.pin_memory())

    def to(self, device: Any, non_blocking: bool = False) -> "EncodedBatch":
        """The ready images moved to ``device`` (the bytes stay on the host, where nvjpeg reads
        them); the result decodes on ``device``."""
        device = torch.device(device)
        return dataclasses.replace(self, ready=self.ready.to(device, non_blocking=non_blocking), device=device)

    def decode(self) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` on :attr:`device`; see :func:`decode_on_device`."""
        return decode_on_device(self, self.img_size, self.interpolation, self.device)


class EncodedBatchBuilder:
    """Collects the :func:`prepare_sample` results of one batch (in the worker)."""

    def __init__(self, batch_size: int, img_size: int, interpolation: str):
        self.batch_size, self.img_size, self.interpolation = batch_size, img_size, interpolation
        self.items: list[Encoded | Ready] = []

    def add(self, item: Encoded | Ready) -> None:
        self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def build(self, keys: Sequence[str] = (), shared: bool = False) -> EncodedBatch:
        enc = [(i, x) for i, x in enumerate(self.items) if isinstance(x, Encoded)]
        rdy = [(i, x) for i, x in enumerate(self.items) if isinstance(x, Ready)]
        lengths = [len(x.data) for _, x in enc]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        data = torch.empty(offsets[-1], dtype=torch.uint8)
        if shared:  # in a DataLoader worker: one shared-memory block, filled in place (no copy when sent)
            data.share_memory_()
        flat = data.numpy()
        for (_, x), a, b in zip(enc, offsets[:-1], offsets[1:]):
            flat[a:b] = np.frombuffer(x.data, dtype=np.uint8)
        s = self.img_size
        ready = torch.stack([x.image for _, x in rdy]) if rdy else torch.empty((0, 3, s, s), dtype=torch.uint8)
        return EncodedBatch(
            data=data,
            offsets=torch.tensor(offsets, dtype=torch.int64),
            jpeg_pos=torch.tensor([i for i, _ in enc], dtype=torch.int64),
            sizes=torch.tensor([x.size for _, x in enc], dtype=torch.int64).reshape(-1, 2),
            boxes=torch.tensor([x.box for x in self.items], dtype=torch.int64).reshape(-1, 4),
            flips=torch.tensor([x.flip for x in self.items], dtype=torch.bool),
            ready=ready,
            ready_pos=torch.tensor([i for i, _ in rdy], dtype=torch.int64),
            img_size=s, interpolation=self.interpolation, keys=list(keys))


# ---- the device side -----------------------------------------------------------------------


def _decode_jpegs(chunks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders (for torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device)
    return list(out)


def _decode_one(chunk: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, str]:
    """One JPEG on ``device``, else on the CPU (moved to ``device``); (None, reason) if neither."""
    reason = ""
    tries = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    for dev in tries:
        try:
            return _decode_jpegs([chunk], dev)[0].to(device), ""
        except Exception as exc:
            reason = f"cannot decode JPEG on {dev}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None, reason


def crop_resize(img: torch.Tensor, box: Sequence[int], size: int, interpolation: str = "bicubic",
                flip: bool = False) -> torch.Tensor:
    """Crop uint8 ``(3, H, W)`` to ``box`` (top, left, h, w), resize to ``(3, size, size)`` with
    antialiased ``interpolation`` in float32, round and clamp to uint8, flip horizontally."""
    top, left, h, w = (int(v) for v in box)
    crop = img[:, top:top + h, left:left + w]
    if (h, w) == (size, size):
        out = crop
    else:
        x = F.interpolate(crop[None].float(), size=(size, size), mode=interpolation, antialias=True)[0]
        out = x.round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out


def decode_on_device(batch: EncodedBatch, img_size: int | None = None, interpolation: str | None = None,
                     device: Any = None) -> torch.Tensor:
    """Decode, crop, resize and flip ``batch`` on ``device`` (default: the batch's): uint8
    ``(B, 3, img_size, img_size)``. Failures are handled as the module doc says."""
    size = int(img_size or batch.img_size)
    mode = interpolation or batch.interpolation
    dev = torch.device(device) if device is not None else batch.device
    out = torch.empty((len(batch), 3, size, size), dtype=torch.uint8, device=dev)
    good: list[int] = []
    if batch.ready.shape[0]:
        ready = batch.ready.to(dev, non_blocking=True)
        if ready.shape[-1] != size:
            raise ValueError(f"the batch was made for img_size {ready.shape[-1]}, not {size}")
        out.index_copy_(0, batch.ready_pos.to(dev), ready)
        good += batch.ready_pos.tolist()
    failed: list[tuple[int, str]] = []
    if batch.num_jpegs:
        chunks = batch.jpeg_bytes()
        images: list[torch.Tensor | None]
        reasons = [""] * len(chunks)
        try:
            images = list(_decode_jpegs(chunks, dev))
        except Exception as exc:  # one bad JPEG fails the whole call: find it, keep the others
            logger.debug("batched JPEG decode on %s failed (%s); decoding one by one", dev, exc)
            images = []
            for j, chunk in enumerate(chunks):
                img, reasons[j] = _decode_one(chunk, dev)
                images.append(img)
        boxes, flips = batch.boxes.tolist(), batch.flips.tolist()
        sizes = batch.sizes.tolist()
        for j, pos in enumerate(batch.jpeg_pos.tolist()):
            img = images[j]
            if img is not None and list(img.shape[-2:]) != sizes[j]:
                reasons[j] = f"decoded size {tuple(img.shape[-2:])} differs from the header's {tuple(sizes[j])}"
                img = None
            if img is None:
                failed.append((pos, reasons[j]))
                continue
            out[pos] = crop_resize(img, boxes[pos], size, mode, flips[pos])
            good.append(pos)
    if failed:
        for n, (pos, reason) in enumerate(failed):
            if good:
                out[pos] = out[good[n % len(good)]]
            else:
                out[pos] = 128
            key = batch.keys[pos] if pos < len(batch.keys) else f"#{pos}"
            if batch.on_bad is not None:
                batch.on_bad(key, reason)
            else:
                logger.warning("data: bad sample %s (decoded on %s): %s; replaced by another image of the batch",
                               key, dev, reason)
    return out


def to_device_images(batch: torch.Tensor | EncodedBatch, device: Any = None, img_size: int | None = None,
                     interpolation: str | None = None, non_blocking: bool = True) -> torch.Tensor:
    """uint8 ``(B, 3, S, S)`` on ``device`` from a loader batch of either kind (a uint8 tensor from
    the CPU path, an :class:`EncodedBatch` with ``data.gpu_decode: true``)."""
    if isinstance(batch, EncodedBatch):
        if device is not None:
            batch = batch.to(device, non_blocking=non_blocking)
        return decode_on_device(batch, img_size, interpolation)
    return batch if device is None else batch.to(device, non_blocking=non_blocking)
