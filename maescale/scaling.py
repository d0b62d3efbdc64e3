"""Step time, wall time and GPU-hours of a run on N nodes, from measured figures and a stated
network model. Torch-free: the login-node plan (``tools/plan.py``) and ``bench/SCALING.md`` use it.

:func:`estimate` is the one function. Its inputs, and which of them are measured:

1. **Per-GPU compute rate** (images/s of one GPU running the real loop, measured;
   :mod:`maescale.planning.rates` finds it in the committed benchmark JSON). One micro-batch
   costs ``B / rate``; a step of ``A`` accumulation steps ``A x B / rate``.
2. **Collectives per step** (measured: ``bench/comm.json``, written by ``tools/bench_comm.py``,
   read by :func:`load_comm`): per rank and step on the data-parallel group, for each kind of
   ``torch.distributed`` operation, the calls, the elements and bytes it moved, and the share
   issued while backward ran. Only volumes, kinds and that share carry over (gloo timings on a
   small CPU machine measure CPU contention, not links). The volumes scale with the parameter
   count: a run of a small preset with ``params`` parameters that moved ``e`` elements moves
   ``e / params x P`` for a preset of ``P`` parameters, at the run's bytes per element. Calls are
   taken as measured. Control-group traffic (``"control"``: gloo, on the CPU, asynchronous or
   periodic by design) is listed but not timed.
3. **Network** (:class:`Network`, an assumption with its public sources): ``n = nodes x G`` ranks
   in a NCCL ring; a collective moving ``S`` bytes takes

       ``t = calls x latency + S x factor(n) / busbw``

   with nccl-tests' bus-bandwidth factors (``doc/PERFORMANCE.md``): all-reduce ``2(n-1)/n``,
   reduce-scatter and all-gather ``(n-1)/n`` (``S`` the whole array), reduce and broadcast 1.
   ``busbw`` is NVLink's inside one node; across nodes the ring leaves each node through one
   NIC per GPU, so ``busbw = min(NVLink, G x NIC)``; both times an efficiency. The latency of a
   call is NCCL's ring model (``src/graph/tuning.cc``): a base latency plus one hop latency per
   ring step, NVLink steps inside nodes and network steps between them (all-reduce ``2(n-1)``
   steps of which ``2(N-1)`` cross nodes; reduce-scatter, all-gather, reduce and broadcast
   ``n-1``, of which ``N-1``).

**Overlap rule.** A micro-batch's backward lasts ``W = backward share x B / rate``, the backward
share being that of the training FLOPs (:func:`maescale.flops.train_flops_per_image`, recompute
included; an assumption: time splits as FLOPs). What a micro-batch's backward issues (the
measured share of each kind's time) hides behind it up to ``W``; everything else -- the excess,
and what is issued outside backward, such as the parameter all-gather after the optimizer step --
adds to the step. Gradient collectives (``reduce_scatter``, ``all_reduce``, ``reduce``) run once
per micro-batch with ZeRO-2/3 (DeepSpeed reduces at every micro-step there) and once per step
with ZeRO-0/1 (at the accumulation boundary); the others once per step.

    step = A x B / rate + exposed communication;  wall = steps x step;  GPU-hours = wall x n / 3600

Not in it: start-up, checkpoint writes, evaluation, the queue and requeue waits.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from maescale.flops import param_count, train_flops_per_image
from maescale.models.presets import PRESETS

GRADIENT_KINDS = ("reduce_scatter", "all_reduce", "reduce")

# kind -> (bus-bandwidth factor f(n), ring steps s(n), of which cross nodes s(N))
_RING: dict[str, tuple[Callable[[int], float], Callable[[int], int], Callable[[int], int]]] = {
    "all_reduce": (lambda n: 2 * (n - 1) / n, lambda n: 2 * (n - 1), lambda N: 2 * (N - 1)),
    "reduce_scatter": (lambda n: (n - 1) / n, lambda n: n - 1, lambda N: N - 1),
    "all_gather": (lambda n: (n - 1) / n, lambda n: n - 1, lambda N: N - 1),
    "all_to_all": (lambda n: (n - 1) / n, lambda n: n - 1, lambda N: N - 1),
    "reduce": (lambda n: 1.0, lambda n: n - 1, lambda N: N - 1),
    "broadcast": (lambda n: 1.0, lambda n: n - 1, lambda N: N - 1),
    "barrier": (lambda n: 0.0, lambda n: 2 * (n - 1), lambda N: 2 * (N - 1)),
}
KINDS = tuple(_RING)


@dataclass(frozen=True)
class Network:
    """The assumed interconnect of one node type (per GPU), with where each figure comes from."""

    name: str
    nic_gbit_s: float  # per GPU, one NIC per GPU
    nvlink_gbyte_s: float  # per GPU, one direction
    efficiency: float  # achieved share of the link rate in a large collective
    base_latency_us: float  # NCCL ring, Simple protocol
    nvlink_hop_us: float
    net_hop_us: float
    sources: tuple[str, ...] = ()

    def bus_bandwidth(self, nodes: int, gpus_per_node: int) -> float:
        """Bytes/s of bus bandwidth (nccl-tests' sense) of a ring over ``nodes x gpus_per_node``."""
        nvlink = self.nvlink_gbyte_s * 1e9
        if nodes == 1:
            return nvlink * self.efficiency
        return min(nvlink, gpus_per_node * self.nic_gbit_s * 1e9 / 8) * self.efficiency

    def latency(self, kind: str, nodes: int, gpus_per_node: int) -> float:
        """Seconds of latency of one call of ``kind`` (NCCL's ring model)."""
        _, steps, net_steps = _RING[kind]
        n = nodes * gpus_per_node
        total, across = steps(n), net_steps(nodes) if nodes > 1 else 0
        return (self.base_latency_us + (total - across) * self.nvlink_hop_us + across * self.net_hop_us) * 1e-6


DGX_H100_NDR = Network(
    name="8x H100 SXM node (DGX H100 class), NVLink 4 + one 400 Gb/s InfiniBand NDR NIC per GPU",
    nic_gbit_s=400.0, nvlink_gbyte_s=450.0, efficiency=0.8,
    base_latency_us=8.4, nvlink_hop_us=3.4, net_hop_us=9.6,
    sources=(
        "NVIDIA DGX H100 datasheet: 8x H100 SXM, 18 NVLink connections per GPU = 900 GB/s bidirectional "
        "GPU-to-GPU bandwidth (450 GB/s each way); 8x single-port ConnectX-7, 400 Gb/s InfiniBand/Ethernet "
        "(the DGX H100 user guide maps one ConnectX-7 to each GPU)",
        "nccl-tests doc/PERFORMANCE.md: bus bandwidth = algbw x 2(n-1)/n (all-reduce), (n-1)/n "
        "(reduce-scatter, all-gather, S the whole array), 1 (reduce, broadcast)",
        "NCCL src/graph/tuning.cc (ring, Simple protocol): base latency 8.4 us, per ring step 3.4 us over "
        "NVLink and 9.6 us over the network; all-reduce 2(n-1) steps, of which 2(nodes-1) cross nodes",
        "efficiency 0.8 of the link rate: an assumption, not a measurement",
    ))


# --------------------------------------------------------------------------------------------
# The measured collectives (bench/comm.json)
# --------------------------------------------------------------------------------------------


class CommFormatError(ValueError):
    """``bench/comm.json`` (or the file given) lacks a field or holds a wrong value; names both."""


@dataclass(frozen=True)
class Collective:
    """One kind of collective, per rank and step, as measured."""

    kind: str
    calls: float
    elements: float
    bytes: float
    issued_in_backward: float  # share of the kind's volume issued while backward ran


@dataclass(frozen=True)
class CommRun:
    """One measured run of ``tools/bench_comm.py``."""

    preset: str
    world_size: int
    zero_stage: int
    params: int
    micro_batch_size: int
    bucket_elements: int | None
    per_step: tuple[Collective, ...]
    control: tuple[Collective, ...] = ()


@dataclass(frozen=True)
class CommMeasurement:
    """A whole ``comm.json``: where it came from (``meta``: script, date, device, versions, note)
    and its runs."""

    path: str
    meta: dict[str, Any]
    runs: tuple[CommRun, ...]

    def run_for(self, zero_stage: int) -> CommRun | None:
        """The run measured at ``zero_stage`` (the largest world size among several), or None."""
        same = [r for r in self.runs if r.zero_stage == zero_stage]
        return max(same, key=lambda r: r.world_size) if same else None

    def describe(self) -> str:
        m = self.meta
        return f"{os.path.basename(self.path)} ({m.get('script', '?')}, {m.get('device', '?')}, {m.get('date', '?')})"


def _number(value: Any, where: str, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise CommFormatError(f"{where}: expected a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _collectives(table: Any, where: str) -> tuple[Collective, ...]:
    if not isinstance(table, dict):
        raise CommFormatError(f"{where}: expected a mapping of operation kind to figures, got {type(table).__name__}")
    out = []
    for kind, fig in table.items():
        w = f"{where}.{kind}"
        if kind not in _RING:
            raise CommFormatError(f"{w}: unknown operation kind; known: {', '.join(KINDS)}")
        if not isinstance(fig, dict):
            raise CommFormatError(f"{w}: expected calls/elements/bytes/issued_in_backward, got {fig!r}")
        try:
            out.append(Collective(kind, _number(fig["calls"], f"{w}.calls"), _number(fig["elements"], f"{w}.elements"),
                                  _number(fig["bytes"], f"{w}.bytes"),
                                  _number(fig["issued_in_backward"], f"{w}.issued_in_backward", 0.0, 1.0)))
        except KeyError as exc:
            raise CommFormatError(f"{w}: missing {exc}") from None
    return tuple(out)


def load_comm(path: str | os.PathLike) -> CommMeasurement | None:
    """Read a ``comm.json`` (schema in the module docstring of ``tools/bench_comm.py``); None if the
    file does not exist, :class:`CommFormatError` naming the file and field if it is malformed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommFormatError(f"{path}: cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise CommFormatError(f"{path}: expected {{\"meta\": ..., \"runs\": [...]}}")
    runs = []
    for i, r in enumerate(data["runs"]):
        w = f"{path}: runs[{i}]"
        if not isinstance(r, dict):
            raise CommFormatError(f"{w}: expected a mapping")
        try:
            params = int(_number(r["params"], f"{w}.params", 1.0))
            bucket = r.get("bucket_elements")
            runs.append(CommRun(
                preset=str(r["preset"]), world_size=int(_number(r["world_size"], f"{w}.world_size", 1.0)),
                zero_stage=int(_number(r["zero_stage"], f"{w}.zero_stage", 0.0, 3.0)), params=params,
                micro_batch_size=int(_number(r["micro_batch_size"], f"{w}.micro_batch_size", 1.0)),
                bucket_elements=None if bucket is None else int(_number(bucket, f"{w}.bucket_elements", 1.0)),
                per_step=_collectives(r["per_step"], f"{w}.per_step"),
                control=_collectives(r.get("control", {}), f"{w}.control")))
        except KeyError as exc:
            raise CommFormatError(f"{w}: missing {exc}") from None
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return CommMeasurement(path, meta, tuple(runs))


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveCost:
    """One kind of collective at the target: per occurrence (per micro-batch or per step)."""

    kind: str
    calls: float
    bytes: float  # scaled to the target's parameter count
    seconds: float  # latency + bandwidth, one occurrence
    latency_s: float  # of which latency
    in_backward: float  # share issued while backward ran
    per_step: int  # occurrences per step (the accumulation steps for gradient kinds under ZeRO-2/3)


@dataclass(frozen=True)
class Estimate:
    """What :func:`estimate` computed; times in seconds. Communication fields are None when no
    collectives were measured (then the step is the compute alone)."""

    preset: str
    params: int
    nodes: int
    gpus_per_node: int
    micro_batch: int
    grad_accum_steps: int
    rate: float
    steps: int
    compute_s: float
    backward_window_s: float
    bus_bandwidth: float
    collectives: tuple[CollectiveCost, ...] | None
    comm_s: float | None
    hidden_s: float | None
    exposed_s: float | None
    network: Network = field(repr=False, default=DGX_H100_NDR)

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def images_per_step(self) -> int:
        return self.micro_batch * self.grad_accum_steps * self.ranks

    @property
    def step_s(self) -> float:
        return self.compute_s + (self.exposed_s or 0.0)

    @property
    def images_per_s(self) -> float:
        return self.images_per_step / self.step_s

    @property
    def wall_s(self) -> float:
        return self.steps * self.step_s

    @property
    def gpu_hours(self) -> float:
        return self.wall_s * self.ranks / 3600.0


def backward_share(preset: str, img_size: int = 224, mask_ratio: float = 0.75, act_ckpt_every: int = 0) -> float:
    """Share of a training step's FLOPs (recompute included) spent in backward."""
    from maescale.flops import mae_flops_per_image

    arch = PRESETS[preset]
    forward = mae_flops_per_image(arch, img_size, mask_ratio).forward
    _, hardware = train_flops_per_image(arch, img_size, mask_ratio, act_ckpt_every)
    return (hardware - forward) / hardware


def estimate(preset: str, micro_batch: int, nodes: int, gpus_per_node: int, *, rate: float,
             comm: CommRun | None, steps: int, grad_accum_steps: int = 1, zero_stage: int | None = None,
             img_size: int = 224, mask_ratio: float = 0.75, act_ckpt_every: int = 0,
             network: Network = DGX_H100_NDR) -> Estimate:
    """Step time, wall time and GPU-hours of ``steps`` optimizer steps of ``preset`` at
    ``micro_batch`` images per GPU on ``nodes x gpus_per_node`` GPUs (see the module docstring).

    ``rate``: measured images/s of one GPU at this micro-batch; ``comm``: the measured collectives
    (None: not measured, the step is the compute alone); ``zero_stage``: the target's (default: the
    measured run's).
    """
    if rate <= 0 or micro_batch < 1 or nodes < 1 or gpus_per_node < 1 or grad_accum_steps < 1 or steps < 0:
        raise ValueError(f"need rate > 0, micro_batch, nodes, gpus_per_node, grad_accum_steps >= 1 and steps >= 0; "
                         f"got {rate}, {micro_batch}, {nodes}, {gpus_per_node}, {grad_accum_steps}, {steps}")
    params = param_count(PRESETS[preset])
    micro_s = micro_batch / rate
    window = backward_share(preset, img_size, mask_ratio, act_ckpt_every) * micro_s
    busbw = network.bus_bandwidth(nodes, gpus_per_node)
    common = dict(preset=preset, params=params, nodes=nodes, gpus_per_node=gpus_per_node, micro_batch=micro_batch,
                  grad_accum_steps=grad_accum_steps, rate=rate, steps=steps, compute_s=grad_accum_steps * micro_s,
                  backward_window_s=window, bus_bandwidth=busbw, network=network)
    if comm is None:
        return Estimate(**common, collectives=None, comm_s=None, hidden_s=None, exposed_s=None)
    stage = comm.zero_stage if zero_stage is None else zero_stage
    n = nodes * gpus_per_node
    costs = []
    for c in comm.per_step:
        elements = c.elements / comm.params * params
        nbytes = elements * (c.bytes / c.elements) if c.elements else c.bytes
        if n == 1:  # one rank: NCCL moves nothing
            lat = secs = 0.0
        else:
            factor = _RING[c.kind][0](n)
            lat = c.calls * network.latency(c.kind, nodes, gpus_per_node)
            secs = lat + nbytes * factor / busbw
        reps = grad_accum_steps if (stage >= 2 and c.kind in GRADIENT_KINDS) else 1
        costs.append(CollectiveCost(c.kind, c.calls, nbytes, secs, lat, c.issued_in_backward, reps))
    total = sum(c.seconds * c.per_step for c in costs)
    # Each micro-batch's backward hides what it issues, up to its length; the last micro-batch's
    # backward also carries the once-per-step kinds' backward share.
    every_micro = sum(c.seconds * c.in_backward for c in costs if c.per_step > 1)
    once = sum(c.seconds * c.in_backward for c in costs if c.per_step == 1)
    hidden = (grad_accum_steps - 1) * min(every_micro, window) + min(every_micro + once, window)
    return Estimate(**common, collectives=tuple(costs), comm_s=total, hidden_s=hidden, exposed_s=total - hidden)
