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
optax is needed by this module only; it is not a dependency of the rest of natchain.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natchain._checks import check_choice, check_nonnegative
from natchain._natural_gradient import make_solver, natural_gradient
from natchain._problem import KINDS, check_family, output_factor

METHODS = ("exact", "modular")


class NaturalGradientState(NamedTuple):
    """State of :func:`scale_by_natural_gradient`.

    Attributes:
        count: number of updates taken.
        key: PRNG key used for ``kind="mc"`` when ``update`` is given no ``key``.
        info: statistics of the last update, always the same keys so the state keeps
            one structure under ``jit``/``scan``: ``kl`` (second-order KL ``½ nᵀ F n``
            of the returned step under the true Fisher), ``scale`` (trust-region factor
            applied, ``1`` when inactive), ``grad_norm``, ``step_norm``, ``finite``
            (whether every entry of the natural gradient was finite), and the solver's
            ``residual``, ``num_steps`` and ``rank`` (``nan`` / ``-1`` where the solver
            does not report them).
    """

    count: jax.Array
    key: jax.Array
    info: dict


def _empty_info(dtype) -> dict:
    nan = jnp.asarray(jnp.nan, dtype)
    return {
        "kl": nan,
        "scale": jnp.asarray(1.0, dtype),
        "grad_norm": nan,
        "step_norm": nan,
        "finite": jnp.asarray(True),
        "residual": nan,
        "num_steps": jnp.asarray(-1, jnp.int32),
        "rank": jnp.asarray(-1, jnp.int32),
        "num_cut": jnp.asarray(-1, jnp.int32),
    }


def _tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


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
        **options: passed on to the solver (``tol``, ``maxiter``, ``rcond``, ...) for
            ``method="exact"``, or to ``natchain.grad`` for ``method="modular"``.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose ``update`` is
        ``update(updates, state, params, *, x, y, key=None)``; the state is a
        :class:`NaturalGradientState` carrying the last step's statistics.

    Raises:
        ValueError: an unknown ``method`` or ``kind``, options that do not apply to the
            chosen method, negative ``damping`` or a non-positive ``max_kl``.
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
    if method == "modular":
        if callable(damping) or float(damping) != 0.0:
            raise ValueError("damping applies to method='exact' only.")
        options = dict(options, kind=kind, num_samples=num_samples, return_stats=True)
        direction = _resolve_modular(model, family, granularity, options)
    else:
        if granularity != "layer":
            raise ValueError("granularity applies to method='modular' only.")
        make_solver(solver, **options)  # refuse bad solver configuration now

        def direction(params, x, y, key, count):
            lam = damping(count) if callable(damping) else damping
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
            return sol.value, sol.stats

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        return NaturalGradientState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            info=_empty_info(flat.dtype),
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
        if method == "exact":
            nat, stats = direction(params, x, y, key, state.count)
        else:
            nat, stats = direction(params, x, y, key=key)
        nat = jax.tree_util.tree_map(lambda n, p: jnp.asarray(n, jnp.result_type(p)), nat, params)
        info = _empty_info(ravel_pytree(params)[0].dtype)
        finite = jnp.all(jnp.isfinite(ravel_pytree(nat)[0]))
        kl = second_order_kl(model, family, params, x, nat)
        scale = jnp.ones_like(info["scale"])
        if max_kl is not None:
            safe = jnp.where(kl > max_kl, kl, 1.0)
            scale = jnp.where(kl > max_kl, jnp.sqrt(max_kl / safe), 1.0)
            nat = jax.tree_util.tree_map(lambda n: n * scale.astype(n.dtype), nat)
            kl = kl * scale * scale
        info.update(
            kl=kl,
            scale=scale,
            grad_norm=_tree_norm(updates),
            step_norm=_tree_norm(nat),
            finite=finite,
        )
        ints = ("num_steps", "rank", "num_cut")
        for name, dtype in [("residual", None)] + [(k, jnp.int32) for k in ints]:
            if name in stats:
                info[name] = jnp.asarray(stats[name], dtype or info[name].dtype)
        new_state = NaturalGradientState(count=state.count + 1, key=new_key, info=info)
        return nat, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
