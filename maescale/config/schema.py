"""The configuration's schema: one typed dataclass per section, the whole :class:`Config`, and
:class:`ConfigError`. Pure data (no torch), so the login-node tools load configs in a blink."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from maescale.rundir import write_text_atomic

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
    exclude_failed_nodes: bool = True  # requeue without a host whose failure is the node's own or its 2nd
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


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
