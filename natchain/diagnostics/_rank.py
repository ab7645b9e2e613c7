"""``rank_report``: which rank conditions hold map by map, and whether a theorem makes the
modular natural gradient exact.

The modular rule (docs/theory.md §3) sends ``n_z = J_h⁺ n_y`` back through every map. The report
reads the maps from ``natchain.modular_trace`` (backward order, output first; each with
its dense local Jacobian w.r.t. its differentiated inputs only) and checks the hypotheses
of these theorems:

- **single-map identity** — one map ``eta = f(theta)`` whose Jacobian ``J`` has full row
  rank, with every output-Fisher block invertible: ``F_theta⁺ g = J⁺ F_eta⁻¹ g_eta``. When
  every block is the same multiple of the identity (``F_blk = c I``, a Gaussian of fixed
  scale) full row rank is not needed: ``(c JᵀJ)⁺ Jᵀ b = J⁺ b / c`` for any ``J``.
- **singular output Fisher** (softmax logits): with ``J`` of full row rank, the exact
  answer is ``J⁺ (F_eta⁺ g_eta + c)`` with ``c ∈ null(F_blk)`` chosen to minimise the norm;
  when ``K = J Jᵀ`` commutes with the projector onto ``null(F_blk)`` (e.g. one dense layer:
  ``K = A ⊗ I_m``) the minimum is at ``c = 0``, so the minimum-norm representative is exact.
  Other representatives (``Categorical(representative=...)``) are never trusted.
- **reverse-order law along the chain** (Greville 1966) — a sequential chain of maps,
  each map's differentiated inputs being the previous map's output plus its own
  parameters. Each map is lifted to the state it acts on (its input and the parameters
  of the maps above it, passed through unchanged): ``E_k = [[J_k, 0], [0, I]]``, so that
  ``J = E_0 E_1 ⋯ E_{L−1}`` and the modular rule computes ``E_{L−1}⁺ ⋯ E_0⁺ n_eta``. If
  Greville's conditions hold for every split ``(E_0 ⋯ E_{k−1}, E_k)``, then
  ``J⁺ = E_{L−1}⁺ ⋯ E_0⁺`` by induction, and with ``J`` of full row rank and an invertible
  output Fisher the single-map identity finishes the proof.

The verdict is **sound by construction**: it says *exact by theorem* only when every
hypothesis was verified numerically with a clear margin (no singular value in the grey
zone between the cut-off and ``1/cond_max``), when the chain reading of the trace
reproduces the model's own ``J Jᵀ``, and for a singular output Fisher only under the
condition above. Everything else is *not guaranteed*, with every reason that applies.

A weaker, function-space statement is reported beside the verdict
(``function_space_exact``): when every map of a verified chain has full row rank and
``F_eta`` is invertible, ``E_k E_k⁺ = I`` at every step, so the modular direction ``m``
satisfies ``J m = n_eta = J e``: it solves ``F_theta n = g`` as the exact ``e`` does and
differs from it only by a component in ``null(F_theta)`` (not minimum-norm). For a singular
``F_eta`` (softmax logits) the same holds up to per-example logit shifts, which this flag
does not claim. A dense layer fed by data ``X`` has full row rank w.r.t. ``(W, b)`` iff
``rank [X 1] = N`` (its ``J Jᵀ`` is ``(X Xᵀ + 11ᵀ) ⊗ I``), which ``N ≤ d + 1`` does not ensure.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from natchain._problem import build_problem
from natchain.diagnostics._greville import greville_test

__all__ = ["EXACT", "NOT_GUARANTEED", "MapReport", "RankReport", "THEOREMS", "rank_report"]

EXACT = "exact by theorem"
NOT_GUARANTEED = "not guaranteed"

#: The theorems a verdict can name.
THEOREMS = {
    "single_map": (
        "single-map identity: F_θ⁺ g = J⁺ F_η⁻¹ g_η when J has full row rank and F_η is invertible"
    ),
    "single_map_isotropic": (
        "single-map identity with an isotropic output Fisher: F_θ⁺ g = J⁺ F_η⁻¹ g_η for any J "
        "when F_blk = c·I"
    ),
    "chain": (
        "reverse-order law along the chain (Greville 1966): (E_0⋯E_{L−1})⁺ = E_{L−1}⁺⋯E_0⁺, "
        "with the single-map identity at the output"
    ),
    "single_map_singular": (
        "single-map identity with a singular F_η: J of full row rank and K = J Jᵀ commuting "
        "with the projector onto null(F_blk), so the minimum-norm n_η = F_η⁺ g_η gives "
        "F_θ⁺ g = J⁺ n_η"
    ),
    "chain_singular": (
        "reverse-order law along the chain (Greville 1966), with a singular F_η: J of full "
        "row rank and K = J Jᵀ commuting with the projector onto null(F_blk), so the "
        "minimum-norm n_η gives F_θ⁺ g = J⁺ n_η"
    ),
    "chain_isotropic": (
        "reverse-order law along the chain (Greville 1966): (E_0⋯E_{L−1})⁺ = E_{L−1}⁺⋯E_0⁺, "
        "with the single-map identity for an isotropic output Fisher (F_blk = c·I) at the output"
    ),
}


@dataclasses.dataclass(frozen=True)
class MapReport:
    """Rank facts about one map of the chain.

    Attributes:
        name: the map's name in the trace.
        kind: the map's kind (``"dense"``, ``"tanh"``, a primitive name …).
        shape: ``(rows, cols)`` of its local Jacobian (output size × differentiated-input size).
        in_shapes: shapes of its differentiated inputs.
        out_shape: shape of its output.
        rank: numerical rank (singular values ``> rcond · σ_max``).
        full_row_rank: ``rank == rows``.
        direction: ``"expanding"`` (rows > cols: more outputs than inputs),
            ``"contracting"`` (rows < cols) or ``"square"``.
        condition: ``σ_max / σ_min`` over the kept singular values (``inf`` for a zero map).
        clear_rank: no singular value lies in the grey zone ``(zero_tol, 1/cond_max] · σ_max``.
        greville_next: Greville's predicate between this map and the next one towards
            the input (lifted maps ``E_k``, ``E_{k+1}``); ``None`` for the last map or when
            the trace is not a chain.
        greville_prefix: Greville's predicate between the product of all maps above and
            including this one and the next map (what the chain theorem needs); ``None``
            as above.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    in_shapes: tuple
    out_shape: tuple
    rank: int
    full_row_rank: bool
    direction: str
    condition: float
    clear_rank: bool
    greville_next: bool | None = None
    greville_prefix: bool | None = None


