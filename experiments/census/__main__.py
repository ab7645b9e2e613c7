"""``python -m experiments.census [--quick | --smoke] [--tables-only] [--results-dir DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.census",
        description="Sample models per condition; write results/census/ and docs/verification.md.",
    )
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="8 models per row (minutes)")
    level.add_argument("--smoke", action="store_true", help="2 models per row (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the level's seeds")
    parser.add_argument("--results-dir", type=Path, help="write here instead of results/")
    parser.add_argument(
        "--tables-only", action="store_true", help="only regenerate the Markdown tables"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    from experiments.census import run

    lvl = "smoke" if args.smoke else "quick" if args.quick else "full"
    run.main(
        level=lvl,
        seeds=args.seeds,
        root=args.results_dir,
        verbose=not args.quiet,
        tables_only=args.tables_only,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
