"""Output families: closed forms against expectations and KL Hessians (float64).

The closed-form Fisher is checked against ``E[s sᵀ]`` computed exactly: by enumeration
for Categorical and Bernoulli, by a truncated sum for Poisson (tail < 1e-15) and by
Gauss–Hermite quadrature for the Gaussians (exact: the integrand is a polynomial of
degree 4 in ``y``). Tolerance 1e-10 relative throughout unless stated.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natchain as nc

FAMILIES = {
    "categorical": (nc.Categorical(), 4),
    "bernoulli": (nc.Bernoulli(), 3),
    "gaussian": (nc.Gaussian(scale=0.6), 2),
    "hetero": (nc.GaussianHetero(), 4),
    "poisson": (nc.Poisson(), 2),
}
TOL = 1e-10


def _eta(name, seed=0):
    fam, m = FAMILIES[name]
    return jax.random.normal(jax.random.PRNGKey(seed), (m,)) * 0.8


def _support_with_weights(name, eta):
    """Every target (or quadrature node) with its probability weight."""
    fam, m = FAMILIES[name]
    if name == "categorical":
        return jnp.arange(m), jax.nn.softmax(eta)
    if name == "bernoulli":
        ys = jnp.array(list(itertools.product([0.0, 1.0], repeat=m)))
        p = jax.nn.sigmoid(eta)
        return ys, jnp.prod(jnp.where(ys == 1, p, 1 - p), axis=1)
    if name == "poisson":
        ks = jnp.arange(60.0)
        ys = jnp.array(list(itertools.product(ks, repeat=m)))
        lam = jnp.exp(eta)
        logw = ys * jnp.log(lam) - lam - jax.scipy.special.gammaln(ys + 1)
        return ys, jnp.exp(jnp.sum(logw, axis=1))
    nodes, weights = np.polynomial.hermite_e.hermegauss(6)  # weight exp(-z²/2)
    weights = weights / np.sqrt(2 * np.pi)
    if name == "gaussian":
        mu, sd = eta, jnp.full_like(eta, fam.scale)
    else:
        k = m // 2
        mu, sd = eta[:k], jnp.exp(eta[k:])
    grid = np.array(list(itertools.product(range(len(nodes)), repeat=len(mu))))
    ys = mu + sd * jnp.asarray(nodes[grid])
    return ys, jnp.prod(jnp.asarray(weights[grid]), axis=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_fisher_equals_expected_score_outer_product(name):
    fam, _ = FAMILIES[name]
    eta = _eta(name)
    ys, w = _support_with_weights(name, eta)
    scores = jax.vmap(fam.score, in_axes=(None, 0))(eta, ys)
    expected = jnp.einsum("k,ki,kj->ij", w, scores, scores)
    assert jnp.allclose(jnp.sum(w), 1.0, atol=1e-12)
    np.testing.assert_allclose(fam.fisher(eta), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_fisher_equals_kl_hessian(name):
    fam, _ = FAMILIES[name]
    eta = _eta(name, 1)
    hess = jax.hessian(lambda q: fam.kl(eta, q))(eta)
    np.testing.assert_allclose(fam.fisher(eta), hess, rtol=TOL, atol=TOL)
    assert abs(float(fam.kl(eta, eta))) <= 1e-14


@pytest.mark.parametrize("name", FAMILIES)
def test_fisher_sqrt_is_a_factor(name):
    fam, _ = FAMILIES[name]
    eta = _eta(name, 2)
    msq = fam.fisher_sqrt(eta)
    np.testing.assert_allclose(msq @ msq.T, fam.fisher(eta), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_natural_cotangent_is_minimum_norm_solution(name):
    """``F x = P g`` (``P`` projects out the null space) and ``x ⊥ null(F)``."""
    fam, m = FAMILIES[name]
    eta = _eta(name, 3)
    g = jax.random.normal(jax.random.PRNGKey(9), (m,))
    x = fam.natural_cotangent(eta, g)
    null = fam.null_space(eta)
    pg = g - null @ (null.T @ g)
    np.testing.assert_allclose(fam.fisher(eta) @ x, pg, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(null.T @ x, 0.0, atol=TOL)
    np.testing.assert_allclose(x, jnp.linalg.pinv(fam.fisher(eta)) @ g, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("rep", nc.Categorical.representatives)
def test_categorical_representatives_solve_the_same_system(rep):
    """Every representative solves ``F x = g̃``; they differ by a multiple of the ones vector."""
    fam = nc.Categorical(representative=rep)
    eta = _eta("categorical", 4)
    g = jax.random.normal(jax.random.PRNGKey(8), (4,))
    g = g - g.mean()
    x = fam.natural_cotangent(eta, g)
    np.testing.assert_allclose(fam.fisher(eta) @ x, g, rtol=TOL, atol=TOL)
    d = x - nc.Categorical().natural_cotangent(eta, g)
    np.testing.assert_allclose(d, d.mean(), atol=TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_mean_matches_distribution(name):
    """Sample mean of 20 000 seeded draws is within 5 standard errors of the mean of d(·|eta)."""
    fam, m = FAMILIES[name]
    eta = _eta(name, 5)
    ys = fam.sample(jax.random.PRNGKey(0), eta, (20000,))
    support, w = _support_with_weights(name, eta)
    if name == "categorical":
        ys = jax.nn.one_hot(ys, m)
        support = jax.nn.one_hot(support, m)
    mean = jnp.einsum("k,k...->...", w, support)
    var = jnp.einsum("k,k...->...", w, (support - mean) ** 2)
    assert jnp.all(jnp.abs(ys.mean(0) - mean) <= 5 * jnp.sqrt(var / 20000) + 1e-12)


def test_bad_family_configuration_is_refused():
    with pytest.raises(ValueError, match="representative"):
        nc.Categorical(representative="nope")
    with pytest.raises(ValueError, match="scale"):
        nc.Gaussian(scale=-1.0)
    with pytest.raises(ValueError, match="dim"):
        nc.GaussianHetero(dim=3)
    with pytest.raises(ValueError, match="dim"):
        nc.Categorical(dim=1)


def test_families_compare_by_configuration():
    assert nc.Gaussian(scale=2.0) == nc.Gaussian(scale=2.0)
    assert nc.Gaussian(scale=2.0) != nc.Gaussian(scale=1.0)
    assert hash(nc.Categorical()) == hash(nc.Categorical())


def test_categorical_target_checks_need_no_values():
    """Label dtype and the one-hot hint are checked from shapes alone (also under ``jit``)."""
    fam = nc.Categorical()
    eta = jax.ShapeDtypeStruct((4, 3), jnp.float32)

    def check(y):
        return jax.eval_shape(lambda t: fam.check_targets(t, eta), y)  # y is traced here

    with pytest.raises(ValueError, match="integer class labels"):
        check(jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError, match="class indices of shape"):
        check(jnp.zeros((4, 3), jnp.int32))
    check(jnp.zeros((4,), jnp.int32))  # accepted
