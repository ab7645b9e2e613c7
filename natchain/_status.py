"""One result code and one set of statistics for every natural-gradient solver.

Every exact solver (and the modular rule, for the keys that apply to it) reports a
:class:`RESULTS` code and the statistics listed in :data:`STAT_KEYS`. A result is
``successful`` only when the returned ``n`` passes the residual test on the *original*
system, recomputed by one Fisher-vector product after the solve::

    ‖(F_theta + λI) n − g‖ ≤ tol · ‖g‖

so a solver can never report success for a vector that does not solve the system. The
test runs in the problem's dtype, or in float64 when asked (``check_float64=True``).
Value-dependent trouble never raises from inside a trace; :func:`raise_if_failed` raises
on request (``natural_gradient(..., throw=True)``).

The reference with the meaning of each key is ``docs/statistics.md``.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np

from natchain._checks import is_concrete


class RESULTS(enum.IntEnum):
    """How a solve ended. Stored in the statistics as an ``int32`` under ``"result"``."""

    successful = 0
    max_steps_reached = 1
    ill_conditioned = 2
    non_finite = 3
    not_checked = 4

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    RESULTS.successful: "the returned n satisfies ‖(F + λI) n − g‖ ≤ tol · ‖g‖.",
    RESULTS.max_steps_reached: (
        "the iteration stopped at its step cap `maxiter` before the residual test passed; "
        "raise `maxiter`, add damping, or loosen `tol`."
    ),
    RESULTS.ill_conditioned: (
        "the residual test failed after the solve: the system is singular or too "
        "ill-conditioned for this precision (see `num_cut` and `condition`), or g has a "
        "part outside the range of F (an undamped Monte-Carlo or empirical Fisher); "
        "add damping, use float64, or check with `check_float64=True`."
    ),
    RESULTS.non_finite: (
        "the solution or its residual is not finite (a factorisation broke down, or the "
        "model's outputs overflowed)."
    ),
    RESULTS.not_checked: (
        "no residual test was run, so nothing is claimed about the step: the modular rule "
        "under scale_by_natural_gradient(stats='minimal'); use stats='basic' to test it."
    ),
}

#: The statistics every exact solver returns, with their dtypes (see docs/statistics.md).
STAT_KEYS = {
    "result": "int32",
    "converged": "bool",
    "residual": "float",
    "residual_float64": "float",
    "tol": "float",
    "num_steps": "int32",
    "rank": "int32",
    "num_cut": "int32",
    "cutoff": "float",
    "condition": "float",
    "size": "int32",
}


class SolverError(RuntimeError):
    """Raised by :func:`raise_if_failed` when a solve asked to throw was not successful."""


#: Default residual tolerance by floating-point width in bits (see :func:`default_tol`).
DEFAULT_TOLS = {64: 1e-10, 32: 5e-4, 16: 5e-2}


def default_tol(dtype) -> float:
    """The residual tolerance used when none is given, from the precision of ``dtype``.

    ``1e-10`` in float64; ``5e-4`` in float32 (≈ 4·√eps) and ``5e-2`` in 16-bit floats:
    above the round-off floor ``eps · cond(F + λI)`` of a well-conditioned system
    (condition up to ~10³ in float32), so a correct answer passes, and far below any
    error that matters to an optimiser.
    """
    return DEFAULT_TOLS[jnp.finfo(dtype).bits]


def stats_template(dtype, size) -> dict:
    """The statistics with "not measured" values: ``nan`` floats, ``-1`` counts."""
    nan = jnp.asarray(jnp.nan, dtype)
    return {
        "result": jnp.asarray(RESULTS.successful, jnp.int32),
        "converged": jnp.asarray(True),
        "residual": nan,
        "residual_float64": jnp.asarray(np.nan, _wide(dtype)),
        "tol": nan,
        "num_steps": jnp.asarray(0, jnp.int32),
        "rank": jnp.asarray(-1, jnp.int32),
        "num_cut": jnp.asarray(0, jnp.int32),
        "cutoff": jnp.asarray(0.0, dtype),
        "condition": nan,
        "size": jnp.asarray(size, jnp.int32),
    }


def _wide(dtype):
    return jnp.float64 if jax.config.jax_enable_x64 else dtype


def tree_norm(tree):
    """The Euclidean norm of a pytree of arrays (of all its entries together)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree)))


def relative_norm(r, b):
    """``‖r‖ / ‖b‖`` (``‖r‖`` when ``b = 0``) on arrays or pytrees of arrays."""
    nr, nb = tree_norm(r), tree_norm(b)
    return jnp.where(nb > 0, nr / jnp.where(nb > 0, nb, 1.0), nr)


def finish(problem, damping, n, tol, stats, *, check_float64=False, hit_cap=False) -> dict:
    """Fill the shared statistics: recompute the residual by one Fisher-vector product.

    The residual is formed on the parameters' own pytree, never flattened: on XLA's CPU
    backend a flattening costs about as much as a small model's whole gradient.

    Args:
        problem: the :class:`natchain._problem.Problem` that was solved.
        damping: ``λ``.
        n: the solution, a pytree shaped like the parameters.
        tol: the residual tolerance (``None``: :func:`default_tol` of the problem's dtype).
        stats: what the solver measured (any of :data:`STAT_KEYS`, plus its own extras).
        check_float64: also recompute the residual in float64 and decide success by it.
        hit_cap: whether an iterative solver stopped at its step cap.

    Returns:
        The full statistics dict (the :data:`STAT_KEYS` and the solver's extras).
    """
    leaves = jax.tree_util.tree_leaves(n)
    dtype = jnp.result_type(*leaves)
    tol = default_tol(dtype) if tol is None else tol
    out = stats_template(dtype, problem.num_params)
    out.update({k: jnp.asarray(v, out[k].dtype) for k, v in stats.items() if k in out})
    g = problem.gradient_tree()
    resid = jax.tree_util.tree_map(
        lambda fv, v, gv: fv + jnp.asarray(damping, v.dtype) * v - gv, problem.fvp_tree(n), n, g
    )
    res = relative_norm(resid, g)
    out["residual"] = res.astype(dtype)
    out["tol"] = jnp.asarray(tol, dtype)
    test = res
    if check_float64:
        res64 = problem.residual_float64(n, damping)
        out["residual_float64"] = res64
        test = res64
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])) & jnp.isfinite(test)
    ok = finite & (test <= tol)
    code = jnp.where(
        ok,
        int(RESULTS.successful),
        jnp.where(
            finite,
            jnp.where(hit_cap, int(RESULTS.max_steps_reached), int(RESULTS.ill_conditioned)),
            int(RESULTS.non_finite),
        ),
    )
    out["result"] = jnp.asarray(code, jnp.int32)
    out["converged"] = ok
    out.update({k: v for k, v in stats.items() if k not in out})
    return out


def result_message(code) -> str:
    """The message of a concrete result code."""
    return RESULTS(int(code)).message


def raise_if_failed(stats, where: str = "natural_gradient") -> None:
    """Raise :class:`SolverError` with the result's message unless the solve was successful.

    Only concrete statistics can be checked; under an outer ``jax.jit`` read
    ``stats["result"]`` instead.
    """
    code = stats["result"]
    if not is_concrete(code):
        raise ValueError(
            "throw=True needs concrete statistics; under jax.jit read stats['result'] instead."
        )
    if int(code) != RESULTS.successful:
        raise SolverError(
            f"{where}: {RESULTS(int(code)).name}: {result_message(code)} "
            f"(residual {float(stats['residual']):.3g}, tol {float(stats['tol']):.3g})."
        )
