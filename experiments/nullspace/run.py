"""Train with four natural-gradient directions that differ in their null-space component.

Every run starts from the same initialisation (``experiments.training.run.init_mlp``, seed
``seed``), sees the same batches and follows the same step rule (``config.LEARNING_RATE``
inside a KL trust region of radius ``config.MAX_KL`` on the batch); only the direction
differs (``config.METHODS``). Rows per
(setting, method, seed), at step 0 and every ``eval_every`` steps:

- ``train_loss`` (the whole training split), ``test_loss``, ``test_accuracy`` (the
  held-out split);
- ``saturated_fraction``: share of (example, hidden unit) pairs of the batch with
  ``|tanh'(z)| < config.SATURATED``;

and, at every ``eval_every``-th step, about the direction ``s`` taken there (from
``natchain.diagnostics.step_report`` against the damped exact direction):

- ``null_fraction`` ``‖P_null s‖/‖s‖``, ``residual`` ``‖F s − g‖/‖g‖``, ``cosine`` with
  the exact direction, ``fn_error`` (centred function-space error), ``norm_ratio``
  ``‖s‖/‖e‖``; ``step_norm``: the parameter-space length ``α ‖s‖`` of the step applied.

A run whose direction, step or parameters become non-finite stops there and is recorded as
``diverged`` with the rows it produced.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import natchain as nc
from experiments import _data
from experiments._results import RESULTS, Progress, ResultStore
from experiments.nullspace import config
from experiments.training.run import init_mlp, mlp

EXPERIMENT = "nullspace"
FAMILY = nc.Categorical()
#: Metrics recorded at every evaluation, and those about the step taken there.
EVAL_METRICS = ("train_loss", "test_loss", "test_accuracy", "saturated_fraction")
STEP_METRICS = ("null_fraction", "residual", "cosine", "fn_error", "norm_ratio", "step_norm")


# ---- directions ---------------------------------------------------------------------------


@functools.cache
def rcond_option():
    """The ``rcond`` of ``modular-rcond``: activation maps only where ``natchain.grad``
    takes a per-map-kind mapping, else the scalar (every map)."""
    option = {"activation": config.RCOND}
    params = init_mlp(jax.random.PRNGKey(0), (2, 2, 2))
    x, y = jnp.ones((1, 2)), jnp.zeros((1,), jnp.int32)
    try:
        nc.grad(mlp, FAMILY, granularity="layer", rcond=option)(params, x, y)
    except (TypeError, ValueError):
        return config.RCOND
    return option


def direction_fn(method):
    """``(params, x, y) -> s``, traceable."""
    if method == "exact":

        def exact(p, x, y):
            return nc.natural_gradient(
                mlp, p, x, y, FAMILY, solver="gram", damping=config.DAMPING
            ).value

        return exact
    rcond = rcond_option() if method == "modular-rcond" else None
    modular = nc.grad(mlp, FAMILY, granularity="layer", rcond=rcond)
    if method in ("modular", "modular-rcond"):
        return modular
    if method == "modular-projected":

        def projected(p, x, y):
            return nc.diagnostics.project_to_range(mlp, p, x, FAMILY, modular(p, x, y))

        return projected
    raise ValueError(f"method={method!r} is not one of {config.METHODS}.")


def fisher_norm(params, x, s):
    """``√(sᵀ F_theta s)`` (mean over the batch) through the output factor."""
    eta, d_eta = jax.jvp(lambda p: mlp(p, x), (params,), (s,))
    z = jnp.einsum("nmr,nm->nr", nc.output_factor(FAMILY, eta), d_eta)
    return jnp.sqrt(jnp.sum(z * z) / eta.shape[0])


@functools.cache
def make_step(method):
    """A jitted ``(params, x, y) -> (new params, s, α, finite)``: the trust-region step."""
    direction = direction_fn(method)

    @jax.jit
    def step(params, x, y):
        s = direction(params, x, y)
        fn = fisher_norm(params, x, s)
        alpha = jnp.minimum(
            config.LEARNING_RATE, math.sqrt(2.0 * config.MAX_KL) / jnp.where(fn > 0, fn, 1.0)
        )
        new = jax.tree.map(lambda p, d: p - alpha * d, params, s)
        flat_s = ravel_pytree(s)[0]
        finite = jnp.all(jnp.isfinite(flat_s)) & (fn > 0) & jnp.isfinite(alpha)
        finite = finite & jnp.all(jnp.isfinite(ravel_pytree(new)[0]))
        return new, s, alpha, finite

    return step


@jax.jit
def _report(params, x, y, s):
    return nc.diagnostics.step_report(mlp, params, x, y, FAMILY, s, damping=config.DAMPING)


@jax.jit
def _report_exact(params, x, y, s):  # the exact method: s is its own reference
    return nc.diagnostics.step_report(mlp, params, x, y, FAMILY, s, exact=s)


def saturated_fraction(params, x):
    z = x @ params[0]["w"] + params[0]["b"]
    return float(jnp.mean(jnp.abs(1.0 - jnp.tanh(z) ** 2) < config.SATURATED))


@functools.cache
def make_eval(setting, level):
    data = load(setting, level)
    xtr, ytr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xte, yte = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    @jax.jit
    def evaluate(params):
        tr = jnp.mean(jax.vmap(FAMILY.nll)(mlp(params, xtr), ytr))
        out = mlp(params, xte)
        te = jnp.mean(jax.vmap(FAMILY.nll)(out, yte))
        return tr, te, jnp.mean(jnp.argmax(out, axis=1) == yte)

    return evaluate


def load(setting, level):
    data = _data.load(config.SETTINGS[setting]["data"])
    cap = config.LEVELS[level]["max_train"]
    if cap:
        data = data._replace(x_train=data.x_train[:cap], y_train=data.y_train[:cap])
    return data


# ---- one run --------------------------------------------------------------------------------


def train(setting, method, seed, level, verbose=True):
    """Train one ``(setting, method, seed)``; return ``(rows, status, note, config)``."""
    lvl = config.LEVELS[level]
    scfg = config.SETTINGS[setting]
    data = load(setting, level)
    batch = lvl["batch"] or scfg["batch"]
    sizes = (data.x_train.shape[1], *scfg["hidden"], data.num_outputs)
    run_cfg = {
        "setting": setting,
        "data": scfg["data"],
        "sizes": list(sizes),
        "batch": batch,
        "steps": lvl["steps"],
        "eval_every": lvl["eval_every"],
        "method": method,
        "learning_rate": config.LEARNING_RATE,
        "max_kl": config.MAX_KL,
        "damping": config.DAMPING,
        "rcond": rcond_option() if method == "modular-rcond" else None,
        "saturated": config.SATURATED,
        "dtype": "float64",
    }
    step, evaluate = make_step(method), make_eval(setting, level)
    report = _report_exact if method == "exact" else _report
    params = init_mlp(jax.random.PRNGKey(seed), sizes)
    rng = np.random.default_rng(seed)
    n = len(data.x_train)
    order, pos = rng.permutation(n), 0
    rows = []

    def add(k, metric, value):
        rows.append({"step": k, "metric": metric, "value": float(value)})

    def record(k, x):
        tr, te, acc = evaluate(params)
        for metric, value in zip(EVAL_METRICS[:3], (tr, te, acc), strict=True):
            add(k, metric, value)
        add(k, "saturated_fraction", saturated_fraction(params, x))

    status, note = "ok", ""
    bar = Progress(lvl["steps"], f"{setting} {method} seed {seed}", enabled=verbose)
    for k in range(lvl["steps"]):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
        evaluating = k % lvl["eval_every"] == 0
        if evaluating:
            record(k, x)
        new, s, alpha, finite = step(params, x, y)
        if not bool(finite):
            status, note = "diverged", f"non-finite direction, step or parameters at step {k}"
            break
        if evaluating:
            rep = report(params, x, y, s)
            for metric in STEP_METRICS[:-1]:
                add(k, metric, rep[metric])
            add(k, "step_norm", float(alpha) * float(rep["step_norm"]))
        params = new
        bar.update(1)
    bar.close()
    if status == "ok":
        record(lvl["steps"], x)
    return rows, status, note, run_cfg


# ---- tables and figure ----------------------------------------------------------------------


def by_run(rows):
    """``{(setting, method): {metric: {step: [values over seeds]}}}``."""
    out = {}
    for r in rows:
        d = out.setdefault((r["setting"], r["method"]), {}).setdefault(r["metric"], {})
        d.setdefault(int(r["step"]), []).append(float(r["value"]))
    return out


def _final(series):
    """Values at the last step every seed reached (``[]`` if none)."""
    return series[max(series)] if series else []


def _mean_sd(values, digits=3):
    """``mean ± sd`` over the finite values, with the count of non-finite ones named."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return "–"
    finite = arr[np.isfinite(arr)]
    bad = f" ({arr.size - finite.size} non-finite)" if finite.size < arr.size else ""
    if finite.size == 0:
        return f"non-finite ({arr.size})"
    if finite.size == 1:
        return f"{finite[0]:.{digits}g}{bad}"
    return f"{np.mean(finite):.{digits}g} ± {np.std(finite, ddof=1):.2g}{bad}"


