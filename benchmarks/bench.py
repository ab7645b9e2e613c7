"""Per-step cost of every natural-gradient route as a ratio to an SGD step timed in the same run.

Models: a 784-128-10 tanh MLP (float32) on MNIST-shaped random inputs, and the MNIST-1D
CNN of its authors' paper (Greydanus 2020: three 1-D convolutions of 25 channels, kernels
5, 3, 3, stride 2, padding 1, ReLU, a linear head 125 → 10; float32) on MNIST-1D data
generated locally by the ``mnist1d`` package; categorical outputs. Each route is one
jitted step (direction + parameter update); after warm-up the median of ``--reps`` calls
is taken, and every route is divided by the SGD step (``value_and_grad`` + update) of the
same model measured in the same process.

Usage::

    python benchmarks/bench.py                 # writes benchmarks/README.md and results.json
    python benchmarks/bench.py --quick         # fewer repetitions, prints only
    python benchmarks/bench.py --devices 4     # the batch sharded over 4 devices
    python benchmarks/bench.py --auto-grid     # solver="auto" against every fixed route

With ``--devices D`` each batch is sharded over a mesh of ``D`` devices (explicit axes);
on CPU these are forced host devices, which share the machine's cores: their times show
that the sharded program runs, not a speed-up. The device count is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path


def _devices_from_argv(argv) -> int:
    """``--devices D`` read before JAX starts (forced host devices must be set first)."""
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
    return 1


if __name__ == "__main__" and _devices_from_argv(sys.argv[1:]) > 1:
    _flag = f"--xla_force_host_platform_device_count={_devices_from_argv(sys.argv[1:])}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, PartitionSpec  # noqa: E402

import natchain as nc  # noqa: E402

HERE = Path(__file__).resolve().parent
LR = 0.1
DAMPING = 1e-3
CG_TOL = 1e-4
CG_MAXITER = 100


def init_mlp(key, widths=(784, 128, 10)):
    params = []
    for k, (a, b) in zip(
        jax.random.split(key, len(widths) - 1),
        zip(widths[:-1], widths[1:], strict=True),
        strict=True,
    ):
        params.append(
            {
                "W": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
                "b": jnp.zeros(b, jnp.float32),
            }
        )
    return params


def mlp(params, x):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["W"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


FAMILY = nc.Categorical()


def init_cnn(key, channels=25, kernels=(5, 3, 3), length=40, classes=10):
    """The MNIST-1D CNN's parameters (PyTorch-style uniform initialisation), NWC layout."""
    params, c_in = [], 1
    keys = jax.random.split(key, 2 * len(kernels) + 2)
    for i, k in enumerate(kernels):
        bound = 1.0 / np.sqrt(c_in * k)
        params.append(
            {
                "W": jax.random.uniform(
                    keys[2 * i], (k, c_in, channels), jnp.float32, -bound, bound
                ),
                "b": jax.random.uniform(keys[2 * i + 1], (channels,), jnp.float32, -bound, bound),
            }
        )
        c_in = channels
        length = (length + 2 - k) // 2 + 1
    fan_in = channels * length
    bound = 1.0 / np.sqrt(fan_in)
    params.append(
        {
            "W": jax.random.uniform(keys[-2], (fan_in, classes), jnp.float32, -bound, bound),
            "b": jax.random.uniform(keys[-1], (classes,), jnp.float32, -bound, bound),
        }
    )
    return params


