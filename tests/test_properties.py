"""The property-based verification suite: where the modular natural chain rule is exact.

Each property is its own test; its condition is stated in its docstring. Models come from
:mod:`strategies` (small MLPs of depth 1–4 with contracting, expanding and bottleneck
widths, tanh/ReLU/identity, every family, batch 1..8, rank-deficient or orthonormal-row
weights) drawn from a small fixed set of shapes, so JAX compiles few programs.

Running: the default profile (``tests/conftest.py``: derandomised, no deadline) uses each
test's own ``max_examples`` below; ``HYPOTHESIS_PROFILE=slow`` multiplies them by 10, and
``-m slow`` adds the long-running tests marked ``slow``::

    HYPOTHESIS_PROFILE=slow pytest -m "slow or not slow" tests/test_properties.py

Tolerances (float64): exact solvers agree to ≤ 1e-8 relative (CG to ≤ 1e-6, it stops at
a residual of 1e-12); *exact by theorem* means modular = exact to ≤ 1e-8 relative; a
counterexample differs by more than :data:`MARGIN` relative; invariances hold to ≤ 1e-8.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from strategies import (
    ARCHS,
    COUNTEREXAMPLES,
    EXACT_PRONE_KINDS,
    GENERIC_CONSTRUCTIONS,
    HOLDING_CONSTRUCTIONS,
    PAIR_SHAPES,
    REPARAM_ARCHS,
    Case,
    build_mlp_case,
    deep_linear_cases,
    exact_prone_case,
    matrix_pairs,
    mlp_cases,
    numerical_reverse_order,
    reparametrise,
    soundness_cases,
)

import natchain as nc
from natchain.diagnostics import greville_test, modular_fn, rank_report, reverse_order_law_holds

SLOW = os.environ.get("HYPOTHESIS_PROFILE") == "slow"
#: Relative difference a counterexample must exceed (property 3).
MARGIN = 1e-3


def examples(n: int) -> int:
    """``max_examples`` for a test: ``n`` by default, ``10 n`` under the slow profile."""
    return 10 * n if SLOW else n


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def rel(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` of flattened pytrees (``‖a − b‖`` when ``b = 0``)."""
    a, b = flat(a), flat(b)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


def function_step(case: Case, direction) -> np.ndarray:
    """``J n`` (``N × m``); logits are centred for a Categorical family (gauge of softmax)."""
    out = jax.jvp(lambda p: case.model(p, case.x), (case.params,), (direction,))[1]
    out = np.asarray(out)
    if isinstance(case.family, nc.Categorical):
        out = out - out.mean(axis=1, keepdims=True)
    return out


def clear_spectrum(fisher: np.ndarray, lo: float = 1e-12, hi: float = 1e-7) -> bool:
    """No eigenvalue of ``fisher`` in the grey zone ``(lo, hi] · λ_max`` (rank is unambiguous)."""
    w = np.linalg.eigvalsh(fisher)
    top = max(w[-1], 0.0)
    return bool(top > 0 and not np.any((w > lo * top) & (w <= hi * top)))


# ---- property 1: the exact solvers ------------------------------------------------------


@settings(max_examples=examples(6))
@given(case=mlp_cases(), damped=st.booleans())
def test_exact_solvers_agree_and_give_min_norm(case, damped):
    """Property 1: the exact solvers agree — pinv and Gram, damped or not; Cholesky and CG
    too when damped — and the undamped answer is the minimum-norm solution of ``F n = g``.

    Condition: any model; the undamped check of minimum norm needs an unambiguous rank
    (no eigenvalue of ``F_theta`` in ``(1e-12, 1e-7] · λ_max``, else the example is
    discarded). Tolerances: ≤ 1e-8 relative between pinv and Gram/Cholesky, ≤ 1e-6 for
    CG (stopped at relative residual 1e-12); minimum norm: residual of ``F n = g`` and
    distance to ``numpy.linalg.lstsq``'s minimum-norm solution ≤ 1e-8 relative.
    """
    damping = 1e-2 if damped else 0.0
    fisher = np.asarray(nc.fisher_matrix(*case.args[:3], case.family))
    if not damped:
        assume(clear_spectrum(fisher))
    ref = nc.natural_gradient(*case.args, solver="pinv", damping=damping)
    gram = nc.natural_gradient(*case.args, solver="gram", damping=damping)
    assert rel(gram.value, ref.value) <= 1e-8, case
    if damped:
        chol = nc.natural_gradient(*case.args, solver="cholesky", damping=damping)
        assert rel(chol.value, ref.value) <= 1e-8, case
        cg = nc.natural_gradient(*case.args, solver="cg", damping=damping, tol=1e-12)
        assert bool(cg.stats["converged"]), case
        assert rel(cg.value, ref.value) <= 1e-6, case
    else:
        n, g = flat(ref.value), flat(ref.grad)
        scale = np.linalg.norm(fisher, 2) * np.linalg.norm(n) + np.linalg.norm(g)
        assert np.linalg.norm(fisher @ n - g) <= 1e-8 * scale, case
        w, v = np.linalg.eigh(fisher)
        keep = w > 1e-10 * w[-1]
        lstsq = v[:, keep] @ ((v[:, keep].T @ g) / w[keep])
        assert np.linalg.norm(n - lstsq) <= 1e-8 * max(np.linalg.norm(lstsq), 1e-300), case
        # Minimum norm ⇔ no component in the null space of F_theta.
        null = v[:, ~keep]
        assert np.linalg.norm(null.T @ n) <= 1e-8 * max(np.linalg.norm(n), 1e-300), case


