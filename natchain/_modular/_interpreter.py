"""The jaxpr interpreter behind the natural chain rule.

**Forward.** The function's jaxpr is evaluated equation by equation. A value is
*differentiated* when it is floating point and depends on a differentiated input (the
parameters); data, constants, integers and ``stop_gradient`` outputs are not. Every
equation with a differentiated input and a floating-point output becomes one map on a
tape, with the inputs it is differentiated in. Call primitives (``jit``,
``custom_jvp_call``, ``custom_vjp_call``, ``remat``) are entered and their bodies split
likewise. At ``granularity="layer"`` three kinds of equation groups are one map instead:
the layers the pattern registry recognises (:mod:`natchain._structure`: dense layers with
their bias, parameter scales and shifts — the same sites the Gram route structures), each
with its pattern's rule; elementwise activations (one differentiated input, an elementwise
body — ``tanh``, ``jax.nn.relu``, ``jax.nn.gelu``); and functions marked with
:func:`natchain.layer`. A parameter leaf no pattern claims is split into primitives; that
is reported (:class:`StructureWarning`, or an error under ``strict``).

**Backward.** Maps are visited in reverse. A map turns the natural cotangents of its
outputs into those of its differentiated inputs by its rule (``J⁺ n``). A value used by
``k`` maps (on paths to the output) is the duplication ``x ↦ (x, …, x)``, whose
pseudo-inverse averages: its natural cotangent is the mean of the ``k`` it receives.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from natchain._jaxpr import bind_eqn, is_literal
from natchain._modular import _rules  # noqa: F401  (registers the rules)
from natchain._modular._core import (
    LocalMap,
    diagonal_rule,
    generic_rule,
    is_float,
)
from natchain._modular._layers import layer_spec
from natchain._modular._registry import (
    CALLS,
    CONTROL_FLOW,
    ELEMENTWISE,
    NON_DIFFERENTIABLE,
    RULES,
    missing_rule_error,
)
from natchain._structure._registry import PATTERNS
from natchain._structure._walk import Structure, find_structure

GRANULARITIES = ("layer", "primitive")
FALLBACKS = ("error", "generic")


@dataclasses.dataclass
class Node:
    """One map on the tape."""

    name: str
    kind: str  # a pattern's name ("dense", …), "activation", "layer", "primitive", "generic"
    rule: Callable
    local: LocalMap
    in_ids: tuple  # one id per differentiated input
    out_ids: tuple  # one per output; None for non-floating outputs


def sub_jaxpr(eqn):
    """``(jaxpr, consts)`` of a call equation's body."""
    sub = eqn.params[CALLS[eqn.primitive.name]]
    if isinstance(sub, jex_core.ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


def _is_elementwise_body(jaxpr, shape) -> bool:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in CALLS:
            if not _is_elementwise_body(sub_jaxpr(eqn)[0], shape):
                return False
        elif name == "broadcast_in_dim":
            if eqn.invars[0].aval.shape != ():
                return False
        elif name not in ELEMENTWISE and name not in NON_DIFFERENTIABLE:
            return False
        if any(v.aval.shape not in (shape, ()) for v in eqn.outvars):
            return False
    return True


class StructureWarning(UserWarning):
    """Layer granularity found no layer, or split a parameter leaf into primitive maps."""


class StructureError(ValueError):
    """Raised instead of :class:`StructureWarning` under ``strict=True``."""


class Chain:
    """The tape of maps recorded by one forward pass; :meth:`backward` applies the rules."""

    def __init__(self, granularity="layer", rcond=None, fallback="error", structure=None):
        self.granularity = granularity
        self.rcond = rcond
        self.fallback = fallback
        self.structure = structure if structure is not None else Structure({}, {}, 0)
        self.site_keys = self.structure.keys
        self.site_prefixes = {k[:j] for k in self.site_keys for j in range(1, len(k))}
        self.claimed = {leaf for s in self.structure.sites.values() for leaf in s.leaves}
        self.values: dict[int, object] = {}
        self.diff: set[int] = set()
        self.nodes: list[Node] = []
        self.pending: dict = {}  # site key -> (input ids, input values)
        self.leaf_ids: list[int] = []
        self._next = 0

    def rcond_for(self, kind):
        """The cut-off of a map of ``kind``: ``rcond`` itself, or its entry for the kind."""
        return rcond_for(self.rcond, kind)

    # ---- values ------------------------------------------------------------------------
    def new(self, value, diff: bool) -> int:
        i = self._next
        self._next += 1
        self.values[i] = value
        if diff and is_float(value):
            self.diff.add(i)
        return i

    # ---- forward -----------------------------------------------------------------------
    def run(self, jaxpr, consts, in_ids, path=()):
        env = {}

        def read(v):
            if is_literal(v):  # a constant of its own, so nested calls can bind it by id
                return self.new(v.val, False), v.val
            i = env[v]
            return i, self.values[i]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = self.new(c, False)
        for v, i in zip(jaxpr.invars, in_ids, strict=True):
            env[v] = i
        for k, eqn in enumerate(jaxpr.eqns):
            key = (*path, k)
            ids, vals = zip(*[read(v) for v in eqn.invars], strict=True) if eqn.invars else ((), ())
            out_ids = self._eqn(eqn, key, list(ids), list(vals))
            for v, i in zip(eqn.outvars, out_ids, strict=True):
                env[v] = i
        return [read(v)[0] for v in jaxpr.outvars]

    def _eqn(self, eqn, key, ids, vals):
        name = eqn.primitive.name
        diff = tuple(i is not None and i in self.diff for i in ids)
        if self.granularity == "layer":
            out = self._layer_eqn(eqn, key, ids, vals, diff)
            if out is not None:
                return out
        if not any(diff) or name in NON_DIFFERENTIABLE:
            return self._constant(eqn, vals)
        if name in CALLS and name not in CONTROL_FLOW:
            sub, consts = sub_jaxpr(eqn)
            return self.run(sub, consts, ids, key)
        outs = self._bind(eqn, vals)
        if not any(is_float(o) for o in outs):
            return [self.new(o, False) for o in outs]
        rule, kind = RULES.get(name), "primitive"
        if rule is None or name in CONTROL_FLOW:
            if self.fallback != "generic":
                raise missing_rule_error(name, _where(eqn))
            rule, kind = generic_rule, "generic"
        return self._push(name, kind, rule, eqn, ids, vals, diff, outs)

    def _layer_eqn(self, eqn, key, ids, vals, diff):
        """Layer-granularity groups; ``None`` when ``eqn`` is not one of them."""
        name = eqn.primitive.name
        hit = self.site_keys.get(key)
        if hit is not None:
            return self._site_eqn(hit[0], hit[1], ids, vals, eqn)
        if key in self.site_prefixes and name in CALLS:
            sub, consts = sub_jaxpr(eqn)
            return self.run(sub, consts, ids, key)
        if not any(diff):
            return None
        spec = layer_spec(eqn)
        if spec is not None:
            outs = self._bind(eqn, vals)
            rule = spec.rule or generic_rule
            return self._push(spec.name, "layer", rule, eqn, ids, vals, diff, outs)
        if sum(diff) == 1 and len(eqn.outvars) == 1:
            j = diff.index(True)
            shape = eqn.outvars[0].aval.shape
            if (
                eqn.invars[j].aval.shape == shape
                and eqn.invars[j].aval.dtype == eqn.outvars[0].aval.dtype
            ):
                if name in ELEMENTWISE and name in RULES:
                    outs = self._bind(eqn, vals)
                    return self._push(name, "activation", RULES[name], eqn, ids, vals, diff, outs)
                if name in CALLS and name not in CONTROL_FLOW:
                    body = sub_jaxpr(eqn)[0]
                    if _is_elementwise_body(body, shape):
                        outs = self._bind(eqn, vals)
                        label = _call_name(eqn)
                        return self._push(
                            label, "activation", diagonal_rule, eqn, ids, vals, diff, outs
                        )
        return None

    def _site_eqn(self, site, role, ids, vals, eqn):
        """A recognised layer: its anchor records the inputs, its last equation is the map."""
        (out,) = self._bind(eqn, vals)
        if role == "anchor":
            self.pending[site.key] = ([ids[i] for i in site.inputs], [vals[i] for i in site.inputs])
            if site.shift is not None:  # the map ends at the folded shift
                return [self.new(out, False)]
        in_ids, in_vals = self.pending.pop(site.key)
        leaf_ids = [self.leaf_ids[j] for j in site.leaves]
        primals = (*in_vals, *(self.values[i] for i in leaf_ids))
        diff = tuple(i in self.diff for i in in_ids) + (True,) * len(leaf_ids)
        k = len(in_ids)
        dtype = jnp.result_type(out)

        def fn(*d):
            it = iter(d)
            full = [next(it) if di else v for v, di in zip(primals, diff, strict=True)]
            return (site.evaluate(full[:k], full[k:]).astype(dtype),)

        local = LocalMap(site.name, primals, diff, (out,), {}, fn, self.rcond_for(site.name))
        i = self.new(out, True)
        node_in = tuple(j for j, d in zip((*in_ids, *leaf_ids), diff, strict=True) if d)
        rule = site.pattern.layer_rule(site)
        self.nodes.append(Node(site.name, site.name, rule, local, node_in, (i,)))
        return [i]

    def fallback_leaves(self, out_ids):
        """Indices of the leaves that reach the outputs through primitive or generic maps."""
        live, _ = self.live(out_ids)
        index = {i: j for j, i in enumerate(self.leaf_ids)}
        out = set()
        for node in live:
            if node.kind in ("primitive", "generic"):
                out |= {index[i] for i in node.in_ids if i in index}
        return sorted(out)

    def _constant(self, eqn, vals):
        return [self.new(o, False) for o in self._bind(eqn, vals)]

    @staticmethod
    def _bind(eqn, vals):
        out = bind_eqn(eqn, vals)
        return list(out) if eqn.primitive.multiple_results else [out]

    def _push(self, name, kind, rule, eqn, ids, vals, diff, outs):
        def fn(*d):
            it = iter(d)
            full = [next(it) if di else v for v, di in zip(vals, diff, strict=True)]
            return tuple(self._bind(eqn, full))

        local = LocalMap(
            name, tuple(vals), diff, tuple(outs), dict(eqn.params), fn, self.rcond_for(kind)
        )
        out_ids = [self.new(o, True) for o in outs]
        in_ids = tuple(i for i, d in zip(ids, diff, strict=True) if d)
        node_outs = tuple(i if i in self.diff else None for i in out_ids)
        self.nodes.append(Node(name, kind, rule, local, in_ids, node_outs))
        return out_ids

    # ---- backward ----------------------------------------------------------------------
    def live(self, out_ids):
        """Live nodes (on a path to an output) and, per value, its number of live uses."""
        live_ids = {i for i in out_ids if i in self.diff}
        uses: dict[int, int] = {}
        for i in out_ids:
            if i in self.diff:
                uses[i] = uses.get(i, 0) + 1
        live_nodes = []
        for node in reversed(self.nodes):
            if any(o is not None and o in live_ids for o in node.out_ids):
                live_nodes.append(node)
                for i in node.in_ids:
                    live_ids.add(i)
                    uses[i] = uses.get(i, 0) + 1
        return live_nodes, uses

    def backward(self, out_ids, n_outs, want, on_fanout=None):
        """Natural cotangents of the values ``want`` (ids), from those of the outputs.

        Returns:
            ``(nat, stats)``: ``nat`` maps the reached ids of ``want`` to natural
            cotangents; ``stats`` is a list of ``(node, LocalStats)`` in backward order.
        """
        live_nodes, uses = self.live(out_ids)
        acc: dict[int, object] = {}

        def add(i, v):
            acc[i] = v if i not in acc else acc[i] + v

        def final(i):
            if i not in acc:
                return jnp.zeros_like(self.values[i])
            k = uses.get(i, 1)
            if k > 1 and on_fanout is not None:
                on_fanout(i, k)
            return acc[i] / k if k > 1 else acc[i]

        for i, n in zip(out_ids, n_outs, strict=True):
            if i in self.diff:
                add(i, jnp.asarray(n, jnp.result_type(self.values[i])))
        stats = []
        for node in live_nodes:
            n_out = tuple(None if o is None else final(o) for o in node.out_ids)
            n_in, st = node.rule(node.local, n_out)
            n_in = tuple(n_in)
            if len(n_in) != len(node.in_ids):
                raise ValueError(
                    f"the natural rule of {node.name!r} returned {len(n_in)} cotangents for "
                    f"{len(node.in_ids)} differentiated inputs."
                )
            for i, v in zip(node.in_ids, n_in, strict=True):
                shape = jnp.shape(self.values[i])
                if jnp.shape(v) != shape:
                    raise ValueError(
                        f"the natural rule of {node.name!r} returned shape {jnp.shape(v)} for "
                        f"an input of shape {shape}."
                    )
                add(i, v)
            stats.append((node, st))
        nat = {i: final(i) for i in want if i in acc}
        return nat, stats


def _call_name(eqn) -> str:
    """A readable name for a call equation (``relu``, ``gelu``), else the primitive's."""
    name = eqn.params.get("name")
    if isinstance(name, str):
        return name
    body = sub_jaxpr(eqn)[0]
    info = getattr(body, "debug_info", None)
    fname = getattr(info, "func_name", None)
    if isinstance(fname, str) and fname and "<" not in fname:
        return fname
    for inner in body.eqns:
        if isinstance(inner.params.get("name"), str):
            return inner.params["name"]
    return eqn.primitive.name


def _where(eqn) -> str:
    info = getattr(eqn, "source_info", None)
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(info) if info is not None else ""
    except Exception:  # noqa: BLE001 - best effort location for an error message
        return ""


def trace_chain(fun, diff_leaves, data_leaves, *, granularity, rcond, fallback):
    """Trace ``fun(*diff_leaves, *data_leaves)`` and record its chain of maps.

    Returns:
        ``(chain, leaf_ids, out_ids, out_values, out_tree)``.
    """
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*diff_leaves, *data_leaves)
    structure = None
    if granularity == "layer":
        structure = find_structure(closed.jaxpr, len(diff_leaves))
    chain = Chain(granularity, rcond, fallback, structure)
    for j, leaf in enumerate(diff_leaves):
        # A claimed leaf enters its site's map as stored: its layout equations are constants.
        chain.leaf_ids.append(chain.new(leaf, is_float(leaf) and j not in chain.claimed))
    data_ids = [chain.new(leaf, False) for leaf in data_leaves]
    out_ids = chain.run(closed.jaxpr, closed.consts, chain.leaf_ids + data_ids)
    outs = [chain.values[i] for i in out_ids]
    return chain, list(chain.leaf_ids), out_ids, outs, jax.tree_util.tree_structure(out_shape)


