"""Modular vs exact natural gradient across depth, width, batch, activation, family, granularity.

Rows per (factor=value, seed): ``cosine``, ``relative_error`` ``‖n_mod − n_exact‖ /
‖n_exact‖``, ``function_error`` ``‖J (n_mod − n_exact)‖ / ‖J n_exact‖`` (invariant to the
parametrisation's gauge) and ``verdict_exact`` — 1 when ``natchain.diagnostics.rank_report``
says *exact by theorem*, else 0 — so that every point carries the diagnostic's verdict.
The exact direction is the undamped dense pseudo-inverse.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import natchain as nc
from experiments._results import RESULTS, Progress, ResultStore, record_measurement
from experiments.agreement import config

EXPERIMENT = "agreement"
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}
FAMILIES = {
    "categorical": nc.Categorical,
    "gaussian": nc.Gaussian,
    "bernoulli": nc.Bernoulli,
    "poisson": nc.Poisson,
}


def point_config(factor, value):
    return dict(config.BASE, **{factor: value})


@functools.cache
def make(cfg_items):
    """``(model, family, exact_fn, modular_fn)`` for a configuration (cached, jitted)."""
    cfg = dict(cfg_items)
    act = ACTIVATIONS[cfg["activation"]]
    family = FAMILIES[cfg["family"]]()

    def model(params, x):
        h = x
        for layer in params[:-1]:
            h = act(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]

    exact = jax.jit(
        lambda p, x, y: nc.natural_gradient(model, p, x, y, family, solver="pinv").value
    )
    modular = jax.jit(nc.grad(model, family, granularity=cfg["granularity"]))
    return model, family, exact, modular


def draw(cfg, seed, model, family):
    sizes = (cfg["input_dim"], *([cfg["width"]] * (cfg["depth"] - 1)), cfg["out"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) + 2)
    params = [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": 0.1 * jax.random.normal(k, (b,))}
        for k, a, b in zip(keys[: len(sizes) - 1], sizes[:-1], sizes[1:], strict=True)
    ]
    x = jax.random.normal(keys[-2], (cfg["batch"], cfg["input_dim"]))
    eta = model(params, x)
    ys = jax.vmap(family.sample)(jax.random.split(keys[-1], cfg["batch"]), eta)
    return params, x, ys


def measure(cfg, seed):
    model, family, exact_fn, modular_fn = make(tuple(sorted(cfg.items())))
    params, x, y = draw(cfg, seed, model, family)
    exact, mod = exact_fn(params, x, y), modular_fn(params, x, y)
    e, m = ravel_pytree(exact)[0], ravel_pytree(mod)[0]
    je = jax.jvp(lambda p: model(p, x), (params,), (exact,))[1]
    jd = jax.jvp(lambda p: model(p, x), (params,), (jax.tree.map(lambda a, b: a - b, mod, exact),))[
        1
    ]
    ne = float(jnp.linalg.norm(e))
    report = nc.diagnostics.rank_report(model, params, x, family, granularity=cfg["granularity"])
    return {
        "cosine": float(m @ e) / (float(jnp.linalg.norm(m)) * ne),
        "relative_error": float(jnp.linalg.norm(m - e)) / ne,
        "function_error": float(jnp.linalg.norm(jd)) / float(jnp.linalg.norm(je)),
        "verdict_exact": float(report.exact),
    }


def summary_table(rows):
    """Markdown: per point, median cosine and function-space error, agreement and verdicts."""
    by = {}
    for r in rows:
        by.setdefault(r["setting"], {}).setdefault(r["metric"], []).append(float(r["value"]))
    lines = [
        "| point | median cosine | median function-space error | agree (rel. err ≤ "
        f"{config.AGREE:g}) | 'exact by theorem' |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting in sorted(by, key=_order):
        d = by[setting]
        agree = np.mean(np.asarray(d["relative_error"]) <= config.AGREE)
        lines.append(
            f"| {setting} | {np.median(d['cosine']):.3f} | {np.median(d['function_error']):.3g} "
            f"| {agree:.0%} | {np.mean(d['verdict_exact']):.0%} |"
        )
    return "\n".join(lines)


def _order(setting):
    factor, value = setting.split("=")
    values = [str(v) for v in config.FACTORS[factor]]
    return list(config.FACTORS).index(factor), values.index(value) if value in values else 0


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = [f for f in config.FACTORS if any(r["setting"].startswith(f + "=") for r in rows)]
    fig, axes = plt.subplots(1, len(factors), figsize=(2.6 * len(factors), 2.8), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=True):
        values = [str(v) for v in config.FACTORS[factor]]
        data = [
            [
                float(r["value"])
                for r in rows
                if r["setting"] == f"{factor}={v}" and r["metric"] == "cosine"
            ]
            for v in values
        ]
        keep = [i for i, d in enumerate(data) if d]
        ax.boxplot([data[i] for i in keep], showfliers=True)
        ax.set_xticks(range(1, len(keep) + 1), [values[i] for i in keep], rotation=30)
        ax.set_title(factor)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("cosine(modular, exact)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(level="quick", seeds=None, root=None, fresh=False, verbose=True):
    """Run at ``level``; print the table; write rows and the figure."""
    jax.config.update("jax_enable_x64", True)
    lvl = config.LEVELS[level]
    seeds = tuple(lvl["seeds"] if seeds is None else seeds)
    store = ResultStore(EXPERIMENT, level, root=root, fresh=fresh)
    points = [(f, v) for f, values in lvl["factors"].items() for v in values]
    bar = Progress(len(points) * len(seeds), "agreement", enabled=verbose)
    for factor, value in points:
        cfg = point_config(factor, value)
        method = f"modular-{cfg['granularity']}"
        for seed in seeds:
            bar.update(1)
            if store.done(method, f"{factor}={value}", seed):
                continue
            record_measurement(
                store,
                method,
                f"{factor}={value}",
                seed,
                lambda cfg=cfg, seed=seed: measure(cfg, seed),
                config=cfg,
            )
    bar.close()
    base = (root if root is not None else RESULTS) / EXPERIMENT
    rows = store.rows()
    text = summary_table(rows)
    (base / f"{level}_table.md").write_text(text + "\n")
    plot(rows, base / f"{level}_cosines.png")
    print(text)
    print(f"\nrows: {store.rows_path}\nfigure: {base / f'{level}_cosines.png'}")
    return text
