"""``solver="auto"``: the decision logic on synthetic sizes, and the solve it delegates to.

The choice is tested on :class:`Facts` alone (no timings; the timings are
``benchmarks/bench.py --auto-grid``). The solve is checked against the dense
pseudo-inverse in float64 and float32, and CG's float32 defaults on the benchmark MLP.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natchain as nc
from natchain._problem import build_problem
from natchain._solvers import SOLVERS
from natchain._solvers.auto import CANDIDATES, ROUTES, Auto, Facts, choose, costs, facts_of

WITH_PCG = {**SOLVERS, "pcg": object}


def _facts(n, p, **kw):
    base = dict(
        n=n, m=10, r=9, p=p, bits=32, damped=True, kind="true", structured=p,
        gram_in=max(p // 138, 1), gram_out=138, dense_ok=p <= 8192,
    )  # fmt: skip
    return Facts(**{**base, **kw})


def test_auto_picks_by_size():
    """Small P: dense; large P, small N: gram; large N·r: an iterative route."""
    assert choose(_facts(64, 200)) == "cholesky"
    assert choose(_facts(8, 100_000)) == "gram"
    assert choose(_facts(2048, 100_000)) == "cg"
    # an undamped problem: only the direct routes give the minimum-norm answer
    for n, p in ((64, 200), (8, 100_000), (2048, 100_000), (2048, 500)):
        assert choose(_facts(n, p, damped=False)) in ("pinv", "gram")
        assert choose(_facts(n, p, damped=None)) in ("pinv", "gram")
    # the dense P × P matrix refused: never a dense route
    assert choose(_facts(64, 200, dense_ok=False)) not in ("cholesky", "pinv")


def test_auto_candidates_are_registered_names_and_pcg_is_one_entry():
    """Every candidate is a route code; "pcg" competes exactly when it is registered."""
    assert {c.name for c in CANDIDATES} <= set(ROUTES)
    big = _facts(2048, 100_000)
    assert "pcg" not in costs(big, SOLVERS) or "pcg" in SOLVERS
    assert "pcg" in costs(big, WITH_PCG)
    # Costed at its measured step counts (more than plain CG on low-rank Fishers), pcg loses
    # to cg wherever both apply; it competes, it is not preferred.
    assert costs(big, WITH_PCG)["pcg"] > costs(big, WITH_PCG)["cg"]
    assert choose(big, WITH_PCG) == "cg"
    assert choose(_facts(8, 100_000), WITH_PCG) == "gram"


def _wide_mlp(n, **kw):
    """The 784-128-10 MLP's facts (P = 101770): the dense product with ``C`` is factored for
    both layers while ``N < 2·128``, for the first only above (``N < 2·784``)."""
    layers = [(784, 128 + 128, 784 * 128 + 128), (128, 10 + 10, 128 * 10 + 10)]
    kept = [layer for layer in layers if n < 2 * layer[0]]
    factored = dict(
        factored=sum(c for *_, c in kept),
        factored_in=sum(a for a, *_ in kept),
        factored_out=sum(b for _, b, _ in kept),
    )
    return _facts(n, 101770, gram_in=912, gram_out=276, **{**factored, **kw})


def test_auto_picks_gram_cg_where_the_product_with_c_is_factored():
    """On the wide MLP the output-space CG's product costs ``N²·Σb`` against a CG step's
    two passes over ``P`` parameters, and its preconditioned step count grows as ``√N``:
    it wins from N = 32 on; never undamped (CG needs ``λ > 0``) and never where nothing is
    factored and ``N·r`` nears ``P``."""
    for n in (32, 128, 512):
        assert choose(_wide_mlp(n)) == "gram_cg", n
    assert choose(_wide_mlp(8)) == "gram"
    assert all(choose(_wide_mlp(n, damped=d)) == "gram" for n in (32, 512) for d in (False, None))
    assert choose(_facts(2048, 20_000)) == "cg"


def test_auto_costs_convolutions_at_their_measured_rates():
    """The MNIST-1D CNN's facts (P = 5210, forward 8.5e4 flops per example): costed as a
    dense network, CG wins at N = 128; with its convolutions' pass rate and CG step count
    (measured there: CG 1.2 s, Gram 0.19 s per step at N = 128), the Gram route does."""

    def cnn(n, conv):
        return _facts(n, 5210, gram_in=150, gram_out=85, conv=conv, flops=8.46e4 * n)

    assert choose(cnn(128, conv=False)) == "cg"
    assert choose(cnn(32, conv=True)) == "gram" and choose(cnn(128, conv=True)) == "gram"
    assert costs(cnn(128, True))["cg"] > 10 * costs(cnn(128, False))["cg"]


def test_auto_costs_grow_with_size():
    """Each route's estimate grows with N and with P (a sanity check of the formulas)."""
    for name in ("gram", "cg"):
        a, b, c = (costs(_facts(n, p))[name] for n, p in ((32, 10_000), (64, 10_000), (64, 40_000)))
        assert a < b < c, name
    assert costs(_facts(32, 1000))["cholesky"] < costs(_facts(32, 4000))["cholesky"]


