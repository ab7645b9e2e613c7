"""Layer structure: one registry of layer patterns, consumed by every route.

The Gram route (:mod:`natchain._gram`) builds each recognised layer's block of the
output-space Gram matrix from it; the layer granularity of the natural chain rule
(:mod:`natchain._modular._interpreter`) makes each recognised layer one map with the
pattern's rule. Both read the same :class:`Structure`, found once by the walker.
Patterns live one per module; ``_base.py`` says how to write one.
"""

from natchain._structure._base import (
    AbstractPattern,
    Decline,
    GramData,
    Match,
    Operand,
    Shift,
    Site,
    View,
    rows_gram,
    shift_rows,
)
from natchain._structure._registry import PATTERNS, register_pattern

__all__ = [
    "PATTERNS",
    "AbstractPattern",
    "Decline",
    "GramData",
    "Match",
    "Operand",
    "Shift",
    "Site",
    "View",
    "register_pattern",
    "rows_gram",
    "shift_rows",
]

# The patterns, one module each; importing a module registers its pattern.
from natchain._structure import conv, dense, scale, shift  # noqa: E402, F401
