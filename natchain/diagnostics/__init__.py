"""Diagnostics: where the modular natural chain rule is exact, and how far it is off elsewhere.

- :func:`reverse_order_law_holds` / :func:`greville_test` — Greville's conditions for
  ``(AB)⁺ = B⁺A⁺``;
- :func:`rank_report` — rank conditions map by map and a sound verdict
  (*exact by theorem*, naming the theorem, or *not guaranteed*, with every reason);
- :func:`compare` — several directions compared pairwise in parameter, function and
  Fisher space, with the first- and second-order effect of a unit step;
- :func:`step_report` / :func:`project_to_range` — one step's component in
  ``null(F_theta)`` on the batch, its distance from the exact direction and whether it
  solves ``F_theta n = g``.
"""

from natchain.diagnostics._compare import (
    METHOD_NAMES,
    Comparison,
    DirectionSummary,
    PairComparison,
    compare,
    modular_fn,
    resolve_method,
)
from natchain.diagnostics._greville import GrevilleTest, greville_test, reverse_order_law_holds
from natchain.diagnostics._rank import (
    EXACT,
    NOT_GUARANTEED,
    THEOREMS,
    MapReport,
    RankReport,
    rank_report,
)
from natchain.diagnostics._step import (
    STEP_REPORT_KEYS,
    centre_outputs,
    project_to_range,
    step_report,
)

__all__ = [
    "EXACT",
    "METHOD_NAMES",
    "NOT_GUARANTEED",
    "STEP_REPORT_KEYS",
    "THEOREMS",
    "Comparison",
    "DirectionSummary",
    "GrevilleTest",
    "MapReport",
    "PairComparison",
    "RankReport",
    "centre_outputs",
    "compare",
    "greville_test",
    "modular_fn",
    "project_to_range",
    "rank_report",
    "resolve_method",
    "reverse_order_law_holds",
    "step_report",
]