def _mlp(params, x):
    h = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
    return h @ params[1]["w"] + params[1]["b"]


def _case(dtype, n=12, sizes=(5, 7, 4)):
    keys = jax.random.split(jax.random.PRNGKey(7), 5)
    params = [
        {
            "w": jax.random.normal(keys[i], (a, b), dtype) / float(np.sqrt(a)),
            "b": jnp.zeros(b, dtype),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]
    x = jax.random.normal(keys[3], (n, sizes[0]), dtype)
    y = jax.random.randint(keys[4], (n,), 0, sizes[-1])
    return params, x, y


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_auto_matches_the_dense_reference_and_reports_its_route(dtype):
    """auto equals the float64 dense pseudo-inverse; ``stats["route"]`` names its choice.

    Tolerances: ``1e-8`` relative in float64 (a damped 1e-2 system of condition ~1e2–1e3:
    round-off ~1e-13, kept loose for the route's own refinement); ``1e-3`` in float32
    (``cond · eps32 ≈ 1e3 · 1.2e-7``, times a safety factor of ~10).
    """
    fam = nc.Categorical()
    params64, x64, y = _case(jnp.float64)
    ref = nc.natural_gradient(_mlp, params64, x64, y, fam, solver="pinv", damping=1e-2)
    params, x = jax.tree_util.tree_map(lambda a: a.astype(dtype), (params64, x64))
    sol = nc.natural_gradient(_mlp, params, x, y, fam, solver="auto", damping=1e-2)
    assert int(sol.stats["result"]) == nc.RESULTS.successful
    assert float(sol.stats["residual"]) <= float(sol.stats["tol"])
    prob = dataclasses.replace(build_problem(_mlp, params, x, fam, y=y), damped=True)
    assert ROUTES[int(sol.stats["route"])] == Auto().route(prob)
    flat = jax.flatten_util.ravel_pytree
    err = jnp.linalg.norm(flat(sol.value)[0] - flat(ref.value)[0]) / jnp.linalg.norm(
        flat(ref.value)[0]
    )
    assert float(err) <= (1e-8 if dtype == jnp.float64 else 1e-3)
    assert facts_of(prob).structured == prob.num_params  # both dense layers recognised


def test_auto_refuses_bad_configuration():
    with pytest.raises(ValueError, match="max_params"):
        nc.natural_gradient(
            _mlp, *_case(jnp.float64), nc.Categorical(), solver="auto", max_params=0
        )


def test_cg_float32_defaults_converge_on_the_benchmark_mlp():
    """``solver="cg"`` at its defaults, float32, the 784-128-10 tanh MLP at batch 32.

    ``successful`` means the recomputed residual is at most the float32 default tolerance
    (5e-4); checked here directly as well.
    """
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    sizes = (784, 128, 10)
    params = [
        {"w": jax.random.normal(keys[i], (a, b), jnp.float32) / float(np.sqrt(a)),
         "b": jnp.zeros(b, jnp.float32)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]  # fmt: skip
    x = jax.random.normal(keys[2], (32, 784), jnp.float32)
    y = jax.random.randint(keys[3], (32,), 0, 10)
    sol = nc.natural_gradient(_mlp, params, x, y, nc.Categorical(), solver="cg", damping=1e-3)
    assert int(sol.stats["result"]) == nc.RESULTS.successful
    assert float(sol.stats["residual"]) <= nc.default_tol(jnp.float32)
    assert 0 < int(sol.stats["num_steps"]) < 200
