"""Data sets available offline: scikit-learn's bundled sets and MNIST-1D generated locally.

Nothing is downloaded: ``load_digits`` and ``load_diabetes`` ship inside scikit-learn,
and MNIST-1D is built by the ``mnist1d`` package from its templates with its default
arguments (``make_dataset(get_dataset_args())``, 4000/1000 examples of length 40).
Inputs are standardised with training-set statistics; regression targets too.
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


def _standardise(train, test):
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _split(x, y, test_fraction=0.25, seed=0):
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _missing(package, extra="experiments"):
    return ImportError(f"this data set needs the `{package}` package: pip install -e '.[{extra}]'")


@functools.cache
def load(name: str) -> Dataset:
    """Load ``"digits"``, ``"mnist1d"`` or ``"diabetes"`` (cached per process).

    Raises:
        ImportError: the package providing the data is not installed.
        ValueError: an unknown name.
    """
    if name in ("digits", "diabetes"):
        try:
            from sklearn import datasets
        except ImportError as err:
            raise _missing("scikit-learn") from err
        if name == "digits":
            d = datasets.load_digits()
            xtr, ytr, xte, yte = _split(d.data.astype(np.float64), d.target.astype(np.int64))
            xtr, xte = _standardise(xtr, xte)
            return Dataset(xtr, ytr, xte, yte, 10, "classification")
        d = datasets.load_diabetes()
        xtr, ytr, xte, yte = _split(d.data.astype(np.float64), d.target.astype(np.float64))
        xtr, xte = _standardise(xtr, xte)
        ytr, yte = _standardise(ytr[:, None], yte[:, None])
        return Dataset(xtr, ytr, xte, yte, 1, "regression")
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
        xtr, xte = _standardise(d["x"].astype(np.float64), d["x_test"].astype(np.float64))
        return Dataset(
            xtr, d["y"].astype(np.int64), xte, d["y_test"].astype(np.int64), 10, "classification"
        )
    raise ValueError(f"unknown data set {name!r}; expected 'digits', 'mnist1d' or 'diabetes'.")
