"""Typed configuration: dataclasses, YAML files with ``base:`` inheritance, dotted overrides.

One :class:`Config` object flows through the whole program; each module takes the section it
needs. Loading validates everything up front (unknown keys, wrong types, impossible values) and
raises :class:`ConfigError` naming the key, the value and what is allowed, so that a typo fails
on the login node rather than hours later in the queue.

Example::

    cfg = load_config("configs/vit_huge.yaml", ["train.max_steps=100", "deepspeed.zero_stage=2"])
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from maescale.rundir import write_text_atomic

log = logging.getLogger("maescale.config")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key (dotted path) when there is one."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The MAE model: a preset name plus the few knobs that do not change its architecture."""

    name: str = "mae_vit_base_patch16"
    img_size: int = 224
    in_chans: int = 3
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    # sdpa: F.scaled_dot_product_attention, any backend (FlashAttention on GPU when it can);
    # flash / cudnn: SDPA forced onto the FlashAttention / cuDNN backend, error if it cannot run;
    # flash_attn: the `flash_attn` package; math: explicit softmax(QK^T)V reference.
    attn_impl: Literal["sdpa", "math", "flash", "cudnn", "flash_attn"] = "sdpa"
    act_ckpt_every: int = 0  # checkpoint every k-th block (1 = all blocks); 0 = off
    # torch.compile: false; true or "blocks" (each transformer block); "full" (the whole forward + loss);
    # "graphs" (each block, replayed as CUDA graphs); "full_regions" (as "full", each block compiled once and reused)
    compile: Union[bool, Literal["blocks", "full", "graphs", "full_regions"]] = False
    # a weights file to start from: the MAE release's (encoder-only or full) or a timm ViT's state
    # dict, .pth or .safetensors (README "Start from public weights")
    init_from: str | None = None
    init_resample_patch: bool = False  # resample init_from's patch embedding when its patch size differs
    # Train the decoder alone for the first N steps (the encoder's groups get lr 0, so its weights stay
    # bitwise unchanged): for a fresh decoder on a loaded encoder (model.init_from). 0 = off.
    decoder_warmup_steps: int = 0
    # FP8 GEMMs in the encoder's linear layers (torchao float8 training; see maescale/models/fp8.py):
    # off | tensorwise (one scale per tensor) | rowwise (one per row). Needs a GPU of compute capability >= 8.9.
    fp8: Union[bool, Literal["off", "tensorwise", "rowwise"]] = "off"
    fp8_emulate: bool = False  # FP8 rounding with high-precision matmuls, on any device (tests; slow)
    fp8_min_features: int | None = None  # smallest in/out features converted; null: FP8_MIN_FEATURES


@dataclass
class DataConfig:
    """The WebDataset input pipeline."""

    train_shards: Union[str, list[str]] = ""
    # Samples per epoch (whole job). None: read from the shard writer's sizes file.
    num_samples: int | None = None
    sizes_file: str | None = None  # default: sizes.json beside the shards
    resampled: bool = False  # infinite stream, shards drawn with replacement
    shuffle_buffer: int = 5000
    # DataLoader worker processes per rank; auto: the rank's CPU cores (SLURM_CPUS_PER_TASK, else this
    # process's CPU affinity) minus 2 (the training process and its pin-memory thread), at most 16.
    num_workers: Union[int, Literal["auto"]] = "auto"
    prefetch_factor: int = 4
    pin_memory: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    hflip_prob: float = 0.5
    fast_decode: bool = True  # draw the crop from the JPEG header, decode reduced (draft)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_bad_fraction: float = 0.01  # stop the run if more samples than this fail to decode
    shard_retries: int = 2  # attempts to reopen a shard that fails before skipping it
    max_image_pixels: int = 178_956_970  # PIL decompression-bomb limit (PIL's own default x2)
    gpu_decode: bool = False  # ship JPEG bytes, decode + crop on the GPU (nvjpeg)
    synthetic: bool = False  # random images made on the device: no files (benchmarks, bottleneck hunts)


