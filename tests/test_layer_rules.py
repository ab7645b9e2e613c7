"""The dense layer's closed-form rule against the dense pseudo-inverse of its local Jacobian.

:func:`natchain._modular._layers.dense_rule` never forms the ``N·m × in`` Jacobian; the
reference is :func:`natchain.generic_rule` on the same map (SVD of the materialised
Jacobian), with the same cut-off. Both the answer and the statistics (rank, ``num_cut``,
condition) must agree, on every branch of the closed form: a tall ``[H 1]`` (``N ≥ c``,
rank-deficient ``K`` when ``N > d + 1``), a wide one (Gram factorisation, certified), and
the accurate fall-back a rank-deficient wide one takes (duplicated examples), a zero column
of ``W``, a ``W`` with fewer rows than columns, no bias, and an explicit ``rcond`` that cuts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natchain as nc
from natchain._modular._core import LocalMap
from natchain._modular._layers import dense_rule
from tests.cases import rel_err


def _draw(seed, rows, d, m, dtype=jnp.float64, duplicate=False, zero_col=False):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = jax.random.normal(k[0], (rows, d), dtype)
    if duplicate:  # two equal examples: K = [H 1][H 1]ᵀ singular whatever N and d are
        h = h.at[1].set(h[0])
    w = jax.random.normal(k[1], (d, m), dtype) / float(np.sqrt(d))  # a weak scalar
    if zero_col:  # a dead output unit: Q = WᵀW singular
        w = w.at[:, 0].set(0.0)
    b = 0.1 * jax.random.normal(k[2], (m,), dtype)
    n = jax.random.normal(k[3], (rows, m), dtype)
    return h, w, b, n


def _local(h, w, b, h_diff, rcond):
    primals = (h, w) if b is None else (h, w, b)
    diff = (h_diff, True) if b is None else (h_diff, True, True)

    def fn(*d):
        it = iter(d)
        hh = next(it) if h_diff else h
        ww = next(it)
        out = hh @ ww
        if b is not None:
            out = out + next(it)
        return (out,)

    return LocalMap("dense", primals, diff, (h @ w if b is None else h @ w + b,), {}, fn, rcond)


def _rules(h, w, b, n, h_diff, rcond):
    got = dense_rule(h, w, b, h_diff, False, n, rcond)
    ref = nc.generic_rule(_local(h, w, b, h_diff, rcond), (n,))
    return got, ref


_both = jax.jit(_rules, static_argnums=(4, 5))  # one program for both, per case

# (name, rows N, d, m, h_diff, bias, duplicate, zero column, rcond)
CASES = [
    ("wide, activation", 3, 5, 2, True, True, False, False, None),
    ("wide, activation, m > 16 (eigh of K)", 3, 6, 17, True, True, False, False, None),
    ("tall N > d+1, activation", 8, 3, 4, True, True, False, False, None),
    ("wide, data", 4, 6, 3, False, True, False, False, None),
    ("tall N > d+1, data", 9, 3, 2, False, True, False, False, None),
    ("wide, duplicated examples, data", 4, 8, 3, False, True, True, False, None),
    ("wide, duplicated examples, activation", 4, 8, 3, True, True, True, False, None),
    ("tall, zero column of W", 7, 3, 3, True, True, False, True, None),
    ("wide, duplicated examples and zero column of W", 4, 8, 3, True, True, True, True, None),
    ("wide, zero column of W", 3, 6, 3, True, True, False, True, None),
    ("W with d < m", 6, 2, 5, True, True, False, False, None),
    ("no bias, tall", 6, 3, 2, True, False, False, False, None),
    ("no bias, wide data", 3, 5, 2, False, False, False, False, None),
    ("rcond cuts, tall", 8, 3, 4, True, True, False, False, 0.3),
    ("rcond cuts, wide data", 4, 6, 3, False, True, False, False, 0.5),
]


def _check(case, dtype):
    """Both rules on the case's draw, rounded to ``dtype`` (the same numbers in either)."""
    _, rows, d, m, h_diff, bias, dup, zero, rcond = case
    draw = _draw(rows * 100 + d * 10 + m, rows, d, m, jnp.float32, dup, zero)
    h, w, b, n = (a.astype(dtype) for a in draw)
    (got, gst), (ref, rst) = _both(h, w, b if bias else None, n, h_diff, rcond)
    return got, gst, ref, rst


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dense_rule_matches_generic_float64(case):
    got, gst, ref, rst = _check(case, jnp.float64)
    # float64: the rule goes through singular values of [H 1] and W, or (wide, certified)
    # Cholesky/eigh of the N × N Gram K, whose error is ≲ cond(K) · eps; these draws have
    # cond(J) ≲ 30 (checked below), so ~1e-13; 1e-10 leaves a margin of ~1000×.
    assert rel_err(got, ref) <= 1e-10
    assert int(gst.rank) == int(rst.rank)
    assert int(gst.num_cut) == int(rst.num_cut)
    assert float(rst.condition) <= 30.0
    np.testing.assert_allclose(float(gst.condition), float(rst.condition), rtol=1e-8)


