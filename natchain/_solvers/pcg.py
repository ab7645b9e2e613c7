"""Preconditioned CG on ``F_theta + λI`` with a Kronecker-factored block preconditioner.

The system is the one :mod:`natchain._solvers.cg` solves, matrix-free on the exact
Fisher-vector product (the model linearised once), and the answer is decided by the same
residual test on the original system: the preconditioner changes how many steps it
takes, never what is accepted as the answer.

The preconditioner ``P ≈ (F_theta + λI)⁻¹`` is block-diagonal over the parameter leaves:

- **Dense layers** the structure registry recognises (:mod:`natchain._structure.dense`,
  a folded bias included) get a Kronecker-factored block, as K-FAC builds one. With the
  layer's input rows ``H`` (``R × C``: every example, and every token of a sequence, one
  row; a ones column appended for the bias) and the rows ``D`` (``R × O``) of the
  output-side factor back-propagated to the layer's output,
  ``A = HᵀH / R`` and ``G = DᵀD``, and the layer's block of ``F_theta`` is approximated by
  ``A ⊗ G``. ``D`` comes from probes of the output-Fisher factor ``M``: its ``r`` columns
  (``samples=None``, one backward pass each) or ``samples`` random ±1 combinations of them
  per example (``E[ξξᵀ] = I``, so ``E[G]`` is the same; one backward pass each, cheaper).
  The damped block is inverted either with the damping split between the factors
  (``damping_split="pi"``: ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹``, ``π² = (tr A / dim A) /
  (tr G / dim G)``) or exactly in the factors' eigenbasis (``"eigen"``:
  ``(A ⊗ G + λI)⁻¹``).
- **Every other leaf** (convolution kernels, scales, leaves no pattern claims) gets a
  diagonal block ``(diag F + λ)⁻¹``, the diagonal from per-example gradients at the same
  probes; where the inputs are not batch-major it is the identity scaled by an unbiased
  estimate of the leaf's mean diagonal.

Each factor is kept as a thin eigendecomposition: ``eigh`` of the ``dim × dim`` factor
when there are at least as many rows as its dimension, else a QR of the rows and ``eigh``
of the small ``R × R`` system (the factor has rank at most ``R``; the rest of its spectrum
is zero). So a fresh preconditioner costs ``min(R, dim)³`` per factor, not ``dim³``.
:meth:`PCG.prepare` returns these eigendecompositions (damping-free) as a pytree, so that
an optimiser can keep one across steps; a stale one (another batch, earlier parameters,
another damping) is still a valid SPD preconditioner.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from natchain._checks import check_choice
from natchain._solvers._base import AbstractSolver
from natchain._solvers.cg import solve_damped
from natchain._status import default_tol

PRECONDITIONERS = ("kronecker", "diagonal")
DAMPING_SPLITS = ("pi", "eigen")


def _prod(shape, axes):
    return math.prod(int(shape[a]) for a in axes)


# ---------------------------------------------------------------------------- layout


class _DenseBlock:
    """One dense site's leaves as the ``(C[+1]) × O`` matrix the Kronecker block acts on."""

    def __init__(self, site, leaves):
        self.site = site
        info = site.info
        self.info = info
        self.w_leaf = site.leaves[0]
        self.b_leaf = site.leaves[1] if site.shift is not None else None
        self.out_order = (*info["out_h"], *info["out_w"])
        self.nh = len(info["h_free"])
        self.c = _prod(site.views[0].shape, info["w_contract"])
        self.o = _prod(site.views[0].shape, info["w_free"])
        self.dim_a = self.c + (self.b_leaf is not None)
        self.like = tuple(leaves[i] for i in site.leaves)

    def _w_mat(self, w):
        info = self.info
        v = jnp.transpose(self.site.views[0].apply(w), (*info["w_contract"], *info["w_free"]))
        return v.reshape(self.c, self.o)

    def _b_row(self, b):
        val = self.site.shift.anchor_value(b, self.site.out_shape)
        val = jnp.transpose(val, self.out_order)
        return val.reshape(-1, self.o)[0]

    def to_mat(self, *vals):
        """The leaves (weight, then bias) as one matrix; a bijection (a permutation)."""
        mat = self._w_mat(vals[0])
        if self.b_leaf is not None:
            mat = jnp.concatenate([mat, self._b_row(vals[1])[None]], axis=0)
        return mat

    def from_mat(self, mat):
        """The inverse of :meth:`to_mat`: a permutation's inverse is its transpose."""
        like = [jnp.zeros(np.shape(v), jnp.result_type(v)) for v in self.like]
        out = jax.linear_transpose(self.to_mat, *like)(mat.astype(self.like[0].dtype))
        return tuple(o.astype(jnp.result_type(v)) for o, v in zip(out, self.like, strict=True))

    def input_rows(self, h):
        """``H``: the recorded input as ``R × C`` rows (a ones column for the bias)."""
        info = self.info
        hm = jnp.transpose(h, (*info["h_free"], *info["h_contract"]))
        hm = hm.reshape(-1, self.c)
        if self.b_leaf is not None:
            hm = jnp.concatenate([hm, jnp.ones((hm.shape[0], 1), hm.dtype)], axis=1)
        return hm

    def output_rows(self, cot):
        """``D``: a cotangent of the site's output as ``R × O`` rows."""
        return jnp.transpose(self.site.to_anchor(cot), self.out_order).reshape(-1, self.o)


