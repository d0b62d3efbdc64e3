"""The job's supervisor: runs the training as ``srun`` steps inside the allocation and restarts it
there after an infrastructure failure, requeues after a preemption or at the time limit.

The submitted job (``tools/submit.py``: submitit runs :class:`maescale.launch.job.TrainJob` in the
batch step, ``use_srun=False``; ``slurm/train.sbatch``: ``python -m maescale.launch.supervisor``)
is one small process on the first node. It starts the training as one ``srun`` step over the whole
allocation, one task per GPU (:mod:`maescale.launch.task`), with ``--kill-on-bad-exit=1``: the
moment any task dies (a CUDA error, an Xid, the OOM killer, a lost rank, rank 0 included), srun
kills the others, so survivors never wait for the 30-minute collective timeout; a rank that hangs
is ended by its stall watchdog (:mod:`maescale.watchdog`) with exit code 4. Then the supervisor
reads what happened (srun's own error lines name the first task that failed and its host; each
task's exit record; the stall reports; each rank's last step) and decides:

* **finished** -> done;
* **preempted** (every task stopped on a signal after writing a checkpoint): after submitit's
  time-limit signal, requeue through submitit's own handler (timed-out or preempted, counted
  against ``slurm.max_requeues``); after SIGTERM, nothing (``scancel``, or a preemption that SLURM
  requeues itself);
* **bad input** (config, data, divergence, lock: exit code 2 on a task) -> stop with the reason;
* **crash / stall** -> a new ``srun`` step in the same allocation (the nodes are already held:
  seconds, not the queue), which resumes from ``latest``; at most ``slurm.max_failures`` times
  per job. A failure that repeats at the same step (within one step) stops the job with the
  reason instead of burning the allocation. When ``slurm.exclude_failed_nodes`` is on and the
  failure is a host's (it reads as the node's own, or the host failed before in this job, and
  the partition can spare it: launch/nodes.py), the job is requeued without that host instead
  (``scontrol requeuehold``, ``scontrol update ExcNodeList=...``, ``scontrol release``): it waits
  SLURM's ``BeginTime`` hold and the queue, but does not meet the bad node again.

Every decision is one line in the training log and an event in ``RUN/slurm/requeues.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from maescale.exitcodes import BAD_INPUT, CRASHED, OK, PREEMPTED, STALLED
from maescale.launch.nodes import Exclusion, Query, exclusion_commands, is_node_fault, plan_exclusion, run_query
from maescale.rundir import RunDir, write_json_atomic

log = logging.getLogger("maescale.launch")

REQUEUE_FILE = "requeues.json"
KEEP_ATTEMPTS = 20  # attempt directories kept in RUN/attempts
_SRUN_ERROR = re.compile(r"^srun: error: (?P<host>\S+): tasks? (?P<tasks>[\d,\- ]+): (?P<what>.+)$")
_SRUN_NODE_FAIL = re.compile(r"^srun: error: Node failure on (?P<hosts>\S+)$")  # srun's own (with --no-kill)


# --------------------------------------------------------------------------------------------
# The record: RUN/slurm/requeues.json
# --------------------------------------------------------------------------------------------


def _read_record(output_dir: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads((RunDir(output_dir).slurm / REQUEUE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def job_record(output_dir: str | os.PathLike, job_id: str) -> dict[str, Any]:
    """This job's record (a new submission on the same run directory starts a new one)."""
    data = _read_record(output_dir)
    if str(data.get("job_id")) != str(job_id):
        return {"job_id": str(job_id), "requeues": 0, "failures": 0, "history": []}
    data.setdefault("requeues", 0)
    data.setdefault("failures", 0)
    data.setdefault("history", [])
    return data


def add_event(output_dir: str | os.PathLike, job_id: str, kind: str, *, failure: bool = False,
              **fields: Any) -> dict[str, Any]:
    """Append an event (``requeue``, ``restart``, ``stop``) to the job's record. A ``restart``, or
    any event with ``failure``, counts against ``slurm.max_failures``; a ``requeue`` without it
    (preemption, time limit) against ``slurm.max_requeues``. Returns the record."""
    data = job_record(output_dir, job_id)
    if kind == "restart" or failure:
        data["failures"] += 1
    elif kind == "requeue":
        data["requeues"] += 1
    data["history"].append({"event": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})
    write_json_atomic(RunDir(output_dir).slurm / REQUEUE_FILE, data, indent=1)
    return data


