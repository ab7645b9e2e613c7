"""The Kronecker-preconditioned CG route (``solver="pcg"``) against the dense reference.

Exactness is the residual test: PCG stops when its recursive residual is below ``tol/2``
and reports success only when the recomputed residual ``‖(F + λI) n − g‖ / ‖g‖`` is at
most ``tol``. The error of any such answer is bounded by the condition number:
``‖n − n*‖ / ‖n*‖ ≤ κ(F + λI) · residual``. The tests compare with the dense pseudo-inverse
(float64) through that bound, with ``κ`` the dense reference's own condition number, so
a tolerance is never a hand-picked number: it is what the residual test guarantees.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import (
    CASES,
    check_residual_bound,
    flat,
    kappa_of,
    make_case,
    small_conv,
    small_equinox,
    small_flax,
    to32,
)

import natchain as nc
from natchain._problem import build_problem

DAMPING = 1e-2
#: float64 tolerance of the residual test: tight enough that κ · tol stays far below the
#: float64 comparisons' own round-off (κ ≤ ~1e4 on these cases).
TOL64 = 1e-12


def _args(case):
    return (case["model"], case["params"], case["x"], case["y"], case["family"])


#: Shared cases run here: categorical tanh, Bernoulli ReLU (3 layers), Gaussian ReLU (the
#: others add compile time, not coverage of this route).
PCG_CASES = [CASES[0], CASES[2], CASES[3]]


@pytest.mark.parametrize("case", PCG_CASES, ids=[c["id"] for c in PCG_CASES])
def test_pcg_matches_dense_pinv_float64(case):
    """Shared MLP cases, damped: PCG's answer is pinv's, float64."""
    args = _args(case)
    ref = nc.natural_gradient(*args, solver="pinv", damping=DAMPING)
    sol = nc.natural_gradient(*args, solver="pcg", damping=DAMPING, tol=TOL64)
    kappa = kappa_of(ref)
    check_residual_bound(sol, ref, kappa)
    assert int(sol.stats["kronecker_params"]) == case["num_params"]  # every leaf dense


@pytest.mark.parametrize(
    "opts",
    [{"damping_split": "eigen"}, {"samples": None}, {"samples": 3}, {"preconditioner": "diagonal"}],
    ids=["eigen", "every-column", "three-samples", "diagonal"],
)
def test_pcg_options_give_the_same_answer(opts):
    """The preconditioner's variants change the step count only, never the answer."""
    case = CASES[0]
    args = _args(case)
    ref = nc.natural_gradient(*args, solver="pinv", damping=DAMPING)
    sol = nc.natural_gradient(*args, solver="pcg", damping=DAMPING, tol=TOL64, **opts)
    check_residual_bound(sol, ref, kappa_of(ref))
    expected = 0 if opts.get("preconditioner") == "diagonal" else case["num_params"]
    assert int(sol.stats["kronecker_params"]) == expected


@pytest.mark.parametrize("kind", ["true", "mc", "empirical"])
def test_pcg_fisher_kinds(kind):
    """True, Monte-Carlo and empirical Fisher (Gaussian outputs), float64."""
    case = CASES[3]  # gaussian, relu, 3-6-2
    args = _args(case)
    key = jax.random.PRNGKey(3)
    opts = dict(kind=kind, damping=DAMPING, key=key, num_samples=2)
    ref = nc.natural_gradient(*args, solver="pinv", **opts)
    sol = nc.natural_gradient(*args, solver="pcg", tol=TOL64, **opts)
    kap = kappa_of(ref)
    check_residual_bound(sol, ref, kap)


