"""Convolutional models: the conv pattern, the conv rule's iterative path, and whole CNNs.

- The conv pattern's Gram block equals ``J Jᵀ`` restricted to its kernel and bias (the
  site is the model's output, so the factor ``M`` is the identity), and its layer rule
  equals the generic pseudo-inverse of the site's local Jacobian, for NHWC and NCHW
  spellings, strides, padding, dilation and feature groups; configurations it cannot
  handle are declined with a reason.
- The primitive rule's conjugate-gradient path (above ``DENSE_LIMIT``) agrees with the
  generic pseudo-inverse; its size guards raise errors naming the map and the sizes.
- A conv + pool + dense CNN (plain JAX NHWC and NCHW, Flax linen, Equinox) is fully
  structured on the Gram route (``structured_params == P``), exact against the dense
  pseudo-inverse and runs at both granularities of the modular rule.

All float64. Tolerances: 1e-10 relative for closed forms and dense solves (a few hundred
flops per entry at eps = 2e-16, conditions below 1e3); 1e-8 for the CG path (its stopping
rule is a relative residual of 1e3·eps, amplified by the condition of ``J Jᵀ``); 1e-9
for whole-model natural gradients (two different exact routes, each through a solve of
condition up to ~1e4).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import natchain as nc
from natchain._jaxpr import bind_eqn
from natchain._modular import LocalMap, generic_rule
from natchain._modular._rules import conv as conv_rules
from natchain._structure import PATTERNS, GramData
from natchain._structure._walk import find_structure

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")


def _r(seed, *shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape))


# ---- the pattern, one site as the whole model ----------------------------------------------

# (case id, dimension numbers, input shape, kernel shape, conv keywords, bias, x differentiated)
SITE_CASES = [
    ("nhwc_bias_data", NHWC, (3, 4, 4, 2), (2, 2, 2, 3), {}, True, False),
    (
        "nchw_bias_data",
        NCHW,
        (2, 2, 5, 5),
        (3, 2, 3, 3),
        dict(window_strides=(2, 2), padding=((1, 1), (1, 1))),
        True,
        False,
    ),  # fmt: skip
    ("nhwc_same_joint", NHWC, (2, 3, 3, 2), (2, 2, 2, 2), dict(padding="SAME"), True, True),
    (
        "nchw_dilated_nobias",
        NCHW,
        (2, 2, 4, 4),
        (2, 2, 2, 2),
        dict(rhs_dilation=(2, 1), lhs_dilation=(1, 2), padding=((0, 1), (1, 0))),
        False,
        False,
    ),  # fmt: skip
    (
        "groups_bias_joint",
        NHWC,
        (2, 3, 3, 4),
        (2, 2, 2, 4),
        dict(feature_group_count=2),
        True,
        True,
    ),  # fmt: skip
]


def _site_model(dn, kw, bias):
    kw = {"window_strides": (1,) * (len(dn[0]) - 2), "padding": "VALID", **kw}
    feature = dn[2].index("C")

    def model(params, x):
        y = lax.conv_general_dilated(x, params["w"], dimension_numbers=dn, **kw)
        if bias:
            shape = [1] * y.ndim
            shape[feature] = -1
            y = y + params["b"].reshape(shape)
        return y

    return model


def _site(model, params, x):
    leaves = jax.tree_util.tree_leaves(params)
    closed = jax.make_jaxpr(lambda *a: model(jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params), a[:-1]), a[-1]))(*leaves, x)  # fmt: skip
    structure = find_structure(closed.jaxpr, len(leaves))
    return structure, leaves


def _case_params(dn, x_shape, w_shape, bias, seed):
    params = {"w": _r(seed, *w_shape, scale=0.5)}
    if bias:
        params["b"] = _r(seed + 1, w_shape[dn[1].index("O")])
    return params, _r(seed + 2, *x_shape)


@pytest.mark.parametrize("dn, x_shape, w_shape, kw, bias, x_diff", [c[1:] for c in SITE_CASES],
                         ids=[c[0] for c in SITE_CASES])  # fmt: skip
def test_conv_pattern_gram_block_and_layer_rule(dn, x_shape, w_shape, kw, bias, x_diff):
    model = _site_model(dn, kw, bias)
    params, x = _case_params(dn, x_shape, w_shape, bias, 3)
    structure, leaves = _site(model, params, x)
    (site,) = structure.sites.values()
    assert site.pattern is PATTERNS["conv"]
    assert (site.shift is not None) == bias and len(site.leaves) == len(leaves)
    y = model(params, x)
    n = y.shape[0]
    m = y.size // n  # factor M = identity: one column per output entry of an example
    cot = jnp.broadcast_to(jnp.eye(m).reshape(m, 1, *y.shape[1:]), (m, *y.shape))
    c = site.pattern.gram(site, GramData((x,), (0,), cot, 0))
    jac = jax.jacrev(lambda p: model(p, x).reshape(n * m))(params)
    jmat = jnp.concatenate([jac[k].reshape(n * m, -1) for k in sorted(params)], axis=1)
    ref = jmat @ jmat.T
    # 1e-10 relative: entries are sums of a few dozen products of O(1) numbers
    np.testing.assert_allclose(c, ref, atol=1e-10 * float(jnp.max(jnp.abs(ref))), rtol=0)

    inputs = [x]
    primals = (x, *[leaves[i] for i in site.leaves])  # the site's map: input, then its leaves
    diff = (x_diff, *[True] * len(leaves))

    def fn(*d):
        it = iter(d)
        vals = [next(it) if di else v for v, di in zip(primals, diff, strict=True)]
        return (site.evaluate(vals[: len(inputs)], vals[len(inputs) :]),)

    local = LocalMap("conv", primals, diff, (y,), dict(site.eqn.params), fn, None)
    n_out = (_r(9, *y.shape),)
    rule = site.pattern.layer_rule(site)
    (got, st), (ref_n, st_ref) = jax.jit(lambda: (rule(local, n_out), generic_rule(local, n_out)))()
    for g_, r_ in zip(got, ref_n, strict=True):
        scale = float(jnp.max(jnp.abs(r_)))
        assert g_.shape == r_.shape
        assert float(jnp.max(jnp.abs(g_ - r_))) <= 1e-10 * scale  # closed form vs SVD
    assert int(st.rank) == int(st_ref.rank) and int(st.num_cut) == int(st_ref.num_cut)


def _decline_reason(model, params, x):
    structure, leaves = _site(model, params, x)
    assert not structure.sites
    return structure.reason(0)


def test_conv_pattern_declines_what_it_cannot_handle():
    x, w = _r(0, 2, 3, 3, 2), _r(1, 2, 2, 1, 2)

    def batch_groups(p, x):
        return lax.conv_general_dilated(
            x, p["w"], (1, 1), "VALID", dimension_numbers=NHWC, batch_group_count=2
        )

    assert "batch_group_count" in _decline_reason(batch_groups, {"w": w}, x[..., :1])

    def broadcast_kernel(p, x):
        k = jnp.broadcast_to(p["w"], (2, 2, 2, 2))
        return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC)

    assert "broadcast" in _decline_reason(broadcast_kernel, {"w": _r(2, 2, 2, 1, 2)}, x)

    def param_input(p, x):
        return lax.conv_general_dilated(p["w"], x, (1, 1), "VALID", dimension_numbers=NHWC)

    kernel = _r(4, 2, 2, 2, 2)
    assert "input is a parameter" in _decline_reason(param_input, {"w": _r(3, 2, 3, 3, 2)}, kernel)


# ---- the primitive rule's iterative path and its guards ------------------------------------


def _conv_local(x, w, diff, **kw):
    def f(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC, **kw)

    (eqn,) = [e for e in jax.make_jaxpr(f)(x, w).jaxpr.eqns if e.primitive.name.startswith("conv")]
    vals = (x, w)

    def fn(*d):
        it = iter(d)
        return (bind_eqn(eqn, [next(it) if m else v for v, m in zip(vals, diff, strict=True)]),)

    out = bind_eqn(eqn, list(vals))
    return LocalMap("conv_general_dilated", vals, diff, (out,), dict(eqn.params), fn, None)


def test_conv_rule_iterative_path_matches_generic(monkeypatch):
    monkeypatch.setattr(conv_rules, "DENSE_LIMIT", 0)
    for kw in ({}, {"feature_group_count": 2}):
        local = _conv_local(
            _r(0, 2, 4, 4, 4), _r(1, 2, 2, 4 // (1 + len(kw)), 2), (True, True), **kw
        )
        n_out = (_r(2, *local.outputs[0].shape),)
        (got, st), (ref, _) = jax.jit(
            lambda local=local, n_out=n_out: (
                conv_rules.conv_rule(local, n_out),
                generic_rule(local, n_out),
            )  # fmt: skip
        )()
        for g_, r_ in zip(got, ref, strict=True):
            assert float(jnp.max(jnp.abs(g_ - r_))) <= 1e-8 * float(jnp.max(jnp.abs(r_)))
        assert int(st.rank) == local.out_size and np.isnan(float(st.condition))


def test_conv_rule_size_guards_name_the_map_and_sizes(monkeypatch):
    local = _conv_local(_r(0, 2, 4, 4, 2), _r(1, 2, 2, 2, 2), (True, True))
    n_out = (jnp.ones(local.outputs[0].shape),)
    monkeypatch.setattr(conv_rules, "BLOCK_LIMIT", 4)
    with pytest.raises(ValueError, match=r"conv_general_dilated.*N·P = 2·9 = 18"):
        conv_rules.conv_rule(local, n_out)
    monkeypatch.setattr(conv_rules, "GENERIC_LIMIT", 10)
    bg = _conv_local(_r(0, 2, 3, 3, 1), _r(1, 2, 2, 1, 2), (True, True), batch_group_count=2)
    with pytest.raises(ValueError, match=r"conv_general_dilated.*batch_group_count.*entries"):
        conv_rules.conv_rule(bg, (jnp.ones(bg.outputs[0].shape),))
    wide = _conv_local(_r(0, 1, 2, 2, 1), _r(1, 1, 1, 1, 8), (True, True))  # 32 out, 12 in
    monkeypatch.setattr(conv_rules, "BLOCK_LIMIT", 4096)
    monkeypatch.setattr(conv_rules, "DENSE_LIMIT", 0)
    with pytest.raises(ValueError, match=r"conv_general_dilated.*full row rank.*32 outputs"):
        conv_rules.conv_rule(wide, (jnp.ones(wide.outputs[0].shape),))


# ---- whole CNNs ----------------------------------------------------------------------------

N, CLASSES = 3, 4
FAM = nc.Categorical()


def _cnn(layout):
    """conv 3×3 (2 → 3, SAME) + bias, relu, avg pool, conv 2×2 (3 → 2) + bias, tanh, max
    pool, dense (8 → 4): ``P = 119`` on ``(3, 6, 6, 2)`` images."""
    dn = NHWC if layout == "NHWC" else NCHW
    feature = dn[2].index("C")
    spatial = tuple(i for i, c in enumerate(dn[2]) if c in "HW")

    def bias(y, b):
        shape = [1] * y.ndim
        shape[feature] = -1
        return y + b.reshape(shape)

    def pool(y, op, init, stride):
        dims = tuple(2 if i in spatial else 1 for i in range(y.ndim))
        strides = tuple(stride if i in spatial else 1 for i in range(y.ndim))
        return lax.reduce_window(y, init, op, dims, strides, "VALID")

    def model(params, x):
        h = lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
        h = jax.nn.relu(bias(h, params["b1"]))
        h = pool(h, lax.add, 0.0, 2) / 4.0  # average pool 2×2
        h = lax.conv_general_dilated(h, params["c2"], (1, 1), "SAME", dimension_numbers=dn)
        h = jnp.tanh(bias(h, params["b2"]))
        h = pool(h, lax.max, -jnp.inf, 1)  # max pool 2×2, overlapping (stride 1)
        h = h.reshape(h.shape[0], -1)
        return h @ params["w"] + params["b"]

    k1 = (3, 3, 2, 3) if layout == "NHWC" else (3, 2, 3, 3)
    k2 = (2, 2, 3, 2) if layout == "NHWC" else (2, 3, 2, 2)
    params = {
        "c1": _r(10, *k1, scale=0.4), "b1": _r(11, 3, scale=0.1),
        "c2": _r(12, *k2, scale=0.4), "b2": _r(13, 2, scale=0.1),
        "w": _r(14, 8, CLASSES, scale=0.5),
        "b": _r(15, CLASSES, scale=0.1),
    }  # fmt: skip
    x = _r(16, N, 6, 6, 2) if layout == "NHWC" else _r(16, N, 2, 6, 6)
    return model, params, x


class _LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (3, 3))(x))
        h = nn.avg_pool(h, (2, 2), (2, 2))
        h = jnp.tanh(nn.Conv(2, (2, 2))(h))
        h = nn.max_pool(h, (2, 2), (1, 1))
        return nn.Dense(CLASSES)(h.reshape(h.shape[0], -1))


class _EqxCNN(eqx.Module):
    c1: eqx.nn.Conv2d
    c2: eqx.nn.Conv2d
    avg: eqx.nn.AvgPool2d
    mx: eqx.nn.MaxPool2d
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.c1 = eqx.nn.Conv2d(2, 3, 3, padding=1, key=k1)
        self.c2 = eqx.nn.Conv2d(3, 2, 2, padding="SAME", key=k2)
        self.avg = eqx.nn.AvgPool2d(2, 2)
        self.mx = eqx.nn.MaxPool2d(2, 1)
        self.out = eqx.nn.Linear(8, CLASSES, key=k3)

    def __call__(self, x):  # one example, (C, H, W)
        h = self.avg(jax.nn.relu(self.c1(x)))
        h = self.mx(jnp.tanh(self.c2(h)))
        return self.out(h.reshape(-1))


def _linen():
    module = _LinenCNN()
    x = _r(16, N, 6, 6, 2)
    params = module.init(jax.random.PRNGKey(0), x)  # float32 by default: cast to float64
    return module.apply, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params), x


def _equinox():
    net = _EqxCNN(jax.random.PRNGKey(1))
    params, static = eqx.partition(net, eqx.is_array)

    def model(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    return model, params, _r(16, N, 2, 6, 6)


MODELS = {
    "jax_nhwc": lambda: _cnn("NHWC"),
    "jax_nchw": lambda: _cnn("NCHW"),
    "flax_linen": _linen,
    "equinox": _equinox,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def cnn(request):
    model, params, x = MODELS[request.param]()
    y = jnp.asarray(np.random.default_rng(17).integers(0, CLASSES, size=N))
    return request.param, model, params, x, y


def _flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def test_cnn_gram_route_fully_structured_and_exact(cnn):
    name, model, params, x, y = cnn
    gram = nc.natural_gradient(model, params, x, y, FAM, solver="gram")
    assert int(gram.stats["structured_params"]) == _flat(params).size, name
    ref = nc.natural_gradient(model, params, x, y, FAM, solver="pinv")
    e, g = _flat(ref.value), _flat(gram.value)
    # 1e-9: two exact routes (Gram solve vs P×P eigendecomposition), conditions below 1e4
    assert float(jnp.linalg.norm(g - e)) <= 1e-9 * float(jnp.linalg.norm(e)), name


@pytest.mark.parametrize("granularity", ["layer", "primitive"])
def test_cnn_modular_runs_at_both_granularities(cnn, granularity):
    name, model, params, x, y = cnn
    fn = nc.grad(model, FAM, method="modular", granularity=granularity)
    step = _flat(fn(params, x, y))
    assert step.shape == _flat(params).shape and bool(jnp.all(jnp.isfinite(step))), name
    if granularity == "primitive":
        names = {r.name for r in nc.modular_trace(model, params, x, granularity=granularity)}
        assert {"conv_general_dilated", "reduce_window_sum", "reduce_window_max"} <= names


def test_cnn_layer_granularity_uses_the_conv_pattern(cnn):
    name, model, params, x, _ = cnn
    names = [r.name for r in nc.modular_trace(model, params, x, granularity="layer")]
    assert names.count("conv") == 2 and "conv_general_dilated" not in names, (name, names)
