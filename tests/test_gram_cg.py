"""The iterative Gram route (``solver="gram_cg"``) against the dense reference, and its parts.

Exactness is the residual test, as for every iterative route: success is reported only
when the recomputed ``‖(F + λI) n − g‖ / ‖g‖`` is at most ``tol``, and the error of such
an answer is then at most ``κ(F + λI) ·`` that residual (:func:`cases.check_residual_bound`,
``κ`` reported by the dense reference). Its two pieces are exact identities and are checked
as such, to float64 round-off: the preconditioner's blocks are the diagonal blocks of
``C = Mᵀ J Jᵀ M`` as :func:`natchain._gram.factor_gram` builds it, and the matrix-free
product is ``C v``.
"""

from __future__ import annotations

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
    to32,
)

import natchain as nc
from natchain._gram import factor_gram, factor_gram_diagonal, site_data
from natchain._problem import build_problem
from natchain._solvers.gram_cg import gram_product

DAMPING = 1e-2
#: float64 residual test: κ · tol stays far below the comparisons' round-off (κ ≲ 1e4 here).
TOL64 = 1e-12
#: Identities computed two ways in float64: a few hundred ulps of the entries' size.
IDENTITY = 1e-12

#: Categorical tanh (N·m < P), Bernoulli ReLU with three layers, Gaussian ReLU.
GCG_CASES = [CASES[0], CASES[2], CASES[3]]
#: Equinox (per-example code under vmap: other example axes at every site) and a conv model;
#: Flax linen's batched Dense is the shared cases' spelling.
MODELS = {"equinox": small_equinox, "conv": small_conv}


def _args(case):
    return (case["model"], case["params"], case["x"], case["y"], case["family"])


@pytest.mark.parametrize("case", GCG_CASES, ids=[c["id"] for c in GCG_CASES])
def test_gram_cg_matches_dense_pinv_float64(case):
    args = _args(case)
    ref = nc.natural_gradient(*args, solver="pinv", damping=DAMPING)
    sol = nc.natural_gradient(*args, solver="gram_cg", damping=DAMPING, tol=TOL64)
    check_residual_bound(sol, ref, kappa_of(ref))
    assert int(sol.stats["structured_params"]) == case["num_params"]
    assert 1 <= int(sol.stats["num_steps"]) <= int(sol.stats["size"])


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_gram_cg_fisher_kinds(kind):
    """Monte-Carlo and empirical cotangents need not lie in the factor's range: the split
    ``b = M c̃ + z`` carries the rest, as on the Gram route (the true Fisher: above)."""
    case = CASES[3]
    args = _args(case)
    key = jax.random.PRNGKey(3)
    opts = dict(kind=kind, damping=DAMPING, key=key, num_samples=2)
    ref = nc.natural_gradient(*args, solver="pinv", **opts)
    sol = nc.natural_gradient(*args, solver="gram_cg", tol=TOL64, **opts)
    check_residual_bound(sol, ref, kappa_of(ref))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gram_cg_frameworks_and_conv_float64_and_float32(name):
    """Equinox, a conv model; float32 with its default tol and a float64 residual."""
    model, params, x = MODELS[name]()
    fam = nc.Categorical()
    y = jnp.asarray(np.random.default_rng(5).integers(0, 3, size=x.shape[0]))
    ref = nc.natural_gradient(model, params, x, y, fam, solver="pinv", damping=DAMPING)
    kappa = kappa_of(ref)
    sol = nc.natural_gradient(
        model, params, x, y, fam, solver="gram_cg", damping=DAMPING, tol=TOL64
    )
    check_residual_bound(sol, ref, kappa)
    sol32 = nc.natural_gradient(
        model, to32(params), to32(x), y, fam, solver="gram_cg", damping=DAMPING, check_float64=True
    )
    assert flat(sol32.value).dtype == jnp.float32
    assert float(sol32.stats["tol"]) == pytest.approx(nc.default_tol(jnp.float32))
    check_residual_bound(sol32, ref, kappa)


