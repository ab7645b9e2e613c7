"""Running on a mesh: one entry-point wrapper for both sharding modes, and a row-sharded Gram.

**Entry points.** Every route (``natural_gradient``, ``grad``, the optax transformation)
calls its traced computation through :func:`call_on_mesh`. When a batch carries *explicit*
mesh axes (``jax.sharding.AxisType.Explicit``), the computation runs under
``jax.sharding.auto_axes``: inside it those axes are automatic, so products over the
batch axis (``X Xᵀ``, ``Jᵀ F_blk J``) are placed by XLA's sharding propagation, exactly as
in automatic mode, and the outputs come back replicated. Per-example work (forward,
backward, per-layer structure) stays on each device's rows; the collectives are the ones
XLA inserts for the products over the batch (docs/sharding.md lists them per route).

**The Gram system by rows.** ``Gram(rows=axis)`` builds ``C = B Bᵀ`` (``B = Mᵀ J``, one
block of ``r`` rows per example) with each device holding the rows of its own examples:
its ``B`` rows come from per-example backward passes on its shard, and the other
devices' rows visit it one block at a time around a ring (``ppermute``), so a device holds
its own block of ``B`` and the visiting one (and the next, in transit), never all of
``B``. The system is then solved by a factorisation of the gathered ``C`` when it fits
(``max_dense_bytes``), else by conjugate gradient on the row-sharded ``C + λI`` (one
``all_gather`` of an ``N·r`` vector per step), so each device holds ``(N·r)²/D`` numbers
of the system.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec


def explicit_mesh(*trees):
    """The mesh of the first array in ``trees`` typed with explicit mesh axes, else ``None``.

    Works on concrete arrays and on tracers (the sharding is part of the type in explicit
    mode); the context mesh of ``jax.set_mesh`` is used when no argument names one.
    """
    for leaf in jax.tree_util.tree_leaves(trees):
        try:
            mesh = jax.typeof(leaf).sharding.mesh
        except (AttributeError, TypeError):
            continue
        if AxisType.Explicit in tuple(getattr(mesh, "axis_types", ())):
            return mesh
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and AxisType.Explicit in tuple(mesh.axis_types):
        return mesh
    return None


def call_on_mesh(fn, *args):
    """``fn(*args)``, with explicit mesh axes made automatic inside and outputs replicated.

    Without explicit axes this is a plain call (automatic mode needs nothing: sharding
    propagation already keeps per-example work on each device's shard).

    Args:
        fn: a function of arrays (pytrees) only; close over static configuration.
        *args: its array arguments (pytrees; ``None`` leaves allowed).

    Returns:
        ``fn(*args)``; in explicit mode every output is replicated over the mesh.
    """
    mesh = explicit_mesh(*args)
    if mesh is None:
        return fn(*args)
    axes = tuple(
        n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Explicit
    )
    context = contextlib.nullcontext()
    if jax.sharding.get_abstract_mesh().empty:
        context = jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh))
    with context:
        return jax.sharding.auto_axes(fn, axes=axes, out_sharding=PartitionSpec())(*args)


@dataclasses.dataclass(frozen=True)
class GramRows:
    """How ``Gram(rows=...)`` shards the ``N·r × N·r`` system by rows over a mesh axis.

    Args:
        axis: the mesh axis (or tuple of axes) the batch is sharded over.
        max_dense_bytes: gather the system and factorise it (Cholesky or eigh, as the
            Gram solver's ``factorization`` says) when the whole ``(N·r)²`` matrix takes at
            most this many bytes; otherwise solve by conjugate gradient on the
            row-sharded matrix. ``0`` always takes the iterative solve.
        tol: CG stops when ``‖c − (C + λI) y‖ ≤ tol · ‖c‖``.
        maxiter: CG step cap (``None``: ``4·N·r``).
        mesh: the mesh (``None``: the one of ``jax.set_mesh`` or of the batch's type).
    """

    axis: str | tuple = "batch"
    max_dense_bytes: int = 2**30
    tol: float = 1e-12
    maxiter: int | None = None
    mesh: object = None

    def __post_init__(self):
        names = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"rows axis must be a mesh axis name or a tuple of them; got {self.axis!r}."
            )
        if not (isinstance(self.max_dense_bytes, int) and self.max_dense_bytes >= 0):
            raise ValueError(
                f"max_dense_bytes must be an integer >= 0; got {self.max_dense_bytes!r}."
            )
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0; got {self.tol!r}.")
        if self.maxiter is not None and not (isinstance(self.maxiter, int) and self.maxiter >= 1):
            raise ValueError(f"maxiter must be a positive integer or None; got {self.maxiter!r}.")

    @classmethod
    def of(cls, rows):
        """``rows`` as ``Gram`` takes it: ``None``, an axis name (or tuple), a ``GramRows``."""
        if rows is None or isinstance(rows, cls):
            return rows
        return cls(axis=rows)

    def resolve_mesh(self):
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            raise ValueError(
                "Gram(rows=...) needs a mesh: call inside `with jax.set_mesh(mesh):` or pass "
                "GramRows(axis, mesh=mesh)."
            )
        names = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        missing = [n for n in names if n not in mesh.axis_names]
        if missing:
            raise ValueError(f"rows axis {missing} not in the mesh's axes {mesh.axis_names}.")
        return mesh


def _example_rows(problem):
    """``f(flat, x_local, m_local) -> B_local`` of shape ``(n_local·r, P)``, per example."""

    def rows(flat, x_local, m_local):
        def one(xi, mi):
            def f(p):
                xb = jax.tree_util.tree_map(lambda a: a[None], xi)
                return problem.model(problem.unravel(p), xb)[0]

            _, vjp = jax.vjp(f, flat)
            return jax.vmap(lambda c: vjp(c)[0])(mi.T)  # (r, P)

        b = jax.vmap(one)(x_local, m_local)
        return b.reshape(-1, b.shape[-1])

    return rows


#: Each block product is written in this many row chunks, so the transient product
#: is ``1/8`` of a block rather than a whole one.
_CHUNKS = 8


def _chunk_rows(k: int) -> int:
    """The largest divisor of ``k`` not above ``k / _CHUNKS`` (at least 1)."""
    return max(c for c in range(1, max(1, k // _CHUNKS) + 1) if k % c == 0)


def _ring_rows(b_local, axis, size):
    """This device's rows of ``C`` as ``D`` blocks in ring order, ``(D, k, k)``.

    Block ``s`` is ``B_me B_{(me − s) mod D}ᵀ`` (``me``: this device's index; ``k``: its
    number of rows). The blocks of ``B`` travel around the ring, ``D − 1`` shifts in all,
    so a device holds its own block of ``B`` and one visiting block at a time; each
    product is written in place, a few rows at a time.
    """
    k = b_local.shape[0]
    c = _chunk_rows(k)
    perm = [(j, (j + 1) % size) for j in range(size)]

    def write(s, visiting, out):
        def chunk(j, out):
            rows = jax.lax.dynamic_slice_in_dim(b_local, j * c, c)
            return jax.lax.dynamic_update_slice(out, (rows @ visiting.T)[None], (s, j * c, 0 * j))

        return jax.lax.fori_loop(0, k // c, chunk, out)

    def step(s, carry):
        out, visiting = carry
        visiting = jax.lax.ppermute(visiting, axis, perm)
        return write(s, visiting, out), visiting

    out = write(0, b_local, jnp.zeros((size, k, k), b_local.dtype))
    out, _ = jax.lax.fori_loop(1, size, step, (out, b_local))
    return out


def _ring_index(axis, size):
    """``(me − s) mod D`` for ``s = 0 … D−1``: the owner of each ring-order block."""
    me = jax.lax.axis_index(axis).astype(jnp.int32)
    return (me - jnp.arange(size, dtype=jnp.int32)) % size


def _ring_matvec(blocks, v, axis, size):
    """This device's rows of ``C v`` from its ring-order blocks and a replicated ``v``."""
    v_ring = v.reshape(size, -1)[_ring_index(axis, size)]
    # one product per block, then a sum: no copy of the blocks into one (k, N·r) matrix
    return jnp.sum(jnp.einsum("sij,sj->si", blocks, v_ring), axis=0)


def _from_ring(blocks, axis, size):
    """Ring-order blocks back as rows ``(k, N·r)`` in batch order."""
    order = jnp.argsort(_ring_index(axis, size))
    return jnp.moveaxis(blocks[order], 0, 1).reshape(blocks.shape[1], -1)


def _axis_size(mesh, axis):
    names = axis if isinstance(axis, tuple) else (axis,)
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def row_system(problem, rows: GramRows):
    """The row-sharded ``C`` (``(N·r, N·r)``, rows over ``rows.axis``, columns of each
    device's rows in ring order), the mesh and the number of row blocks ``D``."""
    mesh = rows.resolve_mesh()
    size = _axis_size(mesh, rows.axis)
    n = problem.batch_size
    if n % size:
        raise ValueError(f"Gram(rows=...) needs the batch N={n} divisible by the {size} devices.")
    spec = PartitionSpec(rows.axis)
    x_spec = jax.tree_util.tree_map(lambda _: spec, problem.x)
    per_example = _example_rows(problem)

    def local(flat, x_local, m_local):
        return _ring_rows(per_example(flat, x_local, m_local), rows.axis, size)

    build = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), x_spec, spec),
        out_specs=spec,
        check_vma=False,
    )
    return build(problem.flat, problem.x, problem.factor), mesh, size


