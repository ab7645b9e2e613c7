"""The Gram route with an iterative output-space solve: block-Jacobi-preconditioned CG.

The Gram route (:mod:`natchain._solvers.gram`) reduces the damped natural gradient to one
system in output space, ``(C + λI) y = c``, ``C = Mᵀ J Jᵀ M`` of size ``N·r``, and factorises
``C``: its cost is the ``(N·r)³/3`` of a Cholesky factorisation, cubic in the batch. This
route solves the same system by conjugate gradient instead, never forming ``C``. A product
``C v = Mᵀ J Jᵀ M v`` is, per layer whose pattern offers it, a factored form (a dense
layer's input kernel: ``N²`` per output width, against two passes through the weight;
:meth:`~natchain._structure._base.AbstractPattern.gram_operator`), and for the other
leaves one JVP and one VJP of the model linearised in them (:func:`gram_product`). The
preconditioner is the block diagonal of ``C`` — the ``r × r`` block of each example with
itself, ``B_i B_iᵀ`` — built from the same per-layer structure the Gram route uses
(:func:`natchain._gram.factor_gram_diagonal`) at the cost of ``N`` one-example blocks, and
applied as ``N`` small Cholesky solves.

Why it helps: ``C``'s diagonal blocks carry each example's own scale (its input norm, its
output Fisher), which varies across the batch and spreads the spectrum; what is left after
dividing it out is the coupling between examples, which grows with the batch relative to
the layer widths. ``results/cost/`` records its step counts beside those of CG in
parameter space on the benchmark MLP; ``tests/test_gram_cg.py`` has a batch whose inputs
differ in scale by ``10⁴``, where it needs at most half of CG's steps. Where ``N·r`` nears
``P`` (or on convolutional networks, whose output-space system is far worse conditioned)
it needs more steps than CG in parameter space: ``solver="auto"`` costs both. Everything
else — the split of the cotangent, the refinement on failure, the residual test on the
original parameter-space system — is the Gram route's own; only ``(C + λI)⁻¹`` is
replaced.

The iteration needs ``λ > 0``: the undamped Gram formula applies ``C⁺`` twice, which CG
on a singular ``C`` does not give.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from natchain._gram import factor_gram_diagonal, model_in, site_data
from natchain._solvers.cg import conjugate_gradient
from natchain._solvers.gram import Gram
from natchain._status import default_tol

#: The output-space CG stops at this fraction of ``tol`` (its residual is not the
#: parameter-space one the residual test reads; a failed test is refined once).
INNER_TOL_FRACTION = 0.25


class GramCG(Gram):
    """Exact natural gradient through the output-space system, solved by
    block-Jacobi-preconditioned CG (see the module docstring).

    Args:
        tol: the residual test (``None``: :func:`natchain.default_tol` of the dtype); the
            output-space CG stops at ``0.25 · tol``.
        maxiter: CG step cap per solve (``None``: ``N·r``, the size of the system).
        structured: build the preconditioner's blocks from per-layer structure
            (``"auto"``/``True``) or from the materialised Jacobian (``False``).
        refine: as for :class:`Gram`: ``"auto"`` refines (one more CG solve) only where
            the residual test fails.
        check_float64: see :class:`natchain._solvers._base.AbstractSolver`.

    Statistics: ``num_steps`` (CG steps of the first solve), ``hit_cap``, ``size``
    (``N·r``) and ``structured_params``.

    Raises:
        ValueError: at solve time, damping known to be zero.
    """

    name = "gram_cg"

    def __init__(
        self,
        tol: float | None = None,
        maxiter: int | None = None,
        structured="auto",
        refine: int | str = "auto",
        check_float64: bool = False,
    ):
        super().__init__(structured=structured, refine=refine, tol=tol, check_float64=check_float64)
        if maxiter is not None and not (
            isinstance(maxiter, int) and not isinstance(maxiter, bool) and maxiter >= 1
        ):
            raise ValueError(f"maxiter must be a positive integer or None; got {maxiter!r}.")
        self.maxiter = maxiter
        del self.rcond, self.factorization, self.rows  # a factorisation's settings

    def _output_solver(self, problem, damping):
        if problem.damped is False:
            raise ValueError("solver='gram_cg' needs damping > 0 (use solver='gram' for λ = 0).")
        ms = problem.factor
        n, m, r = ms.shape
        dtype = problem.eta.dtype
        tol = default_tol(dtype) if self.tol is None else self.tol
        maxiter = n * r if self.maxiter is None else self.maxiter
        lam = jnp.asarray(damping, dtype)
        data = {} if self.structured is False else site_data(problem)
        diag = factor_gram_diagonal(problem, structured=self.structured, data=data)
        chol = jnp.linalg.cholesky(diag + lam * jnp.eye(r, dtype=dtype))
        product = gram_product(problem, data)
        block_solve = jax.vmap(lambda c_i, v_i: jsl.cho_solve((c_i, True), v_i))
        steps = []

        def damped(rhs):
            y, k = conjugate_gradient(
                lambda v: product(v) + lam * v,
                rhs.reshape(n, r),
                tol=INNER_TOL_FRACTION * tol,
                maxiter=maxiter,
                precondition=lambda v: block_solve(chol, v),
            )
            steps.append(k)
            return y.reshape(-1)

        solve_u, refine_u = self._output_maps(problem, damping, damped, None)
        leaves = jax.tree_util.tree_leaves(problem.params)
        covered = {leaf for site, _ in data.values() for leaf in site.leaves}
        stats = {
            "size": n * r,
            "structured_params": jnp.asarray(sum(int(leaves[i].size) for i in covered)),
        }

        def first_solve(b):  # the first solve's CG steps are the route's statistics
            u = solve_u(b)
            stats.update(num_steps=steps[0], hit_cap=steps[0] >= maxiter)
            return u

        return first_solve, refine_u, stats


def gram_product(problem, data):
    """``v ↦ C v`` for ``v`` of shape ``(N, r)``, ``C = Mᵀ J Jᵀ M``, never forming ``C``.

    Each site of ``data`` whose pattern offers a factored product
    (:meth:`~natchain._structure._base.AbstractPattern.gram_operator`) contributes it; the
    other leaves contribute ``Mᵀ J_rest J_restᵀ M v`` through the model linearised in
    those leaves only (one JVP and one VJP per product).
    """
    ms = problem.factor
    ops = {key: site.pattern.gram_operator(site, d) for key, (site, d) in data.items()}
    factored = [key for key, op in ops.items() if op is not None]
    leaves, treedef = jax.tree_util.tree_flatten(problem.params)
    covered = {leaf for key in factored for leaf in data[key][0].leaves}
    rest = [i for i in range(len(leaves)) if i not in covered]
    through_model = None
    if rest:
        primals = [leaves[i] for i in rest]
        _, jvp = jax.linearize(model_in(problem, leaves, treedef, rest), primals)
        vjp = jax.linear_transpose(jvp, primals)

        def through_model(v):
            u = jnp.einsum("nmr,nr->nm", ms, v).astype(problem.eta.dtype)
            return jnp.einsum("nmr,nm->nr", ms, jvp(vjp(u)[0]))

    def product(v):
        out = jnp.zeros_like(v)
        for key in factored:
            out = out + ops[key](v).astype(v.dtype)
        if through_model is not None:
            out = out + through_model(v).astype(v.dtype)
        return out

    return product