def _layout(problem, preconditioner):
    """``(leaves, treedef, blocks, rest, closed, sites)`` of the problem's parameters."""
    from natchain._gram import analyse

    leaves, treedef = jax.tree_util.tree_flatten(problem.params)
    blocks, sites, closed = [], {}, None
    if preconditioner == "kronecker":
        closed, structure = analyse(problem.model, problem.params, problem.x)
        for key, site in sorted(structure.sites.items()):
            if site.pattern.name == "dense":
                sites[key] = site
                blocks.append(_DenseBlock(site, leaves))
    covered = {leaf for b in blocks for leaf in b.site.leaves}
    rest = [i for i in range(len(leaves)) if i not in covered]
    return leaves, treedef, blocks, rest, closed, sites


# ---------------------------------------------------------------------------- statistics


def _thin_eigh(rows, scale):
    """Thin eigendecomposition ``(Q, e)`` of ``scale · rowsᵀ rows`` (``Q`` orthonormal).

    With fewer rows than columns, ``Q`` spans the rows (a QR, then ``eigh`` of the small
    system): the factor's spectrum outside it is zero. Eigenvalues are clipped at zero (a
    PSD matrix: negative ones are round-off).
    """
    n, d = rows.shape
    if n >= d:
        e, q = jnp.linalg.eigh(scale * (rows.T @ rows))
    else:
        q0, tri = jnp.linalg.qr(rows.T)  # d × n orthonormal, n × n
        e, w = jnp.linalg.eigh(scale * (tri @ tri.T))
        q = q0 @ w
    return q, jnp.maximum(e, 0.0)


def _probes(problem, samples, seed):
    """Output cotangents ``U`` (``k × N × m``) with ``E[Σ_s U_s U_sᵀ] = F_blk`` blockwise."""
    ms = problem.factor  # (N, m, r), 1/√N inside
    if samples is None:
        return jnp.moveaxis(ms, 2, 0)  # the r columns: exact
    n, _, r = ms.shape
    xi = jax.random.rademacher(jax.random.PRNGKey(seed), (samples, n, r), ms.dtype)
    return jnp.einsum("nmr,snr->snm", ms, xi) / math.sqrt(samples)


def _rest_diagonals(problem, leaves, treedef, rest, us):
    """``diag F`` of each leaf in ``rest``, from per-example gradients at the probes.

    Where an input leaf is not batch-major the per-example split is unknown: the block is
    then the identity scaled by ``Σ_s ‖J_leafᵀ U_s‖² / size``, an unbiased estimate of the
    leaf's mean diagonal (the probes are independent across examples).
    """
    if not rest:
        return ()
    n = problem.batch_size
    x_leaves, x_def = jax.tree_util.tree_flatten(problem.x)
    sub0 = [leaves[i] for i in rest]

    def model_at(sub, x):
        ls = list(leaves)
        for i, leaf in zip(rest, sub, strict=True):
            ls[i] = leaf
        return problem.model(jax.tree_util.tree_unflatten(treedef, ls), x)

    if all(np.ndim(a) >= 1 and np.shape(a)[0] == n for a in x_leaves):

        def per_example(u_i, *x_i):
            x1 = jax.tree_util.tree_unflatten(x_def, [a[None] for a in x_i])
            return jax.grad(lambda sub: jnp.vdot(u_i, model_at(sub, x1)[0]))(sub0)

        def one_probe(u):
            grads = jax.vmap(per_example)(u, *x_leaves)
            return [jnp.sum(jnp.square(g), axis=0) for g in grads]

        per = jax.lax.map(one_probe, us)
        return tuple(jnp.sum(d, axis=0) for d in per)

    _, vjp = jax.vjp(lambda sub: model_at(sub, problem.x), sub0)

    def trace_probe(u):
        return [jnp.sum(jnp.square(g)) for g in vjp(u.astype(problem.eta.dtype))[0]]

    traces = jax.lax.map(trace_probe, us)
    return tuple(
        jnp.full(np.shape(leaf), jnp.sum(t) / max(int(np.size(leaf)), 1), leaf.dtype)
        for t, leaf in zip(traces, sub0, strict=True)
    )