def _sharded_cg(cmat, rhs, damping, rows, mesh, size):
    """CG on ``C + λI`` with ``C`` row-sharded; iterates replicated, one all-gather a step."""
    from natchain._solvers.cg import conjugate_gradient  # the solvers import this module

    spec = PartitionSpec(rows.axis)
    maxiter = 4 * rhs.shape[0] if rows.maxiter is None else rows.maxiter

    def local(c_local, rhs, damping):
        def matvec(v):
            local = _ring_matvec(c_local, v, rows.axis, size)
            return jax.lax.all_gather(local, rows.axis, tiled=True) + damping * v

        return conjugate_gradient(matvec, rhs, tol=rows.tol, maxiter=maxiter)

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )
    return run(cmat, rhs, jnp.asarray(damping, rhs.dtype))


def _gathered(cmat, rows, mesh, size):
    """The whole ``C`` in batch order on every device (one all-gather of the row blocks)."""
    spec = PartitionSpec(rows.axis)
    gather = jax.shard_map(
        lambda c: jax.lax.all_gather(_from_ring(c, rows.axis, size), rows.axis, tiled=True),
        mesh=mesh,
        in_specs=spec,
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    return gather(cmat)


def system_rows(solver, problem, damping):
    """The Gram system sharded by rows, ready to apply (see the module docstring).

    Args:
        solver: the :class:`natchain.Gram` instance (its ``rows``, ``rcond`` and
            ``factorization`` settings apply).
        problem: the natural-gradient problem.
        damping: ``λ ≥ 0``.

    Returns:
        ``(damped, undamped, stats)`` as :meth:`natchain.Gram.factorise`: products with
        ``(C + λI)⁻¹`` and ``C⁺``. When the whole system fits in ``rows.max_dense_bytes``
        it is gathered and factorised; otherwise both products are CG solves on the
        row-sharded ``C`` (undamped CG needs ``C`` of full rank; the residual test on
        the original system reports it when not).
    """
    rows = solver.rows
    n, _, r = problem.factor.shape
    cmat, mesh, size = row_system(problem, rows)
    dense = (n * r) ** 2 * cmat.dtype.itemsize <= rows.max_dense_bytes
    extra = {
        "structured_params": jnp.asarray(0),
        "row_blocks": jnp.asarray(size),
        "iterative": jnp.asarray(not dense),
    }
    if dense:
        damped, undamped, stats = solver.factorise(
            _gathered(cmat, rows, mesh, size), problem, damping
        )
        return damped, undamped, {**stats, **extra}
    stats = {**extra, "size": n * r, "num_steps": jnp.zeros((), jnp.int32)}

    def cg_apply(lam):
        def apply(v):  # each product is one CG solve; its steps are added to the stats
            y, k = _sharded_cg(cmat, v, lam, rows, mesh, size)
            stats["num_steps"] = stats["num_steps"] + k
            return y

        return apply

    return cg_apply(damping), cg_apply(0.0), stats
