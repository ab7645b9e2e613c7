"""Configuration of the agreement experiment: one factor at a time around a base model.

Each point changes one factor of ``BASE`` to one of the values in ``FACTORS`` and draws a
random MLP, batch and targets (sampled from the model's own output distribution) per seed.
The batch sweep crosses the rank threshold of the data-fed first layer: its batch-joint
Jacobian w.r.t. ``(W, b)`` has full row rank iff ``rank [X 1] = N``, i.e. for generic data
iff ``N ≤ input_dim + 1``. The ``data`` factor keeps ``N ≤ input_dim + 1`` but makes one
example the mean of two others (``rank [X 1] = N − 1``).
"""

from __future__ import annotations

#: The base model: dense layers (``depth``), hidden width, batch size, activation, output
#: family (output width ``out``), granularity of the modular rule, input width, data kind.
BASE = {
    "depth": 2,
    "width": 8,
    "batch": 4,
    "activation": "tanh",
    "family": "categorical",
    "granularity": "layer",
    "input_dim": 4,
    "out": 3,
    "data": "generic",
}

#: Values tried for each factor (the others stay at ``BASE``). ``depth`` counts dense
#: layers (``1``: a single dense layer, no activation). ``data``: ``"generic"`` (Gaussian
#: rows) or ``"affine"`` (the last example is the mean of the first two).
FACTORS = {
    "depth": (1, 2, 3, 4),
    "width": (2, 4, 8, 16),
    "batch": (1, 2, 4, 5, 6, 8, 16),
    "activation": ("tanh", "relu", "identity"),
    "family": ("categorical", "gaussian", "bernoulli", "poisson"),
    "granularity": ("layer", "primitive"),
    "data": ("generic", "affine"),
}

#: Agreement threshold used in summaries: relative error ≤ AGREE counts as agreement.
AGREE = 1e-6

LEVELS = {
    "smoke": {"seeds": (0,), "factors": {"depth": (1, 2)}},
    "quick": {"seeds": (0, 1, 2), "factors": FACTORS},
    "full": {"seeds": tuple(range(10)), "factors": FACTORS},
}
