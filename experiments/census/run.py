"""Sample many models per condition; record how often the modular natural gradient is exact.

For every row of :data:`experiments.census.config.CONDITIONS` the census builds
``SAMPLES[level]`` models (seeds ``0 … K−1``) with the builders shared with the property
suite (``tests/strategies.py``), computes the modular natural gradient
(``natchain.grad(method="modular")``) and the exact one (dense pseudo-inverse), and
records: the fraction that agree to ``AGREE = 1e-6`` relative, the distribution of the
cosine and of the function-space error ``‖J(m − e)‖ / ‖J e‖``, and how often
``rank_report`` said *exact by theorem* (and whether it was ever wrong: ``false_exact``).
Four more rows measure the other properties: Greville's predicate against the numerical
test, the exact solvers' agreement, the deep-linear gauge count, and the modular rule's
function-space step under a linear reparametrisation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments.census import config

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "census"


def _strategies():
    """The property suite's builders (``tests/strategies.py``)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import strategies

    return strategies


def _flat(tree) -> np.ndarray:
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def _quantiles(values) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {
        "min": float(v.min()),
        "q25": float(np.quantile(v, 0.25)),
        "median": float(np.median(v)),
        "q75": float(np.quantile(v, 0.75)),
        "max": float(v.max()),
        "n": int(v.size),
    }


def _round(values, digits: int = 6) -> list:
    return [float(f"{x:.{digits}g}") if np.isfinite(x) else None for x in values]


def generated_case(seed: int):
    """A generated MLP: architecture ``seed mod len(ARCHS)``, weight modes drawn by seed."""
    s = _strategies()
    rng = np.random.default_rng(seed)
    arch = s.ARCHS[seed % len(s.ARCHS)]
    modes = tuple(rng.choice(s.WEIGHT_MODES) for _ in range(len(arch["widths"]) + 1))
    return s.build_mlp_case(seed, modes=modes, **arch)


#: Families of the rank-deficient-batch row (non-isotropic F_η: the Gaussian of fixed scale
#: is exact for any J, so it is left out).
RANK_DEFICIENT_FAMILIES = ("bernoulli", "poisson", "categorical", "hetero")


def rank_deficient_batch_case(seed: int):
    """One dense layer, ``d = 3``, ``N = 4 ≤ d + 1`` but ``x_4 = (x_1 + x_2)/2``: rank [X 1] = 3."""
    s = _strategies()
    fam = RANK_DEFICIENT_FAMILIES[seed % len(RANK_DEFICIENT_FAMILIES)]
    case = s.build_mlp_case(seed, family=fam, widths=(), d_in=3, batch=4)
    x = case.x.at[3].set(0.5 * (case.x[0] + case.x[1]))
    y = s.sample_targets(case.family, case.model(case.params, x), seed)
    meta = dict(case.meta, affine_dependent_example=3)
    return s.Case(case.model, case.params, x, y, case.family, meta)


_LOCAL_BUILDERS = {
    "generated_case": generated_case,
    "rank_deficient_batch_case": rank_deficient_batch_case,
}


def _builder(spec):
    s = _strategies()
    name, *args = spec
    fn = _LOCAL_BUILDERS[name] if name in _LOCAL_BUILDERS else getattr(s, name)
    return lambda seed: fn(seed, *args)


def _function_step(case, direction) -> np.ndarray:
    out = jax.jvp(lambda p: case.model(p, case.x), (case.params,), (direction,))[1]
    out = np.asarray(out)
    import natchain as nc

    if isinstance(case.family, nc.Categorical):
        out = out - out.mean(axis=1, keepdims=True)
    return out.reshape(-1)


def condition_row(spec: dict, seeds) -> dict:
    """Modular vs exact on one condition's models."""
    import natchain as nc
    from natchain.diagnostics import modular_fn, rank_report

    build = _builder(spec["builder"])
    cos, ferr, rerr, exact_verdicts, false_exact = [], [], [], 0, 0
    fn_verdicts, false_fn = 0, 0
    for seed in seeds:
        case = build(seed)
        gran = case.granularity or spec["granularity"]
        mod = modular_fn(case.model, case.family, gran)(case.params, case.x, case.y)
        ex = nc.natural_gradient(*case.args, solver="pinv").value
        m, e = _flat(mod), _flat(ex)
        ne, nm = np.linalg.norm(e), np.linalg.norm(m)
        r = float(np.linalg.norm(m - e) / ne) if ne > 0 else float(np.linalg.norm(m))
        c = float(m @ e / (nm * ne)) if nm > 0 and ne > 0 else float("nan")
        fe, fm = _function_step(case, ex), _function_step(case, mod)
        nfe = np.linalg.norm(fe)
        f = float(np.linalg.norm(fm - fe) / nfe) if nfe > 0 else float(np.linalg.norm(fm))
        report = rank_report(case.model, case.params, case.x, case.family, granularity=gran)
        exact_verdicts += int(report.exact)
        false_exact += int(report.exact and r > config.AGREE)
        fn_verdicts += int(report.function_space_exact)
        false_fn += int(report.function_space_exact and f > config.AGREE)
        cos.append(c)
        ferr.append(f)
        rerr.append(r)
    agree = int(np.sum(np.asarray(rerr) <= config.AGREE))
    fagree = int(np.sum(np.asarray(ferr) <= config.AGREE))
    return {
        "row": spec["name"],
        "kind": spec["kind"],
        "condition": spec["condition"],
        "statement": spec["statement"],
        "test": spec["test"],
        "granularity": spec["granularity"],
        "samples": len(rerr),
        "agree": agree,
        "agree_fraction": agree / max(len(rerr), 1),
        "function_agree": fagree,
        "verdict_exact": exact_verdicts,
        "false_exact": false_exact,
        "verdict_function_space": fn_verdicts,
        "false_function_space": false_fn,
        "cosine": _quantiles(cos),
        "function_error": _quantiles(ferr),
        "relative_error": _quantiles(rerr),
        "values": {"cosine": _round(cos), "function_error": _round(ferr)},
    }


