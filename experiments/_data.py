"""Data sets available offline: scikit-learn's bundled sets and MNIST-1D generated locally.

Nothing is downloaded: ``load_digits`` and ``load_diabetes`` ship inside scikit-learn,
and MNIST-1D is built by the ``mnist1d`` package from its templates with its default
arguments (``make_dataset(get_dataset_args())``, 4000/1000 examples of length 40).
Inputs are standardised with training-set statistics; regression targets too.

``load(name, validation=f)`` also carves a validation split: a fraction ``f`` of the
training examples (a fixed permutation, seed ``VALIDATION_SEED``) is moved to ``x_val`` /
``y_val`` *before* standardising, so the statistics come from the remaining training
examples only; the test split is untouched. Without ``validation`` the fields are ``None``
and everything is as before.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_outputs: int
    task: str  # "classification" or "regression"
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def sizes(self) -> dict:
        """Number of examples per split (``val`` is 0 without a validation split)."""
        return {
            "train": len(self.x_train),
            "val": 0 if self.x_val is None else len(self.x_val),
            "test": len(self.x_test),
        }


#: Seed of the permutation that carves the validation split out of the training split.
VALIDATION_SEED = 2024


def _standardise(train, *others):
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return ((train - mean) / std, *((o - mean) / std for o in others))


def _carve(xtr, ytr, validation):
    """``(x_train, y_train, x_val, y_val)``: a fraction ``validation`` moved to validation."""
    if not (isinstance(validation, (int, float)) and 0 <= validation < 1):
        raise ValueError(f"validation must be a fraction in [0, 1); got {validation!r}.")
    if validation == 0:
        return xtr, ytr, None, None
    perm = np.random.default_rng(VALIDATION_SEED).permutation(len(xtr))
    n_val = int(round(validation * len(xtr)))
    if n_val < 1 or n_val >= len(xtr):
        raise ValueError(f"validation={validation} leaves an empty split of {len(xtr)} examples.")
    va, tr = perm[:n_val], perm[n_val:]
    return xtr[tr], ytr[tr], xtr[va], ytr[va]


def _finish(xtr, ytr, xte, yte, num_outputs, task, validation, scale_targets=False):
    xtr, ytr, xva, yva = _carve(xtr, ytr, validation)
    if xva is None:
        xtr, xte = _standardise(xtr, xte)
        if scale_targets:
            ytr, yte = _standardise(ytr, yte)
        return Dataset(xtr, ytr, xte, yte, num_outputs, task)
    xtr, xte, xva = _standardise(xtr, xte, xva)
    if scale_targets:
        ytr, yte, yva = _standardise(ytr, yte, yva)
    return Dataset(xtr, ytr, xte, yte, num_outputs, task, xva, yva)


def _split(x, y, test_fraction=0.25, seed=0):
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _missing(package, extra="experiments"):
    return ImportError(f"this data set needs the `{package}` package: pip install -e '.[{extra}]'")


@functools.cache
def load(name: str, validation: float = 0.0) -> Dataset:
    """Load ``"digits"``, ``"mnist1d"`` or ``"diabetes"`` (cached per process).

    Args:
        name: the data set.
        validation: the fraction of the training split held out as ``x_val``/``y_val``
            (0: none).

    Raises:
        ImportError: the package providing the data is not installed.
        ValueError: an unknown name, or a ``validation`` fraction outside ``[0, 1)``.
    """
    if name in ("digits", "diabetes"):
        try:
            from sklearn import datasets
        except ImportError as err:
            raise _missing("scikit-learn") from err
        if name == "digits":
            d = datasets.load_digits()
            xtr, ytr, xte, yte = _split(d.data.astype(np.float64), d.target.astype(np.int64))
            return _finish(xtr, ytr, xte, yte, 10, "classification", validation)
        d = datasets.load_diabetes()
        xtr, ytr, xte, yte = _split(d.data.astype(np.float64), d.target.astype(np.float64))
        return _finish(
            xtr, ytr[:, None], xte, yte[:, None], 1, "regression", validation, scale_targets=True
        )
    if name == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as err:
            raise _missing("mnist1d") from err
        state = np.random.get_state()
        try:
            d = make_dataset(get_dataset_args())  # local generation; seeds numpy globally
        finally:
            np.random.set_state(state)
        return _finish(
            d["x"].astype(np.float64),
            d["y"].astype(np.int64),
            d["x_test"].astype(np.float64),
            d["y_test"].astype(np.int64),
            10,
            "classification",
            validation,
        )
    raise ValueError(f"unknown data set {name!r}; expected 'digits', 'mnist1d' or 'diabetes'.")
