"""Elementwise parameter scales: ``h * gamma`` with ``gamma`` broadcast (LayerNorm/RMSNorm
affine scale, per-channel scales); a shift added to the product is folded (``h * gamma + beta``).

Per-example rows: ``∂⟨D̃_a, h ∘ view(γ)⟩/∂γ`` restricted to example ``i`` is ``D̃_{a,i} ∘ h_i``
summed over the axes ``γ`` is broadcast along (:func:`shift_rows` of ``D̃ ∘ h``);
``C = G Gᵀ``. At layer granularity the site ``(h, γ[, β]) ↦ h ∘ γ (+ β)`` is one map with
the generic rule.
"""

from __future__ import annotations

import jax.numpy as jnp

from natchain._structure._base import AbstractPattern, Decline, Match, rows_gram, shift_rows
from natchain._structure._registry import register_pattern


class ScalePattern(AbstractPattern):
    """``mul(h, view(gamma))`` with ``h`` no parameter."""

    name = "scale"
    primitives = ("mul",)

    def match(self, eqn, operands):
        a, b = operands
        if a.is_param and b.is_param:
            return Decline("a product of two parameters")
        pos = 1 if b.is_param else 0
        h = operands[1 - pos]
        if h.literal:
            return Decline("a parameter times a constant")
        return Match({"scale": operands[pos].view}, record=(1 - pos,))

    def absorb(self, site, shift):
        return True

    def gram(self, site, data):
        (h,), _, cot, out_axis = data
        (view, *_) = site.views
        rows = shift_rows(cot * h[None].astype(cot.dtype), view.data_axes, out_axis)
        if site.shift is not None:
            extra = shift_rows(cot, site.shift.data_axes, out_axis)
            rows = jnp.concatenate([rows, extra], axis=2)
        return rows_gram(rows)


register_pattern(ScalePattern())
