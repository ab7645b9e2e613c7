"""The exact reference: every solver against the dense pseudo-inverse, on every shared case.

Tolerances (float64): solvers agree with dense pinv to ≤ 1e-9 relative; the undamped
answer solves ``F n = g`` to ≤ 1e-9 relative residual and has ≤ 1e-9 of its norm in the
null space of ``F_theta`` (minimum norm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CASES, flat, make_case, rel_err

import natchain as nc

TOL = 1e-9
# (solver, options, dampings it runs at): every route at every case; the variants that only
# change how the Gram route gets its answer run where they differ from the default.
SOLVER_ROWS = [
    ("gram", {}, (0.0, 1e-2)),
    ("gram", {"structured": False}, (0.0,)),
    ("gram", {"factorization": "eigh"}, (1e-2,)),
    ("cg", {"tol": 1e-14, "maxiter": 2000}, (0.0, 1e-2)),
    ("cholesky", {}, (1e-2,)),
]
DAMPINGS = [0.0, 1e-2]


def _null_space(fisher, rcond=1e-10):
    w, v = np.linalg.eigh(np.asarray(fisher))
    return v[:, w <= rcond * w.max()]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
@pytest.mark.parametrize("damping", DAMPINGS)
def test_solvers_agree_with_dense_pinv(case, damping):
    """Every solver row agrees with dense pinv to ≤ 1e-9 relative (float64)."""
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    ref = nc.natural_gradient(*args, solver="pinv", damping=damping)
    for solver, opts, dampings in SOLVER_ROWS:
        if damping not in dampings:
            continue
        sol = nc.natural_gradient(*args, solver=solver, damping=damping, **opts)
        assert rel_err(sol.value, ref.value) <= TOL, (solver, opts)
        assert jax.tree_util.tree_structure(sol.value) == jax.tree_util.tree_structure(
            case["params"]
        )


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_undamped_is_minimum_norm_solution(case):
    """Undamped: ``F n = g`` (g lies in the range for the true Fisher) and ``n ⊥ null(F)``."""
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    fisher = np.asarray(nc.fisher_matrix(*args[:3], case["family"]))
    null = _null_space(fisher)
    for solver in ("pinv", "gram", "cg"):
        opts = {"tol": 1e-14, "maxiter": 2000} if solver == "cg" else {}
        sol = nc.natural_gradient(*args, solver=solver, **opts)
        n, g = np.asarray(flat(sol.value)), np.asarray(flat(sol.grad))
        assert np.linalg.norm(fisher @ n - g) <= TOL * np.linalg.norm(g), solver
        assert np.linalg.norm(null.T @ n) <= TOL * np.linalg.norm(n), solver


def test_softmax_naive_gram_formula_is_not_minimum_norm():
    """Softmax makes ``F_blk`` singular: ``Jᵀ (F_blk K)⁺ b`` is wrong; the gram solver is not."""
    case = make_case("categorical", widths=(3, 5, 3), batch=2, seed=11)
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    ref = flat(nc.natural_gradient(*args, solver="pinv").value)
    prob = nc._problem.build_problem(*args[:3], case["family"], y=case["y"])
    jac = prob.jacobian().reshape(-1, prob.num_params)
    fblk = jax.scipy.linalg.block_diag(*[np.asarray(f) @ np.asarray(f).T for f in prob.factor])
    naive = jac.T @ jnp.linalg.pinv(fblk @ (jac @ jac.T)) @ prob.cotangent.reshape(-1)
    assert rel_err(naive, ref) > 0.05
    assert rel_err(nc.natural_gradient(*args, solver="gram").value, ref) <= TOL


@pytest.mark.parametrize("kind", ["empirical", "mc"])
@pytest.mark.parametrize("damping", DAMPINGS)
def test_other_fisher_kinds_gram_and_cg_match_pinv(kind, damping):
    """Empirical and Monte-Carlo Fishers: gram (and damped CG) equal dense pinv ≤ 1e-9."""
    case = CASES[0]
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    kw = dict(kind=kind, key=jax.random.PRNGKey(3), num_samples=2, damping=damping)
    ref = nc.natural_gradient(*args, solver="pinv", **kw).value
    assert rel_err(nc.natural_gradient(*args, solver="gram", **kw).value, ref) <= TOL
    if damping > 0:  # the MC gradient need not lie in the range: CG only converges damped
        cg = nc.natural_gradient(*args, solver="cg", tol=1e-14, maxiter=2000, **kw)
        assert rel_err(cg.value, ref) <= TOL


def test_gram_structure_covers_dense_layers():
    """The structured Gram recognises every weight and bias of a plain MLP (no Jacobian)."""
    case = CASES[2]
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    sol = nc.natural_gradient(*args, solver="gram")
    assert int(sol.stats["structured_params"]) == case["num_params"]


def _vmapped_model(p, x):  # per-example code under vmap: W on the left of dot_general
    layer = lambda xi: p["W2"] @ jnp.tanh(p["W1"] @ xi + p["b1"]) + p["b2"]
    return jax.vmap(layer)(x)


def _flax_style_model(p, x):  # kernel on the right, bias reshaped to a row
    h = jax.lax.dot_general(x, p["kernel"], (((1,), (0,)), ((), ())))
    return jnp.tanh(h + jnp.reshape(p["bias"], (1, -1))) @ p["out"]


@pytest.mark.parametrize("model", [_vmapped_model, _flax_style_model], ids=["vmap", "flax"])
def test_gram_structure_recognises_common_layer_styles(model):
    """Per-example code under ``vmap`` and Flax-style layers are fully structured, and exact."""
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    if model is _vmapped_model:
        params = {"W1": jax.random.normal(k[0], (4, 3)), "b1": jnp.zeros(4)}
        params |= {"W2": jax.random.normal(k[1], (3, 4)), "b2": jnp.ones(3)}
    else:
        params = {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jnp.ones(4)}
        params["out"] = jax.random.normal(k[1], (4, 3))
    x = jax.random.normal(k[2], (5, 3))
    y = jax.random.randint(k[3], (5,), 0, 3)
    fam = nc.Categorical()
    ref = nc.natural_gradient(model, params, x, y, fam, solver="pinv", damping=1e-3)
    sol = nc.natural_gradient(model, params, x, y, fam, solver="gram", damping=1e-3)
    assert rel_err(sol.value, ref.value) <= TOL
    num = sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert int(sol.stats["structured_params"]) == num


def test_gram_structure_falls_back_for_unrecognised_leaves():
    """A weight used twice (tied) falls back to its Jacobian; the bias and the scale do not."""

    def model(p, x):
        h = jnp.tanh(x @ p["W"] + p["b"])
        return (h * p["s"]) @ p["W"].T

    key = jax.random.PRNGKey(4)
    params = {
        "W": jax.random.normal(key, (3, 4)),
        "b": jnp.arange(4.0) / 4,
        "s": jnp.linspace(0.5, 1.5, 4),
    }
    x = jax.random.normal(key, (5, 3))
    y = jax.random.randint(key, (5,), 0, 3)
    fam = nc.Categorical()
    ref = nc.natural_gradient(model, params, x, y, fam, solver="pinv", damping=1e-3)
    sol = nc.natural_gradient(model, params, x, y, fam, solver="gram", damping=1e-3)
    assert rel_err(sol.value, ref.value) <= TOL
    assert int(sol.stats["structured_params"]) == 8  # the bias and the scale, not W


def test_single_full_row_rank_map_equals_pseudo_inverse_formula():
    """docs/theory.md §3, first fact.

    ``J`` full row rank, ``F_eta`` invertible ⇒ ``F⁺g = J⁺ F_blk⁻¹ b``.
    """
    key = jax.random.PRNGKey(5)
    x = jax.random.normal(key, (2, 4))
    params = {"W": jax.random.normal(jax.random.PRNGKey(6), (4, 3))}  # P = 12 ≥ N·m = 6
    model = lambda p, x: x @ p["W"]
    for fam in (nc.Gaussian(scale=0.5), nc.Bernoulli(), nc.Poisson()):
        eta = model(params, x)
        y = jax.vmap(fam.sample)(jax.random.split(key, 2), eta)
        sol = nc.natural_gradient(model, params, x, y, fam, solver="pinv")
        prob = nc._problem.build_problem(model, params, x, fam, y=y)
        jac = prob.jacobian().reshape(-1, prob.num_params)
        assert np.linalg.matrix_rank(np.asarray(jac)) == jac.shape[0]
        fblk = jax.scipy.linalg.block_diag(*[fam.fisher(e) / 2 for e in eta])
        formula = jnp.linalg.pinv(jac) @ jnp.linalg.solve(fblk, prob.cotangent.reshape(-1))
        assert rel_err(sol.value, prob.unravel(formula)) <= 1e-10


@pytest.mark.parametrize("solver", ["pinv", "cholesky", "gram", "cg"])
def test_solvers_jit_and_float32(solver):
    """Every solver is jit-able and runs in float32 (≤ 1e-3 relative to the float64 answer)."""
    case = CASES[3]
    model, fam = case["model"], case["family"]
    opts = {"tol": 1e-6, "maxiter": 500} if solver == "cg" else {}

    @jax.jit
    def step(params, x, y):
        sol = nc.natural_gradient(model, params, x, y, fam, solver=solver, damping=1e-2, **opts)
        return sol.value, sol.stats

    ref = nc.natural_gradient(model, case["params"], case["x"], case["y"], fam, damping=1e-2)
    val64, _ = step(case["params"], case["x"], case["y"])
    assert rel_err(val64, ref.value) <= 1e-6
    to32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
    val32, stats = step(to32(case["params"]), case["x"].astype(jnp.float32), case["y"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(val32))
    assert rel_err(val32, ref.value) <= 1e-3


def test_cg_reports_non_convergence():
    """CG stopped by its step cap says so: ``converged`` False and the residual it reached."""
    case = CASES[0]
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    sol = nc.natural_gradient(*args, solver="cg", tol=1e-14, maxiter=2)
    assert int(sol.stats["num_steps"]) == 2
    assert not bool(sol.stats["converged"])
    assert float(sol.stats["residual"]) > 1e-14


def test_pinv_reports_cut_off():
    """The dense pseudo-inverse reports its rank and how many eigenvalues it cut."""
    case = CASES[0]  # N·m = 6 < P = 38: rank ≤ N·(m−1) = 4 for softmax
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    stats = nc.natural_gradient(*args, solver="pinv").stats
    assert int(stats["rank"]) == 4
    assert int(stats["num_cut"]) == case["num_params"] - 4
    assert float(stats["cutoff"]) > 0