# ---- property 4: Greville's predicate against the numerical test -----------------------


def test_reverse_order_law_predicate_matches_numerical_test_on_1200_pairs():
    """Property 4: Greville's predicate equals the numerical test on 1200 generated pairs.

    Condition: six shapes (square, wide, tall, chained both ways) × five constructions ×
    40 pairs, vectorised in NumPy; 480 pairs built so that the law holds (``B`` with
    orthonormal rows or ``A`` with orthonormal columns; ``A = U D₁ Vᵀ``, ``B = V D₂ Wᵀ``
    sharing a basis, rank-deficient), the rest generic (random, rank-one factors, full
    rank), entries scaled by 10^[−3, 3]. The classic counterexample
    ``A = [[1, 0], [0, 0]]``, ``B = [[2, 1], [1, 2]]`` is refused.
    Tolerances: predicate ``tol = 1e-8``; numerical test ``1e-6`` relative (the two
    groups are separated by ≥ 9 orders of magnitude here).
    """
    rng = np.random.default_rng(20240601)
    total = holds_by_construction = rank_deficient = 0
    for shape in PAIR_SHAPES:
        for construction in HOLDING_CONSTRUCTIONS + GENERIC_CONSTRUCTIONS:
            a, b = matrix_pairs(rng, shape, 40, construction)
            predicate = reverse_order_law_holds(a, b, tol=1e-8)
            numerical = numerical_reverse_order(a, b)
            assert np.array_equal(predicate, numerical), (shape, construction)
            if construction in HOLDING_CONSTRUCTIONS:
                assert predicate.all(), (shape, construction)
                holds_by_construction += len(a)
            test = greville_test(a, b, tol=1e-8)
            rank_deficient += int(
                np.sum((test.rank_a < min(shape[:2])) | (test.rank_b < min(shape[1:])))
            )
            total += len(a)
    assert total >= 1000
    assert holds_by_construction >= total / 3
    assert rank_deficient >= total / 4
    assert not reverse_order_law_holds([[1.0, 0.0], [0.0, 0.0]], [[2.0, 1.0], [1.0, 2.0]])
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert not numerical_reverse_order(a[None], b[None])[0]


@settings(max_examples=examples(60))
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from(PAIR_SHAPES),
    construction=st.sampled_from(HOLDING_CONSTRUCTIONS + GENERIC_CONSTRUCTIONS),
)
def test_reverse_order_law_predicate_matches_numerical_test(seed, shape, construction):
    """Property 4 (drawn by hypothesis): predicate ⇔ numerical test, one pair at a time.

    Condition and tolerances as in the 1200-pair test; the law holds for every pair of a
    holding construction.
    """
    a, b = matrix_pairs(np.random.default_rng(seed), shape, 1, construction)
    holds = reverse_order_law_holds(a[0], b[0], tol=1e-8)
    assert holds == bool(numerical_reverse_order(a, b)[0])
    if construction in HOLDING_CONSTRUCTIONS:
        assert holds


# ---- property 5: invariance under a linear reparametrisation ----------------------------


