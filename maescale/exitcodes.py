"""Exit codes of maescale's commands, in one torch-free place (the CLIs, the SLURM job and
``slurm/train.sbatch`` agree on them)."""

OK = 0
CRASHED = 1  # an unexpected error (a traceback says where)
BAD_INPUT = 2  # config, checkpoint, data, run-directory lock, divergence: the message names the fix
PREEMPTED = 3  # stopped by a signal after writing a checkpoint: resumable, requeue me
STALLED = 4  # the stall watchdog ended this rank (no progress for train.stall_timeout_s): retryable

# A rank that ended with one of these may be restarted by the job's supervisor (an infrastructure
# failure or a hang); BAD_INPUT is never retried (the same input fails the same way).
RETRYABLE = (CRASHED, STALLED)
