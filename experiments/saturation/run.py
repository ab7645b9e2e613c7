"""Modular vs exact natural gradient as tanh units saturate, with and without a cut-off.

The elementwise rule ``n_z = n_y / σ'(z)`` divides by a derivative that vanishes where tanh
saturates; nothing in the exact natural gradient does. Rows per (granularity, cut-off,
weight scale, seed): the saturated fraction of hidden units, ``‖n_mod‖ / ‖n_exact‖``, the
largest entry of ``n_mod``, its cosine with the exact direction, its second-order KL
``½ nᵀ F n`` (the true Fisher), how many singular values the cut-off removed, and whether
every entry is finite.
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
from experiments.saturation import config

EXPERIMENT = "saturation"
FAMILY = nc.Categorical()


def mlp(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def problem(seed):
    sizes, n = config.MODEL["sizes"], config.MODEL["batch"]
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) + 1)
    params = [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": 0.1 * jax.random.normal(k, (b,))}
        for k, a, b in zip(keys[:-2], sizes[:-1], sizes[1:], strict=True)
    ]
    x = jax.random.normal(keys[-2], (n, sizes[0]))
    y = jax.random.randint(keys[-1], (n,), 0, sizes[-1])
    return params, x, y


def scaled(params, scale):
    return [{"w": params[0]["w"] * scale, "b": params[0]["b"]}, *params[1:]]


def rcond_label(rcond):
    return "default" if rcond is None else f"{rcond:g}"


@functools.cache
def _modular(granularity, rcond):
    return jax.jit(nc.grad(mlp, FAMILY, granularity=granularity, rcond=rcond, return_stats=True))


@jax.jit
def _exact(params, x, y):
    return nc.natural_gradient(mlp, params, x, y, FAMILY, solver="pinv").value


@jax.jit
def _kl(params, x, step):
    eta, d_eta = jax.jvp(lambda p: mlp(p, x), (params,), (step,))
    z = jnp.einsum("nmr,nm->nr", nc.output_factor(FAMILY, eta), d_eta)
    return 0.5 * jnp.sum(z * z) / eta.shape[0]


def measure(params, x, y, granularity, rcond):
    """The row values for one point (a dict metric -> value)."""
    exact = ravel_pytree(_exact(params, x, y))[0]
    nat, stats = _modular(granularity, rcond)(params, x, y)
    mod = ravel_pytree(nat)[0]
    z = x @ params[0]["w"] + params[0]["b"]
    deriv = 1.0 - jnp.tanh(z) ** 2
    finite = bool(jnp.all(jnp.isfinite(mod)))
    ne, nm = float(jnp.linalg.norm(exact)), float(jnp.linalg.norm(mod))
    return {
        "saturated_fraction": float(jnp.mean(deriv < config.SATURATED)),
        "norm_ratio": nm / ne if finite else float("inf"),
        "max_abs_entry": float(jnp.max(jnp.abs(mod))) if finite else float("inf"),
        "cosine": float(mod @ exact) / (nm * ne) if finite and nm > 0 else float("nan"),
        "kl_modular": float(_kl(params, x, nat)) if finite else float("inf"),
        "kl_exact": float(_kl(params, x, _exact(params, x, y))),
        "num_cut": float(stats.get("num_cut", -1)),
        "finite": float(finite),
    }


def summary_table(rows):
    """Markdown: median ‖n_mod‖/‖n_exact‖ per cut-off (rows) and weight scale (columns)."""
    cells = {}
    for r in rows:
        if r["metric"] == "norm_ratio":
            cells.setdefault((r["method"], r["setting"]), []).append(float(r["value"]))
    methods = sorted({m for m, _ in cells})
    lines = []
    for method in methods:
        settings = sorted({s for m, s in cells if m == method})
        rconds = sorted({s.split("|")[0] for s in settings})
        scales = sorted({float(s.split("|")[1].split("=")[1]) for s in settings})
        lines += [
            f"**{method}**: median ‖n_mod‖ / ‖n_exact‖",
            "",
            "| rcond | " + " | ".join(f"scale {s:g}" for s in scales) + " |",
            "| --- |" + " --- |" * len(scales),
        ]
        for rc in rconds:
            vals = []
            for s in scales:
                v = cells.get((method, f"{rc}|scale={s:g}"), [])
                vals.append(f"{np.median(v):.3g}" if v else "–")
            lines.append(f"| {rc.split('=')[1]} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    groups = {}
    for r in rows:
        if r["metric"] in ("norm_ratio", "saturated_fraction"):
            rc, sc = r["setting"].split("|")
            key = (r["method"], rc)
            groups.setdefault(key, {}).setdefault(float(sc.split("=")[1]), {}).setdefault(
                r["metric"], []
            ).append(float(r["value"]))
    for (method, rc), by_scale in sorted(groups.items()):
        scales = sorted(by_scale)
        ratio = [np.median(by_scale[s]["norm_ratio"]) for s in scales]
        axes[0].plot(scales, ratio, marker="o", label=f"{method}, {rc}")
    sat = {}
    for (_, _), by_scale in groups.items():
        for s, d in by_scale.items():
            sat.setdefault(s, []).extend(d.get("saturated_fraction", []))
    axes[1].plot(sorted(sat), [np.mean(sat[s]) for s in sorted(sat)], marker="o", color="k")
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="first-layer weight scale",
        ylabel="‖n_mod‖ / ‖n_exact‖ (median)",
    )
    axes[1].set(xscale="log", xlabel="first-layer weight scale", ylabel="saturated fraction")
    axes[0].legend(fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3)
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
    points = [
        (g, rc, s) for g in lvl["granularities"] for rc in lvl["rconds"] for s in lvl["scales"]
    ]
    bar = Progress(len(points) * len(seeds), "saturation", enabled=verbose)
    for granularity, rcond, scale in points:
        method = f"modular-{granularity}"
        setting = f"rcond={rcond_label(rcond)}|scale={scale:g}"
        for seed in seeds:
            bar.update(1)
            if store.done(method, setting, seed):
                continue
            params, x, y = problem(seed)
            cfg = {
                "model": config.MODEL,
                "scale": scale,
                "rcond": rcond,
                "granularity": granularity,
            }

            def run(params=params, x=x, y=y, scale=scale, granularity=granularity, rcond=rcond):
                return measure(scaled(params, scale), x, y, granularity, rcond)

            record_measurement(store, method, setting, seed, run, config=cfg)
    bar.close()
    base = (root if root is not None else RESULTS) / EXPERIMENT
    rows = store.rows()
    text = summary_table(rows)
    (base / f"{level}_table.md").write_text(text + "\n")
    plot(rows, base / f"{level}_norms.png")
    print(text)
    print(f"\nrows: {store.rows_path}\nfigure: {base / f'{level}_norms.png'}")
    return text
