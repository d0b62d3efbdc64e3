"""Exit codes of maescale's commands, in one torch-free place (the CLIs, the SLURM job and
``slurm/train.sbatch`` agree on them)."""

OK = 0
CRASHED = 1  # an unexpected error (a traceback says where)
BAD_INPUT = 2  # config, checkpoint, data, run-directory lock, divergence: the message names the fix
PREEMPTED = 3  # stopped by a signal after writing a checkpoint: resumable, requeue me
