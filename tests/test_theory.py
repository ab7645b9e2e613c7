"""The right-inverse theorem of the natural chain rule and its corollaries, tested.

**Theorem (right inverse).** Let the model be a chain of maps (the records of
``natchain.modular_trace``), and let every map's Jacobian ``J_k`` — taken jointly over the
whole batch and with respect to its differentiated inputs only (data is never one) — have
full row rank. Then ``J_k J_k⁺ = I`` at every map. The modular rule sends ``n_y`` back as
``n_z = J_k⁺ n_y``; by induction from the input upwards the first-order change that the
parameter components ``m`` cause at each map's output is exactly that map's ``n_y``, so
``J m = n_eta`` with ``n_eta,i = F_eta⁺ g_eta,i``. Hence

    ``F_theta m = Jᵀ F_blk J m = Jᵀ F_blk n_eta = Jᵀ g_eta = g``

(``F_blk F_blk⁺ g_eta = g_eta`` because ``g_eta`` lies in the range of ``F_blk``, also for
softmax logits, whose score sums to zero): the modular direction ``m`` *is a* natural
gradient. The minimum-norm one ``e = F_theta⁺ g`` is the projection of ``m`` on
``range(F_theta)``, so ``m − e ∈ null(F_theta) = null(F_blk^{1/2} J)``: ``m − e ∈ null(J)``
for an invertible output Fisher, and for Categorical ``J(m − e)`` is a per-example shift of
the logits.

**Corollaries.** (1) On the batch, to first order, ``m`` changes the outputs as ``e`` does:
``J m = J e`` (centred logits for Categorical). (2) A KL trust region sees
``½ mᵀ F m = ½ eᵀ F e = ½ gᵀ e``: it cannot tell ``m`` from ``e``. (3) A dense layer fed by
data ``X`` has batch-joint Jacobian w.r.t. ``(W, b)`` with ``J Jᵀ = (X Xᵀ + 11ᵀ) ⊗ I_m``,
of full row rank iff ``rank [X 1] = N``; ``N ≤ d + 1`` is necessary, not sufficient.

Where the hypothesis fails (a data batch with ``rank [X 1] < N``), so does the conclusion:
``F m ≠ g``. The tests below check the theorem on generated models where the hypothesis
holds (verified map by map, with a margin), the failure where it does not, each
corollary, and that ``natchain.diagnostics.rank_report`` agrees with the theorem.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from strategies import Case, build_mlp_case, sample_targets

import natchain as nc
from natchain.diagnostics import modular_fn, rank_report

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

#: (architecture, granularity) pairs on which the hypothesis holds for generic Gaussian
#: weights and data. Layer granularity: the batch never exceeds ``d_in + 1`` (so
#: ``rank [X 1] = N``) and every hidden dense layer has ``Wᵀ W`` or ``H Hᵀ + 11ᵀ``
#: invertible. Primitive granularity splits ``x W`` from ``+ b``: the data-fed product
#: needs ``rank X = N``, so there ``N ≤ d_in``.
THEOREM_ARCHS = (
    (dict(widths=(), d_in=3, batch=4, activation="tanh"), "layer"),
    (dict(widths=(4,), d_in=3, batch=4, activation="tanh"), "layer"),
    (dict(widths=(5, 2), d_in=2, batch=3, activation="tanh"), "layer"),
    (dict(widths=(4,), d_in=3, batch=3, activation="identity"), "layer"),
    (dict(widths=(4,), d_in=3, batch=2, activation="tanh"), "primitive"),
    (dict(widths=(), d_in=3, batch=3, activation="tanh"), "primitive"),
)
FAMILIES = ("gaussian", "bernoulli", "poisson", "hetero", "categorical")
#: Families whose output Fisher is invertible and not a multiple of the identity (for a
#: Gaussian of fixed scale the single-map identity needs no full row rank at all).
NON_ISOTROPIC = ("bernoulli", "poisson", "hetero", "categorical")
#: Largest product of the local condition numbers accepted in a "hypothesis holds" draw.
KAPPA_MAX = 1e6


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], dtype=np.float64)


def quantities(case: Case, granularity: str = "layer"):
    """``m, e, F, g, J m, J e`` (``J·`` as ``(N, m)`` arrays) and the trace's map facts."""
    mod = modular_fn(case.model, case.family, granularity)(case.params, case.x, case.y)
    ex = nc.natural_gradient(*case.args, solver="pinv").value
    fisher = np.asarray(nc.fisher_matrix(case.model, case.params, case.x, case.family))

    def loss(p):
        return jnp.mean(jax.vmap(case.family.nll)(case.model(p, case.x), case.y))

    g = flat(jax.grad(loss)(case.params))

    def jvp(d):
        return np.asarray(jax.jvp(lambda p: case.model(p, case.x), (case.params,), (d,))[1])

    return dict(m=flat(mod), e=flat(ex), F=fisher, g=g, Jm=jvp(mod), Je=jvp(ex))


