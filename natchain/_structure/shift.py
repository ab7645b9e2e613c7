"""Parameter shifts: ``h + view(beta)`` (a bias not paired with a layer, LayerNorm's shift,
learned positional embeddings). The site producing ``h`` absorbs it where it can (bias
pairing, see ``_walk.py``).

Per-example rows: ``D̃_{a,i}`` summed over the axes ``beta`` is broadcast along
(:func:`shift_rows`); ``C = G Gᵀ``.

Layer rule, closed form. With ``P`` the broadcast (each output entry reads one entry of
``beta``; entry ``c`` is read ``K_c`` times) the map is ``y = h + P β``:

- ``h`` data: ``J = P``, ``JᵀJ = diag(K)``: ``n_β = Pᵀ n / K`` (singular values ``√K_c``);
- ``h`` differentiated: ``J = [I, P]``, ``J Jᵀ = I + P Pᵀ`` has eigenvalue ``1 + K_c`` on the
  group of entry ``c`` and ``1`` elsewhere, so ``u = n − P (Pᵀ n / (1 + K))`` and
  ``(n_h, n_β) = (u, Pᵀ u)`` — never rank deficient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from natchain._structure._base import AbstractPattern, Decline, Match, rows_gram, shift_rows
from natchain._structure._registry import register_pattern


class ShiftPattern(AbstractPattern):
    """``add(h, view(beta))`` with ``h`` no parameter."""

    name = "shift"
    primitives = ("add",)
    foldable = True

    def match(self, eqn, operands):
        a, b = operands
        if a.is_param and b.is_param:
            return Decline("a sum of two parameters")
        pos = 1 if b.is_param else 0
        if operands[1 - pos].literal:
            return Decline("a parameter plus a constant")
        return Match({"shift": operands[pos].view}, record=())

    def gram(self, site, data):
        (view,) = site.views
        return rows_gram(shift_rows(data.cot, view.data_axes, data.out_axis))

    def layer_rule(self, site):
        from natchain._modular._core import LocalStats, default_rcond, stats_from_squares

        (view,) = site.views

        def rule(local, n_out):
            h_diff = local.diff[0]
            b = local.primals[1]
            (n,) = n_out
            dtype = jnp.result_type(n)

            def spread(x):  # P: beta -> output
                return jnp.broadcast_to(view.apply(x), jnp.shape(n)).astype(dtype)

            (counts,) = jax.linear_transpose(spread, b)(jnp.ones_like(n))
            gather = jax.linear_transpose(spread, b)
            (ptn,) = gather(n)
            if not h_diff:
                rcond = default_rcond(local, dtype) if local.rcond is None else local.rcond
                keep, stats = stats_from_squares(counts, rcond, min(local.out_size, b.size))
                nb = jnp.where(keep, ptn / jnp.where(keep, counts, 1.0), 0.0)
                return (nb.astype(b.dtype),), stats
            u = n - spread(ptn / (1.0 + counts))
            (nb,) = gather(u)
            one = jnp.ones((), dtype)
            cond = jnp.sqrt(one + jnp.max(counts)) if b.size else one
            stats = LocalStats(jnp.asarray(n.size), jnp.asarray(0), cond)
            return (u.astype(local.primals[0].dtype), nb.astype(b.dtype)), stats

        return rule


register_pattern(ShiftPattern())
