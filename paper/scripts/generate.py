"""Generate the paper's tables and in-text numbers from ``results/``.

Writes, into ``--out`` (default ``paper/generated``):

- ``numbers.tex``: one ``\\newcommand`` per number quoted in the text;
- ``training_table.tex``: final training loss, test metric and time per step ÷ SGD;
- ``fisher_kinds_table.tex``: distance to the optimum after one unit step per Fisher kind;
- ``nullspace_table.tex``: the null-space experiment (only where its results exist);
- ``census_table.tex``: the census (``results/census/census.jsonl``) as a LaTeX table.

Each experiment is read at its ``full`` level when that exists, else ``quick``. Output is
deterministic (sorted keys, fixed formatting), so regenerating from committed results
reproduces the committed files byte for byte (``tests/test_paper.py`` checks this).
Only the standard library and numpy are used.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PAPER = HERE.parent
ROOT = PAPER.parent

TRAINING_METHODS = (
    "sgd",
    "ngd-empirical-cg",
    "ngd-mc1-cg",
    "ngd-mc5-cg",
    "ngd-exact-gram",
    "ngd-exact-cg",
    "ngd-modular-layer",
    "ngd-modular-primitive",
)
#: The protocol with a validation sweep (runs whose config has ``hp``): its settings and
#: methods, and the earlier setting name each new one also answers to in the text's macros.
NEW_SETTINGS = ("digits", "diabetes", "mnist1d-mlp", "mnist1d-cnn")
NEW_METHODS = (
    "sgd",
    "adam",
    "ngd-empirical-cg",
    "ngd-mc1-cg",
    "ngd-exact-gram",
    "ngd-exact-cg",
    "ngd-modular-layer",
    "ngd-modular-primitive",
    "kfac",
)
SETTING_ALIASES = {"mnist1d": "mnist1d-mlp"}
#: Percentiles of the whiskers in the one-step box plot (figures.py), quoted in its caption.
WHISKERS = (5, 95)
FISHER_METHODS = (
    "gradient",
    "true-fisher",
    "empirical-fisher",
    "mc-fisher-1",
    "mc-fisher-16",
    "rank-one-mean-gradient",
)


# ---- reading ------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load(results: Path, experiment: str):
    """``(level, rows, runs)`` of an experiment at its ``full`` level, else ``quick``."""
    for level in ("full", "quick"):
        rows_path = results / experiment / f"{level}.jsonl"
        runs_path = results / experiment / f"{level}.runs.jsonl"
        if rows_path.exists() and runs_path.exists():
            runs = {r["run"]: r for r in _read_jsonl(runs_path)}
            rows = [r for r in _read_jsonl(rows_path) if r["run"] in runs]
            return level, rows, runs
    return None, [], {}


def _value(v) -> float:
    return float(v)  # non-finite values are stored as the strings "nan", "inf"


def _committed(revision) -> bool:
    """Whether a run record names a committed revision (not ``+dirty``, not unknown)."""
    return bool(revision) and revision != "unknown" and not str(revision).endswith("+dirty")


# ---- formatting ---------------------------------------------------------------------------------


def fmt(x: float, digits: int = 3) -> str:
    """A number for LaTeX text: ``0.0123``, ``95.8``, ``$7.5\\times10^{-16}$``, ``n/a``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return r"\ensuremath{\infty}"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        mant, exp = f"{x:.{digits - 1}e}".split("e")
        return rf"\ensuremath{{{mant}\times 10^{{{int(exp)}}}}}"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def fmt_pm(values, scale=1.0, digits=3) -> str:
    arr = np.asarray(values, dtype=float) * scale
    if arr.size == 0:
        return "--"
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        return f"diverged ({bad}/{arr.size})"
    if arr.size == 1:
        return fmt(float(arr[0]), digits)
    return rf"{fmt(float(arr.mean()), digits)} $\pm$ {fmt(float(arr.std()), digits - 1)}"


def macro_name(*parts: str) -> str:
    """``Num`` + CamelCase of the parts, digits spelled out (LaTeX names take letters only)."""
    words = {
        "0": "Zero",
        "1": "One",
        "2": "Two",
        "3": "Three",
        "4": "Four",
        "5": "Five",
        "6": "Six",
        "7": "Seven",
        "8": "Eight",
        "9": "Nine",
    }
    out = "Num"
    for part in parts:
        for tok in re.split(r"[^A-Za-z0-9]+", part):
            tok = "".join(words.get(c, c) for c in tok)
            out += tok[:1].upper() + tok[1:]
    return out


# ---- training -----------------------------------------------------------------------------------


def is_validation_protocol(runs) -> bool:
    """Whether the training runs are of the validation-sweep protocol (``config["hp"]``)."""
    return any("hp" in (r.get("config") or {}) for r in runs.values())