# ---------------------------------------------------------------------------- the solver


class PCG(AbstractSolver):
    """Damped CG on the exact Fisher, preconditioned by Kronecker-factored layer blocks.

    Args:
        preconditioner: ``"kronecker"`` (Kronecker blocks for recognised dense layers,
            diagonal blocks for every other leaf) or ``"diagonal"`` (diagonal blocks for
            every leaf).
        tol: stop when the recursive residual is at most ``tol · ‖g‖ / 2``; success is then
            decided by the recomputed residual (``None``: :func:`natchain.default_tol` of
            the dtype, ``1e-10`` in float64 and ``5e-4`` in float32).
        maxiter: step cap (``None``: ``2 · P``).
        samples: random ±1 combinations of the output-Fisher factor's columns per example
            for the curvature statistics (one backward pass each), or ``None`` for every
            column (``r`` passes, the exact factors of the given Fisher).
        damping_split: ``"pi"`` (damping split between the Kronecker factors by the trace
            ratio ``π``) or ``"eigen"`` (``(A ⊗ G + λI)⁻¹`` exactly, in the factors'
            eigenbasis).
        seed: seed of the random combinations (the preconditioner only; the answer does
            not depend on it).
        check_float64: see :class:`AbstractSolver`.

    Needs ``damping > 0``: with a preconditioner the iterates leave the range of
    ``F_theta``, so an undamped solve would not return the minimum-norm answer.

    Statistics: ``num_steps``; ``result`` is ``max_steps_reached`` when the cap stopped it;
    extras ``kronecker_params`` (parameters in Kronecker blocks) and ``kronecker_blocks``.
    """

    name = "pcg"

    def __init__(
        self,
        preconditioner: str = "kronecker",
        tol: float | None = None,
        maxiter: int | None = None,
        check_float64: bool = False,
        samples: int | None = 1,
        damping_split: str = "pi",
        seed: int = 0,
    ):
        super().__init__(tol, check_float64)
        check_choice(preconditioner, PRECONDITIONERS, "preconditioner")
        check_choice(damping_split, DAMPING_SPLITS, "damping_split")
        if maxiter is not None and not (
            isinstance(maxiter, int) and not isinstance(maxiter, bool) and maxiter >= 1
        ):
            raise ValueError(f"maxiter must be a positive integer or None; got {maxiter!r}.")
        if samples is not None and not (
            isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1
        ):
            raise ValueError(
                f"samples must be a positive integer or None (every factor column); "
                f"got {samples!r}."
            )
        if not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer; got {seed!r}.")
        self.preconditioner = preconditioner
        self.maxiter = maxiter
        self.samples = samples
        self.damping_split = damping_split
        self.seed = seed

    # -- the preconditioner ------------------------------------------------------------

    def prepare(self, problem, damping=None):
        """The preconditioner's statistics at ``problem``, damping-free, as a pytree.

        Returns ``{"kronecker": ({"qa", "ea", "qg", "eg"}, …), "diagonal": (d, …)}``: per
        recognised dense layer the thin eigendecompositions of its factors ``A`` and
        ``G`` (see the module docstring), per remaining leaf its Fisher diagonal. The
        damping is applied when the preconditioner is used, so ``damping`` is not read.
        """
        leaves, treedef, blocks, rest, closed, sites = _layout(problem, self.preconditioner)
        us = _probes(problem, self.samples, self.seed)
        kron = []
        if blocks:
            from natchain._gram import tap_cotangents

            recorded, cots = tap_cotangents(problem, leaves, closed, sites, us)
            for b in blocks:
                (h,) = recorded[b.site.key]
                hm = b.input_rows(h.astype(problem.eta.dtype))
                qa, ea = _thin_eigh(hm, 1.0 / hm.shape[0])
                d = jax.vmap(b.output_rows)(cots[b.site.tap_key])  # (k, R, O)
                qg, eg = _thin_eigh(d.reshape(-1, b.o), 1.0)
                kron.append({"qa": qa, "ea": ea, "qg": qg, "eg": eg})
        diag = _rest_diagonals(problem, leaves, treedef, rest, us)
        return {"kronecker": tuple(kron), "diagonal": tuple(diag)}

    def _check_prepared(self, prepared, blocks, rest, leaves):
        if not (isinstance(prepared, dict) and set(prepared) == {"kronecker", "diagonal"}):
            raise ValueError(
                "prepared must be what PCG.prepare returned (a dict with 'kronecker' and "
                f"'diagonal'); got {type(prepared).__name__}."
            )
        kron, diag = prepared["kronecker"], prepared["diagonal"]
        if len(kron) != len(blocks) or len(diag) != len(rest):
            raise ValueError(
                f"prepared has {len(kron)} Kronecker and {len(diag)} diagonal blocks, but "
                f"this model needs {len(blocks)} and {len(rest)}: it was prepared for "
                "another model or another preconditioner."
            )
        for b, f in zip(blocks, kron, strict=True):
            if np.shape(f["qa"])[0] != b.dim_a or np.shape(f["qg"])[0] != b.o:
                raise ValueError(
                    f"prepared's Kronecker factors are {np.shape(f['qa'])[0]} and "
                    f"{np.shape(f['qg'])[0]} wide, the layer {b.site.label} needs {b.dim_a} "
                    f"and {b.o}: it was prepared for another model."
                )
        for i, d in zip(rest, diag, strict=True):
            if np.shape(d) != np.shape(leaves[i]):
                raise ValueError(
                    f"prepared's diagonal block has shape {np.shape(d)}, the leaf needs "
                    f"{np.shape(leaves[i])}: it was prepared for another model."
                )

    def _apply_block(self, f, mat, lam):
        """``≈ (A ⊗ G + λI)⁻¹`` on a ``(C[+1]) × O`` matrix, from thin eigendecompositions."""
        qa, ea, qg, eg = (f[k].astype(mat.dtype) for k in ("qa", "ea", "qg", "eg"))
        ea, eg = jnp.maximum(ea, 0.0), jnp.maximum(eg, 0.0)
        tiny = jnp.finfo(mat.dtype).tiny
        if self.damping_split == "eigen":
            inner = (qa.T @ mat) @ qg
            scale = 1.0 / (ea[:, None] * eg[None, :] + lam) - 1.0 / lam
            return qa @ (inner * scale) @ qg.T + mat / lam
        # π: the ratio of the factors' mean eigenvalues (the zero tail of a thin one counts).
        mean_a = jnp.sum(ea) / qa.shape[0]
        mean_g = jnp.sum(eg) / qg.shape[0]
        ok = (mean_a > tiny) & (mean_g > tiny)
        pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, mean_a / jnp.where(ok, mean_g, 1.0), 1.0)), 1.0)
        root = jnp.sqrt(lam)
        alpha, beta = pi * root, root / pi
        left = qa @ ((qa.T @ mat) * (1.0 / (ea + alpha) - 1.0 / alpha)[:, None]) + mat / alpha
        return (left @ qg) * (1.0 / (eg + beta) - 1.0 / beta)[None, :] @ qg.T + left / beta

    def _preconditioner(self, prepared, blocks, rest, treedef, num_leaves, damping, dtype):
        # A zero damping only reaches here traced (a concrete zero is refused): floor it at
        # the smallest normal number so the blocks stay finite; the residual test decides.
        lam = jnp.maximum(jnp.asarray(damping, dtype), jnp.finfo(dtype).tiny)

        def apply(tree):
            vals = jax.tree_util.tree_leaves(tree)
            out = [None] * num_leaves
            for b, f in zip(blocks, prepared["kronecker"], strict=True):
                mat = b.to_mat(*(vals[i] for i in b.site.leaves))
                new = b.from_mat(self._apply_block(f, mat, lam))
                for i, v in zip(b.site.leaves, new, strict=True):
                    out[i] = v
            for i, d in zip(rest, prepared["diagonal"], strict=True):
                out[i] = vals[i] / (jnp.maximum(d.astype(vals[i].dtype), 0.0) + lam)
            return jax.tree_util.tree_unflatten(treedef, out)

        return apply

    # -- the solve ---------------------------------------------------------------------

    def compute(self, problem, damping, prepared=None):
        if problem.damped is False:
            raise ValueError(
                "solver='pcg' needs damping > 0: preconditioned iterates leave the range of "
                "F, so an undamped solve would not give the minimum-norm answer; use "
                "solver='cg' or 'gram' for damping=0."
            )
        maxiter = 2 * problem.num_params if self.maxiter is None else self.maxiter
        tol = default_tol(problem.flat.dtype) if self.tol is None else self.tol
        leaves, treedef, blocks, rest, _, _ = _layout(problem, self.preconditioner)
        if prepared is None:
            prepared = self.prepare(problem, damping)
        else:
            self._check_prepared(prepared, blocks, rest, leaves)
        precondition = self._preconditioner(
            prepared, blocks, rest, treedef, len(leaves), damping, problem.flat.dtype
        )
        x, k = solve_damped(problem, damping, tol=tol, maxiter=maxiter, precondition=precondition)
        n_kron = sum(int(np.size(leaves[i])) for b in blocks for i in b.site.leaves)
        return x, {
            "num_steps": k,
            "hit_cap": k >= maxiter,
            "kronecker_params": jnp.asarray(n_kron, jnp.int32),
            "kronecker_blocks": jnp.asarray(len(blocks), jnp.int32),
        }