def map_facts(case: Case, granularity: str = "layer"):
    """Per map of the modular chain: ``(full row rank, σ_max/σ_min)`` of its local Jacobian.

    Full row rank is decided with a margin: the smallest singular value must exceed
    ``1e-8 σ_max`` (float64 local Jacobians of these small maps are accurate to ~1e-15
    relative, so a draw near the boundary cannot be misread).
    """
    facts = []
    for rec in nc.modular_trace(case.model, case.params, case.x, granularity=granularity):
        jk = np.asarray(rec.jacobian, dtype=np.float64)
        jk = jk.reshape(int(np.prod(rec.out_shape)), -1)
        s = np.linalg.svd(jk, compute_uv=False)
        full = jk.shape[0] <= jk.shape[1] and s[jk.shape[0] - 1] > 1e-8 * s[0]
        facts.append((bool(full), float(s[0] / s[min(jk.shape) - 1])))
    return facts


def centred(out: np.ndarray, family) -> np.ndarray:
    """Logits centred per example for Categorical (the softmax gauge), flattened."""
    if isinstance(family, nc.Categorical):
        out = out - out.mean(axis=1, keepdims=True)
    return out.reshape(-1)


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def data_rank(x) -> int:
    x = np.asarray(x)
    return int(np.linalg.matrix_rank(np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)))


@st.composite
def theorem_cases(
    draw, families=FAMILIES, granularities=("layer", "primitive"), activations=("tanh", "identity")
):
    """A generated case on which the hypothesis holds, with its granularity."""
    archs = [
        a for a in THEOREM_ARCHS if a[1] in granularities and a[0]["activation"] in activations
    ]
    arch, granularity = draw(st.sampled_from(archs))
    family = draw(st.sampled_from(families))
    case = build_mlp_case(draw(st.integers(0, 2**31 - 1)), family=family, **arch)
    case.granularity = granularity
    return case


def affine_batch(case: Case) -> Case:
    """The same model with the last example replaced by the mean of the first two:
    ``N ≤ d + 1`` still, but ``rank [X 1] = N − 1``."""
    x = case.x.at[-1].set(0.5 * (case.x[0] + case.x[1]))
    y = sample_targets(case.family, case.model(case.params, x), case.meta["seed"])
    return Case(case.model, case.params, x, y, case.family, dict(case.meta, affine=True))


# ---- the theorem where its hypothesis holds ---------------------------------------------


@settings(max_examples=8)
@given(case=theorem_cases())
def test_theorem_modular_direction_solves_the_natural_gradient_equation(case):
    """Every map of full row rank ⇒ ``F m = g`` (``m`` is *a* natural gradient).

    Tolerance: ``‖F m − g‖/‖g‖ ≤ 1e3 · κ · ε₆₄`` with ``κ`` the product of the local
    condition numbers (each backward step loses at most a factor ``cond(J_k)`` of relative
    accuracy; the factor 1e3 covers the few sums per step and forming ``F``). ``κ`` is
    asserted ``≤ 1e6``, so the tolerance never exceeds ``2.2e-7`` — below the ``1e-6`` by
    which ``test_theorem_fails_where_the_data_rank_condition_fails`` requires failure.
    """
    granularity = case.granularity
    facts = map_facts(case, granularity)
    assert all(full for full, _ in facts), (case, facts)  # the hypothesis holds by design
    kappa = float(np.prod([c for _, c in facts]))
    assert kappa <= KAPPA_MAX, (case, facts)
    q = quantities(case, granularity)
    residual = relative(q["F"] @ q["m"], q["g"])
    assert residual <= 1e3 * kappa * EPS64, (case, residual, kappa)
    # Corollary: m − e lies in null(F): e is the projection of m on range(F).
    assert np.linalg.norm(q["F"] @ (q["m"] - q["e"])) <= 1e3 * kappa * EPS64 * np.linalg.norm(
        q["g"]
    )