# --------------------------------------------------------------------------------------------
# What one attempt came to
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one ``srun`` step of the training ended."""

    kind: str  # finished | preempted | bad_input | crash | stall | cancelled
    returncode: int
    reason: str
    step: int | None = None  # where it failed (the failing rank's step, else the furthest rank's)
    culprits: list[dict[str, Any]] = field(default_factory=list)  # {"rank", "host", "what"}
    signals: list[str] = field(default_factory=list)  # rank 0's stop signals (preempted)
    stopped_step: int | None = None
    node_fault: bool = False  # srun or the culprit's error reads as the node's own (launch/nodes.py)

    @property
    def hosts(self) -> list[str]:
        return sorted({c["host"] for c in self.culprits if c.get("host")})


def parse_srun_errors(text: str) -> list[dict[str, Any]]:
    """srun's ``srun: error: HOST: task N: WHAT`` lines, in order, one entry per task."""
    found = []
    for line in text.splitlines():
        m = _SRUN_ERROR.match(line.strip())
        if not m:
            continue
        for part in m.group("tasks").replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit():
                continue
            for task in range(int(lo), int(hi or lo) + 1):
                found.append({"rank": task, "host": m.group("host"), "what": m.group("what")})
    return found


def classify(output_dir: str | os.PathLike, attempt_id: str, returncode: int, srun_stderr: str,
             world_size: int, cancelled: bool) -> Outcome:
    """Read what an attempt left behind (see the module docstring) and name its outcome."""
    from maescale.launch.task import attempt_dir
    from maescale.watchdog import iter_reports, read_steps

    adir = attempt_dir(output_dir, attempt_id)
    records = {}
    for path in adir.glob("rank_*.exit.json"):
        try:
            r = json.loads(path.read_text())
            records[int(r["rank"])] = r
        except (OSError, ValueError, KeyError):
            continue
    steps = read_steps(adir / "progress")
    statuses = {r["status"] for r in records.values()}
    errors = parse_srun_errors(srun_stderr)
    stalls = list(iter_reports(output_dir, attempt_id))
    rank0 = records.get(0, {})
    if returncode == 0 and len(records) == world_size and statuses == {"finished"}:
        return Outcome("finished", returncode, "finished", step=rank0.get("step"))
    if "bad_input" in statuses:
        bad = next(r for r in records.values() if r["status"] == "bad_input")
        return Outcome("bad_input", returncode, f"rank {bad['rank']} stopped on bad input: {bad.get('error')}",
                       step=bad.get("step"), culprits=[{"rank": bad["rank"], "host": bad.get("host"), "what": "bad input"}])
    if statuses <= {"preempted", "finished"} and "preempted" in statuses and len(records) == world_size:
        return Outcome("preempted", returncode, "stopped on a signal with a checkpoint", signals=rank0.get("signals", []),
                       stopped_step=rank0.get("step"))
    if cancelled:
        return Outcome("cancelled", returncode, "the job was cancelled (SIGTERM) while its tasks were failing",
                       stopped_step=rank0.get("step"))
    # A failure. The first task srun names is where it began (the others were killed after it).
    first = [e for e in errors if "Killed" not in e["what"] or e is errors[0]][:1] if errors else []
    lost = [{"rank": None, "host": m.group("hosts"), "what": "node failure"}
            for m in (_SRUN_NODE_FAIL.match(line.strip()) for line in srun_stderr.splitlines()) if m]
    culprits = lost or first
    if stalls:
        named = [r for report in stalls for r in report.get("stalled", [])]
        culprits = [{"rank": r["rank"], "host": r["host"], "what": f"no progress in step {r['step'] + 1}, phase "
                     f"{r['phase']!r}"} for r in {r["rank"]: r for r in named}.values()] or culprits
    crashed = [r for r in records.values() if r["status"] == "crashed"]
    if crashed and not culprits:
        culprits = [{"rank": r["rank"], "host": r.get("host"), "what": r.get("error")} for r in crashed]
    step = None
    if culprits and all(c["rank"] in steps for c in culprits):
        step = min(steps[c["rank"]] for c in culprits)
    elif steps:
        step = max(steps.values())
    kind = "stall" if stalls or any(f"exit code {STALLED}" in e["what"] for e in errors) else "crash"
    who = "; ".join(f"{'node' if c['rank'] is None else 'rank ' + str(c['rank']) + ' on'} {c.get('host') or '?'} "
                    f"({c.get('what')})" for c in culprits) or \
        f"srun exited with {returncode}, no task named"
    if kind == "stall":
        dump = RunDir(output_dir).path / "stalls" / attempt_id
        reason = f"a stall: {who}; stacks in {dump}"
    else:
        # the culprit's own error, if it lived to write one (the others' are the consequence)
        own = next((r.get("error") for r in crashed if any(c["rank"] == r["rank"] for c in culprits)), None)
        reason = f"a crash: {who}" + (f"; {own}" if own else "")
    if step is not None:
        reason += f", during step {step + 1}"
    node_fault = is_node_fault([srun_stderr, *(r.get("error") for r in crashed)])
    return Outcome(kind, returncode, reason, step=step, culprits=culprits, node_fault=node_fault)