def report_structure(chain, out_ids, paths, strict=False):
    """Warn (or raise under ``strict``) when layer granularity found no layer or fell back.

    Args:
        chain: a layer-granularity :class:`Chain` after its forward pass.
        out_ids: the output ids.
        paths: a readable key path per parameter leaf.
        strict: raise :class:`StructureError` instead of warning.
    """
    if chain.granularity != "layer":
        return
    messages = []
    live, _ = chain.live(out_ids)
    if not any(n.kind not in ("primitive", "generic", "activation") for n in live):
        messages.append(
            "layer granularity found no layer (no pattern matched and no natchain.layer "
            "mark): every map is one primitive"
        )
    fell = chain.fallback_leaves(out_ids)
    if fell:
        parts = []
        for j in fell:
            reason = chain.structure.reason(j) or "no pattern claims it"
            parts.append(f"{paths[j]} ({reason})")
        messages.append(
            "these parameter leaves are split into primitive maps instead of a layer: "
            + "; ".join(parts)
            + ". natchain.inspect_structure(model, params, x) shows the whole table"
        )
    if not messages:
        return
    text = "; ".join(messages) + "."
    if strict:
        raise StructureError(text)
    warnings.warn(text, StructureWarning, stacklevel=4)


def check_options(granularity, fallback, rcond):
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r} is not one of {FALLBACKS}.")
    check_rcond(rcond)


