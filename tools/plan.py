#!/usr/bin/env python
"""The plan of a training run before it is submitted:
``python tools/plan.py CONFIG [key=value ...] [--nodes N] [--rate IMG_S] [--gpu-mem h100]``.

Steps, epochs and images; time and GPU-hours at the measured per-GPU rate plus the communication
of the node count; GPU memory per rank; shards, their split and a decoded sample. Submits and
writes nothing. ``--scaling-doc`` writes ``bench/SCALING.md``. See ``maescale/planning/``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.planning.cli import plan_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(plan_main())
