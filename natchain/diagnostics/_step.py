"""``step_report``: where one update direction lies with respect to ``F_theta`` on the batch.

The batch's Fisher ``F_theta = Bᵀ B`` (``B = Mᵀ J``, ``(N·r, P)``) splits parameter space
into ``range(F_theta) = range(Jᵀ M)`` — the directions that change the model's
distribution on the batch — and ``null(F_theta)``, which the batch cannot see: neither the
first-order loss change nor the second-order KL of a step depends on its null component
(docs/theory.md, "The right-inverse theorem"). Every natural gradient (every solution of
``F_theta n = g``) has the same range component, the minimum-norm one ``F_theta⁺ g``; they
differ only in null space. :func:`step_report` measures, for one step, how large that
null component is and how far the step is from the exact direction in the metrics that
matter; :func:`project_to_range` returns the range component.

Both work in the ``N·r`` output space, never with a ``P × P`` matrix: the orthogonal
projector onto ``range(Bᵀ)`` is the push-through formula

    ``P_range = Bᵀ (B Bᵀ)⁺ B = Bᵀ C⁺ B``,     ``C = Mᵀ K M`` (``K = J Jᵀ``),

with ``C`` the Gram matrix of the ``"gram"`` solver (built from the recognised layers where
possible). Its pseudo-inverse cuts eigenvalues of ``C`` at or below ``rcond · λ_max(C)``,
``rcond = N·r·eps`` by default (the undamped cut-off of every natchain solver): singular
values of ``B`` below ``√(N·r·eps) · σ_max(B)`` count as zero, so directions the batch sees
more weakly than that are counted as null. The number of eigenvalues kept is reported as
``range_rank``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natchain._checks import check_finite, check_nonnegative
from natchain._families import Categorical
from natchain._gram import factor_gram
from natchain._natural_gradient import natural_gradient
from natchain._problem import build_problem, validate_inputs
from natchain._solvers._base import check_rcond, eigh_pinv

__all__ = ["centre_outputs", "project_to_range", "step_report", "STEP_REPORT_KEYS"]

#: The keys of :func:`step_report`'s dictionary, in order, with their meaning.
STEP_REPORT_KEYS = {
    "step_norm": "‖s‖, the step's Euclidean norm in parameter space",
    "exact_norm": "‖e‖, the exact direction's norm",
    "norm_ratio": "‖s‖ / ‖e‖ (nan when e = 0)",
    "null_fraction": "‖P_null s‖ / ‖s‖, the share of the step in null(F_theta) (0 for s = 0)",
    "cosine": "⟨s, e⟩ / (‖s‖ ‖e‖) in parameter space (nan when s = 0 or e = 0)",
    "fn_error": "‖C J (s − e)‖ / ‖C J e‖: the outputs' change, C the logit centring "
    "for Categorical (nan when C J e = 0)",
    "residual": "‖F_theta s − g‖ / ‖g‖, undamped F (‖F_theta s‖ when g = 0)",
    "range_rank": "eigenvalues of C = B Bᵀ kept by the projector's cut-off",
    "exact_result": "natchain.RESULTS code of the exact solve (-1: exact was given)",
}


def centre_outputs(out, family):
    """Function-space vectors with the output gauge removed, flattened to ``(N·m,)``.

    For :class:`natchain.Categorical` each example's logit change is centred (softmax is
    invariant to adding a constant to an example's logits, so an uncentred difference
    would measure that gauge, not a change of the distribution); other families are
    returned unchanged (flattened).

    Args:
        out: an ``(N, m)`` array of output changes (e.g. ``J d``).
        family: the output family.
    """
    out = jnp.asarray(out)
    if isinstance(family, Categorical):
        out = out - jnp.mean(out, axis=1, keepdims=True)
    return out.reshape(-1)


def _check_direction(d, params, name):
    """Raise naming ``name`` if ``d`` is not a finite pytree shaped like ``params``."""
    treedef = jax.tree_util.tree_structure(params)
    if jax.tree_util.tree_structure(d) != treedef:
        raise ValueError(
            f"{name} must be a pytree with the structure of params ({treedef}); "
            f"got {jax.tree_util.tree_structure(d)}."
        )
    for (path, leaf), ref in zip(
        jax.tree_util.tree_leaves_with_path(d), jax.tree_util.tree_leaves(params), strict=True
    ):
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; params has "
                f"{jnp.shape(ref)} there."
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; a "
                "direction must be floating point."
            )
    check_finite(d, name)


def _range_projector(prob, rcond):
    """``(project, stats)``: ``v ↦ Bᵀ C⁺ B v`` on flat vectors, and the cut-off's statistics."""
    n, _, r = prob.factor.shape
    cmat, _ = factor_gram(prob)
    apply, stats = eigh_pinv(cmat, 0.0, rcond)

    def project(v):
        bv = jnp.einsum("nmr,nm->nr", prob.factor, prob.jvp(v)).reshape(-1)
        c = apply(bv).reshape(n, r)
        return prob.vjp(jnp.einsum("nmr,nr->nm", prob.factor, c))

    return project, stats


