"""``dot_general``: a product ``Y = A B`` split jointly between its differentiated operands.

After moving batch, free and contracted dimensions into place, ``Y_b = A_b B_b`` and
``J Jᵀ U = U Q + P U`` with ``P = A Aᵀ`` (if ``B`` is differentiated) and ``Q = BᵀB`` (if
``A`` is): the Kronecker sum of docs/theory.md §3's dense layer without bias. With ``A`` data
(``x @ W``) it reduces to ``n_W = Aᵀ (A Aᵀ)⁺ n``: the batch is one map, the weight shared
by its rows is pseudo-inverted jointly.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from natchain._modular._core import sylvester_pinv
from natchain._modular._registry import register_rule


def _canonical(x, batch, contract, lead_contract):
    free = [i for i in range(x.ndim) if i not in batch and i not in contract]
    order = [*batch, *free, *contract] if not lead_contract else [*batch, *contract, *free]
    bt = int(np.prod([x.shape[i] for i in batch]))
    nf = int(np.prod([x.shape[i] for i in free]))
    nc = int(np.prod([x.shape[i] for i in contract]))
    shape = (bt, nf, nc) if not lead_contract else (bt, nc, nf)
    xt = jnp.transpose(x, order)
    return xt.reshape(shape), order, xt.shape


def _restore(xc, order, tshape, dtype):
    x = xc.reshape(tshape)
    return jnp.transpose(x, np.argsort(order)).astype(dtype)


def dot_general_rule(local, n_out):
    """Natural rule of ``dot_general`` with respect to whichever operands are differentiated."""
    a, b = local.primals
    da, db = local.diff
    (lc, rc), (lb, rb) = local.params["dimension_numbers"]
    ac, a_order, a_tshape = _canonical(a, tuple(lb), tuple(lc), False)
    bc, b_order, b_tshape = _canonical(b, tuple(rb), tuple(rc), True)
    dtype = jnp.result_type(ac, bc, n_out[0])
    ac, bc = ac.astype(dtype), bc.astype(dtype)
    bt, m, _ = ac.shape
    k = bc.shape[2]
    n = n_out[0].astype(dtype).reshape(bt, m, k)
    p = jnp.einsum("bik,bjk->bij", ac, ac) if db else None
    q = jnp.einsum("bki,bkj->bij", bc, bc) if da else None
    u, stats = sylvester_pinv(p, q, n, local.rcond, min(local.out_size, local.in_size))
    outs = []
    if da:
        outs.append(_restore(jnp.einsum("bmn,bkn->bmk", u, bc), a_order, a_tshape, a.dtype))
    if db:
        outs.append(_restore(jnp.einsum("bmk,bmn->bkn", ac, u), b_order, b_tshape, b.dtype))
    return tuple(outs), stats


register_rule("dot_general", dot_general_rule)
