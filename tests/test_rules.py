"""Every registered natural rule against the generic rule (the local Jacobian's pseudo-inverse).

One table of primitive cases; one parametrised test checks each case's rule — the
natural cotangents, the rank and the number of cut singular values — against
``generic_rule`` on the same local map; a completeness test fails when a registered rule
has no case. Inputs are random and well conditioned; tolerance 1e-10 relative in float64
(1e-5 for the float32 case).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src import ad_util

from natchain._jaxpr import bind_eqn
from natchain._modular import RULES, LocalMap, generic_rule


def _r(seed, *shape, positive=False):
    x = np.random.default_rng(seed).normal(size=shape)
    return jnp.asarray(np.abs(x) + 0.5 if positive else x)


A34, B34, C34 = _r(0, 3, 4), _r(1, 3, 4), _r(2, 3, 4)
P34 = _r(3, 3, 4, positive=True)
B14 = _r(4, 1, 4)
V3, S0 = _r(5, 3), _r(6)
PRED = jnp.asarray(np.random.default_rng(7).integers(0, 2, size=(3, 4)).astype(bool))

# (primitive, case id, function, args, which args are differentiated)
CASES = [
    ("add", "full", lax.add, (A34, B34), (True, True)),
    ("add", "bias", lax.add, (A34, B14), (True, True)),
    ("add", "scalar", lambda a, b: a + b, (V3, S0), (True, True)),
    ("add", "one", lax.add, (A34, B34), (True, False)),
    ("add_any", "full", ad_util.add_jaxvals_p.bind, (A34, B34), (True, True)),
    ("sub", "full", lax.sub, (A34, B34), (True, True)),
    ("sub", "bias", lax.sub, (A34, B14), (True, True)),
    ("mul", "both", lax.mul, (A34, B34), (True, True)),
    ("mul", "one", lax.mul, (A34, B34), (False, True)),
    ("mul", "broadcast_one", lax.mul, (A34, B14), (False, True)),
    ("mul", "broadcast_both", lax.mul, (A34, B14), (True, True)),
    ("div", "constant", lax.div, (A34, P34), (True, False)),
    ("div", "both", lax.div, (A34, P34), (True, True)),
    ("max", "both", lax.max, (A34, B34), (True, True)),
    ("max", "relu", lambda a: jnp.maximum(a, 0.0), (A34,), (True,)),
    ("min", "both", lax.min, (A34, B34), (True, True)),
    ("pow", "both", lax.pow, (P34, B34), (True, True)),
    ("atan2", "both", lax.atan2, (A34, B34), (True, True)),
    ("select_n", "cases", lax.select_n, (PRED, A34, B34), (False, True, True)),
    (
        "clamp",
        "operand",
        lax.clamp,
        (jnp.asarray(-0.5), A34, jnp.asarray(0.5)),
        (False, True, False),
    ),
    ("neg", "unary", lax.neg, (A34,), (True,)),
    ("tanh", "unary", lax.tanh, (A34,), (True,)),
    ("logistic", "unary", lax.logistic, (A34,), (True,)),
    ("exp", "unary", lax.exp, (A34,), (True,)),
    ("exp2", "unary", lax.exp2, (A34,), (True,)),
    ("log", "unary", lax.log, (P34,), (True,)),
    ("log1p", "unary", lax.log1p, (P34,), (True,)),
    ("expm1", "unary", lax.expm1, (A34,), (True,)),
    ("integer_pow", "cube", lambda a: lax.integer_pow(a, 3), (A34,), (True,)),
    ("square", "unary", lax.square, (A34,), (True,)),
    ("sqrt", "unary", lax.sqrt, (P34,), (True,)),
    ("rsqrt", "unary", lax.rsqrt, (P34,), (True,)),
    ("sin", "unary", lax.sin, (A34,), (True,)),
    ("cos", "unary", lax.cos, (A34,), (True,)),
    ("abs", "unary", lax.abs, (A34,), (True,)),
    ("erf", "unary", lax.erf, (A34,), (True,)),
    (
        "convert_element_type",
        "f32_to_f64",
        lambda a: lax.convert_element_type(a, jnp.float64),
        (A34.astype(jnp.float32),),
        (True,),
    ),
    ("copy", "unary", lax.copy_p.bind, (A34,), (True,)),
    ("reshape", "flat", lambda a: a.reshape(12), (A34,), (True,)),
    ("transpose", "2d", lambda a: a.T, (A34,), (True,)),
    ("squeeze", "lead", lambda a: lax.squeeze(a, (0,)), (B14,), (True,)),
    ("rev", "axis0", lambda a: lax.rev(a, (0,)), (A34,), (True,)),
    (
        "broadcast_in_dim",
        "rows",
        lambda v: lax.broadcast_in_dim(v, (3, 4), (0,)),
        (V3,),
        (True,),
    ),
    ("reduce_sum", "axis1", lambda a: jnp.sum(a, axis=1), (A34,), (True,)),
    ("reduce_max", "axis0", lambda a: jnp.max(a, axis=0), (A34,), (True,)),
    ("reduce_min", "axis1", lambda a: jnp.min(a, axis=1), (A34,), (True,)),
    ("slice", "block", lambda a: a[1:, ::2], (A34,), (True,)),
    ("concatenate", "both", lambda a, b: jnp.concatenate([a, b], 0), (A34, B14), (True, True)),
    ("concatenate", "one", lambda a, b: jnp.concatenate([a, b], 1), (A34, B34), (False, True)),
    ("dot_general", "data_left", lambda x, w: x @ w, (A34, _r(8, 4, 2)), (False, True)),
    ("dot_general", "both", lambda x, w: x @ w, (A34, _r(9, 4, 2)), (True, True)),
    ("dot_general", "left_only", lambda x, w: x @ w, (_r(10, 3, 4), _r(11, 4, 5)), (True, False)),
    (
        "dot_general",
        "rank_deficient_both",
        lambda a, b: a @ b,
        (_r(15, 4, 2), _r(16, 2, 3)),
        (True, True),
    ),
    (
        "dot_general",
        "batched",
        lambda a, b: jnp.einsum("bij,bjk->bik", a, b),
        (_r(12, 2, 3, 4), _r(13, 2, 4, 2)),
        (True, True),
    ),
    (
        "dot_general",
        "contract_last",
        lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ()))),
        (A34, _r(14, 5, 4)),
        (True, True),
    ),
    (
        "dot_general",
        "attention_scores",
        lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k),
        (_r(17, 2, 3, 4), _r(18, 2, 3, 4)),
        (True, True),
    ),
]

_NHWC = ("NHWC", "HWIO", "NHWC")
_NCHW = ("NCHW", "OIHW", "NCHW")


def _conv(strides=(1, 1), padding="VALID", dn=_NHWC, **kw):
    def f(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, **kw)

    return f


def _window(init, op, dims, strides, padding="VALID", **kw):
    return lambda x: lax.reduce_window(x, init, op, dims, strides, padding, **kw)


X_NHWC, W_HWIO = _r(30, 2, 4, 4, 2), _r(31, 2, 2, 2, 3)
X_NCHW, W_OIHW = _r(32, 2, 2, 5, 5), _r(33, 4, 2, 3, 3)
X_G, W_G = _r(34, 2, 4, 4, 4), _r(35, 2, 2, 2, 4)  # two feature groups of two channels
_GATHER = lax.GatherDimensionNumbers(
    offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,)
)
_SCATTER = lax.ScatterDimensionNumbers(
    update_window_dims=(1,), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
)
IDS = jnp.asarray([[0], [2], [0], [3]])  # token 0 looked up twice

CASES += [
    ("conv_general_dilated", "nhwc_kernel", _conv(), (X_NHWC, W_HWIO), (False, True)),
    ("conv_general_dilated", "nhwc_joint", _conv(), (X_NHWC, W_HWIO), (True, True)),
    ("conv_general_dilated", "nhwc_input", _conv(), (X_NHWC, W_HWIO), (True, False)),
    (
        "conv_general_dilated",
        "nhwc_joint_f32",
        _conv(),
        (X_NHWC.astype(jnp.float32), W_HWIO.astype(jnp.float32)),
        (True, True),
    ),
    (
        "conv_general_dilated",
        "nchw_stride_pad_joint",
        _conv((2, 2), ((1, 1), (1, 1)), _NCHW),
        (X_NCHW, W_OIHW),
        (True, True),
    ),
    (
        "conv_general_dilated",
        "nchw_same_kernel",
        _conv((1, 1), "SAME", _NCHW),
        (X_NCHW, W_OIHW),
        (False, True),
    ),
    (
        "conv_general_dilated",
        "dilated_joint",
        _conv((1, 1), ((1, 0), (0, 1)), _NCHW, lhs_dilation=(2, 1), rhs_dilation=(1, 2)),
        (_r(36, 1, 2, 3, 3), _r(37, 2, 2, 2, 2)),
        (True, True),
    ),
    (
        "conv_general_dilated",
        "groups_joint",
        _conv(feature_group_count=2),
        (X_G, W_G),
        (True, True),
    ),
    (
        "conv_general_dilated",
        "groups_kernel",
        _conv(feature_group_count=2),
        (X_G, W_G),
        (False, True),
    ),
    (
        "conv_general_dilated",
        "conv1d_stride2",
        lambda x, w: lax.conv_general_dilated(
            x, w, (2,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
        ),
        (_r(38, 2, 9, 1), _r(39, 5, 1, 3)),
        (False, True),
    ),
    (
        "conv_general_dilated",
        "batch_groups",
        _conv(batch_group_count=2),
        (_r(40, 2, 3, 3, 1), _r(41, 2, 2, 1, 2)),
        (True, True),
    ),
    (
        "reduce_window_sum",
        "avg_pool_2x2",
        _window(0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1)),
        (_r(42, 2, 4, 4, 2),),
        (True,),
    ),
    (
        "reduce_window_sum",
        "overlap_same",
        _window(0.0, lax.add, (1, 3, 3, 1), (1, 2, 2, 1), "SAME"),
        (_r(43, 1, 5, 5, 1),),
        (True,),
    ),
    (
        "reduce_window_sum",
        "dilated",
        _window(0.0, lax.add, (2, 2), (1, 1), ((1, 0), (0, 1)), window_dilation=(2, 1)),
        (A34,),
        (True,),
    ),
    (
        "reduce_window_max",
        "max_pool_2x2",
        _window(-jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1)),
        (_r(44, 2, 4, 4, 2),),
        (True,),
    ),
    (
        "reduce_window_max",
        "overlap_same",
        _window(-jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME"),
        (_r(45, 1, 4, 4, 1),),
        (True,),
    ),
    (
        "reduce_window_min",
        "overlap",
        _window(jnp.inf, lax.min, (2, 2), (1, 1)),
        (A34,),
        (True,),
    ),
    ("cumsum", "axis1", lambda a: lax.cumsum(a, axis=1), (A34,), (True,)),
    ("cumsum", "reverse", lambda a: lax.cumsum(a, axis=0, reverse=True), (A34,), (True,)),
    ("cummax", "axis1", lambda a: lax.cummax(a, axis=1), (A34,), (True,)),
    ("cummin", "axis0", lambda a: lax.cummin(a, axis=0), (A34,), (True,)),
    (
        "pad",
        "negative_interior",
        lambda a: lax.pad(a, 0.0, ((1, -1, 1), (-1, 2, 0))),
        (A34,),
        (True,),
    ),
    (
        "pad",
        "value_too",
        lambda a, v: lax.pad(a, v, ((1, 0, 0), (0, 2, 1))),
        (A34, S0),
        (True, True),
    ),
    (
        "dynamic_slice",
        "window",
        lambda a, i, j: lax.dynamic_slice_p.bind(a, i, j, slice_sizes=(2, 2)),
        (A34, jnp.asarray(1), jnp.asarray(3)),  # j = 3 is clamped to 2
        (True, False, False),
    ),
    (
        "dynamic_update_slice",
        "both",
        lambda a, b, i, j: lax.dynamic_update_slice_p.bind(a, b, i, j),
        (A34, _r(46, 2, 2), jnp.asarray(1), jnp.asarray(1)),
        (True, True, False, False),
    ),
    (
        "gather",
        "embedding_repeat",
        lambda t, ids: lax.gather(t, ids, _GATHER, (1, 4)),
        (A34, IDS[:, :1].clip(0, 2)),
        (True, False),
    ),
    (
        "scatter-add",
        "repeat",
        lambda a, ids, u: lax.scatter_add(a, ids, u, _SCATTER),
        (A34, IDS[:, :1].clip(0, 2), _r(47, 4, 4)),
        (True, False, True),
    ),
    ("split", "axis1", lambda a: lax.split(a, (1, 3), axis=1), (A34,), (True,)),
    (
        "reduce_precision",
        "bf16",
        lambda a: lax.reduce_precision(a, exponent_bits=11, mantissa_bits=52),
        (A34,),
        (True,),
    ),
    ("rem", "both", lax.rem, (A34, P34), (True, True)),
    ("erfc", "unary", lax.erfc, (A34,), (True,)),
    ("erf_inv", "unary", lax.erf_inv, (jnp.tanh(A34) * 0.9,), (True,)),
    ("tan", "unary", lax.tan, (A34 * 0.3,), (True,)),
    ("sinh", "unary", lax.sinh, (A34,), (True,)),
    ("cosh", "unary", lax.cosh, (A34,), (True,)),
    ("asin", "unary", lax.asin, (jnp.tanh(A34) * 0.9,), (True,)),
    ("acos", "unary", lax.acos, (jnp.tanh(A34) * 0.9,), (True,)),
    ("atan", "unary", lax.atan, (A34,), (True,)),
    ("asinh", "unary", lax.asinh, (A34,), (True,)),
    ("acosh", "unary", lax.acosh, (P34 + 1.0,), (True,)),
    ("atanh", "unary", lax.atanh, (jnp.tanh(A34) * 0.9,), (True,)),
    ("cbrt", "unary", lax.cbrt, (P34,), (True,)),
    ("lgamma", "unary", lax.lgamma, (P34,), (True,)),
    ("digamma", "unary", lax.digamma, (P34,), (True,)),
]


def _local_map(name, fun, args, diff):
    """The :class:`LocalMap` of the one ``name`` equation in ``fun``'s jaxpr."""
    closed = jax.make_jaxpr(fun)(*args)
    eqns = [e for e in closed.jaxpr.eqns if e.primitive.name == name]
    assert len(eqns) == 1, closed
    (eqn,) = eqns
    index = {v: i for i, v in enumerate(closed.jaxpr.invars)}
    vals, dmask = [], []
    for v in eqn.invars:
        if hasattr(v, "val"):
            vals.append(v.val)
            dmask.append(False)
        else:
            vals.append(args[index[v]])
            dmask.append(diff[index[v]])
    outs = bind_eqn(eqn, vals)
    outs = tuple(outs) if eqn.primitive.multiple_results else (outs,)

    def fn(*d):
        it = iter(d)
        full = [next(it) if m else v for v, m in zip(vals, dmask, strict=True)]
        out = bind_eqn(eqn, full)
        return tuple(out) if eqn.primitive.multiple_results else (out,)

    return LocalMap(name, tuple(vals), tuple(dmask), outs, dict(eqn.params), fn, None)


