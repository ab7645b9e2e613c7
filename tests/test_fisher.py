"""The Fisher operator: dense and matrix-free twins, PSD, and the three Fisher kinds (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CASES, flat

import natchain as nc


@pytest.mark.parametrize("case", CASES[:4], ids=[c["id"] for c in CASES[:4]])
@pytest.mark.parametrize("kind", ["true", "empirical", "mc"])
def test_fisher_vp_equals_dense_fisher(case, kind):
    """``fisher_vp(v) == fisher_matrix @ v`` to 1e-12 relative; ``F`` symmetric PSD."""
    args = (case["model"], case["params"], case["x"], case["family"])
    kw = dict(kind=kind, y=case["y"], key=jax.random.PRNGKey(1), num_samples=3)
    fisher = nc.fisher_matrix(*args, **kw)
    fvp = nc.fisher_vp(*args, **kw)
    v = jax.random.normal(jax.random.PRNGKey(2), (case["num_params"],))
    unravel = jax.flatten_util.ravel_pytree(case["params"])[1]
    np.testing.assert_allclose(flat(fvp(unravel(v))), fisher @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fisher, fisher.T, rtol=0, atol=1e-13)
    assert float(jnp.linalg.eigvalsh(fisher).min()) >= -1e-12 * float(jnp.abs(fisher).max())


def test_empirical_fisher_is_mean_of_per_example_score_outer_products():
    case = CASES[2]
    model, params, x, y, fam = (case[k] for k in ("model", "params", "x", "y", "family"))
    per_example = jax.vmap(
        lambda xi, yi: flat(jax.grad(lambda p: fam.nll(model(p, xi[None])[0], yi))(params))
    )(x, y)
    expected = per_example.T @ per_example / x.shape[0]
    got = nc.fisher_matrix(model, params, x, fam, kind="empirical", y=y)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_mc_fisher_error_falls_like_inverse_sqrt_samples():
    """Seeded: the mean relative error over 8 keys falls with slope −1/2 ± 0.15 in log–log."""
    case = CASES[0]
    args = (case["model"], case["params"], case["x"], case["family"])
    exact = nc.fisher_matrix(*args)
    sizes = [4, 64, 1024]
    errs = []
    for s in sizes:
        e = [
            float(jnp.linalg.norm(nc.fisher_matrix(*args, kind="mc", key=k, num_samples=s) - exact))
            for k in jax.random.split(jax.random.PRNGKey(0), 8)
        ]
        errs.append(np.mean(e) / float(jnp.linalg.norm(exact)))
    slope = np.polyfit(np.log(sizes), np.log(errs), 1)[0]
    assert -0.65 <= slope <= -0.35, (errs, slope)