@settings(max_examples=5)
@given(case=theorem_cases(granularities=("layer",)))
def test_theorem_function_space_equality_on_the_batch(case):
    """Corollary 1: ``J m = n_eta`` and ``C J m = C J e`` (``C``: logit centring for
    Categorical, ``I`` otherwise); for an invertible output Fisher ``J m = J e`` itself.

    Tolerance ``1e3 · κ · ε₆₄`` as above: ``J m`` is the forward image of the backward chain
    of pseudo-inverses, each accurate to ``cond(J_k) ε₆₄`` relative.
    """
    facts = map_facts(case)
    assert all(full for full, _ in facts), (case, facts)
    tol = 1e3 * float(np.prod([c for _, c in facts])) * EPS64
    q = quantities(case)
    fam = case.family
    scores = jax.vmap(jax.grad(fam.nll))(case.model(case.params, case.x), case.y)
    n_eta = np.asarray(jax.vmap(fam.natural_cotangent)(case.model(case.params, case.x), scores))
    assert relative(q["Jm"].reshape(-1), n_eta.reshape(-1)) <= tol, case
    assert relative(centred(q["Jm"], fam), centred(q["Je"], fam)) <= tol, case
    if not isinstance(fam, nc.Categorical):
        assert relative(q["Jm"].reshape(-1), q["Je"].reshape(-1)) <= tol, case


@settings(max_examples=4)
@given(case=theorem_cases(granularities=("layer",)))
def test_theorem_kl_trust_region_cannot_see_the_excess(case):
    """Corollary 2: ``mᵀ F m = eᵀ F e = gᵀ e``, and the second-order KL along ``m`` is
    ``½ mᵀ F m``: a trust region on the KL scales ``m`` and ``e`` alike.

    Tolerance ``1e3 · κ · ε₆₄`` relative for the quadratic forms (they inherit the residual
    of ``F m = g``); the KL's second derivative is computed by forward-over-reverse autodiff
    of the family's closed-form KL, exact to rounding: ``1e-10`` relative.
    """
    facts = map_facts(case)
    assert all(full for full, _ in facts), (case, facts)
    tol = 1e3 * float(np.prod([c for _, c in facts])) * EPS64
    q = quantities(case)
    m, e, fisher, g = q["m"], q["e"], q["F"], q["g"]
    qe = float(e @ fisher @ e)
    assert abs(float(m @ fisher @ m) - qe) <= tol * qe, case
    assert abs(float(g @ e) - qe) <= tol * qe, case

    mod = modular_fn(case.model, case.family, "layer")(case.params, case.x, case.y)
    eta0 = case.model(case.params, case.x)

    def kl_along(t):
        p = jax.tree.map(lambda a, d: a + t * d, case.params, mod)
        return jnp.mean(jax.vmap(case.family.kl)(eta0, case.model(p, case.x)))

    second = float(jax.grad(jax.grad(kl_along))(0.0))
    assert abs(second - float(m @ fisher @ m)) <= 1e-10 * abs(second), case


def test_theorem_direction_is_a_natural_gradient_not_the_minimum_norm_one():
    """The theorem's content is not ``m = e``: on a two-layer tanh MLP (softmax outputs,
    batch 2, every map of full row rank) the modular step is far from the minimum-norm one
    in parameter space and longer, yet solves ``F n = g``.

    Tolerances: ``cos < 0.99`` and ``‖m‖ > 1.01 ‖e‖`` are loose bounds on this fixed draw
    (measured cos ≈ 0.6); ``1e-10`` relative for the residual (float64, κ ≈ 1e2 here).
    """
    case = build_mlp_case(3, family="categorical", widths=(4,), d_in=3, batch=2)
    assert all(full for full, _ in map_facts(case))
    q = quantities(case)
    m, e = q["m"], q["e"]
    assert float(m @ e) / (np.linalg.norm(m) * np.linalg.norm(e)) < 0.99
    assert np.linalg.norm(m) > 1.01 * np.linalg.norm(e)
    assert relative(q["F"] @ m, q["g"]) <= 1e-10


def test_theorem_categorical_function_error_uncentred_is_a_gauge_artefact():
    """For softmax outputs ``J(m − e)`` is a per-example logit shift: uncentred it can be
    large, centred it is rounding error. (An agreement metric must centre the logits.)

    Tolerances: the uncentred error exceeds ``1e-2`` on this fixed draw (a shift of order
    one, measured ≈ 0.3); centred ``1e-10`` (float64, κ ≈ 1e2).
    """
    case = build_mlp_case(3, family="categorical", widths=(4,), d_in=3, batch=2)
    q = quantities(case)
    diff = q["Jm"] - q["Je"]
    assert relative(q["Jm"].reshape(-1), q["Je"].reshape(-1)) > 1e-2
    assert np.linalg.norm(diff - diff.mean(axis=1, keepdims=True)) <= 1e-10 * np.linalg.norm(
        q["Je"]
    )


