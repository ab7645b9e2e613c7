"""Matrix-free conjugate gradient on ``F_theta + λI`` (JVP → ``F_blk`` → VJP per product)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from natchain._solvers._base import AbstractSolver
from natchain._status import default_tol


def _vdot(a, b):
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def _axpy(alpha, x, y):
    """``alpha · x + y`` on pytrees."""
    return jax.tree_util.tree_map(lambda u, v: alpha * u + v, x, y)


def conjugate_gradient(matvec, rhs, *, tol, maxiter, precondition=None):
    """CG from zero on pytrees, plain or preconditioned. Returns ``(x, num_steps)``.

    Stops when the recursive residual is at most ``tol · ‖b‖`` or after ``maxiter``
    steps; unlike ``jax.scipy.sparse.linalg.cg`` it reports how many steps ran (the
    solver then checks the true residual once). Started from zero on a singular PSD
    system with ``b`` in its range, plain CG's iterates stay in that range and tend to the
    minimum-norm solution. The iterates are pytrees (the parameters' own structure):
    flattening them inside the loop costs an order of magnitude on XLA's CPU backend.

    Args:
        matvec: ``v -> A v`` on pytrees shaped like ``rhs`` (``A`` symmetric PSD).
        rhs: ``b``.
        tol: relative stopping threshold on the residual's Euclidean norm.
        maxiter: step cap.
        precondition: ``r -> P r`` with ``P`` symmetric positive definite (an approximate
            inverse of ``A``), or ``None`` for plain CG. The stopping test stays on
            ``‖r‖`` (not the ``P``-norm), so both variants stop on the same criterion.
            With ``P`` the iterates lie in the range of ``P A``, not of ``A``: on a
            singular system the answer solves it but need not have minimum norm.
    """
    nb = jnp.sqrt(_vdot(rhs, rhs))
    thresh = tol * nb
    dtype = jax.tree_util.tree_leaves(rhs)[0].dtype
    tiny = jnp.finfo(dtype).tiny
    if precondition is None:
        apply_p = lambda r: r
    else:
        # The preconditioner may compute in a wider dtype (its factors, a float64 damping
        # under x64): the iterates keep the right-hand side's leaf dtypes.
        def apply_p(r):
            return jax.tree_util.tree_map(lambda z, ri: z.astype(ri.dtype), precondition(r), r)

    def like(tree):
        """``tree`` in the right-hand side's leaf dtypes (a product may widen a leaf)."""
        return jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), tree, rhs)

    def cond(state):
        *_, rr, k = state
        return (jnp.sqrt(rr) > thresh) & (k < maxiter)

    def body(state):
        x, r, p, rz, _, k = state
        ap = like(matvec(p))
        alpha = rz / jnp.maximum(_vdot(p, ap), tiny)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        z = apply_p(r)
        rr_new = _vdot(r, r)
        rz_new = rr_new if precondition is None else _vdot(r, z)
        p = _axpy(rz_new / jnp.maximum(rz, tiny), p, z)
        rz_new, rr_new = (jnp.asarray(v, rz.dtype) for v in (rz_new, rr_new))
        return like(x), like(r), like(p), rz_new, rr_new, k + 1

    x0 = jax.tree_util.tree_map(jnp.zeros_like, rhs)
    z0 = apply_p(rhs)
    rr0 = _vdot(rhs, rhs)
    rz0 = rr0 if precondition is None else _vdot(rhs, z0)
    state = (x0, rhs, z0, rz0, rr0, jnp.asarray(0, jnp.int32))
    x, *_, k = jax.lax.while_loop(cond, body, state)
    return x, k


class CG(AbstractSolver):
    """Damped conjugate gradient, never forming ``F_theta``.

    Args:
        tol: stop when the recursive residual is at most ``tol · ‖g‖ / 2``; success is then
            decided by the recomputed residual (``None``: :func:`natchain.default_tol` of the dtype,
            ``1e-10`` in float64 and ``5e-4`` in float32).
        maxiter: step cap (``None``: ``2 · P``).
        check_float64: see :class:`AbstractSolver`.

    Statistics: ``num_steps``; ``result`` is ``max_steps_reached`` when the cap stopped it.
    """

    name = "cg"

    def __init__(
        self, tol: float | None = None, maxiter: int | None = None, check_float64: bool = False
    ):
        super().__init__(tol, check_float64)
        if maxiter is not None and not (isinstance(maxiter, int) and maxiter >= 1):
            raise ValueError(f"maxiter must be a positive integer or None; got {maxiter!r}.")
        self.maxiter = maxiter

    def compute(self, problem, damping):
        maxiter = 2 * problem.num_params if self.maxiter is None else self.maxiter
        tol = default_tol(problem.flat.dtype) if self.tol is None else self.tol
        x, k = solve_damped(problem, damping, tol=tol, maxiter=maxiter)
        return x, {"num_steps": k, "hit_cap": k >= maxiter}


def solve_damped(problem, damping, *, tol, maxiter, precondition=None):
    """CG (plain or preconditioned) on ``(F_theta + λI) n = g`` for ``problem``.

    Linearises once: each step then costs one JVP and one VJP of the stored linear map.
    Stops a little below ``tol`` (the recursive residual drifts from the true one, and
    success is decided by the true residual, recomputed once afterwards). Returns
    ``(x, num_steps)`` with ``x`` a pytree shaped like the parameters.
    """
    params = problem.params
    _, jvp = jax.linearize(problem.f_tree, params)
    vjp = jax.linear_transpose(jvp, params)

    def matvec(v):
        return _axpy(damping, v, vjp(problem.apply_fblk(jvp(v)))[0])

    g = vjp(problem.cotangent)[0]
    return conjugate_gradient(matvec, g, tol=0.5 * tol, maxiter=maxiter, precondition=precondition)
