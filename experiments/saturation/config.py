"""Configuration of the saturation experiment.

A tanh MLP whose first-layer weights are multiplied by ``scale`` so that its hidden
pre-activations move into the flat parts of tanh. For each scale, cut-off ``rcond`` of
the local pseudo-inverses and granularity, the modular natural gradient is compared with
the exact one (dense pseudo-inverse, undamped) on the same batch.
"""

from __future__ import annotations

#: Model and batch: widths, batch size; the output family is Categorical.
MODEL = {"sizes": (8, 16, 3), "batch": 8}

#: First-layer weight multipliers (1 is the usual ``N(0, 1/fan_in)`` initialisation).
SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

#: Cut-offs of the local pseudo-inverses passed to ``natchain.grad(rcond=...)``:
#: ``0`` keeps every non-zero singular value, ``None`` is the library default.
RCONDS = (0.0, None, 1e-6, 1e-3, 1e-1)

#: A hidden unit counts as saturated when ``tanh'(z) = 1 − tanh(z)² < SATURATED``.
SATURATED = 1e-3

LEVELS = {
    "smoke": {
        "seeds": (0,),
        "scales": (1.0, 16.0),
        "rconds": (0.0, 1e-3),
        "granularities": ("layer",),
    },
    "quick": {"seeds": (0, 1), "scales": SCALES, "rconds": RCONDS, "granularities": ("layer",)},
    "full": {
        "seeds": tuple(range(5)),
        "scales": SCALES,
        "rconds": RCONDS,
        "granularities": ("layer", "primitive"),
    },
}