# --------------------------------------------------------------------------------------------
# The supervisor
# --------------------------------------------------------------------------------------------


@dataclass
class SlurmJob:
    """Where the supervisor runs: SLURM's view of the allocation."""

    job_id: str
    restart: int  # SLURM_RESTART_COUNT (requeues so far)
    nodes: int
    tasks_per_node: int
    cpus_per_task: int | None
    gpus_per_node: int

    @classmethod
    def from_env(cls, cfg: Any, environ: dict[str, str] | None = None) -> "SlurmJob":
        env = os.environ if environ is None else environ
        cpus = env.get("SLURM_CPUS_PER_TASK")
        return cls(job_id=env.get("SLURM_JOB_ID", "local"), restart=int(env.get("SLURM_RESTART_COUNT") or 0),
                   nodes=int(env.get("SLURM_JOB_NUM_NODES") or cfg.slurm.nodes),
                   tasks_per_node=max(1, cfg.slurm.gpus_per_node),
                   cpus_per_task=int(cpus) if cpus else cfg.slurm.cpus_per_task, gpus_per_node=cfg.slurm.gpus_per_node)


def srun_command(job: SlurmJob, config_path: Path, log_dir: Path, python: str = sys.executable) -> list[str]:
    """The ``srun`` of one attempt: every task of the allocation, one training process each."""
    cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={job.nodes}", f"--ntasks={job.nodes * job.tasks_per_node}",
           f"--ntasks-per-node={job.tasks_per_node}", "--open-mode=append",
           "--output", str(log_dir / "%j_rank%t.out"), "--error", str(log_dir / "%j_rank%t.err")]
    if job.cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05)
        cmd.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.gpus_per_node:
        cmd.append(f"--gpus-per-node={job.gpus_per_node}")
    return cmd + [python, "-u", "-m", "maescale.launch.task", str(config_path)]


