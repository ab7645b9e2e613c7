"""One natural-gradient step of size 1 on linear regression, with each Fisher kind.

With the Gaussian family, the true Fisher is ``JᵀJ / N`` and the natural gradient is
the Gauss–Newton step, so ``θ − n`` is the least-squares optimum exactly. The empirical
Fisher weights each example by its squared residual and misses it; the Monte-Carlo
Fisher misses by sampling error that shrinks with the number of samples.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import natchain as nc
from experiments._results import RESULTS, Progress, ResultStore, _atomic_write
from experiments.fisher_kinds import config

EXPERIMENT = "fisher_kinds"
FAMILY = nc.Gaussian()
FIELD_METHODS = ("gradient", "true-fisher", "empirical-fisher")


def model(params, x):
    return x @ params["w"] + params["b"]


def make_problem(key, num_examples, dim, noise, shift=0.0, scale=1.0):
    """Data (inputs ``shift + scale · N(0, 1)``) and the least-squares optimum ``θ*``."""
    kx, kw, kn = jax.random.split(key, 3)
    x = shift + scale * jax.random.normal(kx, (num_examples, dim))
    w = jax.random.normal(kw, (dim, 1))
    y = x @ w + 0.5 + noise * jax.random.normal(kn, (num_examples, 1))
    design = jnp.hstack([x, jnp.ones((num_examples, 1))])
    sol = jnp.linalg.lstsq(design, y)[0]
    return x, y, {"w": sol[:-1], "b": sol[-1]}


def _loss(params, x, y):
    return jnp.mean(jax.vmap(FAMILY.nll)(model(params, x), y))


@functools.partial(jax.jit, static_argnames=("method",))
def direction(method, params, x, y, key):
    """The step direction of ``method`` (a key of ``config.METHODS``) at ``params``."""
    cfg = config.METHODS[method]
    if cfg["type"] == "gradient":
        return jax.grad(_loss)(params, x, y)
    if cfg["type"] == "rank_one":
        g = jax.grad(_loss)(params, x, y)
        sq = sum(jnp.sum(v * v) for v in jax.tree.leaves(g))
        return jax.tree.map(lambda v: v / (sq + cfg["damping"]), g)
    return nc.natural_gradient(
        model,
        params,
        x,
        y,
        FAMILY,
        solver="pinv",
        kind=cfg["kind"],
        key=key,
        num_samples=cfg.get("num_samples", 1),
    ).value


def _dist(a, b):
    return float(
        jnp.sqrt(
            sum(
                jnp.sum((u - v) ** 2)
                for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            )
        )
    )


def one_step_rows(seed, starts, key_offset=0):
    """Rows of relative distance to ``θ*`` after one unit step, per method and start."""
    p = config.PROBLEM
    x, y, opt = make_problem(jax.random.PRNGKey(seed), p["num_examples"], p["dim"], p["noise"])
    out = {m: [] for m in config.METHODS}
    for s in range(starts):
        k0, k1 = jax.random.split(jax.random.PRNGKey(1000 * seed + s + key_offset))
        start = jax.tree.map(
            lambda v, k=k0: v + p["start_spread"] * jax.random.normal(k, v.shape), opt
        )
        d0 = _dist(start, opt)
        for method in config.METHODS:
            n = direction(method, start, x, y, k1)
            new = jax.tree.map(lambda a, b: a - b, start, n)
            out[method].append(
                {"step": s, "metric": "relative_distance", "value": _dist(new, opt) / d0}
            )
            nv = jnp.concatenate([v.ravel() for v in jax.tree.leaves(n)])
            ev = jnp.concatenate(
                [
                    (a - b).ravel()
                    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(opt), strict=True)
                ]
            )
            cos = float(nv @ ev / (jnp.linalg.norm(nv) * jnp.linalg.norm(ev)))
            out[method].append({"step": s, "metric": "cosine_to_optimum", "value": cos})
    return out


def field(seed=0, grid=None):
    """Unit directions of each method on a grid of ``(w, b)`` for the 1-D problem."""
    f = config.FIELD
    grid = f["grid"] if grid is None else grid
    x, y, opt = make_problem(
        jax.random.PRNGKey(seed), f["num_examples"], 1, f["noise"], f["shift"], f["scale"]
    )
    ws = float(opt["w"][0, 0]) + np.linspace(-f["half_width"], f["half_width"], grid)
    bs = float(opt["b"][0]) + np.linspace(-f["half_width"], f["half_width"], grid)
    ww, bb = np.meshgrid(ws, bs, indexing="ij")
    params = {"w": jnp.asarray(ww.reshape(-1, 1, 1)), "b": jnp.asarray(bb.reshape(-1, 1))}
    data = {
        "optimum": [float(opt["w"][0, 0]), float(opt["b"][0])],
        "w": ws.tolist(),
        "b": bs.tolist(),
        "directions": {},
    }
    for method in FIELD_METHODS:
        n = jax.vmap(lambda p, m=method: direction(m, p, x, y, jax.random.PRNGKey(0)))(params)
        steps = np.stack([-np.asarray(n["w"]).reshape(-1), -np.asarray(n["b"]).reshape(-1)], 1)
        data["directions"][method] = np.round(steps, 10).tolist()
    return data


def summary_table(rows, runs):
    """Markdown: median and 90th percentile of the relative distance after one unit step."""
    lines = [
        "| direction | median ‖θ₁ − θ*‖ / ‖θ₀ − θ*‖ | 90th percentile | median cosine to θ₀ − θ* |",
        "| --- | --- | --- | --- |",
    ]
    for method in config.METHODS:
        d = [
            float(r["value"])
            for r in rows
            if r["method"] == method and r["metric"] == "relative_distance"
        ]
        c = [
            float(r["value"])
            for r in rows
            if r["method"] == method and r["metric"] == "cosine_to_optimum"
        ]
        if d:
            q50, q90, cos = np.median(d), np.quantile(d, 0.9), np.median(c)
            lines.append(f"| {method} | {q50:.3g} | {q90:.3g} | {cos:.3f} |")
    return "\n".join(lines)


def plot_field(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws, bs = np.asarray(data["w"]), np.asarray(data["b"])
    ww, bb = np.meshgrid(ws, bs, indexing="ij")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharey=True)
    for ax, method in zip(axes, FIELD_METHODS, strict=True):
        dirs = data["directions"][method]
        d = np.asarray(dirs).reshape(len(ws), len(bs), 2)
        nrm = np.linalg.norm(d, axis=-1, keepdims=True)
        u = d / np.where(nrm > 0, nrm, 1)
        ax.quiver(ww, bb, u[..., 0], u[..., 1], angles="xy", pivot="mid", width=0.004)
        ax.plot(*data["optimum"], "r*", ms=12)
        ax.set_title(method)
        ax.set_xlabel("w")
    axes[0].set_ylabel("b")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(level="quick", seeds=None, root=None, fresh=False, verbose=True):
    """Run at ``level``; print the table; write rows, the field and its figure."""
    jax.config.update("jax_enable_x64", True)
    lvl = config.LEVELS[level]
    seeds = tuple(lvl["seeds"] if seeds is None else seeds)
    store = ResultStore(EXPERIMENT, level, root=root, fresh=fresh)
    bar = Progress(len(seeds), "fisher_kinds seeds", enabled=verbose)
    for seed in seeds:
        if all(store.done(m, "linreg", seed) for m in config.METHODS):
            bar.update(1)
            continue
        t0 = time.perf_counter()
        out = one_step_rows(seed, lvl["starts"])
        cfg = {"problem": config.PROBLEM, "starts": lvl["starts"]}
        for method, rows in out.items():
            store.record(
                method,
                "linreg",
                seed,
                rows,
                config=dict(cfg, method=config.METHODS[method]),
                wall_s=time.perf_counter() - t0,
            )
        bar.update(1)
    bar.close()
    base = (root if root is not None else RESULTS) / EXPERIMENT
    field_path = base / f"{level}_field.json"
    if fresh or not field_path.exists():
        grid = lvl.get("grid")
        _atomic_write(field_path, [json.dumps(field(grid=grid), sort_keys=True)])
    data = json.loads(field_path.read_text())
    plot_field(data, base / f"{level}_field.png")
    text = summary_table(store.rows(), store.runs)
    (base / f"{level}_table.md").write_text(text + "\n")
    print(text)
    print(f"\nrows: {store.rows_path}\nfigure: {base / f'{level}_field.png'}")
    return text
