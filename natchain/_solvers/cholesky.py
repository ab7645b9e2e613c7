"""Dense damped solve by Cholesky factorisation."""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.linalg as jsl

from natchain._solvers._base import DEFAULT_MAX_PARAMS, AbstractSolver, check_dense_size


class Cholesky(AbstractSolver):
    """Solve ``(F_theta + λI) n = g`` with a Cholesky factorisation of the dense matrix.

    Needs ``damping > 0`` (``F_theta`` alone is only semi-definite). A factorisation that
    broke down shows as ``result = non_finite``.

    Args:
        max_params: refuse ``P`` above this (``None``: no limit).
        tol, check_float64: the residual test, see :class:`AbstractSolver`.
    """

    name = "cholesky"

    def __init__(
        self,
        max_params: int | None = DEFAULT_MAX_PARAMS,
        tol: float | None = None,
        check_float64: bool = False,
    ):
        super().__init__(tol, check_float64)
        self.max_params = max_params

    def compute(self, problem, damping):
        if problem.damped is False:
            raise ValueError(
                "solver='cholesky' needs damping > 0 (F_theta is only positive semi-definite); "
                "use solver='pinv' or 'gram' for the undamped minimum-norm solution."
            )
        p = problem.num_params
        check_dense_size(p, self.max_params, self.name)
        b = problem.factor_jacobian()
        mat = b.T @ b + damping * jnp.eye(p, dtype=b.dtype)
        sol = jsl.cho_solve(jsl.cho_factor(mat, lower=True), problem.gradient())
        return problem.unravel(sol), {"size": p}
