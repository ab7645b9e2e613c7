"""Primitives that move, replicate, select or sum entries: ``J`` has orthogonal rows or columns.

- ``reshape``, ``transpose``, ``squeeze``, ``rev`` permute entries: ``J⁺ = Jᵀ``.
- ``broadcast_in_dim`` replicates (the duplication map ``x ↦ (x, …, x)``): ``Jᵀ J`` is
  diagonal and ``J⁺`` *averages* the copies' natural cotangents (docs/theory.md §3, fan-out).
- ``reduce_sum`` (``J Jᵀ = G I``) spreads ``n`` evenly over the ``G`` summed entries;
  ``reduce_max``/``reduce_min`` send it to the selected entry; ``slice`` and
  ``concatenate`` select entries; ``dynamic_update_slice`` and ``scatter-add`` send each
  input entry to one output. All have ``J Jᵀ`` diagonal.
- ``gather`` (embedding lookups), ``dynamic_slice`` and ``pad`` read every output from at
  most one input entry (or from the padding value): the columns of ``J`` have disjoint
  supports, ``Jᵀ J`` is diagonal and an entry read ``k`` times receives the mean of the
  ``k`` natural cotangents.
- ``split`` is a permutation onto several outputs: ``J⁺ = Jᵀ`` concatenates them.

``expand_dims`` is not a primitive on the supported JAX versions (it is a
``broadcast_in_dim``), so it needs no rule of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from natchain._modular._core import (
    LocalStats,
    column_orthogonal_rule,
    default_rcond,
    orthogonal_rule,
    row_orthogonal_rule,
    stats_from_squares,
)
from natchain._modular._registry import register_rule

for _name in ("reshape", "transpose", "squeeze", "rev", "reduce_precision"):
    register_rule(_name, orthogonal_rule)

register_rule("broadcast_in_dim", column_orthogonal_rule)

for _name in ("reduce_sum", "reduce_max", "reduce_min", "slice", "concatenate"):
    register_rule(_name, row_orthogonal_rule)

for _name in ("dynamic_update_slice", "scatter-add"):
    register_rule(_name, row_orthogonal_rule)

for _name in ("gather", "dynamic_slice"):
    register_rule(_name, column_orthogonal_rule)


def _joint_column_orthogonal_rule(local, n_out):
    """``J⁺ n = (Jᵀ n) / diag(Jᵀ J)`` when the columns of ``J`` — over *all* differentiated
    inputs together — have disjoint supports (``pad``: each output is one operand entry or
    the padding value). ``diag(Jᵀ J) = Jᵀ J 1`` costs one JVP and one VJP.
    """
    diff_in = local.diff_primals
    _, lin = jax.linearize(lambda *a: local.fn(*a)[0], *diff_in)
    lin_t = jax.linear_transpose(lin, *diff_in)
    cols = lin_t(lin(*[jnp.ones_like(x) for x in diff_in]))
    flat = jnp.concatenate([jnp.ravel(c) for c in cols])
    rcond = default_rcond(local, flat.dtype) if local.rcond is None else local.rcond
    _, stats = stats_from_squares(flat, rcond, min(local.out_size, local.in_size))
    top = jnp.max(flat)
    outs = []
    for c, jtn in zip(cols, lin_t(n_out[0]), strict=True):
        kept = c > (rcond * rcond) * top
        outs.append(jnp.where(kept, jtn / jnp.where(kept, c, 1.0), 0.0))
    return tuple(outs), stats


register_rule("pad", _joint_column_orthogonal_rule)


def _split_rule(local, n_out):
    """``split`` permutes its input onto the outputs: ``J⁺ = Jᵀ`` concatenates them."""
    (x,) = local.primals
    parts = [
        jnp.zeros(jnp.shape(o), jnp.result_type(x)) if n is None else n.astype(x.dtype)
        for n, o in zip(n_out, local.outputs, strict=True)
    ]
    one = jnp.ones((), jnp.result_type(x))
    stats = LocalStats(jnp.asarray(local.in_size), jnp.asarray(0), one)
    return (jnp.concatenate(parts, axis=local.params["axis"]),), stats


register_rule("split", _split_rule)
