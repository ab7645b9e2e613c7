"""The natural gradient as an optax transformation: ``scale_by_natural_gradient``.

A natural-gradient step needs the batch, not only the gradient, so the transformation
takes it through optax's extra-arguments mechanism
(:class:`optax.GradientTransformationExtraArgs`)::

    opt = optax.chain(
        natchain.scale_by_natural_gradient(model, natchain.Categorical(), damping=1e-3),
        optax.clip_by_global_norm(10.0),
        optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.5, 1000)),
    )
    state = opt.init(params)
    grads = jax.grad(loss)(params, x, y)
    updates, state = opt.update(grads, state, params, x=x, y=y)
    params = optax.apply_updates(params, updates)

``optax.chain`` hands ``x``, ``y`` and ``key`` to every member that accepts extra
arguments and drops them for the others (clipping, schedules), so the natural-gradient
transformation composes like any other. Parameters may be any pytree of floating-point
arrays; ``model(params, x)`` must return the batch of outputs ``(N, m)``:

- plain JAX: ``params = [{"w": ..., "b": ...}, ...]``, ``model = mlp``;
- Flax (linen): ``params = net.init(key, x)``, ``model = net.apply``;
- Equinox: ``params, static = eqx.partition(net, eqx.is_inexact_array)`` and
  ``model = lambda p, x: jax.vmap(eqx.combine(p, static))(x)``;
- any registered pytree node class (e.g. a dataclass with static fields).

Each style is exercised in ``tests/test_optim.py`` (Flax and Equinox where installed).

**Chain order.** The transformation *replaces* the incoming updates by the natural
gradient of the batch's loss; it must come first. ``optax.chain(optax.sgd(lr),
scale_by_natural_gradient(...))`` discards the learning rate and its sign (the result is
``+n``, an ascent step of unit rate); use ``optax.chain(scale_by_natural_gradient(...),
optax.sgd(lr))``. With ``stats="full"`` the incoming updates are compared with the loss
gradient and the cosine is recorded as ``info["grad_cosine"]``: a value below ``1`` means
something before this transformation changed the gradient (``-1`` for ``optax.sgd``
placed first).

**Non-finite steps.** With ``guard=True`` (the default) a step whose natural gradient is
not finite is replaced by zeros and recorded (``info["skipped"]``,
``state.num_skipped``): no NaN or inf ever reaches the parameters through this
transformation. The state keys are listed in docs/statistics.md.
optax is needed by this module only; it is not a dependency of the rest of natchain.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natchain._checks import check_choice, check_nonnegative
from natchain._natural_gradient import (
    has_prepare,
    make_solver,
    natural_gradient,
    natural_gradient_prepared,
)
from natchain._problem import KINDS, check_family, output_factor
from natchain._status import RESULTS, stats_template, tree_norm

METHODS = ("exact", "modular")
#: Statistics levels of ``scale_by_natural_gradient(stats=...)``.
STATS_LEVELS = ("minimal", "basic", "full")


class NaturalGradientState(NamedTuple):
    """State of :func:`scale_by_natural_gradient`.

    Attributes:
        count: number of updates taken (skipped ones included).
        key: PRNG key used for ``kind="mc"`` when ``update`` is given no ``key``.
        num_skipped: number of steps the guard replaced by zeros (non-finite natural
            gradient).
        info: statistics of the last update, always the same keys so the state keeps
            one structure under ``jit``/``scan`` (docs/statistics.md): ``kl`` (second-order
            KL ``½ nᵀ F n`` of the returned step under the true Fisher), ``scale``
            (trust-region factor, ``1`` when inactive), ``grad_norm``, ``step_norm``,
            ``grad_cosine`` (incoming updates against the loss gradient), ``finite``
            (every entry of the natural gradient finite), ``skipped``, the solver's
            shared statistics (``result``, ``converged``, ``residual``, ``tol``,
            ``num_steps``, ``rank``, ``num_cut``, ``condition``), ``leaf_step_norm``
            (a pytree shaped like ``params``: the step's norm per leaf) and, for
            ``method="modular"``, ``maps`` (per map: ``rank``, ``num_cut``,
            ``condition``; empty for ``method="exact"``).
        prepared: what the solver's ``prepare`` computed (e.g. a preconditioner), reused
            for ``refresh_every`` steps; ``None`` for solvers without ``prepare``.
    """

    count: jax.Array
    key: jax.Array
    num_skipped: jax.Array
    info: dict
    prepared: Any = None


#: Solver statistics copied into the optimiser's ``info`` (the rest are solver extras).
_SOLVER_INFO = ("result", "converged", "residual", "tol", "num_steps", "rank", "num_cut")


def _empty_info(params, dtype, maps) -> dict:
    nan = jnp.asarray(jnp.nan, dtype)
    info = stats_template(dtype, 0)
    info = {k: info[k] for k in _SOLVER_INFO}
    info["condition"] = nan
    info.update(
        kl=nan,
        scale=jnp.asarray(1.0, dtype),
        grad_norm=nan,
        step_norm=nan,
        grad_cosine=nan,
        finite=jnp.asarray(True),
        skipped=jnp.asarray(False),
        leaf_step_norm=jax.tree_util.tree_map(lambda p: jnp.zeros((), dtype), params),
        maps=maps,
    )
    return info


def _cosine(a, b):
    fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
    den = jnp.linalg.norm(fa) * jnp.linalg.norm(fb)
    return jnp.where(den > 0, jnp.vdot(fa, fb) / jnp.where(den > 0, den, 1.0), jnp.nan)


def second_order_kl(model, family, params, x, step):
    """``½ stepᵀ F step`` with ``F`` the true Fisher (mean over the batch) at ``params``.

    This is the second-order expansion of the mean KL between the model's predictive
    distributions before and after moving the parameters by ``step``. It costs one JVP.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        family: the output family.
        params: parameter pytree.
        x: the batch of inputs.
        step: a pytree shaped like ``params``.

    Returns:
        A scalar.
    """
    eta, d_eta = jax.jvp(lambda p: model(p, x), (params,), (step,))
    factor = output_factor(family, eta, "true")  # (N, m, r)
    z = jnp.einsum("nmr,nm->nr", factor, d_eta)
    return 0.5 * jnp.sum(z * z) / eta.shape[0]


def _resolve_modular(model, family, granularity, options):
    import natchain

    grad = getattr(natchain, "grad", None)
    if grad is None:
        raise NotImplementedError(
            "method='modular' needs natchain.grad (the natural chain rule), which this "
            "install does not provide; use method='exact'."
        )
    return grad(model, family, method="modular", granularity=granularity, **options)


def scale_by_natural_gradient(
    model,
    family,
    *,
    method: str = "exact",
    solver: Any = "gram",
    kind: str = "true",
    damping: Any = 0.0,
    num_samples: int = 1,
    granularity: str = "layer",
    max_kl: float | None = None,
    seed: int = 0,
    guard: bool = True,
    example_batch: tuple | None = None,
    stats: str = "basic",
    refresh_every: int = 1,
    **options,
) -> Any:
    """Replace the gradient by the natural gradient of the model's loss on the batch.

    The transformation computes the natural gradient of the mean negative
    log-likelihood ``L(θ) = (1/N) Σ −log d(y_i | model(θ, x)_i)`` at ``params`` from the
    batch ``(x, y)`` passed to ``update``. The incoming ``updates`` (the caller's loss
    gradient) are replaced, not preconditioned: place this transformation **first** in
    an ``optax.chain``; clipping, schedules and the learning rate come after it and act
    on the natural step. The output is a descent direction to be scaled by a negative
    learning rate (``optax.scale(-lr)`` or ``optax.scale_by_learning_rate(lr)``), as
    with any optax gradient.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``; examples independent.
        family: the output family (e.g. ``natchain.Categorical()``).
        method: ``"exact"`` (:func:`natchain.natural_gradient`) or ``"modular"`` (the
            natural chain rule, ``natchain.grad(model, family, method="modular", ...)``).
        solver: exact solver name or instance (``"pinv"``, ``"cholesky"``, ``"gram"``,
            ``"cg"``); ``method="exact"`` only.
        kind: Fisher kind, ``"true"``, ``"mc"`` or ``"empirical"``; for
            ``method="modular"`` it sets the output natural cotangent only.
        damping: ``λ ≥ 0`` added to the Fisher, a number or a schedule
            ``count -> λ`` (e.g. an optax schedule); ``method="exact"`` only.
        num_samples: samples per example for ``kind="mc"``.
        granularity: ``"layer"`` or ``"primitive"``; ``method="modular"`` only.
        max_kl: optional trust region. When set, the natural gradient ``n`` is scaled by
            ``min(1, sqrt(max_kl / (½ nᵀ F n)))`` with ``F`` the true Fisher at ``params``,
            so the returned step's second-order KL is at most ``max_kl``. A learning
            rate ``α ≤ 1`` applied afterwards keeps it so (the KL scales with ``α²``).
        seed: seed of the key kept in the state for ``kind="mc"`` when ``update`` is
            called without ``key``.
        guard: replace a non-finite natural gradient by zeros and record it
            (``info["skipped"]``, ``state.num_skipped``) instead of passing it on.
        example_batch: ``(x, y)`` of the training batches' shapes: for
            ``method="modular"`` it fills the per-map statistics ``info["maps"]`` at
            ``init``, for a solver with ``prepare`` the shape of ``state.prepared``, so
            the state keeps one structure from the start (needed under ``lax.scan``);
            without it they appear from the first update.
        stats: ``"minimal"``, ``"basic"`` (default) or ``"full"``. ``"basic"`` records
            the solver's statistics (its residual test included), the norms and the
            guard. ``"full"`` adds what costs extra model evaluations: ``info["kl"]``
            (one JVP; always computed when ``max_kl`` is set) and ``info["grad_cosine"]``
            (the incoming updates against the loss gradient; for ``method="modular"``
            one more gradient). With ``"basic"`` those read ``nan``, and for
            ``method="exact"`` ``grad_norm`` is the norm of the loss gradient the solve
            computed: the incoming updates are not read at all, so the caller's own
            gradient costs nothing under ``jit``. ``"minimal"`` is ``"basic"`` for
            ``method="exact"`` (an exact solve always runs its residual test); for
            ``method="modular"`` the chain rule runs without statistics: no per-map
            records, no residual test (``info["result"]`` is ``not_checked``,
            ``converged`` false) and ``grad_norm`` ``nan``, so the incoming updates are
            not read either (docs/statistics.md).
        refresh_every: for a solver with a ``prepare`` method (something reusable across
            steps, such as a preconditioner), recompute it every ``refresh_every`` steps
            and keep it in ``state.prepared`` in between; ignored by other solvers.
        **options: passed on to the solver (``tol``, ``maxiter``, ``rcond``, ...) for
            ``method="exact"``, or to ``natchain.grad`` for ``method="modular"``.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose ``update`` is
        ``update(updates, state, params, *, x, y, key=None)``; the state is a
        :class:`NaturalGradientState` carrying the last step's statistics.

    Raises:
        ValueError: an unknown ``method`` or ``kind``, options that do not apply to the
            chosen method, negative ``damping``, a non-positive ``max_kl`` or
            ``refresh_every``, an unknown ``stats`` level.
        TypeError: ``family`` is not a natchain family.
        NotImplementedError: ``method="modular"`` where ``natchain.grad`` is unavailable.
        ImportError: optax is not installed (it is needed for this function only).
    """
    try:
        import optax
    except ImportError as err:
        raise ImportError("scale_by_natural_gradient needs optax: pip install optax") from err
    check_family(family)
    check_choice(method, METHODS, "method")
    check_choice(kind, KINDS, "kind")
    if not callable(model):
        raise TypeError(f"model must be callable as model(params, x); got {model!r}.")
    if max_kl is not None and not (
        isinstance(max_kl, (int, float)) and max_kl > 0 and math.isfinite(max_kl)
    ):
        raise ValueError(f"max_kl must be a positive finite number or None; got {max_kl!r}.")
    if not callable(damping):
        check_nonnegative(damping, "damping")
    if not isinstance(guard, bool):
        raise ValueError(f"guard must be True or False; got {guard!r}.")
    check_choice(stats, STATS_LEVELS, "stats")
    if not (isinstance(refresh_every, int) and refresh_every >= 1):
        raise ValueError(f"refresh_every must be a positive integer; got {refresh_every!r}.")
    full = stats == "full"
    prepares = False
    if method == "modular":
        if callable(damping) or float(damping) != 0.0:
            raise ValueError("damping applies to method='exact' only.")
        checked = stats != "minimal"
        options = dict(options, kind=kind, num_samples=num_samples, return_stats=checked)
        modular = _resolve_modular(model, family, granularity, options)
        unchecked = {
            "result": jnp.asarray(RESULTS.not_checked, jnp.int32),
            "converged": jnp.asarray(False),
        }

        def direction(params, x, y, key, count, prepared):
            del count
            out = modular(params, x, y, key=key)
            nat, st = out if checked else (out, unchecked)
            if not full:
                return nat, st, None, prepared
            loss = lambda p: jnp.mean(jax.vmap(family.nll)(model(p, x), y))
            return nat, st, jax.grad(loss)(params), prepared
    else:
        if granularity != "layer":
            raise ValueError("granularity applies to method='modular' only.")
        solver_obj = make_solver(solver, **options)  # refuse bad solver configuration now
        prepares = has_prepare(solver_obj)

        def direction(params, x, y, key, count, prepared):
            lam = damping(count) if callable(damping) else damping
            if prepares:
                sol, prepared = natural_gradient_prepared(
                    model,
                    params,
                    x,
                    y,
                    family,
                    solver_obj,
                    kind=kind,
                    damping=lam,
                    key=key,
                    num_samples=num_samples,
                    prepared=prepared,
                    refresh=count % refresh_every == 0,
                )
                return sol.value, sol.stats, sol.grad, prepared
            sol = natural_gradient(
                model,
                params,
                x,
                y,
                family,
                solver=solver,
                kind=kind,
                damping=lam,
                key=key,
                num_samples=num_samples,
                **options,
            )
            return sol.value, sol.stats, sol.grad, prepared

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        maps, prepared = {}, None
        zeros = lambda shapes: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        if example_batch is not None and (method == "modular" or prepares):
            bx, by = example_batch  # the per-map keys and the prepared shapes, up front
            out = jax.eval_shape(
                lambda p: direction(p, bx, by, jax.random.PRNGKey(0), 0, None), params
            )
            maps = zeros(out[1].get("maps", {}))
            prepared = zeros(out[3])  # step 0 refreshes it (0 % refresh_every == 0)
        return NaturalGradientState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            num_skipped=jnp.zeros((), jnp.int32),
            info=_empty_info(params, flat.dtype, maps),
            prepared=prepared,
        )

    def update_fn(updates, state, params=None, *, x=None, y=None, key=None, **extra_args):
        del extra_args  # meant for other members of a chain
        if params is None or x is None or y is None:
            raise ValueError(
                "scale_by_natural_gradient needs the parameters and the batch: call "
                "update(updates, state, params, x=x, y=y) (and key=... for kind='mc')."
            )
        new_key = state.key
        if key is None:
            new_key, key = jax.random.split(state.key)
        nat, st, grad, prepared = direction(params, x, y, key, state.count, state.prepared)
        nat = jax.tree_util.tree_map(lambda n, p: jnp.asarray(n, jnp.result_type(p)), nat, params)
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
        leaf_sq = [jnp.sum(jnp.square(n)) for n in jax.tree_util.tree_leaves(nat)]
        sq = sum(leaf_sq)
        finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(n)) for n in jax.tree_util.tree_leaves(nat)])
        )
        if guard:
            nat = jax.tree_util.tree_map(lambda n: jnp.where(finite, n, jnp.zeros_like(n)), nat)
            leaf_sq = [jnp.where(finite, q, 0.0) for q in leaf_sq]
            sq = jnp.where(finite, sq, 0.0)
        nan = jnp.asarray(jnp.nan, dtype)
        kl = nan
        if full or max_kl is not None:
            kl = second_order_kl(model, family, params, x, nat)
        scale = jnp.ones((), dtype)
        if max_kl is not None:
            safe = jnp.where(kl > max_kl, kl, 1.0)
            scale = jnp.where(kl > max_kl, jnp.sqrt(max_kl / safe), 1.0)
            nat = jax.tree_util.tree_map(lambda n: n * scale.astype(n.dtype), nat)
            kl = kl * scale * scale
            leaf_sq = [q * scale * scale for q in leaf_sq]
            sq = sq * scale * scale
        # The incoming updates are read only with stats="full", or with "basic" where the
        # solve gave no gradient (modular): otherwise the caller's own gradient is dead
        # code for XLA. With "minimal" and no gradient from the solve, grad_norm is nan.
        incoming = updates if (full or grad is None) else grad
        unread = stats == "minimal" and grad is None
        grad_norm = nan if unread else tree_norm(incoming).astype(dtype)
        cosine = _cosine(updates, grad).astype(dtype) if full else nan
        info = _empty_info(params, dtype, {})
        skipped = jnp.logical_not(finite) if guard else jnp.asarray(False)
        info.update(
            kl=kl.astype(dtype),
            scale=scale,
            grad_norm=grad_norm,
            step_norm=jnp.sqrt(sq).astype(dtype),
            grad_cosine=cosine,
            finite=finite,
            skipped=skipped,
            leaf_step_norm=jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(nat), [jnp.sqrt(q).astype(dtype) for q in leaf_sq]
            ),
            maps=st.get("maps", {}),
        )
        for name in (*_SOLVER_INFO, "condition"):
            if name in st:
                info[name] = jnp.asarray(st[name], info[name].dtype)
        new_state = NaturalGradientState(
            count=state.count + 1,
            key=new_key,
            num_skipped=state.num_skipped + skipped.astype(jnp.int32),
            info=info,
            prepared=prepared,
        )
        return nat, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
