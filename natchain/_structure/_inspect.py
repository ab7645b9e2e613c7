"""What the routes recognised in a model: one row per parameter leaf."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class LeafRow(NamedTuple):
    """One parameter leaf and what each route does with it.

    Attributes:
        path: the leaf's key path in ``params``.
        shape: its shape.
        size: its number of entries.
        pattern: the site that claims it (``"dense@3"``: pattern and equation path), or
            ``None``.
        gram: whether the Gram route builds its block from the site (``True``) or from its
            materialised Jacobian (``False``).
        layer_map: the map(s) it enters at layer granularity (``"dense"``, or the
            primitives it is split into).
        reason: why it fell back (``None`` when nothing did).
    """

    path: str
    shape: tuple
    size: int
    pattern: str | None
    gram: bool
    layer_map: str
    reason: str | None


class StructureTable(NamedTuple):
    """The result of :func:`natchain.inspect_structure` (``str()`` or :meth:`to_markdown`)."""

    rows: tuple
    structured_params: int
    num_params: int

    def to_markdown(self) -> str:
        lines = [
            "| leaf | shape | size | pattern | Gram | layer map | fell back because |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            shape = "×".join(map(str, r.shape)) or "scalar"
            gram = "structured" if r.gram else "Jacobian"
            lines.append(
                f"| {r.path} | {shape} | {r.size} | {r.pattern or '—'} | {gram} | "
                f"{r.layer_map} | {r.reason or ''} |"
            )
        lines.append("")
        lines.append(
            f"Gram route: {self.structured_params} of {self.num_params} parameters structured."
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _layer_maps(model, params, x):
    """Per leaf index, the names of the layer-granularity maps it enters."""
    from natchain._modular._interpreter import trace_chain

    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    found = {}

    def fn(*args):
        ps = jax.tree_util.tree_unflatten(treedef, args[: len(leaves)])
        return model(ps, jax.tree_util.tree_unflatten(x_def, args[len(leaves) :]))

    def record(leaves, x_leaves):
        chain, leaf_ids, out_ids, outs, _ = trace_chain(
            fn, leaves, x_leaves, granularity="layer", rcond=None, fallback="generic"
        )
        live, _ = chain.live(out_ids)
        index = {i: j for j, i in enumerate(leaf_ids)}
        for node in reversed(live):
            for i in node.in_ids:
                if i in index:
                    found.setdefault(index[i], []).append((node.kind, node.name))
        return outs

    jax.eval_shape(record, leaves, x_leaves)  # no computation: the maps only
    return found


def inspect_structure(model, params, x) -> StructureTable:
    """Which layers the Gram route and the layer granularity recognise, per parameter leaf.

    Both routes read the same recogniser (the layer-pattern registry), so a leaf claimed by
    a pattern is a Gram block and a layer-granularity map at once, unless the Gram route
    cannot find the example axis of the site (then the row says why).

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        params: the parameter pytree.
        x: a batch of inputs.

    Returns:
        A :class:`StructureTable`; ``print`` it or call ``to_markdown()``.
    """
    from natchain._gram import gram_sites

    out = jax.eval_shape(model, params, x)
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError("model must return one array of shape (N, m).")
    n = out.shape[0]
    _, structure, kept, declined = gram_sites(model, params, x, n)
    maps = _layer_maps(model, params, x)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    rows = []
    structured = 0
    for j, (path, leaf) in enumerate(flat):
        site = structure.site_of(j)
        gram = site is not None and site.key in kept
        reason = structure.reason(j)
        if site is not None and site.key in declined:
            reason = f"Gram route: {declined[site.key]}"
        names = maps.get(j, [])
        if not names:
            layer_map = "unused"
        elif all(kind in ("primitive", "generic") for kind, _ in names):
            layer_map = "primitives: " + ", ".join(dict.fromkeys(name for _, name in names))
        else:
            layer_map = ", ".join(dict.fromkeys(name for _, name in names))
        size = int(np.size(leaf))
        structured += size if gram else 0
        rows.append(
            LeafRow(
                jax.tree_util.keystr(path),
                tuple(np.shape(leaf)),
                size,
                None if site is None else site.label,
                gram,
                layer_map,
                reason,
            )
        )
    total = sum(r.size for r in rows)
    return StructureTable(tuple(rows), structured, total)
