"""Matrix-free conjugate gradient on ``F_theta + λI`` (JVP → ``F_blk`` → VJP per product)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from natchain._solvers._base import AbstractSolver


def _vdot(a, b):
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def _axpy(alpha, x, y):
    """``alpha · x + y`` on pytrees."""
    return jax.tree_util.tree_map(lambda u, v: alpha * u + v, x, y)


def conjugate_gradient(matvec, rhs, *, tol, maxiter):
    """Plain CG from zero on pytrees. Returns ``(x, num_steps, relative_residual)``.

    Unlike ``jax.scipy.sparse.linalg.cg`` this reports how many steps ran and the
    final relative residual ``‖b − A x‖ / ‖b‖`` (recomputed, not the recursive one).
    Started from zero on a singular PSD system with ``b`` in its range, the iterates
    stay in that range and tend to the minimum-norm solution. The iterates are pytrees
    (the parameters' own structure): flattening them inside the loop costs an order of
    magnitude on XLA's CPU backend.
    """
    nb = jnp.sqrt(_vdot(rhs, rhs))
    thresh = tol * nb
    dtype = jax.tree_util.tree_leaves(rhs)[0].dtype
    tiny = jnp.finfo(dtype).tiny

    def cond(state):
        _, _, _, rr, k = state
        return (jnp.sqrt(rr) > thresh) & (k < maxiter)

    def body(state):
        x, r, p, rr, k = state
        ap = matvec(p)
        alpha = rr / jnp.maximum(_vdot(p, ap), tiny)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _vdot(r, r)
        p = _axpy(rr_new / jnp.maximum(rr, tiny), p, r)
        return x, r, p, rr_new, k + 1

    x0 = jax.tree_util.tree_map(jnp.zeros_like, rhs)
    state = (x0, rhs, rhs, _vdot(rhs, rhs), jnp.asarray(0, jnp.int32))
    x, _, _, _, k = jax.lax.while_loop(cond, body, state)
    resid = _axpy(-1.0, matvec(x), rhs)
    res = jnp.sqrt(_vdot(resid, resid)) / jnp.where(nb > 0, nb, 1.0)
    return x, k, res


class CG(AbstractSolver):
    """Damped conjugate gradient, never forming ``F_theta``.

    Args:
        tol: stop when ``‖g − (F + λI) n‖ ≤ tol · ‖g‖``.
        maxiter: step cap (``None``: ``2 · P``).

    Statistics: ``num_steps``, ``residual`` (final relative residual) and
    ``converged`` (``residual ≤ tol``, with a little slack for round-off in recomputing it).
    """

    name = "cg"

    def __init__(self, tol: float = 1e-10, maxiter: int | None = None):
        if not tol > 0:
            raise ValueError(f"tol must be > 0; got {tol!r}.")
        if maxiter is not None and not (isinstance(maxiter, int) and maxiter >= 1):
            raise ValueError(f"maxiter must be a positive integer or None; got {maxiter!r}.")
        self.tol = tol
        self.maxiter = maxiter

    def solve(self, problem, damping):
        maxiter = 2 * problem.num_params if self.maxiter is None else self.maxiter
        # Linearise once: each CG step then costs one JVP and one VJP of the stored linear map.
        params = problem.params
        _, jvp = jax.linearize(problem.f_tree, params)
        vjp = jax.linear_transpose(jvp, params)

        def matvec(v):
            return _axpy(damping, v, vjp(problem.apply_fblk(jvp(v)))[0])

        g = vjp(problem.cotangent)[0]
        x, k, res = conjugate_gradient(matvec, g, tol=self.tol, maxiter=maxiter)
        x = problem.ravel(x)
        return x, {"num_steps": k, "residual": res, "converged": res <= 2 * self.tol}