def cnn(params, x):
    """``x``: ``(N, 40)`` MNIST-1D signals -> ``(N, 10)`` logits."""
    h = x[:, :, None]
    for layer in params[:-1]:
        h = jax.lax.conv_general_dilated(
            h, layer["W"], (2,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
        )
        h = jax.nn.relu(h + layer["b"])
    return h.reshape(h.shape[0], -1) @ params[-1]["W"] + params[-1]["b"]


def mnist1d_batch(n):
    """The first ``n`` training examples of MNIST-1D (generated locally, no download)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return jnp.asarray(data["x"][:n], jnp.float32), jnp.asarray(data["y"][:n])


def _update(params, direction):
    return jax.tree_util.tree_map(lambda p, d: p - LR * d, params, direction)


def sgd_step(model=mlp):
    loss = lambda p, x, y: jnp.mean(jax.vmap(FAMILY.nll)(model(p, x), y))

    @jax.jit
    def step(params, x, y):
        val, g = jax.value_and_grad(loss)(params, x, y)
        return _update(params, g), val, {}

    return step


def exact_step(solver, kind="true", num_samples=1, model=mlp, **opts):
    @jax.jit
    def step(params, x, y, key):
        sol = nc.natural_gradient(
            model,
            params,
            x,
            y,
            FAMILY,
            solver=solver,
            kind=kind,
            damping=DAMPING,
            key=key,
            num_samples=num_samples,
            **opts,
        )
        return _update(params, sol.value), None, sol.stats

    return step


def fvp_step():
    """One true-Fisher-vector product (applied to the gradient), for CG's per-step cost."""

    @jax.jit
    def step(params, x, y, key):
        fvp = nc.fisher_vp(mlp, params, x, FAMILY)
        return fvp(params), None, {}

    return step


def modular_step(granularity, model=mlp):
    if not hasattr(nc, "grad"):
        return None
    fn = nc.grad(model, FAMILY, method="modular", granularity=granularity)

    @jax.jit
    def step(params, x, y):
        return _update(params, fn(params, x, y)), None, {}

    return step


def routes():
    cg = dict(tol=CG_TOL, maxiter=CG_MAXITER)
    return {
        "one Fisher-vector product": fvp_step(),
        "gram (true Fisher)": exact_step("gram"),
        "gram_cg (true Fisher)": exact_step("gram_cg", tol=CG_TOL),
        "cg (true Fisher)": exact_step("cg", **cg),
        "cg (empirical Fisher)": exact_step("cg", kind="empirical", **cg),
        "cg (MC Fisher, 1 sample)": exact_step("cg", kind="mc", num_samples=1, **cg),
        "cg (MC Fisher, 5 samples)": exact_step("cg", kind="mc", num_samples=5, **cg),
        "modular, layer granularity": modular_step("layer"),
        "modular, primitive granularity": modular_step("primitive"),
    }


def cnn_routes():
    cg = dict(tol=CG_TOL, maxiter=CG_MAXITER)
    return {
        "gram (true Fisher)": exact_step("gram", model=cnn),
        "gram_cg (true Fisher)": exact_step("gram_cg", model=cnn, tol=CG_TOL),
        "cg (true Fisher)": exact_step("cg", model=cnn, **cg),
        "modular, layer granularity": modular_step("layer", model=cnn),
        "modular, primitive granularity": modular_step("primitive", model=cnn),
    }


def time_call(fn, args, reps):
    out = fn(*args)
    jax.block_until_ready(out)  # compile and warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _mesh(devices):
    if devices > jax.device_count():
        raise SystemExit(f"--devices {devices}: only {jax.device_count()} devices available")
    return jax.make_mesh(
        (devices,), ("batch",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:devices]
    )


def run(batches, reps, devices=1):
    if devices == 1:  # the plain single-device program, no mesh
        return _run(batches, reps, devices)
    with jax.set_mesh(_mesh(devices)):
        return _run(batches, reps, devices)


def _run(batches, reps, devices):
    key = jax.random.PRNGKey(0)
    params = init_mlp(key)
    rows = []
    for n in batches:
        if n % devices:
            print(f"batch {n:4d}  skipped: not divisible by {devices} devices", flush=True)
            continue
        kx, ky, kk = jax.random.split(jax.random.fold_in(key, n), 3)
        x = jax.random.normal(kx, (n, 784), jnp.float32)
        y = jax.random.randint(ky, (n,), 0, 10)
        if devices > 1:
            x, y = (jax.device_put(a, PartitionSpec("batch")) for a in (x, y))
        t_sgd, _ = time_call(sgd_step(), (params, x, y), reps)
        new = _time_routes("mlp", n, routes(), params, x, y, kk, t_sgd, reps)
        rows += [dict(r, devices=devices) for r in new]
    return rows


def _time_routes(model_name, n, steps, params, x, y, key, t_sgd, reps):
    rows = [dict(model=model_name, batch=n, route="SGD step", seconds=t_sgd, ratio=1.0, steps=None)]
    print(f"{model_name}  batch {n:4d}  SGD step {t_sgd * 1e3:8.3f} ms", flush=True)
    for name, step in steps.items():
        if step is None:
            continue
        args = (params, x, y, key) if "modular" not in name else (params, x, y)
        t, out = time_call(step, args, reps)
        stats = out[2] or {}
        steps_taken = int(stats["num_steps"]) if "num_steps" in stats else None
        row = dict(model=model_name, batch=n, route=name, seconds=t, ratio=t / t_sgd)
        row["steps"] = steps_taken
        if "structured_params" in stats:
            row["structured_params"] = int(stats["structured_params"])
        rows.append(row)
        extra = f"  ({steps_taken} CG steps)" if steps_taken is not None else ""
        if "structured_params" in row:
            extra += f"  (structured {row['structured_params']} of {_num_params(params)})"
        print(
            f"{model_name}  batch {n:4d}  {name:32s} {t * 1e3:8.3f} ms  {t / t_sgd:7.1f}× SGD"
            + extra,
            flush=True,
        )
    return rows


def _num_params(params):
    return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))


