"""Dense layers: ``dot_general`` of an input and a parameter weight, with an optional bias.

Every spelling reduces to one layout. The weight ``W`` (a view of a leaf: stored
transposed, reshaped, on the left as vmapped per-example code produces it, or on the
right) is contracted with the input ``h`` over some axes; ``h``'s free axes are the
example axis and any extra axes ``S`` (tokens of an ``(N, T, d)`` sequence). With ``h`` as
``(N, S, C)``, the tap cotangents as ``D̃ (r, N, S, O)`` and a bias ``b (O,)`` broadcast
over every row:

- **Gram block**, kernel trick:
  ``C[(i,a),(j,b)] = Σ_{s,t} (h_{is}·h_{jt} + 1) (D̃_{a,is}·D̃_{b,jt})``;
  or per-example weight-gradient rows ``G_{(i,a)} = Σ_s h_{is} ⊗ D̃_{a,is}`` (and
  ``Σ_s D̃_{a,is}`` for the bias), ``C = G Gᵀ`` — whichever costs fewer flops (rows win for
  long sequences).
- **Layer rule**: with every row of every example stacked (``R = N·S`` rows),
  ``Y = H W + 1 bᵀ`` and :func:`natchain._modular._layers.dense_rule`'s closed form, then
  the permutations back to the stored layouts (a permutation's pseudo-inverse is its
  transpose, so this is exactly the pseudo-inverse of the site's local Jacobian).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from natchain._structure._base import AbstractPattern, Decline, Match, rows_gram
from natchain._structure._registry import register_pattern


def factored_product_pays(rows: int, width: int) -> bool:
    """Whether the kernel form of a product with a dense layer's block of ``C`` is cheaper
    than two passes through its weight: ``rows² O < 2 · rows · C · O`` for ``rows = N·S``
    input rows of width ``C``, i.e. ``rows < 2·C``."""
    return rows < 2 * width


def _prod(shape, axes):
    return math.prod(int(shape[a]) for a in axes)


class DensePattern(AbstractPattern):
    """``dot_general(h, W)`` or ``dot_general(W, h)``; a bias added to its output is folded."""

    name = "dense"
    primitives = ("dot_general",)

    def match(self, eqn, operands):
        lhs, rhs = operands
        if lhs.is_param and rhs.is_param:
            return Decline("both operands are parameters")
        w_pos = 1 if rhs.is_param else 0
        w, h = operands[w_pos], operands[1 - w_pos]
        if h.literal:
            return Decline("the other operand is a constant")
        if not w.view.bijective:
            return Decline("the weight is a broadcast parameter")
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb:
            return Decline("dot_general with batch dimensions on a parameter")
        wc, hc = (tuple(rc), tuple(lc)) if w_pos == 1 else (tuple(lc), tuple(rc))
        h_free = tuple(a for a in range(len(h.shape)) if a not in hc)
        w_free = tuple(a for a in range(len(w.shape)) if a not in wc)
        first, second = len(h_free), len(w_free)
        if w_pos == 1:
            out_h, out_w = tuple(range(first)), tuple(range(first, first + second))
        else:
            out_w, out_h = tuple(range(second)), tuple(range(second, second + first))
        info = dict(
            w_pos=w_pos, h_contract=hc, w_contract=wc, h_free=h_free, w_free=w_free,
            out_h=out_h, out_w=out_w,
        )  # fmt: skip
        return Match({"weight": w.view}, record=(1 - w_pos,), info=info)

    def absorb(self, site, shift):
        out_w = {a for a in site.info["out_w"] if site.anchor_shape[a] > 1}
        return set(shift.data_axes) == out_w

    def gram_decline(self, site, input_axes, out_axis):
        info = site.info
        (h_axis,) = input_axes
        if h_axis not in info["h_free"]:
            return "the example axis of the input is contracted with the weight"
        if info["out_h"][info["h_free"].index(h_axis)] != out_axis:
            return "the example axes of input and output do not correspond"
        return None

    def _operands(self, site, data):
        """``h`` as ``(N, S, C)`` and ``D̃`` as ``(r, N, S, O)`` (the module docstring's layout)."""
        info = site.info
        (h,), (h_axis,), cot, out_axis = data
        r = cot.shape[0]
        other = tuple(a for a in info["h_free"] if a != h_axis)
        out_other = tuple(info["out_h"][info["h_free"].index(a)] for a in other)
        n = h.shape[h_axis]
        s_, c_ = _prod(h.shape, other), _prod(h.shape, info["h_contract"])
        o_ = _prod(site.anchor_shape, info["out_w"])
        hm = jnp.transpose(h, (h_axis, *other, *info["h_contract"])).reshape(n, s_, c_)
        perm = (0, 1 + out_axis, *(1 + a for a in out_other), *(1 + a for a in info["out_w"]))
        d = jnp.transpose(cot, perm).reshape(r, n, s_, o_).astype(hm.dtype)
        return hm, d

    def _kernel(self, site, hm):
        hk = jnp.einsum("isc,jtc->isjt", hm, hm)
        return hk + 1.0 if site.shift is not None else hk

    def gram(self, site, data):
        hm, d = self._operands(site, data)
        r, n, s_, o_ = d.shape
        c_ = hm.shape[2]
        bias = site.shift is not None
        rows_cost = n * r * s_ * c_ * o_ + (n * r) ** 2 * (c_ + bias) * o_
        kernel_cost = (n * s_) ** 2 * c_ + (n * r * s_) ** 2 * o_ + (n * r * s_) ** 2
        if kernel_cost <= rows_cost:
            k = jnp.einsum("isjt,aiso,bjto->iajb", self._kernel(site, hm), d, d, optimize=True)
            return k.reshape(n * r, n * r)
        rows = jnp.einsum("isc,aiso->iaco", hm, d).reshape(n, r, c_ * o_)
        if bias:
            rows = jnp.concatenate([rows, jnp.swapaxes(jnp.sum(d, axis=2), 0, 1)], axis=2)
        return rows_gram(rows)

    def gram_operator(self, site, data):
        """The kernel trick as a product: ``v ↦ Σ_{s,o} D̃_{a,is,o} Σ_{j,t} (h_{is}·h_{jt} + 1)
        Σ_b D̃_{b,jt,o} v_{jb}``, ``(N·S)² O`` per product against ``2 N·S·C·O`` through
        the weight, after one ``(N·S)² C`` kernel; offered where the product is cheaper."""
        hm, d = self._operands(site, data)
        r, n, s_, o_ = d.shape
        if not factored_product_pays(n * s_, hm.shape[2]):
            return None
        hk = self._kernel(site, hm)

        def apply(v):
            w = jnp.einsum("bjto,jb->jto", d, v.astype(d.dtype))
            z = jnp.einsum("isjt,jto->iso", hk, w)
            return jnp.einsum("aiso,iso->ia", d, z)

        return apply

    def layer_rule(self, site):
        from natchain._modular._layers import dense_rule

        info = site.info
        out_order = (*info["out_h"], *info["out_w"])

        def to_rows(x, order, split):
            xt = jnp.transpose(x, order)
            return xt.reshape(_prod(xt.shape, range(split)), -1)

        def back(f, like, value):  # the layout map's transpose (its pseudo-inverse)
            out_dtype = jax.eval_shape(f, like).dtype
            (out,) = jax.linear_transpose(f, like)(value.astype(out_dtype))
            return out.astype(jnp.result_type(like))

        def rule(local, n_out):
            h_diff = local.diff[0]
            h, w = local.primals[0], local.primals[1]
            b = local.primals[2] if site.shift is not None else None
            w_view = site.views[0]
            nh = len(info["h_free"])

            def f_h(x):
                return to_rows(x, (*info["h_free"], *info["h_contract"]), nh)

            def f_w_mat(x):
                v = jnp.transpose(w_view.apply(x), (*info["w_contract"], *info["w_free"]))
                return v.reshape(_prod(v.shape, range(len(info["w_contract"]))), -1)

            def f_b(x):
                return to_rows(site.shift.anchor_value(x, site.out_shape), out_order, nh)[0]

            n = to_rows(site.to_anchor(n_out[0]), out_order, nh)
            bm = None if b is None else f_b(b)
            outs, stats = dense_rule(f_h(h), f_w_mat(w), bm, h_diff, False, n, local.rcond)
            outs = list(outs)
            res = []
            if h_diff:
                res.append(back(f_h, h, outs.pop(0)))
            res.append(back(f_w_mat, w, outs.pop(0)))
            if b is not None:
                res.append(back(f_b, b, outs.pop(0)))
            return tuple(res), stats

        return rule


register_pattern(DensePattern())
