"""Bad input gets a clear error naming the argument; numerical trouble lands in the statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from cases import CASES

import natchain as nc

CASE = CASES[0]  # categorical, 3 classes
MODEL, PARAMS, X, Y, FAM = (CASE[k] for k in ("model", "params", "x", "y", "family"))


def ng(**overrides):
    args = dict(model=MODEL, params=PARAMS, x=X, y=Y, family=FAM)
    args.update(overrides)
    return nc.natural_gradient(**args)


def test_output_width_not_what_the_family_expects():
    with pytest.raises(ValueError, match=r"width m=3 .*expects 5"):
        ng(family=nc.Categorical(dim=5))
    with pytest.raises(ValueError, match="even"):
        ng(family=nc.GaussianHetero(), y=jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"shape \(N, m\)"):
        ng(model=lambda p, x: MODEL(p, x)[:, 0])


def test_labels_outside_support_and_wrong_target_shape():
    with pytest.raises(ValueError, match="outside the support"):
        ng(y=jnp.array([0, 3]))
    with pytest.raises(ValueError, match="integer class labels"):
        ng(y=jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="y must have shape"):
        ng(y=jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="0/1"):
        ng(family=nc.Bernoulli(), y=jnp.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="non-negative integer counts"):
        ng(family=nc.Poisson(), y=jnp.full((2, 3), -1.0))


def test_non_finite_params_inputs_outputs():
    bad = jax.tree_util.tree_map(lambda a: a, PARAMS)
    bad[0]["W"] = bad[0]["W"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"params\[0\]\['W'\] contains 1 non-finite"):
        ng(params=bad)
    with pytest.raises(ValueError, match="x contains"):
        ng(x=X.at[0, 0].set(jnp.inf))
    with pytest.raises(ValueError, match="model output contains non-finite"):
        ng(model=lambda p, x: MODEL(p, x) / 0.0)


def test_configuration_errors():
    with pytest.raises(ValueError, match="damping"):
        nc.natural_gradient(MODEL, PARAMS, X, Y, FAM, damping=-1.0)
    with pytest.raises(ValueError, match="solver='newton' is not one of"):
        nc.natural_gradient(MODEL, PARAMS, X, Y, FAM, solver="newton")
    with pytest.raises(ValueError, match="kind='exact' is not one of"):
        nc.natural_gradient(MODEL, PARAMS, X, Y, FAM, kind="exact")
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        nc.natural_gradient(MODEL, PARAMS, X, Y, FAM, kind="mc")
    with pytest.raises(ValueError, match="damping > 0"):
        nc.natural_gradient(MODEL, PARAMS, X, Y, FAM, solver="cholesky")
    with pytest.raises(TypeError, match="family must be a natchain family"):
        nc.natural_gradient(MODEL, PARAMS, X, Y, "categorical")
    with pytest.raises(ValueError, match="tol must be > 0"):
        nc.natural_gradient(MODEL, PARAMS, X, Y, FAM, solver="cg", tol=0.0)


def test_integer_parameters_are_not_differentiable():
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int"):
        nc.natural_gradient(lambda p, x: MODEL(p["w"], x), {"w": PARAMS, "n": 3}, X, Y, FAM)


def test_dense_solve_too_large_suggests_matrix_free_routes():
    params = {"W": jnp.zeros((100, 100))}
    model = lambda p, x: x @ p["W"]
    x, y = jnp.ones((2, 100)), jnp.zeros((2, 100))
    fam = nc.Gaussian()
    with pytest.raises(
        ValueError, match=r"P=10000 .*solver='gram' or solver='cg'.*max_params=None"
    ):
        nc.natural_gradient(model, params, x, y, fam, solver="pinv")
    with pytest.raises(ValueError, match="max_params"):
        nc.fisher_matrix(model, params, x, fam)
    sol = nc.natural_gradient(model, params, x, y, fam, solver="gram", damping=1e-3)
    assert bool(jnp.all(jnp.isfinite(sol.value["W"])))


def test_status_options_are_refused_at_construction():
    with pytest.raises(ValueError, match="tol must be > 0"):
        nc.Pinv(tol=-1.0)
    with pytest.raises(ValueError, match="check_float64 must be True or False"):
        nc.Gram(check_float64="yes")
    with pytest.raises(ValueError, match="refine must be 'auto' or a non-negative integer"):
        nc.Gram(refine=-1)
    with pytest.raises(ValueError, match="rcond must lie in"):
        nc.Gram(rcond=2.0)
    with pytest.raises(ValueError, match="pick_output needs at least one key"):
        nc.pick_output(MODEL)


def test_model_output_must_be_one_array():
    """A dict output names its leaves and the way to declare one (both routes: test_numerics)."""
    with pytest.raises(TypeError, match=r"returned a dict with 2 leaves \(\['a'\], \['b'\]\)"):
        ng(model=lambda p, x: {"a": MODEL(p, x), "b": MODEL(p, x)})
    picked = nc.pick_output(lambda p, x: {"a": MODEL(p, x), "b": 0.0}, "a")
    assert bool(ng(model=picked, damping=1e-3).stats["converged"])


def test_one_hot_labels_hint_at_class_indices():
    with pytest.raises(ValueError, match=r"one-hot .*class indices of shape \(2,\).*argmax"):
        ng(y=jax.nn.one_hot(Y, 3).astype(jnp.int32))
