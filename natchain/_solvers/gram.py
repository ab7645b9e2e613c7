"""The ``N·r`` push-through (Gram) route: solve in output space, map back with one VJP.

With ``B = Mᵀ J`` (``M`` the block-diagonal output-Fisher factor, ``F_theta = Bᵀ B``),
``C = B Bᵀ = Mᵀ K M`` (``K = J Jᵀ``, the empirical NTK) and ``b`` the output cotangent
(``g = Jᵀ b``), pick any coefficients ``c̃`` and split ``b = M c̃ + z``. Then, exactly,

- damped: ``(F + λI)⁻¹ g = Jᵀ u`` with ``u = M (C + λI)⁻¹ (c̃ − r/λ) + z/λ`` and
  ``r = Mᵀ K z`` (``= B g − C c̃``);
- undamped: ``F⁺ g = Jᵀ M C⁺ (c̃ + C⁺ r)`` — the minimum-norm least-squares answer, as
  the dense pseudo-inverse (``C⁺ C⁺ B g`` with ``B g = C c̃ + r``), also when ``F_eta``
  is singular (softmax), unlike the naive ``Jᵀ (F_blk K)⁺ b``.

Any ``c̃`` gives the same answer; a good one makes the corrections small. natchain takes
per example the regularised least-squares coefficients ``c̃_i = (M_iᵀ M_i + δ_i I)⁻¹ M_iᵀ
b_i`` with ``δ_i`` a small multiple of ``eps · ‖M_i‖²`` (see :func:`_coefficients`): where
the family's factor is tiny (a class probability near zero) the exact ``M_i⁺ b_i`` would
be astronomically large (``1/√p``) and its round-off would swamp the rest; the
regularised coefficient stays bounded, the remainder stays in ``z`` and is handled by the
formulas above, through products of bounded quantities only. This holds for every Fisher
kind (for Monte-Carlo and empirical Fishers ``b`` need not lie in the range of ``M``:
``z`` carries the rest).

``C`` comes from per-layer structure where the model's dense layers are recognised
(:mod:`natchain._gram`), else from a materialised Jacobian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from natchain._gram import factor_gram
from natchain._sharding import GramRows, system_rows
from natchain._solvers._base import AbstractSolver, check_rcond, eigh_pinv


def _coefficients(ms):
    """``b ↦ c̃``: per example, the regularised least-squares coefficients of ``b_i`` on ``M_i``.

    ``c̃_i = (M_iᵀ M_i + δ_i I)⁻¹ M_iᵀ b_i`` with ``δ_i = 2 r · eps · tr(M_iᵀ M_i)``: above the
    round-off of forming ``M_iᵀ M_i`` (so the ``r × r`` Cholesky factorisation, computed
    once and reused for every right-hand side, cannot break down) and far below every
    direction that matters. A direction whose singular value ``σ`` is below ``√δ`` gets
    the bounded coefficient ``σ / (σ² + δ) ≤ 1 / (2√δ)`` instead of ``1/σ``, the role the
    ``√eps`` cut of a per-example pseudo-inverse plays, for a tenth of its cost on CPU
    (batched ``r × r`` Cholesky against batched SVD). Any ``c̃`` is exact (module docstring).
    """
    n, m, r = ms.shape
    eps = float(jnp.finfo(ms.dtype).eps)
    gram = jnp.einsum("nmr,nms->nrs", ms, ms)
    trace = jnp.trace(gram, axis1=1, axis2=2)
    tiny = float(jnp.finfo(ms.dtype).tiny)
    delta = jnp.maximum(2 * r * eps * trace, tiny)
    chol = jnp.linalg.cholesky(gram + delta[:, None, None] * jnp.eye(r, dtype=ms.dtype))

    def coef(b):
        rhs = jnp.einsum("nmr,nm->nr", ms, b)
        return jax.vmap(lambda c, v: jsl.cho_solve((c, True), v))(chol, rhs)

    return coef


def _split_cotangent(problem, b, coefficients):
    """``c̃`` (``(N·r,)``), ``z = b − M c̃`` (``(N, m)``) and ``r = Mᵀ K z`` (``(N·r,)``)."""
    ms = problem.factor
    coef = coefficients(b)
    z = b - jnp.einsum("nmr,nr->nm", ms, coef)
    kz = problem.ntk_vp(z)
    r = jnp.einsum("nmr,nm->nr", ms, kz).reshape(-1)
    return coef.reshape(-1), z, r


class Gram(AbstractSolver):
    """Exact natural gradient through the ``N·r × N·r`` matrix ``C = Mᵀ K M``.

    Args:
        rcond: cut-off for the pseudo-inverse of ``C + λI`` (``None``: ``N·r · eps``
            undamped, ``eps`` damped; see :func:`natchain._solvers._base.default_rcond`).
        structured: build ``C`` from per-layer structure where dense layers are recognised
            (``"auto"``/``True``) or from the materialised Jacobian (``False``).
        factorization: ``"eigh"`` (pseudo-inverse, reports rank and cut-off),
            ``"cholesky"`` (damped only, fastest) or ``"auto"`` (Cholesky when the damping
            is known to be positive, else eigh).
        refine: iterative refinement on the output-space residual (each step one more
            product with ``K`` and one more solve with the same factorisation):
            ``(F + λI) n − g = Jᵀ (F_blk K u + λu − b)`` for ``n = Jᵀ u``. ``"auto"``
            (default): one step only where the residual test fails without it (under
            ``jit`` a ``lax.cond``: the common case pays nothing); an integer: that many
            steps always.
        rows: shard the system by rows over a mesh axis: an axis name, a tuple of them,
            or a :class:`natchain.GramRows` (docs/sharding.md); ``None``: one matrix,
            placed by XLA.
        tol, check_float64: the residual test, see :class:`AbstractSolver`.
    """

    name = "gram"

    def __init__(
        self,
        rcond=None,
        structured="auto",
        factorization="auto",
        refine: int | str = "auto",
        tol: float | None = None,
        check_float64: bool = False,
        rows=None,
    ):
        super().__init__(tol, check_float64)
        if refine != "auto" and not (
            isinstance(refine, int) and not isinstance(refine, bool) and refine >= 0
        ):
            raise ValueError(f"refine must be 'auto' or a non-negative integer; got {refine!r}.")
        self.refine = refine
        check_rcond(rcond)
        if structured not in ("auto", True, False):
            raise ValueError(f"structured must be 'auto', True or False; got {structured!r}.")
        if factorization not in ("auto", "eigh", "cholesky"):
            raise ValueError(
                f"factorization must be 'auto', 'eigh' or 'cholesky'; got {factorization!r}."
            )
        self.rcond = rcond
        self.structured = structured
        self.factorization = factorization
        self.rows = GramRows.of(rows)

    def _use_cholesky(self, problem):
        if self.factorization == "cholesky":
            if problem.damped is False:
                raise ValueError("factorization='cholesky' needs damping > 0.")
            return True
        return self.factorization == "auto" and problem.damped is True

    def factorise(self, cmat, problem, damping):
        """``(damped, undamped, stats)``: products with ``(C + λI)⁻¹`` and ``C⁺``.

        ``undamped`` is ``None`` when the factorisation is Cholesky (damping known > 0).
        """
        if self._use_cholesky(problem):
            eye = jnp.eye(cmat.shape[0], dtype=cmat.dtype)
            factor = jsl.cho_factor(cmat + damping * eye, lower=True)
            return (lambda v: jsl.cho_solve(factor, v)), None, {"size": cmat.shape[0]}
        damped, stats = eigh_pinv(cmat, damping, self.rcond)
        return damped, damped, stats  # undamped selected only where damping == 0: C⁺

    def compute(self, problem, damping):
        solve_u, refine_u, stats = self._output_solver(problem, damping)
        u = solve_u(problem.cotangent)
        for _ in range(0 if self.refine == "auto" else self.refine):
            u = refine_u(u)
        return problem.vjp_tree(u), stats

    def solve(self, problem, damping, prepared=None):
        """:meth:`AbstractSolver.solve`; with ``refine="auto"`` a solve whose residual test
        fails gets one step of refinement and is tested again (``stats["refined"]``)."""
        if self.refine != "auto" or prepared is not None:
            return super().solve(problem, damping, prepared)
        solve_u, refine_u, measured = self._output_solver(problem, damping)
        u = solve_u(problem.cotangent)

        def tested(u, refined):
            n = problem.vjp_tree(u)
            return n, self.check(problem, damping, n, dict(measured, refined=jnp.asarray(refined)))

        first = tested(u, False)
        return jax.lax.cond(first[1]["converged"], lambda: first, lambda: tested(refine_u(u), True))

    def _output_solver(self, problem, damping):
        """``(solve_u, refine_u, stats)``: ``b ↦ u`` with ``(F + λI)⁺ g = Jᵀ u`` for the
        cotangent ``b``, one refinement step ``u ↦ u'`` against the problem's own ``b``,
        and the output-space solve's statistics (a subclass may complete them in the
        first call of ``solve_u``)."""
        if self.rows is not None:
            damped, undamped, stats = system_rows(self, problem, damping)
        else:
            cmat, gram_stats = factor_gram(problem, structured=self.structured)
            damped, undamped, stats = self.factorise(cmat, problem, damping)
            stats.update(gram_stats)
        return (*self._output_maps(problem, damping, damped, undamped), stats)

    def _output_maps(self, problem, damping, damped, undamped):
        """``(solve_u, refine_u)`` from products with ``(C + λI)⁻¹`` (``damped``) and ``C⁺``
        (``undamped``; ``None`` where the damping is known to be positive)."""
        ms = problem.factor
        n, m, r = ms.shape
        positive = damping > 0
        lam = jnp.where(positive, damping, 1.0)
        coefficients = _coefficients(ms)

        def solve_u(b):
            coef, z, resid = _split_cotangent(problem, b, coefficients)
            y = damped(coef - resid / lam)
            if undamped is not None:
                y = jnp.where(positive, y, undamped(coef + undamped(resid)))
            u = jnp.einsum("nmr,nr->nm", ms, y.reshape(n, r))
            return u + jnp.where(positive, z / lam, 0.0)

        b = problem.cotangent

        def refine_u(u):  # one step of iterative refinement on the output-space residual
            return u + solve_u(b - problem.apply_fblk(problem.ntk_vp(u)) - damping * u)

        return solve_u, refine_u
