"""The interface every exact solver implements, and the dense helpers they share."""

from __future__ import annotations

import abc

import jax.numpy as jnp

from natchain._status import finish

#: Dense solvers refuse problems with more parameters than this unless told otherwise.
DEFAULT_MAX_PARAMS = 8192


class AbstractSolver(abc.ABC):
    """Solves ``(F_theta + damping·I) n = g`` (minimum-norm when ``damping == 0``).

    Subclasses are small and configured at construction (bad configuration is refused
    there, naming the argument). They implement :meth:`compute`; :meth:`solve` then checks
    the answer on the original system by one Fisher-vector product and returns
    ``(solution, stats)``: the solution a pytree shaped like the parameters, the
    statistics those of :data:`natchain.STAT_KEYS`. Value-dependent trouble — rank
    deficiency, a cut-off, CG not converging, a residual above ``tol`` — is reported in
    ``stats["result"]``, never raised from inside a trace.

    Args (shared by every solver):
        tol: the residual test ``‖(F + λI) n − g‖ ≤ tol · ‖g‖`` that decides success
            (``None``: :func:`natchain.default_tol` of the problem's dtype).
        check_float64: run the residual test in float64 (parameters, inputs and the
            solution widened; needs ``jax_enable_x64``), reported as ``residual_float64``.
    """

    name: str = "abstract"

    def __init__(self, tol: float | None = None, check_float64: bool = False):
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be > 0 (or None for the dtype's default); got {tol!r}.")
        if not isinstance(check_float64, bool):
            raise ValueError(f"check_float64 must be True or False; got {check_float64!r}.")
        self.tol = tol
        self.check_float64 = check_float64

    @abc.abstractmethod
    def compute(self, problem, damping) -> tuple[jnp.ndarray, dict]:
        """Return the natural gradient (a pytree shaped like the parameters) and what the
        solver measured.

        The measured statistics may include any of ``rank``, ``num_cut``, ``cutoff``,
        ``condition``, ``num_steps``, ``size``, ``hit_cap`` (an iterative solver stopped
        at its step cap) and solver-specific extras. A solver that overrides
        :meth:`prepare` takes its result as a third argument ``prepared`` (``None``:
        prepare afresh).
        """

    def prepare(self, problem, damping):
        """State worth keeping across solves (a preconditioner), as a pytree of arrays.

        The default prepares nothing (``None``). A solver that returns state here accepts
        it back through ``solve(problem, damping, prepared=...)``, also when it was
        prepared on another batch or at other parameters: prepared state may only change
        how fast the solver gets there, never what ``solve`` returns as successful.
        """
        return None

    def solve(self, problem, damping, prepared=None) -> tuple[jnp.ndarray, dict]:
        """Solve, then check the answer on the original system (see the class docstring).

        Args:
            problem: the :class:`natchain._problem.Problem`.
            damping: ``λ``.
            prepared: what :meth:`prepare` returned (possibly for another problem of the
                same model), or ``None``.

        Raises:
            ValueError: ``prepared`` given to a solver that prepares nothing.
        """
        if prepared is None:
            n, measured = self.compute(problem, damping)
        elif type(self).prepare is AbstractSolver.prepare:
            raise ValueError(
                f"prepared was given, but solver {self.name!r} prepares nothing "
                "(its prepare() returns None); pass prepared=None."
            )
        else:
            n, measured = self.compute(problem, damping, prepared)
        return n, self.check(problem, damping, n, measured)

    def check(self, problem, damping, n, measured) -> dict:
        """The full statistics of the solution ``n``: the residual test on the original
        system (:func:`natchain._status.finish`) with this solver's ``tol`` and
        ``check_float64``, over what the solver ``measured`` (``hit_cap`` read off it)."""
        measured = dict(measured)
        hit_cap = measured.pop("hit_cap", False)
        return finish(
            problem,
            damping,
            n,
            self.tol,
            measured,
            check_float64=self.check_float64,
            hit_cap=hit_cap,
        )

    # Solvers are configuration: hashable by their settings, so they can be static
    # arguments of ``jax.jit``.
    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def check_dense_size(num_params: int, max_params: int | None, solver: str) -> None:
    """Refuse a dense ``P × P`` solve too large to hold, pointing at the matrix-free routes."""
    if max_params is not None and num_params > max_params:
        gib = num_params**2 * 8 / 2**30
        raise ValueError(
            f"solver={solver!r} builds the dense P × P Fisher, but P={num_params} parameters "
            f"(~{gib:.1f} GiB in float64) exceeds max_params={max_params}. Use solver='gram' "
            "or solver='cg', or pass max_params=None to force the dense route."
        )


def check_rcond(rcond) -> None:
    if rcond is not None and not (isinstance(rcond, (int, float)) and 0 <= rcond < 1):
        raise ValueError(f"rcond must lie in [0, 1) or be None; got {rcond!r}.")


def default_rcond(n: int, dtype, damping):
    """The cut-off relative to the largest eigenvalue of ``A + λI``.

    Undamped: ``n · eps`` (as LAPACK's least squares): eigenvalues below it are round-off.
    Damped: ``eps``. Every eigenvalue of ``A + λI`` is at least ``λ`` (the computed
    eigenvalues of ``A`` are clipped at zero before ``λ`` is added), so only a damping
    below the eigensolver's own resolution ``eps · λ_max`` leaves anything to cut: the
    cut-off never discards a direction the damping has made well-conditioned.
    """
    eps = float(jnp.finfo(dtype).eps)
    return jnp.where(jnp.asarray(damping) > 0, eps, n * eps)


def eigh_pinv(mat, damping, rcond=None):
    """Eigendecompose the symmetric PSD ``mat`` for applying ``(mat + λI)⁺``.

    Eigenvalues of ``mat + λI`` at or below ``rcond · max eigenvalue`` are cut
    (``rcond=None``: :func:`default_rcond`). Returns ``(apply, stats)`` with ``apply(rhs)``
    the product with that pseudo-inverse.
    """
    n = mat.shape[0]
    rcond = default_rcond(n, mat.dtype, damping) if rcond is None else rcond
    w, v = jnp.linalg.eigh(mat)
    d = jnp.maximum(w, 0.0) + damping  # a PSD matrix: negative eigenvalues are round-off
    cutoff = rcond * jnp.max(d)
    keep = d > cutoff
    inv = jnp.where(keep, 1.0 / jnp.where(keep, d, 1.0), 0.0)

    def apply(rhs):
        return v @ (inv * (v.T @ rhs))

    rank = jnp.sum(keep)
    stats = {
        "rank": rank,
        "num_cut": n - rank,
        "cutoff": cutoff,
        "condition": jnp.max(d) / jnp.min(jnp.where(keep, d, jnp.inf)),
        "size": n,
    }
    return apply, stats