def summary_table(rows, runs):
    """Markdown: per setting and method, final metrics (mean ± sd over the seeds whose runs
    finished) and the direction's null fraction, residual, cosine and step norm (mean ± sd
    over seeds of each run's mean over its evaluations; a run with a non-finite value there
    is counted as non-finite)."""
    grouped = by_run(rows)
    status = {}
    for info in runs.values():
        status.setdefault((info["setting"], info["method"]), []).append(info["status"])
    lines = [
        "| setting | method | test accuracy | test loss | train loss | saturated fraction "
        "| null fraction | residual ‖Fs − g‖/‖g‖ | cos(s, e) | step norm | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    settings = [s for s in config.SETTINGS if any(k[0] == s for k in grouped)]
    for setting in settings:
        for method in config.METHODS:
            d = grouped.get((setting, method))
            if d is None:
                continue

            def per_run_mean(metric, d=d):
                series = d.get(metric, {})
                seeds = max((len(v) for v in series.values()), default=0)
                return [
                    np.mean([v[i] for v in series.values() if len(v) > i]) for i in range(seeds)
                ]

            st = status.get((setting, method), [])
            runs_text = ", ".join(f"{s}×{st.count(s)}" for s in sorted(set(st)))
            lines.append(
                f"| {setting} | {method} | {_mean_sd(_final(d.get('test_accuracy', {})))} "
                f"| {_mean_sd(_final(d.get('test_loss', {})))} "
                f"| {_mean_sd(_final(d.get('train_loss', {})))} "
                f"| {_mean_sd(_final(d.get('saturated_fraction', {})))} "
                f"| {_mean_sd(per_run_mean('null_fraction'))} "
                f"| {_mean_sd(per_run_mean('residual'))} "
                f"| {_mean_sd(per_run_mean('cosine'))} "
                f"| {_mean_sd(per_run_mean('step_norm'))} | {runs_text} |"
            )
    return "\n".join(lines)


PLOTTED = (
    ("test_accuracy", "held-out accuracy", "linear"),
    ("train_loss", "train loss", "log"),
    ("saturated_fraction", "saturated fraction", "linear"),
    ("null_fraction", "null fraction of s", "linear"),
    ("step_norm", "step norm α‖s‖", "log"),
)


def plot(rows, path):
    """Per setting (rows of panels) and metric (columns): mean over seeds, band min–max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = by_run(rows)
    settings = [s for s in config.SETTINGS if any(k[0] == s for k in grouped)]
    fig, axes = plt.subplots(
        len(settings),
        len(PLOTTED),
        figsize=(2.3 * len(PLOTTED), 2.2 * len(settings)),
        squeeze=False,
    )
    for i, setting in enumerate(settings):
        for j, (metric, label, scale) in enumerate(PLOTTED):
            ax = axes[i][j]
            for method in config.METHODS:
                series = grouped.get((setting, method), {}).get(metric, {})
                if not series:
                    continue
                steps = sorted(series)
                vals = [np.asarray(series[s]) for s in steps]
                (line,) = ax.plot(steps, [v.mean() for v in vals], marker="o", ms=2, label=method)
                ax.fill_between(
                    steps,
                    [v.min() for v in vals],
                    [v.max() for v in vals],
                    color=line.get_color(),
                    alpha=0.15,
                )
            ax.set_yscale(scale)
            ax.set_xlabel("step")
            ax.set_title(f"{setting}: {label}", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(level="quick", seeds=None, root=None, fresh=False, verbose=True):
    """Run at ``level``; print the table; write rows, the table and the figure."""
    jax.config.update("jax_enable_x64", True)
    lvl = config.LEVELS[level]
    seeds = tuple(lvl["seeds"] if seeds is None else seeds)
    store = ResultStore(EXPERIMENT, level, root=root, fresh=fresh)
    for setting in lvl["settings"]:
        for method in config.METHODS:
            for seed in seeds:
                if store.done(method, setting, seed):
                    continue
                t0 = time.perf_counter()
                try:
                    rows, status, note, cfg = train(setting, method, seed, level, verbose)
                except Exception as err:  # recorded honestly, the experiment goes on
                    rows, status, note, cfg = [], "error", f"{type(err).__name__}: {err}", {}
                store.record(
                    method,
                    setting,
                    seed,
                    rows,
                    config=cfg,
                    status=status,
                    wall_s=time.perf_counter() - t0,
                    note=note[:500],
                )
    rows = [r for r in store.rows() if r["setting"] in lvl["settings"]]
    runs = {k: v for k, v in store.runs.items() if v["setting"] in lvl["settings"]}
    text = summary_table(rows, runs)
    base = (root if root is not None else RESULTS) / EXPERIMENT
    (base / f"{level}_table.md").write_text(text + "\n")
    plot(rows, base / f"{level}_curves.png")
    print(text)
    print(f"\nrows: {store.rows_path}\nfigure: {base / f'{level}_curves.png'}")
    return text
