"""The registry of natural rules, keyed by primitive name.

A rule is ``rule(local: LocalMap, n_out: tuple) -> (n_in, stats)``: ``n_out`` holds one
natural cotangent per output of the map (``None`` for non-floating outputs), ``n_in`` one
per *differentiated* input, in order, and ``stats`` a :class:`LocalStats` or ``None``.
Rules live in ``natchain/_modular/_rules/``, one file per family of primitives, each
registered right below the function that implements it.
"""

from __future__ import annotations

from collections.abc import Callable

#: primitive name -> natural rule.
RULES: dict[str, Callable] = {}

#: call primitives the interpreter recurses into -> the parameter holding the sub-jaxpr.
CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

#: primitives whose outputs are constants for differentiation.
NON_DIFFERENTIABLE = {"stop_gradient"}

#: control flow: refused unless ``fallback="generic"`` treats the whole loop as one map.
CONTROL_FLOW = {"while", "scan", "cond", "fori_loop"}

#: elementwise primitives (for recognising activations at layer granularity).
ELEMENTWISE: set[str] = set()


def _name(primitive) -> str:
    if isinstance(primitive, str):
        return primitive
    name = getattr(primitive, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"expected a JAX primitive or its name; got {primitive!r}.")
    return name


def register_rule(primitive, rule: Callable | None = None, *, elementwise: bool = False):
    """Register the natural rule of a JAX primitive (usable as a decorator).

    Args:
        primitive: the primitive (``jax.extend.core.Primitive``) or its name, e.g. ``"sin"``.
        rule: ``rule(local, n_out) -> (n_in, stats)``: ``local`` is a
            :class:`natchain.LocalMap` (primal inputs, which are differentiated, outputs,
            the primitive's params, ``fn`` of the differentiated inputs, ``rcond``);
            ``n_out`` a tuple with the natural cotangent of each output; ``n_in`` a tuple
            with one natural cotangent per differentiated input; ``stats`` a
            :class:`natchain.LocalStats` or ``None``. ``natchain.generic_rule`` (the local
            Jacobian's pseudo-inverse) is always a valid rule.
        elementwise: whether the primitive acts entry by entry (lets the layer granularity
            recognise activations built from it).

    Returns:
        ``rule`` (so that the function can be used as a decorator).
    """
    name = _name(primitive)

    def put(fn):
        if not callable(fn):
            raise TypeError(f"rule for {name!r} must be callable; got {fn!r}.")
        RULES[name] = fn
        if elementwise:
            ELEMENTWISE.add(name)
        return fn

    return put if rule is None else put(rule)


def missing_rule_error(name: str, where: str = "") -> NotImplementedError:
    loc = f" (in {where})" if where else ""
    if name in CONTROL_FLOW:
        return NotImplementedError(
            f"natchain has no natural rule for the control-flow primitive '{name}'{loc}: the "
            "modular rule would have to split the step across iterations or branches it "
            "cannot see. Unroll the loop in Python, or pass fallback='generic' to treat the "
            "whole construct as one map (the pseudo-inverse of its local Jacobian)."
        )
    return NotImplementedError(
        f"natchain has no natural rule for the primitive '{name}'{loc}. Register one with "
        f"natchain.register_rule('{name}', rule) (natchain.generic_rule, the pseudo-inverse "
        "of the local Jacobian, is a valid rule), or pass fallback='generic'."
    )
