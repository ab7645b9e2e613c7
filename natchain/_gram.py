"""The output-space Gram matrix ``C = Mᵀ J Jᵀ M`` without materialising ``J``.

The layers are those the pattern registry (:mod:`natchain._structure`) recognises; each
pattern contributes its block from what its site records in one forward pass and the
cotangents ``D̃`` of zero "taps" added to the site outputs: one batched backward pass per
column of the output-Fisher factor ``M`` gives ``D̃_a = ∂⟨M[:, :, a], eta⟩ / ∂out`` for every
example at once. That assumes the model treats examples independently (no batch
statistics), as docs/theory.md §1's ``f(theta, x_i)`` does. docs/theory.md §2 gives the dense
identity for ``K`` itself; contracting with ``M`` first makes the backward passes one per
factor column instead of one per output coordinate.

Which axis of a site's input and output is the example axis is read off a second trace of
the model at batch size ``N + 1``: it is the one axis whose size changes. A site where that
is ambiguous, or whose pattern declines those axes, falls back, as does every leaf no site
claims: its block comes from its materialised per-example Jacobian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from natchain._jaxpr import bind_eqn, call_subjaxpr, is_literal, trace_params
from natchain._structure._base import GramData
from natchain._structure._walk import body_of, find_structure


def analyse(model, params, x):
    """``(closed_jaxpr, structure)``: the model's jaxpr and its recognised sites."""
    closed, leaves, _, _ = trace_params(model, params, x)
    return closed, find_structure(closed.jaxpr, len(leaves))


def _eqn_at(jaxpr, key):
    for k in key[:-1]:
        jaxpr = body_of(jaxpr.eqns[k])[0]
    return jaxpr.eqns[key[-1]]


def _example_axis(shape, shape2, n):
    diff = [a for a, (s, t) in enumerate(zip(shape, shape2, strict=True)) if s != t]
    if len(diff) == 1 and shape[diff[0]] == n and shape2[diff[0]] == n + 1:
        return diff[0]
    return None


