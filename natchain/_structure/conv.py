"""Convolutions: ``conv_general_dilated`` of an input and a parameter kernel, with a bias.

The kernel ``W`` is a view of a leaf (any layout the dimension numbers allow, NHWC or
NCHW, 1-D to N-D); the input ``x`` is not a parameter. A bias broadcast along the output
feature axis (Flax's ``reshape``, Equinox's ``(O, 1, 1)`` under ``vmap``) is folded in.
With the output indexed ``(n, o, p)`` (example, feature of group ``j``, position), the
tap cotangents as ``D̃ (r, N, O, P)`` and the input's patch matrices ``Π_j`` (rows
``(n, p)``, the group's kernel taps as columns; see
:func:`natchain._modular._rules.conv.patches`):

- **Gram block**. The kernel's part of ``J Jᵀ`` is ``⊕_j G_j ⊗ I`` with
  ``G_j = Π_j Π_jᵀ`` (``+ 11ᵀ`` for the bias), so
  ``C[(i,a),(k,b)] = Σ_o Σ_{p,q} D̃_{a,iop} (G_j)_{(ip),(kq)} D̃_{b,koq}``; or per-example
  kernel-gradient rows ``G_{(i,a)} = Σ_p D̃_{a,i·p} ⊗ Π_{j,ip}`` (and ``Σ_p D̃_{a,iop}`` for
  the bias), ``C = G Gᵀ`` — whichever costs fewer flops.
- **Layer rule**: :func:`natchain._modular._rules.conv.conv_solve` jointly over
  ``(x, W, b)`` (``(W, b)`` when ``x`` is data), then one VJP of the site's map — exactly the
  pseudo-inverse of its local Jacobian (the leaf layouts are permutations).

Declined (the leaf falls back, and inspection says why): a kernel that is a broadcast
parameter or the convolution's *input*, ``batch_group_count > 1``, and — on the Gram
route — example axes other than the batch dimensions of input and output.
"""

from __future__ import annotations

import jax.numpy as jnp

from natchain._structure._base import AbstractPattern, Decline, Match, rows_gram, shift_rows
from natchain._structure._registry import register_pattern


def _conv():
    """The convolution's rule module (imported late: the modular package imports this one)."""
    from natchain._modular._rules import conv

    return conv


class ConvPattern(AbstractPattern):
    """``conv_general_dilated(x, W)`` with ``W`` a parameter; a per-feature bias is folded."""

    name = "conv"
    primitives = ("conv_general_dilated",)

    def match(self, eqn, operands):
        x, w = operands
        if x.is_param:
            return Decline("the convolution's input is a parameter")
        if x.literal:
            return Decline("the convolution's input is a constant")
        if not w.view.bijective:
            return Decline("the kernel is a broadcast parameter")
        if eqn.params["batch_group_count"] != 1:
            return Decline("batch_group_count > 1 mixes examples")
        lhs_spec, rhs_spec, out_spec = _conv().specs(eqn.params)
        info = dict(lhs_spec=lhs_spec, rhs_spec=rhs_spec, out_spec=out_spec)
        return Match({"kernel": w.view}, record=(0,), info=info)

    def absorb(self, site, shift):
        feature = site.info["out_spec"][1]
        wanted = {feature} if site.anchor_shape[feature] > 1 else set()
        return set(shift.data_axes) == wanted

    def gram_decline(self, site, input_axes, out_axis):
        (x_axis,) = input_axes
        if x_axis != site.info["lhs_spec"][0]:
            return "the example axis of the input is not the convolution's batch dimension"
        if out_axis != site.info["out_spec"][0]:
            return "the example axis of the output is not the convolution's batch dimension"
        return None

    def gram(self, site, data):
        (x,), _, cot, out_axis = data
        params = site.eqn.params
        g = params["feature_group_count"]
        kernel = site.views[0]
        dtype = jnp.result_type(x, cot)
        pj = _conv().patches(params, x.astype(dtype), kernel.shape, dtype)  # (g, N, P, taps)
        _, nb, p, taps = pj.shape
        r = cot.shape[0]
        out_spec = site.info["out_spec"]
        d = jnp.transpose(cot, (0, *(1 + a for a in out_spec))).astype(dtype)
        o = d.shape[2]
        d = d.reshape(r, nb, g, o // g, p)
        bias = site.shift is not None
        rows_cost = nb * r * p * o * taps + (nb * r) ** 2 * o * (taps + bias)
        kernel_cost = g * (nb * p) ** 2 * taps + r * nb * o * p * nb * p + (nb * r) ** 2 * o * p
        if kernel_cost < rows_cost:
            pm = pj.reshape(g, nb * p, taps)
            gram = jnp.einsum("gac,gbc->gab", pm, pm).reshape(g, nb, p, nb, p)
            if bias:
                gram = gram + 1.0
            t = jnp.einsum("aigop,gipkq->aigokq", d, gram)
            c = jnp.einsum("aigokq,bkgoq->iakb", t, d)
            return c.reshape(nb * r, nb * r)
        rows = jnp.einsum("aigop,gipc->iagoc", d, pj).reshape(nb, r, -1)
        if bias:
            extra = shift_rows(cot, site.shift.data_axes, out_axis).astype(dtype)
            rows = jnp.concatenate([rows, extra], axis=2)
        return rows_gram(rows)

    def layer_rule(self, site):
        out_spec = site.info["out_spec"]
        bias = site.shift is not None

        def rule(local, n_out):
            x, w_leaf = local.primals[0], local.primals[1]
            dx, dw = local.diff[0], local.diff[1]
            w = site.views[0].apply(w_leaf)
            dtype = jnp.result_type(x, w, local.outputs[0])
            anchor = site.to_anchor(n_out[0].astype(dtype))
            n = _conv().to_canonical(anchor, out_spec)
            u, stats = _conv().conv_solve(
                local._replace(params=site.eqn.params), x, w, dx, dw, n, bias=bias and local.diff[2]
            )
            u = _conv().from_canonical(u, site.anchor_shape, out_spec)
            if site.shift is not None and site.shift.post_perm:
                u = jnp.transpose(u, site.shift.post_perm)
            return _conv().pullback(local, u), stats

        return rule


register_pattern(ConvPattern())
