"""Draw the paper's figures from ``results/`` (matplotlib, no experiment code imported).

Writes into ``--out`` (default ``paper/figures``):

- ``training_curves.pdf``: training loss against steps, mean over seeds with the min–max
  band, per setting and method (a diverged run ends where it diverged);
- ``fisher_field.pdf``: unit step directions of the gradient, the true-Fisher and the
  empirical-Fisher natural gradient on a 1-D linear regression, optimum starred;
- ``fisher_one_step.pdf``: distance to the optimum after one unit step, per direction;
- ``saturation.pdf``: ``‖n_mod‖ / ‖n_exact‖`` against the first-layer weight scale, per cut-off;
- ``agreement.pdf``: cosine of the modular and exact directions, one factor at a time;
- ``cost.pdf``: time per step against batch size, per route, with the fitted log–log slope;
- ``nullspace.pdf``: held-out accuracy, saturated fraction, null fraction and step norm
  along training, per direction of the null-space experiment (a placeholder until its
  results exist).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from generate import (  # noqa: E402
    AGREEMENT_FLOOR,
    AGREEMENT_INPUT_DIM,
    COST_ROUTES,
    COST_WIDTH,
    FISHER_METHODS,
    NEW_METHODS,
    NEW_SETTINGS,
    NULLSPACE_METHODS,
    NULLSPACE_SETTINGS,
    PAPER,
    ROOT,
    WHISKERS,
    cost_points,
    cost_slope,
    is_validation_protocol,
    load,
)

plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 6.5})
plt.rcParams["svg.hashsalt"] = "natchain"  # deterministic ids, should SVG ever be written

#: No dates and no tool versions in the files: regenerating a figure from the same results
#: gives the same bytes (with the same matplotlib), so a rebuild leaves the checkout clean.
_METADATA = {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None}


def save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` (PDF) without time stamps, and close it."""
    fig.savefig(path, metadata=_METADATA, bbox_inches="tight")
    plt.close(fig)


def training_curves_v2(rows, runs, out: Path):
    """Validation protocol: training loss against steps (top) and wall-clock (bottom) per
    setting, mean over seeds with the min–max band; one legend below the panels."""
    settings = [s for s in NEW_SETTINGS if any(r["setting"] == s for r in runs.values())]
    fig, axes = plt.subplots(2, len(settings), figsize=(2.6 * len(settings), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    series = {}
    for r in rows:
        if r["metric"] in ("train_loss", "wall_s"):
            series.setdefault(r["run"], {}).setdefault(r["metric"], {})[r["step"]] = float(
                r["value"]
            )
    handles = {}
    for col, setting in enumerate(settings):
        for j, method in enumerate(NEW_METHODS):
            curves = [
                series[rid]
                for rid, info in sorted(runs.items())
                if info["setting"] == setting
                and info["method"] == method
                and rid in series
                and "train_loss" in series[rid]
            ]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c["train_loss"]) for c in curves)))
            vals = np.array([[c["train_loss"][k] for k in steps] for c in curves])
            vals = np.where(np.isfinite(vals) & (vals < 1e8), vals, np.nan)
            wall = np.array([[c.get("wall_s", {}).get(k, np.nan) for k in steps] for c in curves])
            with warnings.catch_warnings():  # all-nan columns after a divergence
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
                w = np.nanmean(wall, 0)
            colour = cmap(j % 10)
            (line,) = axes[0, col].plot(steps, mean, color=colour, lw=1.1)
            axes[0, col].fill_between(steps, lo, hi, color=colour, alpha=0.15, lw=0)
            keep = np.isfinite(w) & (w > 0)
            axes[1, col].plot(w[keep], mean[keep], color=colour, lw=1.1)
            axes[1, col].fill_between(w[keep], lo[keep], hi[keep], color=colour, alpha=0.15, lw=0)
            handles.setdefault(method, line)
        axes[0, col].set_title(setting)
        axes[0, col].set_xlabel("step")
        axes[1, col].set_xlabel("wall-clock (s, excl. compilation)")
        axes[1, col].set_xscale("log")
        for ax in axes[:, col]:
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("training loss")
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(5, len(handles)),
        frameon=False,
        bbox_to_anchor=(0.5, -0.02),
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = out / "training_curves.pdf"
    save(fig, path)
    return path