def greville_row(num_per_group: int) -> dict:
    """Property 4: Greville's predicate against the numerical test on generated pairs."""
    s = _strategies()
    from natchain.diagnostics import reverse_order_law_holds

    rng = np.random.default_rng(20240601)
    total = agree = holds = 0
    for shape in s.PAIR_SHAPES:
        for construction in s.HOLDING_CONSTRUCTIONS + s.GENERIC_CONSTRUCTIONS:
            a, b = s.matrix_pairs(rng, shape, num_per_group, construction)
            pred = reverse_order_law_holds(a, b, tol=1e-8)
            agree += int(np.sum(pred == s.numerical_reverse_order(a, b)))
            holds += int(np.sum(pred))
            total += len(a)
    return {
        "row": "greville_predicate",
        "kind": "theorem",
        "condition": "Greville's conditions vs ‖(AB)⁺ − B⁺A⁺‖ on generated pairs",
        "statement": "(AB)⁺ = B⁺A⁺ ⇔ range(BBᵀAᵀ) ⊆ range(Aᵀ) and range(AᵀAB) ⊆ range(B)",
        "test": (
            "test_properties.py::"
            "test_reverse_order_law_predicate_matches_numerical_test_on_1200_pairs"
        ),
        "samples": total,
        "agree": agree,
        "agree_fraction": agree / total,
        "law_holds": holds,
    }


def solvers_row(seeds) -> dict:
    """Property 1: pinv vs Gram vs CG on generated MLPs (undamped, relative difference)."""
    import natchain as nc

    gram, cg = [], []
    for seed in seeds:
        case = generated_case(seed)
        ref = _flat(nc.natural_gradient(*case.args, solver="pinv").value)
        nref = max(np.linalg.norm(ref), 1e-300)
        g = _flat(nc.natural_gradient(*case.args, solver="gram").value)
        c = _flat(nc.natural_gradient(*case.args, solver="cg", damping=1e-3, tol=1e-12).value)
        d = _flat(nc.natural_gradient(*case.args, solver="pinv", damping=1e-3).value)
        gram.append(float(np.linalg.norm(g - ref) / nref))
        cg.append(float(np.linalg.norm(c - d) / max(np.linalg.norm(d), 1e-300)))
    return {
        "row": "exact_solvers",
        "kind": "theorem",
        "condition": "exact routes on generated MLPs (Gram undamped; CG at λ = 1e-3)",
        "statement": "all exact solvers give the minimum-norm solution of F n = g",
        "test": "test_properties.py::test_exact_solvers_agree_and_give_min_norm",
        "samples": len(gram),
        "gram_vs_pinv": _quantiles(gram),
        "cg_vs_pinv_damped": _quantiles(cg),
    }


def deep_linear_row(seeds) -> dict:
    """Property 6: rank of ``F_theta`` against the gauge count for deep linear networks."""
    import natchain as nc

    s = _strategies()
    match = 0
    total = 0
    for seed in seeds:
        for depth, width, batch in s.DEEP_LINEAR_SHAPES:
            case = s.build_deep_linear_case(seed, depth=depth, width=width, batch=batch)
            w = np.linalg.eigvalsh(np.asarray(nc.fisher_matrix(*case.args[:3], case.family)))
            rank = int(np.sum(w > 1e-9 * w[-1]))
            pred = width * width if batch >= width else width * batch
            match += int(rank == pred)
            total += 1
    return {
        "row": "deep_linear_gauge",
        "kind": "theorem",
        "condition": "deep linear networks, L invertible n×n layers",
        "statement": "rank F_θ = P − (L−1)n² (= n² when N ≥ n; n·N otherwise)",
        "test": (
            "test_properties.py::test_deep_linear_rank_matches_gauge_count_and_function_steps_agree"
        ),
        "samples": total,
        "agree": match,
        "agree_fraction": match / max(total, 1),
    }


