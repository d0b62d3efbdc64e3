"""Process-group set-up from torchrun's or SLURM's environment.

Every training process runs :func:`init_distributed`, which works out its rank, the world size,
its local rank and the rendezvous address (:func:`detect_env`), picks NCCL on GPUs and gloo on
CPUs, binds one device per local rank, and creates a small gloo group for control messages
(stop signals, timers) so that those never synchronise the GPU stream.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"node[001-003,007],gpu5"`` -> ``["node001", ..., "gpu5"]``.

    Handles zero padding, several bracket groups per name (``r[1-2]n[01-02]``) and commas at the
    top level; the same expansion as ``scontrol show hostnames``.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host(item))
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SLURM node list {text!r}")
    if cur:
        parts.append(cur)
    return [p for p in parts if p]


def _expand_host(item: str) -> list[str]:
    m = re.search(r"\[([^\]]+)\]", item)
    if not m:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {rng!r} in SLURM node list {item!r}")
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            values = [rng]
        for v in values:
            out.extend(_expand_host(prefix + v + suffix))
    return out


# Job-derived rendezvous ports stay below Linux's default ephemeral range (32768-60999,
# net.ipv4.ip_local_port_range), where an outgoing connection of any process on the first node
# could already hold the port, and above the range of well-known services.
JOB_PORT_BASE = 15000
JOB_PORT_SPAN = 17000  # 15000-31999


def port_for_job(job_id: str | None) -> int:
    """The rendezvous port of a job: every task derives the same one from the job id without
    talking, two jobs sharing a first node rarely collide, and it is never an ephemeral port
    (``MASTER_PORT`` overrides it)."""
    if job_id and job_id.isdigit():
        return JOB_PORT_BASE + int(job_id) % JOB_PORT_SPAN
    return DEFAULT_PORT


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank/world/local rank/master from torchrun (``RANK``...) or SLURM (``SLURM_PROCID``...).

    torchrun's variables win when both are present (torchrun inside an sbatch allocation).
    Without either, this is a single process (rank 0 of 1).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: not inside an srun step?")
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
        local_world = _first_count(per_node) or max(1, world // len(expand_nodelist(nodelist)))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID"))),
            source="slurm",
        )
    return DistEnv(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0) or 0), "single")


def _first_count(tasks_per_node: str) -> int | None:
    # SLURM_TASKS_PER_NODE looks like "8(x16)" or "8,4"
    m = re.match(r"(\d+)", tasks_per_node or "")
    return int(m.group(1)) if m else None


def free_port() -> int:
    """An unused TCP port on this host (for single-process runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_device(env: DistEnv, requested: str = "auto") -> torch.device:
    """One device per local rank: ``cuda:<local_rank>`` when GPUs are there, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise RuntimeError(f"local rank {env.local_rank} has no GPU: only {count} visible on this node "
                           "(ntasks-per-node must equal the GPUs per node)")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


@dataclass
class DistContext:
    """The initialised job: environment, device, and the CPU control group."""

    env: DistEnv
    device: torch.device
    control_group: object  # a gloo ProcessGroup for small CPU-side agreements


def set_socket_ifname(ifname: str | None, environ: MutableMapping[str, str] | None = None) -> None:
    """Point NCCL's and gloo's sockets at ``ifname`` (``distributed.socket_ifname``), unless the
    site's environment already says where (its value wins)."""
    env = os.environ if environ is None else environ
    if ifname:
        for key in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            env.setdefault(key, ifname)


def init_distributed(device_request: str = "auto", timeout_minutes: float = 30.0,
                     environ: Mapping[str, str] | None = None, socket_ifname: str | None = None) -> DistContext:
    """Initialise ``torch.distributed`` (through DeepSpeed) for this process.

    ``timeout_minutes`` bounds every collective: if a rank dies, the others fail with an error
    within it instead of hanging forever (the stall watchdog normally ends such a job sooner).
    The control group is always a gloo group of its own, so that its asynchronous agreements
    never queue behind (or ahead of) the model's collectives.
    """
    import deepspeed

    from maescale.compat import silence_collective_deprecations

    silence_collective_deprecations()
    set_socket_ifname(socket_ifname)
    env = detect_env(environ)
    if env.source == "single" and not env.master_port:
        env = DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")
    os.environ.update({
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size), "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
    device = select_device(env, device_request)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        # PyTorch's NCCL flight recorder: the last collectives of every rank, which the stall
        # watchdog writes beside the stacks (maescale.watchdog). A site's setting wins.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        # A lone process needs no TCP rendezvous: a file store cannot lose a race for a "free"
        # port with another process on the machine (seen as EADDRINUSE on a busy CI machine).
        init_method = f"file://{tempfile.mkdtemp(prefix='maescale-store-')}/store" if env.world_size == 1 else None
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False, init_method=init_method,
                                   rank=env.rank, world_size=env.world_size)
    control = dist.new_group(backend="gloo", timeout=timeout) if env.world_size > 1 else dist.group.WORLD
    return DistContext(env=env, device=device, control_group=control)


def describe(ctx: DistContext) -> str:
    """``4 process(es) on 2 node(s) from torchrun, backend gloo, master 127.0.0.1:29500``."""
    env = ctx.env
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    return (f"{env.world_size} process(es) on {env.num_nodes} node(s) from {env.source}, backend {backend}, "
            f"master {env.master_addr}:{env.master_port}")


def agree_max(values: list[int], group: object) -> list[int]:
    """Element-wise max of small integer flags over all ranks (on the CPU control group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def barrier(group: object | None = None) -> None:
    """``dist.barrier`` that is a no-op without a process group."""
    if dist.is_initialized():
        dist.barrier(group=group)


def shutdown() -> None:
    """Tear down the process group (so the next job in the same process starts clean).

    Through DeepSpeed when it was used: its ``destroy_process_group`` also drops the groups
    DeepSpeed caches (a clone of the world group among them), which would otherwise point at the
    destroyed backend and fail the next engine's start-up in this process."""
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def broadcast_object(obj: object, group: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (a blocking collective: for start-up and rare events)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
