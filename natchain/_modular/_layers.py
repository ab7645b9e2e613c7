"""Layer granularity: maps that are larger than one primitive.

- :func:`layer` marks a function as one map. It is compiled as a named ``jit`` call, so
  the marked function runs unchanged everywhere; at layer granularity its natural rule is
  the one given (or the pseudo-inverse of its local Jacobian).
- :func:`dense_rule` is the closed form for a recognised dense layer ``Y = H W + b`` over a
  batch, jointly w.r.t. ``(H, W, b)`` — or ``(W, b)`` when ``H`` is data:
  ``J Jᵀ = I_N ⊗ WᵀW + (H Hᵀ + 11ᵀ) ⊗ I_m`` with the output's entries in row-major
  ``(example, unit)`` order (docs/theory.md §3), solved through the singular values and
  vectors of the two small factors ``[H 1]`` and ``W``, never the ``N·m`` system itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from natchain._modular._core import LocalStats, eps_of

_TAG = "natchain_layer__"


class LayerSpec(NamedTuple):
    name: str
    rule: Callable | None


#: jit name of a marked function -> its spec.
LAYERS: dict[str, LayerSpec] = {}


def layer(fun: Callable | None = None, *, rule: Callable | None = None, name: str | None = None):
    """Mark ``fun`` as one map of the natural chain rule (a layer).

    Usable as ``@natchain.layer`` or ``@natchain.layer(rule=..., name=...)``. The marked
    function computes exactly what ``fun`` computes (it is wrapped in a named
    ``jax.jit``; its arguments must be arrays or pytrees of arrays). At
    ``granularity="layer"`` the whole call is one map whose natural rule is ``rule`` —
    with the signature of :func:`natchain.register_rule`'s rules — or, by default, the
    pseudo-inverse of its local Jacobian w.r.t. its differentiated arguments (data and
    integer arguments excluded), materialised (small layers only). At
    ``granularity="primitive"`` the mark is ignored and the body is split into primitives.

    Args:
        fun: the function to mark.
        rule: optional natural rule for the layer.
        name: the layer's name in statistics and traces (default: ``fun.__name__``).

    Returns:
        The marked function.
    """
    if fun is None:
        return functools.partial(layer, rule=rule, name=name)
    if not callable(fun):
        raise TypeError(f"natchain.layer expects a function; got {fun!r}.")
    if rule is not None and not callable(rule):
        raise TypeError(f"natchain.layer: rule must be callable; got {rule!r}.")
    base = name or getattr(fun, "__name__", "layer")
    tag = f"{_TAG}{len(LAYERS)}__{base}"

    def body(*args, **kwargs):
        return fun(*args, **kwargs)

    body.__name__ = body.__qualname__ = tag
    jitted = jax.jit(body)
    LAYERS[tag] = LayerSpec(base, rule)

    @functools.wraps(fun)
    def marked(*args, **kwargs):
        return jitted(*args, **kwargs)

    marked.natchain_layer = tag
    return marked


def layer_spec(eqn) -> LayerSpec | None:
    """The spec of a marked layer's call equation, else ``None``."""
    if eqn.primitive.name not in ("jit", "pjit"):
        return None
    return LAYERS.get(str(eqn.params.get("name", "")))


