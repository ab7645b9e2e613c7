"""The walker: find every registered pattern's sites in a model's jaxpr, once, for all routes.

It follows each parameter leaf through layout-only equations (:data:`VIEW_PRIMITIVES`)
and plain calls (:data:`ENTERED_CALLS`), counts every other use, asks the patterns about
each equation that reads a parameter, keeps the sites whose leaves have that single use,
and folds shifts into the sites that produce their inputs (bias pairing). Every use that
no site claims is recorded with the reason, for inspection.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from natchain._jaxpr import is_literal
from natchain._structure._base import Decline, Match, Operand, Shift, Site, View
from natchain._structure._registry import BY_PRIMITIVE

#: calls whose body is the function itself (entered).
ENTERED_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

#: calls whose derivative is not their body's (custom rules) or that loop: a parameter
#: passed in is used opaquely.
OPAQUE_CALLS = {
    "custom_jvp_call": "its derivative is a custom rule, not its body's",
    "custom_vjp_call": "its derivative is a custom rule, not its body's",
    "while": "a loop",
    "scan": "a loop",
    "cond": "a branch",
}

VIEW_PRIMITIVES = (
    "transpose",
    "reshape",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "convert_element_type",
    "copy",
    "copy_p",
)


def body_of(eqn):
    """``(jaxpr, consts)`` of an entered call's body, else ``None``."""
    from jax.extend import core as jex_core

    key = ENTERED_CALLS.get(eqn.primitive.name)
    if key is None:
        return None
    sub = eqn.params[key]
    if isinstance(sub, jex_core.ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


@dataclasses.dataclass(frozen=True)
class Use:
    """One use of a parameter leaf that is not a view: where, and who claimed it."""

    key: tuple
    primitive: str
    site: tuple | None  # the claiming site's key
    reason: str | None  # why nothing claimed it


@dataclasses.dataclass
class Structure:
    """The sites of one model, and every leaf's uses.

    Attributes:
        sites: anchor key -> :class:`Site` (only sites whose leaves are single-use).
        uses: leaf index -> list of :class:`Use`.
        num_leaves: how many leading jaxpr inputs are parameter leaves.
    """

    sites: dict
    uses: dict
    num_leaves: int

    def site_of(self, leaf: int):
        """The site claiming ``leaf``, or ``None``."""
        for site in self.sites.values():
            if leaf in site.leaves:
                return site
        return None

    def reason(self, leaf: int) -> str | None:
        """Why ``leaf`` is not claimed (``None`` when it is, or when it is unused)."""
        if self.site_of(leaf) is not None:
            return None
        uses = self.uses.get(leaf, [])
        if not uses:
            return None
        if len(uses) > 1:
            where = ", ".join(sorted({u.primitive for u in uses}))
            return f"used {len(uses)} times ({where}); a pattern needs a single use"
        return uses[0].reason or "its site was not kept"

    @property
    def keys(self) -> dict:
        """Every equation path that belongs to a site -> ``(site, role)``.

        Roles: ``"anchor"`` and ``"shift"`` (the folded add). Layout equations of claimed
        leaves belong to no map: the leaf enters the site's map as stored.
        """
        out = {}
        for site in self.sites.values():
            out[site.key] = (site, "anchor")
            if site.shift is not None:
                out[site.shift.key] = (site, "shift")
        return out


def _view_step(eqn, view: View) -> View | None:
    """The view after one layout equation, or ``None`` when it is not one we follow."""
    name = eqn.primitive.name
    new_shape = tuple(eqn.outvars[0].aval.shape)
    old_shape = tuple(view.shape)
    data = set(view.data_axes)
    if name == "transpose":
        perm = tuple(eqn.params["permutation"])
        new_data = {i for i, p in enumerate(perm) if p in data}
    elif name == "broadcast_in_dim":
        dims = tuple(eqn.params["broadcast_dimensions"])
        new_data = {dims[i] for i in data}
    elif name in ("reshape", "squeeze", "expand_dims"):
        if view.bijective:
            new_data = {i for i, s in enumerate(new_shape) if s > 1}
        else:
            old_nu = [i for i, s in enumerate(old_shape) if s > 1]
            new_nu = [i for i, s in enumerate(new_shape) if s > 1]
            if [old_shape[i] for i in old_nu] != [new_shape[i] for i in new_nu]:
                return None  # a reshape that mixes broadcast and data axes
            new_data = {new_nu[old_nu.index(i)] for i in data}
    elif name in ("convert_element_type", "copy", "copy_p"):
        import jax.numpy as jnp

        if not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact):
            return None
        new_data = data
    else:
        return None
    bijective = view.bijective and int(np.prod(new_shape)) == int(np.prod(old_shape))
    return View(view.leaf, (*view.chain, eqn), new_shape, tuple(sorted(new_data)), bijective)


