"""Dense pseudo-inverse: the ground truth every other route is tested against."""

from __future__ import annotations

from natchain._solvers._base import (
    DEFAULT_MAX_PARAMS,
    AbstractSolver,
    check_dense_size,
    check_rcond,
    eigh_pinv,
)


class Pinv(AbstractSolver):
    """Build ``F_theta`` (``P × P``) and apply ``(F_theta + λI)⁺`` by symmetric eigendecomposition.

    Args:
        rcond: eigenvalues of ``F + λI`` at or below ``rcond · λ_max`` are cut (``None``:
            ``P · eps`` undamped, ``eps`` damped — never a direction the damping has made
            well-conditioned); the number cut and the absolute cut-off are reported as
            ``num_cut`` and ``cutoff``.
        max_params: refuse ``P`` above this (``None``: no limit).
        tol, check_float64: the residual test, see :class:`AbstractSolver`.
    """

    name = "pinv"

    def __init__(
        self,
        rcond: float | None = None,
        max_params: int | None = DEFAULT_MAX_PARAMS,
        tol: float | None = None,
        check_float64: bool = False,
    ):
        super().__init__(tol, check_float64)
        check_rcond(rcond)
        self.rcond = rcond
        self.max_params = max_params

    def compute(self, problem, damping):
        check_dense_size(problem.num_params, self.max_params, self.name)
        b = problem.factor_jacobian()
        apply, stats = eigh_pinv(b.T @ b, damping, self.rcond)
        return problem.unravel(apply(problem.gradient())), stats
