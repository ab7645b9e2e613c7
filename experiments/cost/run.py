"""Run the cost experiment: per-step time of each route vs batch size and width.

Rows: ``method`` = route, ``setting`` = ``batch=N|width=W``, metrics ``seconds`` (median
step time), ``sgd_seconds`` (the SGD step timed just before it), ``ratio`` and, for the
iterative routes, ``steps`` (CG steps taken) and ``converged``. The table gives each
route's ratio at every point and the fitted log–log slopes of its time against batch size
and against width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench
from experiments._results import RESULTS, Progress, ResultStore, record_measurement
from experiments.cost import config

EXPERIMENT = "cost"


def _points(lvl):
    pts = [(b, lvl["width"]) for b in lvl["batches"]]
    pts += [(lvl["batch"], w) for w in lvl["widths"] if (lvl["batch"], w) not in pts]
    return pts


def steps():
    """Every route's jitted step: ``benchmarks/bench.py``'s, and the preconditioned CG."""
    out = bench.routes()
    out["pcg (true Fisher)"] = bench.exact_step("pcg", tol=bench.CG_TOL)
    return out


def measure(route, batch, width, reps):
    """Median seconds of ``route`` and of an SGD step, and the route's solver statistics."""
    key = jax.random.PRNGKey(0)
    params = bench.init_mlp(key, (784, width, 10))
    kx, ky, kk = jax.random.split(jax.random.fold_in(key, batch), 3)
    x = jax.random.normal(kx, (batch, 784), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    t_sgd, _ = bench.time_call(bench.sgd_step(), (params, x, y), reps)
    step = steps()[route]
    args = (params, x, y) if "modular" in route else (params, x, y, kk)
    t, out = bench.time_call(step, args, reps)
    return t, t_sgd, out[2] or {}


def slope(xs, ts):
    """Least-squares slope of ``log t`` against ``log x`` (``nan`` with fewer than 2 points)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ts), 1)[0])


def _series(rows, route, vary, fixed_name, fixed, metric="seconds"):
    pts = {}
    for r in rows:
        if r["method"] != route or r["metric"] != metric:
            continue
        s = dict(kv.split("=") for kv in r["setting"].split("|"))
        if int(s[fixed_name]) == fixed:
            pts[int(s[vary])] = float(r["value"])
    xs = sorted(pts)
    return xs, [pts[x] for x in xs]


def summary_table(rows, lvl):
    """Markdown: ratio to SGD at each point, and the fitted slopes."""
    ratio = {(r["method"], r["setting"]): float(r["value"]) for r in rows if r["metric"] == "ratio"}
    pts = _points(lvl)
    head = [f"N={b}, w={w}" for b, w in pts]
    lines = [
        "Time per step ÷ SGD step (same process), and the slope of log time against log batch",
        f"size (width {lvl['width']}) and against log width (batch {lvl['batch']}).",
        "",
        "| route | " + " | ".join(head) + " | slope in N | slope in width |",
        "| --- |" + " ---: |" * (len(pts) + 2),
    ]
    for route in lvl["routes"]:
        cells = []
        for b, w in pts:
            v = ratio.get((route, f"batch={b}|width={w}"))
            cells.append("–" if v is None else f"{v:.3g}×")
        sb = slope(*_series(rows, route, "batch", "width", lvl["width"]))
        sw = slope(*_series(rows, route, "width", "batch", lvl["batch"]))
        lines.append(f"| {route} | " + " | ".join(cells) + f" | {sb:.2f} | {sw:.2f} |")
    first = lvl["routes"][0]  # the SGD step timed beside it
    sb = slope(*_series(rows, first, "batch", "width", lvl["width"], "sgd_seconds"))
    sw = slope(*_series(rows, first, "width", "batch", lvl["batch"], "sgd_seconds"))
    lines.append("| SGD step | " + " | ".join("1×" for _ in pts) + f" | {sb:.2f} | {sw:.2f} |")
    steps = {(r["method"], r["setting"]): r["value"] for r in rows if r["metric"] == "steps"}
    done = {(r["method"], r["setting"]): r["value"] for r in rows if r["metric"] == "converged"}
    iterative = [rt for rt in lvl["routes"] if any(k[0] == rt for k in steps)]
    if iterative:
        lines += [
            "",
            "CG steps taken by the iterative routes (* where the residual test failed).",
            "",
            "| route | " + " | ".join(head) + " |",
            "| --- |" + " ---: |" * len(pts),
        ]
        for route in iterative:
            cells = []
            for b, w in pts:
                k = (route, f"batch={b}|width={w}")
                v = steps.get(k)
                bad = "" if float(done.get(k, 1.0)) else "*"
                cells.append("–" if v is None else f"{int(float(v))}{bad}")
            lines.append(f"| {route} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, lvl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (vary, fixed_name, fixed) in zip(
        axes, (("batch", "width", lvl["width"]), ("width", "batch", lvl["batch"])), strict=True
    ):
        for route in lvl["routes"]:
            xs, ts = _series(rows, route, vary, fixed_name, fixed)
            if xs:
                ax.plot(
                    xs, np.array(ts) * 1e3, marker="o", label=f"{route} (slope {slope(xs, ts):.2f})"
                )
        ax.set(xscale="log", yscale="log", xlabel=vary, ylabel="ms per step")
        ticks = lvl["batches"] if vary == "batch" else lvl["widths"]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{fixed_name} = {fixed}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(level="quick", seeds=None, root=None, fresh=False, verbose=True):
    """Run at ``level``; print the table; write rows and the figure."""
    lvl = config.LEVELS[level]
    store = ResultStore(EXPERIMENT, level, root=root, fresh=fresh)
    pts = _points(lvl)
    bar = Progress(len(pts) * len(lvl["routes"]), "cost", enabled=verbose)
    for route in lvl["routes"]:
        for batch, width in pts:
            bar.update(1)
            setting = f"batch={batch}|width={width}"
            if store.done(route, setting, 0):
                continue
            cfg = {"batch": batch, "width": width, "reps": lvl["reps"], "route": route}

            def run(route=route, batch=batch, width=width):
                t, t_sgd, stats = measure(route, batch, width, lvl["reps"])
                row = {"seconds": t, "sgd_seconds": t_sgd, "ratio": t / t_sgd}
                if "num_steps" in stats and "cg" in route:
                    row["steps"] = int(stats["num_steps"])
                    row["converged"] = float(bool(stats["converged"]))
                return row

            record_measurement(store, route, setting, 0, run, config=cfg)
    bar.close()
    base = (root if root is not None else RESULTS) / EXPERIMENT
    rows = store.rows()
    text = summary_table(rows, lvl)
    (base / f"{level}_table.md").write_text(text + "\n")
    plot(rows, lvl, base / f"{level}_scaling.png")
    print(text)
    print(f"\nrows: {store.rows_path}\nfigure: {base / f'{level}_scaling.png'}")
    return text