@pytest.mark.parametrize("representative", ["ratio", "pin_last"])
def test_theorem_holds_for_every_softmax_representative(representative):
    """Any ``n_eta`` with ``F_eta n_eta = g_eta`` gives ``F m = g``: the representative
    changes ``m`` (by a null-space component), never whether it is a natural gradient.

    Tolerance ``1e-10`` relative (float64, κ ≈ 1e2 on this draw).
    """
    case = build_mlp_case(
        3,
        family="categorical",
        widths=(4,),
        d_in=3,
        batch=2,
        family_options={"representative": representative},
    )
    q = quantities(case)
    assert relative(q["F"] @ q["m"], q["g"]) <= 1e-10


def test_theorem_holds_in_float32():
    """The same statement in float32 (parameters, data and the modular rule in float32):
    ``‖F m₃₂ − g‖/‖g‖`` is float32 rounding through the chain.

    Tolerance ``1e3 · κ · ε₃₂`` (as in float64, with ε₃₂ = 1.2e-7); F and g are formed in
    float64 so that the residual measures ``m₃₂`` alone.
    """
    case = build_mlp_case(5, family="bernoulli", widths=(4,), d_in=3, batch=4)
    facts = map_facts(case)
    assert all(full for full, _ in facts)
    kappa = float(np.prod([c for _, c in facts]))
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), case.params)
    x32 = case.x.astype(jnp.float32)
    mod32 = nc.grad(case.model, case.family)(p32, x32, case.y.astype(jnp.float32))
    assert flat(mod32).dtype == np.float64  # flat casts; check the computation's dtype:
    assert jax.tree.leaves(mod32)[0].dtype == jnp.float32
    q = quantities(case)
    residual = relative(q["F"] @ flat(mod32), q["g"])
    assert residual <= 1e3 * kappa * EPS32, (residual, kappa)
    assert residual > 1e3 * kappa * EPS64  # it is float32 arithmetic that was measured


# ---- the hypothesis fails, and so does the conclusion --------------------------------------


@settings(max_examples=4)
@given(
    case=theorem_cases(
        families=NON_ISOTROPIC, granularities=("layer",), activations=("tanh",)
    ).filter(lambda c: c.meta["batch"] >= 3),
)
def test_theorem_fails_where_the_data_rank_condition_fails(case):
    """The same models with one example the mean of two others (``N ≤ d + 1`` still,
    ``rank [X 1] = N − 1``): the data-fed dense map loses full row rank and ``F m ≠ g``.

    The size of the failure depends on the draw (measured from ``2e-4`` to ``0.6`` relative
    on these tanh architectures: the modular step cannot give the dependent example the
    output change its own target asks for); the test asserts ``> 1e-6``, above the largest
    tolerance of the passing tests (``2.2e-7``), so a pass there and a failure here cannot be
    confused. Affine models are left out: for them ``eta_3 = (eta_1 + eta_2)/2`` for every
    ``theta``, the exact step is bound by the same constraint, and the failure can be as
    small as ``2e-6``. ``rank_report`` must see the broken hypothesis too.
    """
    bad = affine_batch(case)
    n = bad.x.shape[0]
    assert n <= bad.x.shape[1] + 1 and data_rank(bad.x) == n - 1
    facts = map_facts(bad)
    assert not facts[-1][0]  # the data-fed (last in backward order) map: not full row rank
    q = quantities(bad)
    assert relative(q["F"] @ q["m"], q["g"]) > 1e-6, bad
    report = rank_report(bad.model, bad.params, bad.x, bad.family)
    assert not report.maps[-1].full_row_rank
    assert not report.function_space_exact and not report.exact


def test_theorem_fails_past_the_batch_threshold():
    """Generic data, ``N = d + 2`` examples: ``rank [X 1] = d + 1 < N`` and ``F m ≠ g``
    (by more than the largest passing tolerance: ``> 1e-6``, as above)."""
    case = build_mlp_case(1, family="bernoulli", widths=(4,), d_in=3, batch=5)
    assert data_rank(case.x) == 4
    assert not map_facts(case)[-1][0]
    q = quantities(case)
    assert relative(q["F"] @ q["m"], q["g"]) > 1e-6


# ---- the rank condition, precisely --------------------------------------------------------