@dataclass
class OptimConfig:
    """AdamW and the per-step learning-rate schedule (MAE recipe by default)."""

    blr: float = 1.5e-4  # base lr; lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr scaling when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (MAE recipe)
    # Decay cls_token and mask_token, as the MAE release's pre-training does (timm's add_weight_decay:
    # only 1-D tensors and biases are exempt). false: exempt them too (the fine-tuning recipe's rule,
    # and maescale's before 2026-12-07; a resumed run keeps the rule its checkpoint was written with).
    weight_decay_tokens: bool = True


@dataclass
class TrainConfig:
    """Loop length, batch sizes, precision and logging cadence."""

    micro_batch_size: int = 64  # per GPU (per process)
    grad_accum_steps: int = 1
    max_steps: int | None = None  # optimizer steps; exactly one of max_steps / epochs
    epochs: float | None = None
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 20
    image_every: int = 1000  # reconstruction grid to TensorBoard every N steps; 0 = off
    max_nonfinite_steps: int = 10  # stop after this many consecutive non-finite steps
    peak_tflops: float | None = None  # per-device peak for MFU; None = table by GPU name
    progress_bar: Literal["auto", "on", "off"] = "auto"
    profile_at: int | None = None  # profile the steps after this many (host/device cost, collectives); None = off
    profile_steps: int = 3
    # A rank without progress for this long dumps its stacks and exits for a restart (maescale.watchdog).
    # null: max(300 s, 20 x the median step time); slow phases (first steps, saves, eval) get longer budgets.
    stall_timeout_s: float | None = None
    # Roll back to the last good checkpoint and skip the data since it, instead of stopping, when
    # max_nonfinite_steps is reached or the loss spikes (maescale.control); at most max_rollbacks times.
    rollback: bool = True
    max_rollbacks: int = 3
    spike_factor: float = 3.0  # a log-step loss above this x the running median ...
    spike_window: int = 50  # ... of the last N log-step losses (armed once N exist) ...
    spike_patience: int = 3  # ... for this many log steps in a row is a spike
    # [[after_step, micro_batches], ...]: after optimizer step `after_step`, read and drop that many
    # micro-batches (per rank) without training on them: skip a bad stretch of data by hand.
    skip_batches: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written."""

    every_steps: int = 1000  # 0 = off
    every_minutes: float = 0.0  # 0 = off
    keep_last: int = 3
    on_signal: bool = True  # save on SIGTERM / SIGUSR1 (SLURM preemption / time limit)
    on_write_error: Literal["retry", "stop"] = "retry"
    final: bool = True  # save when the run finishes (off for benchmarks)


@dataclass
class LockConfig:
    """The run-directory lock (one job writes a run directory at a time; see maescale.rundir.RunLock)."""

    wait_s: float = 300.0  # how long a job waits for a held run directory (the old job may be saving)
    stale_s: float = 60.0  # a holder whose heartbeat has not moved for this long is gone
    heartbeat_s: float = 10.0  # how often the holder's rank 0 beats
    takeover: bool = False  # take the run directory even from a live-looking holder


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine. ``extra`` is merged (recursively) over the generated JSON."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    # auto: the lean ZeRO step (no per-parameter overflow scan, no host-side grad norm; a fused
    # device-side check instead) for stage 1/2 without clipping; true: insist (error elsewhere);
    # false: DeepSpeed's own checks. See maescale/optim.py.
    lean_step: Union[bool, Literal["auto"]] = "auto"
    timeout_minutes: float = 30.0  # collective timeout; a dead rank fails the job within it
    # Elements per gradient bucket (ZeRO-1: maescale's reduce-scatter buckets; ZeRO-2: DeepSpeed's
    # reduce_bucket_size). auto: about 16 buckets of 1M-64M elements (maescale.optim.auto_bucket_elements).
    bucket_elements: Union[int, Literal["auto"]] = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SlurmConfig:
    """Defaults for ``tools/submit.py``; its flags override them."""

    nodes: int = 1
    gpus_per_node: int = 8
    # 10 x 8 tasks = 80 CPUs per node: schedules on the common 8-GPU nodes (96-224 CPUs, some kept for
    # the system); data.num_workers: auto derives the worker count from it.
    cpus_per_task: int = 10
    mem: str | None = None  # e.g. "0" (all) or "480G"
    time: str = "72:00:00"  # minutes or [D-]HH:MM:SS
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    comment: str | None = None
    job_name: str = "maescale"
    signal_delay_s: int = 180
    max_requeues: int = 50  # requeues for preemption / time limit
    # Restarts after a crashed, hung or lost rank (inside the allocation when it can, else a requeue);
    # a failure that repeats at the same step stops the job instead.
    max_failures: int = 3
    exclude_failed_nodes: bool = True  # leave out a host a failure names (by requeueing without it)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun
    additional_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistributedConfig:
    """How the processes of a job find each other."""

    # Network interface for NCCL's and gloo's sockets (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME), e.g.
    # "ib0" or "^docker,lo"; null: the libraries' own choice (NCCL: the first non-loopback interface,
    # gloo: the address the host name resolves to). Environment values set by the site win.
    socket_ifname: str | None = None


@dataclass
class EvalConfig:
    """kNN evaluation of the encoder during training (:mod:`maescale.probe`); off while
    ``every_steps`` is 0. Every ``every_steps`` steps (and at step 0 and the last step) the
    job pauses, extracts features of a fixed labelled subset (``.cls`` shards) with the current
    encoder, runs a weighted kNN (DINO's) and logs ``eval/knn_top1`` / ``eval/knn_top5``."""

    every_steps: int = 0  # 0 = off
    train_shards: Union[str, list[str]] = ""  # labelled shards: the kNN memory bank
    # Labelled shards to classify. Empty: a seeded split of train_shards (val_fraction of the
    # samples, chosen by a hash of split_seed and the sample key) is held out instead.
    val_shards: Union[str, list[str]] = ""
    val_fraction: float = 0.1
    split_seed: int = 0
    max_train_samples: int | None = 10000  # the first N samples (in shard order); null = all
    max_val_samples: int | None = 10000
    k: int = 20  # DINO's kNN: k = 20, temperature 0.07
    temperature: float = 0.07
    features: Literal["cls", "avgpool"] = "cls"  # what eval/knn_top1 reports (both are logged)
    batch_size: int = 64  # images per forward pass, per process
    at_start: bool = True  # also evaluate the encoder at initialisation (step 0)


@dataclass
class Config:
    """The whole run."""

    output_dir: str = "runs/default"
    # true: resume from output_dir/checkpoints/latest if present; false: refuse to start on a
    # run directory with checkpoints; a path: resume from that checkpoint directory.
    resume: Union[bool, str] = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The resolved config as YAML; loading it back gives an equal Config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        write_text_atomic(path, self.to_yaml())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (following ``base:`` chains), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = load_yaml_with_bases(path) if path is not None else {}
    apply_overrides(raw, overrides)
    return config_from_dict(raw)


# Pairs of keys of which a run sets exactly one: an override of one replaces the other's value
# from the config files (``configs/vit_huge.yaml train.max_steps=100`` is a smoke test of a recipe
# that sets ``train.epochs``).
_EITHER_OR = (("train.max_steps", "train.epochs"),)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply dotted ``key=value`` overrides to a raw config mapping, in order.

    An override of one key of an either-or pair (``train.max_steps`` / ``train.epochs``) clears
    the other when the overrides do not set it too (logged); both set together stays an error.
    """
    given = {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        given[key] = value
    for pair in _EITHER_OR:
        for key, other in (pair, pair[::-1]):
            if given.get(key) is not None and other not in given and _get_dotted(raw, other) is not None:
                log.warning("%s=%s given: dropping %s=%s of the config file (set exactly one of the two)",
                            key, given[key], other, _get_dotted(raw, other))
                set_dotted(raw, other, None)


def _get_dotted(raw: Mapping[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping."""
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def load_yaml_with_bases(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and merge it over its ``base:`` file(s), resolved relative to it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"'base:' inheritance loops: {chain}", key="base")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top, got {type(data).__name__}")
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"in '{path}': expected a file name or list of file names, got {bases!r}", key="base")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        merged = deep_merge(merged, load_yaml_with_bases(base_path, (*_seen, resolved)))
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win, nested mappings merge key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.max_steps=100"`` -> ``("train.max_steps", 100)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override '{item}': '{key}' is not a dotted key such as train.max_steps")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string, type checking decides
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for key ``"a.b.c"``, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section", key=key)
        node = nxt
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------
# Typed construction
# --------------------------------------------------------------------------------------------

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a section (mapping), got {raw!r}", key=prefix.rstrip(".") or None)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key; allowed keys here are: {allowed}", key=key)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} " + "/".join(sorted({_type_name(a) for a in args}))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow only lossless conversions."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"got {value!r} ({type(value).__name__}); expected {_type_name(tp)}", key=key)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"got {value!r}; expected a finite number", key=key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return value
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        # bool before str so that `resume: true` is a bool, not a path
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"got {value!r}; expected a finite number", key=key)
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return copy.deepcopy(dict(value))
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module


