"""``natchain.diagnostics.step_report`` and ``project_to_range`` against the dense Fisher.

The reference is the eigendecomposition of ``natchain.fisher_matrix`` in float64: its
eigenvectors with eigenvalues above ``1e-10 λ_max`` span ``range(F_theta)``, the rest
``null(F_theta)``. On the draws used here the spectrum has a clear gap (the smallest kept
eigenvalue is ≥ 5e-4 λ_max, the largest dropped one ≤ 1e-15 λ_max, asserted in
:func:`dense_split`), so the split cannot depend on where in the gap the cut falls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from strategies import build_mlp_case

import natchain as nc
from natchain.diagnostics import STEP_REPORT_KEYS, centre_outputs, project_to_range, step_report

EPS32 = float(np.finfo(np.float32).eps)
#: float64 agreement with the dense reference: the projector goes through ``C⁺`` of a
#: matrix whose kept eigenvalues span a ratio κ ≤ 2e3 (asserted), so its round-off is
#: ≲ κ · ε₆₄ ≈ 4e-13 relative; 1e-10 leaves a margin for the few products around it.
TOL64 = 1e-10


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], dtype=np.float64)


@pytest.fixture(scope="module")
def case():
    """A tanh MLP 4-6-3 with softmax outputs on 5 examples: P = 51 parameters, rank
    ``F_theta`` = N·(m − 1) = 10, so ``null(F_theta)`` has dimension 41."""
    return build_mlp_case(2, family="categorical", widths=(6,), d_in=4, batch=5)


def dense_split(case):
    """``(F, range basis, null basis, κ)`` from the float64 eigendecomposition of ``F``."""
    fisher = np.asarray(nc.fisher_matrix(case.model, case.params, case.x, case.family))
    w, v = np.linalg.eigh(fisher)
    keep = w > 1e-10 * w.max()
    assert w[keep].min() >= 5e-4 * w.max() and w[~keep].max() <= 1e-15 * w.max()
    return fisher, v[:, keep], v[:, ~keep], float(w.max() / w[keep].min())


def random_step(case, seed=0):
    flat0, unravel = ravel_pytree(case.params)
    return unravel(jnp.asarray(np.random.default_rng(seed).standard_normal(flat0.size)))


def report(case, step, **kw):
    return {k: float(v) for k, v in step_report(*case.args, step, **kw).items()}


def test_step_report_keys_and_exact_direction_has_no_null_component(case):
    """``e`` (dense pinv, undamped) lies in ``range(F)``: null fraction ≈ 0, cosine 1,
    function error and residual ≈ 0; every documented key is returned, as a scalar."""
    _, _, _, kappa = dense_split(case)
    assert kappa <= 2e3
    e = nc.natural_gradient(*case.args, solver="pinv").value
    raw = step_report(*case.args, e)
    assert list(raw) == list(STEP_REPORT_KEYS)
    assert all(jnp.shape(v) == () for v in raw.values())
    r = {k: float(v) for k, v in raw.items()}
    assert r["null_fraction"] <= TOL64
    assert abs(r["cosine"] - 1) <= TOL64 and abs(r["norm_ratio"] - 1) <= TOL64
    assert r["fn_error"] <= TOL64 and r["residual"] <= TOL64
    assert r["range_rank"] == 10 and r["exact_result"] == int(nc.RESULTS.successful)


def test_null_vector_has_null_fraction_one(case):
    _, _, null, _ = dense_split(case)
    coef = np.random.default_rng(1).standard_normal(null.shape[1])
    _, unravel = ravel_pytree(case.params)
    v = unravel(jnp.asarray(null @ coef))
    r = report(case, v)
    assert abs(r["null_fraction"] - 1) <= TOL64
    assert abs(r["cosine"]) <= TOL64  # e ∈ range(F) ⟂ null(F)
    assert r["residual"] == pytest.approx(1.0, abs=TOL64)  # F v = 0: ‖0 − g‖/‖g‖


def test_projection_matches_dense_and_decomposes_the_step(case):
    """``P_range s`` equals the dense ``V₁V₁ᵀ s``; ``s − P_range s`` lies in ``null(F)``
    (``F`` annihilates it) and is orthogonal to ``P_range s``; ``null_fraction`` is the
    dense ``‖V₀V₀ᵀ s‖/‖s‖``."""
    fisher, rng_basis, null, _ = dense_split(case)
    s = random_step(case)
    fs = flat(s)
    pr = project_to_range(case.model, case.params, case.x, case.family, s)
    assert jax.tree_util.tree_structure(pr) == jax.tree_util.tree_structure(s)
    p = flat(pr)
    dense = rng_basis @ (rng_basis.T @ fs)
    assert np.linalg.norm(p - dense) <= TOL64 * np.linalg.norm(fs)
    rest = fs - p
    assert np.linalg.norm(fisher @ rest) <= TOL64 * np.linalg.norm(fisher, 2) * np.linalg.norm(fs)
    assert abs(p @ rest) <= TOL64 * fs @ fs
    r = report(case, s)
    expected = np.linalg.norm(null @ (null.T @ fs)) / np.linalg.norm(fs)
    assert r["null_fraction"] == pytest.approx(expected, abs=TOL64)
    # the projection of a natural gradient plus a null vector is the minimum-norm one
    e = flat(nc.natural_gradient(*case.args, solver="pinv").value)
    _, unravel = ravel_pytree(case.params)
    back = flat(project_to_range(case.model, case.params, case.x, case.family, unravel(e + rest)))
    assert np.linalg.norm(back - e) <= TOL64 * np.linalg.norm(e + rest)


def test_report_values_match_dense_formulas(case):
    """Cosine, norm ratio, residual and the centred function-space error of a generic step
    against numpy on the dense ``F``, ``g`` and ``J``."""
    fisher, _, _, _ = dense_split(case)
    s = random_step(case, seed=3)
    fs = flat(s)
    e = flat(nc.natural_gradient(*case.args, solver="pinv").value)
    g = flat(nc.natural_gradient(*case.args, solver="pinv").grad)
    jac = np.asarray(
        jax.jacfwd(lambda q: case.model(ravel_pytree(case.params)[1](q), case.x))(
            jnp.asarray(flat(case.params))
        )
    )  # (N, m, P)
    centre = lambda a: (a - a.mean(axis=1, keepdims=True)).reshape(-1)  # noqa: E731
    r = report(case, s)
    assert r["cosine"] == pytest.approx(fs @ e / np.linalg.norm(fs) / np.linalg.norm(e), abs=TOL64)
    assert r["norm_ratio"] == pytest.approx(np.linalg.norm(fs) / np.linalg.norm(e), rel=TOL64)
    assert r["residual"] == pytest.approx(
        np.linalg.norm(fisher @ fs - g) / np.linalg.norm(g), rel=TOL64
    )
    fn = np.linalg.norm(centre(jac @ (fs - e))) / np.linalg.norm(centre(jac @ e))
    assert r["fn_error"] == pytest.approx(fn, rel=TOL64)


def test_fn_error_is_invariant_to_logit_shifts(case):
    """Adding ``t`` to every output bias shifts every example's logits by ``t``: a null
    direction of the Categorical Fisher. ``fn_error`` ignores it; the uncentred error
    would not (it is ``t·√(N m) / ‖J e‖``, of order one here)."""
    e = nc.natural_gradient(*case.args, solver="pinv").value
    shift = jax.tree.map(jnp.zeros_like, case.params)
    shift[-1]["b"] = jnp.ones_like(shift[-1]["b"])
    assert report(case, shift)["null_fraction"] == pytest.approx(1.0, abs=TOL64)
    moved = jax.tree.map(lambda a, b: a + 3.0 * b, e, shift)
    r = report(case, moved)
    assert r["fn_error"] <= TOL64
    assert r["residual"] <= TOL64  # still a natural gradient
    je = np.asarray(jax.jvp(lambda p: case.model(p, case.x), (case.params,), (e,))[1])
    assert 3.0 * np.sqrt(je.size) / np.linalg.norm(je) > 0.1  # the gauge it had to remove
    out = jnp.asarray(np.arange(6.0).reshape(2, 3))
    np.testing.assert_allclose(centre_outputs(out, nc.Categorical()), [-1, 0, 1, -1, 0, 1])
    np.testing.assert_array_equal(centre_outputs(out, nc.Bernoulli()), np.arange(6.0))


def test_full_row_rank_modular_chain_solves_the_equation_with_a_null_component():
    """The right-inverse theorem, seen by ``step_report``: on a two-layer tanh MLP whose
    every map has full row rank (batch 2, softmax; the case of ``test_theory``), the
    modular step has ``residual ≈ 0`` yet a large null fraction, and (undamped, ``F m =
    g``) ``P_range m = e`` so ``cosine² + null_fraction² = 1``.

    Tolerances: ``1e-10`` for the residual and the identity (float64, local condition
    numbers ≈ 1e2 on this draw); ``null_fraction > 0.5`` is a loose bound on this fixed
    draw (measured ≈ 1 − 1e-6: ``‖m‖ ≈ 740 ‖e‖``).
    """
    case = build_mlp_case(3, family="categorical", widths=(4,), d_in=3, batch=2)
    m = nc.grad(case.model, case.family, granularity="layer")(case.params, case.x, case.y)
    r = report(case, m)
    assert r["residual"] <= 1e-10 and r["fn_error"] <= 1e-10
    assert r["null_fraction"] > 0.5
    assert r["cosine"] ** 2 + r["null_fraction"] ** 2 == pytest.approx(1.0, abs=1e-10)
    e = flat(nc.natural_gradient(*case.args, solver="pinv").value)
    p = flat(project_to_range(case.model, case.params, case.x, case.family, m))
    assert np.linalg.norm(p - e) <= 1e-10 * np.linalg.norm(flat(m))


def test_float32_agrees_with_float64(case):
    """The same report with float32 parameters, inputs and step: values are float32 and
    agree with float64. Tolerance ``1e2 · κ · ε₃₂`` (≈ 4e-3 here) relative: the projector
    inverts ``C`` whose kept spectrum spans κ (asserted ≤ 2e3), the exact solve the same
    system; the factor 1e2 covers the products around them (measured ≈ 1e-7)."""
    _, _, _, kappa = dense_split(case)
    tol = 1e2 * kappa * EPS32
    s = random_step(case, seed=4)
    r64 = report(case, s)
    to32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    raw = step_report(case.model, to32(case.params), to32(case.x), case.y, case.family, to32(s))
    assert raw["null_fraction"].dtype == jnp.float32
    for key in ("step_norm", "exact_norm", "norm_ratio", "null_fraction", "fn_error", "residual"):
        assert float(raw[key]) == pytest.approx(r64[key], rel=tol), key
    assert float(raw["cosine"]) == pytest.approx(r64["cosine"], abs=tol)
    assert int(raw["range_rank"]) == 10


def test_given_exact_damping_and_jit(case):
    """``exact=`` replaces the Gram solve (``exact_result = -1``); ``damping`` reaches it
    (the damped ``e`` still lies in ``range(F)``); the report is ``jax.jit``-able."""
    s = random_step(case, seed=5)
    lam = 1e-2
    e = nc.natural_gradient(*case.args, solver="gram", damping=lam).value
    given = report(case, s, exact=e)
    computed = report(case, s, damping=lam)
    assert given["exact_result"] == -1 and computed["exact_result"] == 0
    for key in ("cosine", "fn_error", "norm_ratio", "null_fraction"):
        assert given[key] == pytest.approx(computed[key], rel=TOL64), key
    assert report(case, e, damping=lam)["null_fraction"] <= TOL64
    assert report(case, e, damping=lam)["residual"] > 1e-3  # damped: F e ≠ g
    model, family = case.model, case.family

    @jax.jit
    def jitted(p, x, y, d):
        return step_report(model, p, x, y, family, d, damping=lam)

    out = jitted(case.params, case.x, case.y, s)
    for key, value in computed.items():
        assert float(out[key]) == pytest.approx(value, rel=TOL64, abs=TOL64), key


def test_zero_step_and_bad_input(case):
    zero = jax.tree.map(jnp.zeros_like, case.params)
    r = report(case, zero)
    assert r["null_fraction"] == 0.0 and r["step_norm"] == 0.0 and np.isnan(r["cosine"])
    with pytest.raises(ValueError, match="step"):
        step_report(*case.args, case.params[0])
    bad = jax.tree.map(lambda a: a[..., :1], case.params)
    with pytest.raises(ValueError, match=r"step\[0\]\['W'\] has shape"):
        step_report(*case.args, bad)
    nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), case.params)
    with pytest.raises(ValueError, match="step.*non-finite"):
        step_report(*case.args, nan)
    with pytest.raises(ValueError, match="exact"):
        step_report(*case.args, zero, exact=case.params[0])
    with pytest.raises(ValueError, match="damping"):
        step_report(*case.args, zero, damping=-1.0)
    with pytest.raises(ValueError, match="rcond"):
        project_to_range(case.model, case.params, case.x, case.family, zero, rcond=2.0)
