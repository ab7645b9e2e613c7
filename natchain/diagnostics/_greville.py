"""Greville's test for the reverse-order law ``(AB)⁺ = B⁺A⁺``.

Greville (1966): for real ``A`` (``m × k``) and ``B`` (``k × n``),
``(AB)⁺ = B⁺A⁺`` if and only if

1. ``range(B Bᵀ Aᵀ) ⊆ range(Aᵀ)`` and
2. ``range(Aᵀ A B) ⊆ range(B)``.

Tolerance semantics (one number, ``tol``, used twice):

- **rank decisions** — a singular value ``σ`` of ``A`` (or ``B``) counts as zero when
  ``σ ≤ tol · σ_max``; the orthogonal projectors onto ``range(Aᵀ)`` and ``range(B)`` are
  built from the singular vectors that survive this relative cut-off;
- **inclusions** — the part of each product outside the range it must lie in is measured
  against the natural scale of that product, the product of the factors' spectral norms:
  condition 1 holds when ``‖(I − Π_{range(Aᵀ)}) B Bᵀ Aᵀ‖_F ≤ tol · ‖A‖₂ ‖B‖₂²`` and
  condition 2 when ``‖(I − Π_{range(B)}) Aᵀ A B‖_F ≤ tol · ‖A‖₂² ‖B‖₂``. A product that is
  zero up to round-off (``AB ≈ 0``) is thus contained in every range, as it should be,
  rather than judged by the direction of its rounding noise. A zero ``A`` or ``B`` passes.

Both decisions are scale invariant: multiplying ``A`` or ``B`` by a non-zero constant
never changes the answer. The matching numerical test (used by the property suite)
decides the rank of ``AB`` against the same scale, ``tol · ‖A‖₂ ‖B‖₂``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["GrevilleTest", "greville_test", "reverse_order_law_holds"]

#: Default tolerance: relative singular-value cut-off and relative inclusion residual.
DEFAULT_TOL = 1e-8


class GrevilleTest(NamedTuple):
    """The pieces of Greville's test (arrays over any leading batch dimensions).

    Attributes:
        holds: both inclusions hold (the reverse-order law holds).
        residual_left: ``‖(I − Π_{range(Aᵀ)}) B Bᵀ Aᵀ‖_F / (‖A‖₂ ‖B‖₂²)`` (condition 1).
        residual_right: ``‖(I − Π_{range(B)}) Aᵀ A B‖_F / (‖A‖₂² ‖B‖₂)`` (condition 2).
        rank_a: numerical rank of ``A`` under the relative cut-off.
        rank_b: numerical rank of ``B`` under the relative cut-off.
    """

    holds: np.ndarray
    residual_left: np.ndarray
    residual_right: np.ndarray
    rank_a: np.ndarray
    rank_b: np.ndarray


def _as_matrix_stack(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be array-like; got {type(value).__name__}.") from err
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}.")
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must be a matrix (or a stack of matrices); got shape {arr.shape}."
        )
    if arr.size and not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf).")
    return arr.astype(np.float64, copy=False)


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"tol must be a real number; got {tol!r}.")
    tol = float(tol)
    if not np.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0; got {tol!r}.")
    if tol >= 1:
        raise ValueError(f"tol must be < 1 (it is a relative cut-off); got {tol!r}.")
    return tol


def _range_projector(mat: np.ndarray, tol: float, side: str):
    """Projector onto the column (``side="col"``) or row space, the rank and ``‖mat‖₂``."""
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    smax = s[..., :1] if s.shape[-1] else np.zeros(s.shape[:-1] + (1,))
    keep = s > tol * smax
    if side == "col":
        basis = u * keep[..., None, :]
    else:
        basis = np.swapaxes(vt, -1, -2) * keep[..., None, :]
    return basis @ np.swapaxes(basis, -1, -2), keep.sum(axis=-1), smax[..., 0]


def _outside_residual(proj: np.ndarray, mat: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``‖(I − proj) mat‖_F / scale`` (0 when ``scale`` is zero: a zero factor)."""
    out = mat - proj @ mat
    num = np.sqrt(np.sum(out * out, axis=(-2, -1)))
    return np.where(scale > 0, num / np.where(scale > 0, scale, 1.0), 0.0)


