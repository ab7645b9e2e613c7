"""Matrix-free conjugate gradient on ``F_theta + λI`` (JVP → ``F_blk`` → VJP per product)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from natchain._solvers._base import AbstractSolver


def conjugate_gradient(matvec, rhs, *, tol, maxiter):
    """Plain CG from zero. Returns ``(x, num_steps, relative_residual)``.

    Unlike ``jax.scipy.sparse.linalg.cg`` this reports how many steps ran and the
    final relative residual ``‖b − A x‖ / ‖b‖`` (recomputed, not the recursive one).
    Started from zero on a singular PSD system with ``b`` in its range, the iterates
    stay in that range and tend to the minimum-norm solution.
    """
    nb = jnp.linalg.norm(rhs)
    thresh = tol * nb
    tiny = jnp.finfo(rhs.dtype).tiny

    def cond(state):
        _, r, _, rr, k = state
        return (jnp.sqrt(rr) > thresh) & (k < maxiter)

    def body(state):
        x, r, p, rr, k = state
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        alpha = rr / jnp.maximum(pap, tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = jnp.vdot(r, r)
        p = r + (rr_new / jnp.maximum(rr, tiny)) * p
        return x, r, p, rr_new, k + 1

    x0 = jnp.zeros_like(rhs)
    state = (x0, rhs, rhs, jnp.vdot(rhs, rhs), jnp.asarray(0, jnp.int32))
    x, _, _, _, k = jax.lax.while_loop(cond, body, state)
    res = jnp.linalg.norm(rhs - matvec(x)) / jnp.where(nb > 0, nb, 1.0)
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
        g = problem.gradient()
        maxiter = 2 * problem.num_params if self.maxiter is None else self.maxiter
        # Linearise once: each CG step then costs one JVP and one VJP of the stored linear map.
        _, jvp = jax.linearize(problem.f, problem.flat)
        vjp = jax.linear_transpose(jvp, problem.flat)

        def matvec(v):
            return vjp(problem.apply_fblk(jvp(v)))[0] + damping * v

        x, k, res = conjugate_gradient(matvec, g, tol=self.tol, maxiter=maxiter)
        return x, {"num_steps": k, "residual": res, "converged": res <= 2 * self.tol}
