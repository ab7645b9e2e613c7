"""The interface every exact solver implements."""

from __future__ import annotations

import abc

import jax.numpy as jnp

#: Dense solvers refuse problems with more parameters than this unless told otherwise.
DEFAULT_MAX_PARAMS = 8192


class AbstractSolver(abc.ABC):
    """Solves ``(F_theta + damping·I) n = g`` (minimum-norm when ``damping == 0``).

    Subclasses are small, configured at construction (bad configuration is refused
    there, naming the argument) and return ``(flat_solution, stats)``: value-dependent
    trouble — rank deficiency, a cut-off, CG not converging — is reported in ``stats``,
    never raised from inside a trace.
    """

    name: str = "abstract"

    @abc.abstractmethod
    def solve(self, problem, damping) -> tuple[jnp.ndarray, dict]:
        """Return the flat natural gradient and a dict of statistics."""

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


def default_rcond(n: int, dtype) -> float:
    """The cut-off relative to the largest eigenvalue: ``n · eps`` (as LAPACK's lstsq)."""
    return float(n * jnp.finfo(dtype).eps)


def eigh_pinv_apply(mat, rhs, rcond):
    """Apply the pseudo-inverse of the symmetric PSD ``mat`` to ``rhs`` by ``eigh``.

    Eigenvalues ``≤ rcond · max eigenvalue`` are cut. Returns ``(solution, stats)``.
    """
    w, v = jnp.linalg.eigh(mat)
    cutoff = rcond * jnp.maximum(jnp.max(w), 0.0)
    keep = w > cutoff
    inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
    sol = v @ (inv[..., None] * (v.T @ rhs)) if rhs.ndim > 1 else v @ (inv * (v.T @ rhs))
    rank = jnp.sum(keep)
    stats = {
        "rank": rank,
        "num_cut": mat.shape[0] - rank,
        "cutoff": cutoff,
        "condition": jnp.max(w) / jnp.min(jnp.where(keep, w, jnp.inf)),
    }
    return sol, stats


def relative_residual(matvec, sol, rhs):
    """``‖A x − b‖ / ‖b‖`` (0 when ``b = 0``)."""
    r = matvec(sol) - rhs
    nb = jnp.linalg.norm(rhs)
    return jnp.where(nb > 0, jnp.linalg.norm(r) / jnp.where(nb > 0, nb, 1.0), jnp.linalg.norm(r))