def _problem(model, params, x, y, family):
    return build_problem(model, params, x, family, y=y)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_preconditioner_blocks_are_the_diagonal_of_c(name):
    """Per example, the ``r × r`` block of ``C`` with itself — structured (each pattern's
    own Gram on one example) and from the materialised Jacobian."""
    if name == "mlp":
        case = CASES[2]
        prob = _problem(*_args(case))
    else:
        model, params, x = small_conv()
        prob = _problem(model, params, x, jnp.array([0, 1, 2]), nc.Categorical())
    n, _, r = prob.factor.shape
    cmat = np.asarray(jax.jit(lambda: factor_gram(prob, structured=False)[0])())
    cmat = cmat.reshape(n, r, n, r)
    want = np.stack([cmat[i, :, i, :] for i in range(n)])
    scale = np.abs(want).max()
    for structured in ("auto", False):
        got = np.asarray(jax.jit(lambda s=structured: factor_gram_diagonal(prob, structured=s))())
        assert np.abs(got - want).max() <= IDENTITY * scale


@pytest.mark.parametrize("batch", [2, 9])
def test_matrix_free_product_is_c_times_v(batch):
    """With the factored dense product (``N < 2a``) and without it (``N ≥ 2a``: that layer
    goes through the linearised model), ``gram_product(v) = C v``."""
    case = make_case("categorical", (4, 5, 3), "tanh", batch=batch, seed=2)
    prob = _problem(*_args(case))
    n, _, r = prob.factor.shape
    data = site_data(prob)
    offered = [site.pattern.gram_operator(site, d) is not None for site, d in data.values()]
    assert all(offered) == (batch < 2 * 4) and any(offered) == (batch < 2 * 5)
    v = jax.random.normal(jax.random.PRNGKey(0), (n, r))
    cmat = np.asarray(jax.jit(lambda: factor_gram(prob, structured=False)[0])())
    want = cmat @ np.asarray(v).reshape(-1)
    got = np.asarray(jax.jit(lambda v: gram_product(prob, site_data(prob))(v))(v)).reshape(-1)
    assert np.abs(got - want).max() <= IDENTITY * np.abs(cmat).max() * np.abs(v).max() * n * r


def test_block_jacobi_absorbs_per_example_scale():
    """Examples whose inputs differ in scale by 10⁴: the blocks of ``C`` carry that scale,
    which block-Jacobi divides out, and the output-space CG needs at most half the steps of
    plain CG in parameter space; both reach the reference."""
    case = make_case("categorical", (64, 3), "identity", batch=12, seed=4)  # N·r = 24 < P
    x = case["x"] * jnp.logspace(-2, 2, 12)[:, None]
    args = (case["model"], case["params"], x, case["y"], case["family"])
    damping = 1e-3
    ref = nc.natural_gradient(*args, solver="pinv", damping=damping)
    kappa = kappa_of(ref)
    cg = nc.natural_gradient(*args, solver="cg", damping=damping, tol=TOL64)
    gcg = nc.natural_gradient(*args, solver="gram_cg", damping=damping, tol=TOL64)
    check_residual_bound(cg, ref, kappa)
    check_residual_bound(gcg, ref, kappa)
    assert 2 * int(gcg.stats["num_steps"]) <= int(cg.stats["num_steps"])


def test_step_cap_is_reported_not_hidden():
    """One CG step cannot solve the system: the result says so, the value stays finite."""
    case = CASES[0]
    sol = nc.natural_gradient(*_args(case), solver="gram_cg", damping=DAMPING, maxiter=1)
    assert int(sol.stats["num_steps"]) == 1
    assert not bool(sol.stats["converged"])
    assert int(sol.stats["result"]) != int(nc.RESULTS.successful)
    assert bool(sol.stats["refined"])
    assert np.all(np.isfinite(flat(sol.value)))


def test_bad_options_and_inputs_raise_naming_the_argument():
    for kwargs, name in [
        ({"maxiter": 0}, "maxiter"),
        ({"maxiter": True}, "maxiter"),
        ({"tol": -1.0}, "tol"),
        ({"refine": -1}, "refine"),
        ({"structured": "yes"}, "structured"),
    ]:
        with pytest.raises(ValueError, match=name):
            nc.GramCG(**kwargs)
    with pytest.raises(ValueError, match="damping > 0"):
        nc.natural_gradient(*_args(CASES[0]), solver="gram_cg", damping=0.0)
    assert nc.SOLVERS["gram_cg"] is nc.GramCG
