"""The SLURM job side of the launcher: what every task of a submitted job runs, and the requeue.

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

import dataclasses
import json
import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, MutableMapping

from maescale.config import Config
from maescale.exitcodes import PREEMPTED
from maescale.rundir import RunDir, write_json_atomic

log = logging.getLogger("maescale.launch")

REQUEUE_FILE = "requeues.json"

# torchrun-style variables a job must not inherit from the shell that submitted it: under srun
# they would make ``detect_env`` prefer them over SLURM's (every task would think it is rank 0).
_INHERITED_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "TORCHELASTIC_RUN_ID")

# --------------------------------------------------------------------------------------------
# The requeue counter (RUN/slurm/requeues.json)
# --------------------------------------------------------------------------------------------


def read_requeues(output_dir: str | os.PathLike, job_id: str) -> int:
    """How many times job ``job_id`` has been requeued (0 for a job the file does not describe)."""
    path = RunDir(output_dir).slurm / REQUEUE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(data, dict) or str(data.get("job_id")) != str(job_id):
        return 0  # a new submission on the same run directory starts counting again
    return int(data.get("requeues", 0))


def record_requeue(output_dir: str | os.PathLike, job_id: str, max_requeues: int, step: int | None) -> int:
    """Count one more requeue of ``job_id`` in ``output_dir/slurm/requeues.json``; returns the count."""
    path = RunDir(output_dir).slurm / REQUEUE_FILE
    count = read_requeues(output_dir, job_id) + 1
    history: list[dict[str, Any]] = []
    if count > 1:
        try:
            history = list(json.loads(path.read_text()).get("history", []))
        except (OSError, ValueError, AttributeError):
            history = []
    history.append({"requeue": count, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json_atomic(path, {"job_id": str(job_id), "requeues": count, "max_requeues": max_requeues,
                             "history": history}, indent=1)
    return count


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
    from maescale.distributed import detect_env, free_port, port_for_job

    env = os.environ if environ is None else environ
    executor = env.get("SUBMITIT_EXECUTOR", "")
    if executor == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        for key in (*_INHERITED_RANK_VARS, "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        ntasks = int(env.get("SUBMITIT_LOCAL_NTASKS", "1"))
        port = port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID")) if ntasks > 1 else free_port()
        env.update({"RANK": env["SUBMITIT_LOCAL_GLOBALID"], "WORLD_SIZE": str(ntasks),
                    "LOCAL_RANK": env.get("SUBMITIT_LOCAL_LOCALID", "0"), "LOCAL_WORLD_SIZE": str(ntasks),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        for key in _INHERITED_RANK_VARS:
            env.pop(key, None)
    return detect_env(env)


def submitit_signal() -> int:
    """The signal submitit asked SLURM for (``--signal=USR2@N``; ``SUBMITIT_PREEMPT_SIGNAL``)."""
    from submitit import JobEnvironment

    # JobEnvironment.USR_SIG (public) is the name submitit reads from SUBMITIT_PREEMPT_SIGNAL.
    return int(signal.Signals["SIG" + JobEnvironment.USR_SIG])


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
        setup_logging(env.rank, RunDir(out))
        if env.rank == 0:
            self._log_start(env)
        usr_sig = submitit_signal()
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
        step = RunDir(cfg.output_dir).latest_step()
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
            raise SystemExit(PREEMPTED) from None

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
        step = RunDir(cfg.output_dir).latest_step()
        if read_requeues(cfg.output_dir, job_id) >= cfg.slurm.max_requeues:
            self._log_cap(job_id, step)
            return None
        count = record_requeue(cfg.output_dir, job_id, cfg.slurm.max_requeues, step)
        log.warning("requeueing job %s (requeue %d/%d); it will resume from step %s", job_id, count,
                    cfg.slurm.max_requeues, step)
        requeued = TrainJob(dataclasses.replace(cfg, resume=True))
        return DelayedSubmission(requeued, *args, **kwargs)


