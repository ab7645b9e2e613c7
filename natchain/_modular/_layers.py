"""Layer granularity: maps that are larger than one primitive.

- :func:`layer` marks a function as one map. It is compiled as a named ``jit`` call, so
  the marked function runs unchanged everywhere; at layer granularity its natural rule is
  the one given (or the pseudo-inverse of its local Jacobian).
- :func:`dense_rule` is the closed form for a recognised dense layer ``Y = H W + b`` over a
  batch, jointly w.r.t. ``(H, W, b)`` — or ``(W, b)`` when ``H`` is data:
  ``J Jᵀ = I_N ⊗ WᵀW + (H Hᵀ + 11ᵀ) ⊗ I_m`` (docs/theory.md §3), solved through the eigenvalues of
  the two small factors (``N × N`` and ``m × m``), never the ``N·m`` system itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from natchain._modular._core import sylvester_pinv

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

    Args:
        h: ``(N, d)`` inputs (an upstream activation when ``h_diff``, else data).
        w: ``(d, m)``, or ``(m, d)`` when ``transposed``.
        b: ``(m,)`` bias or ``None``.
        h_diff: whether ``H`` is differentiated.
        transposed: whether the layer uses ``Wᵀ``.
        n: ``(N, m)`` natural cotangent of ``Y``.
        rcond: cut-off relative to the largest singular value.

    Returns:
        ``(n_in, stats)`` with ``n_in = ([n_H], n_W, [n_b])``.
    """
    dtype = jnp.result_type(h, w, n)
    wm = (w.T if transposed else w).astype(dtype)
    hm = h.astype(dtype)
    p = hm @ hm.T
    if b is not None:
        p = p + 1.0
    q = wm.T @ wm if h_diff else None
    out_size = n.size
    in_size = w.size + (h.size if h_diff else 0) + (b.size if b is not None else 0)
    u, stats = sylvester_pinv(
        p[None],
        None if q is None else q[None],
        n.astype(dtype)[None],
        rcond,
        min(out_size, in_size),
    )
    u = u[0]
    outs = []
    if h_diff:
        outs.append((u @ wm.T).astype(h.dtype))
    nw = hm.T @ u
    outs.append((nw.T if transposed else nw).astype(w.dtype))
    if b is not None:
        outs.append(jnp.sum(u, axis=0).astype(b.dtype))
    return tuple(outs), stats
