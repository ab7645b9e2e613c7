"""The pieces every natural rule is built from: the local map, its statistics, pseudo-inverses.

A natural rule sends the natural cotangent ``n_y`` of a map's output to ``J⁺ n_y``, the
minimum-norm change of the map's *differentiated* inputs that produces ``n_y`` to first
order (docs/theory.md §3). Singular values ``s ≤ rcond · s_max`` of the local Jacobian ``J`` are
treated as zero (the cut-off); every rule reports the rank it kept, how many singular values
it cut and the condition number of what it kept.

Structured pseudo-inverses shared by the rules:

- :func:`row_orthogonal_rule` — ``J Jᵀ`` diagonal (elementwise maps with full-shape operands,
  reductions, slices, concatenation): ``J⁺ n = Jᵀ (n / diag(J Jᵀ))``;
- :func:`column_orthogonal_rule` — ``Jᵀ J`` diagonal (broadcasting, one broadcast operand of an
  elementwise map): ``J⁺ n = (Jᵀ n) / diag(Jᵀ J)``;
- :func:`orthogonal_rule` — ``J`` a permutation (reshape, transpose): ``J⁺ = Jᵀ``;
- :func:`sylvester_pinv` — products ``Y = A B`` w.r.t. ``(A, B)``, whose ``J Jᵀ`` is the
  Kronecker sum ``I ⊗ BᵀB + AAᵀ ⊗ I`` (``dot_general`` at primitive granularity; the dense
  layer's rule, :func:`natchain._modular._layers.dense_rule`, factorises ``[H 1]`` and ``W``
  instead, for the generic rule's cut-off);
- :func:`generic_rule` — any map: the materialised local Jacobian and its SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

__all__ = [
    "LocalMap",
    "LocalStats",
    "column_orthogonal_rule",
    "diagonal_rule",
    "generic_rule",
    "orthogonal_rule",
    "row_orthogonal_rule",
    "sylvester_pinv",
]


class LocalMap(NamedTuple):
    """One map of the backward chain, as a natural rule sees it.

    Attributes:
        name: the primitive's name, or the layer's.
        primals: every input's primal value, differentiated or not, in the map's order.
        diff: one bool per input: whether it is differentiated (depends on the parameters,
            floating point). Data, constants and integer inputs are not.
        outputs: the primal outputs.
        params: the primitive's parameters (``{}`` for layers).
        fn: ``fn(*differentiated_inputs) -> tuple of outputs`` with the other inputs held
            fixed — the map whose Jacobian the rule pseudo-inverts.
        rcond: the cut-off relative to the largest singular value (``None``: the rule's
            default, ``max(out, in) · eps`` for exact structured forms).
    """

    name: str
    primals: tuple
    diff: tuple
    outputs: tuple
    params: dict
    fn: Callable
    rcond: float | None

    @property
    def diff_primals(self) -> tuple:
        """The differentiated inputs, in order."""
        return tuple(p for p, d in zip(self.primals, self.diff, strict=True) if d)

    @property
    def in_size(self) -> int:
        return sum(int(np.size(p)) for p in self.diff_primals)

    @property
    def out_size(self) -> int:
        return sum(int(np.size(o)) for o in self.outputs if is_float(o))


class LocalStats(NamedTuple):
    """What a rule's pseudo-inverse kept and cut.

    Attributes:
        rank: singular values kept.
        num_cut: ``min(out_size, in_size) − rank``: singular values at or below the cut-off
            (exact zeros included — a dead ReLU unit, a saturated ``tanh``).
        condition: ``s_max / s_min`` over the kept singular values.
    """

    rank: Any
    num_cut: Any
    condition: Any


def is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def eps_of(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def default_rcond(local: LocalMap, dtype) -> float:
    """``max(out, in) · eps``, LAPACK's default for a pseudo-inverse."""
    return max(local.out_size, local.in_size, 1) * eps_of(dtype)


