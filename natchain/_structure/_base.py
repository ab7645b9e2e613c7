"""The interface every layer pattern implements, and the records the walker hands it.

How to write a pattern
======================

A pattern recognises one kind of layer in a model's jaxpr and knows what both exact and
modular routes need from it. It is one small final class in its own module of this
package, subclassing :class:`AbstractPattern`, registered with one line right below it::

    class ConvPattern(AbstractPattern):
        name = "conv"
        primitives = ("conv_general_dilated",)
        ...

    register_pattern(ConvPattern())

and the module is imported once in ``natchain/_structure/__init__.py``. A pattern has
three jobs.

1. **Match** (:meth:`AbstractPattern.match`). The walker (``_walk.py``) visits every
   equation of the jaxpr — nested ``jit``/``pjit``/``closed_call``/``remat`` bodies
   included — whose primitive is in ``primitives`` and which reads a parameter. It hands
   the pattern one :class:`Operand` per input: a literal, a value that is no parameter, or
   a :class:`View` of a parameter leaf (the leaf seen through ``transpose``, ``reshape``,
   ``broadcast_in_dim``, ``squeeze``, ``convert_element_type``; the walker follows those,
   so patterns never see them). The pattern answers

   - ``None``: not its equation (the next pattern is asked);
   - :class:`Decline` ``(reason)``: its equation, but a configuration it cannot handle —
     the leaf then falls back (materialised Jacobian on the Gram route, primitive rules
     at layer granularity) and :func:`natchain.inspect_structure` prints the reason.
     Decline whenever unsure: a wrong match is a wrong answer;
   - :class:`Match`: the parameters it claims (``role -> View``), which of the other
     operands the Gram route must record, and pattern-specific ``info``.

   The walker then does the bookkeeping shared by every pattern: a leaf is claimed only if
   this is its single use (a tied weight falls back); a *shift* site (a pattern with
   ``foldable = True``: an ``add`` of a parameter) whose input is read only by it is
   offered to the site producing that input through :meth:`AbstractPattern.absorb` (bias
   pairing: ``x @ W + b`` becomes one site); what is left becomes a :class:`Site`.

2. **Gram block** (:meth:`AbstractPattern.gram`). The Gram route adds a zero "tap" to
   every site's output and takes one batched backward pass per column of the output
   Fisher factor ``M``; the pattern receives (:class:`GramData`) the recorded inputs, the
   tap cotangents ``D̃`` of shape ``(r, *out_shape)`` and which axis of each is the
   example axis, and returns its ``(N·r, N·r)`` block of ``C = Mᵀ J Jᵀ M``, rows ordered
   ``(example, factor column)``, without materialising ``J``. Two ways are always
   available: the kernel trick (``(h hᵀ) ∘ (D̃ D̃ᵀ)`` for a dense layer) and per-example
   weight-gradient rows ``G`` (``C_site = G Gᵀ``; :func:`rows_gram`), the natural choice
   for sequences and convolutions. A site with a folded shift adds its rows
   (:func:`shift_rows`). :meth:`AbstractPattern.gram_decline` may refuse a site whose
   example axes do not fit the formula (e.g. the example axis is contracted); it then
   falls back on the Gram route only.

3. **Layer rule** (:meth:`AbstractPattern.layer_rule`). At ``granularity="layer"`` the
   site is one map of the natural chain rule, :meth:`Site.evaluate`: its operands are the
   anchor's non-parameter operands (:attr:`Site.inputs`; an upstream activation is
   differentiated, data is not), then each claimed leaf as stored (:attr:`Site.leaves`, a
   folded shift's last). Its rule has the signature of :func:`natchain.register_rule`'s
   rules and receives the natural cotangent of the site's output in that output's layout
   (:meth:`Site.to_anchor` puts it in the anchor's). The default is
   :func:`natchain.generic_rule`, the pseudo-inverse of the materialised local Jacobian;
   give a closed form where one exists (``dense.py``).

Every registered pattern needs rows in ``tests/test_structure.py``'s ``LAYER_CASES``: one
test checks, row by row, the Gram block against ``J Jᵀ``, the layer rule against the
generic pseudo-inverse and that both routes find the same sites; a completeness test fails
for a pattern without rows.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from natchain._jaxpr import bind_eqn

__all__ = [
    "AbstractPattern",
    "Decline",
    "GramData",
    "Match",
    "Operand",
    "Shift",
    "Site",
    "View",
    "rows_gram",
    "shift_rows",
]


@dataclasses.dataclass(frozen=True, eq=False)
class View:
    """A value that is a parameter leaf seen through layout-only equations.

    Attributes:
        leaf: index of the leaf (``jax.tree_util.tree_flatten`` order of the parameters).
        chain: the equations, in order, that turn the leaf into this value (each reads
            only the previous value); replayed by :meth:`apply`.
        shape: this value's shape.
        data_axes: the axes of this value along which the leaf's entries vary (sorted).
            Along every other axis the value is constant (broadcast or of size one). The
            product of their sizes is the leaf's size: each broadcast position holds every
            entry of the leaf exactly once.
        bijective: no broadcast: the value is the leaf's entries rearranged.
    """

    leaf: int
    chain: tuple
    shape: tuple
    data_axes: tuple
    bijective: bool

    def apply(self, leaf_value):
        """This value, recomputed from a (possibly perturbed) leaf value."""
        val = leaf_value
        for eqn in self.chain:
            val = bind_eqn(eqn, [val])
        return val


@dataclasses.dataclass(frozen=True, eq=False)
class Operand:
    """One input of an equation, as a pattern sees it.

    Attributes:
        var: the jaxpr variable or literal.
        view: the parameter leaf it is a view of, or ``None`` (data, an activation, a
            constant, a literal).
        shape: its shape.
        literal: whether it is a literal.
    """

    var: Any
    view: View | None
    shape: tuple
    literal: bool = False

    @property
    def is_param(self) -> bool:
        return self.view is not None


class Decline(NamedTuple):
    """A pattern's answer for an equation it recognises but cannot handle."""

    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class Match:
    """A pattern's answer for an equation it handles.

    Attributes:
        params: ``role -> View`` of every parameter operand it claims (e.g.
            ``{"weight": view}``); every parameter operand of the equation must appear.
        record: positions (in ``eqn.invars``) of the operands the Gram route records for
            :meth:`AbstractPattern.gram` (default: every non-parameter operand).
        info: pattern-specific data (contraction layout, …), read back from ``Site.info``.
    """

    params: dict
    record: tuple | None = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Shift:
    """A shift (``+ b``) folded into the site that produces its input.

    Between the anchor's output and the add there may be transposes (vmapped code
    transposes a ``W @ x`` product back); ``post`` holds them and ``post_perm`` their
    composition: ``final = transpose(anchor_output, post_perm)``.

    Attributes:
        view: the shift's view (in the final layout).
        eqn: the add equation.
        key: its path.
        position: the shift's operand position in ``eqn``.
        post: the transpose equations between the anchor and the add.
        post_perm: their composed permutation.
    """

    view: View
    eqn: Any
    key: tuple
    position: int
    post: tuple = ()
    post_perm: tuple = ()

    @property
    def data_axes(self) -> tuple:
        """The view's data axes in the anchor output's layout."""
        perm = self.post_perm or tuple(range(len(self.view.shape)))
        return tuple(sorted(perm[a] for a in self.view.data_axes))

    def anchor_value(self, leaf_value, final_shape):
        """The shift broadcast to the output and put in the anchor output's layout."""
        val = jnp.broadcast_to(self.view.apply(leaf_value), final_shape)
        return jnp.transpose(val, np.argsort(self.post_perm)) if self.post_perm else val


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """One recognised layer: an anchor equation, its claimed leaves, maybe a folded shift.

    Attributes:
        pattern: the :class:`AbstractPattern` that matched.
        key: path of the anchor equation (indices of the enclosing call equations, then
            its index in the innermost body).
        eqn: the anchor equation.
        params: ``((role, View), …)`` as in :attr:`Match.params`.
        positions: the operand position (in ``eqn.invars``) of each of ``params``.
        record: positions in ``eqn.invars`` of the operands recorded for the Gram route.
        info: the match's pattern-specific data.
        shift: a folded shift, or ``None``.
    """

    pattern: AbstractPattern
    key: tuple
    eqn: Any
    params: tuple
    positions: tuple
    record: tuple
    info: dict
    shift: Shift | None = None

    @property
    def name(self) -> str:
        return self.pattern.name

    @property
    def tap_key(self) -> tuple:
        """Path of the equation whose output is the site's output (tapped on the Gram route)."""
        return self.key if self.shift is None else self.shift.key

    @property
    def out(self):
        """The site's output variable."""
        return (self.eqn if self.shift is None else self.shift.eqn).outvars[0]

    @property
    def out_shape(self) -> tuple:
        """The site's output shape (after a folded shift's transposes)."""
        return tuple(self.out.aval.shape)

    @property
    def anchor_shape(self) -> tuple:
        """The anchor equation's output shape (the layout patterns compute in)."""
        return tuple(self.eqn.outvars[0].aval.shape)

    def to_anchor(self, value):
        """A value (cotangent) in the site output's layout, put in the anchor's layout."""
        if self.shift is None or not self.shift.post_perm:
            return value
        return jnp.transpose(value, np.argsort(self.shift.post_perm))

    @property
    def views(self) -> tuple:
        """Every claimed view, in :attr:`leaves` order (a folded shift's last)."""
        vs = tuple(v for _, v in self.params)
        return vs if self.shift is None else (*vs, self.shift.view)

    @property
    def leaves(self) -> tuple:
        """The claimed leaf indices (a folded shift's last)."""
        return tuple(v.leaf for v in self.views)

    @property
    def inputs(self) -> tuple:
        """Positions in ``eqn.invars`` of the anchor's non-parameter operands."""
        return tuple(i for i in range(len(self.eqn.invars)) if i not in self.positions)

    @property
    def label(self) -> str:
        return f"{self.name}@{'.'.join(map(str, self.key))}"

    def evaluate(self, inputs, leaves):
        """The site's output from its non-parameter operands and its leaves.

        This is the site's map at layer granularity; its operands, in order, are
        :attr:`inputs` then :attr:`leaves`.

        Args:
            inputs: values of the anchor's non-parameter operands (:attr:`inputs` order).
            leaves: values of the claimed leaves (:attr:`leaves` order).
        """
        operands = [None] * len(self.eqn.invars)
        for i, val in zip(self.inputs, inputs, strict=True):
            operands[i] = val
        leaves = list(leaves)
        for i, view, val in zip(self.positions, self.views, leaves, strict=False):
            operands[i] = view.apply(val)
        out = bind_eqn(self.eqn, operands)
        if self.shift is not None:
            for eqn in self.shift.post:
                out = bind_eqn(eqn, [out])
            ops = [out, out]
            ops[self.shift.position] = self.shift.view.apply(leaves[-1])
            out = bind_eqn(self.shift.eqn, ops)
        return out


