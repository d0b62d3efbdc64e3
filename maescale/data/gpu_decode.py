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

Device (main process; :class:`maescale.data.feed.DeviceFeed` runs it in its producer thread, on a
side CUDA stream, one batch ahead of the training step): ``batch.to(device, non_blocking=True)``
moves the ready images (the bytes stay on the host: nvjpeg reads host memory);
:func:`decode_on_device` (called by :func:`maescale.data.normalize_batch` and
:func:`to_device_images`)

1. decodes all the JPEGs of the batch with one ``torchvision.io.decode_jpeg(list, device=device,
   mode=RGB)`` call (:func:`decode_jpegs`: batched nvjpeg on CUDA, on the A100/H100/H200's
   hardware decoder for baseline JPEGs; libjpeg-turbo on the CPU);
2. crops, resizes (antialiased bicubic or bilinear, the filter and windows of PIL and of
   ``F.interpolate(antialias=True)``) and flips the whole batch at once
   (:func:`crop_resize_batch`): one ``cat`` of the decoded images into a flat buffer, one
   ``index_select`` of every crop row through a sliding-window view of it (crops padded to the
   largest), per-sample separable weight matrices built for all samples together (zero outside
   each crop, the flip folded in as reversed rows), and two batched matmuls ``Wy @ X @ Wx^T``, then
   round, clamp, uint8, one ``index_copy`` to the batch slots. All the small metadata (row
   offsets, slots, filter coordinates) is computed on the host and moved with one copy from pinned
   memory. About 30 kernels per batch including the normalisation, whatever the batch size
   (counted on the CPU as compute ops, on CUDA with ``torch.profiler`` by ``tools/bench_decode.py``),
   where the per-image loop of before launched ~830 for 128 images. A batch whose padded crops
   exceed :data:`CHUNK_ELEMENTS` is done in chunks of similar-sized crops (~9 kernels more per
   chunk). Nothing waits on the host: no ``.item()``, no data-dependent shapes, no pageable copies.

Precision: the first (large) matmul runs in float16 on CUDA -- uint8 values are exact in it and
the weights keep 11 bits -- accumulated in float32 (cuBLAS compute type), the second in float32; against a float32
computation this changes ~2% of the pixels by one grey level (rounding at .5), never more
(tested on the CPU, which supports both).

Failures on the device never stop the run: when the batched call raises, the JPEGs are decoded
one by one on the device, then on the CPU; an image that still fails, or whose decoded size
differs from its header's, is a bad sample: it is counted in the loader's ``samples_bad`` (and
``data.max_bad_fraction`` applies), logged, and its slot in the batch is filled with a copy of
another image of the same batch (mid-grey if none decoded). The batch size never changes, so the
position and the exact resume (which only depend on what the workers read) are unaffected.

How the images differ from the CPU path's for the same box and flip, and why (measured on
photo-like q90 JPEGs with RandomResizedCrop boxes to 224 px; ``tools/bench_decode.py`` reports the
same on a GPU):

* The resampling itself agrees: the batched float resize equals the per-image
  ``F.interpolate(antialias=True)`` reference within 1 grey level. The CPU path resizes in uint8
  (torch's kernel on the fast path, PIL's on the plain path), two passes with the intermediate
  rounded and clamped to 0-255, which cuts the bicubic overshoot at sharp edges: with the same
  decoder (libjpeg-turbo, as here on the CPU) the device path is within mean ~0.2, 99.9th
  percentile 1, max 9 grey levels of either CPU path.
* Chroma upsampling is the large one, and explains the worst pixels seen on a GPU (mean 0.74, max
  116 on 500x375 photos): JPEGs store colour (Cb, Cr) at half resolution (4:2:0); libjpeg-turbo
  (PIL, torchvision on the CPU) upsamples it with a triangle filter ("fancy upsampling"), nvJPEG by
  default replicates each chroma sample over its 2x2 pixels (nvJPEG has a flag for interpolated
  upsampling; torchvision does not set it). At a sharp edge between saturated colours the two
  differ by up to ~7/16 of the chroma step, times 1.4-1.8 in R or B: up to ~100 grey levels
  before the resize, less after a downscale, all of it on an upscaled small crop. Emulated on the
  CPU (:func:`maescale.devtools.decode_bench.box_chroma_decode`) it gives mean 0.80, 99.9th
  percentile 24, max 104 on 500x375 images (mean 0.14, max 11 on 2000x1500, where the downscale
  averages it out). The tested bound with replicated chroma: mean < 1.5, 99.9th percentile <= 40,
  max <= 128. JPEGs without chroma subsampling (4:4:4) have nothing to upsample and come back
  within the first bound; so do grayscale ones. Not a bug of either side; it cannot be changed
  through torchvision's decoder.