def stats_from_squares(s2, rcond, n_min):
    """Keep mask and :class:`LocalStats` from squared singular values ``s2`` (any shape)."""
    s2 = jnp.maximum(s2, 0.0)
    top = jnp.max(s2) if s2.size else jnp.zeros((), s2.dtype)
    keep = s2 > (rcond * rcond) * top
    rank = jnp.sum(keep)
    low = jnp.min(jnp.where(keep, s2, jnp.inf)) if s2.size else jnp.inf
    cond = jnp.where(rank > 0, jnp.sqrt(top / low), jnp.nan)
    return keep, LocalStats(rank, n_min - rank, cond)


def _single_output(local: LocalMap):
    if len(local.outputs) != 1:
        raise ValueError(f"rule for {local.name!r} expects one output, got {len(local.outputs)}.")


def _linearized(local: LocalMap):
    diff_in = local.diff_primals
    _, lin = jax.linearize(lambda *a: local.fn(*a)[0], *diff_in)
    lin_t = jax.linear_transpose(lin, *diff_in)
    return diff_in, lin, lin_t


def row_orthogonal_rule(local: LocalMap, n_out):
    """``J⁺ n = Jᵀ (n / diag(J Jᵀ))`` for a map whose ``J Jᵀ`` is diagonal.

    ``diag(J Jᵀ) = J Jᵀ 1`` is found with one JVP and one VJP; the singular values are
    its square roots.
    """
    _single_output(local)
    diff_in, lin, lin_t = _linearized(local)
    (n,) = n_out
    r = lin(*lin_t(jnp.ones_like(n)))
    rcond = default_rcond(local, r.dtype) if local.rcond is None else local.rcond
    keep, stats = stats_from_squares(r, rcond, min(local.out_size, local.in_size))
    scaled = jnp.where(keep, n / jnp.where(keep, r, 1.0), 0.0)
    return tuple(lin_t(scaled)), stats


def column_orthogonal_rule(local: LocalMap, n_out):
    """``J⁺ n = (Jᵀ n) / diag(Jᵀ J)`` for a one-input map whose ``Jᵀ J`` is diagonal."""
    _single_output(local)
    diff_in, lin, lin_t = _linearized(local)
    if len(diff_in) != 1:
        raise ValueError(f"column-orthogonal rule for {local.name!r} needs one input.")
    (n,) = n_out
    (c,) = lin_t(lin(jnp.ones_like(diff_in[0])))
    rcond = default_rcond(local, c.dtype) if local.rcond is None else local.rcond
    keep, stats = stats_from_squares(c, rcond, min(local.out_size, local.in_size))
    (jtn,) = lin_t(n)
    return (jnp.where(keep, jtn / jnp.where(keep, c, 1.0), 0.0),), stats


def diagonal_rule(local: LocalMap, n_out):
    """``J = diag(d)`` (an elementwise activation): ``J⁺ n = n / d`` on the kept entries.

    ``d`` comes from one VJP, so functions with a ``custom_vjp`` (or ``custom_jvp``) rule are
    differentiated by that rule.
    """
    _single_output(local)
    (x,) = local.diff_primals
    _, vjp = jax.vjp(lambda a: local.fn(a)[0], x)
    (d,) = vjp(jnp.ones_like(local.outputs[0]))
    rcond = default_rcond(local, d.dtype) if local.rcond is None else local.rcond
    keep, stats = stats_from_squares(d * d, rcond, min(local.out_size, local.in_size))
    (n,) = n_out
    return (jnp.where(keep, n / jnp.where(keep, d, 1.0), 0.0).astype(x.dtype),), stats


def orthogonal_rule(local: LocalMap, n_out):
    """``J⁺ = Jᵀ`` for a permutation of the entries (reshape, transpose, squeeze, copy)."""
    _single_output(local)
    _, _, lin_t = _linearized(local)
    size = local.in_size
    one = jnp.ones((), jnp.result_type(local.outputs[0]))
    return tuple(lin_t(n_out[0])), LocalStats(jnp.asarray(size), jnp.asarray(0), one)