def _ratio(num, den):
    """``num / den``, ``nan`` where ``den = 0`` (an undefined ratio, documented per key)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _project(model, family, kind, num_samples, rcond, params, x, y, key, step):
    prob = build_problem(
        model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples, need_y=False
    )
    project, _ = _range_projector(prob, rcond)
    flat_s, unravel = ravel_pytree(step)
    return unravel(project(flat_s.astype(prob.flat.dtype)).astype(flat_s.dtype))


def project_to_range(
    model, params, x, family, step, *, kind="true", y=None, key=None, num_samples=1, rcond=None
):
    """The component of ``step`` in ``range(F_theta)`` on the batch, ``Bᵀ C⁺ B s``.

    The rest, ``step − project_to_range(...)``, lies in ``null(F_theta)``: it changes
    neither the outputs' distribution on the batch (to first order) nor the KL of the step.
    For a step that solves ``F_theta s = g`` the range component is the minimum-norm
    natural gradient ``F_theta⁺ g``. The projector is formed in ``N·r`` output space (see
    the module docstring for the formula and its cut-off).

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        params: parameter pytree.
        x: the batch of inputs.
        family: the output family.
        step: a direction, a pytree shaped like ``params``.
        kind: Fisher kind (``"true"``, ``"mc"``, ``"empirical"``) whose range is used.
        y: targets (``kind="empirical"`` only).
        key, num_samples: for ``kind="mc"``.
        rcond: cut-off for ``C⁺`` relative to ``λ_max(C)`` (``None``: ``N·r·eps``).

    Returns:
        The range component, a pytree shaped (and typed) like ``step``.

    Raises:
        ValueError / TypeError: bad model inputs (as :func:`natchain.fisher_matrix`), a
            ``step`` whose structure, shapes or dtype do not fit ``params`` or that is not
            finite, ``rcond`` outside ``[0, 1)``.
    """
    check_rcond(rcond)
    validate_inputs(
        model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples, need_y=False
    )
    _check_direction(step, params, "step")
    return _project(model, family, kind, num_samples, rcond, params, x, y, key, step)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _report(
    model, family, kind, num_samples, rcond, given, params, x, y, step, exact, damping, key
):
    if given:
        exact_result = jnp.asarray(-1, jnp.int32)
    else:
        sol = natural_gradient(
            model,
            params,
            x,
            y,
            family,
            solver="gram",
            kind=kind,
            damping=damping,
            key=key,
            num_samples=num_samples,
        )
        exact, exact_result = sol.value, sol.stats["result"]
    prob = build_problem(model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples)
    dtype = prob.flat.dtype
    s = ravel_pytree(step)[0].astype(dtype)
    e = ravel_pytree(exact)[0].astype(dtype)
    project, pstats = _range_projector(prob, rcond)
    ns, ne = jnp.linalg.norm(s), jnp.linalg.norm(e)
    null = s - project(s)
    js, je = prob.jvp(s), prob.jvp(e)
    g = prob.gradient()
    ng = jnp.linalg.norm(g)
    res = jnp.linalg.norm(prob.fvp(s) - g)
    return {
        "step_norm": ns,
        "exact_norm": ne,
        "norm_ratio": _ratio(ns, ne),
        "null_fraction": jnp.where(ns > 0, jnp.linalg.norm(null) / jnp.where(ns > 0, ns, 1.0), 0.0),
        "cosine": _ratio(jnp.dot(s, e), ns * ne),
        "fn_error": _ratio(
            jnp.linalg.norm(centre_outputs(js - je, family)),
            jnp.linalg.norm(centre_outputs(je, family)),
        ),
        "residual": jnp.where(ng > 0, res / jnp.where(ng > 0, ng, 1.0), res),
        "range_rank": pstats["rank"].astype(jnp.int32),
        "exact_result": jnp.asarray(exact_result, jnp.int32),
    }


def step_report(
    model,
    params,
    x,
    y,
    family,
    step,
    *,
    exact=None,
    damping=0.0,
    kind="true",
    key=None,
    num_samples=1,
    rcond=None,
) -> dict:
    """Where a step ``s`` lies with respect to ``F_theta`` on the batch, and how far it is
    from the exact natural gradient ``e``.

    ``e`` is ``natchain.natural_gradient(..., solver="gram", damping=damping)`` unless
    ``exact`` is given. With ``P_range`` the orthogonal projector onto ``range(F_theta) =
    range(Jᵀ M)`` and ``P_null = I − P_range`` (formed in ``N·r`` output space, see the
    module docstring for the formula and its cut-off), the dictionary holds
    (:data:`natchain.diagnostics.STEP_REPORT_KEYS`):

    - ``step_norm`` ``‖s‖``; ``exact_norm`` ``‖e‖``; ``norm_ratio`` ``‖s‖ / ‖e‖``;
    - ``null_fraction`` ``‖P_null s‖ / ‖s‖`` (``0`` for ``s = 0``): ``0`` for any step the
      batch sees whole (``e`` itself), ``1`` for a step the batch cannot see;
    - ``cosine`` ``⟨s, e⟩ / (‖s‖ ‖e‖)`` in parameter space;
    - ``fn_error`` ``‖C J (s − e)‖ / ‖C J e‖``, the first-order change of the outputs on the
      batch, ``C`` the per-example centring of the logits for Categorical
      (:func:`centre_outputs`; a per-example logit shift is no change of the distribution);
    - ``residual`` ``‖F_theta s − g‖ / ‖g‖`` with the *undamped* ``F_theta``: whether ``s``
      is a natural gradient (the right-inverse theorem's quantity; for the damped exact
      step it is of order ``λ ‖e‖ / ‖g‖``, not zero);
    - ``range_rank``: the rank the projector kept; ``exact_result``: the
      :class:`natchain.RESULTS` code of the exact solve (``-1`` when ``exact`` is given).

    For ``damping = 0`` and a step with ``F_theta s = g``, ``P_range s = e``, so
    ``cosine² + null_fraction² = 1``. A ratio whose denominator is zero is ``nan`` (it is
    undefined: ``e = 0`` only when ``g = 0``).

    Every value is a scalar array; the function is traceable (``jax.jit`` it with
    ``model`` and ``family`` closed over) and compiles once per model and configuration.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        params: parameter pytree.
        x: the batch of inputs.
        y: targets.
        family: the output family.
        step: the direction ``s`` to report on, a pytree shaped like ``params`` (the
            natural-gradient direction, before any learning rate or sign).
        exact: the reference direction ``e`` (a pytree shaped like ``params``); ``None``
            computes it with the Gram solver.
        damping: ``λ ≥ 0`` of the exact solve (ignored when ``exact`` is given).
        kind: Fisher kind of the exact solve, the projector and the residual.
        key, num_samples: for ``kind="mc"``.
        rcond: the projector's cut-off relative to ``λ_max(C)`` (``None``: ``N·r·eps``).

    Returns:
        A dict with the keys of :data:`natchain.diagnostics.STEP_REPORT_KEYS`.

    Raises:
        ValueError / TypeError: bad model inputs (as :func:`natchain.natural_gradient`),
            a ``step`` or ``exact`` whose structure, shapes or dtype do not fit ``params``
            or that is not finite, negative ``damping``, ``rcond`` outside ``[0, 1)``.
    """
    check_nonnegative(damping, "damping")
    check_rcond(rcond)
    validate_inputs(model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples)
    _check_direction(step, params, "step")
    if exact is not None:
        _check_direction(exact, params, "exact")
    out = _report(
        model,
        family,
        kind,
        num_samples,
        rcond,
        exact is not None,
        params,
        x,
        y,
        step,
        exact,
        damping,
        key,
    )
    return {k: out[k] for k in STEP_REPORT_KEYS}
