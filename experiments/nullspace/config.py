"""Configuration of the null-space experiment.

Four directions train the same tanh MLP from the same initialisation on the same batches;
only the direction differs. Every method follows the same step rule, a learning rate inside
a KL trust region: ``theta ← theta − α s`` with ``α = min(LEARNING_RATE, √(2 MAX_KL / sᵀ
F_theta s))``, so no step changes the model's distribution on its batch by more than the
second-order KL ``MAX_KL``. A step's component in ``null(F_theta)`` does not enter
``sᵀ F_theta s``: two directions that differ only there take the same step on the batch
and differ only in how far they move the parameters elsewhere.
"""

from __future__ import annotations

#: Data settings: data set (``experiments/_data.py``), hidden widths, batch size. The batch
#: is below the inputs' rank (digits: 64 pixels of which a few are constant; MNIST-1D: 40),
#: so a generic batch has ``rank [X 1] = N`` and, while no unit saturates, every map of the
#: modular chain has full row rank: the right-inverse theorem's hypothesis, under which the
#: modular step and its projection take the same step on the batch. ``residual`` records
#: whether it still holds along training.
SETTINGS = {
    "digits": {"data": "digits", "hidden": (32,), "batch": 32},
    "mnist1d": {"data": "mnist1d", "hidden": (32,), "batch": 32},
}

#: The learning rate every method uses (a full natural-gradient step) ...
LEARNING_RATE = 1.0

#: ... unless the step's second-order KL ``½ α² sᵀ F_theta s`` (mean over the batch) would
#: exceed this trust-region radius; then ``α`` shrinks to meet it.
MAX_KL = 0.02

#: Damping of the exact direction (Gram route). ``MAX_KL`` and ``DAMPING`` were chosen by
#: training the exact direction alone on digits (seeds 0 and 1, the quick level) over
#: ``DAMPING ∈ {1e-3, 1e-2}`` × ``MAX_KL ∈ {0.005, 0.02}``: the pair that reached the lowest
#: training loss without a loss spike (with ``1e-3`` and ``0.02`` one seed's training loss
#: rose tenfold between steps 20 and 40). The modular directions were not consulted.
DAMPING = 1e-2

#: Cut-off of the bounded modular step: singular values of an activation map's local
#: Jacobian (``diag σ'``) at or below ``RCOND · max σ'`` are cut, the same threshold at which
#: a unit counts as saturated. Applied to activation maps only where ``natchain.grad``
#: accepts a per-map-kind ``rcond`` mapping, else to every map (recorded per run).
RCOND = 1e-2

#: A hidden unit is saturated on an example when ``|σ'(z)| < SATURATED``.
SATURATED = 1e-2

#: The four directions: ``exact`` ``(F + λI)⁻¹ g`` (Gram, ``λ = DAMPING``); ``modular``
#: the natural chain rule at layer granularity; ``modular-rcond`` the same with the
#: activation inverse bounded by ``RCOND``; ``modular-projected`` the modular step's
#: component in ``range(F_theta)`` on the batch (``natchain.diagnostics.project_to_range``).
METHODS = ("exact", "modular", "modular-rcond", "modular-projected")

#: Run sizes per level.
LEVELS = {
    "smoke": {
        "settings": ("digits",),
        "seeds": (0,),
        "steps": 4,
        "eval_every": 2,
        "batch": 16,
        "max_train": 128,
    },
    "quick": {
        "settings": ("digits",),
        "seeds": (0, 1),
        "steps": 60,
        "eval_every": 20,
        "batch": None,
        "max_train": None,
    },
    "full": {
        "settings": ("digits", "mnist1d"),
        "seeds": (0, 1, 2, 3, 4),
        "steps": 120,
        "eval_every": 20,
        "batch": None,
        "max_train": None,
    },
}