@pytest.mark.parametrize(
    "name, fun, args, diff", [c[:1] + c[2:] for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_rule_matches_generic_pseudo_inverse(name, fun, args, diff):
    local = _local_map(name, fun, args, diff)
    n_out = tuple(_r(20 + i, *jnp.shape(o)).astype(o.dtype) for i, o in enumerate(local.outputs))

    @jax.jit  # one compilation per case instead of one per operation
    def both(args, n_out):
        local = _local_map(name, fun, args, diff)
        return RULES[name](local, n_out), generic_rule(local, n_out)

    (got, st), (ref, st_ref) = both(args, n_out)
    tol = 1e-5 if any(jnp.result_type(p) == jnp.float32 for p in local.primals) else 1e-10
    assert len(got) == len(ref) == sum(local.diff)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        scale = max(float(jnp.max(jnp.abs(r))), 1e-30)
        assert float(jnp.max(jnp.abs(g - r))) <= tol * scale
    assert int(st.rank) == int(st_ref.rank)
    assert int(st.num_cut) == int(st_ref.num_cut)
    # a condition number from the eigenvalues of J Jᵀ carries ~cond² · eps relative error:
    # 1e-6 in float64; in float32 (eps 1.2e-7, conditions ~10 here) 1e-4
    np.testing.assert_allclose(
        float(st.condition), float(st_ref.condition), rtol=1e-4 if tol > 1e-9 else 1e-6
    )


def test_rules_every_registered_rule_has_a_case():
    covered = {c[0] for c in CASES}
    missing = sorted(set(RULES) - covered)
    assert not missing, f"registered rules without a test case: {missing}"