@dataclasses.dataclass(frozen=True)
class RankReport:
    """The result of :func:`rank_report`.

    Attributes:
        maps: one :class:`MapReport` per map, backward order (output first).
        granularity: the granularity the trace was taken at.
        jacobian_shape: ``(N·m, P)`` of the model's Jacobian.
        jacobian_rank: its numerical rank.
        full_row_rank: whether ``J`` has full row rank.
        output_fisher_singular: whether some example's ``F_eta`` block is singular.
        chain: whether the trace was read as a sequential chain that reproduces ``J Jᵀ``.
        function_space_exact: whether a theorem makes the modular direction equal to the
            exact one *in function space* (``J m = J e``) even where the verdict is *not
            guaranteed*: every map of the chain has full row rank (clearly) and ``F_eta`` is
            invertible, so ``J m = n_eta = J e`` and ``m`` solves ``F_theta n = g`` too; it
            then differs from the minimum-norm ``e`` only by a component in ``null(F_theta)``.
        verdict: :data:`EXACT` or :data:`NOT_GUARANTEED`.
        theorem: the theorem's statement when exact, else ``None``.
        reasons: every reason the theorems do not apply (empty when exact).
    """

    maps: tuple[MapReport, ...]
    granularity: str
    jacobian_shape: tuple[int, int]
    jacobian_rank: int
    full_row_rank: bool
    output_fisher_singular: bool
    chain: bool
    function_space_exact: bool
    verdict: str
    theorem: str | None
    reasons: tuple[str, ...]

    @property
    def exact(self) -> bool:
        """``verdict == "exact by theorem"``."""
        return self.verdict == EXACT

    def __str__(self) -> str:
        head = f"{self.verdict}" + (f" — {self.theorem}" if self.theorem else "")
        lines = [
            head,
            f"J: {self.jacobian_shape[0]}×{self.jacobian_shape[1]}, rank {self.jacobian_rank}, "
            f"output Fisher {'singular' if self.output_fisher_singular else 'invertible'}",
            "| map | kind | shape | rank | full row rank | direction | cond | Greville (next) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in self.maps:
            g = "—" if m.greville_next is None else ("holds" if m.greville_next else "fails")
            lines.append(
                f"| {m.name} | {m.kind} | {m.shape[0]}×{m.shape[1]} | {m.rank} | "
                f"{'yes' if m.full_row_rank else 'no'} | {m.direction} | {m.condition:.3g} | {g} |"
            )
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)


