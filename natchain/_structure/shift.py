"""Parameter shifts: ``h + view(beta)`` (a bias not paired with a layer, LayerNorm's shift,
learned positional embeddings). The site producing ``h`` absorbs it where it can (bias
pairing, see ``_walk.py``).

Per-example rows: ``D̃_{a,i}`` summed over the axes ``beta`` is broadcast along
(:func:`shift_rows`); ``C = G Gᵀ``. Layer rule: the generic one on ``(h, beta) ↦ h + beta``.
"""

from __future__ import annotations

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


register_pattern(ShiftPattern())
