"""Public entry points of the natural chain rule: ``natural_vjp``, ``grad``, ``modular_trace``."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from natchain._checks import check_choice, check_finite, check_float_params, is_concrete
from natchain._modular._core import is_float, local_jacobian
from natchain._modular._interpreter import (
    check_options,
    report_structure,
    trace_chain,
    zeros_for,
)
from natchain._natural_gradient import natural_gradient
from natchain._problem import KINDS, build_problem, check_family, output_factor, validate_inputs
from natchain._sharding import call_on_mesh
from natchain._status import finish

METHODS = ("modular", "exact")


class MapRecord(NamedTuple):
    """One map of the modular backward chain, for diagnostics.

    Attributes:
        name: the primitive's name (``"tanh"``, ``"dot_general"``), ``"dense"`` for a
            recognised dense layer, the activation's or marked layer's name, or
            ``"fanout"`` for the duplication of a value used by several maps.
        kind: a layer pattern's name (``"dense"``, ``"scale"``, ``"shift"``, …),
            ``"activation"``, ``"layer"``, ``"primitive"``, ``"generic"`` or ``"fanout"``.
        jacobian: the dense local Jacobian, ``(out_size, in_size)``, w.r.t. the map's
            differentiated inputs only (parameters and upstream activations, never data
            or integers). Columns: the differentiated inputs in the map's order (for
            ``"dense"``: ``H`` when it is an activation, then ``W`` as stored, then ``b``),
            each flattened row-major, concatenated; rows: the output flattened
            row-major. A ``"fanout"`` map of a value used ``k`` times is ``k`` stacked
            identities.
        in_shapes: the shapes of the differentiated inputs, in column order.
        out_shape: the output's shape (``(k, *shape)`` for a fan-out; a tuple of shapes
            for a map with several floating-point outputs).
    """

    name: str
    kind: str
    jacobian: jax.Array
    in_shapes: tuple
    out_shape: tuple


def _flatten_model(model, params, x):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)

    def fn(*args):
        ps = jax.tree_util.tree_unflatten(treedef, args[: len(leaves)])
        xs = jax.tree_util.tree_unflatten(x_def, args[len(leaves) :])
        return model(ps, xs)

    return fn, leaves, treedef, x_leaves


def _record_chain(model, params, x, granularity, rcond, fallback, strict=False):
    fn, leaves, treedef, x_leaves = _flatten_model(model, params, x)
    chain, leaf_ids, out_ids, outs, out_tree = trace_chain(
        fn, leaves, x_leaves, granularity=granularity, rcond=rcond, fallback=fallback
    )
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    report_structure(chain, out_ids, paths, strict)
    if len(outs) != 1:
        raise ValueError(
            f"model must return one array of shape (N, m); it returned {len(outs)} arrays."
        )
    return chain, leaf_ids, out_ids, outs[0], treedef, leaves


def _stats_dict(stats, fanouts):
    """Per-map statistics of the backward chain: ``maps``, ``num_cut``, ``num_fanouts``."""
    maps, total = {}, jnp.zeros((), jnp.int32)
    for j, (node, st) in enumerate(stats):
        if st is None:
            continue
        key = f"{j:03d}_{node.kind}_{node.name}"
        maps[key] = {
            "rank": jnp.asarray(st.rank),
            "num_cut": jnp.asarray(st.num_cut),
            "condition": jnp.asarray(st.condition),
        }
        total = total + jnp.asarray(st.num_cut, jnp.int32)
    return {"maps": maps, "num_cut": total, "num_fanouts": jnp.asarray(len(fanouts))}


def natural_vjp(
    fun, *primals, granularity="layer", rcond=None, fallback="error", return_stats=False
):
    """The natural counterpart of :func:`jax.vjp`: pull natural cotangents back map by map.

    Every floating-point leaf of ``primals`` is differentiated (integer leaves are not; to
    keep data out of the local Jacobians, close over it, as with :func:`jax.vjp`). The
    function's jaxpr is split into maps (see ``granularity``); the returned function sends
    a natural cotangent ``n_y`` of the output backwards through each map's natural rule
    ``n_z = J⁺ n_y`` and averages over fan-outs.

    Args:
        fun: the function to pull back through.
        *primals: its arguments (pytrees of arrays).
        granularity: ``"layer"`` (recognised dense layers, elementwise activations and
            :func:`natchain.layer`-marked functions are one map each; everything else one
            primitive) or ``"primitive"`` (every primitive is a map).
        rcond: singular values ``≤ rcond · s_max`` of each local Jacobian are cut
            (``None``: each rule's default, ``max(out, in) · eps`` — Gram-based rules
            ``sqrt(size · eps)``). A mapping from map kind (:attr:`MapRecord.kind`:
            ``"activation"``, ``"dense"``, ``"scale"``, ``"shift"``, ``"conv"``,
            ``"layer"``, ``"primitive"``, ``"generic"``) to such a value sets the cut-off
            per kind; kinds it omits take its ``"default"`` entry, else ``None``. Unknown
            kinds or bad values raise ``ValueError``.
        fallback: ``"error"`` (a primitive without a rule raises
            ``NotImplementedError``) or ``"generic"`` (its local Jacobian is materialised
            and pseudo-inverted).
        return_stats: make the pull-back return ``(cotangents, stats)``.

    Returns:
        ``(out, pullback)``; ``pullback(n_out)`` returns a tuple with one natural
        cotangent per primal (zeros of dtype ``float0`` for integer leaves).

    Raises:
        NotImplementedError: a primitive without a natural rule (named), unless
            ``fallback="generic"``.
        ValueError: bad options; a cotangent of the wrong structure or shape.
    """
    check_options(granularity, fallback, rcond)
    leaves, in_tree = jax.tree_util.tree_flatten(primals)

    def flat_fun(*ls):
        return fun(*jax.tree_util.tree_unflatten(in_tree, ls))

    chain, leaf_ids, out_ids, outs, out_tree = trace_chain(
        flat_fun, leaves, [], granularity=granularity, rcond=rcond, fallback=fallback
    )
    out = jax.tree_util.tree_unflatten(out_tree, outs)

    def pullback(n_out):
        n_leaves, n_tree = jax.tree_util.tree_flatten(n_out)
        if n_tree != out_tree:
            raise ValueError(
                f"natural cotangent has structure {n_tree}, but the output has {out_tree}."
            )
        for n, o in zip(n_leaves, outs, strict=True):
            if jnp.shape(n) != jnp.shape(o):
                raise ValueError(
                    f"natural cotangent of shape {jnp.shape(n)} for an output of shape "
                    f"{jnp.shape(o)}."
                )
        nat, stats = chain.backward(out_ids, n_leaves, leaf_ids)
        res = [nat.get(i, zeros_for(leaf)) for i, leaf in zip(leaf_ids, leaves, strict=True)]
        cot = jax.tree_util.tree_unflatten(in_tree, res)
        return (cot, _stats_dict(stats, [])) if return_stats else cot

    return out, pullback


def _output_natural_cotangent(family, eta, y, kind, key, num_samples):
    """Per-example ``n_eta,i = F_i⁺ ∇nll_i`` (the ``1/N`` of the loss and Fisher cancel)."""
    g = jax.vmap(jax.grad(family.nll))(eta, y)
    if kind == "true":
        return jax.vmap(family.natural_cotangent)(eta, g)
    ms = output_factor(family, eta, kind, y=y, key=key, num_samples=num_samples)
    fisher = jnp.einsum("nmr,nkr->nmk", ms, ms)
    return jnp.einsum("nmk,nk->nm", jnp.linalg.pinv(fisher, hermitian=True), g)


def _modular_grad(
    model,
    family,
    params,
    x,
    y,
    key,
    *,
    granularity,
    rcond,
    fallback,
    kind,
    num_samples,
    with_stats=True,
    strict=False,
):
    """The traced part of the modular natural gradient (shape checks only)."""
    chain, leaf_ids, out_ids, eta, treedef, leaves = _record_chain(
        model, params, x, granularity, rcond, fallback, strict
    )
    family.check_output(eta)
    family.check_targets(y, eta)
    loss = jnp.mean(jax.vmap(family.nll)(eta, y))
    n_eta = _output_natural_cotangent(family, eta, y, kind, key, num_samples)
    fanouts = set()
    nat, stats = chain.backward(out_ids, [n_eta], leaf_ids, on_fanout=lambda i, k: fanouts.add(i))
    res = [nat.get(i, jnp.zeros_like(leaf)) for i, leaf in zip(leaf_ids, leaves, strict=True)]
    nat_tree = jax.tree_util.tree_unflatten(treedef, res)
    if with_stats:
        stats = _stats_dict(stats, fanouts)
        # The shared schema: is the modular step a natural gradient, F m = g? (one FVP)
        prob = build_problem(
            model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples
        )
        shared = finish(prob, 0.0, nat_tree, None, {"num_cut": stats["num_cut"]})
        stats = {**shared, **stats}
    else:
        stats = None
    return loss, nat_tree, stats, eta


def value_and_grad(
    model,
    family,
    *,
    method="modular",
    granularity="layer",
    rcond=None,
    fallback="error",
    kind="true",
    num_samples=1,
    solver="pinv",
    damping=0.0,
    return_stats=False,
    strict=False,
    **solver_options,
):
    """Like :func:`grad`, returning ``fn(params, x, y, key=None) -> (loss, natural_grad)``.

    ``loss`` is the mean negative log-likelihood at ``params``; with ``return_stats`` the
    function returns ``(loss, natural_grad, stats)``.
    """
    check_family(family)
    check_choice(method, METHODS, "method")
    check_choice(kind, KINDS, "kind")
    check_options(granularity, fallback, rcond)
    if not callable(model):
        raise TypeError(f"model must be callable as model(params, x); got {model!r}.")
    if method == "modular":
        if solver_options:
            raise ValueError(f"options {sorted(solver_options)} apply to method='exact' only.")
        if is_concrete(damping) and damping != 0:
            raise ValueError(
                "damping applies to method='exact'; the modular rule regularises each local "
                "pseudo-inverse by its cut-off `rcond` instead."
            )

    def fn(params, x, y, key=None):
        if method == "exact":
            sol = natural_gradient(
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
                **solver_options,
            )
            eta = model(params, x)
            loss = jnp.mean(jax.vmap(family.nll)(eta, y))
            return (loss, sol.value, sol.stats) if return_stats else (loss, sol.value)
        if kind == "mc" and key is None:
            raise ValueError("kind='mc' needs a PRNG `key`: call fn(params, x, y, key=key).")
        # The exact route's validation, so both routes refuse the same input the same way.
        validate_inputs(model, params, x, family, y=y, kind=kind, key=key, num_samples=num_samples)
        loss, nat, stats, eta = call_on_mesh(modular, params, x, y, key)
        check_finite(eta, "model output")
        family.check_targets(y, eta)
        return (loss, nat, stats) if return_stats else (loss, nat)

    # Compiled once per shape: the jaxpr is interpreted at trace time only. Value checks
    # (non-finite inputs, labels outside the support) run outside, on concrete arguments.
    modular = jax.jit(
        functools.partial(
            _modular_grad,
            model,
            family,
            granularity=granularity,
            rcond=rcond,
            fallback=fallback,
            kind=kind,
            num_samples=num_samples,
            with_stats=return_stats,
            strict=strict,
        )
    )
    return fn


def grad(
    model,
    family,
    *,
    method="modular",
    granularity="layer",
    rcond=None,
    fallback="error",
    kind="true",
    num_samples=1,
    solver="pinv",
    damping=0.0,
    return_stats=False,
    strict=False,
    **solver_options,
):
    """A natural gradient function, modular (the natural chain rule) or exact.

    The modular natural gradient starts from the output natural cotangent
    ``n_eta,i = F_eta⁺ ∇_eta nll_i`` — the family's ``natural_cotangent`` for the true Fisher;
    for ``Categorical`` its ``representative`` (``"min_norm"``, ``"ratio"``, ``"pin_last"``)
    picks one of the solutions, and **the choice changes the modular result** — and sends
    it back through the model map by map, ``n_z = J⁺ n_y`` (docs/theory.md §3). It equals the exact
    natural gradient only where the reverse-order law holds (e.g. one dense layer fed by data
    ``X`` with an invertible output Fisher and ``rank [X 1] = N``: its batch-joint Jacobian
    w.r.t. ``(W, b)`` has ``J Jᵀ = (X Xᵀ + 11ᵀ) ⊗ I``, of full row rank exactly then —
    ``N ≤ d + 1`` is necessary, not sufficient); elsewhere it differs, by design. Where every
    map has full row rank it still solves ``F_theta n = g``: a natural gradient, not the
    minimum-norm one.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``; ``x`` is data (never
            differentiated).
        family: the output family.
        method: ``"modular"`` or ``"exact"`` (:func:`natchain.natural_gradient`).
        granularity: ``"layer"`` or ``"primitive"`` (modular only; see
            :func:`natural_vjp`).
        rcond: cut-off of each local pseudo-inverse, a number, ``None`` or a mapping
            from map kind to either (modular only; see :func:`natural_vjp`).
        fallback: ``"error"`` or ``"generic"`` for primitives without a rule.
        kind: Fisher kind, ``"true"``, ``"empirical"`` or ``"mc"`` (``mc`` needs ``key``
            in the call). For the modular method it only changes the output natural
            cotangent (``F_i⁺ g_i`` with the per-example Fisher of that kind).
        num_samples: samples per example for ``kind="mc"``.
        solver, damping, **solver_options: passed to :func:`natchain.natural_gradient`
            (``method="exact"`` only; the modular method refuses damping).
        return_stats: also return statistics. Modular: the shared keys of
            :data:`natchain.STAT_KEYS` (``result`` is ``successful`` when the modular step
            solves ``F m = g`` to ``tol``, checked by one Fisher-vector product; ``num_cut``
            is the total over maps) plus ``{"maps": {key: {"rank", "num_cut",
            "condition"}}, "num_fanouts": …}`` with one entry per map in backward order
            (keys ``"<index>_<kind>_<name>"``); see docs/statistics.md. Exact: the
            solver's statistics.
        strict: at ``granularity="layer"``, raise ``natchain.StructureError`` where a
            :class:`natchain.StructureWarning` would say that no layer was found or that a
            parameter leaf is split into primitive maps.

    Returns:
        ``fn(params, x, y, key=None)`` returning the natural gradient (a pytree shaped
        like ``params``), or ``(natural_gradient, stats)``. ``fn`` can be ``jax.jit``-ed.

    Raises:
        ValueError / TypeError: unknown method, granularity, kind or fallback; integer
            parameters; non-finite inputs; a model output that does not fit the family;
            targets outside its support; damping with ``method="modular"``.
        NotImplementedError: a primitive without a natural rule (named), unless
            ``fallback="generic"``.
    """
    vg = value_and_grad(
        model,
        family,
        method=method,
        granularity=granularity,
        rcond=rcond,
        fallback=fallback,
        kind=kind,
        num_samples=num_samples,
        solver=solver,
        damping=damping,
        return_stats=return_stats,
        strict=strict,
        **solver_options,
    )

    def fn(params, x, y, key=None):
        out = vg(params, x, y, key)
        return out[1:] if return_stats else out[1]

    return fn


def modular_trace(
    model, params, x, family=None, granularity="layer", *, rcond=None, fallback="error"
):
    """The maps of the modular backward chain with their dense local Jacobians.

    This is the contract the diagnostics build on (``rank_report``: rank, row rank, the
    reverse-order law between consecutive maps). It materialises every local Jacobian:
    small models only.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        params: parameter pytree (differentiated).
        x: data (never differentiated).
        family: if given, the model output is checked against it (shape, width, finite).
        granularity: ``"layer"`` or ``"primitive"``, as in :func:`grad`.
        rcond, fallback: as in :func:`grad` (a per-kind ``rcond`` mapping included;
            ``fallback`` decides whether a primitive
            without a rule is an error).

    Returns:
        A list of :class:`MapRecord`, one per map on a path from the parameters to the
        output, in backward order (the map producing the output first). A value used by
        ``k ≥ 2`` maps contributes a ``"fanout"`` record placed just before the record of
        the map that produced it (parameter fan-outs come last).
    """
    check_options(granularity, fallback, rcond)
    check_float_params(params)
    if family is not None:
        check_family(family)
    meta = []

    def jacobians(params, x):
        chain, leaf_ids, out_ids, eta, _, _ = _record_chain(
            model, params, x, granularity, rcond, fallback
        )
        if family is not None:
            family.check_output(eta)
        live_nodes, uses = chain.live(out_ids)
        jacs = []

        def fanout(i):
            k = uses[i]
            v = chain.values[i]
            eye = jnp.eye(v.size, dtype=jnp.result_type(v))
            meta.append(("fanout", "fanout", (v.shape,), (k, *v.shape)))
            jacs.append(jnp.tile(eye, (k, 1)))

        for node in live_nodes:
            for o in node.out_ids:
                if o is not None and uses.get(o, 0) > 1:
                    fanout(o)
            outs = [o for o in node.local.outputs if is_float(o)]
            out_shape = (
                tuple(jnp.shape(outs[0])) if len(outs) == 1 else tuple(jnp.shape(o) for o in outs)
            )
            in_shapes = tuple(tuple(jnp.shape(p)) for p in node.local.diff_primals)
            meta.append((node.name, node.kind, in_shapes, out_shape))
            jacs.append(local_jacobian(node.local))
        for i in leaf_ids:
            if uses.get(i, 0) > 1:
                fanout(i)
        return jacs, eta

    jacs, eta = jax.jit(jacobians)(params, x)  # one compilation instead of many small ones
    if family is not None:
        check_finite(eta, "model output")
    return [
        MapRecord(name, kind, jac, in_shapes, out_shape)
        for (name, kind, in_shapes, out_shape), jac in zip(meta, jacs, strict=True)
    ]
