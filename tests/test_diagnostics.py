"""Unit tests of ``natchain.diagnostics``: Greville's test, ``compare``, ``rank_report``.

Tolerances (float64): identities of exact directions to ≤ 1e-10 relative; Greville's
predicate with its default ``tol = 1e-8``. The property-based checks are in
``test_properties.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategies import build_mlp_case, exact_prone_case, multi_layer_case

import natchain as nc
from natchain.diagnostics import (
    EXACT,
    NOT_GUARANTEED,
    compare,
    greville_test,
    rank_report,
    reverse_order_law_holds,
)

CLASSIC_A = [[1.0, 0.0], [0.0, 0.0]]
CLASSIC_B = [[2.0, 1.0], [1.0, 2.0]]


# ---- reverse_order_law_holds ---------------------------------------------------------------


def test_reverse_order_law_refuses_classic_counterexample():
    """``A = [[1,0],[0,0]]``, ``B = [[2,1],[1,2]]``: ``(AB)⁺ ≠ B⁺A⁺`` and the test says so."""
    a, b = np.array(CLASSIC_A), np.array(CLASSIC_B)
    assert np.linalg.norm(np.linalg.pinv(a @ b) - np.linalg.pinv(b) @ np.linalg.pinv(a)) > 0.1
    assert reverse_order_law_holds(a, b) is False
    test = greville_test(a, b)
    assert test.residual_left > 0.1 and test.rank_a == 1 and test.rank_b == 2


def test_reverse_order_law_sufficient_cases_hold():
    """Orthonormal rows of ``B``, orthonormal columns of ``A``, full column × full row rank."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((5, 3)))[0]
    assert reverse_order_law_holds(rng.standard_normal((4, 3)), q.T)  # B: 3×5, BBᵀ = I
    assert reverse_order_law_holds(q, rng.standard_normal((3, 2)))  # A: 5×3, AᵀA = I
    assert reverse_order_law_holds(rng.standard_normal((5, 3)), rng.standard_normal((3, 4)))
    assert not reverse_order_law_holds(rng.standard_normal((3, 5)), rng.standard_normal((5, 2)))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_reverse_order_law_is_scale_invariant(scale):
    """Scaling either factor never changes the answer (relative tolerances)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 5)), rng.standard_normal((5, 2))
    assert reverse_order_law_holds(scale * a, b) is False
    assert reverse_order_law_holds(np.array(CLASSIC_A) * scale, np.eye(2) / scale) is True


def test_reverse_order_law_zero_factor_and_stacks():
    """A zero factor passes (``AB = 0 = B⁺A⁺``); stacks give a boolean array."""
    assert reverse_order_law_holds(np.zeros((2, 3)), np.ones((3, 2)))
    stack_a = np.stack([np.array(CLASSIC_A), np.eye(2)])
    stack_b = np.stack([np.array(CLASSIC_B), np.array(CLASSIC_B)])
    np.testing.assert_array_equal(reverse_order_law_holds(stack_a, stack_b), [False, True])


@pytest.mark.parametrize(
    "a, b, tol, exc, words",
    [
        (np.ones((2, 3)), np.ones((2, 2)), 1e-8, ValueError, ["A", "B", "3 columns", "2 rows"]),
        (np.array([[np.nan, 1.0]]), np.ones((2, 1)), 1e-8, ValueError, ["A", "non-finite"]),
        (np.ones((1, 2)), np.array([[np.inf], [1.0]]), 1e-8, ValueError, ["B", "non-finite"]),
        (np.ones((2, 2)), np.ones((2, 2)), 0.0, ValueError, ["tol", "> 0"]),
        (np.ones((2, 2)), np.ones((2, 2)), -1e-3, ValueError, ["tol"]),
        (np.ones((2, 2)), np.ones((2, 2)), float("nan"), ValueError, ["tol"]),
        (np.ones((2, 2)), np.ones((2, 2)), "small", TypeError, ["tol"]),
        (np.ones(3), np.ones((3, 1)), 1e-8, ValueError, ["A", "matrix"]),
        (np.array([["a", "b"]]), np.ones((2, 1)), 1e-8, TypeError, ["A", "real numbers"]),
    ],
)
def test_reverse_order_law_refuses_bad_input(a, b, tol, exc, words):
    """Mismatched shapes, non-finite entries, ``tol ≤ 0``: refused, naming the argument."""
    with pytest.raises(exc) as info:
        reverse_order_law_holds(a, b, tol)
    for word in words:
        assert word in str(info.value)


# ---- compare -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case():
    return build_mlp_case(3, family="bernoulli", activation="tanh", widths=(4,), d_in=3, batch=2)


def test_compare_exact_routes_agree_and_natural_gradient_identities(case):
    """pinv and Gram agree everywhere; for the exact natural gradient ``gᵀn = nᵀFn``
    (so the first-order decrease is twice the second-order KL) and it is a descent
    direction, as is the plain gradient."""
    res = compare(*case.args, methods=("exact:pinv", "exact:gram", "sgd"))
    pair = res.pairs[("exact:pinv", "exact:gram")]
    assert pair.cosine == pytest.approx(1.0, abs=1e-10)
    assert pair.relative_error <= 1e-10
    assert pair.function_relative_error <= 1e-10 and pair.fisher_relative_error <= 1e-10
    s = res.summaries["exact:pinv"]
    assert s.loss_decrease == pytest.approx(2 * s.kl, rel=1e-10)
    assert s.descent and res.summaries["sgd"].descent
    assert res.labels == ("exact:pinv", "exact:gram", "sgd")
    assert set(res.pairs) == {
        ("exact:pinv", "exact:gram"),
        ("exact:pinv", "sgd"),
        ("exact:gram", "sgd"),
    }
    assert "exact:gram" in res.to_markdown()


def test_compare_accepts_callables_pytrees_and_mappings(case):
    """Methods as a callable, a direction pytree, and a mapping label → spec."""
    nat = nc.natural_gradient(*case.args)

    def my_method(params, x, y):
        return jax.tree_util.tree_map(lambda v: 2.0 * v, nat.value)

    res = compare(*case.args, methods={"ref": nat.value, "twice": my_method, "neg": "exact"})
    assert res.pairs[("ref", "twice")].cosine == pytest.approx(1.0, abs=1e-12)
    assert res.pairs[("ref", "twice")].relative_error == pytest.approx(1.0, rel=1e-12)
    assert res.pairs[("ref", "neg")].relative_error <= 1e-10
    neg = jax.tree_util.tree_map(lambda v: -v, nat.value)
    res = compare(*case.args, methods=[my_method, neg])
    assert res.labels == ("my_method", "direction1")
    assert not res.summaries["direction1"].descent


def test_compare_modular_on_an_exact_model():
    """On a model exact by theorem, ``modular:layer`` agrees with ``exact`` to ≤ 1e-10."""
    c = exact_prone_case(0, "tanh")
    res = compare(*c.args, methods=("exact", "modular:layer", "modular:primitive"))
    assert res.pairs[("exact", "modular:layer")].relative_error <= 1e-10
    assert res.pairs[("exact", "modular:primitive")].relative_error <= 1e-10


@pytest.mark.parametrize(
    "methods, exc, words",
    [
        (("exact",), ValueError, ["at least two"]),
        (("exact", "newton"), ValueError, ["newton", "unknown method"]),
        ({"a": "exact"}, ValueError, ["at least two"]),
        ("exact", TypeError, ["methods"]),
        (["exact", "exact"], ValueError, ["duplicate"]),
    ],
)
def test_compare_refuses_bad_methods(case, methods, exc, words):
    with pytest.raises(exc) as info:
        compare(*case.args, methods=methods)
    for word in words:
        assert word in str(info.value)


def test_compare_refuses_bad_directions(case):
    """A direction with the wrong structure, shape or non-finite entries is refused by label."""
    nat = nc.natural_gradient(*case.args).value
    with pytest.raises(ValueError, match="bad.*structure"):
        compare(*case.args, methods={"ok": nat, "bad": nat[0]})
    wrong = [dict(layer) for layer in nat]
    wrong[0]["W"] = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match=r"bad.*shape"):
        compare(*case.args, methods={"ok": nat, "bad": wrong})
    nan = jax.tree_util.tree_map(lambda v: v * jnp.nan, nat)
    with pytest.raises(ValueError, match="non-finite"):
        compare(*case.args, methods={"ok": nat, "bad": nan})
    with pytest.raises(ValueError, match="damping"):
        compare(*case.args, methods=("exact", "sgd"), damping=-1.0)
    bad_x = case.x.at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="x.*non-finite"):
        compare(case.model, case.params, bad_x, case.y, case.family, methods=("exact", "sgd"))


# ---- rank_report ---------------------------------------------------------------------------


class FakeRecord(NamedTuple):
    name: str
    kind: str
    jacobian: np.ndarray
    in_shapes: tuple
    out_shape: tuple


def test_rank_report_fields_on_a_two_layer_mlp():
    """Shapes, ranks and directions per map; the verdict lists every reason."""
    c = multi_layer_case(0)
    report = rank_report(c.model, c.params, c.x, c.family)
    assert report.verdict == NOT_GUARANTEED and report.theorem is None
    assert report.jacobian_shape == (4, 26)
    names = [m.name for m in report.maps]
    assert names == ["dense", "tanh", "dense"]
    top, act, first = report.maps
    assert top.shape == (4, 2 * 4 + 4 * 2 + 2) and top.direction == "contracting"
    assert act.shape == (8, 8) and act.direction == "square" and act.full_row_rank
    assert first.shape == (8, 3 * 4 + 4) and first.in_shapes == ((3, 4), (4,))
    assert top.greville_next is not None and first.greville_next is None
    assert any("reverse-order law fails" in r for r in report.reasons)
    assert "not guaranteed" in str(report)
    # Every map has full row rank and F_eta is invertible: exact in function space.
    assert report.function_space_exact and report.chain


def test_rank_report_single_map_theorem_is_named():
    c = exact_prone_case(1, "dense")
    report = rank_report(c.model, c.params, c.x, c.family)
    assert report.verdict == EXACT and report.reasons == ()
    assert report.theorem.startswith("single-map identity")
    assert report.maps[0].full_row_rank and math.isfinite(report.maps[0].condition)


def test_rank_report_never_trusts_a_trace_that_is_not_the_model():
    """A trace whose maps do not reproduce ``J Jᵀ`` gives *not guaranteed* (soundness)."""
    c = exact_prone_case(1, "dense")
    n, m = c.model(c.params, c.x).shape
    p = sum(v.size for v in jax.tree_util.tree_leaves(c.params))
    fake = [FakeRecord("dense", "dense", np.eye(n * m, p), ((p,),), (n, m))]
    report = rank_report(c.model, c.params, c.x, c.family, trace=fake)
    assert report.verdict == NOT_GUARANTEED
    assert any("not the model's Jacobian" in r for r in report.reasons)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"granularity": "neuron"}, ["granularity"]),
        ({"rcond": 0.0}, ["rcond"]),
        ({"greville_tol": -1.0}, ["greville_tol"]),
        ({"cond_max": 0.5}, ["cond_max"]),
        ({"max_size": 2}, ["max_size"]),
    ],
)
def test_rank_report_refuses_bad_options(case, kwargs, words):
    with pytest.raises(ValueError) as info:
        rank_report(case.model, case.params, case.x, case.family, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_rank_report_refuses_bad_model_input(case):
    bad = jax.tree_util.tree_map(lambda v: v.at[0].set(jnp.nan), case.params)
    with pytest.raises(ValueError, match="non-finite"):
        rank_report(case.model, bad, case.x, case.family)
    with pytest.raises(ValueError, match="width"):
        rank_report(case.model, case.params, case.x, nc.Categorical(dim=5))
