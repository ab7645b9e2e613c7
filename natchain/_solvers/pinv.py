"""Dense pseudo-inverse: the ground truth every other route is tested against."""

from __future__ import annotations

import jax.numpy as jnp

from natchain._solvers._base import (
    DEFAULT_MAX_PARAMS,
    AbstractSolver,
    check_dense_size,
    default_rcond,
    eigh_pinv_apply,
    relative_residual,
)


class Pinv(AbstractSolver):
    """Build ``F_theta`` (``P × P``) and apply its pseudo-inverse by symmetric eigendecomposition.

    Args:
        rcond: eigenvalues ``≤ rcond · λ_max`` are cut (``None``: ``P · eps``); the
            number cut and the absolute cut-off are reported as ``num_cut``, ``cutoff``.
        max_params: refuse ``P`` above this (``None``: no limit).
    """

    name = "pinv"

    def __init__(self, rcond: float | None = None, max_params: int | None = DEFAULT_MAX_PARAMS):
        if rcond is not None and not (0 <= rcond < 1):
            raise ValueError(f"rcond must lie in [0, 1); got {rcond!r}.")
        self.rcond = rcond
        self.max_params = max_params

    def solve(self, problem, damping):
        p = problem.num_params
        check_dense_size(p, self.max_params, self.name)
        b = problem.factor_jacobian()
        fisher = b.T @ b + damping * jnp.eye(p, dtype=b.dtype)
        g = problem.gradient()
        rcond = default_rcond(p, b.dtype) if self.rcond is None else self.rcond
        sol, stats = eigh_pinv_apply(fisher, g, rcond)
        stats["residual"] = relative_residual(lambda v: fisher @ v, sol, g)
        return sol, stats
