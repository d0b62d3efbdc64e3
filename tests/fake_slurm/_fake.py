"""Fake SLURM commands for tests: record every call, answer like SLURM.

Each of sbatch, squeue, sacct, scancel, scontrol and srun in this folder runs this script with
its own name first. Calls are appended as JSON lines ``{"cmd", "argv", "cwd"}`` to
``$FAKE_SLURM_DIR/calls.jsonl``; ``sbatch`` also copies the submitted script to
``$FAKE_SLURM_DIR/sbatch_<n>.sh``. Knobs (environment):
  FAKE_SLURM_JOB_ID      job id sbatch reports (default 12345)
  FAKE_SLURM_STATE       state sacct/squeue report (default RUNNING)
  FAKE_SLURM_SBATCH_FAIL if set, sbatch fails with this message
  FAKE_SLURM_SRUN_RC     exit code of srun (default 0)
  FAKE_SLURM_SRUN_SLEEP  seconds srun takes (default 0)
  FAKE_SLURM_SRUN_STDERR what srun prints on its stderr (its own "srun: error: ..." lines)
  FAKE_SLURM_SRUN_EXIT   a JSON exit record (e.g. {"status": "preempted", "signals": ["SIGUSR2"]}) that
                         every task of the step leaves, as maescale.launch.task does, for the
                         supervisor (RUN/attempts/$MAESCALE_ATTEMPT_ID/rank_R.exit.json)
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    cmd, argv = sys.argv[1], sys.argv[2:]
    record = Path(os.environ.get("FAKE_SLURM_DIR") or ".")
    record.mkdir(parents=True, exist_ok=True)
    with open(record / "calls.jsonl", "a") as f:
        f.write(json.dumps({"cmd": cmd, "argv": argv, "cwd": os.getcwd()}) + "\n")
    job_id = os.environ.get("FAKE_SLURM_JOB_ID", "12345")
    state = os.environ.get("FAKE_SLURM_STATE", "RUNNING")
    if cmd == "sbatch":
        if os.environ.get("FAKE_SLURM_SBATCH_FAIL"):
            print(f"sbatch: error: {os.environ['FAKE_SLURM_SBATCH_FAIL']}", file=sys.stderr)
            return 1
        script = [a for a in argv if not a.startswith("-")][-1]
        n = len(list(record.glob("sbatch_*.sh")))
        shutil.copy(script, record / f"sbatch_{n}.sh")
        print(f"Submitted batch job {job_id}")
    elif cmd == "sacct":
        ids = [argv[i + 1] for i, a in enumerate(argv) if a == "-j" and i + 1 < len(argv)] or [job_id]
        print("JobID|State|NodeList")
        for jid in ids:
            print(f"{jid}|{state}|node001")
            print(f"{jid}.batch|{state}|node001")
    elif cmd == "squeue":
        print(f"{job_id} {state}")
    elif cmd == "srun":
        time.sleep(float(os.environ.get("FAKE_SLURM_SRUN_SLEEP", "0")))
        if os.environ.get("FAKE_SLURM_SRUN_STDERR"):
            print(os.environ["FAKE_SLURM_SRUN_STDERR"], file=sys.stderr)
        if os.environ.get("FAKE_SLURM_SRUN_EXIT") and os.environ.get("MAESCALE_ATTEMPT_ID"):
            ntasks = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--ntasks=")))
            run = Path(argv[-1]).parent.parent  # the task config: RUN/slurm/job_<id>.yaml
            folder = run / "attempts" / os.environ["MAESCALE_ATTEMPT_ID"]
            folder.mkdir(parents=True, exist_ok=True)
            for rank in range(ntasks):
                record = {"rank": rank, "host": "node001", **json.loads(os.environ["FAKE_SLURM_SRUN_EXIT"])}
                (folder / f"rank_{rank}.exit.json").write_text(json.dumps(record))
        return int(os.environ.get("FAKE_SLURM_SRUN_RC", "0"))
    # scancel, scontrol: recorded, succeed silently
    return 0


if __name__ == "__main__":
    sys.exit(main())
