#!/usr/bin/env python
"""Train an MAE: ``python tools/train.py CONFIG [key=value ...]`` (also under torchrun / srun)."""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.cli import train_cli  # noqa: E402

if __name__ == "__main__":
    code = train_cli()
    # Everything is written and closed by now (checkpoint committed, TensorBoard closed, process
    # group destroyed). Skip interpreter teardown: native destructors of distributed/DeepSpeed
    # objects racing there were seen to abort a finished rank ("terminate called without an
    # active exception", exit -6), which would mark a good job as failed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
