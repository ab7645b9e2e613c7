"""The ``N·r`` push-through (Gram) route: solve in output space, map back with one VJP.

With ``B = Mᵀ J`` (``M`` the block-diagonal output-Fisher factor, ``F_theta = Bᵀ B``) and
``C = B Bᵀ = Mᵀ K M`` (``K = J Jᵀ``, the empirical NTK):

- if ``g = Bᵀ c`` for a known ``c`` (true and empirical Fisher: ``b`` lies in the range of
  ``F_blk``), then ``(BᵀB + λI)⁺ g = Bᵀ (C + λI)⁺ c`` — the minimum-norm answer even when
  ``F_eta`` is singular (softmax), unlike the naive ``Jᵀ (F_blk K)⁺ b``;
- otherwise (Monte-Carlo Fisher) ``g`` is split into ``Bᵀ c*`` with ``c* = C⁺ B g`` and a
  part ``g⊥`` in the null space of ``F_theta``, which contributes ``g⊥ / λ`` when damped
  and nothing when undamped (least squares, as the dense pseudo-inverse).

``C`` comes from per-layer structure where the model's dense layers are recognised
(:mod:`natchain._gram`), else from a materialised Jacobian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from natchain._gram import factor_gram
from natchain._sharding import GramRows, solve_rows
from natchain._solvers._base import (
    AbstractSolver,
    default_rcond,
    eigh_pinv_apply,
    relative_residual,
)


def _range_coefficients(problem):
    """``c`` with ``Mᵀ``-coordinates such that ``M c = b`` exactly (true / empirical Fisher)."""
    ms, b, eta = problem.factor, problem.cotangent, problem.eta
    n = eta.shape[0]
    if problem.kind == "true":
        # M_s = M / sqrt(N) and F_blk⁺ = N · blockdiag(F_i⁺): c = M_sᵀ F_blk⁺ b.
        nat = jax.vmap(problem.family.natural_cotangent)(eta, b)
        return n * jnp.einsum("nmr,nm->nr", ms, nat)
    # empirical: one column per example, b_i = -s_i / N lies on it.
    col = ms[:, :, 0]
    nrm2 = jnp.sum(col * col, axis=1)
    safe = jnp.where(nrm2 > 0, nrm2, 1.0)
    return (jnp.where(nrm2 > 0, jnp.sum(col * b, axis=1) / safe, 0.0))[:, None]


class Gram(AbstractSolver):
    """Exact natural gradient through the ``N·r × N·r`` matrix ``C = Mᵀ K M``.

    Args:
        rcond: cut-off for the pseudo-inverse of ``C`` (``None``: ``N·r · eps``).
        structured: build ``C`` from per-layer structure where dense layers are recognised
            (``"auto"``/``True``) or from the materialised Jacobian (``False``).
        factorization: ``"eigh"`` (pseudo-inverse, reports rank and cut-off),
            ``"cholesky"`` (damped only, fastest) or ``"auto"`` (Cholesky when the damping
            is a positive constant and the Fisher kind keeps ``g`` in range, else eigh).
        rows: shard the system by rows over a mesh axis: an axis name, a tuple of them,
            or a :class:`natchain._sharding.GramRows` (docs/sharding.md); ``None``: one
            matrix, placed by XLA.
    """

    name = "gram"

    def __init__(self, rcond=None, structured="auto", factorization="auto", rows=None):
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

    def _use_cholesky(self, problem, damping):
        positive = problem.damped is True
        if self.factorization == "cholesky":
            if not problem.in_range:
                raise ValueError("factorization='cholesky' is not available for kind='mc'.")
            if problem.damped is False:
                raise ValueError("factorization='cholesky' needs damping > 0.")
            return True
        return self.factorization == "auto" and positive and problem.in_range

    def solve(self, problem, damping):
        if self.rows is not None:
            return solve_rows(self, problem, damping, _range_coefficients)
        ms = problem.factor
        n, m, r = ms.shape
        cmat, gram_stats = factor_gram(problem, structured=self.structured)
        rcond = default_rcond(n * r, cmat.dtype) if self.rcond is None else self.rcond
        eye = jnp.eye(n * r, dtype=cmat.dtype)
        if problem.in_range:
            c = _range_coefficients(problem).reshape(-1)
            extra = None
        else:
            g = problem.gradient()
            bg = jnp.einsum("nmr,nm->nr", ms, problem.jvp(g)).reshape(-1)
            c, _ = eigh_pinv_apply(cmat, bg, rcond)
            extra = problem.cotangent - jnp.einsum("nmr,nr->nm", ms, c.reshape(n, r))
        if self._use_cholesky(problem, damping):
            y = jsl.cho_solve(jsl.cho_factor(cmat + damping * eye, lower=True), c)
            res = relative_residual(lambda v: cmat @ v + damping * v, y, c)
            stats = {"residual": res, "converged": jnp.isfinite(res)}
        else:
            y, stats = eigh_pinv_apply(cmat + damping * eye, c, rcond)
        u = jnp.einsum("nmr,nr->nm", ms, y.reshape(n, r))
        if extra is not None:
            u = u + jnp.where(damping > 0, extra / jnp.where(damping > 0, damping, 1.0), 0.0)
        stats.update(gram_stats)
        stats["size"] = jnp.asarray(n * r)
        return problem.vjp(u), stats
