"""Hypothesis strategies and deterministic builders for small models (the property suite).

Everything is drawn from **small fixed sets** of shapes so that JAX compiles a bounded
number of programs: input width ∈ {2, 3}, hidden widths from :data:`WIDTHS` (depth 1–4;
contracting, expanding and bottleneck shapes), batch ∈ :data:`BATCHES` (1..8), one
output width per family. Weights are made from a NumPy generator seeded by hypothesis,
layer by layer in one of three modes (:data:`WEIGHT_MODES`): scaled Gaussian,
rank-deficient by construction (a rank-1 product), or with orthonormal rows (the layer's
map ``h ↦ Wᵀ h`` has ``Wᵀ W = I``; orthonormal columns when the layer expands).

The builders ``*_case(seed)`` construct the counterexamples of the breaking conditions
(property 3) and are shared with the census (``python -m experiments.census``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from cases import ACTIVATIONS, make_mlp  # noqa: F401  (re-exported for the tests)
from hypothesis import strategies as st

import natchain as nc

#: Hidden widths between input and output: depth 1, 2, 3 and 4 dense layers.
WIDTHS = ((), (4,), (6,), (5, 2), (2, 5), (4, 1, 4))
INPUT_WIDTHS = (2, 3)
BATCHES = (1, 2, 3, 8)
WEIGHT_MODES = ("gaussian", "rank_deficient", "orthonormal")
FAMILY_NAMES = ("gaussian", "bernoulli", "categorical", "hetero", "poisson")


def make_family(name: str, **options):
    """``(family, output width)`` for a family name (one fixed width per family)."""
    if name == "gaussian":
        return nc.Gaussian(scale=0.7), 2
    if name == "bernoulli":
        return nc.Bernoulli(), 2
    if name == "categorical":
        return nc.Categorical(**options), 3
    if name == "hetero":
        return nc.GaussianHetero(), 2
    if name == "poisson":
        return nc.Poisson(), 2
    raise ValueError(f"unknown family name {name!r}")


def make_weight(rng: np.random.Generator, d_in: int, d_out: int, mode: str) -> np.ndarray:
    """A ``(d_in, d_out)`` weight in one of :data:`WEIGHT_MODES`."""
    if mode == "gaussian":
        return rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)
    if mode == "rank_deficient":
        if min(d_in, d_out) == 1:  # rank one is full rank here: make it zero-rank-deficient
            return (
                np.zeros((d_in, d_out))
                if rng.random() < 0.5
                else np.outer(rng.standard_normal(d_in), rng.standard_normal(d_out)) / np.sqrt(d_in)
            )
        u = rng.standard_normal((d_in, 1))
        v = rng.standard_normal((1, d_out))
        return u @ v / np.sqrt(d_in)
    if mode == "orthonormal":
        q, _ = np.linalg.qr(rng.standard_normal((max(d_in, d_out), min(d_in, d_out))))
        return q if d_in >= d_out else q.T
    raise ValueError(f"unknown weight mode {mode!r}")


@dataclasses.dataclass
class Case:
    """One generated problem: ``model(params, x) -> eta`` with targets ``y`` of ``family``.

    ``granularity`` is the granularity the case is meant for (``None``: any);
    ``meta`` describes how it was built (for failure messages and the census).
    """

    model: object
    params: object
    x: jax.Array
    y: jax.Array
    family: object
    meta: dict
    granularity: str | None = None

    @property
    def args(self):
        return self.model, self.params, self.x, self.y, self.family

    def __repr__(self) -> str:
        return f"Case({self.meta})"


def sample_targets(family, eta, seed: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), eta.shape[0])
    return jax.vmap(family.sample)(keys, eta)


def build_mlp_case(
    seed: int,
    *,
    family: str = "gaussian",
    activation: str = "tanh",
    widths: tuple = (4,),
    d_in: int = 3,
    batch: int = 2,
    modes: tuple | None = None,
    bias: bool = True,
    family_options: dict | None = None,
) -> Case:
    """A generated MLP case (deterministic in its arguments)."""
    rng = np.random.default_rng(seed)
    fam, m = make_family(family, **(family_options or {}))
    dims = (d_in, *widths, m)
    modes = modes or ("gaussian",) * (len(dims) - 1)
    params = []
    for a, b, mode in zip(dims[:-1], dims[1:], modes, strict=True):
        layer = {"W": jnp.asarray(make_weight(rng, a, b, mode))}
        if bias:
            layer["b"] = jnp.asarray(0.3 * rng.standard_normal(b))
        params.append(layer)
    x = jnp.asarray(rng.standard_normal((batch, d_in)))
    model = make_mlp(activation)
    y = sample_targets(fam, model(params, x), seed)
    meta = dict(
        family=family,
        activation=activation,
        dims=dims,
        batch=batch,
        modes=tuple(modes),
        bias=bias,
        seed=seed,
    )
    return Case(model, params, x, y, fam, meta)


#: The architectures the suite draws from (shapes from a small fixed set, so JAX compiles
#: a bounded number of programs): family, activation, hidden widths, input width, batch,
#: bias. Depth 1–4; contracting, expanding and bottleneck widths; batch 1..8.
ARCHS = (
    dict(family="gaussian", activation="tanh", widths=(), d_in=3, batch=2, bias=True),
    dict(family="bernoulli", activation="relu", widths=(4,), d_in=2, batch=1, bias=True),
    dict(family="categorical", activation="tanh", widths=(5, 2), d_in=3, batch=3, bias=True),
    dict(family="poisson", activation="identity", widths=(2, 5), d_in=2, batch=8, bias=False),
    dict(family="hetero", activation="tanh", widths=(4, 1, 4), d_in=3, batch=2, bias=True),
    dict(family="gaussian", activation="relu", widths=(6,), d_in=2, batch=8, bias=True),
    dict(family="gaussian", activation="identity", widths=(4,), d_in=3, batch=1, bias=False),
    dict(family="poisson", activation="tanh", widths=(), d_in=2, batch=3, bias=False),
    dict(family="bernoulli", activation="tanh", widths=(), d_in=3, batch=1, bias=False),
    dict(family="categorical", activation="relu", widths=(4,), d_in=2, batch=2, bias=True),
)
#: A subset covering every family, depth 1–4 and every activation (the default draw).
CORE_ARCHS = ARCHS[:5]


@functools.cache
def reparametrised_mlp(activation: str, layer: int):
    """``model((params, x_and_r))`` with ``W_layer = R V``: ``x`` is the pair ``(x, R)``.

    ``R`` travels with the data (it is not differentiated), so one Python function serves
    every draw and JAX compiles it once per shape.
    """
    base = make_mlp(activation)

    def model(params, xr):
        x, r = xr
        params = list(params)
        params[layer] = {**params[layer], "W": r @ params[layer]["W"]}
        return base(params, x)

    model.__name__ = f"mlp_{activation}_reparam{layer}"
    return model


@st.composite
def mlp_cases(draw, archs=CORE_ARCHS, weight_modes=WEIGHT_MODES):
    """Small MLP cases: an architecture from ``archs``, weights drawn layer by layer in one
    of ``weight_modes`` (Gaussian, rank-deficient, orthonormal rows), a random seed."""
    arch = draw(st.sampled_from(archs))
    depth = len(arch["widths"]) + 1
    modes = tuple(draw(st.sampled_from(weight_modes)) for _ in range(depth))
    return build_mlp_case(draw(st.integers(0, 2**31 - 1)), modes=modes, **arch)


# ---- deep linear networks (gauge symmetry) -----------------------------------------------


def deep_linear_model(params, x):
    """``eta = x W_1 W_2 ⋯ W_L`` (no biases, no activations)."""
    h = x
    for w in params:
        h = h @ w
    return h


def build_deep_linear_case(seed: int, *, depth: int = 2, width: int = 2, batch: int = 3) -> Case:
    """A deep linear network of ``depth`` square ``width × width`` invertible layers."""
    rng = np.random.default_rng(seed)
    params = []
    for _ in range(depth):
        q, _ = np.linalg.qr(rng.standard_normal((width, width)))
        s = rng.uniform(0.5, 2.0, width)
        params.append(jnp.asarray(q * s))  # invertible, condition ≤ 4
    x = jnp.asarray(rng.standard_normal((batch, width)))
    fam = nc.Gaussian()
    y = sample_targets(fam, deep_linear_model(params, x), seed)
    meta = dict(kind="deep_linear", depth=depth, width=width, batch=batch, seed=seed)
    return Case(deep_linear_model, params, x, y, fam, meta)


#: (depth, width, batch) of the deep linear networks drawn: batch ≥ width and < width.
DEEP_LINEAR_SHAPES = ((2, 2, 3), (2, 3, 2), (3, 2, 2))


@st.composite
def deep_linear_cases(draw, shapes=DEEP_LINEAR_SHAPES):
    depth, width, batch = draw(st.sampled_from(shapes))
    return build_deep_linear_case(
        draw(st.integers(0, 2**31 - 1)), depth=depth, width=width, batch=batch
    )


# ---- counterexamples of the breaking conditions (property 3, the census) ------------------


def linear_model(params, x):
    """One dense layer without bias: ``eta = x W``."""
    return x @ params["W"]


def expanding_case(seed: int) -> Case:
    """An expanding map: ``eta = x W`` with ``P = 2`` parameters and ``N·m = 16`` outputs.

    ``J`` cannot have full row rank, and the Poisson Fisher differs from example to
    example, so ``J⁺ F_eta⁻¹ g_eta`` is not ``F_theta⁺ g`` (with ``F_eta ∝ I`` it would be).
    """
    rng = np.random.default_rng(seed)
    params = {"W": jnp.asarray(0.5 * rng.standard_normal((1, 2)))}
    x = jnp.asarray(rng.standard_normal((8, 1)))
    fam = nc.Poisson()
    y = sample_targets(fam, linear_model(params, x), seed)
    return Case(linear_model, params, x, y, fam, dict(condition="expanding", seed=seed))


def outer_constant_model(params, xc):
    """``eta = tanh(x W) C``: ``W`` the parameters, ``C`` a constant carried with the data."""
    x, c = xc
    return jnp.tanh(x @ params["W"]) @ c


def reverse_order_case(seed: int) -> Case:
    """A composition that violates the reverse-order law.

    ``eta = tanh(x W) C`` for one example, ``W`` (3×5) the only parameters and ``C`` (5×3)
    a constant (travelling with the data). The chain ``C · diag(tanh') · (x ⊗ I)`` has a
    Greville-violating first split ``(C, diag(tanh'))`` whenever ``tanh'`` is not constant,
    although ``J`` has full row rank and ``F_eta`` is invertible.
    """
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((3, 5)))
    x = jnp.asarray(rng.standard_normal((1, 3)))
    c = jnp.asarray(rng.standard_normal((5, 3)))
    fam = nc.Gaussian()
    y = sample_targets(fam, outer_constant_model({"W": w}, (x, c)), seed)
    meta = dict(condition="reverse_order", seed=seed)
    return Case(outer_constant_model, {"W": w}, (x, c), y, fam, meta)


def multi_layer_case(seed: int) -> Case:
    """Parameters at two layers: a 3→4→2 tanh MLP, Gaussian, batch 2 (``N·m ≤ P``)."""
    case = build_mlp_case(seed, family="gaussian", activation="tanh", widths=(4,), d_in=3, batch=2)
    case.meta["condition"] = "multi_layer"
    return case


def singular_fisher_case(seed: int, representative: str = "pin_last") -> Case:
    """A singular output Fisher: one dense layer with softmax logits, batch 1.

    ``J`` has full row rank, but ``n_eta`` is chosen by ``representative`` (default: the
    last logit held fixed), which is not the minimum-norm choice in parameter space.
    """
    case = build_mlp_case(
        seed,
        family="categorical",
        activation="tanh",
        widths=(),
        d_in=3,
        batch=1,
        family_options={"representative": representative},
    )
    case.meta["condition"] = "singular_fisher"
    return case


def fan_out_model(params, x):
    """``eta_i = w ⊙ x_i`` written example by example: one weight used ``N`` times (fan-out).

    Each use of ``w`` is its own map, so the modular rule pseudo-inverts each use
    separately and averages over the fan-out; the exact answer weighs the examples
    jointly (``Σ_i x_i n_i / Σ_i x_i²`` per coordinate). Written with one broadcast over
    the batch, the same model is a single map and the rule is exact.
    """
    return jnp.concatenate([(params["w"] * x[i])[None, :] for i in range(x.shape[0])])


def fan_out_case(seed: int) -> Case:
    """A weight shared across a batch by fan-out: :func:`fan_out_model`, 4 examples, Gaussian."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal(2))}
    x = jnp.asarray(rng.uniform(0.3, 2.0, (4, 2)) * rng.choice([-1.0, 1.0], (4, 2)))
    fam = nc.Gaussian()
    y = sample_targets(fam, fan_out_model(params, x), seed)
    return Case(fan_out_model, params, x, y, fam, dict(condition="fan_out", seed=seed))


def saturated_case(seed: int, preactivation: float = 17.0) -> Case:
    """A saturated activation: ``eta = tanh(x W)``, batch 2, one unit saturated for one example.

    Unsaturated this chain is exact by the reverse-order law (``diag(tanh')`` invertible,
    ``x ⊗ I`` of full row rank). Here unit 0 has pre-activation ``preactivation`` for
    example 0 only (``tanh' ≈ 4 e^{−2·17} ≈ 7e-15``, under the cut-off) while example 1
    keeps it in the linear range: the rule cuts that entry and the remaining step for the
    shared weight column is no longer the minimum-norm one.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3))
    x[1] = 0.6 * x[0] + 0.8 * rng.standard_normal(3)  # correlated examples
    w = 0.3 * rng.standard_normal((3, 2))
    # Unit 0: pre-activation `preactivation` on example 0, small on example 1.
    a = np.stack([x[0], x[1]])
    target = np.array([preactivation, 0.4 * rng.standard_normal()])
    w[:, 0] = np.linalg.lstsq(a, target, rcond=None)[0]
    params = {"W": jnp.asarray(w)}
    fam = nc.Gaussian()
    xj = jnp.asarray(x)
    y = sample_targets(fam, tanh_layer_model(params, xj), seed)
    meta = dict(condition="saturated", preactivation=preactivation, seed=seed)
    return Case(tanh_layer_model, params, xj, y, fam, meta)


# ---- linear reparametrisation of one layer (property 5) -----------------------------------

#: Architectures for property 5 (no ReLU: every layer must influence the output).
REPARAM_ARCHS = (ARCHS[0], ARCHS[2], ARCHS[6])


def reparametrise(case: Case, layer: int, seed: int) -> Case:
    """The same point of function space with ``W_layer = R V`` (``V = R⁻¹ W``), ``R``
    invertible and not orthogonal (``R`` travels with the data, see
    :func:`strategies.reparametrised_mlp`)."""
    rng = np.random.default_rng(seed)
    w = case.params[layer]["W"]
    d = w.shape[0]
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    r = q * rng.uniform(0.3, 3.0, d) + 0.5 * np.triu(rng.standard_normal((d, d)), 1)
    r = jnp.asarray(r)
    params = list(case.params)
    params[layer] = {**params[layer], "W": jnp.linalg.solve(r, w)}
    model = reparametrised_mlp(case.meta["activation"], layer)
    return Case(model, params, (case.x, r), case.y, case.family, case.meta)


# ---- models where a theorem applies (non-vacuous soundness checks) ----------------------


def linear_outer_model(params, xc):
    """``eta = (x W + b) C``: parameters in the inner layer, a constant outer map ``C``."""
    x, c = xc
    return (x @ params["W"] + params["b"]) @ c


def tanh_layer_model(params, x):
    """``eta = tanh(x W)``: an activation over one bias-free dense layer."""
    return jnp.tanh(x @ params["W"])


def exact_prone_case(seed: int, kind: str) -> Case:
    """Models for which a theorem of :func:`natchain.diagnostics.rank_report` can apply.

    - ``"dense"``: one dense layer, an invertible output Fisher (Bernoulli, Poisson,
      heteroscedastic or Gaussian), ``N ≤ 2`` examples, so ``J`` has full row rank;
    - ``"softmax_dense"``: one dense layer with softmax logits (singular ``F_eta``),
      minimum-norm representative, ``N ≤ 3`` (``K = A ⊗ I_m`` commutes with the projector
      onto ``null(F_blk)``);
    - ``"dense_expanding"``: one bias-free dense layer with ``N·m > P`` and a Gaussian
      output (isotropic Fisher: the identity needs no full row rank);
    - ``"tanh"``: ``tanh(x W)`` over ``N ≤ 2`` examples (``diag(tanh')`` invertible,
      ``x ⊗ I`` of full row rank: the reverse-order law holds);
    - ``"linear_outer"``: ``(x W + b) C`` with a constant ``C`` (Kronecker structure: the
      reverse-order law holds for the split ``(C, ·)``).
    """
    rng = np.random.default_rng(seed)
    if kind == "dense":
        fam = ("bernoulli", "poisson", "hetero", "gaussian")[seed % 4]
        return build_mlp_case(
            seed, family=fam, activation="tanh", widths=(), d_in=3, batch=1 + seed % 2
        )
    if kind == "softmax_dense":
        return build_mlp_case(
            seed, family="categorical", activation="tanh", widths=(), d_in=3, batch=1 + seed % 3
        )
    if kind == "dense_expanding":
        return build_mlp_case(
            seed, family="gaussian", activation="tanh", widths=(), d_in=2, batch=3, bias=False
        )
    if kind == "tanh":
        fam = nc.Gaussian(scale=0.7)
        params = {"W": jnp.asarray(0.5 * rng.standard_normal((3, 2)))}
        x = jnp.asarray(rng.standard_normal((2, 3)))
        y = sample_targets(fam, tanh_layer_model(params, x), seed)
        return Case(tanh_layer_model, params, x, y, fam, dict(kind=kind, seed=seed))
    if kind == "linear_outer":
        fam = nc.Poisson()
        params = {
            "W": jnp.asarray(0.5 * rng.standard_normal((3, 4))),
            "b": jnp.asarray(0.1 * rng.standard_normal(4)),
        }
        x = jnp.asarray(rng.standard_normal((2, 3)))
        c = jnp.asarray(0.5 * rng.standard_normal((4, 2)))
        y = sample_targets(fam, linear_outer_model(params, (x, c)), seed)
        return Case(linear_outer_model, params, (x, c), y, fam, dict(kind=kind, seed=seed))
    raise ValueError(f"unknown kind {kind!r}")


EXACT_PRONE_KINDS = ("dense", "softmax_dense", "dense_expanding", "tanh", "linear_outer")


@st.composite
def soundness_cases(draw):
    """A generated MLP (usually *not guaranteed*) or a model where a theorem may apply."""
    if draw(st.booleans()):
        return draw(mlp_cases())
    return exact_prone_case(
        draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(EXACT_PRONE_KINDS))
    )


#: Breaking condition → builder (each draws a new model per seed).
COUNTEREXAMPLES = {
    "expanding": expanding_case,
    "reverse_order": reverse_order_case,
    "multi_layer": multi_layer_case,
    "singular_fisher": singular_fisher_case,
    "fan_out": fan_out_case,
    "saturated": saturated_case,
}


# ---- matrix pairs for Greville's test (property 4) ---------------------------------------

#: (m, k, n) shapes of the pairs ``A`` (m × k), ``B`` (k × n).
PAIR_SHAPES = ((2, 2, 2), (3, 2, 4), (2, 4, 3), (4, 3, 2), (3, 5, 3), (5, 3, 5))


def _orthonormal(rng, rows, cols, batch):
    q, _ = np.linalg.qr(rng.standard_normal((batch, max(rows, cols), min(rows, cols))))
    return q if rows >= cols else np.swapaxes(q, -1, -2)


def _low_rank(rng, rows, cols, rank, batch):
    return rng.standard_normal((batch, rows, rank)) @ rng.standard_normal((batch, rank, cols))


def matrix_pairs(rng: np.random.Generator, shape, batch: int, construction: str):
    """A stack of ``batch`` pairs ``(A, B)`` of one shape built by ``construction``.

    Constructions where the reverse-order law holds by a theorem: ``"orthonormal_b"`` (B has
    orthonormal rows, or — when B is tall — A has orthonormal columns), ``"shared_basis"``
    (``A = U D₁ Vᵀ``, ``B = V D₂ Wᵀ`` with zeros in ``D₁``, ``D₂``: rank-deficient, holds),
    ``"full_rank"`` (A of full column rank, B of full row rank, where the shape allows).
    Generic constructions (usually fail): ``"random"`` and ``"low_rank"`` (both
    factors rank-deficient). Entries are scaled by powers of ten to exercise scale
    invariance.
    """
    m, k, n = shape
    if construction == "orthonormal_b":
        if k <= n:
            a = rng.standard_normal((batch, m, k))
            b = _orthonormal(rng, k, n, batch)
        else:
            a = _orthonormal(rng, m, k, batch) if m >= k else rng.standard_normal((batch, m, k))
            b = rng.standard_normal((batch, k, n))
            if m < k:  # neither side can be made orthonormal: use the shared basis
                return matrix_pairs(rng, shape, batch, "shared_basis")
    elif construction == "shared_basis":
        u = _orthonormal(rng, m, m, batch)
        v = _orthonormal(rng, k, k, batch)
        w = _orthonormal(rng, n, n, batch)
        d1 = np.zeros((batch, m, k))
        d2 = np.zeros((batch, k, n))
        r1, r2 = min(m, k), min(k, n)
        d1[:, np.arange(r1), np.arange(r1)] = rng.uniform(0.5, 2, (batch, r1)) * (
            rng.random((batch, r1)) < 0.7
        )
        d2[:, np.arange(r2), np.arange(r2)] = rng.uniform(0.5, 2, (batch, r2)) * (
            rng.random((batch, r2)) < 0.7
        )
        a, b = u @ d1 @ np.swapaxes(v, -1, -2), v @ d2 @ np.swapaxes(w, -1, -2)
    elif construction == "full_rank":
        a = rng.standard_normal((batch, m, k))
        b = rng.standard_normal((batch, k, n))
    elif construction == "random":
        a = rng.standard_normal((batch, m, k))
        b = rng.standard_normal((batch, k, n))
    elif construction == "low_rank":
        a = _low_rank(rng, m, k, 1, batch)
        b = _low_rank(rng, k, n, 1, batch)
    else:
        raise ValueError(f"unknown construction {construction!r}")
    scale_a = 10.0 ** rng.integers(-3, 4, (batch, 1, 1))
    scale_b = 10.0 ** rng.integers(-3, 4, (batch, 1, 1))
    return a * scale_a, b * scale_b


HOLDING_CONSTRUCTIONS = ("orthonormal_b", "shared_basis")
GENERIC_CONSTRUCTIONS = ("random", "low_rank", "full_rank")


def _pinv_cut(mat: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a stack, singular values ``≤ cut`` (per matrix) treated as zero."""
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    keep = s > cut[..., None]
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    return np.swapaxes(vt, -1, -2) @ (inv[..., None] * np.swapaxes(u, -1, -2))


def numerical_reverse_order(a: np.ndarray, b: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """``‖(AB)⁺ − B⁺A⁺‖_F < tol · max(‖(AB)⁺‖_F, ‖A⁺‖₂‖B⁺‖₂)`` for stacks of pairs.

    Ranks are decided against the factors' scale (``1e-10 · ‖A‖₂``, ``1e-10 · ‖B‖₂``,
    ``1e-10 · ‖A‖₂ ‖B‖₂`` for ``AB``), so that a product that is zero up to round-off
    is zero, as in :func:`natchain.diagnostics.greville_test`.
    """
    na = np.linalg.norm(a, 2, axis=(-2, -1))
    nb = np.linalg.norm(b, 2, axis=(-2, -1))
    pa, pb = _pinv_cut(a, 1e-10 * na), _pinv_cut(b, 1e-10 * nb)
    pab = _pinv_cut(a @ b, 1e-10 * na * nb)
    diff = np.linalg.norm(pab - pb @ pa, axis=(-2, -1))
    scale = np.maximum(
        np.linalg.norm(pab, axis=(-2, -1)),
        np.linalg.norm(pa, 2, axis=(-2, -1)) * np.linalg.norm(pb, 2, axis=(-2, -1)),
    )
    return diff <= tol * scale