def sylvester_pinv(p, q, n, rcond=None, n_min=None):
    """Minimum-norm ``U`` with ``U Q + P U = n`` (batched), through symmetric eigendecompositions.

    For ``Y_b = A_b B_b`` (``M × K`` times ``K × N``) differentiated w.r.t. ``A`` and/or
    ``B``, ``J Jᵀ`` acting on ``(M, N)`` arrays is ``U ↦ U Q + P U`` with ``P = A Aᵀ`` (when
    ``B`` is differentiated) and ``Q = BᵀB`` (when ``A`` is); ``J⁺ n = Jᵀ U``. Its eigenvalues
    are the sums ``α_i + β_j``; those ``≤ tol · max`` are cut, with ``tol = rcond²`` or, for
    ``rcond=None``, ``size · eps`` (a Gram matrix resolves singular values down to about
    ``sqrt(eps) · s_max`` only).

    Args:
        p: ``(B, M, M)`` PSD or ``None`` (zero).
        q: ``(B, N, N)`` PSD or ``None`` (zero).
        n: ``(B, M, N)``.
        rcond: cut-off relative to the largest singular value.
        n_min: ``min(out_size, in_size)`` for the statistics (default ``n.size``).

    Returns:
        ``(U, LocalStats)``.
    """
    tol = n.size * eps_of(n.dtype) if rcond is None else rcond * rcond
    n_min = n.size if n_min is None else n_min
    if p is not None and q is not None:
        if p.shape[1] < q.shape[1]:  # diagonalise the smaller factor: transpose the problem
            u, stats = _sylvester_shifted(q, p, jnp.swapaxes(n, 1, 2), tol, n_min)
            return jnp.swapaxes(u, 1, 2), stats
        return _sylvester_shifted(p, q, n, tol, n_min)
    if p is None:  # U Q = n: the same problem transposed
        u, stats = _one_sided_pinv(q, jnp.swapaxes(n, 1, 2), tol, n_min)
        return jnp.swapaxes(u, 1, 2), stats
    return _one_sided_pinv(p, n, tol, n_min)


def _sylvester_eigh(p, q, n, tol, n_min):
    bt, m, k = n.shape
    dtype = n.dtype
    if p is None:
        a, v = jnp.zeros((bt, m), dtype), None
    else:
        a, v = jnp.linalg.eigh(p)
    if q is None:
        b, w = jnp.zeros((bt, k), dtype), None
    else:
        b, w = jnp.linalg.eigh(q)
    lam = a[:, :, None] + b[:, None, :]
    keep, stats = stats_from_squares(lam, math.sqrt(tol), n_min)
    nt = n
    if v is not None:
        nt = jnp.einsum("bmi,bmk->bik", v, nt)
    if w is not None:
        nt = jnp.einsum("bik,bkj->bij", nt, w)
    ut = jnp.where(keep, nt / jnp.where(keep, lam, 1.0), 0.0)
    if v is not None:
        ut = jnp.einsum("bmi,bik->bmk", v, ut)
    if w is not None:
        ut = jnp.einsum("bij,bkj->bik", ut, w)
    return ut, stats


def _sylvester_shifted(p, q, n, tol, n_min):
    """``U Q + P U = n`` with ``Q`` (the smaller factor) diagonalised: ``Q = W diag(β) Wᵀ``.

    In that basis the columns decouple into shifted systems ``(P + β_j I) ũ_j = ñ_j``,
    solved by batched Cholesky when a Cholesky of ``P + (β_min − tol · top) I`` certifies
    that no eigenvalue ``α_i + β_j`` is cut (``top = ‖P‖_F + β_max ≥ λ_max``); otherwise
    both factors are diagonalised and the cut applied.
    """
    b, w = jnp.linalg.eigh(q)
    eye = jnp.eye(p.shape[1], dtype=p.dtype)
    top = jnp.max(jnp.sqrt(jnp.sum(p * p, axis=(1, 2)))) + jnp.max(b)
    low = jnp.min(b, axis=1)[:, None, None]
    certified = jnp.all(jnp.isfinite(jnp.linalg.cholesky(p + (low - tol * top) * eye)))

    def shifted_solve():
        nt = jnp.einsum("bmk,bkj->bjm", n, w)[..., None]  # (B, k, M, 1)
        mats = p[:, None] + b[:, :, None, None] * eye
        ut = jsl.cho_solve((jnp.linalg.cholesky(mats), True), nt)[..., 0]
        return jnp.einsum("bjm,bkj->bmk", ut, w)

    def eigh_solve():
        return _sylvester_eigh(p, q, n, tol, n_min)[0]

    u = jax.lax.cond(certified, shifted_solve, eigh_solve)
    lam = jnp.linalg.eigvalsh(p)[:, :, None] + b[:, None, :]
    _, stats = stats_from_squares(lam, math.sqrt(tol), n_min)
    return u, stats


