"""SLURM launcher: ``tools/submit.py`` submits a training job through submitit; the job requeues itself.

Submission (on the login node, :func:`submit_main`)
    The config is loaded and validated in full, the flags (``--nodes``, ``--time`` ...) override
    its ``slurm:`` section and the resolved values are written back into it, so a typo or an
    impossible value fails here, before anything is queued. Then the run directory
    (``output_dir``) is created, the resolved config is saved as ``output_dir/config.yaml`` and
    one :class:`TrainJob` is submitted with submitit's ``SlurmExecutor``: ``nodes`` x
    ``gpus_per_node`` tasks (one process per GPU), ``--requeue``, ``--signal=USR2@signal_delay_s``.
    submitit keeps its files (the sbatch script, the pickled job, one ``.out``/``.err`` log per
    task) in ``output_dir/slurm/``. ``--dry-run`` prints the sbatch script and submits nothing;
    ``--local`` runs the same job here through submitit's ``LocalExecutor``.

The job (every task runs ``TrainJob.__call__``)
    :func:`prepare_dist_env` derives rank / world size / local rank / master from SLURM's
    variables (or from the local executor's), then ``maescale.train.main`` runs exactly as under
    ``tools/train.py``. Resuming is automatic: the run directory has ``checkpoints/latest``.

What happens at the time limit or on preemption (the order matters)
    1. ``submitit.core.submission.process_job`` starts in every task and, before calling the
       job, installs submitit's handlers: SIGUSR2 -> ``SignalHandler.checkpoint_and_try_requeue``,
       SIGTERM and SIGCONT -> ``bypass`` (log only).
    2. ``train.main`` installs its own :class:`~maescale.train.StopSignals` over them for
       SIGTERM, SIGUSR1 and submitit's signal (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says
       otherwise; passed as ``extra_stop_signals``). Those handlers only set a flag: nothing is
       saved inside a signal handler.
    3. SLURM signals every task: SIGUSR2 ``signal_delay_s`` before the time limit
       (``--signal=USR2@N`` without ``B:`` goes to all tasks, not to the batch shell), and also
       on preemption where the site sets ``PreemptParameters=send_user_signal``; SIGTERM when the
       job is preempted otherwise or cancelled (``scancel``), then SIGKILL after ``GraceTime`` /
       ``KillWait``.
    4. At the next step boundary the ranks agree (max over a CPU all-reduce) to stop, every
       rank writes its part of the checkpoint, rank 0 commits it (``latest``), and ``main``
       restores the previous handlers (submitit's again) and returns ``status="preempted"``
       with the signals it got (``TrainResult.stop_signals``).
    5. Ranks other than 0 return their result (submitit records it; a requeue overwrites it).
       Rank 0, if submitit's signal was among them, ignores further SIGTERM/SIGUSR1/SIGUSR2
       from then on and calls submitit's own ``checkpoint_and_try_requeue`` (the handler
       object installed in step 1, which holds the job's start time and timeout budget).
       submitit decides "timed-out" or "preempted", calls :meth:`TrainJob.checkpoint` (which
       enforces ``slurm.max_requeues``, counts the requeue in ``output_dir/slurm/requeues.json``
       and returns the same job with ``resume=true``), re-pickles it over the submitted pickle,
       runs ``scontrol requeue $SLURM_JOB_ID`` (which stops every task of this run) and exits.
       The local executor instead exits with code 144, on which its controller restarts the
       tasks. After SIGTERM alone rank 0 does not requeue, as submitit does not: that is
       ``scancel`` (which must stop the job), or a preemption that SLURM requeues by itself
       (``PreemptMode=REQUEUE`` with ``--requeue``); either way the checkpoint is on disk.
    6. SLURM starts the same job id again; the sbatch script runs the new pickle; ``main``
       resumes from ``latest``; rank 0 logs ``resuming from step S, requeue k/N``.
    A SIGUSR2 that arrives before ``main`` has installed its handlers (while the model and the
    data loader are being built) or after it returned goes straight to submitit's handler, which
    requeues without a new save: the job resumes from the last periodic checkpoint, which is all
    there is. With ``checkpoint.on_signal=false`` the same happens at any time.
    A job that fails (an exception) is not requeued, so a crash cannot loop; SLURM requeues
    by itself after a node failure (``--requeue``), and the job resumes from ``latest``.

``slurm.signal_delay_s`` = 180 s: the budget for step 4 and 5 on a ViT-H job (see
``slurm/README.md``): ~658M parameters x 16 bytes (weights, fp32 master, Adam m and v) = 10.5 GB
written in parallel by all ranks, at a pessimistic 0.25 GB/s aggregate on a busy parallel
filesystem 42 s; the ranks then read the files back, in parallel, for the manifest's CRC32
(10.5 GB at >= 0.5 GB/s aggregate, 21 s); finishing the step in flight (<= 15 s with gradient accumulation) and
shutting down the data loader, TensorBoard and the process group, plus ``scontrol requeue``
(~15 s): ~95 s in all, ~1.9x margin. A periodic save that is already running when the signal
arrives adds up to another ~65 s, which 180 s still covers. SLURM may signal up to a minute
early, never late.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, MutableMapping, Sequence

from maescale.config import Config, ConfigError, config_from_dict, load_yaml_with_bases, parse_override, \
    parse_slurm_time, set_dotted

log = logging.getLogger("maescale.launch")

# EXIT_PREEMPTED (3): exit code of ``tools/train.py`` (every rank) when training stopped on a
# signal after saving a checkpoint (resumable). ``slurm/train.sbatch`` requeues the job on it,
# unless its batch shell got SIGTERM too (scancel, or a preemption SLURM requeues by itself).
from maescale.cli import EXIT_PREEMPTED  # noqa: E402

REQUEUE_FILE = "requeues.json"

# Command-line flag -> key of the config's slurm section.
FLAG_KEYS = {
    "nodes": "nodes", "gpus_per_node": "gpus_per_node", "partition": "partition", "account": "account",
    "qos": "qos", "time": "time", "constraint": "constraint", "mem": "mem", "cpus_per_task": "cpus_per_task",
    "job_name": "job_name", "exclude": "exclude", "comment": "comment",
}

# torchrun-style variables a job must not inherit from the shell that submitted it: under srun
# they would make ``detect_env`` prefer them over SLURM's (every task would think it is rank 0).
_INHERITED_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "TORCHELASTIC_RUN_ID")


class LaunchError(ValueError):
    """A problem with the submission request, naming the flag or config key responsible."""


# --------------------------------------------------------------------------------------------
# Paths and the requeue counter
# --------------------------------------------------------------------------------------------


def slurm_folder(output_dir: str | os.PathLike) -> Path:
    """Where submitit keeps the sbatch script, the pickled job and the per-task logs."""
    return Path(output_dir) / "slurm"


def read_requeues(output_dir: str | os.PathLike, job_id: str) -> int:
    """How many times job ``job_id`` has been requeued (0 for a job the file does not describe)."""
    path = slurm_folder(output_dir) / REQUEUE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(data, dict) or str(data.get("job_id")) != str(job_id):
        return 0  # a new submission on the same run directory starts counting again
    return int(data.get("requeues", 0))


def record_requeue(output_dir: str | os.PathLike, job_id: str, max_requeues: int, step: int | None) -> int:
    """Count one more requeue of ``job_id`` in ``output_dir/slurm/requeues.json``; returns the count."""
    path = slurm_folder(output_dir) / REQUEUE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    count = read_requeues(output_dir, job_id) + 1
    history: list[dict[str, Any]] = []
    if count > 1:
        try:
            history = list(json.loads(path.read_text()).get("history", []))
        except (OSError, ValueError, AttributeError):
            history = []
    history.append({"requeue": count, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"job_id": str(job_id), "requeues": count, "max_requeues": max_requeues,
                               "history": history}, indent=1))
    os.replace(tmp, path)
    return count


def latest_step(output_dir: str | os.PathLike) -> int | None:
    """Step of the checkpoint ``output_dir/checkpoints/latest`` names (None without one)."""
    latest = Path(output_dir) / "checkpoints" / "latest"
    try:
        m = re.fullmatch(r"step_(\d+)", latest.read_text().strip())
    except OSError:
        return None
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def prepare_dist_env(environ: MutableMapping[str, str] | None = None):
    """Make ``environ`` describe this task's place in the job; returns the resulting ``DistEnv``.

    Under SLURM (srun), ``detect_env`` reads ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/
    ``SLURM_JOB_NODELIST``/``SLURM_NTASKS_PER_NODE``/``SLURM_JOB_ID``; this first drops
    ``RANK``/``WORLD_SIZE``/... that the job may have inherited from the submitting shell (sbatch
    exports the whole environment), which would otherwise win. ``MASTER_ADDR``/``MASTER_PORT``
    stay: they are the documented way to override the first node / the job-id-derived port.
    Under submitit's local executor (``SUBMITIT_LOCAL_*``) it writes the torchrun-style
    variables: master 127.0.0.1 and a port derived from the local job id, the same in every task.
    """
    from maescale.distributed import _port_for_job, detect_env, free_port

    env = os.environ if environ is None else environ
    executor = env.get("SUBMITIT_EXECUTOR", "")
    if executor == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        for key in (*_INHERITED_RANK_VARS, "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        ntasks = int(env.get("SUBMITIT_LOCAL_NTASKS", "1"))
        port = _port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID")) if ntasks > 1 else free_port()
        env.update({"RANK": env["SUBMITIT_LOCAL_GLOBALID"], "WORLD_SIZE": str(ntasks),
                    "LOCAL_RANK": env.get("SUBMITIT_LOCAL_LOCALID", "0"), "LOCAL_WORLD_SIZE": str(ntasks),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        for key in _INHERITED_RANK_VARS:
            env.pop(key, None)
    return detect_env(env)


def _submitit_signal() -> int:
    """The signal submitit asked SLURM for (``--signal=USR2@N``; ``SUBMITIT_PREEMPT_SIGNAL``)."""
    from submitit.core.job_environment import JobEnvironment

    return int(JobEnvironment._usr_sig())


def _job_id() -> str:
    try:
        from submitit import JobEnvironment

        return str(JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - not inside a submitit job
        return os.environ.get("SLURM_JOB_ID", "local")


def _ignore_late_signal(signum: int, frame: Any) -> None:
    log.info("ignoring %s: this job is already being requeued", signal.Signals(signum).name)


class TrainJob:
    """The submitit job: ``train.main(cfg)`` in every task, requeued on preemption or time-out.

    Picklable (it holds only the resolved :class:`~maescale.config.Config`). submitit treats it
    as checkpointable because it has a :meth:`checkpoint` method.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"TrainJob(output_dir={self.cfg.output_dir!r}, model={self.cfg.model.name!r})"

    def __call__(self):
        from maescale.distributed import shutdown
        from maescale.train import main, setup_logging

        cfg = self.cfg
        env = prepare_dist_env()
        out = Path(cfg.output_dir)
        setup_logging(env.rank, out)
        if env.rank == 0:
            self._log_start(env)
        usr_sig = _submitit_signal()
        try:
            result = main(cfg, extra_stop_signals=(usr_sig,))
        finally:
            shutdown()
        if result.status == "preempted" and env.rank == 0:
            self._requeue(result, usr_sig)  # does not return when the job is requeued
        return result

    def _log_start(self, env) -> None:
        cfg, job_id = self.cfg, _job_id()
        count = read_requeues(cfg.output_dir, job_id)
        step = latest_step(cfg.output_dir)
        where = f"{env.world_size} process(es) on {env.num_nodes} node(s), master {env.master_addr}:{env.master_port}"
        if count:
            log.info("resuming from step %s, requeue %d/%d (job %s; %s)", step, count, cfg.slurm.max_requeues,
                     job_id, where)
        elif step is not None:
            log.info("resuming from step %d (job %s, restart %s; %s)", step, job_id,
                     os.environ.get("SLURM_RESTART_COUNT", "0"), where)
        else:
            log.info("job %s starts run %s (%s)", job_id, Path(cfg.output_dir).resolve(), where)

    def _requeue(self, result, usr_sig: int) -> None:
        """Rank 0, after ``main`` saved and returned "preempted": requeue through submitit."""
        from submitit.core.job_environment import SignalHandler

        cfg, job_id = self.cfg, _job_id()
        handler = signal.getsignal(usr_sig)
        if not isinstance(getattr(handler, "__self__", None), SignalHandler):
            log.warning("stopped at step %d; not running under submitit, so nothing requeues this job: "
                        "start it again to resume", result.step)
            return
        if usr_sig not in result.stop_signals:
            names = ", ".join(signal.Signals(s).name for s in result.stop_signals) or "another rank's signal"
            log.warning("stopped at step %d by %s with a checkpoint; not requeuing: SIGTERM means scancel, or a "
                        "preemption that SLURM requeues by itself (PreemptMode=REQUEUE). To resume by hand: %s",
                        result.step, names, self._resume_hint())
            return
        if read_requeues(cfg.output_dir, job_id) >= cfg.slurm.max_requeues:
            self._log_cap(job_id, result.step)
            return
        # From here on a second signal must not re-enter submitit's handler.
        for sig in {signal.SIGTERM, signal.SIGUSR1, usr_sig}:
            signal.signal(sig, _ignore_late_signal)
        log.info("stopped at step %d with a checkpoint; handing over to submitit to requeue job %s (its log line "
                 "names %s whichever signal SLURM sent)", result.step, job_id, signal.Signals(usr_sig).name)
        try:
            # submitit's own path: timed-out or preempted?, self.checkpoint(), re-pickle, requeue, exit.
            handler(usr_sig, None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            log.error("requeue of job %s failed (%s). If SLURM preempted it with PreemptMode=REQUEUE it "
                      "requeues the job itself; otherwise resubmit: %s", job_id, exc, self._resume_hint())
            raise SystemExit(EXIT_PREEMPTED) from None

    def _resume_hint(self) -> str:
        cmd = f"python tools/submit.py {shlex.quote(str(Path(self.cfg.output_dir) / 'config.yaml'))}"
        return cmd if self.cfg.resume is True else cmd + " resume=true"

    def _log_cap(self, job_id: str, step: int | None) -> None:
        cfg = self.cfg
        log.error("not requeuing job %s: it was requeued %d times already (slurm.max_requeues=%d). The run "
                  "stopped at step %s with a checkpoint; resume it by hand: %s",
                  job_id, read_requeues(cfg.output_dir, job_id), cfg.slurm.max_requeues, step, self._resume_hint())

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit (rank 0) on preemption/time-out: the job to requeue, or None to stop.

        The state lives in the run directory (``latest``), so the requeued job is this one with
        ``resume=true`` (a run started with ``resume=false`` or from an explicit checkpoint path
        must continue from its own newest checkpoint).
        """
        from submitit.helpers import DelayedSubmission

        cfg, job_id = self.cfg, _job_id()
        step = latest_step(cfg.output_dir)
        if read_requeues(cfg.output_dir, job_id) >= cfg.slurm.max_requeues:
            self._log_cap(job_id, step)
            return None
        count = record_requeue(cfg.output_dir, job_id, cfg.slurm.max_requeues, step)
        log.warning("requeueing job %s (requeue %d/%d); it will resume from step %s", job_id, count,
                    cfg.slurm.max_requeues, step)
        requeued = TrainJob(dataclasses.replace(cfg, resume=True))
        return DelayedSubmission(requeued, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Submission: config + flags -> validated Config -> submitit parameters
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/submit.py",
        description="Submit an MAE training to SLURM (through submitit), requeued and resumed automatically "
                    "after preemption or at the time limit. The config's slurm: section gives the defaults; "
                    "flags override it.",
        epilog="example: python tools/submit.py --nodes 16 --partition gpu configs/vit_huge.yaml train.epochs=800")
    p.add_argument("config", help="YAML config file (e.g. configs/vit_huge.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100")
    g = p.add_argument_group("resources (override slurm.* of the config)")
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node = tasks (processes) per node (default 8)")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per task (process)")
    g.add_argument("--mem", help="memory per node, SLURM syntax: 0 (all), 480G, 500000M")
    g.add_argument("--time", help="time limit: minutes or [D-]HH:MM:SS")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--constraint", help="node features, e.g. 'h100|a100'")
    g.add_argument("--exclude", help="nodes to leave out, e.g. node[017,023]")
    g.add_argument("--job-name", help="job name shown by squeue")
    g.add_argument("--comment", help="free-text job comment")
    m = p.add_argument_group("mode")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="validate and print the sbatch script; submit nothing")
    mode.add_argument("--local", action="store_true",
                      help="run the same job here through submitit's local executor (one node; one process per "
                           "visible GPU up to --gpus-per-node, or one CPU process; an explicit --gpus-per-node N "
                           "starts N processes) and wait for it")
    return p


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve_config(args: argparse.Namespace) -> Config:
    """Config file + overrides + flags -> a validated Config whose slurm section holds the flags.

    Raises :class:`LaunchError` naming the flag, or :class:`ConfigError` naming the key.
    """
    raw = load_yaml_with_bases(args.config)
    for item in args.overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    from_flags = {}
    if getattr(args, "local", False) and args.nodes is None:
        set_dotted(raw, "slurm.nodes", 1)  # --local is this machine: one node whatever the config says
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_dotted(raw, f"slurm.{key}", value)
            from_flags[f"slurm.{key}"] = (_flag(dest), value)
    try:
        cfg = config_from_dict(raw)
        check_launch(cfg, local=getattr(args, "local", False))
    except (ConfigError, LaunchError) as exc:
        key = getattr(exc, "key", None)
        if key in from_flags:
            flag, value = from_flags[key]
            raise LaunchError(f"{flag} {value!r}: {exc}") from None
        raise
    # Absolute run directory: the job must not depend on where it happens to start.
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).expanduser().absolute()))


_MEM_RE = re.compile(r"^\d+[KMGTkmgt]?$")
_PARAM_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def _launch_error(message: str, key: str) -> LaunchError:
    err = LaunchError(f"config key '{key}': {message}")
    err.key = key  # type: ignore[attr-defined]
    return err


def _check_text(value: Any, key: str, sbatch_line: bool = True) -> None:
    # Everything here ends up in the sbatch script. submitit shell-quotes values, but a line
    # break would end the #SBATCH line and start a shell command: refuse control characters.
    # sbatch's own #SBATCH parser also takes a backslash as an escape inside quotes (unlike the
    # shell), so a value with one would arrive changed: refuse those on #SBATCH lines too.
    if not isinstance(value, str):
        return
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _launch_error(f"{value!r} contains a control character (newline, tab ...); not allowed in a "
                            "SLURM job script", key)
    if sbatch_line and "\\" in value:
        raise _launch_error(f"{value!r} contains a backslash, which sbatch would drop from its #SBATCH line", key)


def check_launch(cfg: Config, local: bool = False) -> None:
    """Checks beyond config validation that only matter for a submission."""
    s = cfg.slurm
    for name in ("job_name", "partition", "account", "qos", "constraint", "exclude", "comment", "mem", "time"):
        _check_text(getattr(s, name), f"slurm.{name}")
    if not s.job_name:
        raise _launch_error("must not be empty", "slurm.job_name")
    if s.mem is not None and not _MEM_RE.match(s.mem):
        raise _launch_error(f"got {s.mem!r}; allowed: an amount in SLURM syntax such as 0 (all of the node), "
                            "480G or 500000M", "slurm.mem")
    limit_s = 60 * parse_slurm_time(s.time)
    if s.signal_delay_s >= limit_s:
        raise _launch_error(f"{s.signal_delay_s} s is not shorter than the time limit {s.time!r} ({limit_s} s): the "
                            "save-on-signal would be requested before the job starts", "slurm.signal_delay_s")
    for key, value in s.additional_parameters.items():
        if not isinstance(key, str) or not _PARAM_KEY_RE.match(key):
            raise _launch_error(f"{key!r} is not an sbatch option name", "slurm.additional_parameters")
        if value is False or value is None or not isinstance(value, (str, int, float, bool)):
            raise _launch_error(f"{key}: got {value!r}; allowed: a string, a number, or true for a bare flag",
                                f"slurm.additional_parameters.{key}")
        _check_text(value, f"slurm.additional_parameters.{key}")
    for i, line in enumerate(s.setup):
        _check_text(line.replace("\t", " "), f"slurm.setup[{i}]", sbatch_line=False)
    _check_text(cfg.output_dir, "output_dir")
    if "%" in cfg.output_dir:
        raise _launch_error(f"{cfg.output_dir!r} contains '%', which SLURM and submitit read as a file-name "
                            "pattern (%j, %t ...) in the log paths; pick another directory name", "output_dir")
    if cfg.resume is False:
        ckpts = Path(cfg.output_dir) / "checkpoints"
        if ckpts.is_dir() and any(p.name == "latest" or p.name.startswith("step_") for p in ckpts.iterdir()):
            raise _launch_error(f"resume=false but {ckpts} already holds checkpoints: pick a new output_dir, or "
                                "resume=true to continue that run", "resume")
    if local and s.nodes != 1:
        raise _launch_error(f"got {s.nodes}; --local runs on this machine only: use --nodes 1", "slurm.nodes")


def _repo_root() -> Path:
    import maescale

    return Path(maescale.__file__).resolve().parents[1]


def tasks_per_node(cfg: Config) -> int:
    """One process per GPU; a CPU-only job (gpus_per_node=0) runs one process per node."""
    return max(1, cfg.slurm.gpus_per_node)


def sbatch_parameters(cfg: Config) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` arguments for ``cfg.slurm``."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "job_name": s.job_name,
        "time": parse_slurm_time(s.time),  # minutes
        "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": s.cpus_per_task,
        "signal_delay_s": s.signal_delay_s,
        "wckey": None,  # submitit would force --wckey=submitit, which sites that enforce wckeys reject
        # The job must import this very checkout of maescale, wherever sbatch starts it.
        "setup": [*s.setup, f"export PYTHONPATH={shlex.quote(str(_repo_root()))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        "additional_parameters": {"requeue": True, **s.additional_parameters},
    }
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = s.gpus_per_node
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment", "mem"):
        value = getattr(s, name)
        if value is not None:
            params[name] = value
    return params


def make_slurm_executor(cfg: Config, check_srun: bool = True):
    """submitit's ``SlurmExecutor`` for ``cfg`` (``check_srun=False``: for a dry run off the cluster)."""
    from submitit import SlurmExecutor

    cls = SlurmExecutor
    if not check_srun:
        cls = type("DryRunSlurmExecutor", (SlurmExecutor,), {"affinity": classmethod(lambda c: 2)})
    executor = cls(folder=slurm_folder(cfg.output_dir), max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**sbatch_parameters(cfg))
    return executor


def sbatch_script(cfg: Config) -> str:
    """The sbatch script submitit would submit for ``cfg`` (its own ``_make_submission_file_text``)."""
    executor = make_slurm_executor(cfg, check_srun=False)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit(cfg: Config):
    """Create the run directory, save the config, submit one :class:`TrainJob`; returns submitit's job."""
    executor = make_slurm_executor(cfg)  # raises RuntimeError without srun, before touching the disk
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    return executor.submit(TrainJob(cfg))


def _describe(cfg: Config) -> str:
    s = cfg.slurm
    gpus = f"{s.gpus_per_node} GPU(s)" if s.gpus_per_node else "no GPU"
    extra = "".join(f", {k} {getattr(s, k)}" for k in ("partition", "account", "qos") if getattr(s, k))
    return (f"{s.nodes} node(s) x {gpus}, {s.nodes * tasks_per_node(cfg)} task(s), time limit {s.time}{extra}; "
            f"requeued on preemption/time-out up to {s.max_requeues} times")


def submit_main(argv: Sequence[str] | None = None) -> int:
    """``python tools/submit.py CONFIG [key=value ...] [--nodes N ...] [--dry-run | --local]``."""
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except (ConfigError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir)
    logs = slurm_folder(out)
    if args.local:
        return _run_local(cfg, explicit_gpus=args.gpus_per_node is not None)
    if args.dry_run:
        print(sbatch_script(cfg), end="")
        print(f"\n# dry run: nothing submitted. Would run {_describe(cfg)}.\n"
              f"# run directory {out}; logs {logs}/<jobid>_<task>_log.out|.err")
        return 0
    try:
        job = submit(cfg)
    except RuntimeError as exc:
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        if isinstance(exc, (FailedJobError, FailedSubmissionError)):
            print(f"error: sbatch failed: {exc}", file=sys.stderr)
            return 1
        print(f"error: {exc} (this needs a SLURM login node; --dry-run prints the script, --local runs "
              "the job here)", file=sys.stderr)
        return 2
    jid = job.job_id
    print(f"submitted job {jid}: {_describe(cfg)}\n"
          f"  run directory:  {out}\n"
          f"  config:         {out / 'config.yaml'}\n"
          f"  SLURM logs:     {logs}/{jid}_<task>_log.out|.err (rank 0: {logs / f'{jid}_0_log.err'})\n"
          f"  training log:   {out / 'logs' / 'train.log'}\n"
          f"  watch:          squeue -j {jid}    tail -f {shlex.quote(str(logs / f'{jid}_0_log.err'))}\n"
          f"  TensorBoard:    tensorboard --logdir {shlex.quote(str(out / 'tensorboard'))}\n"
          f"  cancel:         scancel {jid}")
    return 0


# --------------------------------------------------------------------------------------------
# --local: the same job through submitit's LocalExecutor
# --------------------------------------------------------------------------------------------


def local_tasks(cfg: Config, explicit_gpus: bool) -> tuple[int, int]:
    """(processes, GPUs) for ``--local``: one process per visible GPU up to ``gpus_per_node``,
    else one CPU process; an explicit ``--gpus-per-node N`` asks for N processes (on CPU if
    there are no GPUs, e.g. to try a two-process gloo job)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if explicit_gpus:
        n = max(1, cfg.slurm.gpus_per_node)
        return n, min(n, visible)
    n = min(cfg.slurm.gpus_per_node, visible)
    return max(1, n), n


def _run_local(cfg: Config, explicit_gpus: bool) -> int:
    from submitit import LocalExecutor
    from submitit.core.utils import UncompletedJobError

    ntasks, ngpus = local_tasks(cfg, explicit_gpus)
    out = Path(cfg.output_dir)
    folder = slurm_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    root = str(_repo_root())
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    executor = LocalExecutor(folder=folder, max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(timeout_min=parse_slurm_time(cfg.slurm.time), tasks_per_node=ntasks,
                               gpus_per_node=ngpus, signal_delay_s=cfg.slurm.signal_delay_s)
    job = executor.submit(TrainJob(cfg))
    rank0 = job.task(0)
    print(f"started local job {job.job_id}: {ntasks} process(es) on {'%d GPU(s)' % ngpus if ngpus else 'CPU'}\n"
          f"  run directory:  {out}\n"
          f"  logs:           {folder}/{job.job_id}_<task>_log.out|.err (rank 0 follows)\n"
          f"  time limit:     pkill -USR2 -P {job.job_id}   (as SLURM before the time limit: checkpoint, requeue, resume)\n"
          f"  stop it:        kill -TERM {job.job_id}   (as scancel: checkpoint, stop; run again to resume)", flush=True)
    try:
        _follow(rank0.paths.stderr, job)
    except KeyboardInterrupt:
        job.cancel()
        print("interrupted; the run directory keeps the last checkpoint", file=sys.stderr)
        return 130
    try:
        result = rank0.result()
    except UncompletedJobError as exc:  # FailedJobError too
        print(f"error: the local job failed: {exc}", file=sys.stderr)
        return 1
    if result.status == "finished":
        print(f"finished {result.step} steps; run directory {result.output_dir}; checkpoint {result.last_checkpoint}")
        return 0
    print(f"stopped at step {result.step} by a signal (not requeued); checkpoint {result.last_checkpoint}; "
          "run the same command again to resume")
    return EXIT_PREEMPTED


def _follow(path: Path, job, poll_s: float = 0.5) -> None:
    """Copy what rank 0 writes to its stderr log onto ours until the job ends."""
    pos = 0
    while True:
        done = job.done()
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
        if done:
            return
        time.sleep(poll_s)