#: Builders and the parameters the Kronecker preconditioner covers (the conv kernel: its
#: diagonal only).
MODELS = {"flax": (small_flax, 38), "equinox": (small_equinox, 38), "conv": (small_conv, 39)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pcg_frameworks_and_conv_float64_and_float32(name):
    """Flax, Equinox and a conv model; float64, then float32 against the float64 reference.

    In float32 the residual test runs at float32's default tol (5e-4) and, independently,
    in float64 (``check_float64``); the error against the float64 reference is then
    bounded by ``κ ·`` that float64 residual.
    """
    build, n_kron = MODELS[name]
    model, params, x = build()
    fam = nc.Categorical()
    y = jnp.asarray(np.random.default_rng(5).integers(0, 3, size=x.shape[0]))
    ref = nc.natural_gradient(model, params, x, y, fam, solver="pinv", damping=DAMPING)
    kappa = kappa_of(ref)
    sol = nc.natural_gradient(model, params, x, y, fam, solver="pcg", damping=DAMPING, tol=TOL64)
    check_residual_bound(sol, ref, kappa)
    assert int(sol.stats["kronecker_params"]) == n_kron  # dense layers; the conv is diagonal
    p32, x32 = to32(params), to32(x)
    sol32 = nc.natural_gradient(
        model, p32, x32, y, fam, solver="pcg", damping=DAMPING, check_float64=True
    )
    assert flat(sol32.value).dtype == jnp.float32
    assert float(sol32.stats["tol"]) == pytest.approx(nc.default_tol(jnp.float32))
    check_residual_bound(sol32, ref, kappa)


def _solve_jit(solver, model, family, damping):
    @jax.jit
    def solve(params, x, y, stale_params, stale_x, stale_y):
        prob = build_problem(model, params, x, family, y=y)
        prob = dataclasses.replace(prob, damped=True)
        stale = build_problem(model, stale_params, stale_x, family, y=stale_y)
        prepared = solver.prepare(stale, damping)
        fresh_n, fresh = solver.solve(prob, damping)
        n, st = solver.solve(prob, damping, prepared=prepared)
        return n, st, fresh_n, fresh, prepared

    return solve


def test_stale_prepared_gives_the_exact_answer():
    """A preconditioner from another batch (of another size) at earlier parameters."""
    case = make_case("categorical", (3, 5, 3), "tanh", batch=5, seed=7)
    old = make_case("categorical", (3, 5, 3), "tanh", batch=3, seed=8)  # other θ, x, N
    model, fam = case["model"], case["family"]
    solver = nc.PCG(tol=TOL64)
    n, st, fresh_n, fresh, prepared = _solve_jit(solver, model, fam, DAMPING)(
        case["params"], case["x"], case["y"], old["params"], old["x"], old["y"]
    )
    ref = nc.natural_gradient(*_args(case), solver="pinv", damping=DAMPING)
    kappa = kappa_of(ref)
    for value, stats in ((n, st), (fresh_n, fresh)):
        check_residual_bound(nc.Solution(value, None, stats), ref, kappa)
    # the stale factors are the old batch's: a thin input factor of rank ≤ 3 (+ bias)
    assert prepared["kronecker"][0]["qa"].shape == (4, 3)
    assert len(jax.tree_util.tree_leaves(prepared)) == 8


def _ill_conditioned():
    """A linear softmax model on inputs whose features span four orders of magnitude."""

    def model(p, x):
        return x @ p["W"] + p["b"]

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(9), 3)
    scales = jnp.logspace(0, 2, 6)
    x = jax.random.normal(k1, (64, 6)) * scales
    params = {"W": 0.01 * jax.random.normal(k2, (6, 4)), "b": jnp.zeros(4)}
    y = jax.random.randint(k3, (64,), 0, 4)
    return model, params, x, y


def test_fewer_steps_than_cg_when_ill_conditioned():
    """Badly scaled inputs (κ of the input covariance ~1e4): the Kronecker input factor
    absorbs the scaling, plain CG does not; both reach the same answer."""
    model, params, x, y = _ill_conditioned()
    fam = nc.Categorical()
    damping = 1e-3
    args = (model, params, x, y, fam)
    ref = nc.natural_gradient(*args, solver="pinv", damping=damping)
    kappa = kappa_of(ref)
    assert kappa > 1e5  # the case is ill-conditioned
    cg = nc.natural_gradient(*args, solver="cg", damping=damping, tol=TOL64)
    pcg = nc.natural_gradient(*args, solver="pcg", damping=damping, tol=TOL64)
    check_residual_bound(pcg, ref, kappa)
    assert int(pcg.stats["num_steps"]) * 2 <= int(cg.stats["num_steps"])


def test_bad_options_and_inputs_raise_naming_the_argument():
    for kwargs, name in [
        ({"preconditioner": "kfac"}, "preconditioner"),
        ({"damping_split": "half"}, "damping_split"),
        ({"samples": 0}, "samples"),
        ({"samples": True}, "samples"),
        ({"maxiter": 0}, "maxiter"),
        ({"seed": 1.5}, "seed"),
        ({"tol": -1.0}, "tol"),
    ]:
        with pytest.raises(ValueError, match=name):
            nc.PCG(**kwargs)
    case = CASES[0]
    with pytest.raises(ValueError, match="damping > 0"):
        nc.natural_gradient(*_args(case), solver="pcg", damping=0.0)
    prob = build_problem(*_args(case)[:3], case["family"], y=case["y"])
    with pytest.raises(ValueError, match="prepared"):
        nc.CG().solve(prob, DAMPING, prepared={"kronecker": (), "diagonal": ()})
    other = make_case("categorical", (3, 4, 3), "tanh", batch=2, seed=1)
    stale = nc.PCG().prepare(build_problem(*_args(other)[:3], other["family"], y=other["y"]))
    with pytest.raises(ValueError, match="prepared"):
        nc.PCG().solve(prob, DAMPING, prepared=stale)
    with pytest.raises(ValueError, match="prepared"):
        nc.PCG().solve(prob, DAMPING, prepared=[1, 2])
    assert nc.SOLVERS["pcg"] is nc.PCG
    assert nc.CG().prepare(prob, DAMPING) is None