# --------------------------------------------------------------------------------------------
# Validation of values (types are already right here)
# --------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"got {value!r}; allowed: {allowed}", key=key)


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError naming the key."""
    from maescale.models.presets import PRESETS  # local import: config must not pull in torch

    m, d, o, t, c, s = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.checkpoint, cfg.slurm
    _check(bool(cfg.output_dir), "output_dir", cfg.output_dir, "a non-empty directory path")
    _check(cfg.resume is not None and cfg.resume != "", "resume", cfg.resume, "true, false or a checkpoint path")

    _check(m.name in PRESETS, "model.name", m.name, ", ".join(PRESETS))
    patch = PRESETS[m.name].patch_size if m.name in PRESETS else 1
    _check(m.img_size > 0 and m.img_size % patch == 0, "model.img_size", m.img_size,
           f"a positive multiple of the patch size {patch} of {m.name}")
    _check(m.in_chans >= 1, "model.in_chans", m.in_chans, "an integer >= 1")
    _check(0.0 < m.mask_ratio < 1.0, "model.mask_ratio", m.mask_ratio, "a number in the open interval (0, 1)")
    if m.name in PRESETS:
        num_patches = (m.img_size // patch) ** 2
        _check(int(num_patches * (1 - m.mask_ratio)) >= 1, "model.mask_ratio", m.mask_ratio,
               f"a ratio that keeps at least one of the {num_patches} patches visible")
    _check(m.act_ckpt_every >= 0, "model.act_ckpt_every", m.act_ckpt_every, "0 (off) or k >= 1 (every k-th block)")
    _check(bool(m.init_from) or not m.init_resample_patch, "model.init_resample_patch", m.init_resample_patch,
           "false unless model.init_from names a file to resample")
    _validate_fp8(m)

    _check(d.num_samples is None or d.num_samples > 0, "data.num_samples", d.num_samples, "null or a positive integer")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "an integer >= 0")
    _check(d.num_workers == "auto" or d.num_workers >= 0, "data.num_workers", d.num_workers, "auto or an integer >= 0")
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor, "an integer >= 1")
    lo, hi = d.crop_scale
    _check(0.0 < lo <= hi <= 1.0, "data.crop_scale", list(d.crop_scale), "[lo, hi] with 0 < lo <= hi <= 1")
    lo, hi = d.crop_ratio
    _check(0.0 < lo <= hi, "data.crop_ratio", list(d.crop_ratio), "[lo, hi] with 0 < lo <= hi")
    _check(0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob", d.hflip_prob, "a probability in [0, 1]")
    _check(all(x > 0 for x in d.std), "data.std", list(d.std), "three positive numbers")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", d.max_bad_fraction, "a fraction in [0, 1]")
    _check(d.shard_retries >= 0, "data.shard_retries", d.shard_retries, "an integer >= 0")
    _check(d.max_image_pixels > 0, "data.max_image_pixels", d.max_image_pixels, "a positive integer")
    if isinstance(d.train_shards, list):
        _check(all(bool(x) for x in d.train_shards), "data.train_shards", d.train_shards, "non-empty shard patterns")

    _check(o.blr > 0, "optim.blr", o.blr, "a positive number")
    _check(o.lr is None or o.lr > 0, "optim.lr", o.lr, "null or a positive number")
    _check(o.min_lr >= 0, "optim.min_lr", o.min_lr, "a number >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", list(o.betas), "two numbers in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "a positive number")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "a number >= 0")
    _check(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "null or an integer >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "0 (off) or a positive max norm")

    _check(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "an integer >= 1")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "an integer >= 1")
    if (t.max_steps is None) == (t.epochs is None):
        raise ConfigError(
            f"set exactly one of train.max_steps and train.epochs (got max_steps={t.max_steps!r}, "
            f"epochs={t.epochs!r}); set the other to null", key="train.max_steps")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer >= 1")
    _check(t.epochs is None or t.epochs > 0, "train.epochs", t.epochs, "a positive number")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _check(t.image_every >= 0, "train.image_every", t.image_every, "0 (off) or an integer >= 1")
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "an integer >= 1")
    _check(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", t.peak_tflops, "null or a positive number")
    _check(t.profile_at is None or t.profile_at >= 0, "train.profile_at", t.profile_at, "null (off) or a step >= 0")
    _check(t.profile_steps >= 1, "train.profile_steps", t.profile_steps, "an integer >= 1")
    _check(t.stall_timeout_s is None or t.stall_timeout_s > 0, "train.stall_timeout_s", t.stall_timeout_s,
           "null (automatic) or seconds > 0")
    _check(t.max_rollbacks >= 0, "train.max_rollbacks", t.max_rollbacks, "an integer >= 0")
    _check(t.spike_factor > 1, "train.spike_factor", t.spike_factor, "a number > 1")
    _check(t.spike_window >= 3, "train.spike_window", t.spike_window, "an integer >= 3 (log steps)")
    _check(t.spike_patience >= 1, "train.spike_patience", t.spike_patience, "an integer >= 1 (log steps)")
    for i, (after, count) in enumerate(t.skip_batches):
        _check(after >= 0 and count >= 1, f"train.skip_batches[{i}]", [after, count],
               "[after_step >= 0, micro_batches >= 1]")
    _check(m.decoder_warmup_steps >= 0, "model.decoder_warmup_steps", m.decoder_warmup_steps, "an integer >= 0")

    _check(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "0 (off) or an integer >= 1")
    _check(c.every_minutes >= 0, "checkpoint.every_minutes", c.every_minutes, "0 (off) or a positive number")
    _check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "an integer >= 1")
    _check(cfg.deepspeed.timeout_minutes > 0, "deepspeed.timeout_minutes", cfg.deepspeed.timeout_minutes, "a positive number")
    _check(cfg.deepspeed.bucket_elements == "auto" or cfg.deepspeed.bucket_elements >= 1024, "deepspeed.bucket_elements",
           cfg.deepspeed.bucket_elements, "auto or an integer >= 1024 (elements per gradient bucket)")
    _validate_lean_step(cfg)
    lk = cfg.lock
    _check(lk.wait_s >= 0, "lock.wait_s", lk.wait_s, "seconds >= 0")
    _check(lk.heartbeat_s > 0, "lock.heartbeat_s", lk.heartbeat_s, "seconds > 0")
    _check(lk.stale_s >= 3 * lk.heartbeat_s, "lock.stale_s", lk.stale_s,
           f"at least 3 x lock.heartbeat_s ({3 * lk.heartbeat_s:g} s), so that a slow beat is not taken for a dead job")

    _validate_eval(cfg.eval)

    _check(s.nodes >= 1, "slurm.nodes", s.nodes, "an integer >= 1")
    _check(s.gpus_per_node >= 0, "slurm.gpus_per_node", s.gpus_per_node, "an integer >= 0")
    _check(s.cpus_per_task >= 1, "slurm.cpus_per_task", s.cpus_per_task, "an integer >= 1")
    _check(s.signal_delay_s >= 0, "slurm.signal_delay_s", s.signal_delay_s, "an integer >= 0 (seconds)")
    _check(s.max_requeues >= 0, "slurm.max_requeues", s.max_requeues, "an integer >= 0")
    _check(s.max_failures >= 0, "slurm.max_failures", s.max_failures, "an integer >= 0")
    if cfg.distributed.socket_ifname is not None:
        _check(bool(cfg.distributed.socket_ifname.strip()) and not any(c.isspace() for c in cfg.distributed.socket_ifname),
               "distributed.socket_ifname", cfg.distributed.socket_ifname,
               "null or interface names such as ib0, eth0,eth1 or ^docker,lo (no spaces)")
    try:
        parse_slurm_time(s.time)
    except ValueError as exc:
        raise ConfigError(str(exc), key="slurm.time") from None


MAX_AUTO_WORKERS = 16


def resolve_num_workers(value: int | str, cpus: int | None = None) -> int:
    """``data.num_workers`` as a number: ``auto`` -> the rank's cores minus 2 (the training
    process and its pin-memory thread), 0..:data:`MAX_AUTO_WORKERS`. ``cpus``: the rank's cores
    (default ``SLURM_CPUS_PER_TASK``, else this process's CPU affinity)."""
    if value != "auto":
        return int(value)
    if cpus is None:
        env = os.environ.get("SLURM_CPUS_PER_TASK", "")
        cpus = int(env) if env.isdigit() else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus - 2))


