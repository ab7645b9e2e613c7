"""The jaxpr interpreter behind the natural chain rule.

**Forward.** The function's jaxpr is evaluated equation by equation. A value is
*differentiated* when it is floating point and depends on a differentiated input (the
parameters); data, constants, integers and ``stop_gradient`` outputs are not. Every
equation with a differentiated input and a floating-point output becomes one map on a
tape, with the inputs it is differentiated in. Call primitives (``jit``,
``custom_jvp_call``, ``custom_vjp_call``, ``remat``) are entered and their bodies split
likewise. At ``granularity="layer"`` three kinds of equation groups are one map instead:
recognised dense layers (a ``dot_general`` with a parameter-leaf weight and its bias
``add``, found by :mod:`natchain._gram`'s matcher), elementwise activations (one
differentiated input, an elementwise body — ``tanh``, ``jax.nn.relu``, ``jax.nn.gelu``), and
functions marked with :func:`natchain.layer`.

**Backward.** Maps are visited in reverse. A map turns the natural cotangents of its
outputs into those of its differentiated inputs by its rule (``J⁺ n``). A value used by
``k`` maps (on paths to the output) is the duplication ``x ↦ (x, …, x)``, whose
pseudo-inverse averages: its natural cotangent is the mean of the ``k`` it receives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from natchain._gram import _Alias, _find_sites
from natchain._jaxpr import bind_eqn, is_literal
from natchain._modular import _rules  # noqa: F401  (registers the rules)
from natchain._modular._core import (
    LocalMap,
    diagonal_rule,
    generic_rule,
    is_float,
)
from natchain._modular._layers import dense_rule, layer_spec
from natchain._modular._registry import (
    CALLS,
    CONTROL_FLOW,
    ELEMENTWISE,
    NON_DIFFERENTIABLE,
    RULES,
    missing_rule_error,
)

GRANULARITIES = ("layer", "primitive")
FALLBACKS = ("error", "generic")


@dataclasses.dataclass
class Node:
    """One map on the tape."""

    name: str
    kind: str  # "dense", "activation", "layer", "primitive", "generic"
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


def _eqn_at(jaxpr, key):
    for k in key[:-1]:
        jaxpr = sub_jaxpr(jaxpr.eqns[k])[0]
    return jaxpr, jaxpr.eqns[key[-1]]


def _count_uses(jaxpr, var):
    n = sum(1 for e in jaxpr.eqns for v in e.invars if not is_literal(v) and v is var)
    return n + sum(1 for v in jaxpr.outvars if not is_literal(v) and v is var)


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


@dataclasses.dataclass
class DenseSites:
    """Dense layers found in the model's jaxpr (layer granularity only)."""

    matmul: dict  # key -> leaf index
    bias_of: dict  # matmul key -> (bias key, bias leaf)
    paired_bias: dict  # bias key -> matmul key
    leaves: set  # leaf indices whose alias equations belong to a group

    @classmethod
    def empty(cls):
        return cls({}, {}, {}, set())

    @classmethod
    def find(cls, jaxpr, num_leaves, batch):
        if batch is None:
            return cls.empty()
        leaf_vars = {v: _Alias(i, "leaf") for i, v in enumerate(jaxpr.invars[:num_leaves])}
        uses, sites = _find_sites(jaxpr, leaf_vars, batch)
        sites = {k: s for k, s in sites.items() if uses.get(s.leaf, 0) == 1}
        matmul = {k: s.leaf for k, s in sites.items() if s.kind == "matmul"}
        out_to_key = {}
        for k in matmul:
            body, eqn = _eqn_at(jaxpr, k)
            out_to_key[(k[:-1], eqn.outvars[0])] = (k, body)
        bias_of, paired = {}, {}
        for k, s in sites.items():
            if s.kind != "bias":
                continue
            body, eqn = _eqn_at(jaxpr, k)
            for v in eqn.invars:
                hit = None if is_literal(v) else out_to_key.get((k[:-1], v))
                if hit is not None and _count_uses(hit[1], v) == 1 and hit[0] not in bias_of:
                    bias_of[hit[0]] = (k, s.leaf)
                    paired[k] = hit[0]
                    break
        leaves = set(matmul.values()) | {leaf for _, leaf in bias_of.values()}
        return cls(matmul, bias_of, paired, leaves)