def invariance_row(seeds) -> dict:
    """Property 5: the function-space step under ``W_ℓ = R V``, exact and modular."""
    import natchain as nc
    from natchain.diagnostics import modular_fn

    s = _strategies()
    ex_change, mod_change = [], []
    for seed in seeds:
        arch = s.REPARAM_ARCHS[seed % len(s.REPARAM_ARCHS)]
        case = s.build_mlp_case(seed, **arch)
        case2 = s.reparametrise(case, seed % (len(arch["widths"]) + 1), seed)
        for store, fn in (
            (ex_change, lambda c: nc.natural_gradient(*c.args, solver="pinv").value),
            (mod_change, lambda c: modular_fn(c.model, c.family, "layer")(c.params, c.x, c.y)),
        ):
            f1, f2 = _function_step(case, fn(case)), _function_step(case2, fn(case2))
            store.append(float(np.linalg.norm(f1 - f2) / max(np.linalg.norm(f1), 1e-300)))
    inv = int(np.sum(np.asarray(mod_change) <= config.AGREE))
    return {
        "row": "reparametrisation",
        "kind": "measured",
        "condition": "W_ℓ = R V, R invertible and not orthogonal (tanh/identity MLPs)",
        "statement": "exact J·n invariant; the modular rule's J·n measured",
        "test": (
            "test_properties.py::test_modular_function_step_under_reparametrisation_is_measured"
        ),
        "samples": len(mod_change),
        "agree": inv,
        "agree_fraction": inv / max(len(mod_change), 1),
        "exact_change": _quantiles(ex_change),
        "modular_change": _quantiles(mod_change),
        "values": {"modular_change": _round(mod_change)},
    }


def run_census(level: str = "full", seeds=None, verbose: bool = True) -> list[dict]:
    """All rows at ``level`` (``"full"``, ``"quick"``, ``"smoke"``); returns the records."""
    jax.config.update("jax_enable_x64", True)
    k = config.SAMPLES[level]
    seeds = list(range(k)) if seeds is None else list(seeds)
    rows = []
    start = time.perf_counter()
    for spec in config.CONDITIONS:
        t = time.perf_counter()
        rows.append(condition_row(spec, seeds))
        if verbose:
            r = rows[-1]
            print(
                f"[census] {spec['name']:<26} agree {r['agree']:>3}/{r['samples']:<3} "
                f"exact verdicts {r['verdict_exact']:>3} ({time.perf_counter() - t:.1f} s)",
                flush=True,
            )
    rows.append(greville_row(max(40, k)))
    rows.append(solvers_row(seeds[: max(2, len(seeds) // 2)]))
    rows.append(deep_linear_row(seeds[: max(2, len(seeds) // 4)]))
    rows.append(invariance_row(seeds))
    for r in rows:
        r["level"] = level
    if verbose:
        print(f"[census] done in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    """Write one JSON object per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def result_paths(level: str, root: Path | None = None) -> dict:
    """Where a level's files go: ``census.jsonl``/``census.md`` for the full level,
    ``census.<level>.jsonl``/``.md`` otherwise; ``docs/verification.md`` for the full level."""
    root = RESULTS if root is None else Path(root) / "census"
    suffix = "" if level == "full" else f".{level}"
    paths = {
        "jsonl": root / f"census{suffix}.jsonl",
        "runs": root / f"census{suffix}.runs.jsonl",
        "md": root / f"census{suffix}.md",
    }
    if level == "full" and root == RESULTS:
        paths["docs"] = ROOT / "docs" / "verification.md"
    return paths


def main(level: str = "full", seeds=None, root=None, verbose: bool = True, tables_only=False):
    """Run the census (or only regenerate its tables) and write results and tables."""
    from experiments.census import tables

    paths = result_paths(level, root)
    if not tables_only:
        from experiments._results import git_revision, library_versions

        revision, t0 = git_revision(), time.perf_counter()
        rows = run_census(level, seeds, verbose)
        write_rows(rows, paths["jsonl"])
        record = {
            "run": f"census|{level}",
            "level": level,
            "status": "ok",
            "rows": len(rows),
            "git": revision,
            "versions": library_versions(),
            "wall_s": round(time.perf_counter() - t0, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_rows([record], paths["runs"])
    rows = read_rows(paths["jsonl"])
    paths["md"].write_text(tables.census_markdown(rows), encoding="utf-8")
    if "docs" in paths:
        paths["docs"].parent.mkdir(parents=True, exist_ok=True)
        paths["docs"].write_text(tables.verification_markdown(rows), encoding="utf-8")
    if verbose:
        print("[census] wrote " + ", ".join(str(p) for p in paths.values()))
    return rows