def lean_step_applies(cfg: Config) -> bool:
    """Whether ``cfg`` runs the lean step (the one definition of the rule; maescale.optim and the
    validation below use it): ``auto`` means ZeRO-1/2 without clipping."""
    ds = cfg.deepspeed
    if ds.lean_step == "auto":
        return ds.zero_stage in (1, 2) and cfg.optim.grad_clip == 0
    return bool(ds.lean_step)


def _validate_lean_step(cfg: Config) -> None:
    """Refuse the lean-step switches where DeepSpeed cannot honour them (it would fail at start-up
    with less context, or skip no non-finite step at all)."""
    ds, clip = cfg.deepspeed, cfg.optim.grad_clip
    if ds.lean_step is True:
        _check(ds.zero_stage in (1, 2), "deepspeed.lean_step", True,
               f"auto or false with deepspeed.zero_stage={ds.zero_stage}: the lean step replaces the checks of "
               "DeepSpeed's ZeRO-1/2 optimizer only")
        _check(clip == 0, "deepspeed.lean_step", True,
               f"auto or false with optim.grad_clip={clip}: clipping needs the global grad norm before the step, "
               "which the lean step does not compute; set optim.grad_clip=0 to use it")
    zero = ds.extra.get("zero_optimization") if isinstance(ds.extra, Mapping) else None
    if isinstance(zero, Mapping) and zero.get("compute_grad_norm") is False:
        key = "deepspeed.extra.zero_optimization.compute_grad_norm"
        _check(clip == 0, key, False, f"true with optim.grad_clip={clip} (clipping needs the norm); or use "
               "deepspeed.lean_step, which sets it")
        _check(ds.zero_stage in (1, 2), key, False, f"true with deepspeed.zero_stage={ds.zero_stage} "
               "(DeepSpeed supports it with ZeRO stage 1 or 2 only)")
    bf16 = ds.extra.get("bf16") if isinstance(ds.extra, Mapping) else None
    if isinstance(bf16, Mapping) and bf16.get("check_grad_overflow") is False and not lean_step_applies(cfg):
        _check(False, "deepspeed.extra.bf16.check_grad_overflow", False,
               "true without the lean step (it would let non-finite steps through unchecked); deepspeed.lean_step "
               "turns it off safely for ZeRO-1/2 without clipping")


