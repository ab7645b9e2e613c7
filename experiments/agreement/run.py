"""Modular vs exact natural gradient across depth, width, batch, activation, family,
granularity and data rank, measured with metrics that the output gauge cannot move.

Rows per (factor=value, seed), ``m`` the modular direction, ``e`` the exact one (undamped
dense pseudo-inverse), ``F`` the Fisher ``F_theta`` and ``g`` the loss gradient:

- ``cosine`` ``⟨m, e⟩ / (‖m‖‖e‖)``, ``relative_error`` ``‖m − e‖ / ‖e‖`` and
  ``norm_ratio`` ``‖m‖ / ‖e‖`` (parameter space);
- ``function_error`` ``‖C J (m − e)‖ / ‖C J e‖``: the change of the outputs on the batch,
  with ``C`` the per-example mean-centring of the logits for Categorical (softmax is
  invariant to a per-example logit shift, so an uncentred error would measure the gauge)
  and ``C = I`` otherwise;
- ``fisher_error`` ``√((m − e)ᵀ F (m − e)) / √(eᵀ F e)``: the error in the Fisher norm,
  the second-order KL a trust region sees (gauge-invariant by construction);
- ``fisher_residual`` ``‖F m − g‖ / ‖g‖``: whether ``m`` solves ``F n = g``;
- ``data_rank`` ``rank [X 1]`` and ``data_full_rank`` (``rank [X 1] = N``);
- ``maps_full_row_rank``: every map of the modular chain has full row rank, clearly
  (``natchain.diagnostics.rank_report``), the hypothesis of the right-inverse theorem;
- ``verdict_exact`` and ``verdict_function_space``: ``rank_report``'s verdict *exact by
  theorem* and its ``function_space_exact`` flag (1 or 0).
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
from natchain.diagnostics import centre_outputs

EXPERIMENT = "agreement"
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}
FAMILIES = {
    "categorical": nc.Categorical,
    "gaussian": nc.Gaussian,
    "bernoulli": nc.Bernoulli,
    "poisson": nc.Poisson,
}
#: Metrics of one draw, in the order of the table's columns.
METRICS = (
    "cosine",
    "relative_error",
    "norm_ratio",
    "function_error",
    "fisher_error",
    "fisher_residual",
    "data_rank",
    "data_full_rank",
    "maps_full_row_rank",
    "verdict_exact",
    "verdict_function_space",
)


def point_config(factor, value):
    return dict(config.BASE, **{factor: value})


def make(cfg):
    """``(model, family, directions, fisher_and_grad)`` for a configuration (jitted).

    Cached on everything but ``data``, which changes the batch, not the programs.
    """
    return _make(tuple(sorted((k, v) for k, v in cfg.items() if k != "data")))


@functools.cache
def _make(cfg_items):
    cfg = dict(cfg_items)
    act = ACTIVATIONS[cfg["activation"]]
    family = FAMILIES[cfg["family"]]()

    def model(params, x):
        h = x
        for layer in params[:-1]:
            h = act(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]

    modular = nc.grad(model, family, granularity=cfg["granularity"])

    @jax.jit
    def directions(p, x, y):
        exact = nc.natural_gradient(model, p, x, y, family, solver="pinv").value
        return exact, modular(p, x, y)

    @jax.jit
    def fisher_and_grad(p, x, y):
        fisher = nc.fisher_matrix(model, p, x, family)
        loss = lambda q: jnp.mean(jax.vmap(family.nll)(model(q, x), y))  # noqa: E731
        factor = nc.output_factor(family, model(p, x))  # F_eta,i = M_i M_iᵀ, (N, m, r)
        return fisher, ravel_pytree(jax.grad(loss)(p))[0], factor

    return model, family, directions, fisher_and_grad


def draw(cfg, seed, model, family):
    sizes = (cfg["input_dim"], *([cfg["width"]] * (cfg["depth"] - 1)), cfg["out"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) + 2)
    params = [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": 0.1 * jax.random.normal(k, (b,))}
        for k, a, b in zip(keys[: len(sizes) - 1], sizes[:-1], sizes[1:], strict=True)
    ]
    x = jax.random.normal(keys[-2], (cfg["batch"], cfg["input_dim"]))
    if cfg["data"] == "affine":
        if cfg["batch"] < 3:
            raise ValueError("data='affine' needs a batch of at least 3 examples.")
        x = x.at[-1].set(0.5 * (x[0] + x[1]))
    elif cfg["data"] != "generic":
        raise ValueError(f"data={cfg['data']!r} is not one of ('generic', 'affine').")
    eta = model(params, x)
    ys = jax.vmap(family.sample)(jax.random.split(keys[-1], cfg["batch"]), eta)
    return params, x, ys


def output_change(model, params, x, direction):
    """``J d``: the first-order change of the outputs, ``(N, m)``."""
    return np.asarray(jax.jvp(lambda p: model(p, x), (params,), (direction,))[1])


def fisher_norm(factor, out):
    """``√(Σ_i out_iᵀ F_i out_i)`` through the factor ``M_iᵀ out_i`` (linear, no cancellation;
    the mean's ``1/N`` cancels in the ratios)."""
    return float(np.linalg.norm(np.einsum("nmr,nm->nr", factor, out)))


def measure(cfg, seed):
    model, family, directions, fisher_and_grad = make(cfg)
    params, x, y = draw(cfg, seed, model, family)
    exact, mod = directions(params, x, y)
    fisher, g, factor = (np.asarray(a) for a in fisher_and_grad(params, x, y))
    e, m = np.asarray(ravel_pytree(exact)[0]), np.asarray(ravel_pytree(mod)[0])
    ne, d = float(np.linalg.norm(e)), m - e
    je, jm = output_change(model, params, x, exact), output_change(model, params, x, mod)
    report = nc.diagnostics.rank_report(model, params, x, family, granularity=cfg["granularity"])
    data = np.concatenate([np.asarray(x), np.ones((x.shape[0], 1))], axis=1)
    rank = int(np.linalg.matrix_rank(data))
    values = {
        "cosine": float(m @ e) / (float(np.linalg.norm(m)) * ne),
        "relative_error": float(np.linalg.norm(d)) / ne,
        "norm_ratio": float(np.linalg.norm(m)) / ne,
        "function_error": float(
            np.linalg.norm(centre_outputs(jm - je, family))
            / np.linalg.norm(centre_outputs(je, family))
        ),
        "fisher_error": fisher_norm(factor, jm - je) / fisher_norm(factor, je),
        "fisher_residual": float(np.linalg.norm(fisher @ m - g) / np.linalg.norm(g)),
        "data_rank": float(rank),
        "data_full_rank": float(rank == x.shape[0]),
        "maps_full_row_rank": float(all(r.full_row_rank and r.clear_rank for r in report.maps)),
        "verdict_exact": float(report.exact),
        "verdict_function_space": float(report.function_space_exact),
    }
    return {k: values[k] for k in METRICS}


def by_point(rows):
    """``{setting: {metric: [values over seeds]}}``."""
    out = {}
    for r in rows:
        out.setdefault(r["setting"], {}).setdefault(r["metric"], []).append(float(r["value"]))
    return out


def summary_table(rows):
    """Markdown: per point, medians of the gauge-invariant errors, ranks and verdicts."""
    lines = [
        "| point | N | rank [X 1] | maps of full row rank | median cos | median ‖m‖/‖e‖ "
        "| median function-space error (centred) | median Fisher-norm error "
        "| max ‖F m − g‖/‖g‖ | 'exact by theorem' | function_space_exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting, d in sorted(by_point(rows).items(), key=lambda kv: _order(kv[0])):
        factor, value = setting.split("=")
        n = int(value) if factor == "batch" else config.BASE["batch"]
        ranks = sorted({int(v) for v in d["data_rank"]})
        lines.append(
            f"| {setting} | {n} | {'/'.join(map(str, ranks))} "
            f"| {np.mean(d['maps_full_row_rank']):.0%} | {np.median(d['cosine']):.3f} "
            f"| {np.median(d['norm_ratio']):.3g} | {np.median(d['function_error']):.3g} "
            f"| {np.median(d['fisher_error']):.3g} | {np.max(d['fisher_residual']):.3g} "
            f"| {np.mean(d['verdict_exact']):.0%} | {np.mean(d['verdict_function_space']):.0%} |"
        )
    return "\n".join(lines)


def _order(setting):
    factor, value = setting.split("=")
    values = [str(v) for v in config.FACTORS[factor]]
    return list(config.FACTORS).index(factor), values.index(value) if value in values else 0


def plot(rows, path):
    """Gauge-invariant errors against batch size (the rank threshold marked), and cosines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = by_point(rows)
    batches = [b for b in config.FACTORS["batch"] if f"batch={b}" in pts]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.0, 2.8))
    floor = 1e-17
    for metric, label in (("function_error", "function space"), ("fisher_error", "Fisher norm")):
        med = [max(np.median(pts[f"batch={b}"][metric]), floor) for b in batches]
        lo = [max(np.min(pts[f"batch={b}"][metric]), floor) for b in batches]
        hi = [max(np.max(pts[f"batch={b}"][metric]), floor) for b in batches]
        (line,) = ax.plot(batches, med, marker="o", ms=3, label=label)
        ax.fill_between(batches, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axvline(config.BASE["input_dim"] + 1, color="k", ls="--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="batch size N", ylabel="relative error")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    data = [pts[f"batch={b}"]["cosine"] for b in batches]
    bx.boxplot(data, showfliers=True)
    bx.set_xticks(range(1, len(batches) + 1), [str(b) for b in batches])
    bx.set(xlabel="batch size N", ylabel="cosine(modular, exact)", ylim=(-1.05, 1.05))
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
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
    if any(r["setting"].startswith("batch=") for r in rows):
        plot(rows, base / f"{level}_cosines.png")
    print(text)
    print(f"\nrows: {store.rows_path}\nfigure: {base / f'{level}_cosines.png'}")
    return text
