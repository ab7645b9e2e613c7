"""The output-space Gram matrix ``C = Mᵀ J Jᵀ M`` without materialising ``J``.

For a weight ``W`` used once as ``a = h @ W`` (or ``h @ Wᵀ``) with per-example rows
``h_i``, the rows of ``Mᵀ J`` restricted to ``W`` are rank one, ``h_i ⊗ D̃_{i,a}`` with
``D̃_{i,a} = ∂⟨M_i[:, a], eta_i⟩ / ∂a_i``, so their Gram is ``(h_i·h_j)(D̃_{i,a}·D̃_{j,b})``.
A bias ``b`` added once to such an output contributes ``D̃_{i,a}·D̃_{j,b}``. docs/theory.md §2 gives
the same identity for ``K`` itself; contracting with ``M`` first makes the backward
passes one per factor column ``r`` instead of one per output coordinate.

The dense layers are found in the model's jaxpr (a ``dot_general`` whose right operand
is a parameter leaf, possibly transposed; an ``add`` of a broadcast 1-D leaf). A leaf
used any other way, or more than once, falls back to its materialised per-example
Jacobian. The ``D̃`` are cotangents of zero "taps" added to the recognised outputs; one
batched backward pass gives them for every example at once, which assumes the model
treats examples independently (no batch statistics), as docs/theory.md §1's ``f(theta, x_i)`` does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from natchain._jaxpr import bind_eqn, call_subjaxpr, is_literal, trace_params


@dataclasses.dataclass(frozen=True)
class Site:
    kind: str  # "matmul", "matmul_left" or "bias"
    leaf: int
    bias: int | None = None  # a bias leaf folded into this matmul site (same cotangent)
    out: object = None  # the site equation's output variable
    arg: object = None  # bias sites: the variable the bias is added to


@dataclasses.dataclass
class _Alias:
    leaf: int
    how: str  # "leaf", "transpose", "bcast"


def _find_sites(jaxpr, leaf_vars: dict, batch: int, path=(), uses=None, sites=None):
    """Walk ``jaxpr`` recording candidate dense-layer sites and every use of each leaf."""
    uses = {} if uses is None else uses
    sites = {} if sites is None else sites
    alias = dict(leaf_vars)
    for k, eqn in enumerate(jaxpr.eqns):
        key = (*path, k)
        ins = [None if is_literal(v) else alias.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        sub = call_subjaxpr(eqn)
        if sub is not None and any(a is not None for a in ins):
            inner = {v: a for v, a in zip(sub.jaxpr.invars, ins, strict=True) if a is not None}
            _find_sites(sub.jaxpr, inner, batch, key, uses, sites)
            continue
        if name == "transpose" and ins[0] is not None and ins[0].how == "leaf":
            if len(eqn.invars[0].aval.shape) == 2:
                alias[eqn.outvars[0]] = _Alias(ins[0].leaf, "transpose")
                continue
        if _is_row_broadcast(eqn, ins):
            alias[eqn.outvars[0]] = _Alias(ins[0].leaf, "bcast")
            continue
        for a in ins:
            if a is not None:
                uses[a.leaf] = uses.get(a.leaf, 0) + 1
        site = _match_site(eqn, ins, batch)
        if site is not None:
            sites[key] = dataclasses.replace(site, out=eqn.outvars[0])
    return uses, sites


def _is_row_broadcast(eqn, ins):
    """A 1-D leaf made a row ``(1, o)`` or ``(N, o)`` by ``broadcast_in_dim`` or ``reshape``."""
    if not ins or ins[0] is None or ins[0].how != "leaf":
        return False
    shape_in, shape_out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if len(shape_in) != 1 or len(shape_out) != 2 or shape_out[1] != shape_in[0]:
        return False
    name = eqn.primitive.name
    if name == "broadcast_in_dim":
        return tuple(eqn.params["broadcast_dimensions"]) == (1,)
    return name == "reshape" and shape_out[0] == 1


def _match_site(eqn, ins, batch):
    name = eqn.primitive.name
    out_shape = eqn.outvars[0].aval.shape
    if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb:
            return None
        contract = (tuple(lc), tuple(rc))
        for w_pos, kind in ((1, "matmul"), (0, "matmul_left")):
            w, other = ins[w_pos], ins[1 - w_pos]
            if w is None or w.how == "bcast" or other is not None:
                continue
            h_shape = eqn.invars[1 - w_pos].aval.shape
            if (
                len(h_shape) == 2
                and h_shape[0] == batch
                and contract[1 - w_pos] == (1,)
                and contract[w_pos] in ((0,), (1,))
            ):
                return Site(kind, w.leaf)
        return None
    if name == "add" and len(out_shape) == 2 and out_shape[0] == batch:
        for pos in (0, 1):
            a, other = ins[pos], ins[1 - pos]
            if a is not None and a.how == "bcast" and other is None:
                return Site("bias", a.leaf, arg=eqn.invars[1 - pos])
    return None


def _var_uses(jaxpr, counts):
    """Count how often each variable is read (equation inputs and outputs of the jaxpr)."""
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not is_literal(v):
                counts[v] = counts.get(v, 0) + 1
        sub = call_subjaxpr(eqn)
        if sub is not None:
            _var_uses(sub.jaxpr, counts)
    for v in jaxpr.outvars:
        if not is_literal(v):
            counts[v] = counts.get(v, 0) + 1
    return counts


def analyse(model, params, x, batch: int):
    """Return ``(closed_jaxpr, sites)`` with only the sites whose leaf has that single use.

    A bias added straight to a ``h @ W`` output read nowhere else shares that output's
    cotangent, so it is folded into the matmul site: one Gram product for both leaves.
    """
    closed, leaves, _, _ = trace_params(model, params, x)
    leaf_vars = {v: _Alias(i, "leaf") for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])}
    uses, sites = _find_sites(closed.jaxpr, leaf_vars, batch)
    sites = {k: s for k, s in sites.items() if uses.get(s.leaf, 0) == 1}
    reads = _var_uses(closed.jaxpr, {})
    matmul_by_out = {s.out: k for k, s in sites.items() if s.kind == "matmul"}
    for key, site in list(sites.items()):
        target = matmul_by_out.get(site.arg) if site.kind == "bias" else None
        if target is not None and reads.get(site.arg, 0) == 1:
            sites[target] = dataclasses.replace(sites[target], bias=site.leaf)
            del sites[key]
    return closed, sites


def _run(jaxpr, consts, args, sites, taps, record, path=()):
    """Evaluate ``jaxpr`` adding ``taps[key]`` to each site's output and recording ``h``."""
    env = {}

    def read(v):
        return v.val if is_literal(v) else env[v]

    for v, val in zip(jaxpr.constvars, consts, strict=True):
        env[v] = val
    for v, val in zip(jaxpr.invars, args, strict=True):
        env[v] = val
    prefixes = {
        s[: len(path) + 1] for s in sites if len(s) > len(path) + 1 and s[: len(path)] == path
    }
    for k, eqn in enumerate(jaxpr.eqns):
        key = (*path, k)
        invals = [read(v) for v in eqn.invars]
        if key in prefixes:
            sub = call_subjaxpr(eqn)
            outs = _run(sub.jaxpr, sub.consts, invals, sites, taps, record, key)
        else:
            out = bind_eqn(eqn, invals)
            outs = out if eqn.primitive.multiple_results else [out]
            if key in sites:
                kind = sites[key].kind
                if kind != "bias":
                    record[key] = invals[0] if kind == "matmul" else invals[1]
                outs = [outs[0] + taps[key]]
        for v, val in zip(eqn.outvars, outs, strict=True):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _site_gram(site, h, d):
    """Contribution ``(N·r, N·r)`` of one site; ``d`` is ``(r, N, o)`` (``(r, o, N)`` if left)."""
    if site.kind == "matmul_left":
        d = jnp.swapaxes(d, 1, 2)
    r, n = d.shape[:2]
    dm = jnp.swapaxes(d, 0, 1).reshape(n * r, -1)
    gram = dm @ dm.T
    if site.kind == "bias":
        return gram
    weight = h @ h.T
    if site.bias is not None:
        weight = weight + 1.0
    return gram * jnp.repeat(jnp.repeat(weight, r, axis=0), r, axis=1)