* Against the default fast CPU path on large photos, that path's own approximation adds to it:
  it decodes with DCT scaling (1/2, 1/4) and rounds the crop box to the reduced pixel grid,
  which shifts the crop by up to half an output pixel -- at sharp edges up to ~100 grey levels
  (fast vs plain path on 2000x1500: mean 1.16, max 96; of that the box rounding alone is mean
  1.0, max 99, the DCT-scaled decode mean 0.5). The device path, which resizes from the exact box
  at full resolution, agrees with the plain (reference) path instead: mean 0.09, max 3 there.
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

#: Elements (crop pixels x 3 channels, padded to the largest crop of the chunk) that
#: :func:`crop_resize_batch` gathers at once. Above it the batch is done in several chunks (about 8
#: kernels each). A chunk's transient buffers are ~3 bytes per element (uint8 gather + float16 copy),
#: so 2**29 bounds them at ~1.5 GiB: a batch of 128 crops of 500x375 photos is one chunk (~0.07 G
#: elements), one of 2000x1500 photos two or three.
CHUNK_ELEMENTS = 1 << 29

_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # filter support at scale 1 (PIL's and torch's)


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """dtype of the first (large) resampling matmul: float16 on CUDA (tensor cores; uint8 values are
    exact in it, weights carry 11 bits), float32 elsewhere. The second matmul is always float32."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


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


def decode_jpegs(batch: EncodedBatch, device: Any) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode the JPEGs of ``batch`` on ``device`` with one batched ``decode_jpeg`` call (nvjpeg on
    CUDA; libjpeg-turbo on the CPU). When that call raises (one bad JPEG fails it), the JPEGs are
    decoded one by one, on the device and then on the CPU. Returns, per JPEG, the uint8 ``(3, H, W)``
    image on ``device`` or None, and the reason of each failure; an image whose decoded size differs
    from its header's is a failure too (its crop box was drawn for the header's size).

    On CUDA torchvision decodes on a stream of its own and waits for it on the host before
    returning (then makes the caller's current stream wait too): call it from the feed's
    side thread, not from the training loop (:class:`maescale.data.feed.DeviceFeed` does)."""
    dev = torch.device(device)
    chunks = batch.jpeg_bytes()
    reasons = [""] * len(chunks)
    images: list[torch.Tensor | None]
    try:
        images = list(_decode_jpegs(chunks, dev))
    except Exception as exc:  # one bad JPEG fails the whole call: find it, keep the others
        logger.debug("batched JPEG decode on %s failed (%s); decoding one by one", dev, exc)
        images = []
        for j, chunk in enumerate(chunks):
            img, reasons[j] = _decode_one(chunk, dev)
            images.append(img)
    for j, want in enumerate(batch.sizes.tolist()):
        img = images[j]
        if img is not None and (img.dim() != 3 or img.shape[0] != 3 or list(img.shape[-2:]) != want):
            reasons[j] = f"decoded size {tuple(img.shape)} differs from the header's (3, {want[0]}, {want[1]})"
            images[j] = None
    return images, reasons