def _one_sided_pinv(p, n, tol, n_min):
    """``U = P⁺ n`` for PSD ``P`` (``(B, M, M)``), with the cut-off ``λ ≤ tol · λ_max``.

    When a Cholesky factorisation of ``P − tol · ‖P‖_F · I`` succeeds, every eigenvalue
    exceeds the cut-off (``‖P‖_F ≥ λ_max``), nothing would be cut and ``P⁺ n = P⁻¹ n`` is
    solved by Cholesky — several times cheaper than an eigendecomposition on CPU. Otherwise
    the eigendecomposition applies the cut. The statistics always come from the
    eigenvalues (computed only when they are used).
    """
    eye = jnp.eye(p.shape[1], dtype=p.dtype)
    frob = jnp.max(jnp.sqrt(jnp.sum(p * p, axis=(1, 2))))
    shifted = jnp.linalg.cholesky(p - (tol * frob) * eye)
    certified = jnp.all(jnp.isfinite(shifted))

    def cholesky_solve():
        return jsl.cho_solve((jnp.linalg.cholesky(p), True), n)

    def eigh_solve():
        return _sylvester_eigh(p, None, n, tol, n_min)[0]

    u = jax.lax.cond(certified, cholesky_solve, eigh_solve)
    a = jnp.linalg.eigvalsh(p)
    lam = jnp.broadcast_to(a[:, :, None], n.shape)
    _, stats = stats_from_squares(lam, math.sqrt(tol), n_min)
    return u, stats


def _flat_fn(local: LocalMap):
    """``fn`` on one flat vector of the differentiated inputs, returning one flat vector."""
    diff_in = local.diff_primals
    shapes = [jnp.shape(x) for x in diff_in]
    sizes = [int(np.size(x)) for x in diff_in]
    dtype = jnp.result_type(*diff_in)
    flat0 = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in diff_in])

    def unflat(v):
        parts, start = [], 0
        for x, shape, size in zip(diff_in, shapes, sizes, strict=True):
            parts.append(v[start : start + size].reshape(shape).astype(jnp.result_type(x)))
            start += size
        return parts

    def f(v):
        outs = local.fn(*unflat(v))
        return jnp.concatenate([jnp.ravel(o).astype(dtype) for o in outs if is_float(o)])

    return f, flat0, unflat


def local_jacobian(local: LocalMap):
    """Dense local Jacobian ``(out_size, in_size)`` w.r.t. the differentiated inputs.

    Columns follow the differentiated inputs in order, each flattened row-major; rows the
    floating-point outputs in order, each flattened. Forward mode when ``in < out``, else
    reverse mode (each falls back on the other where JAX cannot apply it).
    """
    f, flat0, _ = _flat_fn(local)
    modes = (jax.jacfwd, jax.jacrev) if flat0.size < local.out_size else (jax.jacrev, jax.jacfwd)
    try:
        return modes[0](f)(flat0)
    except (TypeError, ValueError):  # custom_vjp: no forward mode; while_loop: no reverse
        return modes[1](f)(flat0)


def generic_rule(local: LocalMap, n_out):
    """The pseudo-inverse of the materialised local Jacobian, by SVD (any map; small maps only)."""
    _, flat0, unflat = _flat_fn(local)
    jmat = local_jacobian(local)
    dtype = jmat.dtype
    n = jnp.concatenate(
        [
            jnp.ravel(c).astype(dtype)
            for c, o in zip(n_out, local.outputs, strict=True)
            if is_float(o)
        ]
    )
    u, s, vt = jnp.linalg.svd(jmat, full_matrices=False)
    rcond = default_rcond(local, dtype) if local.rcond is None else local.rcond
    keep, stats = stats_from_squares(s * s, rcond, min(jmat.shape))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    flat = vt.T @ (inv * (u.T @ n))
    return tuple(unflat(flat)), stats