def training_curves(results: Path, out: Path):
    level, rows, runs = load(results, "training")
    if level is None:
        return None
    if not is_validation_protocol(runs):
        raise SystemExit("results/training holds runs without a validation sweep: regenerate them.")
    return training_curves_v2(rows, runs, out)


def fisher_field(results: Path, out: Path):
    for level in ("full", "quick"):
        src = results / "fisher_kinds" / f"{level}_field.json"
        if src.exists():
            break
    else:
        return None
    data = json.loads(src.read_text())
    ws, bs = np.asarray(data["w"]), np.asarray(data["b"])
    ww, bb = np.meshgrid(ws, bs, indexing="ij")
    fig, axes = plt.subplots(1, 3, figsize=(7.0, 2.4), sharey=True)
    for ax, method in zip(axes, ("gradient", "true-fisher", "empirical-fisher"), strict=True):
        dirs = data["directions"][method]
        d = np.asarray(dirs).reshape(len(ws), len(bs), 2)
        nrm = np.linalg.norm(d, axis=-1, keepdims=True)
        u = d / np.where(nrm > 0, nrm, 1)
        ax.quiver(ww, bb, u[..., 0], u[..., 1], angles="xy", pivot="mid", width=0.005)
        ax.plot(*data["optimum"], "r*", ms=9)
        ax.set_title(method)
        ax.set_xlabel("$w$")
    axes[0].set_ylabel("$b$")
    fig.tight_layout()
    path = out / "fisher_field.pdf"
    save(fig, path)
    return path