def _validate_fp8(m: ModelConfig) -> None:
    """``model.fp8*``: a named recipe, emulation only with a recipe, and at least one layer to convert."""
    from maescale.models.fp8 import FP8_DIM_MULTIPLE, FP8_MIN_FEATURES, fp8_plan
    from maescale.models.presets import PRESETS

    _check(m.fp8 is not True, "model.fp8", m.fp8, "off, tensorwise or rowwise (name the recipe)")
    _check(m.fp8_min_features is None or m.fp8_min_features >= FP8_DIM_MULTIPLE, "model.fp8_min_features",
           m.fp8_min_features, f"null (default {FP8_MIN_FEATURES}) or an integer >= {FP8_DIM_MULTIPLE}")
    on = m.fp8 not in (False, "off")
    if m.fp8_emulate and not on:
        raise ConfigError("model.fp8_emulate=true emulates FP8 training, which model.fp8=off does not run: set "
                          "model.fp8=tensorwise or rowwise, or drop model.fp8_emulate", key="model.fp8_emulate")
    if on and m.name in PRESETS:
        plan = fp8_plan(PRESETS[m.name], m.fp8_min_features, m.in_chans)
        if not any(p.fp8 for p in plan):
            enc = sorted({(p.in_features, p.out_features) for p in plan if p.name.startswith("blocks.")})
            raise ConfigError(
                f"got {m.fp8!r}, but no linear layer of {m.name} qualifies for FP8 (encoder block linears "
                f"{', '.join(f'{i}x{o}' for i, o in enc)}; both sides must be multiples of {FP8_DIM_MULTIPLE} and at "
                f"least model.fp8_min_features={m.fp8_min_features or FP8_MIN_FEATURES}): set model.fp8=off, or "
                "lower model.fp8_min_features", key="model.fp8")


