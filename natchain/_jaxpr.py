"""Small helpers for walking jaxprs, shared by the Gram structure finder and the interpreters."""

from __future__ import annotations

import jax
from jax.extend import core as jex_core

#: Primitives whose ``params`` hold a closed sub-jaxpr that is a plain function call.
CALL_JAXPR_PARAM = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}


def is_literal(v) -> bool:
    return isinstance(v, jex_core.Literal)


def bind_eqn(eqn, invals):
    """Evaluate one equation on concrete or traced values (JAX-version tolerant)."""
    out = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(out, tuple):  # older JAX: (subfuns, params)
        subfuns, params = out
        return eqn.primitive.bind(*subfuns, *invals, **params)
    return eqn.primitive.bind(*invals, **out)


def call_subjaxpr(eqn):
    """The ``ClosedJaxpr`` of a plain call (``jit``/``pjit``/``closed_call``), else None."""
    key = CALL_JAXPR_PARAM.get(eqn.primitive.name)
    if key is None:
        return None
    sub = eqn.params[key]
    if isinstance(sub, jex_core.Jaxpr):
        sub = jex_core.ClosedJaxpr(sub, ())
    return sub


def trace_params(model, params, x):
    """``(closed_jaxpr, leaves, treedef)`` of ``model`` with the parameter leaves as inputs.

    The jaxpr's invars are the parameter leaves (in ``tree_flatten`` order) followed by
    the leaves of ``x``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)

    def fn(*args):
        ps = jax.tree_util.tree_unflatten(treedef, args[: len(leaves)])
        xs = jax.tree_util.tree_unflatten(x_def, args[len(leaves) :])
        return model(ps, xs)

    closed = jax.make_jaxpr(fn)(*leaves, *x_leaves)
    return closed, leaves, treedef, x_leaves