@settings(max_examples=examples(4))
@given(
    case=mlp_cases(archs=REPARAM_ARCHS, weight_modes=("gaussian",)),
    layer_pick=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_function_step_invariant_plain_gradient_not(case, layer_pick, seed):
    """Property 5: under ``W_ℓ = R V`` (``R`` invertible, not orthogonal) the exact natural
    gradient's function-space step ``J n`` is unchanged; the plain gradient's is not.

    Condition: tanh/identity MLPs with Gaussian weights (every layer influences the
    output), one layer reparametrised, the same point in function space. Logits of a
    Categorical family are compared after centring (the all-ones direction does not change
    the distribution). Tolerances: exact ≤ 1e-8 relative; the plain gradient's step
    changes by more than 1e-6 relative.
    """
    layer = layer_pick % len(case.params)
    case2 = reparametrise(case, layer, seed)
    eta2 = case2.model(case2.params, case2.x)
    assert np.allclose(eta2, case.model(case.params, case.x), atol=1e-10)
    n1 = nc.natural_gradient(*case.args, solver="pinv")
    n2 = nc.natural_gradient(*case2.args, solver="pinv")
    s1, s2 = function_step(case, n1.value), function_step(case2, n2.value)
    assert np.linalg.norm(s1 - s2) <= 1e-8 * np.linalg.norm(s1), case
    g1, g2 = function_step(case, n1.grad), function_step(case2, n2.grad)
    assert np.linalg.norm(g1 - g2) > 1e-6 * np.linalg.norm(g1), case


# ---- property 6: deep linear networks and their gauge symmetry ---------------------------


@settings(max_examples=examples(4))
@given(case=deep_linear_cases(), seed=st.integers(0, 2**31 - 1))
def test_deep_linear_rank_matches_gauge_count_and_function_steps_agree(case, seed):
    """Property 6: for a deep linear network of ``L`` invertible ``n × n`` layers the rank
    of ``F_theta`` is ``P − (L−1) n² = n²`` when the batch spans the input space
    (``N ≥ n``), and ``n · N`` when it does not (the data limit); the gauge
    ``W_{l+1} → W_{l+1} G⁻¹, W_l → G W_l`` leaves the exact natural gradient's
    function-space step unchanged but not its parameter-space step.

    Condition: Gaussian output (``F_eta = I``), generic inputs, ``G`` random invertible.
    Tolerances: rank by eigenvalues ``> 1e-9 · λ_max``; function steps agree to ≤ 1e-8
    relative; pinv, Gram and CG agree in function space to ≤ 1e-8 (CG 1e-6).
    """
    depth, width, batch = case.meta["depth"], case.meta["width"], case.meta["batch"]
    fisher = np.asarray(nc.fisher_matrix(*case.args[:3], case.family))
    w = np.linalg.eigvalsh(fisher)
    rank = int(np.sum(w > 1e-9 * w[-1]))
    num_params = depth * width * width
    gauge = (depth - 1) * width * width
    predicted = num_params - gauge if batch >= width else width * batch
    assert rank == predicted, (case, rank, predicted)

    ref = nc.natural_gradient(*case.args, solver="pinv")
    step = function_step(case, ref.value)
    for solver, tol in (("gram", 1e-8), ("cg", 1e-6)):
        other = nc.natural_gradient(*case.args, solver=solver)
        assert np.linalg.norm(function_step(case, other.value) - step) <= tol * np.linalg.norm(
            step
        ), (case, solver)

    rng = np.random.default_rng(seed)
    g = jnp.asarray(
        np.linalg.qr(rng.standard_normal((width, width)))[0] * rng.uniform(0.5, 2, width)
    )
    params2 = list(case.params)
    params2[0] = case.params[0] @ jnp.linalg.inv(g)  # eta = x W_1 W_2 ⋯: W_1 G⁻¹, W_2 → G W_2
    params2[1] = g @ case.params[1]
    case2 = Case(case.model, params2, case.x, case.y, case.family, case.meta)
    assert np.allclose(case.model(params2, case.x), case.model(case.params, case.x), atol=1e-10)
    ref2 = nc.natural_gradient(*case2.args, solver="pinv")
    step2 = function_step(case2, ref2.value)
    assert np.linalg.norm(step2 - step) <= 1e-8 * np.linalg.norm(step), case
    # In parameter space the two answers differ: the gauge is visible there.
    assert rel(ref2.value, ref.value) > 1e-6, case


@pytest.mark.slow
@settings(max_examples=examples(40))
@given(case=mlp_cases(archs=ARCHS))
def test_exact_solvers_agree_many_examples(case):
    """Property 1 on more examples (slow): pinv and Gram agree to ≤ 1e-8 relative, damped."""
    ref = nc.natural_gradient(*case.args, solver="pinv", damping=1e-3)
    gram = nc.natural_gradient(*case.args, solver="gram", damping=1e-3)
    assert rel(gram.value, ref.value) <= 1e-8, case


# ---- property 2: soundness of the verdict -------------------------------------------------

GRANULARITIES = ("layer", "primitive")


def modular(case: Case, granularity: str):
    return modular_fn(case.model, case.family, granularity)(case.params, case.x, case.y)


def exact(case: Case):
    return nc.natural_gradient(*case.args, solver="pinv").value


@settings(max_examples=examples(10))
@given(case=soundness_cases(), granularity=st.sampled_from(GRANULARITIES))
def test_rank_report_exact_verdict_is_sound(case, granularity):
    """Property 2: whenever ``rank_report`` says *exact by theorem*, the modular natural
    gradient equals the exact one to ≤ 1e-8 relative — never a false "exact".

    Condition: generated MLPs (every architecture, weight mode and family) and models
    where a theorem can apply (one dense layer, ``tanh(x W)``, ``(x W + b) C``), at layer
    and primitive granularity. A *not guaranteed* verdict must carry at least one reason.
    Likewise for the function-space verdict: where every map has full row rank and
    ``F_eta`` is invertible, ``J m = J e`` to ≤ 1e-8 relative.
    """
    report = rank_report(case.model, case.params, case.x, case.family, granularity=granularity)
    if report.exact:
        assert report.theorem and not report.reasons
        assert rel(modular(case, granularity), exact(case)) <= 1e-8, (case, str(report))
    else:
        assert report.reasons and report.theorem is None
    if report.function_space_exact:
        m, e = function_step(case, modular(case, granularity)), function_step(case, exact(case))
        assert np.linalg.norm(m - e) <= 1e-8 * np.linalg.norm(e), (case, str(report))


@pytest.mark.parametrize("kind", EXACT_PRONE_KINDS)
def test_rank_report_exact_verdicts_occur(kind):
    """Property 2 is not vacuous: each theorem fires on the models built for it (layer
    granularity, seed 0), and modular = exact there to ≤ 1e-8 relative."""
    case = exact_prone_case(0, kind)
    report = rank_report(case.model, case.params, case.x, case.family, granularity="layer")
    assert report.exact, str(report)
    assert rel(modular(case, "layer"), exact(case)) <= 1e-8


# ---- property 3: every breaking condition has a counterexample ---------------------------

#: Condition → a phrase the verdict's reasons must contain.
REASON_PHRASES = {
    "expanding": "full row rank",
    "reverse_order": "reverse-order law fails",
    "multi_layer": "parameters at 2 maps",
    "singular_fisher": "output Fisher singular",
    "fan_out": "not a sequential chain",
    "saturated": "under the cut-off",
}


@pytest.mark.parametrize("condition", sorted(COUNTEREXAMPLES))
@settings(max_examples=examples(2))
@given(seed=st.integers(0, 2**31 - 1))
def test_breaking_condition_has_counterexample(condition, seed):
    """Property 3: each breaking condition has generated counterexamples where modular and
    exact differ by more than ``MARGIN = 1e-3`` relative — an expanding map (``N·m > P``,
    non-isotropic Fisher), a composition violating the reverse-order law, parameters at
    two layers, a singular output Fisher with a representative that is not minimum-norm
    (``pin_last``), a weight shared by fan-out across a batch, a saturated activation.

    Condition: the builders in :data:`strategies.COUNTEREXAMPLES` (layer granularity);
    the modular result is finite, and ``rank_report`` says *not guaranteed* with a reason
    naming the condition.
    """
    case = COUNTEREXAMPLES[condition](seed)
    mod = modular(case, "layer")
    assert np.all(np.isfinite(flat(mod)))
    assert rel(mod, exact(case)) > MARGIN, case
    report = rank_report(case.model, case.params, case.x, case.family, granularity="layer")
    assert not report.exact
    assert any(REASON_PHRASES[condition] in r for r in report.reasons), report.reasons


# ---- property 5 (modular part): measured, not asserted -------------------------------------


@pytest.mark.parametrize("arch", range(len(REPARAM_ARCHS)))
def test_modular_function_step_under_reparametrisation_is_measured(arch, record_property):
    """Property 5, modular part: how much the modular rule's function-space step changes
    under ``W_ℓ = R V`` is *measured and reported* (``record_property`` and the census),
    not assumed. It must be finite; where both points are *exact by theorem* it must be
    invariant (≤ 1e-8 relative), as the exact answer is.
    """
    case = build_mlp_case(arch, modes=None, **REPARAM_ARCHS[arch])
    case2 = reparametrise(case, 0, seed=arch)
    s1 = function_step(case, modular(case, "layer"))
    s2 = function_step(case2, modular(case2, "layer"))
    change = float(np.linalg.norm(s1 - s2) / np.linalg.norm(s1))
    record_property("modular_function_step_change", change)
    assert np.isfinite(change)
    r1 = rank_report(case.model, case.params, case.x, case.family)
    r2 = rank_report(case2.model, case2.params, case2.x, case2.family)
    if r1.exact and r2.exact:
        assert change <= 1e-8


@pytest.mark.slow
@settings(max_examples=examples(40))
@given(case=mlp_cases(archs=ARCHS), granularity=st.sampled_from(GRANULARITIES))
def test_rank_report_exact_verdict_is_sound_all_architectures(case, granularity):
    """Property 2 on every architecture of :data:`strategies.ARCHS` (slow): an *exact by
    theorem* verdict implies modular = exact to ≤ 1e-8 relative."""
    report = rank_report(case.model, case.params, case.x, case.family, granularity=granularity)
    if report.exact:
        assert rel(modular(case, granularity), exact(case)) <= 1e-8, (case, str(report))
