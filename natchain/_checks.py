"""Input validation shared by the public functions.

Shape and configuration errors are raised at trace time, so they work under ``jit``.
Value checks (non-finite entries, labels outside the support) need concrete values:
they run eagerly and are skipped for traced arguments (inside ``jit``), where the
solvers report numerical trouble in their statistics instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when every leaf of ``x`` holds a concrete value (not a tracer)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def check_finite(tree, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` (and the leaf path) if a concrete leaf is not finite."""
    if not is_concrete(tree):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            where = jax.tree_util.keystr(path) or ""
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"{name}{where} contains {bad} non-finite value(s) (NaN or inf).")


def check_float_params(params, name: str = "params") -> None:
    """Raise ``TypeError`` if a leaf of ``params`` is not floating point (not differentiable)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dt = jnp.result_type(leaf)
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {dt}; natural gradients are "
                "taken with respect to floating-point parameters only (pass integer or "
                "constant inputs through `x`, or close over them)."
            )
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(f"{name} has no array leaves: there is nothing to differentiate.")


def check_nonnegative(value, name: str) -> None:
    """Raise ``ValueError`` if a concrete scalar ``value`` is negative or not finite."""
    if is_concrete(value):
        v = np.asarray(value)
        if v.shape != ():
            raise ValueError(f"{name} must be a scalar; got shape {v.shape}.")
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number ≥ 0; got {float(v)!r}.")


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}.")


def check_model_output(out, name: str = "model output"):
    """Return the single array a model produced, or raise ``TypeError`` explaining the fix.

    A natural gradient needs one array of distribution parameters ``(N, m)``. Models that
    return a dict or tuple (``{"logits": eta}``, ``(eta, aux)``) must say which leaf that is,
    with :func:`natchain.pick_output`.
    """
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return out
    leaves, _ = jax.tree_util.tree_flatten_with_path(out)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    kind = type(out).__name__
    hint = f"natchain.pick_output(model, {paths[0][1:-1]})" if paths else "one array"
    raise TypeError(
        f"{name} must be one array of shape (N, m); the model returned a {kind} with "
        f"{len(paths)} leaves ({', '.join(paths[:6])}). Declare which leaf holds the "
        f"distribution parameters, e.g. {hint}."
    )


def pick_output(model, *path):
    """Wrap ``model`` so that it returns one leaf of its output: ``out[path[0]][path[1]]…``.

    For models returning a dict or tuple, e.g. ``pick_output(net.apply, "logits")`` or
    ``pick_output(model, 0)``. Both the exact and the modular routes take the wrapped model.

    Args:
        model: ``model(params, x)`` returning a pytree.
        *path: keys or indices leading to the array of distribution parameters.

    Raises:
        ValueError: no path given.
    """
    if not path:
        raise ValueError("pick_output needs at least one key or index (e.g. 'logits' or 0).")

    def picked(params, x):
        out = model(params, x)
        for step in path:
            out = out[step]
        return out

    picked.__name__ = f"{getattr(model, '__name__', 'model')}_{'_'.join(map(str, path))}"
    return picked
