"""``compare``: how far apart several natural-gradient directions are, in every metric that matters.

Directions live in parameter space, but parameter space is not where they act: two
directions that differ only by a gauge (a null direction of ``F_theta``) move the model
identically. ``compare`` therefore reports each difference three ways — in parameter
space, in function space (``‖J d‖``) and in the Fisher norm (``√(dᵀ F_theta d)``) — and,
per direction, what a unit step ``theta ← theta − n`` does to first and second order.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from natchain._checks import check_finite, check_nonnegative
from natchain._natural_gradient import natural_gradient
from natchain._problem import build_problem

__all__ = [
    "Comparison",
    "DirectionSummary",
    "PairComparison",
    "compare",
    "modular_fn",
    "resolve_method",
]

#: Methods ``compare`` understands by name (``"exact"`` means ``"exact:pinv"``).
METHOD_NAMES = (
    "exact",
    "exact:pinv",
    "exact:gram",
    "exact:cg",
    "exact:cholesky",
    "modular",
    "modular:layer",
    "modular:primitive",
    "sgd",
    "gradient",
)


@dataclasses.dataclass(frozen=True)
class DirectionSummary:
    """What one direction ``n`` does as a unit step ``theta ← theta − n``.

    Attributes:
        norm: ``‖n‖`` in parameter space.
        function_norm: ``‖J n‖`` (all ``N·m`` outputs).
        fisher_norm: ``√(nᵀ F_theta n)``.
        loss_decrease: the first-order decrease of the loss, ``gᵀ n``.
        kl: the second-order KL of the step, ``½ nᵀ F_theta n`` (mean over the batch).
        descent: ``gᵀ n > 0``: the step decreases the loss to first order.
    """

    norm: float
    function_norm: float
    fisher_norm: float
    loss_decrease: float
    kl: float
    descent: bool


@dataclasses.dataclass(frozen=True)
class PairComparison:
    """Two directions ``a`` (listed first, the reference) and ``b``.

    Attributes:
        cosine: ``aᵀb / (‖a‖ ‖b‖)`` in parameter space (``nan`` if either is zero).
        relative_error: ``‖a − b‖ / ‖a‖``.
        function_error: ``‖J (a − b)‖``.
        function_relative_error: ``‖J (a − b)‖ / ‖J a‖``.
        function_cosine: cosine of ``J a`` and ``J b``.
        fisher_error: ``√((a − b)ᵀ F_theta (a − b))``.
        fisher_relative_error: ``fisher_error / √(aᵀ F_theta a)``.
    """

    cosine: float
    relative_error: float
    function_error: float
    function_relative_error: float
    function_cosine: float
    fisher_error: float
    fisher_relative_error: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        labels: the methods' labels, in the order given.
        directions: label → direction (a pytree shaped like ``params``).
        summaries: label → :class:`DirectionSummary`.
        pairs: ``(label_a, label_b)`` → :class:`PairComparison` for every pair, ``a``
            listed before ``b`` in ``labels``.
    """

    labels: tuple[str, ...]
    directions: dict
    summaries: dict
    pairs: dict

    def to_markdown(self) -> str:
        """Two Markdown tables: one row per direction, one row per pair."""
        lines = [
            "| method | ‖n‖ | ‖Jn‖ | gᵀn | ½nᵀFn | descent |",
            "|---|---|---|---|---|---|",
        ]
        for lab in self.labels:
            s = self.summaries[lab]
            lines.append(
                f"| {lab} | {s.norm:.4g} | {s.function_norm:.4g} | {s.loss_decrease:.4g} "
                f"| {s.kl:.4g} | {'yes' if s.descent else 'no'} |"
            )
        lines += [
            "",
            "| a | b | cos | ‖a−b‖/‖a‖ | ‖J(a−b)‖ | ‖J(a−b)‖/‖Ja‖ | Fisher-norm error |",
            "|---|---|---|---|---|---|---|",
        ]
        for (a, b), p in self.pairs.items():
            lines.append(
                f"| {a} | {b} | {p.cosine:.6f} | {p.relative_error:.3g} | "
                f"{p.function_error:.3g} | {p.function_relative_error:.3g} | "
                f"{p.fisher_error:.3g} |"
            )
        return "\n".join(lines)