class Supervisor:
    """Runs, watches and restarts the training of one SLURM job (see the module docstring).

    ``requeue(reason)`` is how this job requeues itself after its time-limit signal (submitit's
    handler, or ``scontrol requeue`` for the plain sbatch script); ``run_command`` runs the
    exclusion's ``scontrol`` calls and ``query`` asks SLURM about the job and its partition
    (tests pass a recorder and the answers SLURM would give).
    """

    def __init__(self, cfg: Any, job: SlurmJob, config_path: Path, requeue: Callable[[Outcome], None],
                 run_command: Callable[[list[str]], Any] = run_query, query: Query = run_query):
        self.cfg, self.job, self.config_path = cfg, job, config_path
        self.requeue, self.query = requeue, query
        self.run_command = run_command
        self.run = RunDir(cfg.output_dir)
        self.cancelled = False
        self.attempt = 0
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ signals
    def install_signals(self) -> None:
        """SIGTERM (``scancel``, a preemption) reaches the tasks from SLURM itself: here it only
        means "do not restart". The time-limit signal goes to the tasks, not to this process."""
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.cancelled = True
        log.warning("supervisor: SIGTERM (scancel or preemption): the tasks checkpoint and stop; no restart")

    # ------------------------------------------------------------------ the loop
    def run_job(self) -> Outcome:
        """Attempts until the training finishes, stops, or must not be restarted."""
        record = job_record(self.cfg.output_dir, self.job.job_id)
        last_failure: Outcome | None = None
        while True:
            outcome = self.run_attempt()
            if outcome.kind in ("finished", "bad_input", "cancelled"):
                if outcome.kind == "finished":
                    log.info("supervisor: the training finished (attempt %d)", self.attempt)
                if outcome.kind == "bad_input":
                    log.error("supervisor: not restarting: %s", outcome.reason)
                    add_event(self.cfg.output_dir, self.job.job_id, "stop", reason=outcome.reason,
                              attempt=self.attempt)
                return outcome
            if outcome.kind == "preempted":
                self._preempted(outcome)
                return outcome
            # a crash or a stall
            record = job_record(self.cfg.output_dir, self.job.job_id)
            stop = None
            if self.cancelled:
                stop = "the job was cancelled"
            elif record["failures"] >= self.cfg.slurm.max_failures:
                stop = f"{record['failures']} restarts already (slurm.max_failures={self.cfg.slurm.max_failures})"
            elif last_failure is not None and outcome.step is not None and last_failure.step is not None and \
                    abs(outcome.step - last_failure.step) <= 1:
                stop = (f"it failed again during step {outcome.step + 1} (the previous attempt during step "
                        f"{last_failure.step + 1}): a failure that repeats at the same step is not an accident; "
                        "see the logs and the stacks")
            if stop is not None:
                log.error("supervisor: attempt %d ended in %s; not restarting: %s", self.attempt, outcome.reason, stop)
                add_event(self.cfg.output_dir, self.job.job_id, "stop", reason=f"{outcome.reason}; {stop}",
                          attempt=self.attempt, step=outcome.step, hosts=outcome.hosts)
                outcome.reason = f"{outcome.reason}; not restarted: {stop}"
                return outcome
            if self.cfg.slurm.exclude_failed_nodes and outcome.hosts and self.job.nodes > 1:
                plan = plan_exclusion(self.job.job_id, self.job.nodes, outcome.hosts, outcome.node_fault,
                                      record["history"], self.query)
                if plan.exclude is not None:
                    self._requeue_without(outcome, plan)
                    return outcome
                log.info("supervisor: not leaving %s out: %s", ",".join(outcome.hosts), plan.why)
            add_event(self.cfg.output_dir, self.job.job_id, "restart", reason=outcome.reason, attempt=self.attempt,
                      step=outcome.step, hosts=outcome.hosts)
            record = job_record(self.cfg.output_dir, self.job.job_id)
            log.warning("supervisor: attempt %d ended in %s; restarting inside the allocation (restart %d/%d; it "
                        "resumes from the latest checkpoint)", self.attempt, outcome.reason, record["failures"],
                        self.cfg.slurm.max_failures)
            last_failure = outcome
            self.attempt += 1

    def attempt_id(self) -> str:
        return f"{self.job.job_id}-r{self.job.restart}-a{self.attempt}"

    def run_attempt(self) -> Outcome:
        """One ``srun`` of the training; returns how it ended."""
        attempt_id = self.attempt_id()
        self._prune_attempts()
        cmd = srun_command(self.job, self.config_path, self.run.slurm)
        env = {**os.environ, "MAESCALE_ATTEMPT": str(self.attempt), "MAESCALE_ATTEMPT_ID": attempt_id}
        log.info("supervisor: attempt %d (%s): %s", self.attempt, attempt_id, shlex.join(cmd))
        t0 = time.monotonic()
        self._proc = subprocess.Popen(cmd, env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        stderr = self._tee(self._proc)
        returncode = self._proc.wait()
        outcome = classify(self.cfg.output_dir, attempt_id, returncode, stderr, self.job.nodes * self.job.tasks_per_node,
                           self.cancelled)
        log.info("supervisor: attempt %d ended after %.0f s: %s (srun exit %d)", self.attempt,
                 time.monotonic() - t0, outcome.kind, returncode)
        return outcome

    @staticmethod
    def _tee(proc: subprocess.Popen) -> str:
        """srun's own messages: copied to this process's stderr as they come, and kept."""
        lines: list[str] = []

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                sys.stderr.write(line)
                sys.stderr.flush()

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        proc.wait()
        t.join(timeout=10)
        return "".join(lines)

    def _preempted(self, outcome: Outcome) -> None:
        """Every task stopped on a signal with a checkpoint: ``requeue`` decides by the signals
        (the time-limit signal requeues; SIGTERM alone does not)."""
        if self.cancelled and "SIGTERM" not in outcome.signals:
            outcome.signals.append("SIGTERM")  # the supervisor's own: this job is being cancelled
        self.requeue(outcome)

    def _requeue_without(self, outcome: Outcome, plan: Exclusion) -> None:
        hosts = outcome.hosts
        add_event(self.cfg.output_dir, self.job.job_id, "requeue", reason=outcome.reason, attempt=self.attempt,
                  step=outcome.step, hosts=hosts, excluded=plan.exclude, failure=True)
        log.warning("supervisor: attempt %d ended in %s; requeueing job %s without %s (%s; "
                    "slurm.exclude_failed_nodes)", self.attempt, outcome.reason, self.job.job_id, ",".join(hosts),
                    plan.why)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue signals this job: finish the exclusion first
        for cmd in exclusion_commands(self.job.job_id, plan.exclude):
            try:
                self.run_command(cmd)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                log.error("supervisor: %s failed (%s); resubmit with --exclude %s: %s", shlex.join(cmd), exc,
                          ",".join(hosts), resume_hint(self.cfg))
                return

    def _prune_attempts(self) -> None:
        from maescale.watchdog import prune_attempts

        prune_attempts(self.run.path, KEEP_ATTEMPTS)


def _time_limit_signal_name() -> str:
    from maescale.launch.task import time_limit_signal

    return signal.Signals(time_limit_signal()).name


def resume_hint(cfg: Any) -> str:
    """The command that resumes a stopped run by hand."""
    cmd = f"python tools/submit.py {shlex.quote(str(Path(cfg.output_dir) / 'config.yaml'))}"
    return cmd if cfg.resume is True else cmd + " resume=true"


def setup_supervisor_logging(run: RunDir) -> None:
    """The supervisor logs to its stderr and to the run's training log, beside rank 0."""
    root = logging.getLogger("maescale")
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [supervisor {socket.gethostname()}] %(levelname)s %(name)s: %(message)s",
                            "%H:%M:%S")
    for h in list(root.handlers):
        if getattr(h, "_maescale", False):
            root.removeHandler(h)
            h.close()
    run.logs.mkdir(parents=True, exist_ok=True)
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(run.train_log)):
        h.setFormatter(fmt)
        h._maescale = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