#: Data constructions: (name, N, d, rank [X 1]).
DATA_KINDS = (
    ("generic", 3, 3, 3),  # N ≤ d + 1, full rank
    ("generic", 4, 3, 4),  # N = d + 1, full rank
    ("generic", 5, 3, 4),  # N > d + 1
    ("affine", 4, 3, 3),  # N ≤ d + 1 but one example the mean of two others
    ("affine", 3, 3, 2),  # the counterexample with N < d + 1
    ("duplicate", 2, 3, 1),  # a repeated example
)


def make_data(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    if kind == "affine":
        x[-1] = 0.5 * (x[0] + x[1])
    elif kind == "duplicate":
        x[-1] = x[0]
    return x


@pytest.mark.parametrize("spec", DATA_KINDS, ids=lambda k: f"{k[0]}-N{k[1]}-d{k[2]}")
@settings(max_examples=2)
@given(m=st.sampled_from((2, 3)), seed=st.integers(0, 2**31 - 1))
def test_data_fed_dense_layer_rank_condition(spec, m, seed):
    """Corollary 3: the batch-joint Jacobian of ``X W + b`` w.r.t. ``(W, b)`` (as the
    modular rule takes it: ``X`` is data) satisfies ``J Jᵀ = (X Xᵀ + 11ᵀ) ⊗ I_m`` — to
    ``1e-12`` relative (a product of small float64 matrices) — so its rank is
    ``m · rank [X 1]`` and it has full row rank iff ``rank [X 1] = N``; ``rank_report``'s
    map facts say the same.
    """
    kind, n, d, expected = spec
    x = make_data(kind, n, d, seed)
    rank = data_rank(x)
    assert rank == expected
    rng = np.random.default_rng(seed + 1)
    params = [{"W": jnp.asarray(rng.standard_normal((d, m))), "b": jnp.asarray(np.zeros(m))}]
    model = make_mlp("tanh")
    (rec,) = nc.modular_trace(model, params, jnp.asarray(x))
    jac = np.asarray(rec.jacobian).reshape(n * m, -1)
    assert jac.shape[1] == d * m + m  # (W, b) only: the data is not differentiated
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    kernel = np.kron(xb @ xb.T, np.eye(m))
    assert np.linalg.norm(jac @ jac.T - kernel) <= 1e-12 * np.linalg.norm(kernel)
    assert np.linalg.matrix_rank(jac) == m * rank
    report = rank_report(model, params, jnp.asarray(x), nc.Bernoulli())
    assert report.maps[0].full_row_rank == (rank == n) == (expected == n)
    if kind != "generic":
        assert n <= d + 1 and not report.maps[0].full_row_rank  # N ≤ d + 1 is not enough


# ---- rank_report agrees with the theorem ----------------------------------------------------


@settings(max_examples=6)
@given(case=theorem_cases(granularities=("layer",)), affine=st.booleans())
def test_rank_report_function_space_verdict_agrees_with_the_theorem(case, affine):
    """``rank_report``'s map facts are the theorem's hypothesis, and its
    ``function_space_exact`` flag is the theorem's conclusion where it claims one:

    - every map of full row rank (its facts) ⇔ every map of full row rank (our SVD check);
    - with an invertible output Fisher, ``function_space_exact`` ⇔ the hypothesis, and then
      ``F m = g`` (tolerance ``1e3 · κ · ε₆₄``, as above);
    - with softmax outputs the flag stays ``False`` (it claims ``J m = J e``, true only up
      to logit shifts), while the theorem still gives ``F m = g``.
    """
    if affine and case.meta["batch"] >= 3:
        case = affine_batch(case)
    facts = map_facts(case)
    holds = all(full for full, _ in facts)
    report = rank_report(case.model, case.params, case.x, case.family)
    assert [r.full_row_rank for r in report.maps] == [full for full, _ in facts]
    q = quantities(case)
    residual = relative(q["F"] @ q["m"], q["g"])
    if isinstance(case.family, nc.Categorical):
        assert report.output_fisher_singular and not report.function_space_exact
    else:
        assert report.function_space_exact == holds, (case, str(report))
    if holds:
        assert residual <= 1e3 * float(np.prod([c for _, c in facts])) * EPS64
    elif case.meta["family"] != "gaussian" and case.meta["activation"] == "tanh":
        # The hypothesis is sufficient, not necessary: with an isotropic output Fisher
        # (Gaussian of fixed scale) a linear chain solves F n = g without it, and affine
        # models can come close (see the test above). Elsewhere the conclusion fails by more
        # than the largest passing tolerance.
        assert residual > 1e-6, case