def _to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Small host arrays on ``device`` with one copy: packed into one (pinned, on CUDA) host buffer
    at 8-byte aligned offsets, copied with ``non_blocking=True`` (no host sync: the copy is ordered
    on the current stream, and the caching host allocator keeps the pinned block until it is done),
    then viewed back with their dtypes and shapes. On the CPU the host buffer itself is used."""
    offsets, total = [], 0
    for a in arrays:
        total = (total + 7) // 8 * 8
        offsets.append(total)
        total += a.nbytes
    pin = device.type == "cuda"
    host = torch.empty(max(total, 8), dtype=torch.uint8, pin_memory=pin)
    flat = host.numpy()
    for a, off in zip(arrays, offsets):
        flat[off:off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    buf = host if device.type == "cpu" else host.to(device, non_blocking=True)
    dtypes = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}
    return [buf[off:off + a.nbytes].view(dtypes[a.dtype]).view(a.shape) for a, off in zip(arrays, offsets)]


def _axis_coords(in_sizes: np.ndarray, flips: np.ndarray, out_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Host-side geometry of the resampling matrices, one row per (sample, axis), float32: the
    input pixel centres ``xs (R, length)`` and output pixel centres ``cs (R, out_size)``, both in
    filter units, so that the weight of input ``x`` in output ``j`` is ``filter(|xs[x] - cs[j]|)``.
    PIL's and torch's antialiased-resize conventions: scale = in / out, output centre
    scale * (j + 0.5) (``j`` reversed for a flip), the filter stretched by max(scale, 1). Input
    pixels past the row's size get a far-away coordinate, so their weight is 0 (no mask kernel)."""
    n = in_sizes.astype(np.float64)[:, None]
    scale = n / out_size
    inv = 1.0 / np.maximum(scale, 1.0)
    j = np.arange(out_size, dtype=np.float64)[None, :]
    j = np.where(flips[:, None], out_size - 1 - j, j)
    cs = scale * (j + 0.5) * inv
    x = np.arange(length, dtype=np.float64)[None, :]
    xs = np.where(x < n, (x + 0.5) * inv, 1e6)
    return xs.astype(np.float32), cs.astype(np.float32)


