#!/usr/bin/env python
"""Docs from data: regenerate or check the generated blocks of the docs.

    python tools/report.py --check          # exit 1 listing every block that differs from the JSON
    python tools/report.py --write          # rewrite the blocks from the committed JSON under bench/
    python tools/report.py --show NAME      # print one block as generated

Blocks sit between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in README.md and
bench/*.md; how to add one: :mod:`maescale.devtools.report`.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maescale.devtools.report import Bench, ReportError, check, render, write  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="exit 1 if a block differs from what the JSON gives")
    what.add_argument("--write", action="store_true", help="rewrite every block from the JSON")
    what.add_argument("--show", metavar="NAME", help="print one block as generated")
    p.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    p.add_argument("--quiet", action="store_true", help="with --check: names only, no diff")
    args = p.parse_args(argv)
    try:
        if args.show:
            print(render(args.show, Bench(args.root)))
            return 0
        if args.write:
            changed = write(args.root)
            print("\n".join(f"rewrote {c}" for c in changed) or "every block is up to date")
            return 0
        diffs = check(args.root)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in diffs:
        print(f"{d.doc}:{d.line}: block {d.name!r} differs from the committed JSON")
        if not args.quiet:
            print(d.diff())
    if diffs:
        print(f"{len(diffs)} block(s) out of date: run python tools/report.py --write", file=sys.stderr)
        return 1
    print("every block matches the committed JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
