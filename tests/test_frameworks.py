"""Models as researchers write them: batched, per-example under vmap, Flax linen, Flax NNX,
Equinox; a self-attention layer on token sequences; LayerNorm's affine parameters.

One recogniser serves both routes, so the spelling of a model changes neither its layers
(every parameter structured on the Gram route) nor its layer-granularity natural gradient.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as fnn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import natchain as nc
from tests.cases import rel_err

N, D, H, M = 4, 3, 5, 3


def _normal(seed, *shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


X = _normal(0, N, D)
Y = jax.random.randint(jax.random.PRNGKey(1), (N,), 0, M)
W1, B1 = _normal(2, D, H, scale=0.7), _normal(3, H, scale=0.1)
W2, B2 = _normal(4, H, M, scale=0.5), _normal(5, M, scale=0.1)
CANON = {"W1": W1, "b1": B1, "W2": W2, "b2": B2}  # x @ W layout


def batched():
    def model(p, x):
        return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    return model, dict(CANON), lambda g: g


def per_example_vmap():
    def model(p, x):
        return jax.vmap(lambda xi: p["W2"] @ jnp.tanh(p["W1"] @ xi + p["b1"]) + p["b2"])(x)

    params = {"W1": W1.T, "b1": B1, "W2": W2.T, "b2": B2}
    return model, params, lambda g: {"W1": g["W1"].T, "b1": g["b1"], "W2": g["W2"].T, "b2": g["b2"]}


def flax_linen():
    net = fnn.Sequential([fnn.Dense(H), jnp.tanh, fnn.Dense(M)])
    params = {"params": {"layers_0": {"kernel": W1, "bias": B1}}}
    params["params"]["layers_2"] = {"kernel": W2, "bias": B2}

    def canon(g):
        q = g["params"]
        return {
            "W1": q["layers_0"]["kernel"],
            "b1": q["layers_0"]["bias"],
            "W2": q["layers_2"]["kernel"],
            "b2": q["layers_2"]["bias"],
        }

    return net.apply, params, canon


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D, H, rngs=rngs)
        self.l2 = nnx.Linear(H, M, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _get(variable):  # Flax ≥ 0.12 deprecates ``.value``
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set(variable, value):
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


def flax_nnx():
    graphdef, state = nnx.split(_NNXMLP(nnx.Rngs(0)))
    for layer, (w, b) in (("l1", (W1, B1)), ("l2", (W2, B2))):
        _set(state[layer]["kernel"], w)
        _set(state[layer]["bias"], b)

    def model(p, x):
        return nnx.merge(graphdef, p)(x)

    def canon(g):
        return {
            "W1": _get(g["l1"]["kernel"]),
            "b1": _get(g["l1"]["bias"]),
            "W2": _get(g["l2"]["kernel"]),
            "b2": _get(g["l2"]["bias"]),
        }

    return model, state, canon


def equinox_mlp():
    mlp = eqx.nn.MLP(D, M, H, 1, activation=jnp.tanh, key=jax.random.PRNGKey(6))
    mlp = eqx.tree_at(
        lambda t: (t.layers[0].weight, t.layers[0].bias, t.layers[1].weight, t.layers[1].bias),
        mlp,
        (W1.T, B1, W2.T, B2),
    )
    params, static = eqx.partition(mlp, eqx.is_inexact_array)

    def model(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    def canon(g):
        a, b = g.layers
        return {"W1": a.weight.T, "b1": a.bias, "W2": b.weight.T, "b2": b.bias}

    return model, params, canon


SPELLINGS = {
    "batched": batched,
    "vmap": per_example_vmap,
    "flax-linen": flax_linen,
    "flax-nnx": flax_nnx,
    "equinox": equinox_mlp,
}


@pytest.fixture(scope="module")
def reference():
    model, params, _ = batched()
    return nc.grad(model, nc.Categorical())(params, X, Y)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_spelling_invariance(spelling, reference):
    """The same MLP, five spellings: one layer-granularity answer, every parameter structured."""
    model, params, canon = SPELLINGS[spelling]()
    fam = nc.Categorical()
    g = nc.grad(model, fam, strict=True)(params, X, Y)  # strict: no leaf falls back
    # The same maps with the same closed-form rules on permuted layouts: equal up to
    # rounding (float64, ~1e-16 measured); 1e-10 is the stated bound.
    assert rel_err(canon(g), reference) <= 1e-10
    sol = nc.natural_gradient(model, params, X, Y, fam, solver="gram")
    assert int(sol.stats["structured_params"]) == sum(
        a.size for a in jax.tree_util.tree_leaves(params)
    )
    recs = nc.modular_trace(model, params, X)
    assert [r.kind for r in recs] == ["dense", "activation", "dense"]


# ---- single-head self-attention on (N, T, d) tokens ---------------------------------------

T, E = 4, 4


def attention(p, x):
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    scores = jnp.einsum("ntd,nsd->nts", q, k) / jnp.sqrt(E)
    out = jnp.einsum("nts,nsd->ntd", jax.nn.softmax(scores, axis=-1), v) @ p["o"] + p["bo"]
    return jnp.mean(out, axis=1) @ p["head"]


def _attention_case():
    ks = jax.random.split(jax.random.PRNGKey(7), 7)
    p = {n: 0.6 * jax.random.normal(k, (E, E)) for n, k in zip("qkvo", ks[:4], strict=True)}
    p |= {"bo": 0.1 * jax.random.normal(ks[4], (E,)), "head": jax.random.normal(ks[5], (E, M))}
    x = jax.random.normal(ks[6], (N, T, E))
    return p, x


def test_attention_fully_structured_and_exact():
    p, x = _attention_case()
    fam = nc.Categorical()
    num = sum(a.size for a in jax.tree_util.tree_leaves(p))  # 4·16 + 4 + 12 = 80 ≥ N·(m−1)
    ref = nc.natural_gradient(attention, p, x, Y, fam, solver="pinv")
    sol = nc.natural_gradient(attention, p, x, Y, fam, solver="gram")
    assert int(sol.stats["structured_params"]) == num
    # float64, undamped: both are minimum-norm pseudo-inverse solutions of a system with
    # condition ≲ 1e4 here; 1e-9 relative is the stated bound.
    assert rel_err(sol.value, ref.value) <= 1e-9
    table = nc.inspect_structure(attention, p, x)
    assert all(r.gram and r.pattern.startswith("dense") for r in table.rows)
    for granularity in ("layer", "primitive"):
        g = nc.grad(attention, fam, granularity=granularity)(p, x, Y)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))


# ---- LayerNorm affine ---------------------------------------------------------------------


def layernorm_mlp(p, x):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    h = (x - mu) / jnp.sqrt(jnp.mean((x - mu) ** 2, axis=-1, keepdims=True) + 1e-5)
    return jnp.tanh(h * p["gamma"] + p["beta"]) @ p["W"] + p["b"]


def _flax_layernorm():
    net = fnn.Sequential([fnn.Dense(H), fnn.LayerNorm(), jnp.tanh, fnn.Dense(M)])
    params = net.init(jax.random.PRNGKey(8), X)
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) + _normal(9, *a.shape, scale=0.1), params
    )
    return net.apply, params


@pytest.mark.parametrize("which", ["plain", "flax"])
def test_layernorm_affine_fully_structured(which):
    if which == "plain":
        model = layernorm_mlp
        params = {"gamma": 1 + _normal(10, D, scale=0.2), "beta": _normal(11, D, scale=0.1)}
        params |= {"W": _normal(12, D, M), "b": _normal(13, M, scale=0.1)}
    else:
        model, params = _flax_layernorm()
    fam = nc.Categorical()
    ref = nc.natural_gradient(model, params, X, Y, fam, solver="pinv", damping=1e-3)
    sol = nc.natural_gradient(model, params, X, Y, fam, solver="gram", damping=1e-3)
    assert int(sol.stats["structured_params"]) == sum(
        a.size for a in jax.tree_util.tree_leaves(params)
    )
    # float64, damped (well-conditioned): the suite's exact tolerance
    assert rel_err(sol.value, ref.value) <= 1e-10
    nc.grad(model, fam, strict=True)(params, X, Y)  # every leaf in a layer map