def _filter_(t: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The resampling filter at distances ``t >= 0`` (overwrites ``t``): Keys' cubic with a = -0.5
    (PIL's and torch's antialiased bicubic) or the triangle (bilinear); 0 beyond the support."""
    if interpolation == "bilinear":
        return t.neg_().add_(1.0).clamp_(min=0.0)
    if interpolation != "bicubic":
        raise ValueError(f"interpolation must be bicubic or bilinear, not {interpolation!r}")
    t.clamp_(max=2.0)  # the outer piece is 0 at |t| = 2: clamping zeroes everything beyond
    inner = t < 1.0
    near = t.mul(1.5).sub_(2.5).mul_(t).mul_(t).add_(1.0)  # (a + 2)|t|^3 - (a + 3)|t|^2 + 1
    far = t.mul(-0.5).add_(2.5).mul_(t).sub_(4.0).mul_(t).add_(2.0)  # a|t|^3 - 5a|t|^2 + 8a|t| - 4a
    return torch.where(inner, near, far)


def _resample_weights(xs: torch.Tensor, cs: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Dense float32 resampling matrices ``(R, S, L)`` from :func:`_axis_coords` (on the device):
    ``W[r, j, x]`` is the weight of input pixel ``x`` in output pixel ``j``, zero for pixels past
    the row's size (so a matrix made for the largest crop serves every crop), each row normalised
    to sum 1 -- exactly the windows and weights of the antialiased resize. About 15 kernels for all
    rows together, whatever their number."""
    t = torch.sub(xs[:, None, :], cs[:, :, None]).abs_()
    w = _filter_(t, interpolation)
    return w.div_(w.sum(-1, keepdim=True))


def _chunks(area: np.ndarray, h: np.ndarray, w: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split samples (sorted by decreasing crop area) into runs whose padded gather
    ``count * max(h) * 3 * max(w)`` stays within ``budget`` elements (at least one sample each)."""
    out, a = [], 0
    while a < len(area):
        b, hm, wm = a + 1, int(h[a]), int(w[a])
        while b < len(area):
            hm2, wm2 = max(hm, int(h[b])), max(wm, int(w[b]))
            if (b + 1 - a) * hm2 * 3 * wm2 > budget:
                break
            hm, wm, b = hm2, wm2, b + 1
        out.append((a, b))
        a = b
    return out


def crop_resize_batch(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], flips: Sequence[bool],
                      size: int, interpolation: str = "bicubic", *, out: torch.Tensor | None = None,
                      positions: Sequence[int] | None = None, compute_dtype: torch.dtype | None = None,
                      max_chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Crop each uint8 ``(3, H_i, W_i)`` image (all on one device, any sizes) to its box ``(top,
    left, h, w)``, resize it to ``(3, size, size)`` with antialiased ``interpolation`` (PIL's and
    ``F.interpolate(antialias=True)``'s filter and windows), flip it horizontally where asked, round
    and clamp to uint8 -- for the whole batch in a fixed number of kernels.

    How: the images are concatenated into one flat buffer (one ``cat``); a sliding-window view of
    it (``unfold``, no copy) turns "row ``y`` of crop ``i``, channel ``c``" into one row index, so
    a single ``index_select`` gathers every crop, padded to the largest, as ``(B, h, 3, w)``. The
    resize is separable: per sample a vertical matrix ``Wy (size, h)`` and a horizontal one ``Wx
    (size, w)`` (:func:`_resample_weights`; zero beyond each crop's own size, so padding is
    ignored; the flip is a reversal of ``Wx``'s rows), and ``out = Wy @ X @ Wx^T`` is two batched
    matmuls. The first, large one runs in ``compute_dtype`` (default
    :func:`default_compute_dtype`), the second in float32. Crops are sorted by area and gathered
    in chunks of at most ``max_chunk_elements`` padded elements to bound memory.

    Returns uint8 ``(B, 3, size, size)``; with ``out`` and ``positions``, writes image ``i`` to
    ``out[positions[i]]`` instead and returns ``out``. Raises ValueError for a box outside its
    image. No host synchronisation: everything is queued on the current stream.
    """
    count = len(images)
    if out is None:
        device = images[0].device if count else torch.device("cpu")
        out = torch.empty((count, 3, size, size), dtype=torch.uint8, device=device)
        positions = range(count)
    if count == 0:
        return out
    if positions is None or len(positions) != count:
        raise ValueError("crop_resize_batch: `positions` must give one output slot per image")
    device = images[0].device
    shapes = np.array([tuple(img.shape) for img in images], dtype=np.int64).reshape(count, -1)
    if shapes.shape[1] != 3 or (shapes[:, 0] != 3).any():
        raise ValueError(f"crop_resize_batch expects (3, H, W) images, got shapes {shapes.tolist()}")
    box = np.asarray(boxes, dtype=np.int64).reshape(count, 4)
    top, left, h, w = box.T
    bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > shapes[:, 1]) | (left + w > shapes[:, 2])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"crop box {box[i].tolist()} (top, left, h, w) is outside its {shapes[i, 1]}x{shapes[i, 2]} image")
    dtype = compute_dtype or default_compute_dtype(device)
    numel = shapes.prod(axis=1)
    base = np.concatenate([[0], np.cumsum(numel)[:-1]])
    # Sorted by crop area, so that a chunk pads its crops to similar sizes.
    order = np.argsort(-(h * w), kind="stable")
    h, w, top, left = h[order], w[order], top[order], left[order]
    height, width, base = shapes[order, 1], shapes[order, 2], base[order]
    chunks = _chunks(h * w, h, w, max_chunk_elements)
    # Host-side metadata, one copy: per chunk the flat-buffer offset of every gathered crop row
    # (rows past a crop's height repeat its last row; the weights ignore them), then the output
    # slots and the per-axis filter parameters (vertical rows first, then horizontal).
    rows = []
    for a, b in chunks:
        hc = int(h[a:b].max())
        y = np.minimum(np.arange(hc)[None, :], h[a:b, None] - 1)  # (k, hc)
        r = base[a:b, None] + (top[a:b, None] + y) * width[a:b, None] + left[a:b, None]
        rows.append((r[:, :, None] + np.arange(3)[None, None, :] * (height * width)[a:b, None, None]).reshape(-1))
    slots = np.asarray(positions, dtype=np.int64)[order]
    wmax, length = int(w.max()), int(max(h.max(), w.max()))
    xs, cs = _axis_coords(np.concatenate([h, w]),
                          np.concatenate([np.zeros(count, bool), np.asarray(flips, dtype=bool).reshape(count)[order]]),
                          size, length)
    dev_rows_all, dev_slots, dev_xs, dev_cs = _to_device([np.concatenate(rows), slots, xs, cs], device)
    flat = torch.empty(int(numel.sum()) + wmax, dtype=torch.uint8, device=device)  # + a row's worth of tail
    torch.cat([img.reshape(-1) for img in images], out=flat[:int(numel.sum())])
    weights = _resample_weights(dev_xs, dev_cs, interpolation)  # (2B, S, L) float32: vertical, horizontal
    wy = weights[:count] if dtype == torch.float32 else weights[:count].to(dtype)
    start = 0
    for a, b in chunks:
        k, hc, wc = b - a, int(h[a:b].max()), int(w[a:b].max())
        idx = dev_rows_all[start:start + k * hc * 3]
        start += k * hc * 3
        x = flat.unfold(0, wc, 1).index_select(0, idx).view(k, hc, 3 * wc).to(dtype)  # (k, hc, 3 * wc)
        t = torch.bmm(wy[a:b, :, :hc], x)  # vertical: (k, S, 3 * wc)
        t = t.view(k, 3 * size, wc).float()
        r = torch.bmm(t, weights[count + a:count + b, :, :wc].transpose(1, 2))  # horizontal: (k, S * 3, S)
        r = r.view(k, size, 3, size).permute(0, 2, 1, 3).round_().clamp_(0, 255)
        out.index_copy_(0, dev_slots[a:b], r.to(torch.uint8))
    return out


