"""Configuration of the training experiment.

No learning rate, damping or cut-off is chosen here: ``GRIDS`` lists the values the sweep
(``python -m experiments training --sweep``) tries, the sweep writes its winners per
(setting, method) to ``results/training/chosen.json`` and the run reads them from there
(``DEFAULTS`` only for levels without a sweep file, and said so in their table).

Protocol: every setting's training split loses ``VALIDATION`` of its examples to a
validation split (``experiments._data.load(..., validation=...)``). The sweep trains on the
rest with ``SWEEP_SEEDS`` (disjoint from the reported ``LEVELS["full"]["seeds"]``) and
selects on the final validation accuracy (classification) or validation MSE (regression),
averaged over the sweep seeds; a run that diverged or went degenerate on any seed does not
compete. The sweep is coordinate-wise (two stages): first the learning rate with the second
hyperparameter at its default, then the second hyperparameter (damping; for the modular
rule the pair of activation and dense cut-offs) at that learning rate — the default is in
both stages, so stage 2 can only improve on stage 1. Where no learning rate finishes at the
default (the modular rule at its default cut-off on some settings), stage 2 is the joint grid
of learning rate × second hyperparameter.
"""

from __future__ import annotations

#: Fraction of each training split held out for validation (a setting's ``"validation"``
#: overrides it).
VALIDATION = 0.2

#: Data settings. ``model``: ``"tanh"`` (tanh MLP), ``"relu"`` (ReLU MLP) or ``"cnn"`` (the
#: MNIST-1D CNN of ``benchmarks/bench.py``). ``steps``: steps per method category
#: (:func:`category`): fewer where one step costs many first-order ones, sized so the full
#: run fits its time budget (README); the wall-clock panels compare the methods on time.
SETTINGS = {
    "digits": {
        "data": "digits",
        "model": "tanh",
        "hidden": (32,),
        "family": "categorical",
        "batch": 64,
        "steps": {"first_order": 600, "kfac": 600, "cg": 600, "gram": 600, "modular": 600},
        "eval_every": 60,
    },
    "diabetes": {
        "data": "diabetes",
        "model": "tanh",
        "hidden": (32,),
        "family": "gaussian",
        "batch": 64,
        "steps": {"first_order": 400, "kfac": 400, "cg": 400, "gram": 400, "modular": 400},
        "eval_every": 40,
    },
    # The MNIST-1D authors' MLP: two hidden layers of 100 ReLU units, batch 100.
    "mnist1d-mlp": {
        "data": "mnist1d",
        "model": "relu",
        "hidden": (100, 100),
        # 3600/400: every training example counts for this MLP (Adam, lr 1e-2, 6000 steps:
        # ~65% test accuracy on 3600, ~63% on 3200, ~65–67% on all 4000, seed 0).
        "validation": 0.1,
        "family": "categorical",
        "batch": 100,
        "steps": {"first_order": 6000, "kfac": 6000, "cg": 300, "gram": 300, "modular": 300},
        "eval_every": 1000,
    },
    # The MNIST-1D authors' CNN (three strided convolutions of 25 channels, ReLU).
    "mnist1d-cnn": {
        "data": "mnist1d",
        "model": "cnn",
        "hidden": (),
        "validation": 0.1,
        "family": "categorical",
        "batch": 100,
        # A modular step of this CNN costs seconds on two CPU cores (its convolutions' local
        # pseudo-inverses): four steps show its cost and direction, not its convergence.
        "steps": {"first_order": 6000, "kfac": 1000, "cg": 40, "gram": 40, "modular": 4},
        "eval_every": 1000,
    },
}

#: Methods: how the direction is computed (the swept values come from ``chosen.json``).
#: ``kind``/``solver``/``num_samples`` are passed to ``natchain.scale_by_natural_gradient``.
METHODS = {
    "sgd": {"type": "sgd"},
    "adam": {"type": "adam"},
    "ngd-empirical-cg": {"type": "exact", "kind": "empirical", "solver": "cg"},
    "ngd-mc1-cg": {"type": "exact", "kind": "mc", "num_samples": 1, "solver": "cg"},
    "ngd-exact-gram": {"type": "exact", "kind": "true", "solver": "gram"},
    "ngd-exact-cg": {"type": "exact", "kind": "true", "solver": "cg"},
    "ngd-modular-layer": {"type": "modular", "granularity": "layer"},
    "ngd-modular-primitive": {"type": "modular", "granularity": "primitive"},
    # kfac-jax: inverse every 10 steps, fixed damping and learning rate, no momentum.
    "kfac": {"type": "kfac", "inverse_period": 10},
}


