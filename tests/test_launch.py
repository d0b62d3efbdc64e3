"""The SLURM launcher against REAL submitit, with fake sbatch/squeue/sacct/scancel/scontrol/srun.

The fakes (tests/fake_slurm/) record their arguments and every submitted script into
``$FAKE_SLURM_DIR`` and answer like SLURM; nothing in submitit is mocked.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from maescale.distributed import port_for_job
from maescale.config import load_config
from maescale.exitcodes import PREEMPTED as EXIT_PREEMPTED
from maescale.launch.job import TrainJob, _ignore_late_signal, prepare_dist_env, read_requeues, record_requeue
from maescale.launch.submit import submit, submit_main
from maescale.rundir import RunDir


REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_slurm"
TINY = REPO / "configs" / "tiny.yaml"


class Fake:
    """What the fake SLURM commands recorded."""

    def __init__(self, root: Path):
        self.root = root

    def calls(self, cmd: str | None = None) -> list[list[str]]:
        path = self.root / "calls.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["argv"] for r in rows if cmd is None or r["cmd"] == cmd]

    def script(self, n: int = 0) -> str:
        return (self.root / f"sbatch_{n}.sh").read_text()


def _path_with_fakes() -> str:
    return os.pathsep.join([str(FAKE), str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Fake:
    rec = tmp_path / "fake_slurm_calls"
    monkeypatch.setenv("PATH", _path_with_fakes())
    monkeypatch.setenv("FAKE_SLURM_DIR", str(rec))
    return Fake(rec)


# SLURM's user commands (slurm-client): hidden by ``no_slurm`` even where they are installed.
SLURM_COMMANDS = frozenset({"srun", "sbatch", "salloc", "squeue", "scancel", "scontrol", "sacct", "sacctmgr", "sinfo",
                            "sattach", "sbcast", "scrontab", "sdiag", "sprio", "sreport", "sshare", "sstat",
                            "strigger", "sview", "sh5util"})


@pytest.fixture
def no_slurm(tmp_path, monkeypatch) -> Fake:
    """A machine without SLURM: no srun/sbatch on PATH (a login node this is not).

    The system's commands stay reachable through links in a folder of our own, minus SLURM's:
    the machine may have SLURM installed (the real-controller tests install it, tests/slurm/)."""
    rec = tmp_path / "fake_slurm_calls"
    system = tmp_path / "system_bin"
    system.mkdir()
    for folder in (Path("/usr/bin"), Path("/bin")):
        for exe in folder.iterdir() if folder.is_dir() else ():
            link = system / exe.name
            if exe.name not in SLURM_COMMANDS and not link.exists() and not link.is_symlink():
                link.symlink_to(exe)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), str(system)]))
    monkeypatch.setenv("FAKE_SLURM_DIR", str(rec))
    return Fake(rec)


def write_config(tmp_path: Path, out: Path | None = None, **slurm) -> Path:
    raw = {"base": str(TINY), "output_dir": str(out or tmp_path / "run"),
           "slurm": {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 12, "partition": "cfgpart",
                     "time": "04:00:00", "account": "acct", "signal_delay_s": 240, **slurm}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sbatch_options(script: str) -> dict[str, str | bool]:
    """The options sbatch reads from a script's #SBATCH lines, parsed the way sbatch parses them.

    (src/sbatch/opt.c, ``_get_argument``: whitespace separates arguments; single or double quotes
    group, and quoted parts concatenate as in the shell; a backslash escapes the next character;
    an unquoted ``#`` starts a comment. Parsing stops at the first line that is not a comment.)
    """
    opts: dict[str, str | bool] = {}
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        if not line.startswith("#SBATCH"):
            continue
        rest, args = line[len("#SBATCH"):], []
        i = 0
        while i < len(rest):
            while i < len(rest) and rest[i].isspace():
                i += 1
            if i >= len(rest) or rest[i] == "#":
                break
            arg, quote = "", None
            while i < len(rest) and (quote or not rest[i].isspace()):
                c = rest[i]
                if c == "\\":
                    arg += rest[i + 1]
                    i += 2
                    continue
                if quote:
                    if c == quote:
                        quote = None
                    else:
                        arg += c
                elif c in "\"'":
                    quote = c
                elif c == "#":
                    break
                else:
                    arg += c
                i += 1
            assert quote is None, f"unmatched quote in {line!r}"
            args.append(arg)
        for arg in args:
            key, eq, value = arg.partition("=")
            opts[key.lstrip("-")] = value if eq else True
    return opts


# --------------------------------------------------------------------------------------------
# The sbatch script submitit writes
# --------------------------------------------------------------------------------------------


def test_submit_writes_the_right_sbatch_script(tmp_path, fake_slurm, capsys):
    out = tmp_path / "run"
    cfg_path = write_config(tmp_path, out, mem="480G", constraint="h100", qos="high", max_requeues=7)
    rc = submit_main([str(cfg_path), "train.max_steps=50"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert [c[-1].endswith(".sh") for c in fake_slurm.calls("sbatch")] == [True]
    opts = sbatch_options(fake_slurm.script())
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
    assert opts["cpus-per-task"] == "12" and opts["time"] == "240" and opts["partition"] == "cfgpart"
    assert opts["account"] == "acct" and opts["qos"] == "high" and opts["constraint"] == "h100"
    assert opts["mem"] == "480G" and opts["signal"] == "USR2@240" and opts["requeue"] is True
    assert opts["job-name"] == "maescale" and "wckey" not in opts
    assert opts["output"] == f"{out}/slurm/%j_0_log.out" and opts["error"] == f"{out}/slurm/%j_0_log.err"
    # submitit's srun line runs the pickled job; the setup puts this checkout on PYTHONPATH
    script = fake_slurm.script()
    assert f"-m submitit.core._submit {out}/slurm" in script
    assert f"export PYTHONPATH={REPO}" in script
    # printed: job id, run directory, logs
    assert "submitted job 12345" in printed and f"run directory:  {out}" in printed
    assert f"{out}/slurm/12345_0_log.err" in printed and "scancel 12345" in printed
    # resolved config saved in the run directory, and the same config pickled in the job
    saved = load_config(out / "config.yaml")
    assert saved.train.max_steps == 50 and saved.slurm.nodes == 2 and saved.slurm.max_requeues == 7
    from submitit.core.utils import DelayedSubmission

    delayed = DelayedSubmission.load(out / "slurm" / "12345_submitted.pkl")
    assert isinstance(delayed.function, TrainJob) and hasattr(delayed.function, "checkpoint")
    assert delayed.function.cfg == saved
    assert delayed._timeout_min == 240 and delayed._timeout_countdown == 7  # submitit's own cap = ours


def test_flags_beat_the_config_and_are_saved(tmp_path, fake_slurm, capsys):
    out = tmp_path / "run"
    rc = submit_main([str(write_config(tmp_path, out)), "--nodes", "3", "--partition", "flagpart", "--time", "90",
                      "--gpus-per-node", "4", "--cpus-per-task", "10", "--account", "other", "--qos", "low",
                      "--constraint", "a100", "--mem", "0", "--exclude", "node[017,023]", "--comment", "ablation 3",
                      "--job-name", "vit-h"])
    assert rc == 0, capsys.readouterr()
    opts = sbatch_options(fake_slurm.script())
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"], opts["cpus-per-task"]) == ("3", "4", "4", "10")
    assert (opts["partition"], opts["time"], opts["account"], opts["qos"]) == ("flagpart", "90", "other", "low")
    assert (opts["constraint"], opts["mem"], opts["exclude"]) == ("a100", "0", "node[017,023]")
    assert (opts["comment"], opts["job-name"]) == ("ablation 3", "vit-h")
    s = load_config(out / "config.yaml").slurm
    assert (s.nodes, s.partition, s.time, s.gpus_per_node, s.cpus_per_task, s.comment) == \
        (3, "flagpart", "90", 4, 10, "ablation 3")


def test_hh_mm_ss_time_and_cpu_only_job(tmp_path, fake_slurm, capsys):
    assert submit_main([str(write_config(tmp_path)), "--time", "1-02:30:00", "--gpus-per-node", "0"]) == 0
    opts = sbatch_options(fake_slurm.script())
    assert opts["time"] == str(26 * 60 + 30)
    assert opts["ntasks-per-node"] == "1" and "gpus-per-node" not in opts


def test_dry_run_submits_nothing_and_needs_no_slurm(tmp_path, no_slurm, capsys):
    out = tmp_path / "run"
    rc = submit_main([str(write_config(tmp_path, out)), "--dry-run", "--nodes", "5"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.startswith("#!/bin/bash") and "#SBATCH --nodes=5" in printed and "#SBATCH --requeue" in printed
    assert "nothing submitted" in printed
    assert no_slurm.calls() == [] and not out.exists()


# --------------------------------------------------------------------------------------------
# Errors: before submission, naming the flag or key, exit 2, sbatch never called
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["--nodes", "0"], "--nodes 0"),
    (["--time", "garbage"], "--time 'garbage'"),
    (["--time", "2"], "slurm.signal_delay_s"),  # 240 s delay in a 2-minute job
    (["--gpus-per-node", "-1"], "--gpus-per-node -1"),
    (["--cpus-per-task", "0"], "--cpus-per-task 0"),
    (["--mem", "lots"], "--mem 'lots'"),
    (["--job-name", "a\nb"], "--job-name"),
    (["--comment", "x\n#SBATCH --qos=top"], "--comment"),
    (["--partition", "a\\b"], "backslash"),
    (["train.max_stepz=5"], "train.max_stepz"),
    (["train.max_steps=0"], "train.max_steps"),
    (["model.name=mae_vit_gigantic"], "model.name"),
    (["slurm.max_requeues=-1"], "slurm.max_requeues"),
    (["slurm.additional_parameters={'mail-type': false}"], "slurm.additional_parameters.mail-type"),
    (["slurm.additional_parameters={'x\ny': 1}"], "slurm.additional_parameters"),
])
def test_invalid_requests_fail_before_submission(tmp_path, fake_slurm, capsys, argv, needle):
    out = tmp_path / "run"
    rc = submit_main([str(write_config(tmp_path, out)), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err, err
    assert fake_slurm.calls() == [] and not out.exists()


def test_local_means_one_node(tmp_path, no_slurm, capsys):
    from maescale.launch.submit import build_parser, resolve_config

    cfg_path = write_config(tmp_path)  # slurm.nodes: 2
    assert resolve_config(build_parser().parse_args([str(cfg_path), "--local"])).slurm.nodes == 1
    assert submit_main([str(cfg_path), "--local", "--nodes", "2"]) == 2
    assert "--nodes 2" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_typo_in_config_file_fails(tmp_path, fake_slurm, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(f"base: {TINY}\noutput_dir: {tmp_path / 'run'}\nslurm:\n  nodez: 4\n")
    assert submit_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "slurm.nodez" in err and "unknown key" in err and fake_slurm.calls() == []


def test_argparse_rejects_non_numbers(tmp_path, fake_slurm, capsys):
    with pytest.raises(SystemExit) as exc:
        submit_main([str(write_config(tmp_path)), "--nodes", "four"])
    assert exc.value.code == 2 and "--nodes" in capsys.readouterr().err and fake_slurm.calls() == []


def test_percent_in_run_directory_rejected(tmp_path, fake_slurm, capsys):
    rc = submit_main([str(write_config(tmp_path, tmp_path / "run_50%j"))])
    assert rc == 2 and "output_dir" in capsys.readouterr().err and fake_slurm.calls() == []


def test_resume_false_on_a_run_with_checkpoints_fails_on_the_login_node(tmp_path, fake_slurm, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000010").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000010")
    assert submit_main([str(write_config(tmp_path, out)), "resume=false"]) == 2
    assert "resume=false but" in capsys.readouterr().err and fake_slurm.calls() == []


def test_without_srun_nothing_is_submitted(tmp_path, no_slurm, capsys):
    out = tmp_path / "run"
    assert submit_main([str(write_config(tmp_path, out))]) == 2
    assert "srun" in capsys.readouterr().err and not out.exists()


def test_sbatch_failure_is_reported(tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_SBATCH_FAIL", "Invalid account or account/partition combination specified")
    assert submit_main([str(write_config(tmp_path))]) == 1
    assert "error: sbatch failed" in capsys.readouterr().err.replace("\n", " ")


# --------------------------------------------------------------------------------------------
# Quoting: names and paths with spaces and quotes reach SLURM intact and run nothing
# --------------------------------------------------------------------------------------------


def test_names_and_paths_with_quotes_are_passed_safely(tmp_path, fake_slurm, capsys):
    evil = "x $(touch PWNED1) `touch PWNED2`; touch PWNED3 #"
    name = f"my job \"dq\" 'sq' {evil}"
    out = tmp_path / f"run dir 'q' \"dq\" {evil}"
    rc = submit_main([str(write_config(tmp_path, out)), "--job-name", name, "--comment", evil])
    assert rc == 0, capsys.readouterr()
    script = fake_slurm.script()
    opts = sbatch_options(script)
    assert opts["job-name"] == name and opts["comment"] == evil
    assert opts["output"] == f"{out}/slurm/%j_0_log.out"
    # The batch shell runs submitit's entry point directly (no srun: the job's supervisor starts
    # the training steps itself); its command line parses back to exactly the run's folder.
    command = script.split("# command\n", 1)[1].splitlines()
    assert command[0] == "export SUBMITIT_EXECUTOR=slurm"
    assert shlex.split(command[1]) == [sys.executable, "-u", "-m", "submitit.core._submit", f"{out}/slurm"]
    # The supervisor's srun is an argument list (no shell): the same path reaches srun intact.
    from maescale.launch.supervisor import SlurmJob, srun_command

    job = SlurmJob("12345", 0, nodes=2, tasks_per_node=8, cpus_per_task=12, gpus_per_node=8)
    argv = srun_command(job, out / "slurm" / "job_12345.yaml", out / "slurm")
    assert argv[argv.index("--output") + 1] == f"{out}/slurm/%j_rank%t.out"
    assert argv[-1] == f"{out}/slurm/job_12345.yaml"
    work = tmp_path / "exec"
    work.mkdir()
    subprocess.run(["bash", "-c", f"cd {shlex.quote(str(work))}; set -- {shlex.join(argv)}; true"], check=True)
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert load_config(out / "config.yaml").slurm.job_name == name


# --------------------------------------------------------------------------------------------
# The submitted job seen through submitit's SlurmJob (fake sacct / scancel)
# --------------------------------------------------------------------------------------------


def test_job_state_and_cancel_through_submitit(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_JOB_ID", "4242")
    cfg = load_config(write_config(tmp_path))
    job = submit(cfg)
    assert job.job_id == "4242" and job.num_tasks == 16
    assert job.state == "RUNNING" and not job.done()
    sacct = fake_slurm.calls("sacct")[0]  # submitit's watcher asks for every job it knows in one call
    assert sacct[:3] == ["-o", "JobID,State,NodeList", "--parsable2"] and "4242" in sacct[3:]
    job.cancel()
    assert fake_slurm.calls("scancel") == [["4242"]]
    job._interrupt()  # submitit's simulated preemption: SIGTERM, then its signal
    assert fake_slurm.calls("scancel")[1:] == [["4242", "--signal", "SIGTERM"], ["4242", "--signal", "USR2"]]


# --------------------------------------------------------------------------------------------
# Inside the job: distributed environment, requeue through submitit's handler, the cap
# --------------------------------------------------------------------------------------------


def test_dist_env_from_slurm_variables_ignores_inherited_torchrun_ones():
    environ = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "13", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5",
               "SLURM_JOB_NODELIST": "node[001-003,007]", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "123456",
               # left over in the login shell that ran sbatch (sbatch exports the environment):
               "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env = prepare_dist_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.num_nodes) == (13, 32, 5, 8, 4)
    assert env.master_addr == "node001" and env.master_port == port_for_job("123456") and env.source == "slurm"
    assert "RANK" not in environ and "WORLD_SIZE" not in environ


def test_dist_env_from_submitit_local_executor():
    envs = []
    for rank in range(2):
        environ = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": str(rank),
                   "SUBMITIT_LOCAL_LOCALID": str(rank), "SUBMITIT_LOCAL_JOB_ID": "31337", "MASTER_ADDR": "stale"}
        envs.append(prepare_dist_env(environ))
        assert environ["RANK"] == str(rank) and environ["WORLD_SIZE"] == "2"
    assert [(e.rank, e.world_size, e.local_rank) for e in envs] == [(0, 2, 0), (1, 2, 1)]
    assert {(e.master_addr, e.master_port) for e in envs} == {("127.0.0.1", port_for_job("31337"))}


@pytest.fixture
def submitit_task(tmp_path, monkeypatch, fake_slurm):
    """Rank 0 of a SLURM job as submitit's process_job sets it up: env, pickle, submitit's handlers."""
    from submitit import JobEnvironment
    from submitit.core.utils import DelayedSubmission

    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, out, max_requeues=2), ["resume=false"])
    folder = RunDir(out).slurm
    folder.mkdir(parents=True)
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder), "SLURM_JOB_ID": "12345",
                 "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    job = TrainJob(cfg)
    delayed = DelayedSubmission(job)
    delayed.set_timeout(240, 2)
    delayed.dump(folder / "12345_submitted.pkl")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000040")
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
    saved = {s: signal.getsignal(s) for s in sigs}
    env = JobEnvironment()
    env._handle_signals(env.paths, delayed)
    yield job, out, folder
    for s, h in saved.items():
        signal.signal(s, h)


def _preempted(out: Path, step: int = 40, signals=(signal.SIGUSR2,)):
    from maescale.train import TrainResult

    return TrainResult("preempted", 0, step, 100, out, out / "checkpoints" / f"step_{step:08d}", None, 1.0,
                       tuple(signals))


def test_requeue_goes_through_submitits_own_handler(submitit_task, fake_slurm, caplog):
    from submitit.core.utils import DelayedSubmission

    job, out, folder = submitit_task
    with pytest.raises(SystemExit):  # submitit exits after `scontrol requeue`
        job._requeue(_preempted(out), signal.SIGUSR2)
    assert fake_slurm.calls("scontrol") == [["requeue", "12345"]]
    assert read_requeues(out, "12345") == 1
    assert "requeueing job 12345 (requeue 1/2); it will resume from step 40" in caplog.text
    # submitit re-pickled what checkpoint() returned: the same job, now resuming
    new = DelayedSubmission.load(folder / "12345_submitted.pkl")
    assert isinstance(new.function, TrainJob) and new.function.cfg.resume is True
    assert new.function.cfg.output_dir == job.cfg.output_dir and new._timeout_countdown == 2
    # a second signal can no longer re-enter submitit's handler
    assert signal.getsignal(signal.SIGUSR2) is _ignore_late_signal
    assert signal.getsignal(signal.SIGTERM) is _ignore_late_signal


def test_submitits_signal_after_sigterm_requeues(submitit_task, fake_slurm):
    # submitit's model of a preemption (SlurmJob._interrupt): SIGTERM, then its own signal
    job, out, _ = submitit_task
    with pytest.raises(SystemExit):
        job._requeue(_preempted(out, signals=(signal.SIGTERM, signal.SIGUSR2)), signal.SIGUSR2)
    assert fake_slurm.calls("scontrol") == [["requeue", "12345"]]


def test_sigterm_alone_stops_without_requeue(submitit_task, fake_slurm, caplog):
    # scancel (or a preemption that SLURM requeues itself): checkpoint written, the job ends
    job, out, _ = submitit_task
    job._requeue(_preempted(out, signals=(signal.SIGTERM,)), signal.SIGUSR2)
    assert fake_slurm.calls("scontrol") == [] and read_requeues(out, "12345") == 0
    assert "stopped at step 40 by SIGTERM with a checkpoint; not requeuing" in caplog.text
    assert f"python tools/submit.py {out}/config.yaml resume=true" in caplog.text  # the run began resume=false
    # submitit's handlers stay in place: a later SIGUSR2 would still requeue through them
    assert getattr(signal.getsignal(signal.SIGUSR2), "__name__", "") == "checkpoint_and_try_requeue"


def test_requeue_cap(submitit_task, fake_slurm, caplog):
    job, out, _ = submitit_task
    for _ in range(2):
        record_requeue(out, "12345", 2, 40)
    job._requeue(_preempted(out), signal.SIGUSR2)  # returns: no requeue
    assert fake_slurm.calls("scontrol") == []
    assert "not requeuing job 12345: it was requeued 2 times already (slurm.max_requeues=2)" in caplog.text
    assert job.checkpoint() is None  # what submitit's handler would get on its own path
    assert read_requeues(out, "12345") == 2
    assert read_requeues(out, "99999") == 0  # a new submission on the same run counts afresh


def test_failed_scontrol_exits_with_the_preempted_code(submitit_task, fake_slurm, monkeypatch, tmp_path):
    bad = tmp_path / "bad_bin"
    bad.mkdir()
    (bad / "scontrol").write_text("#!/bin/sh\necho 'scontrol: error: Job is pending execution' >&2\nexit 1\n")
    (bad / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bad}{os.pathsep}{os.environ['PATH']}")
    job, out, _ = submitit_task
    with pytest.raises(SystemExit) as exc:
        job._requeue(_preempted(out), signal.SIGUSR2)
    assert exc.value.code == EXIT_PREEMPTED


def test_outside_submitit_nothing_is_requeued(tmp_path, caplog):
    job = TrainJob(load_config(write_config(tmp_path)))
    job._requeue(_preempted(tmp_path / "run"), signal.SIGUSR2)
    assert "not running under submitit" in caplog.text


def test_train_job_pickles():
    import cloudpickle

    job = TrainJob(load_config(TINY))
    back = cloudpickle.loads(cloudpickle.dumps(job))
    assert isinstance(back, TrainJob) and back.cfg == job.cfg


# --------------------------------------------------------------------------------------------
# slurm/train.sbatch: the plain-sbatch path (the same supervisor, requeueing with scontrol)
# --------------------------------------------------------------------------------------------


def test_plain_sbatch_script_header():
    opts = sbatch_options((REPO / "slurm" / "train.sbatch").read_text())
    assert opts["signal"] == "USR2@180" and opts["requeue"] is True
    assert opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8" and opts["cpus-per-task"] == "10"


PREEMPTED_BY_TIME_LIMIT = json.dumps({"status": "preempted", "code": 3, "step": 7, "signals": ["SIGUSR2"]})


def _sbatch_env(tmp_path, **env) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FAKE_SLURM_SRUN"))}
    full.update({"SLURM_JOB_ID": "777", "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": sys.executable,
                 "SLURM_JOB_NUM_NODES": "1", **env})
    return full


def _run_sbatch_script(tmp_path, args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), *args], cwd=tmp_path,
                          env=_sbatch_env(tmp_path, **env), capture_output=True, text=True, timeout=120)


def _args(tmp_path, *extra: str) -> list[str]:
    return [str(TINY), f"output_dir={tmp_path / 'run'}", "slurm.gpus_per_node=2", *extra]


def test_plain_sbatch_requeues_after_the_time_limit_signal(tmp_path, fake_slurm):
    proc = _run_sbatch_script(tmp_path, _args(tmp_path, "train.max_steps=7"), FAKE_SLURM_SRUN_EXIT=PREEMPTED_BY_TIME_LIMIT)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    (srun,) = fake_slurm.calls("srun")
    assert srun[0] == "--kill-on-bad-exit=1" and "--ntasks=2" in srun
    assert srun[-4:] == ["-u", "-m", "maescale.launch.task", str(tmp_path / "run" / "slurm" / "job_777.yaml")]
    assert fake_slurm.calls("scontrol") == [["requeue", "777"]]
    assert read_requeues(tmp_path / "run", "777") == 1
    assert load_config(tmp_path / "run" / "slurm" / "job_777.yaml").train.max_steps == 7  # what the tasks run


def test_plain_sbatch_requeue_cap(tmp_path, fake_slurm):
    for _ in range(2):
        record_requeue(tmp_path / "run", "777", 2, 5)
    proc = _run_sbatch_script(tmp_path, _args(tmp_path, "slurm.max_requeues=2"), FAKE_SLURM_SRUN_EXIT=PREEMPTED_BY_TIME_LIMIT)
    assert fake_slurm.calls("scontrol") == [] and "requeued 2 times already" in proc.stderr


def test_plain_sbatch_does_not_requeue_after_scancel(tmp_path, fake_slurm):
    # scancel: SIGTERM reaches the batch shell (the supervisor) too; the tasks checkpoint and stop.
    env = _sbatch_env(tmp_path, FAKE_SLURM_SRUN_SLEEP="3",
                      FAKE_SLURM_SRUN_EXIT=json.dumps({"status": "preempted", "step": 4, "signals": ["SIGTERM"]}))
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "train.sbatch"), *_args(tmp_path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not fake_slurm.calls("srun") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED and "not requeuing" in err, err
    assert fake_slurm.calls("scontrol") == [] and len(fake_slurm.calls("srun")) == 1


def test_plain_sbatch_restarts_after_a_crash(tmp_path, fake_slurm):
    proc = _run_sbatch_script(tmp_path, _args(tmp_path, "slurm.max_failures=1"), FAKE_SLURM_SRUN_RC="1",
                              FAKE_SLURM_SRUN_STDERR="srun: error: node001: task 1: Killed")
    assert proc.returncode == 1 and len(fake_slurm.calls("srun")) == 2  # one restart, then it stops
    assert "restarting inside the allocation" in proc.stderr and "slurm.max_failures=1" in proc.stderr


def test_plain_sbatch_rejects_a_bad_config_before_srun(tmp_path, fake_slurm):
    proc = _run_sbatch_script(tmp_path, [str(TINY), "train.max_stepz=3"])
    assert proc.returncode == 2 and "train.max_stepz" in proc.stderr and fake_slurm.calls("srun") == []


# --------------------------------------------------------------------------------------------
# tools/submit.py itself
# --------------------------------------------------------------------------------------------


def test_tools_submit_cli(tmp_path):
    env = {**os.environ, "PATH": _path_with_fakes(), "FAKE_SLURM_DIR": str(tmp_path / "calls")}
    cfg = write_config(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "submit.py"), str(cfg), "--nodes", "4"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "submitted job 12345" in proc.stdout
    assert "#SBATCH --nodes=4" in (tmp_path / "calls" / "sbatch_0.sh").read_text()
    assert shlex.split(proc.stdout.split("cancel:")[1]) == ["scancel", "12345"]