def _safe_div(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return math.nan
    return float(np.dot(a, b) / (na * nb))


@functools.lru_cache(maxsize=128)
def _cached_modular_fn(model, family, granularity, options):
    import natchain

    return natchain.grad(model, family, method="modular", granularity=granularity, **dict(options))


def modular_fn(model, family, granularity: str = "layer", **options):
    """``natchain.grad(model, family, method="modular", ...)``, cached per configuration.

    The returned function compiles once per argument shape; caching it here lets repeated
    comparisons on the same model reuse the compiled program.

    Raises:
        NotImplementedError: when ``natchain.grad`` is not available.
    """
    import natchain

    if not hasattr(natchain, "grad"):
        raise NotImplementedError(
            "modular methods need natchain.grad (the modular rule), which this installation "
            "does not provide."
        )
    key = tuple(sorted(options.items()))
    try:
        hash((model, family, granularity, key))
    except TypeError:
        return natchain.grad(model, family, method="modular", granularity=granularity, **options)
    return _cached_modular_fn(model, family, granularity, key)


def resolve_method(spec, *, kind="true", damping=0.0, key=None, num_samples=1, options=None):
    """A function ``(model, params, x, y, family) -> direction pytree`` for one method spec.

    Args:
        spec: a name from :data:`METHOD_NAMES` (``"exact:<solver>"``,
            ``"modular:<granularity>"``, ``"sgd"``/``"gradient"``), a callable
            ``fn(params, x, y) -> pytree``, or a direction pytree.
        kind, damping, key, num_samples: passed to the exact solvers.
        options: extra keyword arguments for ``natchain.grad`` (modular methods).

    Raises:
        ValueError: an unknown method name.
        NotImplementedError: a modular method when ``natchain.grad`` is not available.
    """
    options = dict(options or {})
    if isinstance(spec, str):
        name = spec
        if name == "exact":
            name = "exact:pinv"
        if name == "modular":
            name = "modular:layer"
        if name.startswith("exact:"):
            solver = name.split(":", 1)[1]

            def exact(model, params, x, y, family):
                return natural_gradient(
                    model,
                    params,
                    x,
                    y,
                    family,
                    solver=solver,
                    kind=kind,
                    damping=damping,
                    key=key,
                    num_samples=num_samples,
                ).value

            return exact
        if name.startswith("modular:"):
            granularity = name.split(":", 1)[1]

            def modular(model, params, x, y, family):
                return modular_fn(model, family, granularity, **options)(params, x, y)

            return modular
        if name in ("sgd", "gradient"):

            def gradient(model, params, x, y, family):
                prob = build_problem(model, params, x, family, y=y)
                return prob.unravel(prob.gradient())

            return gradient
        raise ValueError(
            f"methods: unknown method name {spec!r}; known names are {METHOD_NAMES} "
            "(or pass a callable fn(params, x, y) or a direction pytree)."
        )
    if callable(spec):
        return lambda model, params, x, y, family: spec(params, x, y)
    return lambda model, params, x, y, family: spec


def _label(spec, index: int) -> str:
    if isinstance(spec, str):
        return spec
    if callable(spec):
        return getattr(spec, "__name__", f"method{index}")
    return f"direction{index}"


def _normalise_methods(methods) -> list[tuple[str, object]]:
    if isinstance(methods, Mapping):
        items = [(str(k), v) for k, v in methods.items()]
    elif isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence):
        raise TypeError(
            "methods must be a sequence of method specs or a mapping label → spec; "
            f"got {methods!r}."
        )
    else:
        items = [(_label(s, i), s) for i, s in enumerate(methods)]
    if len(items) < 2:
        raise ValueError(f"methods: compare needs at least two methods; got {len(items)}.")
    labels = [k for k, _ in items]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"methods: duplicate labels {dup}; pass a mapping label → spec.")
    return items