class Chain:
    """The tape of maps recorded by one forward pass; :meth:`backward` applies the rules."""

    def __init__(self, granularity="layer", rcond=None, fallback="error", sites=None):
        self.granularity = granularity
        self.rcond = rcond
        self.fallback = fallback
        self.sites = sites or DenseSites.empty()
        self.values: dict[int, object] = {}
        self.diff: set[int] = set()
        self.nodes: list[Node] = []
        self.alias: dict[int, tuple] = {}  # id -> (leaf id, how)
        self.pending: dict = {}
        self.leaf_index: dict[int, int] = {}
        self._next = 0

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
        sites = self.sites
        if name in ("transpose", "broadcast_in_dim") and ids and ids[0] in self.leaf_index:
            leaf = self.leaf_index[ids[0]]
            if leaf in sites.leaves:
                (out,) = self._bind(eqn, vals)
                i = self.new(out, False)
                self.alias[i] = (ids[0], name)
                return [i]
        if key in sites.matmul:
            return self._dense_matmul(eqn, key, ids, vals, diff)
        if key in sites.paired_bias:
            return self._dense_bias(eqn, key, ids, vals)
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

    def _dense_matmul(self, eqn, key, ids, vals, diff):
        (_, rc), _ = eqn.params["dimension_numbers"]
        (out,) = self._bind(eqn, vals)
        w_id = ids[1]
        how = self.alias.get(w_id, (w_id, "leaf"))
        leaf_id = how[0]
        transposed = (tuple(rc) == (1,)) != (how[1] == "transpose")
        info = dict(h_id=ids[0], h=vals[0], h_diff=diff[0], w_id=leaf_id, transposed=transposed)
        if key in self.sites.bias_of:
            i = self.new(out, False)
            self.pending[key] = info
            return [i]
        return self._dense_node(info, None, None, out)

    def _dense_bias(self, eqn, key, ids, vals):
        info = self.pending.pop(self.sites.paired_bias[key])
        b_ids = [self.alias[i][0] for i in ids if i in self.alias]
        (out,) = self._bind(eqn, vals)
        return self._dense_node(info, b_ids[0], self.values[b_ids[0]], out)

    def _dense_node(self, info, b_id, b, out):
        h, h_diff, transposed = info["h"], info["h_diff"], info["transposed"]
        w = self.values[info["w_id"]]
        primals = (h, w) if b is None else (h, w, b)
        diff = (h_diff, True) if b is None else (h_diff, True, True)
        in_ids = tuple(
            i for i, d in zip((info["h_id"], info["w_id"], b_id), diff, strict=False) if d
        )

        def fn(*d):
            it = iter(d)
            hh = next(it) if h_diff else h
            ww = next(it)
            y = hh @ (ww.T if transposed else ww)
            if b is not None:
                y = y + next(it)
            return (y.astype(jnp.result_type(out)),)

        def rule(local, n_out):
            return dense_rule(h, w, b, h_diff, transposed, n_out[0], local.rcond)

        local = LocalMap("dense", primals, diff, (out,), {}, fn, self.rcond)
        i = self.new(out, True)
        self.nodes.append(Node("dense", "dense", rule, local, in_ids, (i,)))
        return [i]

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

        local = LocalMap(name, tuple(vals), diff, tuple(outs), dict(eqn.params), fn, self.rcond)
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


def trace_chain(fun, diff_leaves, data_leaves, *, granularity, rcond, fallback, batch=None):
    """Trace ``fun(*diff_leaves, *data_leaves)`` and record its chain of maps.

    Returns:
        ``(chain, leaf_ids, out_ids, out_values, out_tree)``.
    """
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*diff_leaves, *data_leaves)
    nd = len(diff_leaves)
    sites = None
    if granularity == "layer":
        if batch == "auto":
            avals = closed.out_avals
            batch = avals[0].shape[0] if len(avals) == 1 and len(avals[0].shape) == 2 else None
        sites = DenseSites.find(closed.jaxpr, nd, batch)
    chain = Chain(granularity, rcond, fallback, sites)
    leaf_ids = []
    for j, leaf in enumerate(diff_leaves):
        i = chain.new(leaf, is_float(leaf))
        chain.leaf_index[i] = j
        leaf_ids.append(i)
    data_ids = [chain.new(leaf, False) for leaf in data_leaves]
    out_ids = chain.run(closed.jaxpr, closed.consts, leaf_ids + data_ids)
    outs = [chain.values[i] for i in out_ids]
    return chain, leaf_ids, out_ids, outs, jax.tree_util.tree_structure(out_shape)


def check_options(granularity, fallback, rcond):
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r} is not one of {FALLBACKS}.")
    if rcond is not None and not (isinstance(rcond, (int, float)) and 0 <= rcond < 1):
        raise ValueError(f"rcond must be None or a number in [0, 1); got {rcond!r}.")


def zeros_for(leaf):
    if is_float(leaf):
        return jnp.zeros_like(leaf)
    return np.zeros(np.shape(leaf), jax.dtypes.float0)