def run_cnn(batch, reps):
    """The MNIST-1D CNN rows, at one batch size."""
    key = jax.random.PRNGKey(1)
    params = init_cnn(key)
    x, y = mnist1d_batch(batch)
    t_sgd, _ = time_call(sgd_step(cnn), (params, x, y), reps)
    return _time_routes("mnist1d cnn", batch, cnn_routes(), params, x, y, key, t_sgd, reps)


def git_revision():
    """``{"commit", "dirty"}`` of the checkout the benchmark runs from."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}


def _load_note(load) -> str:
    """``"; the machine was shared, …"`` where the 1-minute load average exceeded the cores."""
    try:
        first = float(str(load).split(",")[0])
    except ValueError:
        return ""
    if first > (os.cpu_count() or 1):
        return "; the machine was shared, so single times are noisy and ratios indicative"
    return ""


def measured_on(env) -> str:
    rev = env.get("git")
    parts = [f"{k} {v}" for k, v in env.items() if k != "git"]
    if rev:
        dirty = " (with uncommitted changes)" if rev["dirty"] else ""
        parts.append(f"git {rev['commit'][:12]}{dirty}")
    return "Measured on: " + ", ".join(parts)


def environment(devices=1):
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:  # pragma: no cover - informational only
        jaxlib_version = "?"
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "numpy": np.__version__,
        "natchain": nc.__version__,
        "device": str(jax.devices()[0]),
        "load_average": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "devices": devices,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git": git_revision(),
    }


PEER_BEGIN, PEER_END = "<!-- peer:begin -->", "<!-- peer:end -->"


def _table(rows):
    batches = sorted({r["batch"] for r in rows})
    names = list(dict.fromkeys(r["route"] for r in rows))
    cell = {(r["route"], r["batch"]): r for r in rows}
    lines = [
        "| route | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name in names:
        cells = []
        for b in batches:
            r = cell.get((name, b))
            if r is None:
                cells.append("—")
            elif name == "SGD step":
                cells.append(f"{r['seconds'] * 1e3:.3f} ms")
            else:
                s = f" ({r['steps']})" if r.get("steps") is not None else ""
                cells.append(f"{r['ratio']:.1f}×{s}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _peer_section(path, begin=PEER_BEGIN, end=PEER_END):
    """The text between two markers of an existing README (kept on regeneration)."""
    if not path.exists():
        return None
    text = path.read_text()
    if begin in text and end in text:
        start = text.index(begin)
        return text[start : text.index(end, start) + len(end)]
    return None


# --------------------------------------------------------------------------- auto grid

AUTO_BEGIN, AUTO_END = "<!-- auto-grid:begin -->", "<!-- auto-grid:end -->"
#: MLP widths of the grid: P ≈ 1.2e3, 9.6e3, 3.4e4, 1.0e5.
AUTO_WIDTHS = ((64, 16, 10), (64, 128, 10), (256, 128, 10), (784, 128, 10))
AUTO_BATCHES = (8, 32, 128, 512)


def _time_interleaved(fns, reps, budget_s):
    """Best time of each callable, called round-robin (so load spikes hit them all).

    Each gets up to ``reps`` calls after a warm-up call, fewer once its own calls have
    taken ``budget_s`` in all (the slowest routes at the largest sizes).
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(fns, float("inf"))
    spent = dict.fromkeys(fns, 0.0)
    for _ in range(reps):
        for name, fn in fns.items():
            if spent[name] > budget_s:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            dt = time.perf_counter() - t0
            best[name], spent[name] = min(best[name], dt), spent[name] + dt
    return best


