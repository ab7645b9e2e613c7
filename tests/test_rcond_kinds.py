"""The modular rule's cut-off per map kind: ``rcond`` as a mapping from ``MapRecord.kind``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natchain as nc
from natchain._modular._interpreter import rcond_kinds


def _mlp(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _problem(dtype):
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    sizes = (5, 7, 6, 3)
    params = [
        # A large first-layer scale saturates some tanh units, so a cut-off of 0.3 on the
        # activation maps cuts some of their diagonal entries and not others.
        {"w": 2.5 * jax.random.normal(kk, (a, b), dtype), "b": jnp.zeros((b,), dtype)}
        for kk, a, b in zip(k[:3], sizes[:-1], sizes[1:], strict=True)
    ]
    x = jax.random.normal(k[3], (12, 5), dtype)
    y = jnp.arange(12) % 3
    return params, x, y


def _stats_np(stats):
    return {
        key: {name: np.asarray(v) for name, v in entry.items()}
        for key, entry in stats["maps"].items()
    }


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("granularity", ["layer", "primitive"])
def test_mapping_of_equal_values_is_the_scalar(dtype, granularity):
    params, x, y = _problem(dtype)
    fam = nc.Categorical()
    for value in (0.05,):
        mapping = {kind: value for kind in rcond_kinds() if kind != "default"}
        scalar = nc.grad(_mlp, fam, granularity=granularity, rcond=value, return_stats=True)
        per_kind = nc.grad(_mlp, fam, granularity=granularity, rcond=mapping, return_stats=True)
        default_only = nc.grad(
            _mlp, fam, granularity=granularity, rcond={"default": value}, return_stats=True
        )
        g0, s0 = scalar(params, x, y)
        for g1, s1 in (per_kind(params, x, y), default_only(params, x, y)):
            # The same cut-off reaches every local rule: the same program, bit for bit.
            for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            m0, m1 = _stats_np(s0), _stats_np(s1)
            assert m0.keys() == m1.keys()
            for k in m0:
                for name in ("rank", "num_cut", "condition"):
                    np.testing.assert_array_equal(m0[k][name], m1[k][name])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_activation_only_cutoff_changes_only_activation_maps(dtype):
    params, x, y = _problem(dtype)
    fam = nc.Categorical()
    cut = 0.3
    base = nc.grad(_mlp, fam, return_stats=True)
    act = nc.grad(_mlp, fam, rcond={"activation": cut}, return_stats=True)
    (_, s0), (_, s1) = base(params, x, y), act(params, x, y)
    m0, m1 = _stats_np(s0), _stats_np(s1)
    assert m0.keys() == m1.keys()
    kinds = {k.split("_")[1] for k in m0}
    assert {"activation", "dense"} <= kinds
    # Dense reference for the activation maps: tanh' = 1 - tanh(z)² at the pre-activations,
    # entries with tanh'² <= cut² · max tanh'² are cut (the same comparison as the rule's;
    # both sides evaluate tanh in `dtype`, so the counts agree exactly away from ties, and
    # the scale 2.5 leaves no entry within float32 rounding of the threshold here).
    h, expected = x, []
    for layer in params[:-1]:
        z = h @ layer["w"] + layer["b"]
        d2 = np.asarray((1 - jnp.tanh(z) ** 2) ** 2, np.float64)
        expected.append(int(np.sum(d2 <= cut * cut * d2.max())))
        h = jnp.tanh(z)
    got = [int(m1[k]["num_cut"]) for k in sorted(m1) if "_activation_" in k]
    assert sorted(got) == sorted(expected)
    assert any(e > 0 for e in expected) and any(
        int(m1[k]["num_cut"]) > int(m0[k]["num_cut"]) for k in m0 if "_activation_" in k
    )
    for k in m0:
        if "_activation_" in k:
            continue
        # Dense maps' Jacobians depend on the forward values only, not on the cotangents
        # the activation cut changes: their statistics are identical.
        for name in ("rank", "num_cut"):
            assert int(m0[k][name]) == int(m1[k][name]), (k, name)
        np.testing.assert_array_equal(m0[k]["condition"], m1[k]["condition"])


def test_mapping_reaches_the_optimiser():
    params, x, y = _problem(jnp.float64)
    fam = nc.Categorical()
    opt = nc.scale_by_natural_gradient(_mlp, fam, method="modular", rcond={"activation": 0.3})
    state = opt.init(params)
    g = jax.grad(lambda p: jnp.mean(jax.vmap(fam.nll)(_mlp(p, x), y)))(params)
    _, state = opt.update(g, state, params, x=x, y=y)
    ref = nc.grad(_mlp, fam, rcond={"activation": 0.3}, return_stats=True)(params, x, y)[1]
    assert int(state.info["num_cut"]) == int(ref["num_cut"]) > 0


@pytest.mark.parametrize(
    "rcond, match",
    [
        ({"activaton": 0.1}, r"rcond has unknown map kinds \['activaton'\].*'activation'"),
        ({"dense": 1.5}, r"rcond values must be None or numbers in \[0, 1\).*'dense'"),
        ({"dense": True}, r"rcond values"),
        ("0.1", r"rcond must be None, a number in \[0, 1\), or a mapping"),
        (-0.1, r"rcond must be None"),
    ],
)
def test_bad_rcond_names_the_argument(rcond, match):
    params, x, y = _problem(jnp.float64)
    with pytest.raises(ValueError, match=match):
        nc.grad(_mlp, nc.Categorical(), rcond=rcond)
    with pytest.raises(ValueError, match=match):
        nc.modular_trace(_mlp, params, x, rcond=rcond)
    with pytest.raises(ValueError, match=match):
        nc.natural_vjp(lambda p: _mlp(p, x), params, rcond=rcond)