#: Map kinds that are not layer patterns; with the registered patterns' names (``"dense"``,
#: ``"scale"``, ``"shift"``, ``"conv"``, …) they are the keys an ``rcond`` mapping accepts.
BASE_KINDS = ("activation", "layer", "primitive", "generic")


def rcond_kinds():
    """The keys a mapping ``rcond`` accepts: every map kind, then ``"default"``."""
    return (*BASE_KINDS, *sorted(PATTERNS), "default")


def _valid_cutoff(value):
    return value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    )


def check_rcond(rcond):
    """Refuse an ``rcond`` that is neither ``None``, a number in ``[0, 1)`` nor a mapping
    from map kinds (and ``"default"``) to such values."""
    if isinstance(rcond, Mapping):
        allowed = rcond_kinds()
        unknown = sorted(str(k) for k in rcond if k not in allowed)
        if unknown:
            raise ValueError(
                f"rcond has unknown map kinds {unknown}; the allowed keys are {list(allowed)}."
            )
        bad = {k: v for k, v in rcond.items() if not _valid_cutoff(v)}
        if bad:
            raise ValueError(
                f"rcond values must be None or numbers in [0, 1); got {bad!r} "
                f"(allowed keys: {list(allowed)})."
            )
        return
    if not _valid_cutoff(rcond):
        raise ValueError(
            "rcond must be None, a number in [0, 1), or a mapping from map kinds "
            f"{list(rcond_kinds())} to such values; got {rcond!r}."
        )


def rcond_for(rcond, kind):
    """The cut-off of one map: a scalar ``rcond`` applies to every kind; a mapping gives the
    kind's entry, else its ``"default"`` entry, else ``None`` (the rule's own default)."""
    if isinstance(rcond, Mapping):
        return rcond.get(kind, rcond.get("default"))
    return rcond


def zeros_for(leaf):
    if is_float(leaf):
        return jnp.zeros_like(leaf)
    return np.zeros(np.shape(leaf), jax.dtypes.float0)
