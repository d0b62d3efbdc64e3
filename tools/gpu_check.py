#!/usr/bin/env python
"""The GPU check's bookends (``bench/gpu_check.sh`` runs them):

    python tools/gpu_check.py env OUT      # device, versions, measured bf16 matmul ceiling -> OUT/env.json
    python tools/gpu_check.py report OUT   # one table from OUT/*.json -> OUT/gpu_check.json; exit 1 if
                                           # the loop runs below 0.9x the bare step

The logic lives in :mod:`maescale.devtools.gpu_check`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.gpu_check import build_report, format_report, measure_environment  # noqa: E402
from maescale.rundir import write_json_atomic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("env", "report"))
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "env":
        env = measure_environment()
        write_json_atomic(args.out / "env.json", env, indent=1)
        print({k: env.get(k) for k in ("device_name", "torch", "cuda", "deepspeed", "matmul_tflops", "date")})
        return 0
    report = build_report(args.out)
    write_json_atomic(args.out / "gpu_check.json", report, indent=1)
    print(format_report(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
