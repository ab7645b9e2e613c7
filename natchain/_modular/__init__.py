"""The natural chain rule: natural cotangents pulled back map by map (docs/theory.md §3)."""

from natchain._modular._api import (
    MapRecord,
    grad,
    modular_trace,
    natural_vjp,
    value_and_grad,
)
from natchain._modular._core import LocalMap, LocalStats, generic_rule
from natchain._modular._layers import layer
from natchain._modular._registry import RULES, register_rule

__all__ = [
    "LocalMap",
    "LocalStats",
    "MapRecord",
    "RULES",
    "generic_rule",
    "grad",
    "layer",
    "modular_trace",
    "natural_vjp",
    "register_rule",
    "value_and_grad",
]