def auto_grid(reps, widths=AUTO_WIDTHS, batches=AUTO_BATCHES, budget_s=3.0):
    """Every fixed exact route and ``solver="auto"`` on a grid of (N, P): best-of times."""
    from natchain._solvers._base import DEFAULT_MAX_PARAMS
    from natchain._solvers.auto import ROUTES

    fam = nc.Categorical()
    rows = []
    for w in widths:
        params = init_mlp(jax.random.PRNGKey(0), w)
        p = _num_params(params)
        for n in batches:
            kx, ky = jax.random.split(jax.random.PRNGKey(n))
            x = jax.random.normal(kx, (n, w[0]), jnp.float32)
            y = jax.random.randint(ky, (n,), 0, w[-1])
            routes = ["gram", "gram_cg", "cg", "auto"]
            if p <= DEFAULT_MAX_PARAMS:
                routes = ["cholesky", "pinv", *routes]
            fns, info = {}, {}
            for route in routes:
                solve = jax.jit(
                    lambda p_, x_, y_, route=route: nc.natural_gradient(
                        mlp, p_, x_, y_, fam, solver=route, damping=DAMPING
                    )[::2]
                )
                fns[route] = partial(solve, params, x, y)
                st = fns[route]()[1]
                info[route] = int(st["result"])
                if route == "auto":
                    info["choice"] = ROUTES[int(st["route"])]
            times = _time_interleaved(fns, reps, budget_s)
            fixed = {k: v for k, v in times.items() if k != "auto"}
            best = min(fixed, key=fixed.get)
            worst = max(fixed, key=fixed.get)
            row = {
                "widths": list(w),
                "P": p,
                "N": n,
                "times_ms": {k: 1e3 * v for k, v in times.items()},
                "results": {k: v for k, v in info.items() if k != "choice"},
                "auto_choice": info["choice"],
                "best": best,
                "auto_over_best": times["auto"] / fixed[best],
                "auto_over_worst": times["auto"] / fixed[worst],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def auto_section(rows, env, reps):
    """The generated README section of the auto grid."""
    names = ["cholesky", "pinv", "gram", "gram_cg", "cg"]
    lines = [
        AUTO_BEGIN,
        '## `solver="auto"` against every fixed route',
        "",
        "Generated by `python benchmarks/bench.py --auto-grid` — do not edit by hand.",
        "",
        "Bare jitted `natural_gradient` (value and statistics) of tanh MLPs of the widths",
        f"shown, float32, categorical, damping {DAMPING:g}, every solver at its defaults; best of",
        f"up to {reps} calls after warm-up, the routes called in turn (milliseconds; a route's",
        "calls stop after 3 s in all). The dense routes run where P ≤ 8192 only. `auto`",
        "compiles to the program of the route it chose. `auto / best` is auto's time over the",
        "fastest fixed route at that point, `auto / worst` over the slowest; a route whose",
        "result was not `successful` is marked `*`.",
        "",
        "| widths | P | N | "
        + " | ".join(names)
        + " | auto (choice) | auto / best | auto / worst |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]

    def cell(row, k):
        if k not in row["times_ms"]:
            return "—"
        mark = "" if row["results"][k] == 0 else "*"
        return f"{row['times_ms'][k]:.3g}{mark}"

    for row in rows:
        lines.append(
            f"| {'-'.join(map(str, row['widths']))} | {row['P']} | {row['N']} | "
            + " | ".join(cell(row, k) for k in names)
            + f" | {cell(row, 'auto')} ({row['auto_choice']}) | {row['auto_over_best']:.2f} |"
            + f" {row['auto_over_worst']:.2g} |"
        )
    ratios = [r["auto_over_best"] for r in rows]
    lines += [
        "",
        f"auto / best: median {statistics.median(ratios):.2f}, largest {max(ratios):.2f} over "
        f"{len(rows)} points; auto picked the fastest route at "
        f"{sum(r['auto_choice'] == r['best'] for r in rows)} of them.",
        f"Load average (1, 5, 15 min) at the start: {env.get('load_average')}"
        f"{_load_note(env.get('load_average'))}. {measured_on(env)}.",
        AUTO_END,
    ]
    return "\n".join(lines)


def write_auto_section(rows, env, reps):
    path = HERE / "README.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = auto_section(rows, env, reps)
    old = _peer_section(path, AUTO_BEGIN, AUTO_END)
    text = text.replace(old, section) if old else text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def write_readme(rows, env, reps):
    mlp_rows = [r for r in rows if r.get("model", "mlp") == "mlp"]
    cnn_rows = [r for r in rows if r.get("model") == "mnist1d cnn"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/bench.py` — do not edit by hand.",
        "",
        "Per-step time of each route as a ratio to a jitted SGD step (value-and-grad plus update)",
        "timed in the same process: a 784-128-10 tanh MLP, float32, MNIST-shaped random inputs,",
        f"categorical outputs; damping {DAMPING:g}; CG to relative residual {CG_TOL:g} (cap",
        f"{CG_MAXITER} steps, steps taken in brackets); median of {reps} calls after warm-up.",
        "One CG step costs about one Fisher-vector product (its own row) plus vector updates;",
        "the gram route's cost is dominated by the Cholesky factorisation of its",
        "N·(m−1) × N·(m−1) system; gram_cg solves that system by block-Jacobi-preconditioned",
        "CG (steps in brackets), one product with it per step. How the costs grow with batch",
        "size and width:",
        "`python -m experiments cost` (results/cost/).",
        *(
            [
                f"The batch is sharded over {env['devices']} devices; on CPU these are forced "
                "host devices sharing the machine's cores,",
                "so the times show correctness, not speed.",
            ]
            if env.get("devices", 1) > 1
            else []
        ),
        "",
        *_table(mlp_rows),
    ]
    if cnn_rows:
        p_cnn = _num_params(init_cnn(jax.random.PRNGKey(1)))
        structured = [
            r for r in cnn_rows if "structured_params" in r and r["route"] == "gram (true Fisher)"
        ]
        lines += [
            "",
            "## MNIST-1D CNN",
            "",
            "The CNN of the MNIST-1D paper (three 1-D convolutions of 25 channels, kernels 5, 3,",
            f"3, stride 2, padding 1, ReLU, linear head; P = {p_cnn}), float32, on the first",
            "examples of the locally generated MNIST-1D training set; same damping and CG",
            "settings.",
            "",
            *_table(cnn_rows),
        ]
        if structured:
            lines += [
                "",
                "Parameters the gram route builds from per-layer structure: "
                + ", ".join(
                    f"{r['structured_params']} of {p_cnn} (batch {r['batch']})" for r in structured
                )
                + ".",
            ]
    load = env.get("load_average")
    if load:
        lines += [
            "",
            f"Load average (1, 5, 15 min) at the start of the run: {load}{_load_note(load)}.",
        ]
    lines += ["", measured_on(env) + ".", ""]
    for begin, end in ((PEER_BEGIN, PEER_END), (AUTO_BEGIN, AUTO_END)):
        kept = _peer_section(HERE / "README.md", begin, end)
        if kept is not None:
            lines += [kept, ""]
    (HERE / "README.md").write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[2, 32, 128])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="5 repetitions, print only")
    parser.add_argument("--cnn-batch", type=int, default=32, help="MNIST-1D CNN batch (0: skip)")
    parser.add_argument(
        "--devices", type=int, default=1, help="shard each batch over this many devices"
    )
    parser.add_argument(
        "--auto-grid",
        action="store_true",
        help="time every fixed route and solver='auto' on a grid of (N, P) instead",
    )
    parser.add_argument("--allow-dirty", action="store_true", help="record from a dirty tree")
    args = parser.parse_args(argv)
    reps = 5 if args.quick else args.reps
    if not args.quick and git_revision()["dirty"] and not args.allow_dirty:
        raise SystemExit("uncommitted changes: commit first, or pass --allow-dirty.")
    if args.auto_grid:
        env = environment(args.devices)
        rows = auto_grid(reps)
        if not args.quick:
            (HERE / "auto_grid.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
            write_auto_section(rows, env, reps)
        return
    env_start = environment(args.devices)  # the load average before the run
    rows = run(args.batches, reps, args.devices)
    if args.cnn_batch:
        rows += run_cnn(args.cnn_batch, reps)
    if not args.quick:
        env = env_start
        (HERE / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        write_readme(rows, env, reps)


if __name__ == "__main__":
    main()