def exit_code(outcome: Outcome) -> int:
    """The batch step's exit code for an outcome (what SLURM records for the job)."""
    return {"finished": OK, "preempted": PREEMPTED, "cancelled": PREEMPTED, "bad_input": BAD_INPUT}.get(
        outcome.kind, CRASHED)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m maescale.launch.supervisor CONFIG [key=value ...]`` inside an sbatch allocation
    (``slurm/train.sbatch``): the same supervision without submitit; requeues with ``scontrol``."""
    from maescale.config import ConfigError, load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m maescale.launch.supervisor CONFIG [key=value ...]", file=sys.stderr)
        return BAD_INPUT
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    job = SlurmJob.from_env(cfg)
    run = RunDir(cfg.output_dir)
    setup_supervisor_logging(run)
    config_path = write_job_config(cfg, job.job_id)

    def requeue(outcome: Outcome) -> None:
        if _time_limit_signal_name() not in outcome.signals or "SIGTERM" in outcome.signals and supervisor.cancelled:
            log.warning("stopped at step %s by %s with a checkpoint; not requeuing: SIGTERM means scancel, or a "
                        "preemption that SLURM requeues by itself (PreemptMode=REQUEUE). To resume by hand: "
                        "sbatch slurm/train.sbatch %s", outcome.stopped_step, ", ".join(outcome.signals) or "a signal",
                        shlex.join(args))
            return
        record = job_record(cfg.output_dir, job.job_id)
        if record["requeues"] >= cfg.slurm.max_requeues:
            log.error("not requeuing job %s: requeued %d times already (slurm.max_requeues=%d); resume by hand: %s",
                      job.job_id, record["requeues"], cfg.slurm.max_requeues, resume_hint(cfg))
            return
        add_event(cfg.output_dir, job.job_id, "requeue", reason="time limit or preemption notice",
                  step=outcome.stopped_step)
        log.warning("requeueing job %s; it will resume from step %s", job.job_id, outcome.stopped_step)
        subprocess.run(["scontrol", "requeue", job.job_id], check=False, timeout=60)

    supervisor = Supervisor(cfg, job, config_path, requeue)
    supervisor.install_signals()
    return exit_code(supervisor.run_job())


def write_job_config(cfg: Any, job_id: str) -> Path:
    """The resolved config the tasks load (``RUN/slurm/job_<id>.yaml``), with ``resume: true``:
    every attempt after the first must continue the run."""
    import dataclasses

    path = RunDir(cfg.output_dir).slurm / f"job_{job_id}.yaml"
    resumable = cfg if cfg.resume is not False else dataclasses.replace(cfg, resume=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    resumable.save(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
