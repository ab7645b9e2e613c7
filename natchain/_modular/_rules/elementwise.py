"""Elementwise primitives: ``J`` is diagonal per operand, up to implicit broadcasting.

With every differentiated operand of the output's shape, ``J = [D_1, …, D_k]`` has
``J Jᵀ = Σ D_i²`` diagonal: each entry's step is split between its operands in proportion
to their partial derivatives (``c = a·b`` gives ``(n_a, n_b) = (b, a) n_c / (a² + b²)``, the
proposal's example). A single differentiated operand broadcast to the output has ``Jᵀ J``
diagonal instead. ``add``/``sub`` with one broadcast operand (a bias) have a closed form;
anything else falls back to the materialised local Jacobian.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from natchain._modular._core import (
    LocalStats,
    column_orthogonal_rule,
    generic_rule,
    orthogonal_rule,
    row_orthogonal_rule,
)
from natchain._modular._registry import register_rule


def _split(local):
    out_shape = jnp.shape(local.outputs[0])
    diff_in = local.diff_primals
    full = [jnp.shape(x) == out_shape for x in diff_in]
    return out_shape, diff_in, full


def _elementwise_rule(local, n_out):
    """Row-orthogonal when every differentiated operand has the output's shape."""
    _, diff_in, full = _split(local)
    if all(full):
        return row_orthogonal_rule(local, n_out)
    if len(diff_in) == 1:
        return column_orthogonal_rule(local, n_out)
    return generic_rule(local, n_out)


def _unbroadcast(n, shape):
    """``Eᵀ n``: sum ``n`` down to the operand ``shape`` it was broadcast from."""
    lead = n.ndim - len(shape)
    s = jnp.sum(n, axis=tuple(range(lead))) if lead else n
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and s.shape[i] != 1)
    if axes:
        s = jnp.sum(s, axis=axes, keepdims=True)
    return s.reshape(shape)


def _additive_rule(signs):
    """``y = Σ ±a_i`` with at most one broadcast operand ``b``: ``J Jᵀ = k I + E Eᵀ``.

    Per broadcast group of size ``G``, ``(k I + 11ᵀ)⁻¹ = (I − 11ᵀ / (k + G)) / k``: the
    full-shape operands share ``u = (n − E Eᵀ n / (k + G)) / k`` and the broadcast one gets
    ``Eᵀ n / (k + G)``. This is the primitive-level ``add`` of a bias.
    """

    def rule(local, n_out):
        out_shape, diff_in, full = _split(local)
        if all(full):
            return row_orthogonal_rule(local, n_out)
        if len(diff_in) == 1:
            return column_orthogonal_rule(local, n_out)
        if sum(not f for f in full) > 1:
            return generic_rule(local, n_out)
        sg = [s for s, d in zip(signs, local.diff, strict=True) if d]
        (n,) = n_out
        k = sum(full)
        ib = full.index(False)
        b = diff_in[ib]
        size_out = int(np.prod(out_shape))
        g = size_out // int(np.size(b))
        etn = _unbroadcast(n, jnp.shape(b))
        small = local.rcond is not None and math.sqrt(k / (k + g)) <= local.rcond
        if small:  # the sqrt(k) singular values are cut: only group means are kept
            u = jnp.broadcast_to(etn, out_shape) / (g * (k + g))
        else:
            u = (n - jnp.broadcast_to(etn, out_shape) / (k + g)) / k
        outs = []
        for i, (x, s) in enumerate(zip(diff_in, sg, strict=True)):
            v = s * (etn / (k + g) if i == ib else u)
            outs.append(v.astype(jnp.result_type(x)))
        n_groups = int(np.size(b))
        rank = n_groups if small else size_out
        cond = 1.0 if (small or size_out == n_groups) else math.sqrt((k + g) / k)
        stats = LocalStats(jnp.asarray(rank), jnp.asarray(size_out - rank), jnp.asarray(cond))
        return tuple(outs), stats

    return rule


_add_rule = _additive_rule((1, 1))
register_rule("add", _add_rule, elementwise=True)
register_rule("add_any", _add_rule, elementwise=True)
_sub_rule = _additive_rule((1, -1))
register_rule("sub", _sub_rule, elementwise=True)

for _name in ("mul", "div", "max", "min", "pow", "atan2", "rem", "select_n", "clamp"):
    register_rule(_name, _elementwise_rule, elementwise=True)

for _name in (
    "neg",
    "tanh",
    "logistic",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "integer_pow",
    "square",
    "sqrt",
    "rsqrt",
    "sin",
    "cos",
    "abs",
    "erf",
    "erfc",
    "erf_inv",
    "tan",
    "sinh",
    "cosh",
    "asin",
    "acos",
    "atan",
    "asinh",
    "acosh",
    "atanh",
    "cbrt",
    "lgamma",
    "digamma",
):
    register_rule(_name, _elementwise_rule, elementwise=True)

# J = I (float to float): the natural cotangent passes through unchanged.
register_rule("convert_element_type", orthogonal_rule, elementwise=True)
register_rule("copy", orthogonal_rule, elementwise=True)