def training_summary_v2(rows, runs):
    """Per ``(setting, method)`` of the validation protocol: per-seed finals and flags.

    A ``degenerate`` run (some map fully cut at an evaluation step) keeps its numbers and
    is flagged; ``diverged``, ``error`` and ``skipped`` runs have none.
    """
    final = {}
    for r in rows:
        key = (r["run"], r["metric"])
        if key not in final or r["step"] >= final[key][0]:
            final[key] = (r["step"], _value(r["value"]))
    nan = (None, float("nan"))
    out = {}
    for rid, info in sorted(runs.items()):
        cfg = info.get("config") or {}
        sgd = f"sgd|{info['setting']}|{info['seed']}"
        kept = info["status"] in ("ok", "degenerate")
        get = lambda m, rid=rid, kept=kept: final.get((rid, m), nan)[1] if kept else nan[1]  # noqa: E731
        test = get("test_accuracy") if (rid, "test_accuracy") in final else get("test_mse")
        e = out.setdefault(
            (info["setting"], info["method"]),
            {"train_loss": [], "test": [], "ratio": [], "wall": [], "status": [], "hp": None},
        )
        e["train_loss"].append(get("train_loss"))
        e["test"].append(test)
        e["ratio"].append(
            final.get((rid, "step_time_s"), nan)[1] / final.get((sgd, "step_time_s"), nan)[1]
        )
        e["wall"].append(get("wall_s"))
        e["status"].append(info["status"])
        e["hp"] = cfg.get("hp") or e["hp"]
        e["steps"] = cfg.get("steps")
        e["note"] = info.get("note", "") or e.get("note", "")
    return out


def _hp_tex(hp) -> str:
    if not hp:
        return "--"
    parts = [rf"$\eta$={fmt(hp['learning_rate'], 2)}"]
    if "damping" in hp:
        parts.append(rf"$\lambda$={fmt(hp['damping'], 2)}" if hp["damping"] else r"$\lambda$=0")
    if "rcond" in hp:
        a, d = (("def." if v is None else fmt(v, 2)) for v in hp["rcond"])
        parts.append(f"rcond {a}/{d}")
    return ", ".join(parts)


def _flags(statuses) -> str:
    bad = {s: statuses.count(s) for s in ("degenerate", "diverged", "error", "skipped")}
    return ", ".join(f"{s} {n}/{len(statuses)}" for s, n in bad.items() if n) or "--"


def training_table_v2(summary) -> str:
    lines = [
        r"\begin{tabular}{lllrcccl}",
        r"\toprule",
        r"setting & method & chosen (validation) & steps & test metric & "
        r"time/step $\div$ SGD & wall-clock (s) & flags \\",
        r"\midrule",
    ]
    for setting in NEW_SETTINGS:
        present = [m for m in NEW_METHODS if (setting, m) in summary]
        for i, method in enumerate(present):
            e = summary[(setting, method)]
            scale = 1.0 if setting == "diabetes" else 100.0
            ratio = np.asarray(e["ratio"], dtype=float)
            ratio_s = fmt(float(np.nanmean(ratio)), 2) if np.any(np.isfinite(ratio)) else "--"
            name = setting if i == 0 else ""
            skipped = all(s == "skipped" for s in e["status"])
            lines.append(
                rf"{name} & \texttt{{{method}}} & {_hp_tex(e['hp'])} & {e.get('steps') or '--'} & "
                rf"{'--' if skipped else fmt_pm(e['test'], scale)} & {ratio_s} & "
                rf"{'--' if skipped else fmt_pm(e['wall'], 1.0, 2)} & {_flags(e['status'])} \\"
            )
        if present:
            lines.append(r"\midrule")
    if lines[-1] == r"\midrule":
        lines[-1] = r"\bottomrule"
    else:
        lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def training_numbers_v2(level, summary, runs) -> dict:
    """The validation protocol's macros, under the earlier names too (``mnist1d`` → MLP)."""
    seeds = sorted({r["seed"] for r in runs.values()})
    nums = {macro_name("training", "seeds"): str(len(seeds))}
    steps = sorted({r["config"].get("steps") for r in runs.values() if r.get("config")} - {None})
    nums[macro_name("training", "steps")] = str(steps[-1]) if steps else "n/a"
    nums[macro_name("training", "level")] = level or "none"
    nums[macro_name("training", "runs")] = str(len(runs))
    nums[macro_name("training", "dirty", "runs")] = str(
        sum(1 for r in runs.values() if not _committed(r.get("git")))
    )
    for method in sorted(set(TRAINING_METHODS) | set(NEW_METHODS)):
        hp = (summary.get(("digits", method)) or {}).get("hp") or {}
        lr, lam = hp.get("learning_rate"), hp.get("damping")
        nums[macro_name("training", "lr", method)] = fmt(lr, 2) if lr is not None else "n/a"
        nums[macro_name("training", "damping", method)] = fmt(lam, 2) if lam else "n/a"
    names = {s: s for s in NEW_SETTINGS} | SETTING_ALIASES
    for label, setting in names.items():
        scale = 1.0 if setting == "diabetes" else 100.0
        for method in sorted(set(TRAINING_METHODS) | set(NEW_METHODS)):
            key = ("training", label, method)
            e = summary.get((setting, method))
            if e is None:
                for what in ("test", "loss", "ratio", "diverged", "degenerate", "wall"):
                    nums[macro_name(*key, what)] = "n/a"
                continue
            with np.errstate(all="ignore"):
                test = np.asarray(e["test"], dtype=float) * scale
                loss = np.asarray(e["train_loss"], dtype=float)
                ratio = np.asarray(e["ratio"], dtype=float)
                wall = np.asarray(e["wall"], dtype=float)
            mean = lambda a: fmt(float(np.nanmean(a))) if np.any(np.isfinite(a)) else "n/a"  # noqa: E731
            nums[macro_name(*key, "test")] = mean(test)
            nums[macro_name(*key, "loss")] = mean(loss)
            nums[macro_name(*key, "ratio")] = (
                fmt(float(np.nanmean(ratio)), 2) if np.any(np.isfinite(ratio)) else "n/a"
            )
            nums[macro_name(*key, "wall")] = mean(wall)
            nums[macro_name(*key, "diverged")] = str(e["status"].count("diverged"))
            nums[macro_name(*key, "degenerate")] = str(e["status"].count("degenerate"))
    return nums


