"""The natural-gradient problem at one point: model outputs, Fisher factors, the gradient.

Everything the exact solvers need is gathered here once, in flattened parameter space
(``jax.flatten_util.ravel_pytree`` order):

- ``eta = f(theta)`` of shape ``(N, m)``;
- the scaled output-Fisher factor ``M`` of shape ``(N, m, r)`` with
  ``F_blk = blockdiag(M_i M_iᵀ)`` — the ``1/N`` batch mean is folded into ``M``;
- the output cotangent ``b = ∂L/∂eta`` (``(N, m)``, ``1/N`` inside) so that ``g = Jᵀ b``.

Fisher kinds (docs/theory.md §2): ``true`` uses the family's closed-form factor; ``mc`` uses
``S`` score vectors at targets sampled from the model's own distribution;
``empirical`` uses the score at the observed target.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natchain._checks import (
    check_choice,
    check_finite,
    check_float_params,
    check_model_output,
    is_concrete,
)
from natchain._families import AbstractFamily

KINDS = ("true", "mc", "empirical")


def check_family(family) -> None:
    if not isinstance(family, AbstractFamily):
        raise TypeError(
            f"family must be a natchain family (e.g. natchain.Categorical()); got {family!r}."
        )


def output_factor(family, eta, kind="true", y=None, key=None, num_samples=1):
    """Per-example factors ``M`` (``(N, m, r)``) with ``F_eta,i = M_i M_iᵀ`` (no ``1/N``).

    Args:
        family: the output family.
        eta: model outputs, ``(N, m)``.
        kind: ``"true"``, ``"mc"`` or ``"empirical"``.
        y: observed targets (``empirical`` only).
        key: PRNG key (``mc`` only).
        num_samples: samples per example (``mc`` only).

    Raises:
        ValueError: unknown ``kind``, ``mc`` without ``key``, ``empirical`` without ``y``.
    """
    check_choice(kind, KINDS, "kind")
    if kind == "true":
        return jax.vmap(family.fisher_sqrt)(eta)
    return scores_factor(family, eta, factor_targets(family, eta, kind, y, key, num_samples))


def factor_targets(family, eta, kind, y=None, key=None, num_samples=1):
    """The targets whose scores make the factor: ``(N, S, ...)`` (``None`` for ``true``).

    ``empirical``: the observed ``y`` (``S = 1``); ``mc``: ``S = num_samples`` draws per
    example from the model's own distribution.
    """
    if kind == "true":
        return None
    if kind == "empirical":
        if y is None:
            raise ValueError("kind='empirical' needs the observed targets `y`.")
        return jnp.asarray(y)[:, None]
    if key is None:
        raise ValueError("kind='mc' needs a PRNG `key` to sample targets from the model.")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
    keys = jax.random.split(key, eta.shape[0])
    return jax.vmap(lambda k, e: family.sample(k, e, (num_samples,)))(keys, eta)


def scores_factor(family, eta, targets):
    """``M`` (``(N, m, S)``) from the scores at ``targets`` (``(N, S, ...)``), ``1/√S`` inside."""
    scores = jax.vmap(jax.vmap(family.score, in_axes=(None, 0)))(eta, targets)  # (N, S, m)
    return jnp.swapaxes(scores, 1, 2) / math.sqrt(targets.shape[1])


@dataclasses.dataclass(frozen=True)
class Problem:
    """A natural-gradient problem in flattened parameter space (see module docstring)."""

    model: Callable
    x: object
    family: AbstractFamily
    kind: str
    flat: jax.Array
    unravel: Callable
    eta: jax.Array
    factor: jax.Array  # (N, m, r), 1/sqrt(N) folded in
    cotangent: jax.Array | None  # (N, m), 1/N folded in; None without targets
    damped: bool | None = None  # damping > 0, when known before tracing (None: unknown)
    y: object = None  # the observed targets (the loss)
    targets: object = None  # the targets whose scores make the factor (mc, empirical)
    tree: object = None  # the parameters as given (a pytree); None: rebuilt from ``flat``

    @property
    def num_params(self) -> int:
        return self.flat.shape[0]

    @property
    def batch_size(self) -> int:
        return self.eta.shape[0]

    @property
    def in_range(self) -> bool:
        """Whether ``b`` lies in the range of ``F_blk`` by construction (true, empirical)."""
        return self.kind in ("true", "empirical")

    @property
    def params(self):
        """The parameters as the model takes them (a pytree)."""
        return self.unravel(self.flat) if self.tree is None else self.tree

    def f(self, flat):
        """Model outputs as a function of the flat parameter vector."""
        return self.model(self.unravel(flat), self.x)

    def f_tree(self, params):
        """Model outputs as a function of the parameter pytree."""
        return self.model(params, self.x)

    def ravel(self, tree):
        """A pytree shaped like the parameters as one flat vector (``ravel_pytree`` order)."""
        return ravel_pytree(tree)[0]

    # Products with J work on the parameters' own pytree: flattening inside a traced
    # computation costs a concatenation and as many slices per product on XLA's CPU
    # backend (about twice the cost of a Fisher-vector product of the MLP benchmark).
    def jvp_tree(self, v):
        """``J v`` for ``v`` a pytree shaped like the parameters; ``(N, m)``."""
        return jax.jvp(self.f_tree, (self.params,), (v,))[1]

    def vjp_tree(self, u):
        """``Jᵀ u`` for ``u`` of shape ``(N, m)``, as a pytree shaped like the parameters."""
        return jax.vjp(self.f_tree, self.params)[1](u)[0]

    def jvp(self, v):
        return self.jvp_tree(self.unravel(v))

    def vjp(self, u):
        return self.ravel(self.vjp_tree(u))

    def ntk_vp(self, u):
        """``K u = J Jᵀ u`` (``(N, m)``), without flattening the parameters."""
        return self.jvp_tree(self.vjp_tree(u))

    def jacobian(self):
        """Materialised Jacobian ``(N, m, P)`` — reverse or forward mode, whichever is cheaper."""
        n, m = self.eta.shape
        jac = jax.jacrev if n * m <= self.num_params else jax.jacfwd
        return jac(self.f)(self.flat)

    def apply_fblk(self, u):
        """``F_blk u`` for ``u`` of shape ``(N, m)``."""
        return jnp.einsum("nmr,nr->nm", self.factor, jnp.einsum("nmr,nm->nr", self.factor, u))

    def fvp(self, v):
        """``F_theta v`` (flat), matrix-free: JVP, ``F_blk``, VJP."""
        return self.vjp(self.apply_fblk(self.jvp(v)))

    def fvp_tree(self, v):
        """``F_theta v`` for ``v`` a pytree shaped like the parameters (same shape back)."""
        return self.vjp_tree(self.apply_fblk(self.jvp_tree(v)))

    def factor_jacobian(self, jac=None):
        """``B = Mᵀ J`` of shape ``(N·r, P)``, so that ``F_theta = Bᵀ B``."""
        jac = self.jacobian() if jac is None else jac
        b = jnp.einsum("nmr,nmp->nrp", self.factor, jac)
        return b.reshape(-1, b.shape[-1])

    def gradient(self):
        """The loss gradient ``g = Jᵀ b`` (flat)."""
        return self.ravel(self.gradient_tree())

    def gradient_tree(self):
        """The loss gradient ``g = Jᵀ b`` as a pytree shaped like the parameters."""
        if self.cotangent is None:
            raise ValueError("this problem was built without targets `y`: no gradient.")
        return self.vjp_tree(self.cotangent)

    def residual_float64(self, sol, damping):
        """``‖(F + λI) n − g‖ / ‖g‖`` for ``n = sol`` (a pytree shaped like the
        parameters), recomputed from scratch in float64.

        Parameters, inputs and the solution are widened, the outputs, Fisher factor and
        gradient rebuilt (Monte-Carlo samples reused): an independent check of the
        system the solver was given, free of its working precision.

        Raises:
            ValueError: float64 is not enabled (``jax_enable_x64``).
        """
        if not jax.config.jax_enable_x64:
            raise ValueError("check_float64=True needs float64: enable jax_enable_x64.")
        wide = widen(self.params)
        x = widen(self.x)
        flat64, unravel64 = ravel_pytree(wide)

        def f(p):
            return self.model(unravel64(p), x)

        eta, jvp = jax.linearize(f, flat64)
        vjp = jax.linear_transpose(jvp, flat64)
        n = eta.shape[0]
        if self.kind == "true":
            ms = jax.vmap(self.family.fisher_sqrt)(eta)
        else:
            ms = scores_factor(self.family, eta, self.targets)
        ms = ms / jnp.sqrt(jnp.asarray(n, eta.dtype))
        cot = jax.vmap(jax.grad(self.family.nll))(eta, self.y) / n
        g = vjp(cot)[0]
        v = ravel_pytree(sol)[0].astype(jnp.float64)
        fv = vjp(jnp.einsum("nmr,nr->nm", ms, jnp.einsum("nmr,nm->nr", ms, jvp(v))))[0]
        r = fv + jnp.asarray(damping, jnp.float64) * v - g
        nb = jnp.linalg.norm(g)
        return jnp.linalg.norm(r) / jnp.where(nb > 0, nb, 1.0)


def widen(tree):
    """Floating-point leaves cast to float64 (others unchanged)."""

    def cast(a):
        a = jnp.asarray(a)
        return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(cast, tree)


#: Structural validations already passed: ``signature -> output shape struct``.
_VALIDATED: dict = {}
_VALIDATED_MAX = 512


def _abstract(tree):
    """A hashable description of a pytree's structure, shapes and dtypes (not its values)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        (tuple(jnp.shape(leaf)), jnp.result_type(leaf), getattr(leaf, "weak_type", False))
        for leaf in leaves
    )


