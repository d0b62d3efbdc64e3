"""The login-node side of the launcher: ``tools/submit.py`` checks a config and submits it through submitit.

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

What the job does once it runs (signals, checkpoint, requeue) is :mod:`maescale.launch.job`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from maescale.config import Config, ConfigError, apply_overrides, config_from_dict, load_yaml_with_bases, \
    parse_slurm_time, set_dotted
from maescale.exitcodes import BAD_INPUT, CRASHED, OK, PREEMPTED
from maescale.launch.job import TrainJob
from maescale.rundir import RunDir, describe_owner, lock_status

# Command-line flag -> key of the config's slurm section.
FLAG_KEYS = {
    "nodes": "nodes", "gpus_per_node": "gpus_per_node", "partition": "partition", "account": "account",
    "qos": "qos", "time": "time", "constraint": "constraint", "mem": "mem", "cpus_per_task": "cpus_per_task",
    "job_name": "job_name", "exclude": "exclude", "comment": "comment",
}


class LaunchError(ValueError):
    """A problem with the submission request, naming the flag or config key responsible."""


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
    apply_overrides(raw, args.overrides)
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
        run = RunDir(cfg.output_dir)
        if run.has_checkpoints():
            raise _launch_error(f"resume=false but {run.checkpoints} already holds checkpoints: pick a new output_dir, or "
                                "resume=true to continue that run", "resume")
    if local and s.nodes != 1:
        raise _launch_error(f"got {s.nodes}; --local runs on this machine only: use --nodes 1", "slurm.nodes")


def check_not_in_use(cfg: Config) -> None:
    """Refuse to submit onto a run directory that a live job holds (its heartbeat is fresh by this
    host's clock), or that a job submitted for it still waits for in the queue (a requeued job
    holds no lock while it is pending): the new job would only wait for it, then fail.
    ``lock.takeover=true`` overrides."""
    if cfg.lock.takeover:
        return
    held = lock_status(RunDir(cfg.output_dir), fresh_s=cfg.lock.stale_s)
    if held is not None:
        age = held.get("heartbeat_age_s")
        beat = f"last heartbeat {age:.0f} s ago" if age is not None else "just started"
        raise _launch_error(f"{cfg.output_dir} is in use by {describe_owner(held)}, {beat}. Wait for that job to "
                            f"finish or cancel it; if it is gone, submit with lock.takeover=true", "output_dir")
    queued = queued_jobs(RunDir(cfg.output_dir))
    if queued:
        listed = ", ".join(f"{job} ({state})" for job, state in queued)
        raise _launch_error(f"{cfg.output_dir} belongs to job(s) still in SLURM's queue: {listed}. It resumes by "
                            f"itself when it starts; scancel it first to submit anew, or submit with "
                            f"lock.takeover=true", "output_dir")


def recorded_job_ids(run: RunDir) -> list[str]:
    """The SLURM job ids submitted for a run directory (submitit's ``<id>_submitted.pkl`` files and
    the supervisor's ``requeues.json``)."""
    ids = {p.name.split("_", 1)[0] for p in run.slurm.glob("*_submitted.pkl")} if run.slurm.is_dir() else set()
    try:
        import json

        recorded = json.loads((run.slurm / "requeues.json").read_text()).get("job_id")
        if recorded:
            ids.add(str(recorded))
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(i for i in ids if i.isdigit())


def queued_jobs(run: RunDir) -> list[tuple[str, str]]:
    """(job id, state) of this run directory's jobs that ``squeue`` still lists; [] where there
    is no squeue (not a SLURM login node) or it fails."""
    import shutil
    import subprocess

    ids = recorded_job_ids(run)
    if not ids or shutil.which("squeue") is None:
        return []
    try:
        proc = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ids and parts[1] not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"):
            found.append((parts[0], parts[1]))
    return found


def _repo_root() -> Path:
    import maescale

    return Path(maescale.__file__).resolve().parents[1]


def tasks_per_node(cfg: Config) -> int:
    """One process per GPU; a CPU-only job (gpus_per_node=0) runs one process per node."""
    return max(1, cfg.slurm.gpus_per_node)


def omp_threads(cfg: Config) -> int:
    """Threads for torch's CPU ops in a training task: its cores minus the data workers' (at least 1)."""
    from maescale.config import resolve_num_workers

    return max(1, cfg.slurm.cpus_per_task - resolve_num_workers(cfg.data.num_workers, cfg.slurm.cpus_per_task))


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
        # The job runs its supervisor in the batch step; the supervisor starts the training with
        # srun itself, and again after a failure (maescale.launch.supervisor).
        "use_srun": False,
        "setup": [*s.setup,
                  # The job must import this very checkout of maescale, wherever sbatch starts it.
                  f"export PYTHONPATH={shlex.quote(str(_repo_root()))}${{PYTHONPATH:+:$PYTHONPATH}}",
                  # torch's intra-op threads: the task's cores minus its data workers (a site's value wins)
                  f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{omp_threads(cfg)}}}"],
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
        # SlurmExecutor refuses to exist where its public ``affinity()`` finds no srun; a dry run
        # only renders the script, so it answers as a cluster would.
        cls = type("DryRunSlurmExecutor", (SlurmExecutor,), {"affinity": classmethod(lambda c: 2)})
    executor = cls(folder=RunDir(cfg.output_dir).slurm, max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**sbatch_parameters(cfg))
    return executor


