"""Train one model per setting with first-order, natural-gradient and K-FAC updates.

Every method runs the same model, data, batches and seeds; only the update differs.
Every update is ``-lr · direction`` (the learning rate a traced argument, so a sweep over
it compiles once); directions: the gradient, ``optax.scale_by_adam``, or
``natchain.scale_by_natural_gradient(...)``. K-FAC is ``kfac_jax.Optimizer``
(``experiments/_kfac.py``). Hyperparameters come from the sweep's ``chosen.json``
(``config.py`` describes the protocol).

At every evaluation step a run records its losses, validation and test metrics, wall
time, and diagnostics of the step it just took on its batch (``natchain.diagnostics
.step_report``: step norm, null-space fraction, cosine and centred function-space error to
the exact minimum-norm natural gradient), the hidden units' saturation, and per-map cut
counts (modular) or rank (exact). Statuses: ``ok``; ``degenerate`` (some map's local
pseudo-inverse cut everything at an evaluation step; the run is kept but flagged);
``diverged`` (non-finite loss, parameters or natural gradient); ``error``; ``skipped``
(K-FAC where kfac-jax cannot run, with the reason).
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import natchain as nc
from experiments import _data, _kfac
from experiments._results import RESULTS, Progress, ResultStore
from experiments.training import config

EXPERIMENT = "training"

#: An activation whose derivative is below this is counted as saturated (tanh: |h| > 0.995;
#: ReLU: an inactive unit, derivative 0).
SATURATION_THRESHOLD = 1e-2


# ---- models ----------------------------------------------------------------------------------


def init_mlp(key, sizes):
    """Parameters of an MLP: a list of ``{"w", "b"}`` with ``w ~ N(0, 1/fan_in)``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def init_relu_mlp(key, sizes):
    """He-scaled (``N(0, 2/fan_in)``) weights for the ReLU MLP."""
    return [{"w": layer["w"] * math.sqrt(2.0), "b": layer["b"]} for layer in init_mlp(key, sizes)]


