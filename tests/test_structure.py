"""The layer-pattern registry: one table of (pattern, spelling) rows, checked on both routes.

For every row of :data:`LAYER_CASES`:

- each site's Gram block equals its part of ``Mᵀ J Jᵀ M`` from the materialised Jacobian,
  and the whole structured ``C`` (fallback leaves included) equals ``B Bᵀ``;
- each site's layer-granularity map reproduces the model's value and its rule equals the
  generic pseudo-inverse of its local Jacobian;
- the Gram route and the layer granularity recognise the same sites.

A completeness test fails when a registered pattern has no row.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import equinox as eqx
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natchain as nc
from natchain._gram import factor_gram, gram_sites, site_blocks
from natchain._modular._api import _flatten_model
from natchain._modular._core import generic_rule
from natchain._modular._interpreter import trace_chain
from natchain._problem import build_problem
from natchain._structure import PATTERNS
from tests.cases import rel_err

N, T, D, O = 3, 5, 3, 2


def _normal(seed, *shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


X = _normal(100, N, D)
XS = _normal(101, N, T, D)  # (N, T, d) token sequences


def _mlp_params(stored_transposed=False, bias=True):
    w1, w2 = _normal(1, D, 4, scale=0.6), _normal(2, 4, O, scale=0.5)
    p = {"W1": w1.T if stored_transposed else w1, "W2": w2.T if stored_transposed else w2}
    if bias:
        p |= {"b1": _normal(3, 4, scale=0.1), "b2": _normal(4, O, scale=0.1)}
    return p


def _f64(tree):  # Flax initialises float32 parameters whatever the x64 flag
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _norm(h):
    mu = jnp.mean(h, axis=-1, keepdims=True)
    return (h - mu) / jnp.sqrt(jnp.mean((h - mu) ** 2, axis=-1, keepdims=True) + 1e-5)


# ---- the rows: (pattern, spelling) -> model, params, x, expected sites ---------------------


def dense_right():
    return lambda p, x: jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"], _mlp_params(), X


def dense_transposed():
    def model(p, x):
        return jnp.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]

    return model, _mlp_params(stored_transposed=True), X


def dense_vmap():
    def model(p, x):
        return jax.vmap(lambda xi: p["W2"] @ jnp.tanh(p["W1"] @ xi + p["b1"]) + p["b2"])(x)

    return model, _mlp_params(stored_transposed=True), X


def dense_left_batched():  # (W @ Xᵀ)ᵀ: weight on the left, input transposed
    def model(p, x):
        h = jnp.tanh((p["W1"] @ x.T).T + p["b1"])
        return (p["W2"] @ h.T).T + p["b2"]

    return model, _mlp_params(stored_transposed=True), X


def dense_reshaped_bias():  # Flax's spelling: bias reshaped to a (1, o) row
    def layer(h, w, b):
        y = jax.lax.dot_general(h, w, (((h.ndim - 1,), (0,)), ((), ())))
        return y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))

    def model(p, x):
        return layer(jnp.tanh(layer(x, p["W1"], p["b1"])), p["W2"], p["b2"])

    return model, _mlp_params(), X


def dense_no_bias():
    return lambda p, x: jnp.tanh(x @ p["W1"]) @ p["W2"], _mlp_params(bias=False), X


def dense_sequence():  # (N, T, d): per-example weight-gradient rows (T = 5 > 1)
    def model(p, x):
        return jnp.mean(jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"], axis=1) + p["b2"]

    return model, _mlp_params(), XS


def dense_sequence_vmap():
    def one(p, xi):
        return jnp.mean(jnp.tanh(xi @ p["W1"] + p["b1"]) @ p["W2"], axis=0)

    return (
        lambda p, x: jax.vmap(lambda xi: one(p, xi))(x),
        _mlp_params(bias=False) | {"b1": _normal(3, 4, scale=0.1)},
        XS,
    )


def dense_flax_linen():
    net = fnn.Sequential([fnn.Dense(4), jnp.tanh, fnn.Dense(O)])
    return net.apply, _f64(net.init(jax.random.PRNGKey(5), X)), X


def dense_equinox():
    mlp = eqx.nn.MLP(D, O, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(6))
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    return lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, X


def scale_and_shift():  # LayerNorm affine: h * gamma + beta
    def model(p, x):
        return jnp.tanh(_norm(x) * p["g"] + p["b"]) @ p["W"]

    p = {"g": 1 + _normal(7, D, scale=0.2), "b": _normal(8, D, scale=0.1), "W": _normal(9, D, O)}
    return model, p, X


def scale_after_dense():  # h differentiated: gamma scales an activation, beta folded
    def model(p, x):
        return jnp.tanh(jnp.tanh(x @ p["V"]) * p["g"] + p["b"]) @ p["W"]

    p = {"V": _normal(6, D, D, scale=0.7), "g": 1 + _normal(7, D, scale=0.2)}
    p |= {"b": _normal(8, D, scale=0.1), "W": _normal(9, D, O)}
    return model, p, X


def scale_after_dense_no_shift():
    def model(p, x):
        return jnp.tanh(jnp.tanh(x @ p["V"]) * p["g"]) @ p["W"]

    p = {"V": _normal(6, D, D, scale=0.7), "g": 1 + _normal(7, D, scale=0.2), "W": _normal(9, D, O)}
    return model, p, X


def scale_rmsnorm():  # RMSNorm: h * gamma, no shift
    def model(p, x):
        h = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return jnp.tanh(h * p["g"]) @ p["W"]

    return model, {"g": 1 + _normal(7, D, scale=0.2), "W": _normal(9, D, O)}, X


def scale_per_channel_sequence():  # (N, T, c) * s(c)
    def model(p, x):
        return jnp.mean(jnp.tanh(x * p["s"]), axis=1) @ p["W"]

    return model, {"s": 1 + _normal(7, D, scale=0.2), "W": _normal(9, D, O)}, XS


def scale_flax_layernorm():  # Flax multiplies the scale into rsqrt(var) first
    net = fnn.Sequential([fnn.LayerNorm(), jnp.tanh, fnn.Dense(O)])
    params = _f64(net.init(jax.random.PRNGKey(5), X))
    params = jax.tree_util.tree_map(lambda a: a + _normal(11, *a.shape, scale=0.1), params)
    return net.apply, params, X


def shift_alone():  # a bias after an activation: no site to fold into
    def model(p, x):
        return (jnp.tanh(x @ p["W"]) + p["b"]) @ p["V"]

    return model, {"W": _normal(1, D, 4), "b": _normal(3, 4, scale=0.1), "V": _normal(2, 4, O)}, X


def shift_positional():  # learned positional embedding (T, d) broadcast over examples
    def model(p, x):
        return jnp.mean(jnp.tanh(x + p["pos"]), axis=1) @ p["W"]

    return model, {"pos": _normal(7, T, D, scale=0.3), "W": _normal(9, D, O)}, XS


# ---- convolutions (small images: (N, 4, 4, 2) NHWC, (N, 2, 4, 4) NCHW, (N, 6, 1) NWC) -------

IMG, IMG_NCHW, SIG = _normal(102, N, 4, 4, 2), _normal(103, N, 2, 4, 4), _normal(104, N, 6, 1)
_NHWC, _NCHW = ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")


def _conv(x, w, dn, strides=(1, 1), padding="VALID", **kw):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, **kw)


def _head(h, w):
    return jnp.tanh(h).reshape(h.shape[0], -1) @ w


def conv_nhwc_bias():  # bias reshaped to (1, 1, 1, c), as Flax adds it
    def model(p, x):
        return _head(_conv(x, p["k"], _NHWC, padding="SAME") + p["b"].reshape(1, 1, 1, -1), p["W"])

    p = {"k": _normal(20, 2, 2, 2, 3, scale=0.5), "b": _normal(21, 3, scale=0.1)}
    return model, p | {"W": _normal(22, 48, O, scale=0.3)}, IMG


def conv_nchw_strided():  # NCHW, stride 2, explicit padding, no bias
    def model(p, x):
        return _head(_conv(x, p["k"], _NCHW, (2, 2), ((1, 1), (1, 1))), p["W"])

    return model, {"k": _normal(23, 3, 2, 3, 3, scale=0.4), "W": _normal(24, 12, O)}, IMG_NCHW


def conv_groups_dilated():  # two feature groups, kernel dilation, bias by broadcast
    def model(p, x):
        h = _conv(x, p["k"], _NHWC, rhs_dilation=(1, 2), feature_group_count=2)
        return _head(h + p["b"], p["W"])

    p = {"k": _normal(25, 2, 2, 1, 4, scale=0.5), "b": _normal(26, 4, scale=0.1)}
    return model, p | {"W": _normal(27, 24, O, scale=0.3)}, IMG


def conv_two_layers():  # the second convolution's input is differentiated: the joint rule
    def model(p, x):
        h = jnp.tanh(_conv(x, p["k1"], _NHWC) + p["b1"])
        return _head(_conv(h, p["k2"], _NHWC) + p["b2"], p["W"])

    p = {"k1": _normal(28, 2, 2, 2, 2, scale=0.5), "b1": _normal(29, 2, scale=0.1)}
    p |= {"k2": _normal(30, 2, 2, 2, 2, scale=0.5), "b2": _normal(31, 2, scale=0.1)}
    return model, p | {"W": _normal(32, 8, O, scale=0.3)}, IMG


def conv_1d_strided():  # MNIST-1D's spelling: NWC, kernel 3, stride 2, padding 1
    def model(p, x):
        h = _conv(x, p["k"], ("NWC", "WIO", "NWC"), (2,), ((1, 1),)) + p["b"]
        return _head(h, p["W"])

    p = {"k": _normal(33, 3, 1, 3, scale=0.5), "b": _normal(34, 3, scale=0.1)}
    return model, p | {"W": _normal(35, 9, O, scale=0.3)}, SIG


def conv_flax_linen():
    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = jnp.tanh(fnn.Conv(3, (2, 2))(x))
            return fnn.Dense(O)(h.reshape(h.shape[0], -1))

    net = Net()
    return net.apply, _f64(net.init(jax.random.PRNGKey(7), IMG)), IMG


def conv_equinox():  # per example under vmap; the (c, 1, 1) bias follows a squeeze
    conv = eqx.nn.Conv2d(2, 3, 2, key=jax.random.PRNGKey(8))
    lin = eqx.nn.Linear(27, O, key=jax.random.PRNGKey(9))
    params, static = eqx.partition((conv, lin), eqx.is_inexact_array)

    def one(p, x):
        c, li = eqx.combine(p, static)
        return li(jnp.tanh(c(x)).reshape(-1))

    return lambda p, x: jax.vmap(lambda xi: one(p, xi))(x), params, IMG_NCHW


class LayerCase(NamedTuple):
    pattern: str  # the pattern the row is about
    spelling: str
    build: object  # () -> (model, params, x)
    sites: tuple  # the pattern names of every site the model should have


LAYER_CASES = [
    LayerCase("dense", "x@W+b", dense_right, ("dense", "dense")),
    LayerCase("dense", "x@W.T+b", dense_transposed, ("dense", "dense")),
    LayerCase("dense", "vmap W@x+b", dense_vmap, ("dense", "dense")),
    LayerCase("dense", "(W@x.T).T+b", dense_left_batched, ("dense", "dense")),
    LayerCase("dense", "reshaped bias", dense_reshaped_bias, ("dense", "dense")),
    LayerCase("dense", "no bias", dense_no_bias, ("dense", "dense")),
    LayerCase("dense", "(N,T,d)", dense_sequence, ("dense", "dense", "shift")),
    LayerCase("dense", "vmap (T,d)", dense_sequence_vmap, ("dense", "dense")),
    LayerCase("dense", "flax linen", dense_flax_linen, ("dense", "dense")),
    LayerCase("dense", "equinox", dense_equinox, ("dense", "dense")),
    LayerCase("scale", "h*g+b", scale_and_shift, ("scale", "dense")),
    LayerCase("scale", "rmsnorm h*g", scale_rmsnorm, ("scale", "dense")),
    LayerCase("scale", "act*g+b", scale_after_dense, ("dense", "scale", "dense")),
    LayerCase("scale", "act*g", scale_after_dense_no_shift, ("dense", "scale", "dense")),
    LayerCase("scale", "(N,T,c)*s", scale_per_channel_sequence, ("scale", "dense")),
    LayerCase("scale", "flax LayerNorm", scale_flax_layernorm, ("scale", "shift", "dense")),
    LayerCase("shift", "h+b", shift_alone, ("dense", "shift", "dense")),
    LayerCase("shift", "x+pos", shift_positional, ("shift", "dense")),
    LayerCase("conv", "NHWC + reshaped bias", conv_nhwc_bias, ("conv", "dense")),
    LayerCase("conv", "NCHW stride 2 pad 1", conv_nchw_strided, ("conv", "dense")),
    LayerCase("conv", "groups, dilation", conv_groups_dilated, ("conv", "dense")),
    LayerCase("conv", "conv -> conv", conv_two_layers, ("conv", "conv", "dense")),
    LayerCase("conv", "1-D NWC stride 2", conv_1d_strided, ("conv", "dense")),
    LayerCase("conv", "flax linen", conv_flax_linen, ("conv", "dense")),
    LayerCase("conv", "equinox vmap", conv_equinox, ("conv", "shift", "dense")),
]


def _layer_nodes(model, params, x):
    fn, leaves, _, x_leaves = _flatten_model(model, params, x)
    chain, leaf_ids, *_ = trace_chain(
        fn, leaves, x_leaves, granularity="layer", rcond=None, fallback="error"
    )
    index = {i: j for j, i in enumerate(leaf_ids)}
    nodes = [n for n in chain.nodes if n.kind in PATTERNS]
    return [(n, frozenset(index[i] for i in n.in_ids if i in index)) for n in nodes]


def _checks(model, params, x):
    """Everything the row test compares, computed in one compiled program."""
    problem = build_problem(model, params, x, nc.Categorical(), need_y=False)
    blocks = {k: (tuple(sorted(site.leaves)), b) for k, (site, b) in site_blocks(problem).items()}
    cmat, stats = factor_gram(problem)
    jac = jax.tree_util.tree_leaves(jax.jacrev(model)(params, x))
    bl = [jnp.einsum("nmr,nmp->nrp", problem.factor, j.reshape(*j.shape[:2], -1)) for j in jac]
    want_blocks = {}
    for key, (leaves, _) in blocks.items():
        b = jnp.concatenate([bl[i] for i in leaves], axis=-1)
        b = b.reshape(b.shape[0] * b.shape[1], -1)
        want_blocks[key] = b @ b.T
    bfull = problem.factor_jacobian()
    rules = []
    for k, (node, _) in enumerate(_layer_nodes(model, params, x)):
        local = node.local
        nvec = _normal(50 + k, *jnp.shape(local.outputs[0]))
        got, _ = node.rule(local, (nvec,))
        ref, _ = generic_rule(local, (nvec,))
        rules.append((local.fn(*local.diff_primals)[0], local.outputs[0], list(got), list(ref)))
    blocks = {k: b for k, (_, b) in blocks.items()}
    return blocks, want_blocks, cmat, bfull @ bfull.T, stats["structured_params"], rules


@pytest.mark.parametrize(
    "case", LAYER_CASES, ids=[f"{c.pattern}-{c.spelling}" for c in LAYER_CASES]
)
def test_layer_case(case):
    model, params, x = case.build()
    _, structure, kept, _ = gram_sites(model, params, x, N)
    assert sorted(structure.sites[k].name for k in kept) == sorted(case.sites)
    blocks, want_blocks, cmat, want, structured, rules = jax.jit(lambda p, x: _checks(model, p, x))(
        params, x
    )

    # Gram blocks against the materialised Jacobian (float64; the blocks are sums of a few
    # products of O(1) numbers, so 1e-12 relative leaves ~1e4 eps of room).
    assert blocks.keys() == want_blocks.keys() == kept.keys()
    for key, block in blocks.items():
        w = want_blocks[key]
        assert jnp.linalg.norm(block - w) <= 1e-12 * jnp.linalg.norm(w), key
    assert jnp.linalg.norm(cmat - want) <= 1e-12 * jnp.linalg.norm(want)
    assert int(structured) == sum(int(a.size) for a in jax.tree_util.tree_leaves(params))

    # Both routes, the same sites (pattern, leaves).
    nodes = _layer_nodes(model, params, x)
    gram_view = sorted(
        (structure.sites[k].name, tuple(sorted(structure.sites[k].leaves))) for k in kept
    )
    layer_view = sorted((node.kind, tuple(sorted(leaves))) for node, leaves in nodes)
    assert gram_view == layer_view

    # Each site's map reproduces the model's value; its rule equals the generic
    # pseudo-inverse of its local Jacobian. Closed forms solve through eigh/Cholesky of small
    # Gram factors (condition ≲ 1e2 here), the reference by SVD: they agree to ~cond² · eps,
    # and 1e-10 leaves a margin of 100×.
    for (node, _), (out, want_out, got, ref) in zip(nodes, rules, strict=True):
        np.testing.assert_allclose(out, want_out, rtol=1e-13, atol=1e-14)
        assert rel_err(got, ref) <= 1e-10, node.name


def test_layer_cases_cover_every_pattern():
    """Every registered pattern has a row (a new pattern must bring its cases)."""
    covered = {c.pattern for c in LAYER_CASES}
    missing = sorted(set(PATTERNS) - covered)
    assert not missing, f"patterns without LAYER_CASES rows: {missing}"


# ---- declines, fallbacks and what inspection says -----------------------------------------


def _exact_gram(model, params, x):
    fam = nc.Gaussian()
    y = _normal(60, *jax.eval_shape(model, params, x).shape)
    ref = nc.natural_gradient(model, params, x, y, fam, solver="pinv", damping=1e-3)
    sol = nc.natural_gradient(model, params, x, y, fam, solver="gram", damping=1e-3)
    # float64, damped: both solve a well-conditioned system; 1e-10 is the suite's exact tolerance
    assert rel_err(sol.value, ref.value) <= 1e-10
    return int(sol.stats["structured_params"])


def _row(table, path):
    (row,) = [r for r in table.rows if r.path == path]
    return row


def test_pattern_declines_weight_with_batch_dimensions():
    """A per-token weight (a batch dimension of dot_general on a parameter) is declined."""

    def model(p, x):
        return jnp.mean(jnp.einsum("ntd,tdo->nto", x, p["W"]), axis=1) @ p["V"]

    params = {"W": _normal(1, T, D, 4, scale=0.5), "V": _normal(2, 4, O)}
    assert _exact_gram(model, params, XS) == 8  # V only
    row = _row(nc.inspect_structure(model, params, XS), "['W']")
    assert row.pattern is None and not row.gram
    assert "batch dimensions" in row.reason
    assert row.layer_map.startswith("primitives:")


def test_tied_weight_falls_back_visibly():
    def model(p, x):
        return jnp.tanh(x @ p["W"]) @ p["W"].T

    params = {"W": _normal(1, D, 4, scale=0.5)}
    assert _exact_gram(model, params, X) == 0
    table = nc.inspect_structure(model, params, X)
    assert "used 2 times" in _row(table, "['W']").reason
    assert "Jacobian" in table.to_markdown() and str(table) == table.to_markdown()
    y = _normal(60, N, D)
    with pytest.warns(nc.StructureWarning, match=r"\['W'\].*used 2 times"):
        nc.grad(model, nc.Gaussian())(params, X, y)
    with pytest.raises(nc.StructureError, match="used 2 times"):
        nc.grad(model, nc.Gaussian(), strict=True)(params, X, y)


def test_no_layer_found_warns():
    def model(p, x):
        return jnp.sin(x @ (2.0 * p["W"]))  # a scaled weight is no dense layer

    params = {"W": _normal(1, D, O)}
    y = _normal(60, N, O)
    with pytest.warns(nc.StructureWarning, match="found no layer"):
        nc.grad(model, nc.Gaussian())(params, X, y)
    assert (
        "a parameter times a constant"
        in _row(nc.inspect_structure(model, params, X), "['W']").reason
    )


def test_per_example_parameter_declined_by_gram_only():
    """A parameter with one entry per example: the model cannot be traced at another batch
    size, so the Gram route finds no example axis and falls back for every leaf (exactly);
    the layer granularity still has its sites."""

    def model(p, x):
        return jnp.tanh(x + p["B"]) @ p["W"]

    params = {"B": _normal(1, N, D, scale=0.3), "W": _normal(2, D, O)}
    assert _exact_gram(model, params, X) == 0
    table = nc.inspect_structure(model, params, X)
    for path, layer_map in (("['B']", "shift"), ("['W']", "dense")):
        row = _row(table, path)
        assert row.pattern is not None and not row.gram and row.layer_map == layer_map
        assert row.reason == "Gram route: the model does not trace at another batch size"


def test_clean_model_does_not_warn():
    model, params, x = dense_vmap()
    y = _normal(60, N, O)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nc.StructureWarning)
        nc.grad(model, nc.Gaussian(), strict=True)(params, x, y)


# ---- activations with literals inside nested calls ----------------------------------------

ACTS = {
    "where": lambda h: jnp.where(h > 0, h, 0.0),
    "clip": lambda h: jnp.clip(h, -1, 1),
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu,
}


@pytest.mark.parametrize("act", list(ACTS))
def test_activation_models_run_at_both_granularities(act):
    f = ACTS[act]

    def model(p, x):
        return f(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    params, y, fam = _mlp_params(), _normal(60, N, O), nc.Gaussian()
    for granularity in ("layer", "primitive"):
        g = nc.grad(model, fam, granularity=granularity)(params, X, y)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))
    sol = nc.natural_gradient(model, params, X, y, fam, solver="gram")
    assert int(sol.stats["structured_params"]) == 26


def test_float32_parameters_keep_their_dtype_on_both_routes():
    """float32 parameters (with x64 on, as Flax initialises them): both routes run in float32,
    return float32, and agree with the float64 answer to float32 accuracy."""
    model, params, x = scale_after_dense()  # dense, scale with folded shift, dense
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    x32, y = x.astype(jnp.float32), _normal(60, N, O)
    fam = nc.Gaussian()
    for granularity in ("layer", "primitive"):
        ref = nc.grad(model, fam, granularity=granularity)(params, x, y)
        got = nc.grad(model, fam, granularity=granularity)(p32, x32, y.astype(jnp.float32))
        assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(got))
        # float32 eps 1.2e-7 times the local condition numbers (≲ 1e2 here): 1e-4 bound
        assert rel_err(got, ref) <= 1e-4
    ref = nc.natural_gradient(model, params, x, y, fam, solver="gram", damping=1e-3)
    sol = nc.natural_gradient(
        model, p32, x32, y.astype(jnp.float32), fam, solver="gram", damping=1e-3
    )
    assert int(sol.stats["structured_params"]) == sum(
        a.size for a in jax.tree_util.tree_leaves(p32)
    )
    assert rel_err(sol.value, ref.value) <= 1e-4