class _Walker:
    def __init__(self):
        self.sites: dict = {}
        self.uses: dict = {}
        self.reads: dict = {}  # var -> number of reads in its body (outputs included)
        self.producer: dict = {}  # var -> (key, eqn) producing it

    def use(self, view, key, primitive, site=None, reason=None):
        self.uses.setdefault(view.leaf, []).append(Use(key, primitive, site, reason))

    def walk(self, jaxpr, alias, path=()):
        for v in jaxpr.outvars:
            if not is_literal(v):
                self.reads[v] = self.reads.get(v, 0) + 1
        for k, eqn in enumerate(jaxpr.eqns):
            key = (*path, k)
            for v in eqn.invars:
                if not is_literal(v):
                    self.reads[v] = self.reads.get(v, 0) + 1
            for v in eqn.outvars:
                self.producer[v] = (key, eqn)
            ops = tuple(
                Operand(
                    v,
                    None if is_literal(v) else alias.get(v),
                    tuple(np.shape(v.val)) if is_literal(v) else tuple(v.aval.shape),
                    is_literal(v),
                )
                for v in eqn.invars
            )
            name = eqn.primitive.name
            body = body_of(eqn)
            marked = _marked_layer(eqn)
            if marked is not None:
                for op in ops:
                    if op.is_param:
                        reason = f"inside the natchain.layer-marked function `{marked}` (one map)"
                        self.use(op.view, key, marked, reason=reason)
                continue
            if body is not None:
                inner = {iv: op.view for iv, op in zip(body[0].invars, ops, strict=True) if op.view}
                self.walk(body[0], inner, key)
                continue
            params = [op for op in ops if op.is_param]
            if not params:
                continue
            if name in OPAQUE_CALLS:
                for op in params:
                    reason = f"passed into `{name}`: {OPAQUE_CALLS[name]}"
                    self.use(op.view, key, name, reason=reason)
                continue
            if name in VIEW_PRIMITIVES and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
                new = _view_step(eqn, ops[0].view)
                if new is not None:
                    alias[eqn.outvars[0]] = new
                    continue
            self._match(eqn, key, ops, params)
        for v in jaxpr.outvars:
            if not is_literal(v) and v in alias:
                where = "returned from a nested call" if path else "returned by the model"
                self.use(alias[v], path, "return", reason=f"{where} as a parameter view")

    def _match(self, eqn, key, ops, params):
        name = eqn.primitive.name
        answer = None
        for pattern in BY_PRIMITIVE.get(name, ()):
            answer = pattern.match(eqn, ops)
            if answer is not None:
                break
        if isinstance(answer, Match):
            site = self._site(pattern, eqn, key, ops, answer)
            if isinstance(site, str):
                answer = Decline(site)
            else:
                self.sites[key] = site
                for op in params:
                    self.use(op.view, key, name, site=key)
                return
        if answer is None:
            reason = f"used by `{name}`, which no layer pattern recognises"
        else:
            reason = f"`{name}` declined by the {pattern.name} pattern: {answer.reason}"
        for op in params:
            self.use(op.view, key, name, reason=reason)

    @staticmethod
    def _site(pattern, eqn, key, ops, match):
        by_id = {id(op.view): i for i, op in enumerate(ops) if op.is_param}
        positions = []
        for _, view in match.params.items():
            if id(view) not in by_id:
                return f"pattern {pattern.name!r} claimed a view that is not an operand"
            positions.append(by_id[id(view)])
        if len(set(positions)) != len(by_id):
            return f"pattern {pattern.name!r} left a parameter operand unclaimed"
        record = match.record
        if record is None:
            record = tuple(i for i, op in enumerate(ops) if not op.is_param and not op.literal)
        return Site(
            pattern,
            key,
            eqn,
            tuple(match.params.items()),
            tuple(positions),
            tuple(record),
            dict(match.info),
        )


def find_structure(jaxpr, num_leaves: int) -> Structure:
    """Sites of the registered patterns in ``jaxpr``, whose first inputs are the leaves.

    Args:
        jaxpr: the model's jaxpr (``jax.extend.core.Jaxpr``).
        num_leaves: how many leading inputs are parameter leaves.
    """
    w = _Walker()
    alias = {}
    for i, v in enumerate(jaxpr.invars[:num_leaves]):
        shape = tuple(v.aval.shape)
        if _is_float(v.aval.dtype):
            alias[v] = View(i, (), shape, tuple(a for a, s in enumerate(shape) if s > 1), True)
    w.walk(jaxpr, alias)
    single = {leaf for leaf, uses in w.uses.items() if len(uses) == 1}
    sites = {k: s for k, s in w.sites.items() if all(leaf in single for leaf in s.leaves)}
    sites = _fold_shifts(sites, w.reads, w.producer)
    return Structure(sites, w.uses, num_leaves)


def _marked_layer(eqn):
    """The name of a :func:`natchain.layer`-marked call, else ``None``."""
    from natchain._modular._layers import layer_spec

    spec = layer_spec(eqn)
    return None if spec is None else spec.name


def _is_float(dtype) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(dtype, jnp.inexact)


def _fold_shifts(sites, reads, producer):
    """Fold each shift site into the site whose output it shifts, where that one accepts.

    Between the two there may be transposes of values read once (vmapped ``W @ x``).
    """
    by_out = {}
    for key, site in sites.items():
        if not site.pattern.foldable:
            by_out[(key[:-1], site.out)] = key
    for key, shift_site in list(sites.items()):
        if not shift_site.pattern.foldable:
            continue
        (pos,) = shift_site.inputs
        var = shift_site.eqn.invars[pos]
        post, perm = [], None
        while not is_literal(var) and reads.get(var, 0) == 1 and (key[:-1], var) not in by_out:
            prod = producer.get(var)
            if prod is None or prod[0][:-1] != key[:-1] or prod[1].primitive.name != "transpose":
                break
            eqn = prod[1]
            p = tuple(eqn.params["permutation"])
            perm = p if perm is None else tuple(p[i] for i in perm)
            post.insert(0, eqn)
            var = eqn.invars[0]
        if is_literal(var) or reads.get(var, 0) != 1:
            continue
        host_key = by_out.get((key[:-1], var))
        if host_key is None or sites[host_key].shift is not None:
            continue
        (view,) = shift_site.views
        shift = Shift(view, shift_site.eqn, key, shift_site.positions[0], tuple(post), perm or ())
        host = sites[host_key]
        if len(view.shape) == len(host.anchor_shape) and host.pattern.absorb(host, shift):
            sites[host_key] = dataclasses.replace(host, shift=shift)
            del sites[key]
    return sites