def mlp(params, x):
    """``model(params, x) -> eta``: tanh hidden layers, linear output."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def relu_mlp(params, x):
    """``model(params, x) -> eta``: ReLU hidden layers, linear output."""
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _mlp_derivatives(act):
    def derivatives(params, x):
        h, out = x, []
        for layer in params[:-1]:
            z = h @ layer["w"] + layer["b"]
            h = act(z)
            out.append(1 - h * h if act is jnp.tanh else (z > 0).astype(z.dtype))
        return out

    return derivatives


def _cnn_derivatives(params, x):
    h, out = x[:, :, None], []
    for layer in params[:-1]:
        z = (
            jax.lax.conv_general_dilated(
                h, layer["W"], (2,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
            )
            + layer["b"]
        )
        h = jax.nn.relu(z)
        out.append((z > 0).astype(z.dtype))
    return out


def build_model(setting, data):
    """``(apply, init(key) -> params, derivatives(params, x) -> [activation derivatives])``."""
    scfg = config.SETTINGS[setting]
    if scfg["model"] == "cnn":
        from benchmarks.bench import cnn, init_cnn

        def init(key):
            return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_cnn(key))

        return cnn, init, _cnn_derivatives
    sizes = (data.x_train.shape[1], *scfg["hidden"], data.num_outputs)
    if scfg["model"] == "relu":
        return relu_mlp, lambda key: init_relu_mlp(key, sizes), _mlp_derivatives(jax.nn.relu)
    return mlp, lambda key: init_mlp(key, sizes), _mlp_derivatives(jnp.tanh)


#: One family object per name for the whole process: the diagnostics compile once per
#: (model, family), and a fresh object per run would compile them again every run.
FAMILIES = {"categorical": nc.Categorical(), "gaussian": nc.Gaussian()}


def family_for(name):
    return FAMILIES[name]


# ---- hyperparameters -----------------------------------------------------------------------


def hp_type(method):
    """The key of ``config.GRIDS``/``config.DEFAULTS`` for ``method``."""
    return config.METHODS[method]["type"]


def rcond_mapping(pair, granularity="layer"):
    """``(activation, dense)`` cut-offs as natchain's per-kind ``rcond`` mapping.

    At primitive granularity every map is of kind ``"primitive"``: the pair is ``(v, v)``
    and ``v`` applies to every map.
    """
    act, dense = pair
    if granularity == "primitive":
        if act != dense:
            raise ValueError(f"at primitive granularity the rcond pair must be (v, v); got {pair}.")
        return {"default": act}
    return {"activation": act, "dense": dense}


def make_optimizer(method, apply, family, hp, example_batch):
    """``(kind, transformation)`` of one method (``"optax"``, ``"natural"`` or ``"kfac"``)."""
    mcfg = config.METHODS[method]
    if mcfg["type"] == "sgd":
        return "optax", optax.identity()
    if mcfg["type"] == "adam":
        return "optax", optax.scale_by_adam()
    if mcfg["type"] == "kfac":
        opt, _ = _kfac.kfac_optimizer(
            apply,
            family,
            mcfg["inverse_period"],
            learning_rate=hp["learning_rate"],
            damping=hp["damping"],
        )
        return "kfac", opt
    if mcfg["type"] == "modular":
        nat = nc.scale_by_natural_gradient(
            apply,
            family,
            method="modular",
            granularity=mcfg["granularity"],
            rcond=rcond_mapping(hp["rcond"], mcfg["granularity"]),
            example_batch=example_batch,
        )
    else:
        options = dict(config.CG) if mcfg["solver"] == "cg" else {}
        nat = nc.scale_by_natural_gradient(
            apply,
            family,
            solver=mcfg["solver"],
            kind=mcfg["kind"],
            damping=hp["damping"],
            num_samples=mcfg.get("num_samples", 1),
            **options,
        )
    return "natural", nat


def make_step(opt, apply, family, natural):
    """A jitted ``step(params, state, x, y, key, lr) -> (params, state, loss, updates)``.

    The learning rate is an argument, not a constant of the program: every learning rate of
    the sweep shares one compilation. The update is ``-lr · direction`` with the direction
    of the transformation (the gradient, Adam's, the natural gradient).
    """

    def loss(params, x, y):
        return jnp.mean(jax.vmap(family.nll)(apply(params, x), y))

    @jax.jit
    def step(params, state, x, y, key, lr):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        if natural:
            updates, state = opt.update(grads, state, params, x=x, y=y, key=key)
        else:
            updates, state = opt.update(grads, state, params)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return optax.apply_updates(params, updates), state, value, updates

    return step


def make_eval(data, apply, family, derivatives):
    xs = {
        "train": (jnp.asarray(data.x_train), jnp.asarray(data.y_train)),
        "val": (jnp.asarray(data.x_val), jnp.asarray(data.y_val)),
        "test": (jnp.asarray(data.x_test), jnp.asarray(data.y_test)),
    }
    classification = data.task == "classification"

    @jax.jit
    def evaluate(params):
        out = {}
        for split, (x, y) in xs.items():
            eta = apply(params, x)
            out[f"{split}_loss"] = jnp.mean(jax.vmap(family.nll)(eta, y))
            if classification:
                out[f"{split}_accuracy"] = jnp.mean(jnp.argmax(eta, axis=1) == y)
            else:
                out[f"{split}_mse"] = jnp.mean((eta - y) ** 2)
        ds = derivatives(params, xs["train"][0])
        if ds:
            out["saturation"] = sum(jnp.sum(d < SATURATION_THRESHOLD) for d in ds) / sum(
                d.size for d in ds
            )
        out["finite"] = jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
        )
        return out

    return evaluate


def _step_report_fn():
    """``natchain.diagnostics.step_report`` where this natchain has it, else ``None``."""
    return getattr(nc.diagnostics, "step_report", None)


# ---- one run ----------------------------------------------------------------------------------


def run_length(setting, method, level):
    """``(steps, eval_every)`` of one run at ``level``."""
    lvl, scfg = config.LEVELS[level], config.SETTINGS[setting]
    steps = lvl["steps"] if lvl["steps"] is not None else scfg["steps"]
    if isinstance(steps, dict):
        steps = steps[config.category(method)]
    every = lvl["eval_every"] if lvl["eval_every"] is not None else scfg["eval_every"]
    return steps, max(1, min(every, steps))


def load_data(setting, level):
    lvl, scfg = config.LEVELS[level], config.SETTINGS[setting]
    data = _data.load(scfg["data"], validation=scfg.get("validation", config.VALIDATION))
    if lvl["max_train"]:
        data = data._replace(
            x_train=data.x_train[: lvl["max_train"]], y_train=data.y_train[: lvl["max_train"]]
        )
    return data


def _map_rows(k, info, natural_kind):
    """Cut counts of the step just taken; ``(rows, fully_cut_map_names)``."""
    rows, dead = [], []
    if natural_kind != "natural":
        return rows, dead
    maps = info.get("maps") or {}
    if maps:
        fracs = []
        for name, st in maps.items():
            rank, cut = int(st["rank"]), int(st["num_cut"])
            frac = cut / (rank + cut) if rank + cut else 0.0
            fracs.append(frac)
            rows.append({"step": k, "metric": f"cut_fraction:{name}", "value": frac})
            if rank == 0:
                dead.append(name)
        rows.append({"step": k, "metric": "max_cut_fraction", "value": max(fracs)})
    else:
        rank, cut = int(info["rank"]), int(info["num_cut"])
        rows += [
            {"step": k, "metric": "rank", "value": rank},
            {"step": k, "metric": "num_cut", "value": cut},
        ]
        if rank == 0:
            dead.append("solver")
    rows.append({"step": k, "metric": "num_cut_total", "value": int(info["num_cut"])})
    return rows, dead


def train(
    setting, method, seed, level, hp, *, cache=None, verbose=True, steps=None, diagnostics=True
):
    """Train one ``(setting, method, seed)`` with hyperparameters ``hp``.

    ``diagnostics=False`` (the sweep, which selects on the validation metric only) leaves
    out ``step_report``; cut counts and statuses are recorded either way.

    Returns:
        ``(rows, status, note, config)``.
    """
    lvl = config.LEVELS[level]
    scfg = config.SETTINGS[setting]
    data = load_data(setting, level)
    family = family_for(scfg["family"])
    batch = lvl["batch"] or scfg["batch"]
    n_steps, every = run_length(setting, method, level)
    if steps is not None:
        n_steps, every = steps, max(1, min(every, steps))
    cache = {} if cache is None else cache
    mkey = ("model", setting, level)
    if mkey not in cache:
        apply, init, derivatives = build_model(setting, data)
        cache[mkey] = (apply, init, make_eval(data, apply, family, derivatives))
    apply, init, evaluate = cache[mkey]
    example = (data.x_train[:batch], data.y_train[:batch])
    # One compilation per method and non-learning-rate hyperparameters (kfac-jax takes its
    # learning rate as a constant: one per full ``hp``).
    shared = (
        hp if hp_type(method) == "kfac" else {k: v for k, v in hp.items() if k != "learning_rate"}
    )
    okey = (setting, method, level, json.dumps(shared, sort_keys=True))
    if okey not in cache:
        kind, opt = make_optimizer(method, apply, family, hp, example)
        step = make_step(opt, apply, family, kind == "natural") if kind != "kfac" else None
        cache[okey] = (kind, opt, step)
    kind, opt, step = cache[okey]
    report = _step_report_fn() if diagnostics else None
    lr = jnp.asarray(hp["learning_rate"], jnp.float64)
    run_cfg = {
        "setting": setting,
        "data": scfg["data"],
        "model": scfg["model"],
        "hidden": list(scfg["hidden"]),
        "family": scfg["family"],
        "sizes": data.sizes(),
        "batch": batch,
        "steps": n_steps,
        "eval_every": every,
        "method": dict(config.METHODS[method]),
        "cg": dict(config.CG),
        "hp": hp,
        "dtype": "float64",
        "diagnostics": "step_report"
        if report is not None
        else "off"
        if not diagnostics
        else "unavailable",
    }

    params = init(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(10_000 + seed)
    if kind == "kfac":
        key, sub = jax.random.split(key)
        state = opt.init(params, sub, example)
    else:
        state = opt.init(params)
    n = len(data.x_train)
    order, pos = rng.permutation(n), 0
    rows, step_times, wall = [], [], 0.0
    status, note = "ok", ""

    def record(k):
        vals = {name: float(v) for name, v in evaluate(params).items()}
        finite = vals.pop("finite") > 0
        for name, value in (*vals.items(), ("wall_s", wall)):
            rows.append({"step": k, "metric": name, "value": value})
        return math.isfinite(vals["train_loss"]) and finite

    def diagnose(k, before, xb, yb, updates):
        """Rows describing the step just taken from ``before`` on ``(xb, yb)``."""
        out = []
        direction = jax.tree.map(lambda u: -u / hp["learning_rate"], updates)
        flat = jnp.concatenate([jnp.ravel(u) for u in jax.tree.leaves(direction)])
        out.append({"step": k, "metric": "step_norm", "value": float(jnp.linalg.norm(flat))})
        if report is None or not bool(jnp.all(jnp.isfinite(flat))):
            return out
        rep = report(apply, before, xb, yb, family, direction, damping=0.0, kind="true")
        for name in ("null_fraction", "cosine", "fn_error", "residual", "norm_ratio"):
            out.append({"step": k, "metric": name, "value": float(rep[name])})
        return out

    if not record(0):
        return rows, "diverged", "non-finite at initialisation", run_cfg
    bar = Progress(n_steps, f"{setting} {method} seed {seed}", enabled=verbose)
    for k in range(1, n_steps + 1):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        xb, yb = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
        key, sub = jax.random.split(key)
        evaluating = k % every == 0 or k == n_steps
        before = params
        t0 = time.perf_counter()
        if kind == "kfac":
            if evaluating:  # kfac-jax donates its arguments: keep a copy for the diagnostics
                before = jax.tree.map(jnp.copy, params)
            params, state, stats = opt.step(params, state, sub, batch=(xb, yb), global_step_int=k)
            loss = stats["loss"]
        else:
            params, state, loss, updates = step(params, state, xb, yb, sub, lr)
        jax.block_until_ready(params)
        dt = time.perf_counter() - t0
        if k == 1:
            rows.append({"step": 1, "metric": "compile_s", "value": dt})
        else:
            step_times.append(dt)
            wall += dt
        bar.update(1, loss=f"{float(loss):.3g}")
        if not evaluating:
            continue
        if not record(k):
            status, note = "diverged", f"non-finite loss or parameters by step {k}"
            break
        if kind == "natural" and int(state.num_skipped) > 0:
            # The optimiser's guard replaced a non-finite natural gradient by zeros.
            status, note = "diverged", f"non-finite natural gradient (skipped) by step {k}"
            break
        if kind == "kfac":
            updates = jax.tree.map(lambda a, b: a - b, params, before)
        try:
            rows.extend(diagnose(k, before, xb, yb, updates))
        except Exception as err:  # a diagnostic that fails is recorded, the run goes on
            note = f"diagnostics failed at step {k}: {type(err).__name__}: {err}"[:300]
        if kind == "natural":
            map_rows, dead = _map_rows(k, state.info, kind)
            rows.extend(map_rows)
            if dead and status == "ok":
                status = "degenerate"
                note = f"every singular value cut in {', '.join(dead)} at step {k}"[:300]
    bar.close()
    if step_times:
        rows.append(
            {"step": n_steps, "metric": "step_time_s", "value": float(np.median(step_times))}
        )
    return rows, status, note, run_cfg


# ---- summary, table, plot -------------------------------------------------------------------


def _num(v):
    return float(v)


def final_values(rows):
    """Per run: the last value of every metric (``step_time_s`` and ``compile_s`` as is)."""
    last = {}
    for r in rows:
        cur = last.setdefault(r["run"], {})
        if r["metric"] not in cur or r["step"] >= cur[r["metric"]][0]:
            cur[r["metric"]] = (r["step"], _num(r["value"]))
    return {rid: {m: v for m, (_, v) in vals.items()} for rid, vals in last.items()}


def summarise(rows, runs):
    """Per (setting, method): final metrics over seeds, time per step ÷ SGD's, statuses.

    The ratio divides each run's median step time by the SGD run's with the same setting
    and seed (measured in the same invocation).
    """
    final = final_values(rows)
    out = {}
    for rid, info in runs.items():
        vals = final.get(rid, {})
        sgd = final.get(f"sgd|{info['setting']}|{info['seed']}", {})
        ratio = float("nan")
        if "step_time_s" in vals and "step_time_s" in sgd:
            ratio = vals["step_time_s"] / sgd["step_time_s"]
        e = out.setdefault((info["setting"], info["method"]), {"status": [], "ratio": []})
        e["status"].append(info["status"])
        e["ratio"].append(ratio)
        e.setdefault("note", []).append(info.get("note", ""))
        e["hp"] = info.get("config", {}).get("hp")
        e["steps"] = info.get("config", {}).get("steps")
        for name in (
            "train_loss",
            "test_accuracy",
            "test_mse",
            "val_accuracy",
            "val_mse",
            "wall_s",
            "step_time_s",
            "saturation",
            "max_cut_fraction",
            "null_fraction",
            "cosine",
            "fn_error",
        ):
            if name in vals:
                e.setdefault(name, []).append(vals[name])
    return out


def _fmt(values, scale=1.0, digits=3):
    arr = np.asarray(values, dtype=float) * scale
    if arr.size == 0:
        return "—"
    if not np.all(np.isfinite(arr)):
        return "diverged" if np.all(~np.isfinite(arr)) else f"{np.nanmean(arr):.{digits}g}*"
    if len(arr) == 1:
        return f"{arr[0]:.{digits}g}"
    return f"{arr.mean():.{digits}g} ± {arr.std():.{digits - 1}g}"


def _fmt_hp(hp):
    if not hp:
        return "—"
    parts = [f"lr={hp['learning_rate']:g}"]
    if "damping" in hp:
        parts.append(f"λ={hp['damping']:g}")
    if "rcond" in hp:
        a, d = hp["rcond"]
        parts.append(
            f"rcond act={a if a is not None else 'default'}, dense="
            f"{d if d is not None else 'default'}"
        )
    return ", ".join(parts)


def mean_predictor_mse(setting, level="full"):
    """Test MSE of predicting the training targets' mean (regression settings)."""
    data = load_data(setting, level)
    return float(np.mean((data.y_test - data.y_train.mean(0)) ** 2))


def table(summary, methods, chosen_note=""):
    """A Markdown table (a string) of the summary, one block per setting."""
    lines = []
    settings = sorted({s for s, _ in summary}, key=list(config.SETTINGS).index)
    for setting in settings:
        reg = config.SETTINGS[setting]["family"] == "gaussian"
        metric = "test MSE" if reg else "test accuracy (%)"
        lines += [f"**{setting}**" + chosen_note, ""]
        if reg:
            lines += [f"Mean predictor's test MSE: {mean_predictor_mse(setting):.3g}.", ""]
        lines += [
            f"| method | hyperparameters (validation) | steps | {metric} | final train loss "
            "| time/step ÷ SGD | wall s | max cut fraction | runs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method in methods:
            e = summary.get((setting, method))
            if e is None:
                continue
            test = _fmt(e.get("test_mse", [])) if reg else _fmt(e.get("test_accuracy", []), 100)
            status = ", ".join(f"{s}×{e['status'].count(s)}" for s in sorted(set(e["status"])))
            ratio = np.asarray(e["ratio"], float)
            ratio_s = f"{np.nanmean(ratio):.1f}×" if np.any(np.isfinite(ratio)) else "—"
            cut = _fmt(e.get("max_cut_fraction", []), 1, 2)
            lines.append(
                f"| {method} | {_fmt_hp(e['hp'])} | {e['steps']} | {test} | "
                f"{_fmt(e.get('train_loss', []))} | {ratio_s} | {_fmt(e.get('wall_s', []))} | "
                f"{cut} | {status} |"
            )
        notes = {
            (m, n) for (s, m), e in summary.items() if s == setting for n in e.get("note", []) if n
        }
        lines += [f"- {m}: {n}" for m, n in sorted(notes)]
        lines.append("")
    return "\n".join(lines)


def plot(rows, runs, path, methods):
    """Training loss (mean over seeds, min–max band) against steps and against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in runs.values()}, key=list(config.SETTINGS).index)
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 2.8 * len(settings)), squeeze=False)
    colours = plt.get_cmap("tab10")
    series = {}
    for r in rows:
        if r["metric"] in ("train_loss", "wall_s"):
            series.setdefault(r["run"], {}).setdefault(r["metric"], {})[r["step"]] = _num(
                r["value"]
            )
    for i, setting in enumerate(settings):
        for j, method in enumerate(methods):
            rids = [k for k, v in runs.items() if v["method"] == method and v["setting"] == setting]
            curves = [series[k] for k in rids if k in series and "train_loss" in series[k]]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c["train_loss"]) for c in curves)))
            loss = np.array([[c["train_loss"][s] for s in steps] for c in curves])
            loss = np.where(np.isfinite(loss) & (loss < 1e8), loss, np.nan)
            wall = np.array([[c["wall_s"].get(s, np.nan) for s in steps] for c in curves])
            mean = np.nanmean(loss, 0)
            kw = dict(color=colours(j % 10), lw=1.3, label=method)
            axes[i, 0].plot(steps, mean, **kw)
            axes[i, 0].fill_between(
                steps, np.nanmin(loss, 0), np.nanmax(loss, 0), color=colours(j % 10), alpha=0.2
            )
            w = np.nanmean(wall, 0)
            keep = w > 0
            axes[i, 1].plot(w[keep], mean[keep], **kw)
            axes[i, 1].fill_between(
                w[keep],
                np.nanmin(loss, 0)[keep],
                np.nanmax(loss, 0)[keep],
                color=colours(j % 10),
                alpha=0.2,
            )
        axes[i, 1].set_xscale("log")
        for ax, xlabel in zip(axes[i], ("step", "wall time (s, excl. compile)"), strict=True):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{setting}: train loss")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=min(5, max(1, len(labels))),
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(settings)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the sweep --------------------------------------------------------------------------------


def chosen_path(root, level):
    base = (root if root is not None else RESULTS) / EXPERIMENT
    return base / ("chosen.json" if level == "full" else f"{level}_chosen.json")


def _grid(method, name, level):
    if name == "rcond" and config.METHODS[method].get("granularity") == "primitive":
        name = "rcond_primitive"
    values = config.GRIDS[hp_type(method)].get(name)
    if values is None:
        return None
    limit = config.LEVELS[level]["grid_limit"]
    return tuple(values[:limit]) if limit else tuple(values)


def _second(method):
    """The name of the second swept hyperparameter of ``method`` (``None``: lr only)."""
    return {"exact": "damping", "kfac": "damping", "modular": "rcond"}.get(hp_type(method))


def _selection_metric(setting):
    reg = config.SETTINGS[setting]["family"] == "gaussian"
    return ("val_mse", False) if reg else ("val_accuracy", True)


def _hp_tag(hp):
    return json.dumps(hp, sort_keys=True)


def _sweep_point(ctx, setting, method, hp, steps, metric, tried):
    """Train ``hp`` on every sweep seed (or read the recorded runs); the mean score or ``None``.

    ``None`` when any seed's run was not ``ok`` (diverged, degenerate, error) or has no
    finite final ``metric``.
    """
    store, index, level = ctx["store"], ctx["index"], ctx["level"]
    tag = f"{setting}|{_hp_tag(hp)}"
    scores, bad = [], []
    for seed in config.LEVELS[level]["sweep_seeds"]:
        rid = f"{method}|{tag}|{seed}"
        if not store.done(method, tag, seed):
            try:
                rows, status, note, cfg = train(
                    setting,
                    method,
                    seed,
                    level,
                    hp,
                    cache=ctx["cache"],
                    verbose=ctx["verbose"],
                    steps=steps,
                    diagnostics=False,
                )
            except Exception as err:  # recorded, the sweep goes on
                rows, status, note, cfg = [], "error", f"{type(err).__name__}: {err}", {}
            store.record(method, tag, seed, rows, config=cfg, status=status, note=note[:500])
            index[rid] = [_num(r["value"]) for r in rows if r["metric"] == metric]
        info = store.runs[rid]
        vals = index.get(rid, [])
        if info["status"] != "ok" or not vals or not math.isfinite(vals[-1]):
            bad.append(info["status"])
        else:
            scores.append(vals[-1])
    score = float(np.mean(scores)) if not bad else None
    tried[_hp_tag(hp)] = {"hp": hp, "score": score, "failed": bad}
    return score


def run_sweep(level="full", root=None, fresh=False, verbose=True):
    """Two-stage validation sweep per (setting, method); write the winners to ``chosen.json``."""
    lvl = config.LEVELS[level]
    store = ResultStore(
        EXPERIMENT, f"{level}_sweep" if level != "full" else "sweep", root=root, fresh=fresh
    )
    skip_kfac = _kfac.kfac_unavailable()
    chosen = {"protocol": _protocol(level), "settings": {}}
    cache, index = {}, {}
    for r in store.rows():  # the selection metric of every run already recorded
        if r["metric"] in ("val_accuracy", "val_mse"):
            index.setdefault(r["run"], []).append(_num(r["value"]))
    for setting in lvl["settings"]:
        metric, higher = _selection_metric(setting)
        for method in lvl["methods"]:
            if hp_type(method) == "kfac" and skip_kfac:
                chosen["settings"].setdefault(setting, {})[method] = {"skipped": skip_kfac}
                continue
            full_steps, _ = run_length(setting, method, level)
            steps = max(2, int(round(full_steps * config.SWEEP["steps_fraction"])))
            base = dict(config.DEFAULTS[hp_type(method)])
            tried = {}

            ctx = dict(store=store, index=index, cache=cache, level=level, verbose=verbose)

            def evaluate(hp, _s=setting, _m=method, _n=steps, _t=tried, _x=metric, _c=ctx):
                return _sweep_point(_c, _s, _m, hp, _n, _x, _t)

            def better(a, b, _higher=higher):
                if a is None:
                    return False
                return b is None or (a > b if _higher else a < b)

            # Stage 1: the learning rate at the default second hyperparameter.
            best_hp, best = None, None
            lrs = _grid(method, "learning_rate", level)
            for lr in lrs:
                hp = dict(base, learning_rate=lr)
                s = evaluate(hp)
                if better(s, best):
                    best_hp, best = hp, s
            edges = []
            if (
                best_hp is not None
                and best_hp["learning_rate"] in (lrs[0], lrs[-1])
                and len(lrs) > 1
            ):
                edges.append("learning_rate")
            # Stage 2: the second hyperparameter at the chosen learning rate. When no
            # learning rate finished at the default second hyperparameter (the modular rule
            # at its default cut-off diverges on some settings), stage 2 is the joint grid:
            # every second value at every learning rate.
            second = _second(method)
            joint = second is not None and best_hp is None
            if second is not None:
                values = _grid(method, second, level)
                if base[second] not in values:
                    values = (*values, base[second])
                starts = [dict(base, learning_rate=lr) for lr in lrs] if joint else [best_hp]
                for start in starts:
                    for v in values:
                        hp = dict(start, **{second: v})
                        s = evaluate(hp)
                        if better(s, best):
                            best_hp, best = hp, s
                if (
                    joint
                    and best_hp is not None
                    and best_hp["learning_rate"] in (lrs[0], lrs[-1])
                    and len(lrs) > 1
                ):
                    edges.append("learning_rate")
            if second is not None and best_hp is not None:
                if (
                    second == "damping"
                    and len(values) > 1
                    and best_hp["damping"] in (min(values), max(values))
                ):
                    edges.append("damping")
                if second == "rcond":
                    for j, part in enumerate(("activation", "dense")):
                        opts = [v[j] for v in values]
                        nums = sorted({o for o in opts if o is not None})
                        if nums and best_hp["rcond"][j] == nums[-1]:
                            edges.append(f"rcond {part}")
            chosen["settings"].setdefault(setting, {})[method] = {
                "hp": best_hp,
                "score": best,
                "metric": metric,
                "edges": edges,
                "joint": joint,
                "steps": steps,
                "tried": list(tried.values()),
            }
            if verbose:
                print(
                    f"{setting:12s} {method:22s} {_fmt_hp(best_hp)}  {metric}={best}  "
                    f"edge: {', '.join(edges) or '-'}"
                )
    path = chosen_path(root, level)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chosen, indent=1, sort_keys=True) + "\n")
    text = sweep_table(chosen)
    path.with_name(path.stem + "_table.md").write_text(text + "\n")
    print(text)
    return chosen


def _protocol(level):
    lvl = config.LEVELS[level]
    return {
        "validation": {
            s: c.get("validation", config.VALIDATION) for s, c in config.SETTINGS.items()
        },
        "sweep_seeds": list(lvl["sweep_seeds"]),
        "reported_seeds": list(lvl["seeds"]),
        "steps_fraction": config.SWEEP["steps_fraction"],
        "selection": "final validation accuracy (classification) / MSE (regression), "
        "mean over sweep seeds; runs not ok on every seed excluded",
        "grids": {k: {n: list(v) for n, v in g.items()} for k, g in config.GRIDS.items()},
        "grid_limit": lvl["grid_limit"],
    }


def sweep_table(chosen):
    """Markdown: the winner per (setting, method), its score, and the grid edges it sits at."""
    lines = [
        "| setting | method | chosen | validation score | at grid edge | configurations |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting, methods in chosen["settings"].items():
        for method, c in methods.items():
            if "skipped" in c:
                lines.append(f"| {setting} | {method} | skipped: {c['skipped'][:80]} | | | |")
                continue
            score = "none finished" if c["score"] is None else f"{c['score']:.4g}"
            edge = ", ".join(c["edges"]) if c["edges"] else "no"
            lines.append(
                f"| {setting} | {method} | {_fmt_hp(c['hp'])} | {score} ({c['metric']}) | "
                f"{'**' + edge + '**' if c['edges'] else edge} | {len(c['tried'])} |"
            )
    return "\n".join(lines)


def load_chosen(root, level):
    """``(chosen hyperparameters per (setting, method), note)``; defaults without a sweep.

    Raises:
        FileNotFoundError: the full level without ``chosen.json`` (run ``--sweep`` first).
    """
    path = chosen_path(root, level)
    if path.exists():
        data = json.loads(path.read_text())
        return data["settings"], ""
    if level == "full":
        raise FileNotFoundError(
            f"{path} is missing: run `python -m experiments training --sweep` first; the "
            "full run takes its hyperparameters from the sweep."
        )
    return None, " (no sweep file: grid defaults, not validation-chosen)"


# ---- entry point -------------------------------------------------------------------------------


def main(level="quick", seeds=None, root=None, fresh=False, verbose=True, sweep=False):
    """Run the training comparison (or its sweep) at ``level``; see the README."""
    jax.config.update("jax_enable_x64", True)
    if sweep:
        return run_sweep(level=level, root=root, fresh=fresh, verbose=verbose)
    lvl = config.LEVELS[level]
    seeds = tuple(lvl["seeds"] if seeds is None else seeds)
    chosen, chosen_note = load_chosen(root, level)
    store = ResultStore(EXPERIMENT, level, root=root, fresh=fresh)
    skip_kfac = _kfac.kfac_unavailable()
    cache = {}
    for setting in lvl["settings"]:
        for method in lvl["methods"]:
            if chosen is None:
                hp = dict(config.DEFAULTS[hp_type(method)])
            else:
                entry = chosen.get(setting, {}).get(method, {})
                hp = entry.get("hp")
            for seed in seeds:
                if store.done(method, setting, seed):
                    continue
                t0 = time.perf_counter()
                if hp_type(method) == "kfac" and skip_kfac:
                    rows, status, note, cfg = [], "skipped", skip_kfac, {"hp": None}
                elif hp is None:
                    rows, status, note, cfg = [], "skipped", "no setting finished the sweep", {}
                else:
                    try:
                        rows, status, note, cfg = train(
                            setting, method, seed, level, hp, cache=cache, verbose=verbose
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
    methods = list(lvl["methods"])
    text = table(summarise(rows, runs), methods, chosen_note)
    base = (root if root is not None else RESULTS) / EXPERIMENT
    (base / f"{level}_table.md").write_text(text + "\n")
    plot(rows, runs, base / f"{level}_curves.png", methods)
    print(text)
    print(f"\nrows: {store.rows_path}\nplot: {base / f'{level}_curves.png'}")
    return text