def test_rank_deficient_cases_do_cut():
    """The rank-deficient rows really cut singular values (the comparison is not vacuous)."""
    cut = {c[0]: int(_check(c, jnp.float64)[1].num_cut) for c in CASES}
    for name in (
        "tall N > d+1, activation",
        "wide, duplicated examples, data",
        "wide, duplicated examples and zero column of W",
        "W with d < m",
        "tall, zero column of W",
        "rcond cuts, tall",
        "rcond cuts, wide data",
    ):
        assert cut[name] > 0, name
    # a zero column of W with a wide [H 1] (every λ_a > 0), or duplicated examples with a
    # full-rank W (every σ_j > 0): every sum λ_a + σ_j > 0, nothing is cut
    assert cut["wide, zero column of W"] == cut["wide, duplicated examples, activation"] == 0
    # H data and N > d + 1: J = [H 1] ⊗ I has full column rank, the null rows are not "cut"
    assert cut["tall N > d+1, data"] == 0


@pytest.mark.parametrize("case", CASES[:11], ids=[c[0] for c in CASES[:11]])
def test_dense_rule_float32(case):
    """float32 against the float64 reference: kept singular values with cond(J) ≲ 30."""
    got, gst, _, _ = _check(case, jnp.float32)
    _, _, ref, rst = _check(case, jnp.float64)
    # float32 rule against the exact (float64) answer. Its error is at most ~cond(J)² · eps32
    # on the Gram branch (≲ 900 · 1.2e-7 ≈ 1e-4 in the worst case here, ~1e-5 typically)
    # and ~cond(J) · eps32 on the SVD branches; cond(J) ≤ 30 is asserted in float64 above.
    assert all(g.dtype == jnp.float32 for g in got)
    assert rel_err(got, ref) <= 3e-4
    assert int(gst.rank) == int(rst.rank)
    assert int(gst.num_cut) == int(rst.num_cut)


def test_dense_rule_at_a_size_where_the_closed_form_is_cheaper():
    """N·m = 320 rows, 1160 columns: the generic SVD is ~100× the closed form's flops."""
    for rows, d, m, h_diff in ((40, 24, 8, True), (20, 60, 16, False)):
        h, w, b, n = _draw(rows + d, rows, d, m)
        (got, gst), (ref, rst) = _both(h, w, b, n, h_diff, None)
        # float64, random well-conditioned draws (condition printed in a failure): as above
        assert rel_err(got, ref) <= 1e-10, float(rst.condition)
        assert (int(gst.rank), int(gst.num_cut)) == (int(rst.rank), int(rst.num_cut))


def test_model_level_default_cut_matches_generic_rule():
    """Through natchain.grad: the dense maps' statistics are those of the generic rule."""
    from tests.cases import init_mlp, make_mlp

    model = make_mlp("tanh")
    params = init_mlp(jax.random.PRNGKey(3), (4, 6, 3))
    x = jax.random.normal(jax.random.PRNGKey(4), (9, 4))  # N = 9 > d + 1 = 5: K singular
    y = jax.random.randint(jax.random.PRNGKey(5), (9,), 0, 3)
    nat, stats = nc.grad(model, nc.Categorical(), return_stats=True)(params, x, y)
    records = nc.modular_trace(model, params, x)
    dense = [r for r in records if r.kind == "dense"]
    maps = [v for k, v in sorted(stats["maps"].items()) if "_dense_" in k]
    assert len(dense) == len(maps) == 2
    for rec, st in zip(dense, maps, strict=True):
        s = np.linalg.svd(np.asarray(rec.jacobian), compute_uv=False)
        rc = max(rec.jacobian.shape) * np.finfo(np.float64).eps
        rank = int(np.sum(s > rc * s[0]))
        assert int(st["rank"]) == rank
        assert int(st["num_cut"]) == min(rec.jacobian.shape) - rank
        # the kept singular values' ratio, from SVDs of the factors vs of J: float64, 1e-8
        np.testing.assert_allclose(float(st["condition"]), s[0] / s[rank - 1], rtol=1e-8)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(nat))