def greville_test(A, B, tol: float = DEFAULT_TOL) -> GrevilleTest:
    """Run Greville's test for ``(AB)⁺ = B⁺A⁺`` and return its pieces.

    ``A`` (``(..., m, k)``) and ``B`` (``(..., k, n)``) may carry matching leading batch
    dimensions (broadcast as in ``numpy.matmul``); the test is then vectorised over them.

    Args:
        A: the left (outer) factor.
        B: the right (inner) factor.
        tol: relative singular-value cut-off for the rank decisions and relative
            tolerance for the two inclusions (see the module docstring); ``0 < tol < 1``.

    Returns:
        A :class:`GrevilleTest` (NumPy arrays; 0-d for a single pair).

    Raises:
        TypeError: non-numeric input or a non-numeric ``tol``.
        ValueError: fewer than two dimensions, inner dimensions that differ
            (``A.shape[-1] != B.shape[-2]``), non-finite entries, ``tol ≤ 0`` or ``≥ 1``.
    """
    tol = _check_tol(tol)
    a = _as_matrix_stack(A, "A")
    b = _as_matrix_stack(B, "B")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"A and B do not chain: A has shape {a.shape} ({a.shape[-1]} columns) but B has "
            f"shape {b.shape} ({b.shape[-2]} rows); the product AB needs them equal."
        )
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError as err:
        raise ValueError(
            f"the leading (batch) dimensions of A {a.shape[:-2]} and B {b.shape[:-2]} do not "
            "broadcast."
        ) from err
    at = np.swapaxes(a, -1, -2)
    proj_at, rank_a, norm_a = _range_projector(a, tol, side="row")  # onto range(Aᵀ)
    proj_b, rank_b, norm_b = _range_projector(b, tol, side="col")  # onto range(B)
    left = _outside_residual(proj_at, b @ np.swapaxes(b, -1, -2) @ at, norm_a * norm_b**2)
    right = _outside_residual(proj_b, at @ a @ b, norm_a**2 * norm_b)
    holds = (left <= tol) & (right <= tol)
    return GrevilleTest(holds, left, right, rank_a, rank_b)


def reverse_order_law_holds(A, B, tol: float = DEFAULT_TOL):
    """Whether ``(AB)⁺ = B⁺A⁺``, by Greville's necessary and sufficient conditions.

    Checks ``range(B Bᵀ Aᵀ) ⊆ range(Aᵀ)`` and ``range(Aᵀ A B) ⊆ range(B)`` numerically:
    singular values ``≤ tol · σ_max`` count as zero when the ranges are formed, and an
    inclusion holds when the residual of the projection is ``≤ tol`` relative to the
    product of the factors' norms (see the module docstring, and :func:`greville_test` for
    the residuals themselves). Sufficient special cases it recognises automatically:
    ``B`` with orthonormal rows, ``A`` with orthonormal columns, ``A`` of full column
    rank with ``B`` of full row rank.

    Args:
        A: ``(m, k)`` matrix (or a stack ``(..., m, k)``).
        B: ``(k, n)`` matrix (or a stack ``(..., k, n)``).
        tol: ``0 < tol < 1``; relative cut-off and relative inclusion tolerance.

    Returns:
        ``bool`` for one pair, a boolean array for stacks.

    Raises:
        TypeError / ValueError: as :func:`greville_test` (mismatched shapes, non-finite
            entries, ``tol ≤ 0``), each message naming the argument.

    Example:
        >>> reverse_order_law_holds([[1.0, 0.0], [0.0, 0.0]], [[2.0, 1.0], [1.0, 2.0]])
        False
    """
    holds = greville_test(A, B, tol).holds
    return bool(holds) if np.ndim(holds) == 0 else holds