def _spectrum(mat: np.ndarray) -> np.ndarray:
    if mat.size == 0:
        return np.zeros(0)
    return np.linalg.svd(mat, compute_uv=False)


def _rank_facts(s: np.ndarray, rows: int, rcond: float, zero_tol: float, cond_max: float):
    smax = float(s[0]) if s.size else 0.0
    if smax == 0.0:
        return 0, math.inf, True
    keep = s > rcond * smax
    rank = int(np.sum(keep))
    cond = smax / float(np.min(s[keep]))
    grey = (s > zero_tol * smax) & (s < smax / cond_max)
    return rank, cond, not bool(np.any(grey))


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _lift_chain(records, mats):
    """Lift a sequential chain to ``E_k`` (see the module docstring), or explain why not.

    Returns ``(lifted, own, None)`` — ``own[k]`` the number of map ``k``'s own (parameter)
    columns — or ``(None, None, reason)``.
    """
    lifted, own = [], []
    # Columns of E_k: (carried input of k, own inputs of k, own inputs of maps above k).
    # Rows of E_k: (output of k, own inputs of maps above k).
    own_sizes = []
    for k, rec in enumerate(records):
        shapes = [tuple(s) for s in rec.in_shapes]
        sizes = [_size(s) for s in shapes]
        if k + 1 < len(records):
            target = tuple(records[k + 1].out_shape)
            hits = [i for i, s in enumerate(shapes) if s == target]
            if not hits:
                return (
                    None,
                    None,
                    (
                        f"the trace is not a sequential chain: no differentiated input of map "
                        f"{rec.name!r} is the output {target} of the map "
                        f"{records[k + 1].name!r} below it"
                    ),
                )
            carried = hits[0]
        else:
            carried = None
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        jk = mats[k]
        cols_c = (
            np.arange(offsets[carried], offsets[carried + 1])
            if carried is not None
            else np.arange(0)
        )
        cols_o = np.concatenate(
            [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes)) if i != carried]
            or [np.arange(0)]
        ).astype(int)
        above = int(sum(own_sizes))
        rows_k = jk.shape[0]
        e = np.zeros((rows_k + above, len(cols_c) + len(cols_o) + above))
        e[:rows_k, : len(cols_c)] = jk[:, cols_c]
        e[:rows_k, len(cols_c) : len(cols_c) + len(cols_o)] = jk[:, cols_o]
        e[rows_k:, len(cols_c) + len(cols_o) :] = np.eye(above)
        lifted.append(e)
        own_sizes.insert(0, len(cols_o))
        own.append(len(cols_o))
    return lifted, own, None