def sbatch_script(cfg: Config) -> str:
    """The sbatch script submitit would submit for ``cfg`` (its own ``_make_submission_file_text``)."""
    from maescale.compat import render_sbatch_script

    return render_sbatch_script(make_slurm_executor(cfg, check_srun=False))


def submit(cfg: Config):
    """Create the run directory, save the config, submit one :class:`TrainJob`; returns submitit's job."""
    executor = make_slurm_executor(cfg)  # raises RuntimeError without srun, before touching the disk
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(RunDir(out).config)
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
        return BAD_INPUT
    out = Path(cfg.output_dir)
    logs = RunDir(out).slurm
    if not args.dry_run:
        try:
            check_not_in_use(cfg)
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return BAD_INPUT
    if args.local:
        return _run_local(cfg, explicit_gpus=args.gpus_per_node is not None)
    if args.dry_run:
        print(sbatch_script(cfg), end="")
        print(f"\n# dry run: nothing submitted. Would run {_describe(cfg)}.\n"
              f"# run directory {out}; logs {logs}/<jobid>_<task>_log.out|.err\n")
        from maescale.planning.plan import format_plan, make_plan  # the plan of tools/plan.py

        print(format_plan(make_plan(cfg, " ".join([args.config, *args.overrides]))))
        return OK
    try:
        job = submit(cfg)
    except RuntimeError as exc:
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        if isinstance(exc, (FailedJobError, FailedSubmissionError)):
            print(f"error: sbatch failed: {exc}", file=sys.stderr)
            return CRASHED
        print(f"error: {exc} (this needs a SLURM login node; --dry-run prints the script, --local runs "
              "the job here)", file=sys.stderr)
        return BAD_INPUT
    jid = job.job_id
    print(f"submitted job {jid}: {_describe(cfg)}\n"
          f"  run directory:  {out}\n"
          f"  config:         {out / 'config.yaml'}\n"
          f"  SLURM logs:     {logs}/{jid}_<task>_log.out|.err (rank 0: {logs / f'{jid}_0_log.err'})\n"
          f"  training log:   {out / 'logs' / 'train.log'}\n"
          f"  watch:          squeue -j {jid}    tail -f {shlex.quote(str(logs / f'{jid}_0_log.err'))}\n"
          f"  TensorBoard:    tensorboard --logdir {shlex.quote(str(out / 'tensorboard'))}\n"
          f"  cancel:         scancel {jid}")
    return OK


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
    folder = RunDir(out).slurm
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(RunDir(out).config)
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
        return CRASHED
    if result.status == "finished":
        print(f"finished {result.step} steps; run directory {result.output_dir}; checkpoint {result.last_checkpoint}")
        return OK
    print(f"stopped at step {result.step} by a signal (not requeued); checkpoint {result.last_checkpoint}; "
          "run the same command again to resume")
    return PREEMPTED


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