def training_sweep_numbers(results: Path) -> dict:
    """The sweep's validation score of each chosen configuration (``chosen.json``).

    Accuracy in %, MSE as is; ``n/a`` where nothing finished. Also the number of sweep
    runs and how many of them diverged or went degenerate.
    """
    path = results / "training" / "chosen.json"
    nums = {}
    if not path.exists():
        return nums
    chosen = json.loads(path.read_text())
    names = {s: s for s in NEW_SETTINGS} | SETTING_ALIASES
    for label, setting in names.items():
        for method, entry in (chosen["settings"].get(setting) or {}).items():
            score = entry.get("score")
            scale = 100.0 if entry.get("metric") == "val_accuracy" else 1.0
            key = macro_name("training", "sweep", label, method)
            nums[key] = fmt(score * scale) if score is not None else "n/a"
    sweep_runs = _read_jsonl(results / "training" / "sweep.runs.jsonl")
    nums[macro_name("training", "sweep", "runs")] = str(len(sweep_runs))
    nums[macro_name("training", "sweep", "failed")] = str(
        sum(1 for r in sweep_runs if r.get("status") != "ok")
    )
    return nums


# ---- empirical vs true Fisher ----------------------------------------------------------------


def fisher_summary(rows):
    out = {}
    for m in FISHER_METHODS:
        d = [
            _value(r["value"])
            for r in rows
            if r["method"] == m and r["metric"] == "relative_distance"
        ]
        c = [
            _value(r["value"])
            for r in rows
            if r["method"] == m and r["metric"] == "cosine_to_optimum"
        ]
        if d:
            out[m] = {
                "median": float(np.median(d)),
                "q90": float(np.quantile(d, 0.9)),
                "max": float(np.max(d)),
                "cos": float(np.median(c)),
                "count": len(d),
            }
    return out


