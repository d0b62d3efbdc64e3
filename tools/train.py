#!/usr/bin/env python
"""Train an MAE: ``python tools/train.py CONFIG [key=value ...]`` (also under torchrun / srun)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.cli import train_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_cli())