def crop_resize(img: torch.Tensor, box: Sequence[int], size: int, interpolation: str = "bicubic",
                flip: bool = False) -> torch.Tensor:
    """Reference for one image: crop uint8 ``(3, H, W)`` to ``box`` (top, left, h, w), resize to
    ``(3, size, size)`` with ``F.interpolate(antialias=True)`` in float32, round and clamp to uint8,
    flip horizontally. :func:`crop_resize_batch` is tested against it."""
    top, left, h, w = (int(v) for v in box)
    crop = img[:, top:top + h, left:left + w]
    if (h, w) == (size, size):
        out = crop
    else:
        x = F.interpolate(crop[None].float(), size=(size, size), mode=interpolation, antialias=True)[0]
        out = x.round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out


def decode_on_device(batch: EncodedBatch, img_size: int | None = None, interpolation: str | None = None,
                     device: Any = None, *, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode, crop, resize and flip ``batch`` on ``device`` (default: the batch's): uint8
    ``(B, 3, img_size, img_size)``. The JPEGs are decoded with one batched call
    (:func:`decode_jpegs`) and cropped and resized together (:func:`crop_resize_batch`); the
    worker-decoded images are copied in. Failures are handled as the module doc says."""
    size = int(img_size or batch.img_size)
    mode = interpolation or batch.interpolation
    dev = torch.device(device) if device is not None else batch.device
    out = torch.empty((len(batch), 3, size, size), dtype=torch.uint8, device=dev)
    good: list[int] = []
    if batch.ready.shape[0]:
        if batch.ready.shape[-1] != size:
            raise ValueError(f"the batch was made for img_size {batch.ready.shape[-1]}, not {size}")
        ready = batch.ready.to(dev, non_blocking=True)
        (ready_pos,) = _to_device([batch.ready_pos.numpy().astype(np.int64)], dev)
        out.index_copy_(0, ready_pos, ready)
        good += batch.ready_pos.tolist()
    failed: list[tuple[int, str]] = []
    if batch.num_jpegs:
        images, reasons = decode_jpegs(batch, dev)
        jpeg_pos = batch.jpeg_pos.tolist()
        ok = [j for j, img in enumerate(images) if img is not None]
        failed = [(jpeg_pos[j], reasons[j]) for j, img in enumerate(images) if img is None]
        if ok:
            boxes, flips = batch.boxes.tolist(), batch.flips.tolist()
            pos = [jpeg_pos[j] for j in ok]
            crop_resize_batch([images[j] for j in ok], [boxes[p] for p in pos], [flips[p] for p in pos], size, mode,
                              out=out, positions=pos, compute_dtype=compute_dtype)
            good += pos
        del images
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