def dense_rule(h, w, b, h_diff: bool, transposed: bool, n, rcond=None):
    """Natural rule of ``Y = H W + b`` (``W`` stored transposed when ``transposed``).

    With ``Ĥ = [H 1]`` (``N × c``, ``c = d + 1`` with a bias, else ``c = d`` and ``Ĥ = H``)
    and ``U`` an ``N × m`` output cotangent, ``Jᵀ U = (U Wᵀ, ĤᵀU)`` (the second block is
    ``(n_W; n_bᵀ)``), so ``J Jᵀ U = K U + U Q`` with ``K = Ĥ Ĥᵀ`` and ``Q = WᵀW`` (``Q = 0``
    when ``H`` is data). With ``K = P diag(λ) Pᵀ`` and ``Q = V diag(σ) Vᵀ`` the eigenvalues
    of ``J Jᵀ`` are the ``N·m`` sums ``λ_a + σ_j`` (``λ_a = 0`` off the column space of
    ``Ĥ``), the squared singular values of ``J``, and ``J⁺ n = Jᵀ U`` with
    ``U = P [(Pᵀ n V) / (λ + σ)] Vᵀ`` over the kept sums. Nothing of size ``N·m`` squared is
    formed: the cost is one ``N × c`` and one ``d × m`` factorisation plus products with
    ``n``.

    The cut-off is the generic rule's: singular values ``≤ rcond · s_max`` of ``J`` are cut,
    ``rcond=None`` meaning ``max(out, in) · eps``, and the statistics are those of the
    dense pseudo-inverse of ``J``. Both need the singular values resolved down to
    ``eps · s_max``, which the eigenvalues of a Gram matrix are not (only down to about
    ``sqrt(eps) · s_max``). So the factors come from singular value decompositions of
    ``Ĥ`` and ``W`` (``√λ``, ``√σ`` their singular values) — cheap for a tall ``Ĥ``
    (``N ≥ c``: a QR of ``Ĥ`` and a ``c × c`` problem). For a wide ``Ĥ`` (``N < c``, e.g. a
    wide input layer) the ``N × N`` Gram ``K`` is factorised instead, but only where that
    is certified safe: every eigenvalue of ``J Jᵀ`` above ``max(rcond², sqrt(eps)) · λ_max``
    (nothing cut, and relative errors of the solution below ``sqrt(eps)``); otherwise the
    decomposition of ``Ĥ`` is used.

    Args:
        h: ``(N, d)`` inputs (an upstream activation when ``h_diff``, else data).
        w: ``(d, m)``, or ``(m, d)`` when ``transposed``.
        b: ``(m,)`` bias or ``None``.
        h_diff: whether ``H`` is differentiated.
        transposed: whether the layer uses ``Wᵀ``.
        n: ``(N, m)`` natural cotangent of ``Y``.
        rcond: cut-off relative to the largest singular value (``None``: the default
            above).

    Returns:
        ``(n_in, stats)`` with ``n_in = ([n_H], n_W, [n_b])``.
    """
    dtype = jnp.result_type(h, w, n)
    wm = (w.T if transposed else w).astype(dtype)
    hm = h.astype(dtype)
    rows, d = hm.shape
    m = wm.shape[1]
    bias = b is not None
    c = d + bias
    out_size = rows * m
    in_size = w.size + (h.size if h_diff else 0) + (b.size if bias else 0)
    n_min = min(out_size, in_size)
    if rcond is None:
        rcond = max(out_size, in_size, 1) * eps_of(dtype)
    tol = float(rcond) ** 2

    def augmented():  # Ĥ = [H 1], for the decompositions of Ĥ only
        return jnp.concatenate([hm, jnp.ones((rows, 1), dtype)], axis=1) if bias else hm

    n = n.astype(dtype)
    if rows >= c:  # tall: the decomposition of Ĥ costs a QR and a c × c problem
        sigma, v = _right_factor(wm) if h_diff else (None, None)
        lam, p = _left_factor(augmented())
        u, stats = _pairs_solve(lam, p, sigma, v, n, tol, n_min)
    else:
        k = hm @ hm.T
        if bias:
            k = k + 1.0
        if h_diff:
            u, stats = _wide_pairs(k, augmented, wm, n, tol, n_min)
        else:
            u, stats = _wide_data(k, augmented, n, m, tol, n_min)
    outs = []
    if h_diff:
        outs.append((u @ wm.T).astype(h.dtype))
    nw = hm.T @ u
    outs.append((nw.T if transposed else nw).astype(w.dtype))
    if bias:
        outs.append(jnp.sum(u, axis=0).astype(b.dtype))
    return tuple(outs), stats


