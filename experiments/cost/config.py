"""Configuration of the cost experiment.

A ``784-width-10`` tanh MLP (float32, categorical outputs, MNIST-shaped random inputs),
the same model and step functions as ``benchmarks/bench.py``. Each route's jitted step is
timed (median of ``reps`` calls after warm-up) beside a jitted SGD step in the same
process; the growth with batch size (at the default width) and with width (at the
default batch) is summarised by the slope of a least-squares line in log–log axes.
"""

from __future__ import annotations

#: Routes timed; names as in ``benchmarks/bench.py``'s table (``gram_cg``, the output-space
#: CG, to the CG routes' relative residual), and ``pcg (true Fisher)``: the
#: Kronecker-preconditioned CG (``solver="pcg"``) to the same relative residual as the CG
#: routes, without their step cap (it is exact: its status says the residual was met).
ROUTES = (
    "gram (true Fisher)",
    "gram_cg (true Fisher)",
    "cg (true Fisher)",
    "cg (empirical Fisher)",
    "pcg (true Fisher)",
    "modular, layer granularity",
    "modular, primitive granularity",
)

LEVELS = {
    "smoke": {
        "batches": (4, 8),
        "widths": (16, 32),
        "width": 16,
        "batch": 4,
        "reps": 2,
        "routes": ("gram (true Fisher)", "pcg (true Fisher)", "modular, layer granularity"),
    },
    "quick": {
        "batches": (8, 32, 128, 512),
        "widths": (32, 128),
        "width": 128,
        "batch": 32,
        "reps": 5,
        "routes": ROUTES,
    },
    "full": {
        "batches": (8, 16, 32, 64, 128, 256, 512),
        "widths": (32, 64, 128, 256, 512),
        "width": 128,
        "batch": 32,
        "reps": 10,
        "routes": ROUTES,
    },
}
