"""SLURM through submitit, in two halves that share nothing but the config and the run directory:

* :mod:`maescale.launch.submit`: the login node (``tools/submit.py``): arguments, checks, the
  sbatch script, ``--dry-run``, ``--local``, submission;
* :mod:`maescale.launch.job`: inside the job: :class:`~maescale.launch.job.TrainJob` runs the
  training in every task, turns SLURM's signals into a checkpoint, and requeues.
"""
