"""Where a task of a launched job sits: the torchrun-style variables of SLURM's or submitit's tasks."""

from __future__ import annotations

import os
from typing import MutableMapping

# torchrun-style variables a job must not inherit from the shell that submitted it: under srun
# they would make ``detect_env`` prefer them over SLURM's (every task would think it is rank 0).
_INHERITED_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "TORCHELASTIC_RUN_ID")


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