def _left_factor(hh):
    """``(λ, P)`` of ``K = Ĥ Ĥᵀ`` on the column space: squared singular values, left vectors."""
    p, s, _ = jnp.linalg.svd(hh, full_matrices=False)
    return s * s, p


def _right_factor(wm):
    """``(σ, V)`` of ``Q = WᵀW`` (``m × m``, complete): squared singular values of ``W``."""
    d, m = wm.shape
    _, s, vt = jnp.linalg.svd(wm, full_matrices=d < m)
    sigma = s * s
    if d < m:
        sigma = jnp.concatenate([sigma, jnp.zeros((m - d,), sigma.dtype)])
    return sigma, vt.T


def _pairs_solve(lam, p, sigma, v, n, tol, n_min):
    """``U = (J Jᵀ)⁺ n`` from ``K``'s ``(λ, P)`` (``P``: ``N × r``) and ``Q``'s ``(σ, V)``.

    Off the span of ``P`` (``r < N``) ``K`` is zero and the eigenvalues are ``σ_j`` alone,
    each ``N − r`` times; with ``H`` data (``sigma is None``) they are zero, hence cut.
    """
    rows, r = p.shape
    top = jnp.max(lam) + (0.0 if sigma is None else jnp.max(sigma))
    thr = tol * top
    nt = p.T @ n
    if sigma is None:
        pairs = jnp.broadcast_to(lam[:, None], nt.shape)
    else:
        nt = nt @ v
        pairs = lam[:, None] + sigma[None, :]
    keep = pairs > thr
    ut = jnp.where(keep, nt / jnp.where(keep, pairs, 1.0), 0.0)
    if sigma is not None:
        ut = ut @ v.T
    u = p @ ut
    rank = jnp.sum(keep)
    low = jnp.min(jnp.where(keep, pairs, jnp.inf))
    comp = rows - r
    if comp > 0 and sigma is not None:
        keep_c = sigma > thr
        inv_c = jnp.where(keep_c, 1.0 / jnp.where(keep_c, sigma, 1.0), 0.0)
        perp = n - p @ (p.T @ n)
        u = u + ((perp @ v) * inv_c) @ v.T
        rank = rank + comp * jnp.sum(keep_c)
        low = jnp.minimum(low, jnp.min(jnp.where(keep_c, sigma, jnp.inf)))
    cond = jnp.where(rank > 0, jnp.sqrt(top / low), jnp.nan)
    return u, LocalStats(rank, n_min - rank, cond)


def _floor(tol, dtype):
    """Smallest relative eigenvalue a Gram factorisation is trusted with (see dense_rule)."""
    return max(tol, math.sqrt(eps_of(dtype)))


def _wide_pairs(k, augmented, wm, n, tol, n_min):
    """Wide ``Ĥ``, ``H`` differentiated: a Gram factorisation of ``K`` where certified safe.

    Certified when a Cholesky factorisation of ``K + (σ_min − floor · top) I`` succeeds,
    ``top = ‖K‖_F + σ_max ≥ λ_max + σ_max``: then every ``λ_a + σ_j`` exceeds
    ``floor · top``. In ``Q``'s eigenbasis the columns decouple into ``m`` shifted systems
    ``(K + σ_j I) ũ_j = ñ_j``, solved by Cholesky when ``m`` is small (``m`` factorisations
    of ``N × N`` cost less than one eigendecomposition), else through ``K``'s
    eigendecomposition; otherwise the decompositions of ``Ĥ`` and ``W`` are used. Here
    ``Q``'s eigendecomposition is enough: certified, every kept sum is above
    ``sqrt(eps) · top``, far above its rounding ``eps · top``. The eigenvalues for the
    statistics are computed apart (dropped by the compiler when unused).
    """
    rows, m = n.shape
    sigma, v = jnp.linalg.eigh(wm.T @ wm)
    sigma = jnp.maximum(sigma, 0.0)
    eye = jnp.eye(rows, dtype=k.dtype)
    top = jnp.sqrt(jnp.sum(k * k)) + jnp.max(sigma)
    shift = jnp.min(sigma) - _floor(tol, n.dtype) * top

    def accurate():
        lam, p = _left_factor(augmented())
        sig, vv = _right_factor(wm)
        return _pairs_solve(lam, p, sig, vv, n, tol, n_min)[0], lam, sig

    if m <= _SHIFTED_MAX:
        # the certificate and the m shifted systems in one batched factorisation
        shifts = jnp.concatenate([sigma, shift[None]])
        chols = jnp.linalg.cholesky(k[None] + shifts[:, None, None] * eye)
        certified = jnp.all(jnp.isfinite(chols[m]))

        def fast():
            nt = (n @ v).T[..., None]  # (m, N, 1)
            ut = jsl.cho_solve((chols[:m], True), nt)[..., 0]
            return ut.T @ v.T, jnp.zeros((rows,), k.dtype), sigma

    else:
        certified = jnp.all(jnp.isfinite(jnp.linalg.cholesky(k + shift * eye)))

        def fast():
            lam, p = jnp.linalg.eigh(k)
            lam = jnp.maximum(lam, 0.0)
            return _pairs_solve(lam, p, sigma, v, n, tol, n_min)[0], lam, sigma

    u, lam_svd, sig = jax.lax.cond(certified, fast, accurate)
    lam = jnp.where(certified, jnp.maximum(jnp.linalg.eigvalsh(k), 0.0), lam_svd)
    return u, _pairs_stats(lam, sig, tol, n_min)


