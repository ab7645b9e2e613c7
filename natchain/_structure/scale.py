"""Elementwise parameter scales: ``h * gamma`` with ``gamma`` broadcast (LayerNorm/RMSNorm
affine scale, per-channel scales); a shift added to the product is folded (``h * gamma + beta``).

Per-example rows: ``∂⟨D̃_a, h ∘ view(γ)⟩/∂γ`` restricted to example ``i`` is ``D̃_{a,i} ∘ h_i``
summed over the axes ``γ`` is broadcast along (:func:`shift_rows` of ``D̃ ∘ h``);
``C = G Gᵀ``.

Layer rule, closed form. Group the output entries by the entry ``c`` of ``γ`` they read
(``K`` entries each; a folded ``β`` must be broadcast the same way, else the generic rule
applies). Within group ``c`` the map's ``J Jᵀ`` is ``a_c I + U Uᵀ`` with ``U = [h_c]`` or
``[h_c, 1]`` (with ``β``) and ``a_c = γ_c²`` when ``h`` is differentiated (``0`` when it is
data): eigenvalues ``a_c + λ`` on the span of ``U`` (``λ`` from the ``2 × 2`` ``UᵀU``) and
``a_c`` on its complement. So ``u = (J Jᵀ)⁺ n`` costs one batched ``2 × 2`` eigh, and
``(n_h, n_γ, n_β) = (γ ∘ u, Pᵀ(h ∘ u), Pᵀ u)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from natchain._structure._base import AbstractPattern, Decline, Match, rows_gram, shift_rows
from natchain._structure._registry import register_pattern


class ScalePattern(AbstractPattern):
    """``mul(h, view(gamma))`` with ``h`` no parameter."""

    name = "scale"
    primitives = ("mul",)

    def match(self, eqn, operands):
        a, b = operands
        if a.is_param and b.is_param:
            return Decline("a product of two parameters")
        pos = 1 if b.is_param else 0
        h = operands[1 - pos]
        if h.literal:
            return Decline("a parameter times a constant")
        return Match({"scale": operands[pos].view}, record=(1 - pos,))

    def absorb(self, site, shift):
        return True

    def gram(self, site, data):
        (h,), _, cot, out_axis = data
        (view, *_) = site.views
        rows = shift_rows(cot * h[None].astype(cot.dtype), view.data_axes, out_axis)
        if site.shift is not None:
            extra = shift_rows(cot, site.shift.data_axes, out_axis)
            rows = jnp.concatenate([rows, extra], axis=2)
        return rows_gram(rows)

    def layer_rule(self, site):
        from natchain._modular._core import generic_rule

        (view,) = (v for _, v in site.params)
        if site.shift is not None and tuple(site.shift.data_axes) != tuple(view.data_axes):
            return generic_rule  # γ and β grouped differently: no shared blocks
        return lambda local, n_out: _scale_rule(site, view, local, n_out)


def _transpose_of(f, like, value):
    (out,) = jax.linear_transpose(f, like)(value.astype(jax.eval_shape(f, like).dtype))
    return out


def _scale_rule(site, view, local, n_out):
    from natchain._modular._core import default_rcond, stats_from_squares

    shape = site.anchor_shape
    h, g = local.primals[0], local.primals[1]
    b = local.primals[2] if site.shift is not None else None
    h_diff = local.diff[0]
    n = site.to_anchor(n_out[0])
    dtype = jnp.result_type(n)
    data = tuple(view.data_axes)
    perm = (*data, *(a for a in range(len(shape)) if a not in data))
    groups = int(np.prod([shape[a] for a in data], dtype=int))

    def grouped(x):
        return jnp.transpose(jnp.broadcast_to(x, shape), perm).reshape(groups, -1)

    def ungrouped(x):
        return jnp.transpose(x.reshape([shape[a] for a in perm]), np.argsort(perm))

    def spread_h(x):
        return jnp.broadcast_to(x, shape).astype(dtype)

    def spread_g(x):
        return jnp.broadcast_to(view.apply(x), shape).astype(dtype)

    hb, gv = grouped(spread_h(h)), grouped(spread_g(g))[:, 0]
    k = hb.shape[1]
    cols = [hb] if b is None else [hb, jnp.ones_like(hb)]
    u_mat = jnp.stack(cols, axis=2)  # (G, K, q)
    lam, vec = jnp.linalg.eigh(jnp.einsum("gkq,gkp->gqp", u_mat, u_mat))
    a = gv * gv if h_diff else jnp.zeros_like(gv)
    q = u_mat.shape[2]
    rank_u = min(q, k)
    ev = (
        jnp.concatenate(  # eigenvalues of every group's J Jᵀ
            [lam[:, ::-1][:, :rank_u], jnp.zeros((groups, k - rank_u), dtype)], axis=1
        )
        + a[:, None]
    )
    rcond = default_rcond(local, dtype) if local.rcond is None else local.rcond
    _, stats = stats_from_squares(ev, rcond, min(local.out_size, local.in_size))
    top = jnp.max(ev)
    tol = rcond * rcond * top
    nz = lam > jnp.finfo(dtype).eps * jnp.maximum(jnp.max(lam), 1.0) * k
    basis = jnp.einsum("gkq,gqp->gkp", u_mat, vec) / jnp.sqrt(jnp.where(nz, lam, 1.0))[:, None]
    basis = jnp.where(nz[:, None, :], basis, 0.0)  # orthonormal basis of span(U)
    nn = grouped(n)
    c = jnp.einsum("gkp,gk->gp", basis, nn)
    main = a[:, None] + lam
    keep = nz & (main > tol)
    u = jnp.einsum("gkp,gp->gk", basis, jnp.where(keep, c / jnp.where(keep, main, 1.0), 0.0))
    keep_rest = (a > tol)[:, None]
    rest = nn - jnp.einsum("gkp,gp->gk", basis, c)
    u = u + jnp.where(keep_rest, rest / jnp.where(keep_rest, a[:, None], 1.0), 0.0)
    u = ungrouped(u)
    outs = []
    if h_diff:
        outs.append(_transpose_of(spread_h, h, spread_g(g) * u).astype(h.dtype))
    outs.append(_transpose_of(spread_g, g, spread_h(h) * u).astype(g.dtype))
    if b is not None:

        def spread_b(x):
            return site.shift.anchor_value(x, site.out_shape).astype(dtype)

        outs.append(_transpose_of(spread_b, b, u).astype(b.dtype))
    return tuple(outs), stats


register_pattern(ScalePattern())
