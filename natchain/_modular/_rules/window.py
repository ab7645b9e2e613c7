"""Window and scan primitives: pooling (``reduce_window_*``) and cumulative sums.

- ``reduce_window_sum`` (average pooling is this, then a division) is linear with a 0/1
  Jacobian that factorises over the array's dimensions: an entry lies in a window exactly
  when it does along every dimension, so ``J = ⊗_d J_d`` with ``J_d`` the ``out_d × in_d``
  window-membership matrix of dimension ``d`` (strides, padding, base and window dilation
  included). ``J_d`` depends on shapes and parameters only; its SVD is computed once, at
  trace time, and ``J⁺ = ⊗_d V_d Σ_d⁺ U_dᵀ`` is applied dimension by dimension, with the
  cut-off applied to the products of the singular values (exact for overlapping windows,
  where ``J Jᵀ`` is not diagonal).
- ``reduce_window_max``/``reduce_window_min`` (max pooling) and ``cummax``/``cummin`` pick
  one entry per output: every row of ``J`` is a unit vector, so the columns have disjoint
  supports, ``Jᵀ J`` is diagonal and ``J⁺`` *averages* the natural cotangents of the outputs
  that picked the same entry (overlapping windows).
- ``cumsum`` along an axis of length ``L`` is the ``L × L`` triangular matrix of ones per
  lane, invertible: ``J⁻¹`` takes differences of neighbours. Its singular values are known
  at trace time; when the cut-off would remove some, the truncated SVD is applied instead.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from natchain._modular._core import (
    LocalStats,
    column_orthogonal_rule,
    default_rcond,
)
from natchain._modular._registry import register_rule


def _membership(n_in, window, stride, pad, base, wdil):
    """``out × in`` 0/1 matrix: input ``j`` lies in window ``o`` along one dimension."""
    lo, hi = pad
    extent = (n_in - 1) * base + 1 + lo + hi
    span = (window - 1) * wdil + 1
    n_out = max((extent - span) // stride + 1, 0)
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        for k in range(window):
            pos = o * stride + k * wdil - lo  # position in the dilated, unpadded input
            if pos >= 0 and pos % base == 0 and pos // base < n_in:
                m[o, pos // base] = 1.0
    return m


@functools.lru_cache(maxsize=256)
def _factor_svds(shape, window, strides, padding, base, wdil):
    """Per dimension: ``None`` (identity) or the SVD ``(U, s, Vᵀ)`` of its membership matrix."""
    out = []
    for d, n in enumerate(shape):
        m = _membership(n, window[d], strides[d], padding[d], base[d], wdil[d])
        if m.shape == (n, n) and np.array_equal(m, np.eye(n)):
            out.append(None)
        else:
            out.append(np.linalg.svd(m, full_matrices=False))
    return tuple(out)


def _apply_along(x, mat, axis):
    """``mat`` (``a × b``) applied to axis ``axis`` (length ``b``) of ``x``."""
    y = jnp.tensordot(jnp.asarray(mat, x.dtype), x, axes=((1,), (axis,)))
    return jnp.moveaxis(y, 0, axis)


def kronecker_pinv(svds, n, rcond, n_min):
    """``(⊗_d J_d)⁺ n`` from per-dimension SVDs (``None``: identity), with its statistics.

    Singular values of the Kronecker product are the products of the factors'; those
    ``≤ rcond · s_max`` are cut. Everything but the application to ``n`` is static numpy.
    """
    s = np.ones(())
    for f in svds:
        s = np.multiply.outer(s, np.ones(1) if f is None else f[1])
    s = s.reshape([1 if f is None else len(f[1]) for f in svds])
    top = float(s.max()) if s.size else 0.0
    keep = s > rcond * top
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    t = n
    for axis, f in enumerate(svds):
        if f is not None:
            t = _apply_along(t, f[0].T, axis)
    t = t * jnp.asarray(inv, n.dtype)
    for axis, f in enumerate(svds):
        if f is not None:
            t = _apply_along(t, f[2].T, axis)
    # each factor ``None`` stands for an identity of its dimension: multiplicity of ``s``
    mult = int(np.prod([n.shape[a] for a, f in enumerate(svds) if f is None], dtype=np.int64))
    rank = int(np.sum(keep)) * mult
    kept = s[keep]
    cond = float(kept.max() / kept.min()) if kept.size else float("nan")
    stats = LocalStats(jnp.asarray(rank), jnp.asarray(n_min - rank), jnp.asarray(cond, n.dtype))
    return t, stats


def _reduce_window_sum_rule(local, n_out):
    """Sum pooling: ``J = ⊗_d J_d`` (window membership per dimension), pseudo-inverted exactly."""
    (x,) = local.primals
    (n,) = n_out
    p = local.params
    svds = _factor_svds(
        tuple(x.shape),
        tuple(p["window_dimensions"]),
        tuple(p["window_strides"]),
        tuple(tuple(q) for q in p["padding"]),
        tuple(p["base_dilation"]),
        tuple(p["window_dilation"]),
    )
    dtype = jnp.result_type(x)
    rcond = default_rcond(local, dtype) if local.rcond is None else local.rcond
    u, stats = kronecker_pinv(svds, n.astype(dtype), rcond, min(local.out_size, local.in_size))
    return (u,), stats


register_rule("reduce_window_sum", _reduce_window_sum_rule)
for _name in ("reduce_window_max", "reduce_window_min", "cummax", "cummin"):
    register_rule(_name, column_orthogonal_rule)


@functools.lru_cache(maxsize=64)
def _cumsum_svd(length, reverse):
    tri = np.tril(np.ones((length, length)))
    return np.linalg.svd(tri[::-1, ::-1] if reverse else tri, full_matrices=False)


def _cumsum_rule(local, n_out):
    """``J`` = the triangular matrix of ones along ``axis``, per lane: ``J⁻¹`` = differences."""
    (x,) = local.primals
    (n,) = n_out
    axis, reverse = local.params["axis"], local.params["reverse"]
    length = x.shape[axis]
    dtype = jnp.result_type(x)
    n = n.astype(dtype)
    u, s, vt = _cumsum_svd(length, bool(reverse))
    rcond = default_rcond(local, dtype) if local.rcond is None else local.rcond
    lanes = x.size // max(length, 1)
    n_min = min(local.out_size, local.in_size)
    if np.all(s > rcond * s.max()):  # nothing cut: the exact inverse, neighbour differences
        m = jnp.moveaxis(n, axis, -1)
        if reverse:
            d = m - jnp.concatenate([m[..., 1:], jnp.zeros_like(m[..., :1])], axis=-1)
        else:
            d = m - jnp.concatenate([jnp.zeros_like(m[..., :1]), m[..., :-1]], axis=-1)
        rank = lanes * length
        stats = LocalStats(
            jnp.asarray(rank), jnp.asarray(n_min - rank), jnp.asarray(s.max() / s.min(), dtype)
        )
        return (jnp.moveaxis(d, -1, axis),), stats
    svds = tuple((u, s, vt) if a == axis else None for a in range(x.ndim))
    out, stats = kronecker_pinv(svds, n, rcond, n_min)
    return (out,), stats


register_rule("cumsum", _cumsum_rule)