def rank_report(
    model,
    params,
    x,
    family,
    granularity: str = "layer",
    *,
    rcond: float = 1e-10,
    cond_max: float = 1e6,
    zero_tol: float = 1e-12,
    greville_tol: float = 1e-9,
    max_size: int = 4096,
    trace=None,
) -> RankReport:
    """Rank conditions map by map, and a sound verdict on the modular natural gradient.

    Args:
        model: ``model(params, x) -> eta`` of shape ``(N, m)``.
        params: parameter pytree.
        x: batch of inputs (data: not differentiated).
        family: the output family (its closed-form Fisher is examined).
        granularity: ``"layer"`` or ``"primitive"``, passed to ``natchain.modular_trace``.
        rcond: relative singular-value cut-off for the reported ranks.
        cond_max: a singular value in ``(zero_tol, 1/cond_max] · σ_max`` makes a rank
            decision unclear; the verdict is then *not guaranteed*.
        zero_tol: singular values ``≤ zero_tol · σ_max`` are clearly zero.
        greville_tol: tolerance of the reverse-order-law predicate (see
            :func:`reverse_order_law_holds`).
        max_size: refuse models whose lifted chain would exceed this many rows/columns.
        trace: the list of map records to use instead of calling ``natchain.modular_trace``
            (objects with ``name``, ``kind``, ``jacobian``, ``in_shapes``, ``out_shape``).

    Returns:
        A :class:`RankReport`.

    Raises:
        ValueError / TypeError: bad model inputs (as :func:`natchain.fisher_matrix`),
            an unknown granularity, non-positive tolerances, a model too large.
        NotImplementedError: no ``trace`` given and ``natchain.modular_trace`` is missing.
    """
    if granularity not in ("layer", "primitive"):
        raise ValueError(f"granularity={granularity!r} is not one of ('layer', 'primitive').")
    for name, val in (("rcond", rcond), ("zero_tol", zero_tol), ("greville_tol", greville_tol)):
        if not (isinstance(val, (int, float)) and 0 < val < 1):
            raise ValueError(f"{name} must lie in (0, 1); got {val!r}.")
    if not (isinstance(cond_max, (int, float)) and cond_max > 1):
        raise ValueError(f"cond_max must be a number > 1; got {cond_max!r}.")
    prob = build_problem(model, params, x, family, need_y=False)
    n, m = prob.eta.shape
    p = prob.num_params
    if n * m > max_size or p > max_size:
        raise ValueError(
            f"rank_report works with dense Jacobians: N·m={n * m}, P={p} exceed "
            f"max_size={max_size}."
        )
    if trace is None:
        import natchain

        if not hasattr(natchain, "modular_trace"):
            raise NotImplementedError(
                "rank_report needs natchain.modular_trace (the modular rule's map records), "
                "which this installation does not provide; pass trace= explicitly."
            )
        trace = natchain.modular_trace(model, params, x, family=family, granularity=granularity)
    records = list(trace)
    if not records:
        raise ValueError("the trace holds no maps: nothing depends on the parameters.")

    # The model's own Jacobian and output Fisher.
    jac = np.asarray(prob.jacobian()).reshape(n * m, p)
    s_j = _spectrum(jac)
    j_rank, _, j_clear = _rank_facts(s_j, n * m, rcond, zero_tol, cond_max)
    j_full = j_rank == n * m
    fblocks = np.asarray(jax.vmap(family.fisher)(prob.eta))
    fsing, fclear = False, True
    first = fblocks[0]
    iso = first[0, 0] > 0 and bool(
        np.all(np.abs(fblocks - first[0, 0] * np.eye(m)) <= 1e-12 * first[0, 0])
    )
    for blk in fblocks:
        w = np.linalg.eigvalsh(blk)
        wmax = max(float(w[-1]), 0.0)
        if wmax == 0.0 or float(w[0]) <= rcond * wmax:
            fsing = True
        if wmax > 0 and zero_tol * wmax < float(w[0]) < wmax / cond_max:
            fclear = False

    # Per-map facts.
    mats, facts = [], []
    for rec in records:
        rows = _size(tuple(rec.out_shape))
        jk = np.asarray(rec.jacobian, dtype=np.float64)
        if jk.size % max(rows, 1) != 0:
            raise ValueError(
                f"map {rec.name!r}: its Jacobian has {jk.size} entries, not a multiple of its "
                f"output size {rows}."
            )
        jk = jk.reshape(rows, -1)
        mats.append(jk)
        s = _spectrum(jk)
        rank, cond, clear = _rank_facts(s, rows, rcond, zero_tol, cond_max)
        cols = jk.shape[1]
        direction = "expanding" if rows > cols else "contracting" if rows < cols else "square"
        facts.append((rec, jk.shape, rank, rank == rows, direction, cond, clear))

    reasons = []
    # Singular F_eta: the minimum-norm representative n_eta = F_eta⁺ g_eta still gives the
    # exact answer when J has full row rank and K = J Jᵀ commutes with the projector onto
    # null(F_blk) (then J⁺ maps null(F_blk) orthogonally to J⁺ range(F_blk)).
    commutes = False
    if fsing and j_full and getattr(family, "representative", "min_norm") == "min_norm":
        null = np.zeros((n * m, 0))
        for i, blk in enumerate(fblocks):
            w, v = np.linalg.eigh(blk)
            vi = v[:, w <= rcond * max(float(w[-1]), 0.0)]
            pad = np.zeros((n * m, vi.shape[1]))
            pad[i * m : (i + 1) * m] = vi
            null = np.concatenate([null, pad], axis=1)
        kmat = jac @ jac.T
        proj = null @ null.T
        commutes = bool(
            np.linalg.norm(proj @ kmat - kmat @ proj) <= 1e-10 * max(np.linalg.norm(kmat), 1e-300)
        )
    if fsing and not commutes:
        rep = getattr(family, "representative", "min_norm")
        why = (
            f"the representative {rep!r} is not the minimum-norm one"
            if rep != "min_norm"
            else "J is not of full row rank"
            if not j_full
            else "K = J Jᵀ does not commute with the projector onto null(F_blk)"
        )
        reasons.append(
            f"output Fisher singular ({family!r}): n_η is defined only up to the null space "
            "of F_η, and a representative that is minimum-norm in output space need not give "
            f"the minimum-norm step in parameter space ({why})"
        )
    elif not fclear:
        reasons.append("output Fisher ill-conditioned (cond > cond_max): no clear invertibility")
    if not j_full and not iso:
        bad = [
            f"#{k} {f[0].name!r} ({f[4]}, rank {f[2]} of {f[1][0]})"
            for k, f in enumerate(facts)
            if not f[3]
        ]
        why = f"; maps not of full row rank: {', '.join(bad)}" if bad else ""
        reasons.append(
            f"J ({n * m}×{p}) is not of full row rank (rank {j_rank}): G⁺G ≠ I, the "
            f"cancellation in the single-map identity fails{why}"
        )
    if not j_clear:
        reasons.append("J has a singular value in the grey zone: its rank is not clear")
    unclear = [f"#{k} {f[0].name!r}" for k, f in enumerate(facts) if not f[6]]
    if unclear:
        reasons.append(
            "ill-conditioned maps (a singular value between the cut-off and 1/cond_max, e.g. a "
            f"saturated activation): {', '.join(unclear)}"
        )

    theorem = None
    g_next = [None] * len(records)
    g_prefix = [None] * len(records)
    chain = False
    if len(records) == 1:
        jk = mats[0]
        chain = jk.shape == (n * m, p)
        if chain:
            # Same Gram matrix: the map is the model up to an orthogonal change of columns.
            chain = bool(
                np.linalg.norm(jk @ jk.T - jac @ jac.T)
                <= 1e-10 * max(np.linalg.norm(jac) ** 2, 1e-300)
            )
        if chain:
            theorem = "single_map_isotropic" if iso and not j_full else "single_map"
            theorem += "_singular" if fsing else ""
        else:
            reasons.append(
                f"the single map {records[0].name!r} (local Jacobian {jk.shape}) is not the "
                f"model's Jacobian ({n * m}×{p})"
            )
    else:
        lifted, own, why = _lift_chain(records, mats)
        if lifted is not None and max(max(e.shape) for e in lifted) > max_size:
            lifted, why = None, f"the lifted chain exceeds max_size={max_size}"
        if lifted is not None:
            prod = lifted[0]
            for e in lifted[1:]:
                if prod.shape[1] != e.shape[0]:
                    lifted, why = None, "the trace's shapes do not chain"
                    break
                prod = prod @ e
        if lifted is not None:
            ok = prod.shape == (n * m, p) and bool(
                np.linalg.norm(prod @ prod.T - jac @ jac.T)
                <= 1e-9 * max(np.linalg.norm(jac) ** 2, 1e-300)
            )
            if not ok:
                why = (
                    "the trace read as a sequential chain does not reproduce the model's J Jᵀ "
                    "(branches, shared values or inputs that are not parameters)"
                )
                lifted = None
        if lifted is None:
            reasons.append(
                f"{why}; no theorem covers this graph, and each map with parameters re-splits "
                "the step between its own weights and its input"
            )
        else:
            chain = True
            with_params = sum(1 for cols in own if cols > 0)
            prefix = lifted[0]
            fails = []
            for k in range(1, len(lifted)):
                g_next[k - 1] = bool(greville_test(lifted[k - 1], lifted[k], greville_tol).holds)
                gp = greville_test(prefix, lifted[k], greville_tol)
                g_prefix[k - 1] = bool(gp.holds)
                if not gp.holds:
                    above = f"#0–#{k - 1}" if k > 1 else "#0"
                    fails.append(
                        f"between maps {above} (the product down to #{k - 1} "
                        f"{records[k - 1].name!r}) and map #{k} {records[k].name!r} "
                        f"(residuals {float(gp.residual_left):.2g}, {float(gp.residual_right):.2g})"
                    )
                prefix = prefix @ lifted[k]
            if fails:
                extra = (
                    f"; parameters at {with_params} maps: each map's rule splits the step "
                    "between its own weights and its input, and the input's share is re-split "
                    "below"
                    if with_params > 1
                    else ""
                )
                reasons.append("reverse-order law fails " + "; ".join(fails) + extra)
            else:
                theorem = "chain_isotropic" if iso and not j_full else "chain"
                theorem += "_singular" if fsing else ""

    if theorem is not None and reasons:
        theorem = None
    if theorem is None:
        for k, (rec, shape, *_rest) in enumerate(facts):
            jk = mats[k]
            if shape[0] != shape[1] or shape[0] == 0:
                continue
            d = np.abs(np.diag(jk))
            if np.any(np.abs(jk - np.diag(np.diag(jk))) > 0) or d.max() == 0:
                continue
            cut = int(np.sum(d <= rcond * d.max()))
            if cut:
                reasons.append(
                    f"map #{k} {rec.name!r} is elementwise with {cut} of {shape[0]} derivatives "
                    "under the cut-off (saturated or inactive units): its local pseudo-inverse "
                    "drops those directions, the exact solve weighs them globally"
                )
    maps = tuple(
        MapReport(
            name=str(rec.name),
            kind=str(rec.kind),
            shape=tuple(int(v) for v in shape),
            in_shapes=tuple(tuple(s) for s in rec.in_shapes),
            out_shape=tuple(rec.out_shape),
            rank=rank,
            full_row_rank=bool(full),
            direction=direction,
            condition=float(cond),
            clear_rank=bool(clear),
            greville_next=g_next[k],
            greville_prefix=g_prefix[k],
        )
        for k, (rec, shape, rank, full, direction, cond, clear) in enumerate(facts)
    )
    return RankReport(
        maps=maps,
        granularity=granularity,
        jacobian_shape=(n * m, p),
        jacobian_rank=j_rank,
        full_row_rank=bool(j_full),
        output_fisher_singular=bool(fsing),
        chain=chain,
        function_space_exact=bool(
            chain and not fsing and fclear and all(f[3] and f[6] for f in facts)
        ),
        verdict=EXACT if theorem is not None else NOT_GUARANTEED,
        theorem=THEOREMS[theorem] if theorem is not None else None,
        reasons=tuple(reasons),
    )