def category(method):
    """The step-count category of ``method``: first_order, kfac, cg, gram or modular."""
    m = METHODS[method]
    if m["type"] in ("sgd", "adam"):
        return "first_order"
    if m["type"] in ("kfac", "modular"):
        return m["type"]
    return m["solver"]


#: CG settings shared by every CG method.
CG = {"tol": 1e-6, "maxiter": 50}

#: The sweep's grids per method type: the learning rate (stage 1) and the second
#: hyperparameter (stage 2). A modular cut-off is a pair ``(activation, dense)`` of
#: ``rcond`` values (``None``: the rule's default, ``max(out, in)·eps``).
GRIDS = {
    "sgd": {"learning_rate": (0.03, 0.1, 0.3, 1.0)},
    "adam": {"learning_rate": (1e-3, 3e-3, 1e-2, 3e-2)},
    "exact": {"learning_rate": (0.1, 0.3, 1.0), "damping": (1e-3, 1e-2, 1e-1, 1.0)},
    "kfac": {"learning_rate": (0.03, 0.1, 0.3), "damping": (1e-3, 1e-2, 1e-1, 1.0)},
    "modular": {
        "learning_rate": (0.003, 0.01, 0.03, 0.1),
        "rcond": tuple((a, d) for a in (None, 0.01, 0.1) for d in (None, 0.01, 0.1)),
        # At primitive granularity every map is of kind "primitive" (no activation or dense
        # maps): one cut-off for all of them, written as the pair (v, v).
        "rcond_primitive": tuple((v, v) for v in (None, 0.01, 0.1)),
    },
}

#: The second hyperparameter's default (stage 1 of the sweep runs at it) and the values a
#: level without a sweep file uses.
DEFAULTS = {
    "sgd": {"learning_rate": 0.1},
    "adam": {"learning_rate": 1e-2},
    "exact": {"learning_rate": 0.3, "damping": 1e-1},
    "kfac": {"learning_rate": 0.1, "damping": 1e-1},
    "modular": {"learning_rate": 0.01, "rcond": (None, None)},
}

#: The sweep: its seeds (disjoint from every level's reported seeds) and the fraction of
#: each run's steps it trains for (the full-length sweep would not fit the time budget).
SWEEP = {"seeds": (100, 101), "steps_fraction": 0.3}

#: Run sizes per level. ``steps``: a number, a dict per category, or ``None`` (the
#: setting's own); ``eval_every`` ``None``: the setting's own.
LEVELS = {
    "smoke": {
        "settings": ("digits",),
        "seeds": (0,),
        "sweep_seeds": (100,),
        "steps": 6,
        "eval_every": 3,
        "methods": ("sgd", "adam", "ngd-exact-gram", "ngd-modular-layer", "kfac"),
        "batch": 16,
        "max_train": 256,
        # Two values per grid: the sweep's code paths, in seconds.
        "grid_limit": 2,
    },
    "quick": {
        "settings": tuple(SETTINGS),
        "seeds": (0,),
        "sweep_seeds": (100,),
        # Enough steps for a median step time; a run's full length is ``steps × ...``.
        "steps": {"first_order": 100, "kfac": 100, "cg": 20, "gram": 20, "modular": 5},
        "eval_every": 20,
        "methods": tuple(METHODS),
        "batch": None,
        "max_train": None,
        "grid_limit": 2,
    },
    "full": {
        "settings": tuple(SETTINGS),
        "seeds": (0, 1, 2, 3, 4),
        "sweep_seeds": SWEEP["seeds"],
        "steps": None,
        "eval_every": None,
        "methods": tuple(METHODS),
        "batch": None,
        "max_train": None,
        "grid_limit": None,
    },
}