def fisher_table(summary) -> str:
    lines = [
        r"\begin{tabular}{lccc}",
        r"\toprule",
        r"direction & median $\|\theta_1-\theta^\star\|/\|\theta_0-\theta^\star\|$ & "
        r"90th percentile & median cosine \\",
        r"\midrule",
    ]
    for m, e in summary.items():
        lines.append(rf"\texttt{{{m}}} & {fmt(e['median'])} & {fmt(e['q90'])} & {fmt(e['cos'])} \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def fisher_numbers(summary, runs) -> dict:
    seeds = sorted({r["seed"] for r in runs.values()})
    nums = {macro_name("fisher", "seeds"): str(len(seeds))}
    nums[macro_name("fisher", "steps")] = str(summary.get("true-fisher", {}).get("count", 0))
    for m in FISHER_METHODS:
        e = summary.get(m, {})
        nums[macro_name("fisher", m, "median")] = fmt(e.get("median", float("nan")), 2)
        nums[macro_name("fisher", m, "max")] = fmt(e.get("max", float("nan")), 2)
        nums[macro_name("fisher", m, "cos")] = fmt(e.get("cos", float("nan")), 3)
    return nums


# ---- saturation ---------------------------------------------------------------------------------


def _scale_of(setting):
    return float(setting.split("|")[1].split("=")[1])


def _rcond_of(setting):
    return setting.split("|")[0].split("=")[1]


def saturation_summary(rows):
    """``{(method, rcond, scale): {metric: [values]}}``."""
    out = {}
    for r in rows:
        key = (r["method"], _rcond_of(r["setting"]), _scale_of(r["setting"]))
        out.setdefault(key, {}).setdefault(r["metric"], []).append(_value(r["value"]))
    return out


def saturation_table(summary, method="modular-layer") -> str:
    keys = [k for k in summary if k[0] == method]
    rconds = sorted({k[1] for k in keys}, key=lambda r: -1.0 if r == "default" else float(r))
    scales = sorted({k[2] for k in keys})
    if not keys:
        return "% no saturation results\n"
    lines = [
        rf"\begin{{tabular}}{{l{'c' * len(scales)}}}",
        r"\toprule",
        r"cut-off & " + " & ".join(f"scale {fmt(s, 2)}" for s in scales) + r" \\",
        r"\midrule",
    ]
    for rc in rconds:
        cells = []
        for sc in scales:
            v = summary.get((method, rc, sc), {}).get("norm_ratio", [])
            cells.append(fmt(float(np.median(v)), 2) if v else "--")
        lines.append(rf"\texttt{{{rc}}} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def saturation_numbers(summary, runs) -> dict:
    nums = {}
    method = "modular-layer"
    scales = sorted({k[2] for k in summary if k[0] == method})
    top = scales[-1] if scales else None
    nums[macro_name("saturation", "seeds")] = str(len({r["seed"] for r in runs.values()}))
    nums[macro_name("saturation", "top", "scale")] = fmt(top, 2) if top else "n/a"
    for rc, rc_label in (
        ("0", "no cut"),
        ("default", "default"),
        ("0.001", "milli"),
        ("0.1", "tenth"),
    ):
        for sc, label in ((1.0, "unit"), (top, "top")):
            v = summary.get((method, rc, sc), {}).get("norm_ratio", [])
            name = macro_name("saturation", "ratio", rc_label, label)
            nums[name] = fmt(float(np.median(v)), 2) if v else "n/a"
    nums[macro_name("saturation", "milli", "rcond")] = fmt(1e-3, 1)
    nums[macro_name("saturation", "milli", "rcond")] = fmt(1e-3, 1)
    sat = summary.get((method, "0", top), {}).get("saturated_fraction", []) if top else []
    nums[macro_name("saturation", "top", "saturated")] = (
        fmt(100 * float(np.mean(sat)), 2) if sat else "n/a"
    )
    fin = [v for k, d in summary.items() for v in d.get("finite", [])]
    nums[macro_name("saturation", "finite", "percent")] = (
        fmt(100 * float(np.mean(fin)), 3) if fin else "n/a"
    )
    return nums


# ---- agreement -----------------------------------------------------------------------------------


def agreement_summary(rows):
    out = {}
    for r in rows:
        out.setdefault(r["setting"], {}).setdefault(r["metric"], []).append(_value(r["value"]))
    return out


AGREE = 1e-6


def _pct(values) -> str:
    return fmt(100 * float(np.mean(values)), 3) + r"\%"


def agreement_table(summary) -> str:
    """Per point: N, rank [X 1], the theorem's hypothesis, and the gauge-invariant errors."""
    if not summary:
        return "% no agreement results\n"
    lines = [
        r"\begin{tabular}{lcccccccc}",
        r"\toprule",
        r"point & $N$ & $\operatorname{rank}[X\ 1]$ & hyp. & cos & "
        r"$\|m\|/\|e\|$ & function space & Fisher norm & $\max \|Fm-g\|/\|g\|$ \\",
        r"\midrule",
    ]
    for setting in sorted(summary, key=_agreement_order):
        d = summary[setting]
        if "fisher_error" not in d:
            continue
        factor, value = setting.split("=")
        n = value if factor == "batch" else str(AGREEMENT_BASE_BATCH)
        ranks = "/".join(str(int(r)) for r in sorted(set(d["data_rank"])))
        lines.append(
            rf"\texttt{{{setting}}} & {n} & {ranks} & {_pct(d['maps_full_row_rank'])} & "
            rf"{fmt(float(np.median(d['cosine'])), 2)} & "
            rf"{fmt(float(np.median(d['norm_ratio'])), 2)} & "
            rf"{fmt(float(np.median(d['function_error'])), 2)} & "
            rf"{fmt(float(np.median(d['fisher_error'])), 2)} & "
            rf"{fmt(float(np.max(d['fisher_residual'])), 2)} \\"
        )
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


_FACTORS = ("depth", "width", "batch", "activation", "family", "granularity", "data")
#: The base point's batch size and input width (experiments/agreement/config.py).
AGREEMENT_BASE_BATCH = 4
AGREEMENT_INPUT_DIM = 4
#: Floor of the agreement figure's log axis (errors at exact zero are drawn there).
AGREEMENT_FLOOR = 1e-17


def _agreement_order(setting):
    factor, value = setting.split("=")
    num = float(value) if value.replace(".", "").isdigit() else 0.0
    return (_FACTORS.index(factor) if factor in _FACTORS else 99, num, value)


def _draws(summary, metric):
    """Every draw's value of ``metric`` with its hypothesis flag, over all points."""
    out = []
    for d in summary.values():
        if metric in d and "maps_full_row_rank" in d:
            out += list(zip(d["maps_full_row_rank"], d[metric], strict=True))
    return out


def agreement_numbers(summary, runs) -> dict:
    nums = {macro_name("agreement", "seeds"): str(len({r["seed"] for r in runs.values()}))}
    nums[macro_name("agreement", "threshold")] = fmt(AGREE, 1)
    nums[macro_name("agreement", "points")] = str(len(summary))
    nums[macro_name("agreement", "rank", "threshold")] = str(AGREEMENT_INPUT_DIM + 1)
    nums[macro_name("agreement", "input", "dim")] = str(AGREEMENT_INPUT_DIM)
    nums[macro_name("agreement", "base", "batch")] = str(AGREEMENT_BASE_BATCH)
    nums[macro_name("agreement", "floor")] = fmt(AGREEMENT_FLOOR, 1)
    for setting in (
        "depth=1",
        "depth=2",
        "depth=4",
        "width=2",
        "batch=1",
        "batch=4",
        "batch=5",
        "batch=6",
        "batch=8",
        "batch=16",
        "activation=relu",
        "activation=identity",
        "granularity=primitive",
        "family=gaussian",
        "family=bernoulli",
        "family=poisson",
        "family=categorical",
        "data=affine",
    ):
        d = summary.get(setting, {})
        key = setting.replace("=", " ")
        for metric, label in (
            ("cosine", "cos"),
            ("function_error", "ferr"),
            ("fisher_error", "fisher"),
            ("norm_ratio", "ratio"),
        ):
            v = d.get(metric, [])
            nums[macro_name("agreement", key, label)] = fmt(float(np.median(v)), 2) if v else "n/a"
        rel = d.get("relative_error", [])
        nums[macro_name("agreement", key, "agree")] = (
            fmt(100 * float(np.mean(np.asarray(rel) <= AGREE)), 3) if rel else "n/a"
        )
        hyp = d.get("maps_full_row_rank", [])
        nums[macro_name("agreement", key, "hyp")] = (
            fmt(100 * float(np.mean(hyp)), 3) if hyp else "n/a"
        )
    verdicts = [v for d in summary.values() for v in d.get("verdict_exact", [])]
    nums[macro_name("agreement", "verdict", "exact", "count")] = str(int(sum(verdicts)))
    nums[macro_name("agreement", "total")] = str(len(verdicts))
    fn_verdicts = [v for d in summary.values() for v in d.get("verdict_function_space", [])]
    nums[macro_name("agreement", "verdict", "function", "count")] = str(int(sum(fn_verdicts)))
    # The theorem across every draw: where every map has full row rank, and where not.
    res = _draws(summary, "fisher_residual")
    held = [v for h, v in res if h]
    failed = [v for h, v in res if not h]
    nums[macro_name("agreement", "hyp", "count")] = str(len(held))
    nums[macro_name("agreement", "residual", "max", "hyp")] = fmt(max(held), 2) if held else "n/a"
    nums[macro_name("agreement", "residual", "median", "nohyp")] = (
        fmt(float(np.median(failed)), 2) if failed else "n/a"
    )
    nums[macro_name("agreement", "residual", "min", "nohyp")] = (
        fmt(min(failed), 2) if failed else "n/a"
    )
    ferr = [v for h, v in _draws(summary, "function_error") if h]
    nums[macro_name("agreement", "ferr", "max", "hyp")] = fmt(max(ferr), 2) if ferr else "n/a"
    cos = [v for h, v in _draws(summary, "cosine") if h]
    nums[macro_name("agreement", "cos", "min", "hyp")] = fmt(min(cos), 2) if cos else "n/a"
    ratio = [v for h, v in _draws(summary, "norm_ratio") if h]
    nums[macro_name("agreement", "ratio", "max", "hyp")] = fmt(max(ratio), 3) if ratio else "n/a"
    return nums


# ---- census ---------------------------------------------------------------------------------


def load_census(results: Path) -> list[dict]:
    """The census rows (``results/census/census.jsonl``, else the quick level), or ``[]``."""
    for name in ("census.jsonl", "census.quick.jsonl"):
        path = results / "census" / name
        if path.exists():
            return _read_jsonl(path)
    return []


#: Census rows in the table's order, with a short label (the full conditions are in the
#: text and in docs/verification.md).
CENSUS_LABELS = (
    ("dense_full_row_rank", "one dense layer, $\\operatorname{rank}[X\\ 1]=N$"),
    ("softmax_min_norm", "one dense layer, softmax, min-norm $n_\\eta$"),
    ("dense_isotropic", "one dense layer, $N m > P$, $F_{\\mathrm{blk}} = cI$"),
    ("tanh_over_dense", "$\\tanh(XW)$, $\\operatorname{rank} X = N$"),
    ("constant_outer_map", "$(XW + b)C$, constant $C$"),
    ("expanding", "expanding map ($N m > P$)"),
    ("rank_deficient_batch", "$N \\le d+1$ but $\\operatorname{rank}[X\\ 1] < N$"),
    ("reverse_order", "reverse-order law violated"),
    ("multi_layer", "parameters at two layers"),
    ("singular_fisher", "softmax, representative \\texttt{pin\\_last}"),
    ("fan_out", "weight shared by fan-out"),
    ("saturated", "saturated tanh unit"),
    ("primitive_bias", "dense layer, primitive granularity"),
    ("generated_mlps", "generated MLPs"),
)


def _cos_range(q) -> str:
    if not q or q.get("median") is None:
        return "--"
    return rf"{fmt(q['median'], 2)} [{fmt(q['min'], 2)}]"


#: Group headings of the census table, by the rows' ``kind``.
CENSUS_KINDS = (
    ("theorem", "a theorem says modular = exact"),
    ("counterexample", "a breaking condition"),
    ("measured", "measured as found"),
)


def census_table(rows: list[dict]) -> str | None:
    """The census as a LaTeX tabular: conditions grouped by kind (legend in the caption)."""
    by = {r["row"]: r for r in rows if "cosine" in r}
    if not by:
        return None
    lines = [
        r"\begin{tabular}{lrrrlll}",
        r"\toprule",
        r"condition & $n$ & $m = e$ & $Jm = Je$ & $\cos(m, e)$ & "
        r"$\|J(m-e)\|/\|Je\|$ & verdicts \\",
    ]
    for kind, heading in CENSUS_KINDS:
        group = [(n, lab) for n, lab in CENSUS_LABELS if n in by and by[n]["kind"] == kind]
        if not group:
            continue
        lines += [r"\midrule", rf"\multicolumn{{7}}{{l}}{{\emph{{{heading}}}}} \\"]
        for name, label in group:
            r = by[name]
            fe = r["function_error"]
            lines.append(
                rf"{label} & {r['samples']} & {r['agree']} & {r['function_agree']} & "
                rf"{_cos_range(r['cosine'])} & {fmt(fe['median'], 2)} [{fmt(fe['max'], 2)}] & "
                rf"{r['verdict_exact']}/{r['false_exact']}, "
                rf"{r.get('verdict_function_space', 0)}/{r.get('false_function_space', 0)} \\"
            )
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def census_numbers(rows: list[dict]) -> dict:
    by = {r["row"]: r for r in rows}
    sampled = [r for r in rows if "false_exact" in r]
    nums = {
        macro_name("census", "threshold"): fmt(AGREE, 1),
        macro_name("census", "samples"): str(sum(r["samples"] for r in sampled)),
        macro_name("census", "per", "row"): str(sampled[0]["samples"]) if sampled else "n/a",
        macro_name("census", "false", "exact"): str(sum(r["false_exact"] for r in sampled)),
        macro_name("census", "false", "function"): str(
            sum(r.get("false_function_space", 0) for r in sampled)
        ),
        macro_name("census", "exact", "verdicts"): str(sum(r["verdict_exact"] for r in sampled)),
        macro_name("census", "function", "verdicts"): str(
            sum(r.get("verdict_function_space", 0) for r in sampled)
        ),
    }
    for name in ("reverse_order", "multi_layer", "rank_deficient_batch", "fan_out", "saturated"):
        r = by.get(name)
        key = name.replace("_", " ")
        nums[macro_name("census", key, "cos", "min")] = fmt(r["cosine"]["min"], 2) if r else "n/a"
        nums[macro_name("census", key, "ferr", "max")] = (
            fmt(r["function_error"]["max"], 2) if r else "n/a"
        )
        nums[macro_name("census", key, "ferr", "median")] = (
            fmt(r["function_error"]["median"], 2) if r else "n/a"
        )
        nums[macro_name("census", key, "function", "agree")] = (
            str(r["function_agree"]) if r else "n/a"
        )
    return nums


# ---- cost ---------------------------------------------------------------------------------------

#: Routes of the cost experiment quoted in the text: (route name in results, macro label).
COST_ROUTES = (
    ("gram (true Fisher)", "gram"),
    ("gram_cg (true Fisher)", "gramcg"),
    ("cg (true Fisher)", "cg"),
    ("pcg (true Fisher)", "pcg"),
    ("modular, layer granularity", "modular"),
)
COST_WIDTH = 128
COST_BATCHES = (32, 128, 512)


def cost_points(rows, metric="seconds", width=COST_WIDTH):
    """``{route: [(batch, value), ...]}`` at the given width, sorted by batch."""
    pts = {}
    for r in rows:
        if r["metric"] != metric:
            continue
        s = dict(kv.split("=") for kv in r["setting"].split("|"))
        if int(s["width"]) == width:
            pts.setdefault(r["method"], []).append((int(s["batch"]), _value(r["value"])))
    return {k: sorted(v) for k, v in pts.items()}


def cost_slope(points) -> float:
    """Least-squares slope of log time against log batch size."""
    if len(points) < 2:
        return float("nan")
    xs, ys = zip(*points, strict=True)
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def cost_numbers(rows) -> dict:
    """Per quoted route: the log–log slope of time in batch size, its ratio to SGD at each
    quoted batch and, for the iterative routes, the CG steps taken there."""
    secs, ratios = cost_points(rows), cost_points(rows, "ratio")
    steps = cost_points(rows, "steps")
    nums = {macro_name("cost", "width"): str(COST_WIDTH)}
    for route, label in COST_ROUTES:
        pts = secs.get(route, [])
        nums[macro_name("cost", label, "slope")] = fmt(cost_slope(pts), 2) if pts else "n/a"
        by_batch = dict(ratios.get(route, []))
        by_steps = dict(steps.get(route, []))
        for b in COST_BATCHES:
            v = by_batch.get(b)
            nums[macro_name("cost", label, "ratio", str(b))] = fmt(v, 2) if v else "n/a"
            if label in ("cg", "pcg", "gramcg"):
                k = by_steps.get(b)
                nums[macro_name("cost", label, "steps", str(b))] = (
                    str(int(k)) if k is not None else "n/a"
                )
    for b in COST_BATCHES:
        nums[macro_name("cost", "batch", str(b))] = str(b)
    return nums


# ---- peer benchmark -----------------------------------------------------------------------------

#: The peer benchmark's record (``python benchmarks/peer.py``): natchain's optimiser steps
#: beside optax and kfac-jax in one process.
PEER = ROOT / "benchmarks" / "peer.json"
PEER_KFAC = "kfac-jax, inverse every 10 steps"
PEER_EXACT = "natchain exact, "


def peer_numbers(path=PEER) -> dict:
    """On the benchmark MLP, per batch: the cheapest fixed exact natchain optimiser step
    (median ratio to SGD, and its route), kfac-jax's with its inverse every ten steps, and the
    batches where the exact step costs at most kfac-jax's."""
    record = json.loads(path.read_text()) if path.exists() else {"rows": [], "config": {}}
    batches = record["config"].get("batches", ())
    rows = record["rows"]
    model = record["config"].get("models", {}).get("mlp", "n/a")
    nums = {macro_name("peer", "mlp"): model.split(" ")[0]}
    timed = [r for r in rows if r["model"] == "mlp" and "ratio" in r]
    at_most = []
    for b in batches:
        exact = [  # the fixed routes (auto runs one of them)
            r
            for r in timed
            if r["batch"] == b and r["route"].startswith(PEER_EXACT) and "auto" not in r["route"]
        ]
        kfac = [r for r in timed if r["batch"] == b and r["route"] == PEER_KFAC]
        best = min(exact, key=lambda r: r["ratio"]) if exact else None
        key = str(b)
        nums[macro_name("peer", "batch", key)] = key
        nums[macro_name("peer", "exact", "ratio", key)] = fmt(best["ratio"], 2) if best else "n/a"
        route = best["route"][len(PEER_EXACT) :].split(" ")[0] if best else "n/a"
        nums[macro_name("peer", "exact", "route", key)] = (
            r"\texttt{" + route.replace("_", r"\_") + "}"
        )
        nums[macro_name("peer", "kfac", "ratio", key)] = fmt(kfac[0]["ratio"], 2) if kfac else "n/a"
        if best and kfac and best["ratio"] <= kfac[0]["ratio"]:
            at_most.append(key)
    if not at_most:
        where = "no batch size"
    elif len(at_most) == 1:
        where = f"batch {at_most[0]}"
    else:
        where = f"batches {', '.join(at_most[:-1])} and {at_most[-1]}"
    nums[macro_name("peer", "exact", "at", "most", "kfac")] = where
    return nums


# ---- null space ---------------------------------------------------------------------------------

#: The null-space experiment's directions, in the table's order, with their LaTeX labels.
NULLSPACE_METHODS = (
    ("exact", "exact (Gram, damped)"),
    ("modular", "modular"),
    ("modular-rcond", "modular, bounded activation inverse"),
    ("modular-projected", "modular projected on range$(F_\\theta)$"),
)
NULLSPACE_SETTINGS = ("digits", "mnist1d")


def nullspace_summary(rows, runs):
    """``{(setting, method): {metric: [per-seed value]}}``: final held-out accuracy and loss,
    train loss and saturated fraction at each run's last step (``nan`` for a run that did
    not finish, so that the table says *diverged*); per-run means of the step metrics (null
    fraction, residual, cosine, step norm) over the steps recorded; statuses."""
    series = {}
    for r in rows:
        key = (r["setting"], r["method"], r["seed"], r["run"])
        series.setdefault(key, {}).setdefault(r["metric"], []).append(
            (int(r["step"]), _value(r["value"]))
        )
    out = {}
    for (setting, method, _, run), metrics in sorted(series.items()):
        entry = out.setdefault((setting, method), {})
        finished = runs.get(run, {}).get("status") == "ok"
        for metric in ("test_accuracy", "test_loss", "train_loss", "saturated_fraction"):
            if metric in metrics:
                last = max(metrics[metric])[1] if finished else math.nan
                entry.setdefault(metric, []).append(last)
        for metric in ("null_fraction", "residual", "cosine", "step_norm"):
            if metric in metrics:
                entry.setdefault(metric, []).append(float(np.mean([v for _, v in metrics[metric]])))
    for info in runs.values():
        entry = out.setdefault((info["setting"], info["method"]), {})
        entry.setdefault("status", []).append(info["status"])
    return out


def nullspace_table(summary) -> str | None:
    """Final metrics per setting and direction (mean $\\pm$ sd over seeds), or ``None``."""
    if not summary:
        return None
    lines = [
        r"\begin{tabular}{llllllll}",
        r"\toprule",
        r"setting & direction & held-out acc. (\%) & held-out loss & saturated (\%) & "
        r"null fraction & $\|F s - g\|/\|g\|$ & runs \\",
    ]
    for setting in NULLSPACE_SETTINGS:
        group = [(m, lab) for m, lab in NULLSPACE_METHODS if (setting, m) in summary]
        if not group:
            continue
        lines.append(r"\midrule")
        for method, label in group:
            e = summary[(setting, method)]
            st = e.get("status", [])
            runs = ", ".join(f"{s} {st.count(s)}" for s in sorted(set(st)))
            lines.append(
                rf"{setting} & {label} & {fmt_pm(e.get('test_accuracy', []), 100)} & "
                rf"{fmt_pm(e.get('test_loss', []))} & "
                rf"{fmt_pm(e.get('saturated_fraction', []), 100)} & "
                rf"{fmt_pm(e.get('null_fraction', []))} & {fmt_pm(e.get('residual', []))} & "
                rf"{runs} \\"
            )
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def nullspace_numbers(summary, runs) -> dict:
    """Means over seeds per setting and direction (``n/a`` where absent), the seed count,
    the learning rate, trust-region radius and damping the runs used, and whether the
    results are present."""
    nums = {macro_name("nullspace", "present"): "yes" if summary else "no"}
    cfgs = [info.get("config", {}) for info in runs.values()]
    seeds = {info["seed"] for info in runs.values()}
    nums[macro_name("nullspace", "seeds")] = str(len(seeds)) if seeds else "n/a"
    for key in ("learning_rate", "max_kl", "damping"):
        vals = sorted({c[key] for c in cfgs if key in c})
        nums[macro_name("nullspace", key)] = fmt(vals[0], 2) if len(vals) == 1 else "n/a"
    for setting in NULLSPACE_SETTINGS:
        for method, _ in NULLSPACE_METHODS:
            e = summary.get((setting, method), {})
            for metric, scale in (
                ("test_accuracy", 100),
                ("saturated_fraction", 100),
                ("null_fraction", 1),
                ("residual", 1),
            ):
                vals = np.asarray(e.get(metric, []), dtype=float) * scale
                ok = vals.size and np.all(np.isfinite(vals))
                nums[macro_name("nullspace", setting, method, metric)] = (
                    fmt(float(vals.mean()), 3) if ok else "n/a"
                )
    return nums


# ---- main ---------------------------------------------------------------------------------------


def generate(results: Path, out: Path) -> list[Path]:
    """Write every generated file into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name, text):
        path = out / name
        path.write_text(text)
        written.append(path)

    header = "% Generated by paper/scripts/generate.py from results/. Do not edit.\n"
    level, rows, runs = load(results, "training")
    if not is_validation_protocol(runs):
        raise SystemExit(
            "results/training holds runs without a validation sweep (config['hp']): "
            "regenerate them with python -m experiments training."
        )
    tsum = training_summary_v2(rows, runs)
    write("training_table.tex", header + training_table_v2(tsum))
    nums = training_numbers_v2(level, tsum, runs)
    nums.update(training_sweep_numbers(results))

    flevel, frows, fruns = load(results, "fisher_kinds")
    fsum = fisher_summary(frows)
    write("fisher_kinds_table.tex", header + fisher_table(fsum))
    nums.update(fisher_numbers(fsum, fruns))

    _, srows, sruns = load(results, "saturation")
    ssum = saturation_summary(srows)
    write("saturation_table.tex", header + saturation_table(ssum))
    nums.update(saturation_numbers(ssum, sruns))

    _, arows, aruns = load(results, "agreement")
    asum = agreement_summary(arows)
    write("agreement_table.tex", header + agreement_table(asum))
    nums.update(agreement_numbers(asum, aruns))

    _, cost_rows, _ = load(results, "cost")
    nums.update(cost_numbers(cost_rows))
    nums.update(peer_numbers())

    _, nrows, nruns = load(results, "nullspace")
    nsum = nullspace_summary(nrows, nruns)
    nullspace = nullspace_table(nsum)
    if nullspace is not None:
        write("nullspace_table.tex", header + nullspace)
    nums.update(nullspace_numbers(nsum, nruns))

    crows = load_census(results)
    census = census_table(crows)
    if census is not None:
        write("census_table.tex", header + census)
        nums.update(census_numbers(crows))
    nums[macro_name("figure", "whisker", "low")] = str(WHISKERS[0])
    nums[macro_name("figure", "whisker", "high")] = str(WHISKERS[1])
    nums[macro_name("census", "present")] = "yes" if census is not None else "no"

    body = "".join(rf"\newcommand{{\{k}}}{{{v}}}" + "\n" for k, v in sorted(nums.items()))
    write("numbers.tex", header + body)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--out", type=Path, default=PAPER / "generated")
    args = parser.parse_args(argv)
    for path in generate(args.results, args.out):
        print(path)


if __name__ == "__main__":
    main()