class GramData(NamedTuple):
    """What the Gram route hands :meth:`AbstractPattern.gram` for one site.

    Attributes:
        inputs: values of the recorded operands (:attr:`Site.record` order).
        input_axes: the example axis of each recorded operand.
        cot: ``(r, *anchor_shape)``: per factor column ``a``, ``∂⟨M[:, :, a], eta⟩/∂out``
            (``M`` the scaled output-Fisher factor), in the anchor output's layout.
        out_axis: the example axis of the anchor's output (of ``cot[a]``).
    """

    inputs: tuple
    input_axes: tuple
    cot: Any
    out_axis: int


class AbstractPattern(abc.ABC):
    """One kind of layer (see the module docstring for how to write one).

    Class attributes:
        name: short unique name (``"dense"``); also the map's name and kind at layer
            granularity.
        primitives: the primitive names whose equations :meth:`match` looks at.
        foldable: the pattern's sites are additive shifts of their first non-parameter
            operand, which the site producing that operand may absorb.
    """

    name: str = ""
    primitives: tuple = ()
    foldable: bool = False

    @abc.abstractmethod
    def match(self, eqn, operands: tuple) -> Match | Decline | None:
        """Claim ``eqn`` (see the module docstring). ``operands``: one :class:`Operand` each."""

    @abc.abstractmethod
    def gram(self, site: Site, data: GramData):
        """The site's ``(N·r, N·r)`` block of ``C = Mᵀ J Jᵀ M`` (rows ``(example, column)``)."""

    def gram_operator(self, site: Site, data: GramData) -> Callable | None:
        """The product ``v ↦ C_site v`` (``v`` of shape ``(N, r)``) without forming the block,
        where a factored form is cheaper per product than going through the parameters;
        ``None`` (the default): the iterative Gram route multiplies through the linearised
        model for the site's leaves instead."""
        return None

    def gram_decline(self, site: Site, input_axes: tuple, out_axis: int) -> str | None:
        """Why :meth:`gram` cannot handle the site with these example axes (``None``: it can).

        The default refuses a site whose output-shaped views (elementwise operands, the
        folded shift) vary along the output's example axis: a parameter entry that belongs
        to one example has no shared per-example rows.
        """
        rank = len(site.anchor_shape)
        for view in (v for _, v in site.params):
            if len(view.shape) == rank and out_axis in view.data_axes:
                return "the parameter varies along the example axis"
        if site.shift is not None and out_axis in site.shift.data_axes:
            return "the shift varies along the example axis"
        return None

    def absorb(self, site: Site, shift: Shift) -> bool:
        """Whether ``site`` can take ``shift`` (an add of a parameter to its output) in."""
        return False

    def layer_rule(self, site: Site) -> Callable:
        """The natural rule of the site's map at layer granularity (default: generic)."""
        from natchain._modular._core import generic_rule

        return generic_rule

    def __repr__(self) -> str:
        return f"<pattern {self.name}>"


