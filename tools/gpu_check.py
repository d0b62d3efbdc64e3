#!/usr/bin/env python
"""The GPU check's bookends and per-call-site checks (``bench/gpu_check.sh`` runs them):

    python tools/gpu_check.py env OUT      # device, versions, measured bf16 matmul ceiling -> OUT/env.json
    python tools/gpu_check.py sdpa OUT     # SDPA backend picked + time per backend, per call site -> OUT/sdpa.json
    python tools/gpu_check.py fp8-shapes OUT  # bf16 vs float8 time per linear shape -> OUT/fp8_shapes.json
    python tools/gpu_check.py report OUT   # one table from OUT/*.json -> OUT/gpu_check.json; exit 1 if
                                           # the loop runs below 0.9x the bare step

The logic lives in :mod:`maescale.devtools.gpu_check` and :mod:`maescale.devtools.kernel_check`.
"""

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.gpu_check import build_report, format_report, measure_environment  # noqa: E402
from maescale.rundir import write_json_atomic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("env", "sdpa", "fp8-shapes", "report"))
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="mae_vit_huge_patch14", help="sdpa, fp8-shapes: the model")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--micro-batch", default="32,128", help="sdpa, fp8-shapes: comma list")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--fp8-emulate", action="store_true", help="fp8-shapes: emulated float8 (CPU tests)")
    p.add_argument("--no-compile", action="store_true",
                   help="fp8-shapes: eager (CPU tests; casts unfused); sdpa: no compiled-block kernel list")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    mbs = [int(x) for x in args.micro_batch.split(",") if x]
    if args.what == "env":
        env = measure_environment()
        write_json_atomic(args.out / "env.json", env, indent=1)
        print({k: env.get(k) for k in ("device_name", "torch", "cuda", "deepspeed", "torchao", "matmul_tflops",
                                       "date")})
        return 0
    if args.what in ("sdpa", "fp8-shapes"):
        from maescale.devtools import kernel_check as kc

        if args.what == "sdpa":  # with what compile fuses around it in one encoder block
            doc = kc.sdpa_check(args.preset, mbs, args.img_size, args.mask_ratio, args.device)
            try:
                if args.no_compile:
                    raise RuntimeError("--no-compile")
                doc["block_kernels"] = kc.block_kernels(args.preset, mbs[0], args.img_size, args.mask_ratio,
                                                        args.device)
            except Exception as exc:  # noqa: BLE001 - the backend table stands without it
                doc["block_kernels"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            name = "sdpa.json"

            def lines(d):
                return kc.format_sdpa(d) + kc.format_block_kernels(d.get("block_kernels") or {})
        else:
            doc, name, lines = kc.fp8_shapes(args.preset, mbs, args.img_size, args.mask_ratio, device=args.device,
                                             emulate=args.fp8_emulate, compile=not args.no_compile), \
                "fp8_shapes.json", kc.format_fp8_shapes
        write_json_atomic(args.out / name, doc | {"date": when}, indent=1)
        print("\n".join(lines(doc)))
        return 0
    report = build_report(args.out)
    write_json_atomic(args.out / "gpu_check.json", report, indent=1)
    print(format_report(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
