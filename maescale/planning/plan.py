"""The plan of a run, before it is submitted: what the config and node count add up to.

For a resolved config (flags already in its ``slurm:`` section) :func:`make_plan` works out

* **length**: steps, epochs and images, with the loader's and the trainer's own arithmetic
  (``batches per epoch = samples // (ranks x micro-batch)``, ``steps per epoch = that /
  accumulation``, ``steps = round(epochs x steps per epoch)``; :func:`run_length`);
* **time and cost**: the per-GPU rate measured for this preset, micro-batch and variant
  (:mod:`maescale.planning.rates`; or ``--rate``; else "not measured", never an invented or
  interpolated figure), plus the communication the scaling model adds at this node count
  (:func:`maescale.scaling.estimate`, from ``bench/comm.json`` and an assumed network): step
  time, wall time, GPU-hours, and how many SLURM jobs of ``slurm.time`` that takes;
* **memory per GPU**: weights, gradients and optimizer state split by the ZeRO stage, profiled
  activations, a reserve, against the GPU's memory, with the keys that make it fit when it
  does not (:mod:`maescale.planning.memory`);
* **data**: shards, epoch size, the split over ``ranks x data.num_workers`` readers, a decoded
  sample and the worker cores the planned rate needs (:mod:`maescale.planning.data`).

Nothing is submitted or written. Only the decoded sample imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from maescale.config import Config, parse_slurm_time
from maescale.flops import param_count
from maescale.models.presets import PRESETS
from maescale.planning.data import DataCheck, check_data, job_workers
from maescale.planning.memory import (GIB, MIB, PROFILES_PATH, RESERVE_GIB, MemoryEstimate, MemorySetup,
                                      estimate_memory, fixes, gpu_memory, load_profiles, max_micro_batch)
from maescale.planning.rates import Measurement, default_bench_dir, find_rates
from maescale.scaling import CommFormatError, CommMeasurement, Estimate, estimate, load_comm


def _workers_text(cfg: Config) -> str:
    w = cfg.data.num_workers
    return f"auto = {job_workers(cfg)}" if w == "auto" else str(w)


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Length:
    """How long a run is: its epoch size (None when unknown) and what follows from it."""

    samples_per_epoch: int | None
    batches_per_epoch: int | None  # per rank
    steps_per_epoch: float | None
    total_steps: int | None
    epochs: float | None
    images: int | None


def count_steps(samples_per_epoch: int | None, ranks: int, micro_batch: int, grad_accum_steps: int,
                max_steps: int | None, epochs: float | None) -> Length:
    """Steps, epochs and images of a run: the loader's ``batches per epoch = samples // (ranks x
    micro-batch)`` (per rank), the trainer's ``steps per epoch = that / accumulation`` and
    ``steps = max_steps``, else ``max(1, round(epochs x steps per epoch))`` (``maescale.train.plan_length``;
    a test keeps them equal)."""
    per_step = micro_batch * grad_accum_steps * ranks
    bpe = samples_per_epoch // (ranks * micro_batch) if samples_per_epoch else None
    spe = bpe / grad_accum_steps if bpe else None
    if max_steps is not None:
        steps: int | None = max_steps
        run_epochs = steps / spe if spe else None
    else:
        steps = max(1, round(epochs * spe)) if spe and epochs is not None else None
        run_epochs = epochs
    return Length(samples_per_epoch, bpe, spe, steps, run_epochs, None if steps is None else steps * per_step)


def run_length(cfg: Config, ranks: int, samples_per_epoch: int | None) -> Length:
    """:func:`count_steps` for ``cfg`` on ``ranks`` processes."""
    t = cfg.train
    return count_steps(samples_per_epoch, ranks, t.micro_batch_size, t.grad_accum_steps, t.max_steps, t.epochs)


def peak_lr(cfg: Config, ranks: int) -> float:
    """``optim.lr``, else ``blr x effective batch / 256`` (as ``maescale.optim.peak_lr``)."""
    t = cfg.train
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * t.micro_batch_size * t.grad_accum_steps * ranks / 256


@dataclass
class Plan:
    """Everything :func:`format_plan` prints."""

    cfg: Config
    label: str
    ranks: int
    params: int
    length: Length
    rates: list[Measurement]
    rate_source: str  # "measured" | "given" | "not measured"
    rate_notes: list[str]
    comm: CommMeasurement | None
    comm_note: str
    estimates: list[Estimate]
    memory: MemoryEstimate | None
    memory_fixes: list[str]
    largest_micro_batch: int | None
    data: DataCheck
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_plan(cfg: Config, label: str = "", *, rate: float | None = None, gpu: str | float | None = None,
              bench_dir: str | Path | None = None, comm_path: str | Path | None = None, decode_samples: int = 32,
              reserve_gib: float = RESERVE_GIB, profiles_path: str | Path = PROFILES_PATH) -> Plan:
    """The plan of ``cfg`` (see the module docstring); ``label`` names the config in the output."""
    s, t, m = cfg.slurm, cfg.train, cfg.model
    gpus = max(1, s.gpus_per_node)
    ranks = s.nodes * gpus
    params = param_count(PRESETS[m.name], m.in_chans)
    data = check_data(cfg, ranks, decode_samples)
    length = run_length(cfg, ranks, data.samples_per_epoch)
    plan = Plan(cfg=cfg, label=label, ranks=ranks, params=params, length=length, rates=[], rate_source="not measured",
                rate_notes=[], comm=None, comm_note="", estimates=[], memory=None, memory_fixes=[],
                largest_micro_batch=None, data=data)
    plan.warnings += data.warnings
    plan.notes += data.notes

    # ---- rate, communication, time
    if rate is not None:
        plan.rate_source = "given"
        rates = [rate]
    else:
        plan.rates, plan.rate_notes = find_rates(cfg, bench_dir)
        rates = sorted({plan.rates[0].rate, plan.rates[-1].rate}) if plan.rates else []
        if rates:
            plan.rate_source = "measured"
    bench = Path(bench_dir) if bench_dir is not None else default_bench_dir()
    comm_file = Path(comm_path) if comm_path is not None else bench / "comm.json"
    try:
        plan.comm = load_comm(comm_file)
    except CommFormatError as exc:
        plan.warnings.append(f"the measured collectives cannot be read: {exc}")
    run = plan.comm.run_for(cfg.deepspeed.zero_stage) if plan.comm else None
    if plan.comm is None:
        plan.comm_note = (f"not measured ({_shown(comm_file)} does not exist; tools/bench_comm.py writes it)"
                          if not comm_file.is_file() else f"not readable ({_shown(comm_file)})")
    elif run is None:
        plan.comm_note = (f"not measured for ZeRO-{cfg.deepspeed.zero_stage} in {plan.comm.describe()} "
                          f"(it has ZeRO-{', '.join(sorted({str(r.zero_stage) for r in plan.comm.runs}))})")
    for r in rates or ([1.0] if run is not None else []):  # without a rate: communication alone
        plan.estimates.append(estimate(m.name, t.micro_batch_size, s.nodes, gpus, rate=r, comm=run,
                                       steps=length.total_steps or 0, grad_accum_steps=t.grad_accum_steps,
                                       zero_stage=cfg.deepspeed.zero_stage, img_size=m.img_size,
                                       mask_ratio=m.mask_ratio, act_ckpt_every=m.act_ckpt_every))
    if rates and length.total_steps:
        limit_s = parse_slurm_time(s.time) * 60 - s.signal_delay_s
        jobs = math.ceil(max(e.wall_s for e in plan.estimates) / limit_s) if limit_s > 0 else None
        if jobs is not None and jobs - 1 > s.max_requeues:
            plan.warnings.append(f"the run needs {jobs} jobs of slurm.time={s.time} but is requeued at most "
                                 f"slurm.max_requeues={s.max_requeues} times: raise one of the two")

    # ---- memory
    if t.device != "cpu" and s.gpus_per_node > 0:
        gpu_info = gpu_memory(gpu)
        try:
            _, profiles = load_profiles(profiles_path)
        except (OSError, ValueError) as exc:  # ProfileError, a broken JSON file
            plan.warnings.append(f"activation profiles cannot be read: {exc}")
            profiles = []
        setup = MemorySetup(m.name, params, m.img_size, m.mask_ratio, m.act_ckpt_every, t.precision,
                            cfg.deepspeed.zero_stage, ranks, t.micro_batch_size)
        plan.memory = estimate_memory(setup, gpu_info, profiles, reserve_gib)
        plan.largest_micro_batch = max_micro_batch(setup, gpu_info, profiles, reserve_gib)
        if plan.memory.fits is False:
            plan.memory_fixes = fixes(setup, t.grad_accum_steps, gpu_info, profiles, reserve_gib)
            need = plan.memory.total if plan.memory.total is not None else plan.memory.states.total + plan.memory.reserve
            plan.warnings.append(
                f"does not fit in GPU memory: {need / GIB:.1f} GiB per GPU needed, {gpu_info.name} has "
                f"{gpu_info.gib:.1f} GiB; any one of these fits: "
                + ("; ".join(plan.memory_fixes) if plan.memory_fixes else
                   "none of model.act_ckpt_every, train.micro_batch_size with train.grad_accum_steps, "
                   "deepspeed.zero_stage alone (more nodes shard ZeRO states further)"))
        elif plan.memory.activations is None:
            plan.notes.append(f"no activation profile for {m.name} at {m.img_size} px, mask {m.mask_ratio:g}, "
                              f"{t.precision}: measure one with python -m maescale.devtools.memory --write-profiles "
                              f"--presets {m.name} --img-size {m.img_size} --mask-ratio {m.mask_ratio:g}"
                              + (" --dtype float32" if t.precision == "fp32" else ""))

    # ---- decode capacity at the planned rate
    dec = data.decode
    if dec is not None and dec.per_core and rates:
        need = max(rates) / dec.per_core  # worker cores per GPU
        have = min(job_workers(cfg), s.cpus_per_task - 1)
        if need > have:
            plan.warnings.append(
                f"decode cannot keep up: {max(rates):,.0f} img/s per GPU needs {need:.1f} worker cores per GPU at the "
                f"{dec.per_core:,.0f} img/s per core measured here, the job has {have} (data.num_workers="
                f"{_workers_text(cfg)}, slurm.cpus_per_task={s.cpus_per_task} less one for training): raise them"
                + ("" if cfg.data.gpu_decode else ", or decode on the GPU (data.gpu_decode=true)"))
    return plan


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _hours(lo: float, hi: float) -> str:
    """``"3.8 h"``, ``"3.8-4.1 h"``, or minutes below an hour."""
    scale, unit = (3600, "h") if hi >= 3600 else (60, "min")
    a, b = f"{lo / scale:,.1f}", f"{hi / scale:,.1f}"
    return f"{a} {unit}" if a == b else f"{a}-{b} {unit}"


def _range(values: list[float], fmt: str, unit: str = "") -> str:
    lo, hi = min(values), max(values)
    return f"{format(lo, fmt)}{unit}" if math.isclose(lo, hi, rel_tol=1e-9) else \
        f"{format(lo, fmt)}-{format(hi, fmt)}{unit}"


def format_plan(plan: Plan) -> str:
    """The plan as text (what ``tools/plan.py`` and ``tools/submit.py --dry-run`` print)."""
    cfg, s, t, m = plan.cfg, plan.cfg.slurm, plan.cfg.train, plan.cfg.model
    gpus = max(1, s.gpus_per_node)
    out: list[str] = []

    def line(head: str, text: str) -> None:
        out.append(f"  {head:<8}  {text}" if head else f"            {text}")

    out.append(f"plan: {plan.label or 'config'} on {s.nodes} node(s) x "
               f"{f'{s.gpus_per_node} GPU(s)' if s.gpus_per_node else '1 CPU process'} = {plan.ranks} rank(s)")
    compile_txt = {False: "eager", True: "compiled blocks"}.get(m.compile, f"compile {m.compile}")
    ckpt = "no activation checkpointing" if not m.act_ckpt_every else f"act_ckpt_every {m.act_ckpt_every}"
    line("model", f"{m.name} ({plan.params / 1e6:.1f}M parameters), {m.img_size} px, mask {m.mask_ratio:g}, "
                  f"{t.precision}, ZeRO-{cfg.deepspeed.zero_stage}, {compile_txt}, {ckpt}")
    per_step = t.micro_batch_size * t.grad_accum_steps * plan.ranks
    line("batch", f"{t.micro_batch_size} per GPU x {t.grad_accum_steps} accumulation step(s) x {plan.ranks} rank(s) = "
                  f"{per_step:,} images per step; peak lr {peak_lr(cfg, plan.ranks):.3g}")

    L = plan.length
    epoch = (f"epoch {L.samples_per_epoch:,} samples ({plan.data.samples_source}) = {L.steps_per_epoch:,.0f} steps"
             if L.steps_per_epoch else None)
    if L.total_steps is not None:
        if t.epochs is not None:
            ep = f" = {t.epochs:g} epochs"
        elif L.epochs is not None:
            ep = f" (train.max_steps) = {L.epochs:,.2f} epochs"
        else:
            ep = " (train.max_steps)"
        line("length", f"{L.total_steps:,} steps{ep}, {L.images:,} images"
                       + (f"; {epoch}" if epoch else "; epoch size unknown"))
    else:
        line("length", f"unknown: {t.epochs:g} epochs need the epoch size (a sizes file beside the shards, or "
                       "data.num_samples=N)")

    # rate
    if plan.rate_source == "given":
        line("rate", f"{plan.estimates[0].rate:,.0f} img/s per GPU, given with --rate")
    elif plan.rates:
        for i, r in enumerate(plan.rates):
            line("rate" if i == 0 else "", r.describe())
    else:
        compile_key = "off" if not m.compile else ("blocks" if m.compile is True else m.compile)
        line("rate", f"not measured: no committed loop benchmark of {m.name} at micro-batch {t.micro_batch_size} "
                     f"({t.precision}, model.compile={compile_key}, act_ckpt_every {m.act_ckpt_every}, "
                     f"ZeRO-{cfg.deepspeed.zero_stage}); give --rate IMG_S or measure it (tools/bench_loop.py)")
    for note in plan.rate_notes:
        line("", note)

    # step and time
    measured_rate = plan.rate_source != "not measured"
    for e in plan.estimates:
        at = f"at {e.rate:,.0f} img/s: " if len(plan.estimates) > 1 else ""
        if e.comm_s is None:
            comm = f"communication {plan.comm_note}"
            step = f"{at}{e.compute_s * 1e3:.1f} ms compute; {comm}" if measured_rate else comm
        elif measured_rate:
            step = (f"{at}{e.compute_s * 1e3:.1f} ms compute + {e.exposed_s * 1e3:.1f} ms exposed communication "
                    f"(of {e.comm_s * 1e3:.1f} ms; {e.hidden_s * 1e3:.1f} ms hidden in backward) = "
                    f"{e.step_s * 1e3:.1f} ms")
        else:
            step = f"communication {e.comm_s * 1e3:.1f} ms per step (how much of it hides needs the rate)"
        line("step", step)
    if plan.estimates and plan.estimates[0].comm_s is not None:
        line("", f"collectives as measured in {plan.comm.describe()}, network assumed (bench/SCALING.md)")
    if measured_rate and plan.estimates:
        ips = [e.images_per_s for e in plan.estimates]
        if L.total_steps:
            walls = [e.wall_s for e in plan.estimates]
            limit_s = parse_slurm_time(s.time) * 60 - s.signal_delay_s
            jobs = math.ceil(max(walls) / limit_s) if limit_s > 0 else 0
            line("time", f"{_hours(min(walls), max(walls))}, {_range([e.gpu_hours for e in plan.estimates], ',.0f')} GPU-hours, "
                         f"{_range(ips, ',.0f')} img/s; {jobs} SLURM job(s) of {s.time}"
                         + ("" if plan.comm_note == "" else " (compute only)"))
        else:
            line("time", f"{_range(ips, ',.0f')} img/s; total unknown without the epoch size")
        line("", "excludes start-up, checkpoint writes, evaluation and queue waits")
    elif not measured_rate:
        line("time", "not measured (needs the per-GPU rate)")

    # memory
    me = plan.memory
    if me is None:
        line("memory", "CPU run: GPU memory not checked")
    else:
        st = me.states
        shard = f"ZeRO-{me.setup.zero_stage} over {plan.ranks}"
        parts = f"weights {st.params / GIB:.2f} + gradients {st.grads / GIB:.2f} + optimizer {st.optimizer / GIB:.2f} ({shard})"
        if me.activations is not None:
            p = me.profile
            how = "profiled" if p.derived is None else "block model"
            verdict = "fits" if me.fits else "DOES NOT FIT"
            mb = f"; at most {plan.largest_micro_batch} images per micro-batch" if plan.largest_micro_batch is not None else ""
            line("memory", f"{me.total / GIB:.1f} of {me.gpu.gib:.1f} GiB per GPU ({me.gpu.name}): {verdict}{mb}")
            line("", f"{parts} + activations {me.activations / GIB:.2f} ({t.micro_batch_size} x "
                     f"{p.peak_per_image / MIB:.1f} MiB, {how}) + reserve {me.reserve / GIB:.2f} GiB")
        else:
            line("memory", f"activations not profiled; {parts} + reserve {me.reserve / GIB:.2f} GiB = "
                           f"{(st.total + me.reserve) / GIB:.1f} of {me.gpu.gib:.1f} GiB ({me.gpu.name})")

    # data
    d = plan.data
    if d.error:
        line("data", f"shards not found here: {d.error}")
    else:
        line("data", d.split)
        dec = d.decode
        if dec is not None:
            if dec.per_core:
                line("", f"decoded {dec.images} of {dec.images + len(dec.bad)} sampled images from {len(dec.shards)} "
                         f"shard(s) with the training transform ({dec.mode}, {m.img_size} px): "
                         f"{dec.cpu_s / dec.timed * 1e3:.2f} ms CPU each = {dec.per_core:,.0f} img/s per core on "
                         "this machine")
                if measured_rate and plan.estimates:
                    r = max(e.rate for e in plan.estimates)
                    need = r / dec.per_core
                    have = min(job_workers(cfg), s.cpus_per_task - 1)
                    line("", f"at {r:,.0f} img/s per GPU: {need:.1f} worker cores per GPU, {need * gpus:.1f} per node "
                             f"(+{gpus} training processes); the job has {have} per GPU (data.num_workers="
                             f"{_workers_text(cfg)}, slurm.cpus_per_task={s.cpus_per_task}): "
                             f"{'enough' if need <= have else 'NOT ENOUGH'}")
            else:
                line("", f"no image decoded from {len(dec.shards)} sampled shard(s)")
    for note in plan.notes:
        line("note", note)
    if plan.warnings:
        out.append(f"{len(plan.warnings)} warning(s):")
        out.extend(f"  WARNING: {w}" for w in plan.warnings)
    return "\n".join(out)