def _pairs_stats(lam, sigma, tol, n_min):
    """:class:`LocalStats` of ``J Jᵀ``'s eigenvalues ``λ_a + σ_j`` (``λ`` complete, ``N``)."""
    pairs = lam[:, None] + sigma[None, :]
    top = jnp.max(pairs)
    keep = pairs > tol * top
    rank = jnp.sum(keep)
    low = jnp.min(jnp.where(keep, pairs, jnp.inf))
    cond = jnp.where(rank > 0, jnp.sqrt(top / low), jnp.nan)
    return LocalStats(rank, n_min - rank, cond)


#: Up to this many output units, ``m`` shifted Cholesky factorisations (``m N³ / 3`` flops)
#: beat one symmetric eigendecomposition of ``K`` (about ``9 N³`` with vectors).
_SHIFTED_MAX = 16


def _wide_data(k, augmented, n, m, tol, n_min):
    """Wide ``Ĥ``, ``H`` data: ``U = K⁻¹ n`` by Cholesky where certified safe.

    A Cholesky factorisation of ``K − floor · ‖K‖_F · I`` succeeds only if every eigenvalue
    exceeds ``floor · ‖K‖_F ≥ floor · λ_max``: nothing is cut and ``K`` is well enough
    conditioned. The eigenvalues for the statistics are computed apart (and dropped by
    the compiler when the statistics are not used).
    """
    eye = jnp.eye(k.shape[0], dtype=k.dtype)
    frob = jnp.sqrt(jnp.sum(k * k))
    # the certificate and the factor of K in one batched factorisation
    chols = jnp.linalg.cholesky(jnp.stack([k - (_floor(tol, n.dtype) * frob) * eye, k]))
    certified = jnp.all(jnp.isfinite(chols[0]))

    def fast():
        return jsl.cho_solve((chols[1], True), n), jnp.zeros(k.shape[:1], k.dtype)

    def accurate():
        lam, p = _left_factor(augmented())
        return _pairs_solve(lam, p, None, None, n, tol, n_min)[0], lam

    u, lam_svd = jax.lax.cond(certified, fast, accurate)
    lam = jnp.where(certified, jnp.maximum(jnp.linalg.eigvalsh(k), 0.0), lam_svd)
    top = jnp.max(lam)
    keep = lam > tol * top
    rank = m * jnp.sum(keep)
    low = jnp.min(jnp.where(keep, lam, jnp.inf))
    cond = jnp.where(rank > 0, jnp.sqrt(top / low), jnp.nan)
    return u, LocalStats(rank, n_min - rank, cond)
