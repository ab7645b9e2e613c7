"""Configuration of the empirical-vs-true-Fisher experiment.

Linear regression ``y = xᵀw + b + ε``, ``ε ~ N(0, noise²)``, fitted with the Gaussian
family (fixed scale 1) from starting points drawn around the least-squares optimum
``θ*``. One step of size 1 is taken with each direction and its distance to ``θ*``
recorded relative to the start's.
"""

from __future__ import annotations

#: Directions compared. ``kind``/``num_samples``/``damping`` go to
#: ``natchain.natural_gradient`` (dense pseudo-inverse); ``gradient`` is the plain
#: gradient; ``rank-one`` is the batch-mean outer product ``g gᵀ + λI`` (the variant a
#: popular blog post's code calls "empirical Fisher"), whose solution is ``g / (‖g‖² + λ)``.
METHODS = {
    "gradient": {"type": "gradient"},
    "true-fisher": {"type": "natural", "kind": "true"},
    "empirical-fisher": {"type": "natural", "kind": "empirical"},
    "mc-fisher-1": {"type": "natural", "kind": "mc", "num_samples": 1},
    "mc-fisher-16": {"type": "natural", "kind": "mc", "num_samples": 16},
    "rank-one-mean-gradient": {"type": "rank_one", "damping": 1e-3},
}

#: Problem: examples, input dimension, noise scale, spread of the starting points.
PROBLEM = {"num_examples": 64, "dim": 5, "noise": 0.5, "start_spread": 2.0}

#: The 2-parameter problem (``w``, ``b`` with a 1-D input ``shift + scale · N(0, 1)``, off
#: centre so that the gradient field is visibly anisotropic) drawn as a vector field.
FIELD = {
    "num_examples": 64,
    "noise": 0.5,
    "shift": 1.0,
    "scale": 0.5,
    "grid": 13,
    "half_width": 2.0,
}

LEVELS = {
    "smoke": {"seeds": (0,), "starts": 2, "grid": 5},
    "quick": {"seeds": (0, 1, 2), "starts": 8},
    "full": {"seeds": tuple(range(10)), "starts": 20},
}