def _structure_key(model, params, x, family, y, kind, key, num_samples, need_y):
    """The cache key of the structural checks, or ``None`` when something is unhashable."""
    sig = (
        model, family, kind, num_samples, need_y, key is None, y is None,
        _abstract(params), _abstract(x), None if y is None else _abstract(y),
    )  # fmt: skip
    try:
        hash(sig)
    except TypeError:
        return None
    return sig


def validate_inputs(
    model, params, x, family, *, y=None, kind="true", key=None, num_samples=1, need_y=True
):
    """Check everything that can be checked before solving; return the output's shape struct.

    Shape and configuration errors raise at once (also under ``jit``); value checks
    (non-finite parameters or inputs, labels outside the support) run on concrete values.
    The model is only traced (``jax.eval_shape``), not run.

    The structural part (parameter dtypes, the model's output shape, the family's output
    and target shapes) depends on the model, family, configuration and the arguments'
    shapes and dtypes only: it runs once per such signature and is remembered, so a
    repeated eager call does not trace the model again. The value checks run every call
    (a pass over the concrete parameters, inputs and targets on the host).
    """
    check_family(family)
    check_choice(kind, KINDS, "kind")
    if not callable(model):
        raise TypeError(f"model must be callable as model(params, x); got {model!r}.")
    sig = _structure_key(model, params, x, family, y, kind, key, num_samples, need_y)
    eta = _VALIDATED.get(sig) if sig is not None else None
    if eta is None:
        check_float_params(params)
    check_finite(params, "params")
    check_finite(x, "x")
    if eta is None:
        eta = _validate_structure(model, params, x, family, y, kind, key, num_samples, need_y)
    if y is not None:
        family.check_targets(y, eta)  # shapes (cheap) and the support (concrete values)
    if sig is not None and sig not in _VALIDATED:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[sig] = eta
    return eta