def compare(
    model: Callable,
    params,
    x,
    y,
    family,
    methods=("exact:pinv", "modular:layer", "sgd"),
    *,
    kind: str = "true",
    damping=0.0,
    key=None,
    num_samples: int = 1,
    modular_options: dict | None = None,
) -> Comparison:
    """Compare natural-gradient directions pairwise, in parameter, function and Fisher space.

    Every difference is measured three ways, because only the last two are invariant to
    the gauge of the parametrisation (docs/theory.md §3): ``‖a − b‖``, ``‖J (a − b)‖`` and
    ``√((a − b)ᵀ F_theta (a − b))``. Each direction is also summarised by the first-order
    loss decrease ``gᵀ n`` and second-order KL ``½ nᵀ F_theta n`` of the unit step
    ``theta ← theta − n``, and flagged as a descent direction when ``gᵀ n > 0``.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        params: parameter pytree (floating-point leaves).
        x: batch of inputs (data).
        y: targets.
        family: the output family.
        methods: a sequence of method specs (labelled by name or ``__name__``) or a
            mapping label → spec. A spec is a name — ``"exact:pinv"`` (or ``"exact"``),
            ``"exact:gram"``, ``"exact:cg"``, ``"exact:cholesky"`` (needs damping > 0),
            ``"modular:layer"`` (or ``"modular"``), ``"modular:primitive"``, ``"sgd"``
            (or ``"gradient"``: the plain gradient) — a callable ``fn(params, x, y)``
            returning a direction, or a direction pytree shaped like ``params``.
        kind: Fisher kind for the exact methods and for the Fisher-norm metrics.
        damping: damping of the exact methods (the metrics use the undamped Fisher).
        key, num_samples: for ``kind="mc"``.
        modular_options: extra keyword arguments for ``natchain.grad`` (modular methods).

    Returns:
        A :class:`Comparison`.

    Raises:
        TypeError / ValueError: bad model inputs (as :func:`natchain.natural_gradient`),
            fewer than two methods, duplicate labels, an unknown method name, a direction
            whose structure or shape differs from ``params`` or is not finite.
    """
    check_nonnegative(damping, "damping")
    items = _normalise_methods(methods)
    prob = build_problem(model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples)
    flat_g = np.asarray(prob.gradient())
    treedef = jax.tree_util.tree_structure(params)
    flats, dirs = {}, {}
    for label, spec in items:
        fn = resolve_method(
            spec,
            kind=kind,
            damping=damping,
            key=key,
            num_samples=num_samples,
            options=modular_options,
        )
        d = fn(model, params, x, y, family)
        if jax.tree_util.tree_structure(d) != treedef:
            raise ValueError(
                f"methods[{label!r}] returned a direction with structure "
                f"{jax.tree_util.tree_structure(d)}, not that of params ({treedef})."
            )
        for (path, leaf), ref in zip(
            jax.tree_util.tree_leaves_with_path(d), jax.tree_util.tree_leaves(params), strict=True
        ):
            if jnp.shape(leaf) != jnp.shape(ref):
                raise ValueError(
                    f"methods[{label!r}]{jax.tree_util.keystr(path)} has shape "
                    f"{jnp.shape(leaf)}; params has {jnp.shape(ref)} there."
                )
        check_finite(d, f"methods[{label!r}] direction")
        flat, _ = ravel_pytree(d)
        flats[label] = np.asarray(flat, dtype=np.float64)
        dirs[label] = d

    labels = tuple(lab for lab, _ in items)
    mat = np.stack([flats[lab] for lab in labels], axis=1)  # (P, k)
    jd = np.asarray(jax.vmap(prob.jvp, in_axes=1, out_axes=-1)(jnp.asarray(mat)))  # (N, m, k)
    fac = np.asarray(prob.factor)  # (N, m, r), 1/sqrt(N) folded in
    mj = np.einsum("nmr,nmk->nrk", fac, jd).reshape(-1, len(labels))  # F_theta = (MᵀJ)ᵀ(MᵀJ)
    jd = jd.reshape(-1, len(labels))

    summaries = {}
    for i, lab in enumerate(labels):
        n = mat[:, i]
        fnorm = float(np.linalg.norm(mj[:, i]))
        dec = float(np.dot(flat_g, n))
        summaries[lab] = DirectionSummary(
            norm=float(np.linalg.norm(n)),
            function_norm=float(np.linalg.norm(jd[:, i])),
            fisher_norm=fnorm,
            loss_decrease=dec,
            kl=0.5 * fnorm**2,
            descent=bool(dec > 0),
        )
    pairs = {}
    for i, j in itertools.combinations(range(len(labels)), 2):
        a, b = mat[:, i], mat[:, j]
        ferr = float(np.linalg.norm(jd[:, i] - jd[:, j]))
        kerr = float(np.linalg.norm(mj[:, i] - mj[:, j]))
        pairs[(labels[i], labels[j])] = PairComparison(
            cosine=_cos(a, b),
            relative_error=_safe_div(float(np.linalg.norm(a - b)), float(np.linalg.norm(a))),
            function_error=ferr,
            function_relative_error=_safe_div(ferr, float(np.linalg.norm(jd[:, i]))),
            function_cosine=_cos(jd[:, i], jd[:, j]),
            fisher_error=kerr,
            fisher_relative_error=_safe_div(kerr, float(np.linalg.norm(mj[:, i]))),
        )
    return Comparison(labels, dirs, summaries, pairs)