def rows_gram(rows):
    """``G Gᵀ`` for per-example rows ``G`` of shape ``(N, r, …)`` → ``(N·r, N·r)``."""
    n, r = rows.shape[:2]
    g = rows.reshape(n * r, -1)
    return g @ g.T


def shift_rows(cot, data_axes, out_axis):
    """Per-example rows of a shift ``out = h + view(b)``: ``∂⟨D̃, out⟩/∂b`` per example.

    Args:
        cot: ``(r, *out_shape)`` tap cotangents.
        data_axes: the view's data axes (in the output's layout, same rank).
        out_axis: the output's example axis (not a data axis).

    Returns:
        ``(N, r, size of b)``: the cotangent summed over the broadcast axes, entries of
        ``b`` in a fixed (bijective) order, which a Gram product does not see.
    """
    if out_axis in data_axes:
        raise ValueError("a shift that varies along the example axis has no shared rows.")
    nd = cot.ndim - 1
    summed = tuple(1 + a for a in range(nd) if a != out_axis and a not in data_axes)
    s = jnp.sum(cot, axis=summed) if summed else cot
    # remaining axes of s: (r, *[a for a in range(nd) if a == out_axis or a in data_axes])
    kept = [a for a in range(nd) if a == out_axis or a in data_axes]
    s = jnp.moveaxis(s, 1 + kept.index(out_axis), 0)  # (N, r, data...)
    return s.reshape(s.shape[0], s.shape[1], int(np.prod(s.shape[2:], dtype=int)))