def example_axes(model, params, x, closed, structure, n):
    """Per site, ``(input_axes, out_axis)`` in the anchor's layout, or a reason string."""
    leaves = jax.tree_util.tree_leaves(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    if any(np.ndim(a) == 0 or np.shape(a)[0] != n for a in x_leaves):
        return dict.fromkeys(structure.sites, "not every input leaf has the examples on axis 0")
    bigger = [jax.ShapeDtypeStruct((n + 1, *np.shape(a)[1:]), jnp.result_type(a)) for a in x_leaves]
    treedef = jax.tree_util.tree_structure(params)

    def fn(*args):
        ps = jax.tree_util.tree_unflatten(treedef, args[: len(leaves)])
        return model(ps, jax.tree_util.tree_unflatten(x_def, args[len(leaves) :]))

    try:
        closed2 = jax.make_jaxpr(fn)(*leaves, *bigger)
    except Exception:  # noqa: BLE001 - any failure means: no example axes known
        return dict.fromkeys(structure.sites, "the model does not trace at another batch size")
    out = {}
    for key, site in structure.sites.items():
        try:
            eqn2 = _eqn_at(closed2.jaxpr, key)
            tap2 = _eqn_at(closed2.jaxpr, site.tap_key)
        except (IndexError, TypeError, AttributeError):
            eqn2 = tap2 = None
        if eqn2 is None or eqn2.primitive is not site.eqn.primitive:
            out[key] = "the model's jaxpr changes with the batch size"
            continue
        axes = tuple(
            _example_axis(site.eqn.invars[i].aval.shape, eqn2.invars[i].aval.shape, n)
            for i in site.record
        )
        out_axis = _example_axis(site.out.aval.shape, tap2.outvars[0].aval.shape, n)
        if out_axis is not None and site.shift is not None and site.shift.post_perm:
            out_axis = site.shift.post_perm[out_axis]
        if out_axis is None or None in axes:
            out[key] = "no single example axis in the layer's input or output"
            continue
        reason = site.pattern.gram_decline(site, axes, out_axis)
        out[key] = reason if reason is not None else (axes, out_axis)
    return out


def gram_sites(model, params, x, n):
    """``(closed, structure, kept, declined)``: the sites the Gram route uses and why not."""
    closed, structure = analyse(model, params, x)
    axes = example_axes(model, params, x, closed, structure, n)
    kept = {k: axes[k] for k in structure.sites if not isinstance(axes[k], str)}
    declined = {k: axes[k] for k in structure.sites if isinstance(axes[k], str)}
    return closed, structure, kept, declined


def _run(jaxpr, consts, args, sites, taps, record, path=()):
    """Evaluate ``jaxpr`` adding ``taps[key]`` at each site's output and recording inputs."""
    env = {}

    def read(v):
        return v.val if is_literal(v) else env[v]

    for v, val in zip(jaxpr.constvars, consts, strict=True):
        env[v] = val
    for v, val in zip(jaxpr.invars, args, strict=True):
        env[v] = val
    anchors = {s.key: s for s in sites.values()}
    tapped = {s.tap_key for s in sites.values()}
    keys = set(anchors) | tapped
    prefixes = {
        s[: len(path) + 1] for s in keys if len(s) > len(path) + 1 and s[: len(path)] == path
    }
    for k, eqn in enumerate(jaxpr.eqns):
        key = (*path, k)
        invals = [read(v) for v in eqn.invars]
        if key in prefixes:
            sub = call_subjaxpr(eqn) or _closed(body_of(eqn))
            outs = _run(sub.jaxpr, sub.consts, invals, sites, taps, record, key)
        else:
            out = bind_eqn(eqn, invals)
            outs = list(out) if eqn.primitive.multiple_results else [out]
            if key in anchors:
                record[key] = tuple(invals[i] for i in anchors[key].record)
            if key in tapped:
                outs = [outs[0] + taps[key]]
        for v, val in zip(eqn.outvars, outs, strict=True):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _closed(body):
    from jax.extend import core as jex_core

    return jex_core.ClosedJaxpr(body[0], body[1])


def tap_cotangents(problem, leaves, closed, sites, us):
    """Run the model once, recording each site's input, and pull every ``u`` in ``us``
    (``(k, N, m)``) back to the sites' outputs: ``(recorded, {tap_key: (k, *out_shape)})``."""
    x_leaves = jax.tree_util.tree_leaves(problem.x)
    dtype = problem.eta.dtype
    taps0 = {s.tap_key: jnp.zeros(s.out_shape, dtype) for s in sites.values()}

    def f_taps(taps):
        record = {}
        (eta,) = _run(closed.jaxpr, closed.consts, [*leaves, *x_leaves], sites, taps, record)
        return eta, record

    _, vjp_fn, recorded = jax.vjp(f_taps, taps0, has_aux=True)
    return recorded, jax.vmap(lambda u: vjp_fn(u.astype(dtype))[0])(us)


def site_data(problem):
    """Each site the Gram route keeps, with what it recorded: ``{key: (site, GramData)}``
    (one forward pass and one batched backward pass per factor column)."""
    ms = problem.factor
    n = ms.shape[0]
    params = problem.params
    closed, structure, kept, _ = gram_sites(problem.model, params, problem.x, n)
    sites = {k: structure.sites[k] for k in kept}
    leaves = jax.tree_util.tree_leaves(params)
    recorded, ds = tap_cotangents(problem, leaves, closed, sites, jnp.moveaxis(ms, 2, 0))
    out = {}
    for key, site in sites.items():
        in_axes, out_axis = kept[key]
        cot = ds[site.tap_key]
        if site.shift is not None and site.shift.post_perm:
            inv = np.argsort(site.shift.post_perm)
            cot = jnp.transpose(cot, (0, *(1 + int(a) for a in inv)))
        out[key] = (site, GramData(recorded[key], in_axes, cot, out_axis))
    return out


def site_blocks(problem):
    """Each kept site's ``(N·r, N·r)`` block of ``C``: ``{key: (site, block)}``."""
    dtype = problem.eta.dtype
    return {
        key: (site, site.pattern.gram(site, data).astype(dtype))
        for key, (site, data) in site_data(problem).items()
    }


def _example_diagonal(site, data):
    """The site's per-example ``(N, r, r)`` diagonal blocks of ``C``: its own
    :meth:`~natchain._structure._base.AbstractPattern.gram` on one example at a time (the
    example axis kept, of size one), mapped over the examples."""
    inputs, in_axes, cot, out_axis = data

    def one(inputs_i, cot_i):
        return site.pattern.gram(site, GramData(inputs_i, in_axes, cot_i, out_axis))

    # A new axis of size one after each example axis: vmap strips the example axis and
    # the pattern sees a batch of one in the layout it was matched in.
    inputs = tuple(jnp.expand_dims(a, ax + 1) for a, ax in zip(inputs, in_axes, strict=True))
    cot = jnp.expand_dims(cot, out_axis + 2)
    return jax.vmap(one, in_axes=(tuple(in_axes), out_axis + 1))(inputs, cot)


def factor_gram(problem, structured="auto"):
    """``C = B Bᵀ`` with ``B = Mᵀ J`` (``(N·r, N·r)``) and statistics on how it was built.

    Args:
        problem: a :class:`natchain._problem.Problem`.
        structured: ``"auto"``/``True`` to use the recognised layers, ``False`` to
            materialise the whole Jacobian.

    Returns:
        ``(C, stats)`` with ``stats["structured_params"]``: how many of the ``P``
        parameters were covered by per-layer structure.
    """
    n, m, r = problem.factor.shape
    if structured is False:
        b = problem.factor_jacobian()
        return b @ b.T, {"structured_params": jnp.asarray(0)}
    blocks = site_blocks(problem)
    leaves, treedef = jax.tree_util.tree_flatten(problem.params)
    cmat = jnp.zeros((n * r, n * r), problem.eta.dtype)
    for _, block in blocks.values():
        cmat = cmat + block
    covered = {leaf for site, _ in blocks.values() for leaf in site.leaves}
    rest = [i for i in range(len(leaves)) if i not in covered]
    if rest:
        cmat = cmat + _fallback_gram(problem, leaves, treedef, rest).reshape(n * r, n * r)
    n_struct = sum(int(leaves[i].size) for i in covered)
    return cmat, {"structured_params": jnp.asarray(n_struct)}


def factor_gram_diagonal(problem, structured="auto", data=None):
    """The per-example diagonal blocks of ``C`` (``(N, r, r)``), built as
    :func:`factor_gram` builds ``C`` (the same sites, the same fallback) at the cost of
    ``N`` one-example blocks instead of one ``N·r × N·r`` matrix; ``data``: what
    :func:`site_data` returned, if already computed."""
    if structured is False:
        n, _, r = problem.factor.shape
        b = problem.factor_jacobian().reshape(n, r, -1)
        return jnp.einsum("iap,ibp->iab", b, b)
    data = site_data(problem) if data is None else data
    dtype = problem.eta.dtype
    diag = sum(_example_diagonal(site, d).astype(dtype) for site, d in data.values())
    leaves, treedef = jax.tree_util.tree_flatten(problem.params)
    covered = {leaf for site, _ in data.values() for leaf in site.leaves}
    rest = [i for i in range(len(leaves)) if i not in covered]
    if rest:
        for b in _fallback_rows(problem, leaves, treedef, rest):
            diag = diag + jnp.einsum("iap,ibp->iab", b, b)
    return diag


def _fallback_rows(problem, leaves, treedef, rest):
    """Per leaf without recognised structure, its rows of ``B = Mᵀ J``: ``(N, r, size)``
    each, from the leaf's materialised Jacobian."""
    jacs = jax.jacrev(model_in(problem, leaves, treedef, rest))([leaves[i] for i in rest])
    n, m, r = problem.factor.shape
    return [jnp.einsum("nmr,nmp->nrp", problem.factor, jac.reshape(n, m, -1)) for jac in jacs]


def model_in(problem, leaves, treedef, rest):
    """The model's outputs as a function of the leaves at positions ``rest`` only (a list of
    them, in that order), the other leaves held at their values."""

    def f(sub):
        ls = list(leaves)
        for i, leaf in zip(rest, sub, strict=True):
            ls[i] = leaf
        return problem.model(jax.tree_util.tree_unflatten(treedef, ls), problem.x)

    return f


def _fallback_gram(problem, leaves, treedef, rest):
    """Gram contribution of leaves without recognised structure, from their Jacobians."""
    return sum(
        jnp.einsum("iap,jbp->iajb", b, b) for b in _fallback_rows(problem, leaves, treedef, rest)
    )
