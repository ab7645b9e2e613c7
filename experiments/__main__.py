"""Command line: ``python -m experiments <name> [--quick | --smoke] [--seeds 0 1 2] [--devices D]``.

Levels: the default is the full run the paper uses; ``--quick`` is a small version of a
couple of minutes on a laptop CPU; ``--smoke`` is a seconds-long version for the tests.
Each level writes its own files under ``results/<name>/`` and resumes where it stopped
(``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from experiments import EXPERIMENTS


def available() -> list[str]:
    """Experiments present in this checkout."""
    return [n for n in EXPERIMENTS if importlib.util.find_spec(f"experiments.{n}") is not None]


def use_devices(parser, count: int) -> None:
    """Make ``count`` devices visible: forced host devices on CPU, set before JAX starts."""
    if count < 1:
        parser.error(f"--devices must be >= 1; got {count}")
    flag = f"--xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    if jax.device_count() < count:
        parser.error(f"--devices {count}: only {jax.device_count()} devices are available")


def main(argv=None) -> int:
    names = available()
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Run an experiment; results go to results/<name>/.",
    )
    parser.add_argument("name", choices=names, help="the experiment to run")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="a small version (minutes)")
    level.add_argument("--smoke", action="store_true", help="a tiny version (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the level's seeds")
    parser.add_argument("--results-dir", type=Path, help="write here instead of results/")
    parser.add_argument("--fresh", action="store_true", help="discard this level's results")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument(
        "--sweep", action="store_true", help="run the hyper-parameter sweep (where one exists)"
    )
    parser.add_argument(
        "--devices",
        type=int,
        help="devices to run on (on CPU: forced host devices, which share the machine's "
        "cores, so timings do not speed up); recorded with every run",
    )
    args = parser.parse_args(argv)
    if args.devices is not None:
        use_devices(parser, args.devices)
    lvl = "smoke" if args.smoke else "quick" if args.quick else "full"
    run = importlib.import_module(f"experiments.{args.name}.run")
    options = dict(
        level=lvl,
        seeds=args.seeds,
        root=args.results_dir,
        fresh=args.fresh,
        verbose=not args.quiet,
        sweep=args.sweep,
    )
    accepted = inspect.signature(run.main).parameters
    if args.sweep and "sweep" not in accepted:
        parser.error(f"experiment {args.name!r} has no --sweep")
    run.main(**{k: v for k, v in options.items() if k in accepted})
    return 0


if __name__ == "__main__":
    sys.exit(main())
