"""Primitives that move, replicate, select or sum entries: ``J`` has orthogonal rows or columns.

- ``reshape``, ``transpose``, ``squeeze``, ``rev`` permute entries: ``J⁺ = Jᵀ``.
- ``broadcast_in_dim`` replicates (the duplication map ``x ↦ (x, …, x)``): ``Jᵀ J`` is
  diagonal and ``J⁺`` *averages* the copies' natural cotangents (docs/theory.md §3, fan-out).
- ``reduce_sum`` (``J Jᵀ = G I``) spreads ``n`` evenly over the ``G`` summed entries;
  ``reduce_max``/``reduce_min`` send it to the selected entry; ``slice`` and
  ``concatenate`` select entries. All have ``J Jᵀ`` diagonal.

``expand_dims`` is not a primitive on the supported JAX versions (it is a
``broadcast_in_dim``), so it needs no rule of its own.
"""

from __future__ import annotations

from natchain._modular._core import (
    column_orthogonal_rule,
    orthogonal_rule,
    row_orthogonal_rule,
)
from natchain._modular._registry import register_rule

for _name in ("reshape", "transpose", "squeeze", "rev"):
    register_rule(_name, orthogonal_rule)

register_rule("broadcast_in_dim", column_orthogonal_rule)

for _name in ("reduce_sum", "reduce_max", "reduce_min", "slice", "concatenate"):
    register_rule(_name, row_orthogonal_rule)
