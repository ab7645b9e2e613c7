"""The registry of layer patterns: one line per pattern, ``register_pattern(MyPattern())``.

The walker asks the patterns in registration order; the first answer that is not ``None``
(a :class:`~natchain._structure._base.Match` or a
:class:`~natchain._structure._base.Decline`) decides. See ``_base.py`` for how to write one.
"""

from __future__ import annotations

from natchain._structure._base import AbstractPattern

#: pattern name -> pattern, in registration order.
PATTERNS: dict[str, AbstractPattern] = {}

#: primitive name -> the patterns that look at its equations, in registration order.
BY_PRIMITIVE: dict[str, list[AbstractPattern]] = {}


def register_pattern(pattern: AbstractPattern) -> AbstractPattern:
    """Register ``pattern`` (an :class:`AbstractPattern` instance); returns it.

    Raises:
        TypeError: ``pattern`` is not an :class:`AbstractPattern` instance.
        ValueError: its name is empty or already registered, or it names no primitive.
    """
    if not isinstance(pattern, AbstractPattern):
        raise TypeError(f"register_pattern expects an AbstractPattern instance; got {pattern!r}.")
    if not pattern.name or pattern.name in PATTERNS:
        raise ValueError(f"pattern name {pattern.name!r} is empty or already registered.")
    if not pattern.primitives:
        raise ValueError(f"pattern {pattern.name!r} names no primitive to look at.")
    PATTERNS[pattern.name] = pattern
    for prim in pattern.primitives:
        BY_PRIMITIVE.setdefault(prim, []).append(pattern)
    return pattern
