"""Experiments comparing the modular natural gradient with the exact one and with baselines.

Each experiment is a sub-package with ``README.md``, ``config.py`` and ``run.py`` and is
run as ``python -m experiments <name> [--quick | --smoke] [--seeds 0 1 2]``. Results are
tidy JSON-lines rows under ``results/<name>/`` (see :mod:`experiments._results`), written
atomically and resumed run by run.
"""

#: Experiments this package provides, in the order ``python -m experiments`` lists them.
#: ``census`` is listed when its package is present.
EXPERIMENTS = (
    "training",
    "fisher_kinds",
    "saturation",
    "agreement",
    "cost",
    "census",
    "nullspace",
)