def _validate_structure(model, params, x, family, y, kind, key, num_samples, need_y):
    if kind == "mc":
        if key is None:
            raise ValueError("kind='mc' needs a PRNG `key` to sample targets from the model.")
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
    eta = check_model_output(jax.eval_shape(model, params, x))
    family.check_output(eta)
    if (need_y or kind == "empirical") and y is None:
        raise ValueError("targets `y` are required here (the gradient or the empirical Fisher).")
    return eta


def build_problem(
    model, params, x, family, *, y=None, kind="true", key=None, num_samples=1, need_y=True
) -> Problem:
    """Validate the inputs and gather the quantities every exact solver needs.

    Non-finite model outputs are not raised here (they may be traced); callers check
    ``problem.eta`` once the values are concrete (see :func:`check_outputs`).
    """
    validate_inputs(
        model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples, need_y=need_y
    )
    flat, unravel = ravel_pytree(params)
    eta = model(params, x)
    n = eta.shape[0]
    targets = factor_targets(family, eta, kind, y=y, key=key, num_samples=num_samples)
    if kind == "true":
        factor = jax.vmap(family.fisher_sqrt)(eta)
    else:
        factor = scores_factor(family, eta, targets)
    factor = factor / jnp.sqrt(jnp.asarray(n, eta.dtype))
    cot = None
    if y is not None:
        cot = jax.vmap(jax.grad(family.nll))(eta, y) / n
    return Problem(
        model, x, family, kind, flat, unravel, eta, factor, cot, y=y, targets=targets, tree=params
    )


def check_outputs(eta_finite) -> None:
    """Raise if a concrete "all model outputs finite" flag is False."""
    if is_concrete(eta_finite) and not bool(eta_finite):
        raise ValueError("model output contains non-finite values (NaN or inf).")