def factor_gram(problem, structured="auto"):
    """``C = B Bᵀ`` with ``B = Mᵀ J`` (``(N·r, N·r)``) and statistics on how it was built.

    Args:
        problem: a :class:`natchain._problem.Problem`.
        structured: ``"auto"``/``True`` to use recognised dense layers, ``False`` to
            materialise the whole Jacobian.

    Returns:
        ``(C, stats)`` with ``stats["structured_params"]``: how many of the ``P``
        parameters were covered by per-layer structure.
    """
    ms = problem.factor
    n, m, r = ms.shape
    if structured is False:
        b = problem.factor_jacobian()
        return b @ b.T, {"structured_params": jnp.asarray(0)}
    params = problem.unravel(problem.flat)
    closed, sites = analyse(problem.model, params, problem.x, n)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves = jax.tree_util.tree_leaves(problem.x)
    eqn_out = _site_shapes(closed.jaxpr, sites)
    taps0 = {k: jnp.zeros(shape, problem.eta.dtype) for k, shape in eqn_out.items()}

    def f_taps(taps):
        record = {}
        (eta,) = _run(closed.jaxpr, closed.consts, [*leaves, *x_leaves], sites, taps, record)
        return eta, record

    _, vjp_fn, hs = jax.vjp(f_taps, taps0, has_aux=True)
    ds = jax.vmap(lambda c: vjp_fn(c)[0])(jnp.moveaxis(ms, 2, 0))
    cmat = jnp.zeros((n * r, n * r), problem.eta.dtype)
    for key, site in sites.items():
        cmat = cmat + _site_gram(site, hs.get(key), ds[key])
    covered = {s.leaf for s in sites.values()} | {s.bias for s in sites.values()} - {None}
    rest = [i for i in range(len(leaves)) if i not in covered]
    if rest:
        cmat = cmat + _fallback_gram(problem, leaves, treedef, rest).reshape(n * r, n * r)
    n_struct = sum(int(leaves[i].size) for i in covered)
    return cmat, {"structured_params": jnp.asarray(n_struct)}


def _site_shapes(jaxpr, sites):
    shapes = {}
    for key in sites:
        sub = jaxpr
        for k in key[:-1]:
            sub = call_subjaxpr(sub.eqns[k]).jaxpr
        shapes[key] = sub.eqns[key[-1]].outvars[0].aval.shape
    return shapes


def _fallback_gram(problem, leaves, treedef, rest):
    """Gram contribution of leaves without recognised structure, from their Jacobians."""

    def f(sub):
        ls = list(leaves)
        for i, leaf in zip(rest, sub, strict=True):
            ls[i] = leaf
        return problem.model(jax.tree_util.tree_unflatten(treedef, ls), problem.x)

    jacs = jax.jacrev(f)([leaves[i] for i in rest])
    n, m, r = problem.factor.shape
    total = 0.0
    for jac in jacs:
        b = jnp.einsum("nmr,nmp->nrp", problem.factor, jac.reshape(n, m, -1))
        total = total + jnp.einsum("iap,jbp->iajb", b, b)
    return total