def _validate_eval(e: EvalConfig) -> None:
    _check(e.every_steps >= 0, "eval.every_steps", e.every_steps, "0 (off) or an integer >= 1")
    _check(e.k >= 1, "eval.k", e.k, "an integer >= 1 (neighbours; DINO uses 20)")
    _check(e.temperature > 0, "eval.temperature", e.temperature, "a positive number (DINO uses 0.07)")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    for key, value in (("eval.max_train_samples", e.max_train_samples), ("eval.max_val_samples", e.max_val_samples)):
        _check(value is None or value >= 1, key, value, "null (all) or an integer >= 1")
    _check(0.0 < e.val_fraction < 1.0, "eval.val_fraction", e.val_fraction, "a fraction in the open interval (0, 1)")
    for key, value in (("eval.train_shards", e.train_shards), ("eval.val_shards", e.val_shards)):
        if isinstance(value, list):
            _check(all(bool(x) for x in value), key, value, "non-empty shard patterns")
    if e.every_steps > 0 and not e.train_shards:
        raise ConfigError("eval.every_steps > 0 needs labelled shards (with .cls labels, as tools/make_shards.py "
                          "writes for class folders): set eval.train_shards (and eval.val_shards, or leave it empty "
                          "to hold out eval.val_fraction of them), or set eval.every_steps=0", key="eval.train_shards")


def parse_slurm_time(value: str | int) -> int:
    """SLURM time limit in minutes from ``"90"``, ``"HH:MM:SS"``, ``"MM:SS"`` or ``"D-HH:MM:SS"``."""
    text = str(value).strip()
    err = ValueError(f"time limit {value!r} is not minutes or [D-]HH:MM:SS (e.g. 90, 04:00:00, 2-00:00:00)")
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        if not d.isdigit():
            raise err
        days = int(d)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise err
    nums = [int(p) for p in parts]
    if len(nums) == 1:
        minutes = nums[0] if days == 0 else nums[0] * 60  # "D-HH" means hours
        total = days * 24 * 60 + minutes
    elif len(nums) == 2:
        if days:  # D-HH:MM
            total = days * 1440 + nums[0] * 60 + nums[1]
        else:  # MM:SS
            total = nums[0] + math.ceil(nums[1] / 60)
    else:
        total = days * 1440 + nums[0] * 60 + nums[1] + math.ceil(nums[2] / 60)
    if total <= 0:
        raise err
    return total


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
