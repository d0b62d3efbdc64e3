"""The SLURM job side of the launcher: what a submitted job runs, and the requeue.

Under SLURM (``tools/submit.py``) submitit runs :class:`TrainJob` once, in the batch step on the
first node (``use_srun=False``). It is the job's supervisor (:mod:`maescale.launch.supervisor`):
it starts the training as an ``srun`` step over the whole allocation (one
:mod:`maescale.launch.task` per GPU), and restarts it there after a crash or a stall. Under
submitit's local executor (``tools/submit.py --local``) every task runs the training itself.

What happens at the time limit or on preemption (the order matters)
    1. ``submitit.core.submission.process_job`` starts in the supervisor and, before calling the
       job, installs submitit's handlers: SIGUSR2 -> ``SignalHandler.checkpoint_and_try_requeue``,
       SIGTERM and SIGCONT -> ``bypass`` (log only). The supervisor then takes SIGTERM for itself
       (it only means "do not restart").
    2. SLURM signals every task of the training step: SIGUSR2 ``signal_delay_s`` before the time
       limit (``--signal=USR2@N`` without ``B:`` goes to the steps, not to the batch step), and also
       on preemption where the site sets ``PreemptParameters=send_user_signal``; SIGTERM when the
       job is preempted otherwise or cancelled (``scancel``; then also to the supervisor), then
       SIGKILL after ``GraceTime`` / ``KillWait``. The tasks' :class:`~maescale.control.StopSignals`
       only set a flag: nothing is saved inside a signal handler.
    3. After the next step the ranks agree (:mod:`maescale.control`) to stop, every rank writes
       its part of the checkpoint, rank 0 commits it (``latest``), and every task leaves an exit
       record (status "preempted", its signals) and exits with code 3.
    4. The supervisor reads the records. If submitit's signal was among rank 0's, it calls
       submitit's own ``checkpoint_and_try_requeue`` (the handler object installed in step 1,
       which holds the job's start time and timeout budget): submitit decides "timed-out" or
       "preempted", calls :meth:`TrainJob.checkpoint` (which enforces ``slurm.max_requeues``,
       counts the requeue in ``output_dir/slurm/requeues.json`` and returns the same job with
       ``resume=true``), re-pickles it over the submitted pickle, runs ``scontrol requeue
       $SLURM_JOB_ID`` and exits. After SIGTERM alone nothing is requeued, as submitit does not:
       that is ``scancel`` (which must stop the job), or a preemption that SLURM requeues by
       itself (``PreemptMode=REQUEUE`` with ``--requeue``); either way the checkpoint is on disk.
    5. SLURM starts the same job id again; the supervisor starts the training; ``main`` resumes
       from ``latest``; the log says ``resuming from step S, requeue k/N``.
    A SIGUSR2 that reaches a task before its loop has installed its handlers (while the model
    and the data loader are being built) ends that task (the default action); the supervisor
    then sees a crash and restarts it in the allocation, which soon gets the kill at the time
    limit; the job resumes from the last periodic checkpoint.
    A job that fails on bad input is not restarted or requeued; a crash or a stall is restarted
    inside the allocation (``slurm.max_failures``); SLURM requeues by itself after a node failure
    (``--requeue``), and the job resumes from ``latest``.

``slurm.signal_delay_s`` = 180 s: the budget for step 3 and 4 on a ViT-H job (see
``slurm/README.md``): ~658M parameters x 16 bytes (weights, fp32 master, Adam m and v) = 10.5 GB
written in parallel by all ranks, at a pessimistic 0.25 GB/s aggregate on a busy parallel
filesystem 42 s; the ranks then read the files back, in parallel, for the manifest's CRC32
(10.5 GB at >= 0.5 GB/s aggregate, 21 s); finishing the step in flight and the one the ranks
take to agree (<= 15 s with gradient accumulation) and shutting down the data loader,
TensorBoard and the process group, plus ``scontrol requeue`` (~15 s): ~95 s in all, ~1.9x
margin. A periodic save that is already running when the signal arrives adds up to another
~65 s, which 180 s still covers. SLURM may signal up to a minute early, never late.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

from maescale.config import Config
from maescale.exitcodes import PREEMPTED
from maescale.launch.env import prepare_dist_env  # noqa: F401 (the job's tasks and tests use it from here)
from maescale.rundir import RunDir

log = logging.getLogger("maescale.launch")

REQUEUE_FILE = "requeues.json"  # see maescale.launch.supervisor

# --------------------------------------------------------------------------------------------
# The requeue counter (RUN/slurm/requeues.json)
# --------------------------------------------------------------------------------------------


def read_requeues(output_dir: str | os.PathLike, job_id: str) -> int:
    """How many times job ``job_id`` has been requeued for preemption or its time limit (0 for a
    job the file does not describe: a new submission on the same run directory starts again)."""
    from maescale.launch.supervisor import job_record

    return int(job_record(output_dir, job_id)["requeues"])


def record_requeue(output_dir: str | os.PathLike, job_id: str, max_requeues: int, step: int | None) -> int:
    """Count one more requeue of ``job_id`` in ``output_dir/slurm/requeues.json``; returns the count."""
    from maescale.launch.supervisor import add_event

    return int(add_event(output_dir, job_id, "requeue", reason="time limit or preemption", step=step,
                         max_requeues=max_requeues)["requeues"])


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


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
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            return self._supervise()
        return self._train()

    # ------------------------------------------------------------------ under SLURM: the supervisor
    def _supervise(self) -> dict[str, Any]:
        from maescale.launch.supervisor import SlurmJob, Supervisor, setup_supervisor_logging, write_job_config

        cfg = self.cfg
        job = SlurmJob.from_env(cfg)
        setup_supervisor_logging(RunDir(cfg.output_dir))
        self._log_start(f"{job.nodes * job.tasks_per_node} process(es) on {job.nodes} node(s)")
        supervisor = Supervisor(cfg, job, write_job_config(cfg, job.job_id),
                                lambda outcome: self._requeue(outcome, submitit_signal()))
        supervisor.install_signals()
        outcome = supervisor.run_job()
        if outcome.kind in ("crash", "stall", "bad_input"):
            raise RuntimeError(f"the training ended in {outcome.reason}")  # the job is FAILED, with the reason
        return {"status": outcome.kind, "step": outcome.stopped_step or outcome.step, "output_dir": cfg.output_dir}

    # ------------------------------------------------------------------ locally: every task trains
    def _train(self):
        from maescale.distributed import shutdown
        from maescale.train import main, setup_logging

        cfg = self.cfg
        env = prepare_dist_env()
        out = Path(cfg.output_dir)
        setup_logging(env.rank, RunDir(out))
        if env.rank == 0:
            self._log_start(f"{env.world_size} process(es) on {env.num_nodes} node(s), master "
                            f"{env.master_addr}:{env.master_port}")
        usr_sig = submitit_signal()
        try:
            result = main(cfg, extra_stop_signals=(usr_sig,))
        finally:
            shutdown()
        if result.status == "preempted" and env.rank == 0:
            self._requeue(result, usr_sig)  # does not return when the job is requeued
        return result

    def _log_start(self, where: str) -> None:
        cfg, job_id = self.cfg, _job_id()
        count = read_requeues(cfg.output_dir, job_id)
        step = RunDir(cfg.output_dir).latest_step()
        if count:
            log.info("resuming from step %s, requeue %d/%d (job %s; %s)", step, count, cfg.slurm.max_requeues,
                     job_id, where)
        elif step is not None:
            log.info("resuming from step %d (job %s, restart %s; %s)", step, job_id,
                     os.environ.get("SLURM_RESTART_COUNT", "0"), where)
        else:
            log.info("job %s starts run %s (%s)", job_id, Path(cfg.output_dir).resolve(), where)

    def _requeue(self, stopped: Any, usr_sig: int) -> None:
        """After the training saved and stopped on a signal (``stopped``: the supervisor's outcome,
        or the local rank 0's result): on submitit's signal, requeue through submitit's own
        handler; after SIGTERM alone, nothing (``scancel``, or a preemption SLURM requeues itself)."""
        from maescale.compat import submitit_signal_handler_class

        cfg, job_id = self.cfg, _job_id()
        if hasattr(stopped, "stopped_step"):
            step, names = stopped.stopped_step, list(stopped.signals)
        else:
            step, names = stopped.step, [signal.Signals(s).name for s in stopped.stop_signals]
        if signal.Signals(usr_sig).name not in names:
            log.warning("stopped at step %s by %s with a checkpoint; not requeuing: SIGTERM means scancel, or a "
                        "preemption that SLURM requeues by itself (PreemptMode=REQUEUE). To resume by hand: %s",
                        step, ", ".join(names) or "another rank's signal", self._resume_hint())
            return
        handler = signal.getsignal(usr_sig)
        if not isinstance(getattr(handler, "__self__", None), submitit_signal_handler_class()):
            log.warning("stopped at step %s; not running under submitit, so nothing requeues this job: "
                        "start it again to resume", step)
            return
        if read_requeues(cfg.output_dir, job_id) >= cfg.slurm.max_requeues:
            self._log_cap(job_id, step)
            return
        # From here on a second signal must not re-enter submitit's handler.
        for sig in {signal.SIGTERM, signal.SIGUSR1, usr_sig}:
            signal.signal(sig, _ignore_late_signal)
        log.info("stopped at step %s with a checkpoint; handing over to submitit to requeue job %s (its log line "
                 "names %s whichever signal SLURM sent)", step, job_id, signal.Signals(usr_sig).name)
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


