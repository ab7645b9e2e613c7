"""The exact reference's entry points: ``fisher_matrix``, ``fisher_vp``, ``natural_gradient``."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

from natchain._checks import check_nonnegative, is_concrete
from natchain._problem import build_problem, check_outputs, validate_inputs
from natchain._sharding import call_on_mesh
from natchain._solvers import SOLVERS, AbstractSolver
from natchain._solvers._base import DEFAULT_MAX_PARAMS, check_dense_size
from natchain._status import raise_if_failed


class Solution(NamedTuple):
    """A natural gradient and how it was obtained.

    Attributes:
        value: the natural gradient, a pytree shaped like ``params``.
        grad: the ordinary loss gradient ``g`` (same shape), for comparisons.
        stats: the solver's statistics: the keys of :data:`natchain.STAT_KEYS` (``result``,
            ``converged``, ``residual``, ``tol``, ``num_steps``, ``rank``, ``num_cut`` …,
            documented in docs/statistics.md), then the solver's extras.
    """

    value: Any
    grad: Any
    stats: dict


def fisher_matrix(
    model,
    params,
    x,
    family,
    *,
    kind: str = "true",
    y=None,
    key=None,
    num_samples: int = 1,
    max_params: int | None = DEFAULT_MAX_PARAMS,
):
    """Dense Fisher ``F_theta = Jᵀ F_blk J`` (mean over the batch), ``(P, P)``.

    Rows and columns follow ``jax.flatten_util.ravel_pytree(params)``.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        params: parameter pytree.
        x: the batch of inputs (not differentiated).
        family: the output family (e.g. ``natchain.Categorical()``).
        kind: ``"true"`` (closed form), ``"mc"`` (``num_samples`` samples per example from
            the model, needs ``key``) or ``"empirical"`` (scores at the targets ``y``).
        y: targets, needed for ``kind="empirical"``.
        key: PRNG key for ``kind="mc"``.
        num_samples: samples per example for ``kind="mc"``.
        max_params: refuse ``P`` above this (``None``: no limit).

    Raises:
        ValueError: bad shapes, non-finite values, unknown kind, missing key/targets,
            ``P > max_params``.
    """
    validate_inputs(
        model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples, need_y=False
    )
    check_dense_size(jax.flatten_util.ravel_pytree(params)[0].size, max_params, "fisher_matrix")
    fisher, finite = _fisher_matrix(model, family, kind, num_samples, params, x, y, key)
    check_outputs(finite)
    return fisher


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _fisher_matrix(model, family, kind, num_samples, params, x, y, key):
    prob = build_problem(
        model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples, need_y=False
    )
    b = prob.factor_jacobian()
    return b.T @ b, jnp.all(jnp.isfinite(prob.eta))


def fisher_vp(model, params, x, family, *, kind="true", y=None, key=None, num_samples=1):
    """Matrix-free Fisher: returns ``v -> F_theta v`` acting on pytrees shaped like ``params``.

    Each product costs one JVP and one VJP of the model, linearised once here. Arguments
    as for :func:`fisher_matrix`.
    """
    prob = build_problem(
        model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples, need_y=False
    )
    _, jvp = jax.linearize(lambda p: model(p, x), params)
    vjp = jax.linear_transpose(jvp, params)

    def fvp(v):
        return vjp(prob.apply_fblk(jvp(v)))[0]

    return fvp


def make_solver(solver, **options) -> AbstractSolver:
    """A solver from a name (one of :data:`natchain.SOLVERS`) or an instance."""
    if isinstance(solver, AbstractSolver):
        if options:
            raise ValueError(f"solver options {sorted(options)} given with a solver instance.")
        return solver
    if solver not in SOLVERS:
        raise ValueError(
            f"solver={solver!r} is not one of {tuple(SOLVERS)} (or a solver instance)."
        )
    return SOLVERS[solver](**options)


def natural_gradient(
    model,
    params,
    x,
    y,
    family,
    *,
    solver="pinv",
    kind: str = "true",
    damping=0.0,
    key=None,
    num_samples: int = 1,
    throw: bool = False,
    **solver_options,
) -> Solution:
    """The exact natural gradient ``(F_theta + λI)⁺ g`` of the mean negative log-likelihood.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``; examples independent.
        params: parameter pytree (floating-point leaves).
        x: batch of inputs (data: not differentiated).
        y: targets, ``(N, ...)`` as the family expects.
        family: the output family.
        solver: ``"pinv"`` (dense eigendecomposition), ``"cholesky"`` (dense, damped),
            ``"gram"`` (``N·r`` output space), ``"cg"`` (matrix-free), ``"auto"`` (the
            cheapest of these for the problem's sizes, chosen at trace time and reported
            as ``stats["route"]``), or an :class:`AbstractSolver` instance.
        kind: Fisher kind, ``"true"``, ``"mc"`` or ``"empirical"``.
        damping: ``λ ≥ 0``; ``0`` gives the minimum-norm solution.
        key, num_samples: for ``kind="mc"``.
        throw: raise :class:`natchain.SolverError` when the result is not ``successful``
            (concrete calls only; under an outer ``jax.jit`` read ``stats["result"]``).
        **solver_options: passed to the solver class (``rcond``, ``tol``, ``maxiter``,
            ``max_params``, ``structured``, ``factorization``, ``check_float64``).

    Returns:
        A :class:`Solution` (``value`` shaped like ``params``, ``grad``, ``stats``).

    Raises:
        ValueError / TypeError: bad shapes, non-finite values, labels outside the
            support, negative damping, unknown solver or kind, ``mc`` without ``key``,
            a dense solve too large for ``max_params``.
        SolverError: ``throw=True`` and the solve was not successful.
    """
    check_nonnegative(damping, "damping")
    solver = make_solver(solver, **solver_options)
    validate_inputs(model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples)
    damped = bool(damping > 0) if is_concrete(damping) else None
    solve = partial(_solve, model, family, solver, kind, num_samples, damped)
    value, grad, stats, finite = call_on_mesh(solve, params, x, y, damping, key)
    check_outputs(finite)
    if throw:
        raise_if_failed(stats)
    return Solution(value, grad, stats)


def has_prepare(solver) -> bool:
    """Whether ``solver`` computes something reusable across steps (its own ``prepare``)."""
    own = getattr(type(solver), "prepare", None)
    return own is not None and own is not getattr(AbstractSolver, "prepare", None)


def natural_gradient_prepared(
    model, params, x, y, family, solver, *, kind, damping, key, num_samples, prepared, refresh
):
    """:func:`natural_gradient` for a solver with ``prepare``, reusing what it prepared.

    ``prepared`` is the previous step's ``solver.prepare(problem, damping)`` (``None``:
    none yet, prepared now); it is recomputed at this point where ``refresh`` (a boolean,
    traced or not) is true. Returns ``(Solution, prepared)``.
    """
    check_nonnegative(damping, "damping")
    validate_inputs(model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples)
    damped = bool(damping > 0) if is_concrete(damping) else None
    solve = partial(_solve_prepared, model, family, solver, kind, num_samples, damped)
    value, grad, stats, finite, prepared = call_on_mesh(
        solve, params, x, y, damping, key, prepared, refresh
    )
    check_outputs(finite)
    return Solution(value, grad, stats), prepared


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _solve(model, family, solver, kind, num_samples, damped, params, x, y, damping, key):
    """The traced part of :func:`natural_gradient` (compiled once per model and configuration)."""
    prob = _problem(model, family, kind, num_samples, damped, params, x, y, key)
    sol, stats = solver.solve(prob, damping)
    finite = jnp.all(jnp.isfinite(prob.eta))
    return sol, prob.gradient_tree(), stats, finite


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _solve_prepared(
    model, family, solver, kind, num_samples, damped, params, x, y, damping, key, prepared, refresh
):
    prob = _problem(model, family, kind, num_samples, damped, params, x, y, key)
    if prepared is None:
        prepared = solver.prepare(prob, damping)
    else:
        prepared = jax.lax.cond(refresh, lambda: solver.prepare(prob, damping), lambda: prepared)
    sol, stats = solver.solve(prob, damping, prepared=prepared)
    finite = jnp.all(jnp.isfinite(prob.eta))
    return sol, prob.gradient_tree(), stats, finite, prepared


def _problem(model, family, kind, num_samples, damped, params, x, y, key):
    prob = build_problem(model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples)
    return dataclasses.replace(prob, damped=damped)