def fisher_one_step(results: Path, out: Path):
    level, rows, _ = load(results, "fisher_kinds")
    if level is None:
        return None
    data = [
        [float(r["value"]) for r in rows if r["method"] == m and r["metric"] == "relative_distance"]
        for m in FISHER_METHODS
    ]
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    floor = 1e-17
    ax.boxplot([np.maximum(d, floor) for d in data], whis=WHISKERS, showfliers=False)
    ax.set_xticks(range(1, len(FISHER_METHODS) + 1), FISHER_METHODS, rotation=25, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(r"$\|\theta_1-\theta^\star\| / \|\theta_0-\theta^\star\|$")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out / "fisher_one_step.pdf"
    save(fig, path)
    return path


def saturation(results: Path, out: Path):
    level, rows, _ = load(results, "saturation")
    if level is None:
        return None
    groups = {}
    for r in rows:
        if r["metric"] != "norm_ratio":
            continue
        rc, sc = r["setting"].split("|")
        key = (r["method"], rc.split("=")[1])
        groups.setdefault(key, {}).setdefault(float(sc.split("=")[1]), []).append(float(r["value"]))
    fig, ax = plt.subplots(figsize=(5.6, 2.8))
    for (method, rc), by_scale in sorted(groups.items()):
        scales = sorted(by_scale)
        ax.plot(
            scales,
            [np.median(by_scale[s]) for s in scales],
            marker="o",
            ms=3,
            label=f"{method}, rcond={rc}",
            ls="-" if method.endswith("layer") else "--",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="first-layer weight scale",
        ylabel=r"$\|n_{\mathrm{mod}}\| / \|n_{\mathrm{exact}}\|$ (median)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    path = out / "saturation.pdf"
    save(fig, path)
    return path


def agreement(results: Path, out: Path):
    """Batch sweep: gauge-invariant errors against N (rank threshold dashed), and cosines."""
    level, rows, _ = load(results, "agreement")
    if level is None:
        return None
    pts = {}
    for r in rows:
        if r["setting"].startswith("batch="):
            b = int(r["setting"].split("=")[1])
            pts.setdefault(b, {}).setdefault(r["metric"], []).append(float(r["value"]))
    batches = sorted(b for b in pts if "fisher_error" in pts[b])
    if not batches:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.0, 2.6))
    floor = AGREEMENT_FLOOR
    for metric, label in (
        ("function_error", "function space (centred)"),
        ("fisher_error", "Fisher norm"),
    ):
        vals = [np.maximum(pts[b][metric], floor) for b in batches]
        (line,) = ax.plot(batches, [np.median(v) for v in vals], marker="o", ms=3, label=label)
        ax.fill_between(
            batches,
            [v.min() for v in vals],
            [v.max() for v in vals],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.axvline(AGREEMENT_INPUT_DIM + 1, color="k", ls="--", lw=0.8, label="$N = d + 1$")
    ax.set(xscale="log", yscale="log", xlabel="batch size $N$", ylabel="relative error")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    bx.boxplot([pts[b]["cosine"] for b in batches], showfliers=True, flierprops={"markersize": 2})
    bx.set_xticks(range(1, len(batches) + 1), [str(b) for b in batches])
    bx.set(xlabel="batch size $N$", ylabel="cosine(modular, exact)", ylim=(-1.05, 1.05))
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "agreement.pdf"
    save(fig, path)
    return path


def cost(results: Path, out: Path):
    level, rows, _ = load(results, "cost")
    if level is None:
        return None
    secs = cost_points(rows)
    sgd = cost_points(rows, "sgd_seconds").get(COST_ROUTES[0][0], [])
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for route, _ in COST_ROUTES:
        pts = secs.get(route, [])
        if pts:
            xs, ys = zip(*pts, strict=True)
            label = f"{route} (slope {cost_slope(pts):.2f})"
            ax.plot(xs, np.array(ys) * 1e3, marker="o", ms=3, label=label)
    if sgd:
        xs, ys = zip(*sgd, strict=True)
        label = f"SGD step (slope {cost_slope(sgd):.2f})"
        ax.plot(xs, np.array(ys) * 1e3, marker="o", ms=3, color="k", ls="--", label=label)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per step")
    ticks = sorted({b for pts in secs.values() for b, _ in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_title(f"tanh MLP, hidden width {COST_WIDTH}, float32, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "cost.pdf"
    save(fig, path)
    return path


#: Panels of the null-space figure: (metric, axis label, y scale).
NULLSPACE_PANELS = (
    ("test_accuracy", "held-out accuracy", "linear"),
    ("saturated_fraction", "saturated fraction", "linear"),
    ("null_fraction", "null fraction of the step", "linear"),
    ("step_norm", r"step norm $\alpha\|s\|$", "log"),
)


def nullspace(results: Path, out: Path):
    """Per setting (rows) and metric (columns): mean over seeds against steps, min–max band."""
    level, rows, _ = load(results, "nullspace")
    if level is None or not rows:
        return None
    series = {}
    for r in rows:
        key = (r["setting"], r["method"], r["metric"])
        series.setdefault(key, {}).setdefault(int(r["step"]), []).append(float(r["value"]))
    settings = [s for s in NULLSPACE_SETTINGS if any(k[0] == s for k in series)]
    fig, axes = plt.subplots(
        len(settings),
        len(NULLSPACE_PANELS),
        figsize=(7.0, 1.8 * len(settings)),
        squeeze=False,
    )
    for i, setting in enumerate(settings):
        for j, (metric, label, scale) in enumerate(NULLSPACE_PANELS):
            ax = axes[i][j]
            for method, _ in NULLSPACE_METHODS:
                by_step = series.get((setting, method, metric))
                if not by_step:
                    continue
                steps = sorted(by_step)
                vals = [np.asarray(by_step[s]) for s in steps]
                (line,) = ax.plot(steps, [v.mean() for v in vals], marker="o", ms=2, label=method)
                lo, hi = [v.min() for v in vals], [v.max() for v in vals]
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set(yscale=scale, xlabel="step")
            ax.set_title(f"{setting}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path = out / "nullspace.pdf"
    save(fig, path)
    return path


def placeholder(path: Path, what: str) -> Path:
    """A figure that says its results are missing, so the paper still builds."""
    fig, ax = plt.subplots(figsize=(4, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"no results yet for {what}", ha="center", va="center")
    save(fig, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--out", type=Path, default=PAPER / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = (training_curves, fisher_field, fisher_one_step, saturation, agreement, cost)
    for fn in (*figures, nullspace):
        path = fn(args.results, args.out)
        if path is None:
            path = placeholder(args.out / f"{fn.__name__}.pdf", fn.__name__)
            print(f"{path} (placeholder: no results yet)")
        else:
            print(path)


if __name__ == "__main__":
    main()
