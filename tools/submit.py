#!/usr/bin/env python
"""Submit an MAE training to SLURM: ``python tools/submit.py [--nodes N ...] CONFIG [key=value ...]``.

Requeued and resumed automatically after preemption or at the time limit; ``--dry-run`` prints
the sbatch script, ``--local`` runs the same job here. See ``maescale/launch/`` and
``slurm/README.md``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.cli import submit_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(submit_cli())
