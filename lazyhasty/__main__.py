"""Command line: ``lazyhasty demo`` (also ``python -m lazyhasty demo``)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lazyhasty", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="yin-yang toy at alpha = 1 vs 100 with linearity probes (no download)")
    demo.add_argument("--steps", type=int, default=2000, help="full-batch gradient steps per alpha")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="FILE", help="also write the logged rows as JSON")
    sub.add_parser("info", help="print which backends this installation has")
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import _backend

        print(json.dumps(_backend.summary(), indent=2))
        return 0
    from .demo import run_demo

    if args.steps < 1:
        parser.error("--steps must be >= 1")
    rows = run_demo(steps=args.steps, log_every=max(1, args.steps // 4), seed=args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in rows.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
