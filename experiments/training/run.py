"""Train small MLPs with SGD and natural-gradient variants; record curves, accuracy, cost.

Every method runs the same model, data, batches and seeds; only the direction differs.
Natural-gradient methods are ``optax.chain(natchain.scale_by_natural_gradient(...),
optax.scale(-lr))``; SGD is ``optax.sgd(lr)``. A method whose loss or parameters become
non-finite is stopped and recorded as ``diverged`` with the rows it produced. The cost
of a step is its median wall time after compilation, reported as a ratio to the SGD step
timed in the same invocation.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import natchain as nc
from experiments import _data
from experiments._results import RESULTS, Progress, ResultStore
from experiments.training import config

EXPERIMENT = "training"


# ---- model and methods -------------------------------------------------------------------


def init_mlp(key, sizes):
    """Parameters of a tanh MLP: a list of ``{"w", "b"}`` with ``w ~ N(0, 1/fan_in)``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params, x):
    """``model(params, x) -> eta``: tanh hidden layers, linear output."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def family_for(name):
    return {"categorical": nc.Categorical(), "gaussian": nc.Gaussian()}[name]


def make_optimizer(method_cfg, family, learning_rate=None, damping=None):
    """The optax transformation of one method (``None`` arguments: the configured values).

    Raises:
        NotImplementedError: a modular method where ``natchain.grad`` is unavailable.
    """
    lr = method_cfg["learning_rate"] if learning_rate is None else learning_rate
    if method_cfg["type"] == "sgd":
        return optax.sgd(lr)
    if method_cfg["type"] == "modular":
        nat = nc.scale_by_natural_gradient(
            mlp, family, method="modular", granularity=method_cfg["granularity"]
        )
    else:
        lam = method_cfg["damping"] if damping is None else damping
        options = dict(config.CG) if method_cfg["solver"] == "cg" else {}
        nat = nc.scale_by_natural_gradient(
            mlp,
            family,
            solver=method_cfg["solver"],
            kind=method_cfg["kind"],
            damping=lam,
            num_samples=method_cfg.get("num_samples", 1),
            **options,
        )
    return optax.chain(nat, optax.scale(-lr))


def make_step(opt, family, natural):
    def loss(params, x, y):
        return jnp.mean(jax.vmap(family.nll)(mlp(params, x), y))

    @jax.jit
    def step(params, state, x, y, key):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        if natural:
            updates, state = opt.update(grads, state, params, x=x, y=y, key=key)
        else:
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return step


def make_eval(data, family):
    xtr, ytr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xte, yte = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    @jax.jit
    def evaluate(params):
        tr = jnp.mean(jax.vmap(family.nll)(mlp(params, xtr), ytr))
        out = mlp(params, xte)
        te = jnp.mean(jax.vmap(family.nll)(out, yte))
        if data.task == "classification":
            metric = jnp.mean(jnp.argmax(out, axis=1) == yte)
        else:
            metric = jnp.mean((out - yte) ** 2)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        return tr, te, metric, finite

    return evaluate


# ---- one run --------------------------------------------------------------------------------


def train(setting, method, seed, level, *, lr=None, damping=None, cache=None, verbose=True):
    """Train one ``(setting, method, seed)``; return ``(rows, status, note, config)``."""
    lvl = config.LEVELS[level]
    scfg = config.SETTINGS[setting]
    mcfg = config.METHODS[method]
    data = _data.load(scfg["data"])
    if lvl["max_train"]:
        data = data._replace(x_train=data.x_train[: lvl["max_train"]])
        data = data._replace(y_train=data.y_train[: lvl["max_train"]])
    family = family_for(scfg["family"])
    batch = lvl["batch"] or scfg["batch"]
    sizes = (data.x_train.shape[1], *scfg["hidden"], data.num_outputs)
    if lr is None:
        lr = scfg.get("learning_rate", {}).get(method, mcfg["learning_rate"])
    run_cfg = {
        "setting": setting,
        "data": scfg["data"],
        "sizes": list(sizes),
        "family": scfg["family"],
        "batch": batch,
        "steps": lvl["steps"],
        "eval_every": lvl["eval_every"],
        "method": dict(mcfg),
        "cg": dict(config.CG),
        "learning_rate": lr,
        "damping": mcfg.get("damping") if damping is None else damping,
        "dtype": "float64",
    }
    cache = {} if cache is None else cache
    ckey = (setting, method, lr, damping, level)
    if ckey not in cache:
        opt = make_optimizer(mcfg, family, lr, damping)
        cache[ckey] = (opt, make_step(opt, family, mcfg["type"] != "sgd"))
    opt, step = cache[ckey]
    ekey = ("eval", setting, level)
    if ekey not in cache:
        cache[ekey] = make_eval(data, family)
    evaluate = cache[ekey]

    params = init_mlp(jax.random.PRNGKey(seed), sizes)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(10_000 + seed)
    n = len(data.x_train)
    order, pos = rng.permutation(n), 0
    rows, step_times, wall = [], [], 0.0
    metric_name = "test_accuracy" if data.task == "classification" else "test_mse"

    def record(k):
        tr, te, metric, finite = (float(v) for v in evaluate(params))
        for name, value in (
            ("train_loss", tr),
            ("test_loss", te),
            (metric_name, metric),
            ("wall_s", wall),
        ):
            rows.append({"step": k, "metric": name, "value": value})
        return math.isfinite(tr) and bool(finite)

    status, note = "ok", ""
    record(0)
    bar = Progress(lvl["steps"], f"{setting} {method} seed {seed}", enabled=verbose)
    for k in range(1, lvl["steps"] + 1):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        key, sub = jax.random.split(key)
        t0 = time.perf_counter()
        params, state, loss = step(params, state, data.x_train[idx], data.y_train[idx], sub)
        jax.block_until_ready(params)
        dt = time.perf_counter() - t0
        if k == 1:
            rows.append({"step": 1, "metric": "compile_s", "value": dt})
        else:
            step_times.append(dt)
            wall += dt
        bar.update(1, loss=f"{float(loss):.3g}")
        if k % lvl["eval_every"] == 0 or k == lvl["steps"]:
            if not record(k):
                status, note = "diverged", f"non-finite loss or parameters by step {k}"
                break
            # The optimiser's guard replaces non-finite natural gradients by zeros: a run
            # that needed it diverged as surely as one whose parameters went NaN.
            if mcfg["type"] != "sgd" and int(state[0].num_skipped) > 0:
                status, note = "diverged", f"non-finite natural gradient (skipped) by step {k}"
                break
    bar.close()
    if step_times:
        rows.append(
            {"step": lvl["steps"], "metric": "step_time_s", "value": float(np.median(step_times))}
        )
    return rows, status, note, run_cfg


# ---- summary, table, plot --------------------------------------------------------------------


def summarise(rows, runs):
    """Per (setting, method): final train loss, final test metric, step time ÷ SGD's, status.

    The ratio divides each run's median step time by the SGD run's with the same setting
    and seed; the table reports the mean over seeds of every quantity and the spread
    (standard deviation over seeds, 0 for one seed).
    """
    by_run = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    final = {}
    for rid, rs in by_run.items():
        info = runs[rid]
        last = {}
        for r in rs:
            if r["metric"] == "step_time_s" or r["step"] >= last.get(r["metric"], (-1, None))[0]:
                last[r["metric"]] = (r["step"], r["value"])
        final[rid] = (info, {k: v for k, (_, v) in last.items()})
    out = {}
    for _rid, (info, vals) in final.items():
        sgd = final.get(f"sgd|{info['setting']}|{info['seed']}")
        ratio = float("nan")
        if sgd is not None and "step_time_s" in vals and "step_time_s" in sgd[1]:
            ratio = vals["step_time_s"] / sgd[1]["step_time_s"]
        entry = out.setdefault((info["setting"], info["method"]), {"status": [], "ratio": []})
        entry["status"].append(info["status"])
        entry["ratio"].append(ratio)
        for name in ("train_loss", "test_accuracy", "test_mse"):
            if name in vals:
                entry.setdefault(name, []).append(_num(vals[name]))
    return out


def _num(v):
    return float(v) if not isinstance(v, str) else float(v)


def _fmt(values, scale=1.0, digits=3):
    arr = np.asarray(values, dtype=float) * scale
    if not np.all(np.isfinite(arr)):
        return "diverged" if np.all(~np.isfinite(arr)) else f"{np.nanmean(arr):.{digits}g}*"
    if len(arr) == 1:
        return f"{arr[0]:.{digits}g}"
    return f"{arr.mean():.{digits}g} ± {arr.std():.{digits - 1}g}"


def table(summary, methods):
    """A Markdown table (a string) of the summary, one block per setting."""
    lines = []
    settings = sorted({s for s, _ in summary}, key=list(config.SETTINGS).index)
    for setting in settings:
        reg = config.SETTINGS[setting]["family"] == "gaussian"
        metric = "test MSE" if reg else "test accuracy (%)"
        lines += [
            f"**{setting}**",
            "",
            f"| method | final train loss | {metric} | time/step ÷ SGD | runs |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method in methods:
            e = summary.get((setting, method))
            if e is None:
                continue
            test = _fmt(e["test_mse"]) if reg else _fmt(e.get("test_accuracy", []), 100, 3)
            status = ", ".join(f"{s}×{e['status'].count(s)}" for s in sorted(set(e["status"])))
            ratio = np.nanmean(e["ratio"]) if np.any(np.isfinite(e["ratio"])) else float("nan")
            lines.append(
                f"| {method} | {_fmt(e['train_loss'])} | {test} | {ratio:.1f}× | {status} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows, runs, path, methods):
    """Training loss against steps and against wall time, one row of panels per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in runs.values()}, key=list(config.SETTINGS).index)
    fig, axes = plt.subplots(len(settings), 2, figsize=(9, 3.2 * len(settings)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for i, setting in enumerate(settings):
        for j, method in enumerate(methods):
            for seed_i, (rid, info) in enumerate(
                (k, v) for k, v in runs.items() if v["method"] == method and v["setting"] == setting
            ):
                rs = [r for r in rows if r["run"] == rid]
                steps = [r["step"] for r in rs if r["metric"] == "train_loss"]
                loss = [_num(r["value"]) for r in rs if r["metric"] == "train_loss"]
                loss = [v if math.isfinite(v) and v < 1e8 else float("nan") for v in loss]
                wall = [_num(r["value"]) for r in rs if r["metric"] == "wall_s"]
                label = method + (" (diverged)" if info["status"] == "diverged" else "")
                kw = dict(
                    color=colours(j), alpha=0.85, lw=1.3, label=label if seed_i == 0 else None
                )
                axes[i, 0].plot(steps, loss, **kw)
                keep = [k for k, w in enumerate(wall) if w > 0]
                axes[i, 1].plot([wall[k] for k in keep], [loss[k] for k in keep], **kw)
        axes[i, 1].set_xscale("log")
        for ax, xlabel in zip(axes[i], ("step", "wall time (s, excl. compile)"), strict=True):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{setting}: train loss")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry points -------------------------------------------------------------------------------


def _runnable(method, family):
    """``None`` if the method can run here, else why not."""
    try:
        make_optimizer(config.METHODS[method], family)
    except NotImplementedError as err:
        return str(err).split(";")[0]
    return None


def main(level="quick", seeds=None, root=None, fresh=False, verbose=True, sweep=False):
    """Run the training comparison at ``level`` and print its table; see the README."""
    jax.config.update("jax_enable_x64", True)
    if sweep:
        return run_sweep(root=root, fresh=fresh, verbose=verbose)
    lvl = config.LEVELS[level]
    seeds = tuple(lvl["seeds"] if seeds is None else seeds)
    store = ResultStore(EXPERIMENT, level, root=root, fresh=fresh)
    cache, skipped = {}, {}
    for setting in lvl["settings"]:
        family = family_for(config.SETTINGS[setting]["family"])
        for method in lvl["methods"]:
            why = _runnable(method, family)
            if why is not None:
                skipped[method] = why
                continue
            for seed in seeds:
                if store.done(method, setting, seed):
                    continue
                t0 = time.perf_counter()
                try:
                    rows, status, note, cfg = train(
                        setting, method, seed, level, cache=cache, verbose=verbose
                    )
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
    rows = store.rows()
    runs = {k: v for k, v in store.runs.items() if v["setting"] in lvl["settings"]}
    methods = [m for m in lvl["methods"] if m not in skipped]
    text = table(summarise(rows, runs), methods)
    for method, why in skipped.items():
        text += f"\n- {method}: not run ({why})."
    base = (root if root is not None else RESULTS) / EXPERIMENT
    (base / f"{level}_table.md").write_text(text + "\n")
    plot(rows, runs, base / f"{level}_curves.png", methods)
    print(text)
    print(f"\nrows: {store.rows_path}\nplot: {base / f'{level}_curves.png'}")
    return text


def run_sweep(root=None, fresh=False, verbose=True):
    """Every method × learning rate × damping on the sweep setting; print the best per method."""
    sw = config.SWEEP
    store = ResultStore(EXPERIMENT, "sweep", root=root, fresh=fresh)
    config.LEVELS["sweep"] = dict(
        config.LEVELS["quick"], steps=sw["steps"], eval_every=sw["steps"], seeds=(sw["seed"],)
    )
    family = family_for(config.SETTINGS[sw["setting"]]["family"])
    best = {}
    for method, mcfg in config.METHODS.items():
        if _runnable(method, family) is not None or method in sw["same_as"]:
            continue
        dampings = sw["damping"] if mcfg["type"] == "exact" else (None,)
        lrs = sw.get(f"{mcfg['type']}_learning_rate", sw["learning_rate"])
        for lr in lrs:
            for lam in dampings:
                tag = f"{sw['setting']}|lr={lr}|damping={lam}"
                if not store.done(method, tag, sw["seed"]):
                    rows, status, note, cfg = train(
                        sw["setting"],
                        method,
                        sw["seed"],
                        "sweep",
                        lr=lr,
                        damping=lam,
                        verbose=verbose,
                    )
                    store.record(
                        method, tag, sw["seed"], rows, config=cfg, status=status, note=note
                    )
                info = store.runs[f"{method}|{tag}|{sw['seed']}"]
                loss = [
                    _num(r["value"])
                    for r in store.rows()
                    if r["run"] == info["run"] and r["metric"] == "train_loss"
                ]
                final = loss[-1] if loss else float("inf")
                if info["status"] == "ok" and math.isfinite(final):
                    if method not in best or final < best[method][0]:
                        best[method] = (final, lr, lam)
    for method, other in sw["same_as"].items():
        if other in best:
            best[method] = best[other]
    for method, (loss, lr, lam) in best.items():
        print(f"{method:24s} lr={lr:<6} damping={lam!s:<6} final train loss {loss:.4g}")
    for setting in sw["lr_only_settings"]:
        print(f"\n{setting} (learning rate only):")
        for method, (loss, lr) in _sweep_learning_rate(store, setting, verbose).items():
            print(f"{method:24s} lr={lr:<6} final train loss {loss:.4g}")
    return best


def _sweep_learning_rate(store, setting, verbose):
    """Sweep the learning rate alone on ``setting`` (damping as configured)."""
    sw = config.SWEEP
    family = family_for(config.SETTINGS[setting]["family"])
    best = {}
    for method, mcfg in config.METHODS.items():
        if _runnable(method, family) is not None or method in sw["same_as"]:
            continue
        lam = mcfg.get("damping")
        for lr in sw.get(f"{mcfg['type']}_learning_rate", sw["learning_rate"]):
            tag = f"{setting}|lr={lr}|damping={lam}"
            if not store.done(method, tag, sw["seed"]):
                rows, status, note, cfg = train(
                    setting, method, sw["seed"], "sweep", lr=lr, verbose=verbose
                )
                store.record(method, tag, sw["seed"], rows, config=cfg, status=status, note=note)
            info = store.runs[f"{method}|{tag}|{sw['seed']}"]
            loss = [
                _num(r["value"])
                for r in store.rows()
                if r["run"] == info["run"] and r["metric"] == "train_loss"
            ]
            final = loss[-1] if loss else float("inf")
            if info["status"] == "ok" and math.isfinite(final):
                if method not in best or final < best[method][0]:
                    best[method] = (final, lr)
    for method, other in sw["same_as"].items():
        if other in best:
            best[method] = best[other]
    return best
