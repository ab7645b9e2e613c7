"""Statuses you can trust: float32 as a first-class precision, and honest ``converged``.

The reference for every row is the float64 dense pseudo-inverse of the *same* problem
(the float32 parameters and inputs widened exactly), so differences are the solvers'
own round-off, never a different system.

Forward-error bound used throughout: for ``A = F + λI`` (on its kept spectrum, condition
``κ``) and any ``n``, ``‖n − n*‖ / ‖n*‖ ≤ κ · ‖A n − g‖ / ‖g‖``. A backward-stable solve
in precision ``eps`` has ``‖A n − g‖ ≲ c · eps · ‖A‖ ‖n‖``, hence a relative error
``≲ c · κ · eps``; the rows below state which of the two bounds they use.

Cases: One architecture (a 3 → 5 → 3 tanh MLP, softmax outputs, batch 4, ``P = 38``) so JAX
compiles few programs; the cases differ in their values only:

- ``well``: a generic point, damped (``λ = 1e-3``);
- ``near_duplicate``: two inputs ``1e-4`` apart (``F`` nearly loses rank), damped;
- ``confident``: the last layer scaled until the smallest probability of a target class
  is ``1e-12`` (float32) or ``1e-30`` (float64) — a confidently wrong prediction; damped;
- ``rank_deficient``: two identical examples (``rank F < N·(m − 1) < P``), undamped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CASES, flat, init_mlp, make_mlp, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import natchain as nc

# ---- the cases ------------------------------------------------------------------------------

WIDTHS = (3, 5, 3)
BATCH = 4
FAMILY = nc.Categorical()
MODEL = make_mlp("tanh")
CASE_NAMES = ("well", "near_duplicate", "confident", "rank_deficient")
DAMPING = {"well": 1e-3, "near_duplicate": 1e-3, "confident": 1e-3, "rank_deficient": 0.0}
MIN_P = {jnp.float32: 1e-12, jnp.float64: 1e-30}


def cast(tree, dtype):
    """Floating-point leaves cast to ``dtype``."""

    def one(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(one, tree)


def _scaled(params, s):
    return [params[0], {"W": params[1]["W"] * s, "b": params[1]["b"] * s}]


@functools.cache
def numerics_case(name: str, dtype=jnp.float32, seed: int = 0):
    """``(params, x, y, damping)`` of a named case in ``dtype`` (built in float64)."""
    key = jax.random.PRNGKey(seed)
    kp, kx, ky, kn = jax.random.split(key, 4)
    params = init_mlp(kp, WIDTHS)
    x = jax.random.normal(kx, (BATCH, WIDTHS[0]))
    if name == "near_duplicate":
        x = x.at[1].set(x[0] + 1e-4 * jax.random.normal(kn, (WIDTHS[0],)))
    if name == "rank_deficient":
        x = x.at[1].set(x[0])
    y = jax.random.randint(ky, (BATCH,), 0, WIDTHS[-1])
    if name == "rank_deficient":
        y = y.at[1].set(y[0])
    if name == "confident":
        target = np.log(MIN_P[dtype])
        lo, hi = 1.0, 1e4  # bisect the scale of the last layer on log min p
        for _ in range(60):
            mid = np.sqrt(lo * hi)
            lp = jax.nn.log_softmax(MODEL(_scaled(params, mid), x))
            lo, hi = (mid, hi) if float(jnp.min(lp)) > target else (lo, mid)
        params = _scaled(params, hi)
        y = jnp.argmin(MODEL(params, x), axis=1)  # the least likely class: confidently wrong
    return cast(params, dtype), cast(x, dtype), y, DAMPING[name]


def min_probability(params, x, y) -> float:
    """Smallest probability the model gives to an observed label."""
    lp = jax.nn.log_softmax(MODEL(cast(params, jnp.float64), cast(x, jnp.float64)))
    return float(jnp.exp(jnp.min(jnp.take_along_axis(lp, y[:, None], axis=1))))


EPS32 = float(jnp.finfo(jnp.float32).eps)
SOLVERS = ("pinv", "cholesky", "gram", "cg")
# Cholesky needs damping > 0: the undamped rank-deficient case is the other solvers' row.
TABLE = [
    (s, c) for s in SOLVERS for c in CASE_NAMES if not (s == "cholesky" and c == "rank_deficient")
]


@functools.cache
def _reference(name, dtype=jnp.float32):
    """The float64 dense pseudo-inverse of a case built in ``dtype``."""
    params, x, y, lam = numerics_case(name, dtype)
    ref = nc.natural_gradient(
        MODEL, cast(params, jnp.float64), cast(x, jnp.float64), y, FAMILY, damping=lam
    )
    return ref, float(ref.stats["condition"])


def test_numerics_cases_are_what_they_claim():
    """Confident: min p of a target 1e-12 (f32) / 1e-30 (f64), within a factor 2 (bisection)."""
    for dtype, want in ((jnp.float32, 1e-12), (jnp.float64, 1e-30)):
        p = min_probability(*numerics_case("confident", dtype)[:3])
        assert want / 2 <= p <= want * 2, (dtype, p)
    ref, _ = _reference("rank_deficient")
    assert int(ref.stats["rank"]) < 8  # < N·(m − 1) = 8: two examples coincide


@pytest.mark.parametrize("solver,name", TABLE, ids=[f"{s}-{c}" for s, c in TABLE])
def test_float32_table_against_float64_dense(solver, name):
    """Every solver × case in float32 against the float64 dense pseudo-inverse.

    Tolerances: the relative error is at most ``2 · κ · max(residual64, eps32)`` — the
    forward-error bound from the float64-recomputed residual, with ``κ`` the reference's
    condition number on its kept spectrum — and at most ``100 · κ · eps32`` for the
    direct solvers (backward-stable: ``c · κ · eps`` with ``c ≤ 100`` for ``P = 38``) or
    ``2 · κ · tol`` for CG (its stopping test bounds the residual by ``tol``). A reported
    success must hold in float64 up to float32's own rounding of the residual,
    ``100 · κ · eps32``. On the well-conditioned case every solver must succeed.
    """
    params, x, y, lam = numerics_case(name, jnp.float32)
    ref, kappa = _reference(name)
    sol = nc.natural_gradient(
        MODEL, params, x, y, FAMILY, solver=solver, damping=lam, check_float64=False
    )
    res64 = float(
        nc.natural_gradient(
            MODEL, params, x, y, FAMILY, solver=solver, damping=lam, check_float64=True
        ).stats["residual_float64"]
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(sol.value))
    err = rel_err(sol.value, ref.value)
    assert err <= 2 * kappa * max(res64, EPS32), (err, kappa, res64)
    tol = float(sol.stats["tol"])
    row = 2 * kappa * tol if solver == "cg" else 100 * kappa * EPS32
    assert err <= row, (err, row)
    if bool(sol.stats["converged"]):
        assert res64 <= tol + 100 * kappa * EPS32
    if name == "well":
        assert bool(sol.stats["converged"]), sol.stats


CONFIDENT_ROWS = [
    ("pinv", {}),
    ("gram", {}),
    ("gram", {"factorization": "eigh"}),
    ("gram", {"structured": False, "refine": 0}),
    ("cholesky", {}),
    ("cg", {}),
]


@pytest.mark.parametrize("solver,opts", CONFIDENT_ROWS, ids=[f"{s}-{o}" for s, o in CONFIDENT_ROWS])
def test_confident_softmax_float64_matches_dense(solver, opts):
    """Min p 1e-30 in float64, damped: every solver equals the dense answer to 10·κ·eps64.

    Before, the Gram route built its right-hand side through ``F_blk⁺`` (``1/p``): 2e4
    relative error marked converged. CG stops at its default tolerance 1e-10: ``2 κ tol``.
    Every Gram variant (factorisation, Jacobian-built ``C``, no refinement) is stable.
    """
    params, x, y, lam = numerics_case("confident", jnp.float64)
    ref, kappa = _reference("confident", jnp.float64)
    sol = nc.natural_gradient(MODEL, params, x, y, FAMILY, solver=solver, damping=lam, **opts)
    bound = 2 * kappa * 1e-10 if solver == "cg" else 10 * kappa * float(jnp.finfo(float).eps)
    assert rel_err(sol.value, ref.value) <= bound
    assert bool(sol.stats["converged"])


def test_gram_refines_only_where_the_residual_test_fails():
    """``refine="auto"`` (default): no refinement where the first solve passes its residual
    test (the answer is ``refine=0``'s), one step and a second test where it fails (here
    forced by a ``tol`` below the first solve's residual: the answer is ``refine=1``'s).
    float32 "confident" case, damped; relative error ``1e-5`` between programs doing the
    same arithmetic (float32 round-off of differently fused sums only).
    """
    params, x, y, lam = numerics_case("confident", jnp.float32)

    def run(**opts):
        return nc.natural_gradient(MODEL, params, x, y, FAMILY, solver="gram", damping=lam, **opts)

    plain = run(refine=0)
    auto = run()
    assert not bool(auto.stats["refined"]) and bool(auto.stats["converged"])
    assert rel_err(auto.value, plain.value) <= 1e-5
    tight = 0.5 * float(plain.stats["residual"])
    forced, once = run(tol=tight), run(refine=1, tol=tight)
    assert bool(forced.stats["refined"])
    assert rel_err(forced.value, once.value) <= 1e-5
    assert int(forced.stats["result"]) == int(once.stats["result"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_undamped_confident_softmax_reports_failure(dtype):
    """Undamped with min p 1e-12/1e-30: no direction-cut answer solves ``F n = g`` — said so.

    The exact solution grows like ``1/p``; every eigenvalue below the cut-off is dropped,
    so the residual stays O(1) (measured 0.36) and the status must not be successful.
    """
    params, x, y, _ = numerics_case("confident", dtype)
    for solver in ("pinv", "gram"):
        sol = nc.natural_gradient(MODEL, params, x, y, FAMILY, solver=solver)
        assert int(sol.stats["result"]) == nc.RESULTS.ill_conditioned, solver
        assert float(sol.stats["residual"]) > 0.1
    with pytest.raises(nc.SolverError, match="ill_conditioned"):
        nc.natural_gradient(MODEL, params, x, y, FAMILY, solver="pinv", throw=True)


def test_pinv_float32_damped_keeps_the_damped_directions():
    """float32, damping below ``P · eps · λ_max``: nothing is cut (every eigenvalue ≥ λ).

    229 parameters, 64 examples, λ = 1e-5 (κ ≈ 6e4). The old cut-off ``P·eps·λ_max``
    discarded 21 directions and was 36% off; the answer is now within ``10 · κ · eps32``
    (≈ 7e-2; measured 6e-3) of the float64 dense one.
    """
    params = init_mlp(jax.random.PRNGKey(0), (8, 16, 5))
    model = make_mlp("tanh")
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
    y = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 5)
    lam = 1e-5
    ref = nc.natural_gradient(model, params, x, y, FAMILY, damping=lam)
    kappa = float(ref.stats["condition"])
    sol = nc.natural_gradient(
        model, cast(params, jnp.float32), cast(x, jnp.float32), y, FAMILY, damping=lam
    )
    assert int(sol.stats["num_cut"]) == 0
    assert rel_err(sol.value, ref.value) <= 10 * kappa * EPS32


def test_cg_float32_defaults_succeed_in_comparable_steps():
    """CG with default settings, damped 1e-3, every shared case: success in both precisions.

    float32 takes at most ``2 × + 2`` the float64 steps (measured: at most equal, since
    its default tolerance 5e-4 is looser than float64's 1e-10; before, float32 ran to the
    step cap against 1e-10 and reported failure everywhere).
    """
    for case in CASES:
        steps = {}
        for dtype in (jnp.float64, jnp.float32):
            y = case["y"] if isinstance(case["family"], nc.Categorical) else cast(case["y"], dtype)
            sol = nc.natural_gradient(
                case["model"],
                cast(case["params"], dtype),
                cast(case["x"], dtype),
                y,
                case["family"],
                solver="cg",
                damping=1e-3,
            )
            assert bool(sol.stats["converged"]), (case["id"], dtype)
            assert int(sol.stats["result"]) == nc.RESULTS.successful
            steps[dtype] = int(sol.stats["num_steps"])
        assert steps[jnp.float32] <= 2 * steps[jnp.float64] + 2, (case["id"], steps)


def test_cg_step_cap_reports_max_steps_reached():
    params, x, y, lam = numerics_case("well", jnp.float64)
    sol = nc.natural_gradient(MODEL, params, x, y, FAMILY, solver="cg", damping=lam, maxiter=1)
    assert int(sol.stats["result"]) == nc.RESULTS.max_steps_reached
    assert not bool(sol.stats["converged"]) and int(sol.stats["num_steps"]) == 1
    assert "maxiter" in nc.RESULTS.max_steps_reached.message


# ---- the property: success is never a lie ------------------------------------------------


def _independent_residual(params, x, y, lam, n):
    """``‖(F + λI) n − g‖ / ‖g‖``, the norm ``‖F + λI‖₂`` and ``‖n‖ / ‖g‖``, all in float64.

    Built from the dense float64 Fisher and ``jax.grad`` of the loss, not from the solvers'
    Fisher-vector product.
    """
    p64, x64 = cast(params, jnp.float64), cast(x, jnp.float64)
    fisher = np.asarray(nc.fisher_matrix(MODEL, p64, x64, FAMILY)) + lam * np.eye(38)
    loss = lambda p: jnp.mean(jax.vmap(FAMILY.nll)(MODEL(p, x64), y))
    g = np.asarray(flat(jax.grad(loss)(p64)))
    n = np.asarray(n, np.float64)
    res = np.linalg.norm(fisher @ n - g) / np.linalg.norm(g)
    return res, np.linalg.norm(fisher, 2), np.linalg.norm(n) / np.linalg.norm(g)


@settings(max_examples=16)
@given(
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1.0, 8.0, 30.0]),
    duplicate=st.booleans(),
    lam=st.sampled_from([0.0, 1e-6, 1e-3]),
    dtype=st.sampled_from([jnp.float32, jnp.float64]),
    solver=st.sampled_from(SOLVERS),
)
def test_success_implies_float64_residual_within_tolerance(
    seed, scale, duplicate, lam, dtype, solver
):
    """Whenever a solver reports success, the independent float64 residual is within tol.

    Problems: the 3 → 5 → 3 softmax MLP at a random point, its last layer scaled by 1, 8
    or 30 (up to confidently wrong predictions), optionally with a duplicated example,
    undamped or damped, float32 or float64. Allowance for the precision's own rounding of
    the residual the solver computed: ``10 · eps · (1 + ‖F + λI‖ ‖n‖ / ‖g‖)`` (one FVP:
    a few products of size ≤ 38, each with relative error ≲ eps). Where it is not within
    that, the status must not be ``successful``.
    """
    if solver == "cholesky" and lam == 0.0:
        solver = "pinv"  # Cholesky refuses λ = 0 at construction time (tested elsewhere)
    key = jax.random.PRNGKey(seed)
    kp, kx, ky = jax.random.split(key, 3)
    params = init_mlp(kp, (3, 5, 3))
    params[1] = {"W": params[1]["W"] * scale, "b": params[1]["b"] * scale}
    x = jax.random.normal(kx, (4, 3))
    y = jax.random.randint(ky, (4,), 0, 3)
    if duplicate:
        x, y = x.at[1].set(x[0]), y.at[1].set(y[0])
    params, x = cast(params, dtype), cast(x, dtype)
    sol = nc.natural_gradient(MODEL, params, x, y, FAMILY, solver=solver, damping=lam)
    res, norm_a, ratio = _independent_residual(params, x, y, lam, flat(sol.value))
    eps = float(jnp.finfo(dtype).eps)
    allowance = float(sol.stats["tol"]) + 10 * eps * (1 + norm_a * ratio)
    ok = bool(sol.stats["converged"])
    assert ok == (int(sol.stats["result"]) == nc.RESULTS.successful)
    if ok:
        assert res <= allowance, (res, allowance)
    elif np.isfinite(res):
        assert int(sol.stats["result"]) in (
            nc.RESULTS.ill_conditioned,
            nc.RESULTS.max_steps_reached,
        )


# ---- schema and docs --------------------------------------------------------------------


def test_every_solver_fills_the_shared_statistics():
    params, x, y, lam = numerics_case("well", jnp.float64)
    for solver in SOLVERS:
        stats = nc.natural_gradient(MODEL, params, x, y, FAMILY, solver=solver, damping=lam).stats
        assert set(nc.STAT_KEYS) <= set(stats), solver
        assert float(stats["residual"]) <= float(stats["tol"]), solver
        assert np.isnan(float(stats["residual_float64"]))  # not asked for
    stats = nc.grad(MODEL, FAMILY, return_stats=True)(params, x, y)[1]
    assert set(nc.STAT_KEYS) <= set(stats) and "maps" in stats


def test_statistics_reference_documents_every_key_and_result():
    import pathlib

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "statistics.md").read_text()
    for key in nc.STAT_KEYS:
        assert f"`{key}`" in doc, key
    for member in nc.RESULTS:
        assert f"`{member.name}`" in doc, member
    # The defaults table quotes the library's own constants.
    for dtype, text in ((jnp.float64, "1e-10"), (jnp.float32, "5e-4"), (jnp.float16, "5e-2")):
        assert float(text) == nc.default_tol(dtype) and f"`{text}`" in doc, dtype


# ---- both routes validate the same way -----------------------------------------------------


def _both_routes(model, params, x, y):
    """The exception each route raises for the same input, as (type, message) pairs."""
    out = []
    for fn in (
        lambda: nc.natural_gradient(model, params, x, y, FAMILY),
        lambda: nc.grad(model, FAMILY)(params, x, y),
    ):
        with pytest.raises((TypeError, ValueError)) as info:
            fn()
        out.append((type(info.value), str(info.value)))
    return out


@pytest.mark.parametrize("bad", ["dict_output", "tuple_output", "float_labels", "one_hot"])
def test_both_routes_raise_the_same_clear_error(bad):
    params, x, y, _ = numerics_case("well", jnp.float64)
    model = MODEL
    if bad == "dict_output":
        model = lambda p, x: {"logits": MODEL(p, x)}
        want = r"pick_output\(model, 'logits'\)"
    elif bad == "tuple_output":
        model = lambda p, x: (MODEL(p, x),)
        want = r"pick_output\(model, 0\)"
    elif bad == "float_labels":
        y = y.astype(jnp.float64)
        want = "integer class labels"
    else:
        y = jax.nn.one_hot(y, 3).astype(jnp.int32)
        want = "class indices"
    (t1, m1), (t2, m2) = _both_routes(model, params, x, y)
    assert (t1, m1) == (t2, m2)
    import re

    assert re.search(want, m1), m1


def test_pick_output_declares_the_leaf_for_both_routes():
    params, x, y, lam = numerics_case("well", jnp.float64)
    picked = nc.pick_output(lambda p, x: {"logits": MODEL(p, x), "aux": 0.0}, "logits")
    ref = nc.natural_gradient(MODEL, params, x, y, FAMILY, damping=lam)
    sol = nc.natural_gradient(picked, params, x, y, FAMILY, damping=lam)
    assert rel_err(sol.value, ref.value) == 0.0  # the same program
    mod = nc.grad(picked, FAMILY)(params, x, y)
    assert rel_err(mod, nc.grad(MODEL, FAMILY)(params, x, y)) == 0.0


# ---- determinism -------------------------------------------------------------------------------


def test_same_key_bit_identical_mc():
    params, x, y, lam = numerics_case("well", jnp.float64)
    key = jax.random.PRNGKey(3)
    a, b = (
        nc.natural_gradient(
            MODEL, params, x, y, FAMILY, solver="gram", kind="mc", key=key, damping=lam
        )
        for _ in range(2)
    )
    assert np.array_equal(flat(a.value), flat(b.value))
    assert np.array_equal(np.asarray(a.stats["residual"]), np.asarray(b.stats["residual"]))
