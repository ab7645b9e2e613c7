"""``conv_general_dilated``: a convolution split jointly between its input and its kernel.

The output is indexed canonically as ``(n, o, p)``: example, output feature, flattened
output position. With ``feature_group_count = g`` the output features come in ``g`` groups
of ``O/g``, group ``j`` reading input feature group ``j``. ``J⁺ n = Jᵀ (J Jᵀ)⁺ n`` with
``J Jᵀ = J_x J_xᵀ + J_W J_Wᵀ``, and both terms have structure:

- **kernel** ``W`` (an input that is data — the first layer): the kernel's Jacobian at
  output feature ``o`` is the patch matrix ``Π_j`` of the input (rows ``(n, p)``, columns the
  kernel taps of group ``j``), the same for every ``o`` in the group, so
  ``J_W J_Wᵀ = ⊕_j G_j ⊗ I_{O/g}`` with ``G_j = Π_j Π_jᵀ`` (``N·P × N·P``): one small
  pseudo-inverse per group, exact with the cut-off.
- **input** ``x`` (the kernel fixed): the conv is the same linear map on every example, so
  ``J_x J_xᵀ = I_N ⊗ A`` with ``A = J₁ J₁ᵀ`` (``O·P × O·P``) from one example's Jacobian.
- **both**: ``K = I_N ⊗ A + ⊕_j G_j ⊗ I`` is no Kronecker sum (both terms act on ``p``). It is
  assembled and pseudo-inverted densely when ``N·O·P ≤ DENSE_LIMIT``; above that it is
  solved by preconditioned conjugate gradients with the structured product (an ``A`` and
  a ``G`` matmul per step), the preconditioner keeping the kernel's term exactly and
  replacing ``A`` by a multiple of the identity. The iterative solve needs ``J`` of full
  row rank: it is refused when that cannot hold (more outputs than inputs), and its
  statistics say when it did not reach its tolerance (``condition = inf``; it is ``nan``,
  not measured, when it did).

``batch_group_count > 1`` (met only inside gradients of grouped convolutions) mixes
examples; it falls back to the materialised local Jacobian, refused above
``GENERIC_LIMIT`` entries with an error naming the sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from natchain._modular._core import LocalStats, eps_of, generic_rule, sylvester_pinv
from natchain._modular._registry import register_rule

#: largest ``N·O·P`` for the dense joint solve in the output space.
DENSE_LIMIT = 2048
#: largest per-example output ``O·P`` (the block ``A``) and ``N·P`` (the patch Gram ``G_j``).
BLOCK_LIMIT = 4096
#: largest ``out · in`` for the materialised local Jacobian of an unstructured configuration.
GENERIC_LIMIT = 1 << 22
#: most conjugate-gradient steps of the iterative joint solve.
CG_MAX_STEPS = 2000


def _bind(params, lhs, rhs):
    return lax.conv_general_dilated_p.bind(lhs, rhs, **params)


def specs(params):
    dn = params["dimension_numbers"]
    return tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)


def _too_large(what, sizes, limit, name):
    return ValueError(
        f"conv_general_dilated: the natural rule {what} ({sizes}), above {name} = {limit}. "
        "Use a smaller batch or layer, or raise natchain._modular._rules.conv."
        f"{name} if the memory allows."
    )


def to_canonical(y, out_spec):
    """Output array -> ``(N, O, P)``."""
    t = jnp.transpose(y, out_spec)
    return t.reshape(t.shape[0], t.shape[1], -1)


def from_canonical(u, shape, out_spec):
    tshape = tuple(shape[d] for d in out_spec)
    return jnp.transpose(u.reshape(tshape), np.argsort(out_spec))


def patches(params, x, w_shape, dtype):
    """The patch matrices ``Π_j`` of the input per feature group: ``(g, N, P, taps)``.

    Row ``(n, p)`` of ``Π_j`` is the derivative of output position ``p`` of example ``n`` (any
    output feature of group ``j``) w.r.t. the group's kernel taps: a forward-mode Jacobian
    of the convolution with one output feature per group, so strides, padding, dilations
    and dimension numbers are the equation's own.
    """
    _, rhs_spec, out_spec = specs(params)
    g = params["feature_group_count"]
    w1_shape = list(w_shape)
    w1_shape[rhs_spec[0]] = g  # one output feature per group

    def conv1(w1):
        return _bind(params, x, w1)

    jac = jax.jacfwd(conv1)(jnp.zeros(w1_shape, dtype))
    od = len(out_spec)
    jac = jnp.transpose(jac, [*out_spec, *(od + r for r in rhs_spec)])
    n, p = jac.shape[0], int(np.prod(jac.shape[2:od]))
    jac = jac.reshape(n, g, p, g, -1)
    ar = np.arange(g)
    return jac[:, ar, :, ar, :]  # advanced indices first: (g, N, P, taps)


def _patch_grams(params, x, w_shape, dtype, bias=False):
    """``G_j = Π_j Π_jᵀ`` per feature group, ``(g, N·P, N·P)``; ``+ 11ᵀ`` with a bias."""
    pj = patches(params, x, w_shape, dtype)
    g = pj.shape[0]
    pj = pj.reshape(g, -1, pj.shape[-1])
    grams = jnp.einsum("gac,gbc->gab", pj, pj)
    return grams + 1.0 if bias else grams


def _example_block(params, x, w, dtype):
    """``A = J₁ J₁ᵀ`` (``O·P × O·P``): the input Jacobian of one example, the same for all."""
    lhs_spec, _, out_spec = specs(params)
    x1 = lax.slice_in_dim(x, 0, 1, axis=lhs_spec[0])

    def conv1(a):
        return to_canonical(_bind(params, a, w), out_spec).reshape(-1)

    out_size = int(np.prod(jax.eval_shape(conv1, x1).shape))
    jac_fn = jax.jacrev if out_size < x1.size else jax.jacfwd
    jm = jac_fn(conv1)(x1.astype(dtype)).reshape(out_size, -1)
    return jm @ jm.T


def _group_view(u, g):
    """``(N, O, P)`` -> ``(g, N·P, O/g)``."""
    n, o, p = u.shape
    return u.reshape(n, g, o // g, p).transpose(1, 0, 3, 2).reshape(g, n * p, o // g)


def _ungroup(v, n, o, p):
    g = v.shape[0]
    return v.reshape(g, n, p, o // g).transpose(1, 0, 3, 2).reshape(n, o, p)


def _joint_dense(a, grams, n, g):
    """Assemble ``K = I_N ⊗ A + ⊕_j G_j ⊗ I`` on ``(n, o, p)``."""
    nb, o, p = n.shape
    og = o // g
    k_x = jnp.einsum("nm,ab->namb", jnp.eye(nb, dtype=a.dtype), a).reshape(nb, o, p, nb, o, p)
    g5 = grams.reshape(g, nb, p, nb, p)
    eye = jnp.eye(og, dtype=a.dtype)
    t = jnp.einsum("gnpmq,ik->ngipmkq", g5, eye)[:, :, :, :, :, None]
    k_w = t * jnp.eye(g, dtype=a.dtype)[None, :, None, None, None, :, None, None]  # no coupling
    k_w = k_w.reshape(nb, o, p, nb, o, p)  # across groups
    size = nb * o * p
    return (k_x + k_w).reshape(size, size)


def _joint_cg(a, grams, n, g):
    """Preconditioned CG for ``K u = n`` with the structured product.

    The preconditioner replaces ``A`` by ``c I`` (``c`` its mean eigenvalue) and keeps the
    kernel's term exactly: ``M = ⊕_j (G_j + c I) ⊗ I``, inverted through the eigenvalues of
    the ``G_j``. Since ``α_min I ⪯ A ⪯ α_max I``, the preconditioned spectrum lies in
    ``[min(1, α_min/c), max(1, α_max/c)]``: the iteration count depends on the condition
    of one example's input Jacobian, not on the activations' scale or the batch.

    Returns:
        ``(u, converged, steps)``.
    """
    nb, o, p = n.shape
    dtype = n.dtype

    def matvec(u):
        t1 = (u.reshape(nb, o * p) @ a).reshape(nb, o, p)  # A is symmetric
        t2 = _ungroup(jnp.einsum("gab,gbk->gak", grams, _group_view(u, g)), nb, o, p)
        return t1 + t2

    c = jnp.trace(a) / a.shape[0]
    lam, vec = jnp.linalg.eigh(grams)
    inv = 1.0 / (jnp.maximum(lam, 0.0) + c)

    def precond(r):
        v = _group_view(r, g)
        v = jnp.einsum("gba,gbk->gak", vec, v) * inv[:, :, None]
        return _ungroup(jnp.einsum("gab,gbk->gak", vec, v), nb, o, p)

    tol = 1e3 * eps_of(dtype)
    bnorm = jnp.sqrt(jnp.sum(n * n))
    x0 = jnp.zeros_like(n)
    z0 = precond(n)
    rz0 = jnp.sum(n * z0)

    def cond(state):
        k, _, r, _, _ = state
        return (k < CG_MAX_STEPS) & (jnp.sqrt(jnp.sum(r * r)) > tol * bnorm)

    def body(state):
        k, x, r, d, rz = state
        kd = matvec(d)
        alpha = rz / jnp.sum(d * kd)
        x = x + alpha * d
        r = r - alpha * kd
        z = precond(r)
        rz_new = jnp.sum(r * z)
        d = z + (rz_new / rz) * d
        return k + 1, x, r, d, rz_new

    steps, x, r, _, _ = lax.while_loop(cond, body, (0, x0, n, z0, rz0))
    resid = jnp.sqrt(jnp.sum((matvec(x) - n) ** 2))
    return x, resid <= 10 * tol * bnorm, steps


def _guarded_generic(local, n_out, why):
    size = local.out_size * local.in_size
    if size > GENERIC_LIMIT:
        raise _too_large(
            f"for {why} materialises the local Jacobian",
            f"{local.out_size} outputs x {local.in_size} inputs = {size} entries",
            GENERIC_LIMIT,
            "GENERIC_LIMIT",
        )
    return generic_rule(local, n_out)


def conv_solve(local, x, w, dx, dw, n, bias=False):
    """``(J Jᵀ)⁺ n`` in the canonical output layout ``(N, O, P)``, with its statistics.

    Args:
        local: the map (for sizes, the cut-off and the fallback's error message).
        x, w: the convolution's input and kernel (in the equation's layouts).
        dx, dw: whether each is differentiated.
        n: ``(N, O, P)`` natural cotangent of the output.
        bias: whether a per-output-feature bias is differentiated too (layer granularity):
            it adds ``11ᵀ`` to every patch Gram matrix.

    Returns:
        ``(u, stats)`` with ``J⁺ n = Jᵀ u``.
    """
    params = local.params
    g = params["feature_group_count"]
    dtype = n.dtype
    nb, o, p = n.shape
    n_min = min(local.out_size, local.in_size)
    rcond = local.rcond
    if dw and nb * p > BLOCK_LIMIT:
        raise _too_large(
            "needs the patch Gram matrix of the kernel",
            f"N·P = {nb}·{p} = {nb * p} rows",
            BLOCK_LIMIT,
            "BLOCK_LIMIT",
        )
    if dx and o * p > BLOCK_LIMIT:
        raise _too_large(
            "needs the per-example block of the input",
            f"O·P = {o}·{p} = {o * p} outputs per example",
            BLOCK_LIMIT,
            "BLOCK_LIMIT",
        )
    xd, wd = x.astype(dtype), w.astype(dtype)
    grams = _patch_grams(params, xd, w.shape, dtype, bias) if dw else None
    a = _example_block(params, xd, wd, dtype) if dx else None
    if not dx:  # kernel only
        u, stats = sylvester_pinv(grams, None, _group_view(n, g), rcond, n_min)
        return _ungroup(u, nb, o, p), stats
    if not dw:  # input only
        cols = n.reshape(1, nb, o * p).swapaxes(1, 2)
        u, stats = sylvester_pinv(a[None], None, cols, rcond, n_min)
        return u.swapaxes(1, 2).reshape(nb, o, p), stats
    if nb * o * p <= DENSE_LIMIT:
        k = _joint_dense(a, grams, n, g)
        u, stats = sylvester_pinv(k[None], None, n.reshape(1, -1, 1), rcond, n_min)
        return u.reshape(nb, o, p), stats
    if local.out_size > local.in_size:
        raise ValueError(
            f"conv_general_dilated: the iterative natural rule needs a Jacobian of full row "
            f"rank, impossible with {local.out_size} outputs and {local.in_size} "
            f"differentiated inputs (above DENSE_LIMIT = {DENSE_LIMIT} outputs for the "
            "dense solve)."
        )
    u, converged, _ = _joint_cg(a, grams, n, g)
    cond = jnp.where(converged, jnp.nan, jnp.inf).astype(dtype)
    return u, LocalStats(jnp.asarray(local.out_size), jnp.asarray(n_min - local.out_size), cond)


def pullback(local, u):
    """``Jᵀ u`` for the map's differentiated inputs (one VJP of ``local.fn``)."""
    diff_in = local.diff_primals
    _, lin = jax.linearize(lambda *d: local.fn(*d)[0], *diff_in)
    lin_t = jax.linear_transpose(lin, *diff_in)
    return tuple(lin_t(u.astype(jnp.result_type(local.outputs[0]))))


def conv_rule(local, n_out):
    """Natural rule of ``conv_general_dilated`` w.r.t. its differentiated input and/or kernel."""
    if local.params["batch_group_count"] != 1:
        return _guarded_generic(local, n_out, "batch_group_count > 1")
    x, w = local.primals
    dx, dw = local.diff
    _, _, out_spec = specs(local.params)
    (y,) = local.outputs
    dtype = jnp.result_type(x, w, y)
    n = to_canonical(n_out[0].astype(dtype), out_spec)
    u, stats = conv_solve(local, x, w, dx, dw, n)
    return pullback(local, from_canonical(u, y.shape, out_spec)), stats


register_rule("conv_general_dilated", conv_rule)
