"""K-FAC through ``kfac_jax.Optimizer``, set up explicitly for natchain's families.

Used by the training experiment and by ``benchmarks/peer.py``. ``kfac-jax`` 0.0.8 runs on
jax ≤ 0.9.1 only; :func:`kfac_unavailable` says why it cannot run in this process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import natchain as nc

#: The settings that make ``kfac_jax.Optimizer`` a plain preconditioned step: a fixed
#: learning rate, no momentum, a fixed damping (none of its adaptive rules, which cost extra
#: curvature products), its default curvature estimator and moving average. The learning
#: rate and damping here are placeholders; callers pass their own.
DEFAULT_SETTINGS = {
    "l2_reg": 0.0,
    "use_adaptive_learning_rate": False,
    "learning_rate": 0.1,
    "use_adaptive_momentum": False,
    "momentum": 0.0,
    "use_adaptive_damping": False,
    "damping": 1e-3,
    "estimation_mode": "ggn_curvature_prop",
    "curvature_ema": 0.95,
    "curvature_update_period": 1,
    "num_burnin_steps": 0,
    "norm_constraint": None,
}


def kfac_unavailable() -> str | None:
    """``None`` when ``kfac_jax`` imports and works here, else the reason it does not."""
    try:
        import kfac_jax  # noqa: F401
    except Exception as err:  # ImportError, or kfac-jax failing on this jax
        return f"kfac-jax unavailable with jax {jax.__version__}: {type(err).__name__}: {err}"
    return None


def _register(family, out, y):
    """Register the family's negative log-likelihood with kfac-jax (its curvature block)."""
    import kfac_jax

    if isinstance(family, nc.Categorical):
        kfac_jax.register_softmax_cross_entropy_loss(out, y)
    elif isinstance(family, nc.Gaussian):
        # nll = ||y - eta||² / (2 scale²): a normal predictive distribution of that variance.
        kfac_jax.register_normal_predictive_distribution(out, y, variance=family.scale**2)
    else:
        raise ValueError(
            f"kfac_optimizer supports nc.Categorical and nc.Gaussian families; got {family!r}."
        )


def kfac_optimizer(apply, family, period, settings=None, **overrides):
    """``(kfac_jax.Optimizer, loss)`` on ``mean_i family.nll(apply(params, x)_i, y_i)``.

    Args:
        apply: ``apply(params, x) -> eta``.
        family: ``nc.Categorical()`` or ``nc.Gaussian()``.
        period: the inverse update period (``inverse_update_period``).
        settings: a dict like :data:`DEFAULT_SETTINGS` (default: that one).
        **overrides: replace entries of ``settings`` (``learning_rate=…``, ``damping=…``).

    ``loss(params, batch)`` takes ``batch = (x, y)``; the optimiser's ``step`` is
    ``opt.step(params, state, rng, batch=batch, global_step_int=k)``.
    """
    import kfac_jax

    s = dict(DEFAULT_SETTINGS if settings is None else settings)
    unknown = sorted(set(overrides) - set(s))
    if unknown:
        raise ValueError(f"kfac_optimizer: unknown settings {unknown}; known: {sorted(s)}.")
    s.update(overrides)

    def loss(params, batch):
        x, y = batch
        out = apply(params, x)
        _register(family, out, y)
        return jnp.mean(jax.vmap(family.nll)(out, y))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss),
        l2_reg=s["l2_reg"],
        use_adaptive_learning_rate=s["use_adaptive_learning_rate"],
        learning_rate_schedule=lambda _: s["learning_rate"],
        use_adaptive_momentum=s["use_adaptive_momentum"],
        momentum_schedule=lambda _: s["momentum"],
        use_adaptive_damping=s["use_adaptive_damping"],
        damping_schedule=lambda _: s["damping"],
        estimation_mode=s["estimation_mode"],
        curvature_ema=s["curvature_ema"],
        curvature_update_period=s["curvature_update_period"],
        num_burnin_steps=s["num_burnin_steps"],
        norm_constraint=s["norm_constraint"],
        inverse_update_period=period,
        multi_device=False,
    )
    return opt, loss
