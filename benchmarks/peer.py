"""natchain's optimiser steps beside optax and kfac-jax, all timed in one process.

Every route is one full jitted optimiser step (loss gradient, direction, parameter
update) on the same batch, timed after warm-up in interleaved rounds (median over
``--reps`` rounds) and divided by the optax SGD step timed in the same rounds:

- optax SGD and Adam;
- natchain's exact routes through :func:`natchain.scale_by_natural_gradient` (``gram``,
  ``cg`` with its default settings, and ``cholesky``/``pinv`` where the model has few
  enough parameters for a dense ``P × P`` Fisher);
- the natural chain rule (``method="modular"``) at layer and primitive granularity;
- ``kfac_jax.Optimizer`` with its inverse recomputed every step and every 10 steps;
- the bare solves (``natural_gradient`` / ``natchain.grad`` under ``jax.jit``) and an
  eager ``natural_gradient`` call, to separate the optimiser's and the call's overheads.

Models: a 784-128-10 tanh MLP on MNIST-shaped random inputs, and the MNIST-1D CNN
(three 1-D convolutions of 25 channels, kernel 5, stride 2, ReLU, linear head) on data
generated locally by ``mnist1d``. Both float32, categorical outputs, damping 1e-3.

Usage (kfac-jax needs the ``kfac`` extra: ``pip install -e ".[kfac]"``)::

    python benchmarks/peer.py                  # measure; write peer.json and the README section
    python benchmarks/peer.py --quick          # a small run, printed only
    python benchmarks/peer.py --write-readme   # regenerate the README section from peer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import natchain as nc
from natchain._modular._rules.conv import BLOCK_LIMIT
from natchain._solvers._base import DEFAULT_MAX_PARAMS

# The MLP is bench.py's (one builder for every benchmark); run as a script, the repository
# root is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench import git_revision, init_mlp, mlp  # noqa: E402
from experiments import _kfac  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "peer.json"
README = HERE / "README.md"
BEGIN, END = "<!-- peer:begin -->", "<!-- peer:end -->"

LR = 0.1
ADAM_LR = 1e-3
DAMPING = 1e-3
BATCHES = (32, 128, 512)
FAMILY = nc.Categorical()
KFAC_PERIODS = (1, 10)
#: kfac-jax's settings, all explicit: a fixed learning rate, no momentum and a fixed
#: damping (none of its adaptive rules, which cost extra curvature products), its default
#: curvature estimator and moving average.
KFAC_SETTINGS = {
    "l2_reg": 0.0,
    "use_adaptive_learning_rate": False,
    "learning_rate": LR,
    "use_adaptive_momentum": False,
    "momentum": 0.0,
    "use_adaptive_damping": False,
    "damping": DAMPING,
    "estimation_mode": "ggn_curvature_prop",
    "curvature_ema": 0.95,
    "curvature_update_period": 1,
    "num_burnin_steps": 0,
    "norm_constraint": None,
}
#: A call slower than this (seconds) is timed once more only, however many reps were asked.
SLOW_CALL = 2.0


# --------------------------------------------------------------------------- models


#: MNIST-1D's signal length.
MNIST1D_LENGTH = 40


def cnn_out_length(length, layers=3, kernel=5, stride=2, pad=1):
    """Length of the signal after ``layers`` strided convolutions."""
    for _ in range(layers):
        length = (length + 2 * pad - kernel) // stride + 1
    return length


def init_cnn(key, channels=25, length=MNIST1D_LENGTH, classes=10, kernel=5):
    """The MNIST-1D CNN's parameters (He-scaled convolutions, ``1/fan_in`` head)."""
    keys = jax.random.split(key, 4)
    conv = []
    for k, c_in in zip(keys[:3], (1, channels, channels), strict=True):
        w = jax.random.normal(k, (1, kernel, c_in, channels), jnp.float32)
        conv.append({"w": w * np.sqrt(2.0 / (kernel * c_in)), "b": jnp.zeros(channels)})
    flat = channels * cnn_out_length(length)
    head = {
        "W": jax.random.normal(keys[3], (flat, classes), jnp.float32) / np.sqrt(flat),
        "b": jnp.zeros(classes, jnp.float32),
    }
    return {"conv": conv, "head": head}


def cnn(params, x):
    """Logits of the MNIST-1D CNN; ``x`` is ``(N, 1, length, 1)``.

    The 1-D convolutions (stride 2, padding 1) are written as 2-D ones over a unit
    height axis: the same function, in the form kfac-jax's graph matcher registers as
    convolution layers (it would treat 1-D convolutions' weights as unstructured).
    """
    h = x
    for layer in params["conv"]:
        h = jax.lax.conv_general_dilated(
            h, layer["w"], (1, 2), ((0, 0), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + layer["b"])
    h = h.reshape(h.shape[0], -1)
    return h @ params["head"]["W"] + params["head"]["b"]


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmark model: how to build it and a batch for it."""

    name: str
    description: str
    apply: Callable
    init: Callable
    batch: Callable  # (n, key) -> (x, y)
    options: dict = dataclasses.field(default_factory=dict)  # for method="modular"


def mlp_batch(n, key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, 784), jnp.float32), jax.random.randint(ky, (n,), 0, 10)


_MNIST1D = {}


def mnist1d_batch(n, key):
    """The first ``n`` training examples of MNIST-1D (generated locally, standard settings)."""
    del key
    if "data" not in _MNIST1D:
        from mnist1d.data import get_dataset_args, make_dataset

        _MNIST1D["data"] = make_dataset(get_dataset_args())
    data = _MNIST1D["data"]
    if n > len(data["y"]):
        raise ValueError(f"MNIST-1D has {len(data['y'])} training examples; asked for {n}.")
    x = jnp.asarray(data["x"][:n], jnp.float32)[:, None, :, None]
    return x, jnp.asarray(data["y"][:n], jnp.int32)


MODELS = {
    "mlp": Model(
        "mlp",
        "784-128-10 tanh MLP, MNIST-shaped random inputs",
        mlp,
        init_mlp,
        mlp_batch,
    ),
    "cnn": Model(
        "cnn",
        "MNIST-1D CNN (3 × conv 25 ch, kernel 5, stride 2, ReLU; linear head), MNIST-1D data",
        cnn,
        init_cnn,
        mnist1d_batch,
        # convolution has no natural rule of its own: its local Jacobian is materialised
        options={"fallback": "generic"},
    ),
}


def mean_nll(model, params, x, y):
    return jnp.mean(jax.vmap(FAMILY.nll)(model.apply(params, x), y))


def num_params(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------- routes


@dataclasses.dataclass
class Timed:
    """One route, ready to time.

    Attributes:
        call: runs ``steps`` optimiser steps and returns something to block on.
        steps: optimiser steps per call (time per step = call time / steps).
        compiled: the compiled program of one step, for its memory analysis.
        stats: reads statistics (e.g. CG steps) from the value ``call`` returned.
    """

    call: Callable[[], Any]
    steps: int = 1
    compiled: Any = None
    stats: Callable[[Any], dict] | None = None


def _aot(fn, *args):
    """Compile ``fn`` for ``args`` ahead of time; returns the compiled executable."""
    return jax.jit(fn).lower(*args).compile()


def optax_route(opt_fn):
    def build(model, params, x, y, key):
        opt = opt_fn()
        state = opt.init(params)

        def step(params, state, x, y):
            grads = jax.grad(partial(mean_nll, model))(params, x, y)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        compiled = _aot(step, params, state, x, y)
        return Timed(lambda: compiled(params, state, x, y), compiled=compiled)

    return build


def natchain_route(**transform):
    def build(model, params, x, y, key):
        opts = dict(model.options) if transform.get("method") == "modular" else {}
        damping = {} if transform.get("method") == "modular" else {"damping": DAMPING}
        opt = optax.chain(
            nc.scale_by_natural_gradient(model.apply, FAMILY, **damping, **transform, **opts),
            optax.scale(-LR),
        )
        state = opt.init(params)

        def step(params, state, x, y, key):
            grads = jax.grad(partial(mean_nll, model))(params, x, y)
            updates, state = opt.update(grads, state, params, x=x, y=y, key=key)
            return optax.apply_updates(params, updates), state

        compiled = _aot(step, params, state, x, y, key)

        def stats(out):
            info = out[1][0].info
            steps = int(info["num_steps"])
            return {"cg_steps": steps, "residual": float(info["residual"])} if steps >= 0 else {}

        return Timed(lambda: compiled(params, state, x, y, key), compiled=compiled, stats=stats)

    return build


def bare_exact(solver):
    def build(model, params, x, y, key):
        def solve(params, x, y):
            sol = nc.natural_gradient(
                model.apply, params, x, y, FAMILY, solver=solver, damping=DAMPING
            )
            return sol.value, sol.stats

        compiled = _aot(solve, params, x, y)

        def stats(out):
            st = out[1]
            if "num_steps" not in st:
                return {}
            return {"cg_steps": int(st["num_steps"]), "residual": float(st["residual"])}

        return Timed(lambda: compiled(params, x, y), compiled=compiled, stats=stats)

    return build


def eager_exact(solver):
    def build(model, params, x, y, key):
        def call():
            return nc.natural_gradient(
                model.apply, params, x, y, FAMILY, solver=solver, damping=DAMPING
            ).value

        return Timed(call)

    return build


def bare_modular(granularity):
    def build(model, params, x, y, key):
        fn = nc.grad(
            model.apply, FAMILY, method="modular", granularity=granularity, **model.options
        )
        compiled = _aot(fn, params, x, y)
        return Timed(lambda: compiled(params, x, y), compiled=compiled)

    return build


def kfac_optimizer(model, period):
    """``kfac_jax.Optimizer`` on the model's loss with :data:`KFAC_SETTINGS`."""
    return _kfac.kfac_optimizer(model.apply, FAMILY, period, KFAC_SETTINGS)


def kfac_route(period):
    def build(model, params, x, y, key):
        opt, _ = kfac_optimizer(model, period)
        batch = (x, y)
        # kfac-jax donates its parameters and state: each call carries them on, and one
        # call is ``period`` steps so that every call holds exactly one inverse update.
        carry = {"params": jax.tree_util.tree_map(jnp.copy, params), "step": 0}
        carry["state"] = opt.init(carry["params"], key, batch)
        keys = list(jax.random.split(key, 4096))

        def call():
            for _ in range(period):
                i = carry["step"]
                carry["params"], carry["state"], _ = opt.step(
                    carry["params"],
                    carry["state"],
                    keys[i % len(keys)],
                    batch=batch,
                    global_step_int=i,
                )
                carry["step"] = i + 1
            return carry["params"]

        def one_step(p, st, rng, b):
            return opt.step(p, st, rng, batch=b, global_step_int=1)[:2]

        try:
            compiled = jax.jit(one_step).lower(params, carry["state"], key, batch).compile()
        except Exception:  # memory analysis only; the timed path is kfac-jax's own
            compiled = None
        return Timed(call, steps=period, compiled=compiled)

    return build


@dataclasses.dataclass(frozen=True)
class Route:
    """A row of the table: its label, its group and how to build it."""

    label: str
    group: str
    build: Callable
    needs: str | None = None  # "dense": only where P ≤ natchain's dense limit; "kfac"


ROUTES = [
    Route("optax SGD", "baseline", optax_route(lambda: optax.sgd(LR))),
    Route("optax Adam", "baseline", optax_route(lambda: optax.adam(ADAM_LR))),
    Route("natchain exact, gram", "natchain", natchain_route(solver="gram")),
    Route("natchain exact, gram_cg", "natchain", natchain_route(solver="gram_cg")),
    Route("natchain exact, cg (defaults)", "natchain", natchain_route(solver="cg")),
    Route("natchain exact, pcg", "natchain", natchain_route(solver="pcg")),
    Route("natchain exact, auto", "natchain", natchain_route(solver="auto")),
    Route("natchain exact, cholesky", "natchain", natchain_route(solver="cholesky"), "dense"),
    Route("natchain exact, pinv", "natchain", natchain_route(solver="pinv"), "dense"),
    Route("natchain modular, layer", "natchain", natchain_route(method="modular")),
    Route(
        "natchain modular, primitive",
        "natchain",
        natchain_route(method="modular", granularity="primitive"),
    ),
    Route(
        "natchain modular, layer, stats='minimal'",
        "natchain",
        natchain_route(method="modular", stats="minimal"),
    ),
    Route(
        "natchain modular, primitive, stats='minimal'",
        "natchain",
        natchain_route(method="modular", granularity="primitive", stats="minimal"),
    ),
    Route("kfac-jax, inverse every step", "kfac-jax", kfac_route(1), "kfac"),
    Route("kfac-jax, inverse every 10 steps", "kfac-jax", kfac_route(10), "kfac"),
    Route("bare solve, gram (jit)", "bare", bare_exact("gram")),
    Route("bare solve, gram_cg (jit)", "bare", bare_exact("gram_cg")),
    Route("bare solve, cg (jit)", "bare", bare_exact("cg")),
    Route("bare solve, pcg (jit)", "bare", bare_exact("pcg")),
    Route("bare solve, cholesky (jit)", "bare", bare_exact("cholesky"), "dense"),
    Route("bare modular, layer (jit)", "bare", bare_modular("layer")),
    Route("bare modular, primitive (jit)", "bare", bare_modular("primitive")),
    Route("eager natural_gradient, gram", "bare", eager_exact("gram")),
    Route("eager natural_gradient, cg", "bare", eager_exact("cg")),
]
#: Optimiser step → the bare computation it wraps, for the overhead table.
OVERHEADS = [
    ("gram: optimiser step / jitted solve", "natchain exact, gram", "bare solve, gram (jit)"),
    (
        "gram_cg: optimiser step / jitted solve",
        "natchain exact, gram_cg",
        "bare solve, gram_cg (jit)",
    ),
    ("cg: optimiser step / jitted solve", "natchain exact, cg (defaults)", "bare solve, cg (jit)"),
    (
        "cholesky: optimiser step / jitted solve",
        "natchain exact, cholesky",
        "bare solve, cholesky (jit)",
    ),
    (
        "modular, layer: optimiser step / jitted grad",
        "natchain modular, layer",
        "bare modular, layer (jit)",
    ),
    (
        "modular, primitive: optimiser step / jitted grad",
        "natchain modular, primitive",
        "bare modular, primitive (jit)",
    ),
    ("gram: eager call / jitted solve", "eager natural_gradient, gram", "bare solve, gram (jit)"),
    ("cg: eager call / jitted solve", "eager natural_gradient, cg", "bare solve, cg (jit)"),
]


def kfac_available():
    try:
        import kfac_jax  # noqa: F401
    except Exception as err:  # ImportError, or kfac-jax failing on this jax
        return f"kfac-jax unavailable: {type(err).__name__}: {err}"
    return None


def skip_reason(route, model, params, n, skip_kfac):
    """Why ``route`` is not timed on ``model`` at batch ``n`` (``None``: it is)."""
    if route.needs == "dense" and num_params(params) > DEFAULT_MAX_PARAMS:
        return f"P = {num_params(params)} > {DEFAULT_MAX_PARAMS}, natchain's dense limit"
    if route.needs == "kfac" and skip_kfac:
        return skip_kfac
    if model.name == "cnn" and "modular" in route.label and n > 32:
        return (
            "timed at B = 32 only: the convolution's layer rule factors a patch Gram "
            f"matrix of N·positions rows ({cnn_out_length(MNIST1D_LENGTH, layers=1)} "
            "positions in the first layer), a cost growing as N³, refused above "
            f"BLOCK_LIMIT = {BLOCK_LIMIT} rows"
        )
    if route.label.endswith("pinv"):
        return (
            "the dense eigendecomposition of the P × P Fisher is too slow to time here "
            "(the cholesky row shows the dense route's cost)"
        )
    limit = LIMITS.get((model.name, route.label))
    if limit is not None and n > limit[0]:
        return f"timed up to B = {limit[0]} only: {limit[1]}"
    return None


_DENSE = "the P × P factorisation dominates and does not depend on N"
_OPTIMISER_ROW = "the optimiser row times the route at every batch size"
#: Routes too slow to time at every batch size in a bounded run: (largest batch, why).
LIMITS = {
    ("cnn", "natchain exact, cholesky"): (32, _DENSE),
    ("cnn", "bare solve, cholesky (jit)"): (32, _DENSE),
    ("cnn", "bare solve, gram (jit)"): (32, _OPTIMISER_ROW),
    ("cnn", "bare solve, gram_cg (jit)"): (32, _OPTIMISER_ROW),
    ("cnn", "eager natural_gradient, gram"): (32, _OPTIMISER_ROW),
}


# --------------------------------------------------------------------------- timing


def memory_bytes(compiled):
    """Peak bytes of one compiled step by XLA's analysis: arguments + outputs + temporaries."""
    if compiled is None:
        return None
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    except Exception:  # not every backend reports it
        return None


def _timed_call(timed):
    t0 = time.perf_counter()
    out = jax.block_until_ready(timed.call())
    return (time.perf_counter() - t0) / timed.steps, out


def time_interleaved(built, rounds):
    """Per-step times of every built route, measured in interleaved rounds.

    Each route is called twice first (compilation where it was not ahead of time, then
    warm-up); then each round calls every route once in turn, so that a change of the
    machine's load during the run falls on all routes alike. A route whose warm-up call
    took longer than :data:`SLOW_CALL` keeps that one time only.

    Returns:
        ``{label: (times, last output)}``.
    """
    result = {}
    for label, timed in built.items():
        jax.block_until_ready(timed.call())
        sec, out = _timed_call(timed)
        result[label] = ([sec], out, sec * timed.steps >= SLOW_CALL)
    for label in result:
        if not result[label][2]:
            result[label] = ([], *result[label][1:])
    for _ in range(rounds):
        for label, timed in built.items():
            times, _, slow = result[label]
            if not slow:
                sec, out = _timed_call(timed)
                result[label] = (times + [sec], out, slow)
    return {label: (times, out) for label, (times, out, _) in result.items()}


def reps_for(n, reps):
    return reps[min(BATCHES.index(n) if n in BATCHES else len(reps) - 1, len(reps) - 1)]


def run(models, batches, reps, skip_kfac, only=None):
    """Time every route on every model and batch size; one row per (model, batch, route)."""
    rows = []
    key = jax.random.PRNGKey(0)
    for name in models:
        model = MODELS[name]
        params = model.init(jax.random.fold_in(key, 1))
        for n in batches:
            x, y = model.batch(n, jax.random.fold_in(key, n))
            step_key = jax.random.fold_in(key, 7)
            load = os.getloadavg()[0]
            table, built = [], {}
            for route in ROUTES:
                if only and route.label != "optax SGD" and not any(o in route.label for o in only):
                    continue
                row = {"model": name, "batch": n, "route": route.label, "group": route.group}
                row["P"] = num_params(params)
                reason = skip_reason(route, model, params, n, skip_kfac)
                if reason is None:
                    try:
                        built[route.label] = route.build(model, params, x, y, step_key)
                    except Exception as err:  # recorded, not hidden
                        reason = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                if reason is not None:
                    row["skipped"] = reason
                table.append(row)
            measured = time_interleaved(built, reps_for(n, reps))
            sgd = statistics.median(measured["optax SGD"][0])
            for row in table:
                if row["route"] not in measured:
                    continue
                timed = built[row["route"]]
                times, out = measured[row["route"]]
                sec = statistics.median(times)
                row.update(seconds=sec, ratio=sec / sgd, times=times, steps_per_call=timed.steps)
                row["memory_bytes"] = memory_bytes(timed.compiled)
                if timed.stats is not None:
                    row.update(timed.stats(out))
            for row in table:
                print(_format_row(row), flush=True)
            rows += table
            load_end = os.getloadavg()[0]
            rows.append(
                {
                    "model": name,
                    "batch": n,
                    "route": "load",
                    "load_start": load,
                    "load_end": load_end,
                }
            )
            del built, measured
    return rows


def _format_row(row):
    head = f"{row['model']:4s} B={row['batch']:4d} {row['route']:36s}"
    if "skipped" in row:
        return f"{head} — {row['skipped']}"
    mem = row.get("memory_bytes")
    mem = f"{mem / 2**20:8.1f} MiB" if mem is not None else " " * 12
    extra = f"  ({row['cg_steps']} CG steps)" if "cg_steps" in row else ""
    return f"{head} {row['seconds'] * 1e3:10.3f} ms {row['ratio']:8.1f}× SGD {mem}{extra}"


# --------------------------------------------------------------------------- checks


def _flat(t):
    return t if isinstance(t, jax.Array) and t.ndim == 1 else ravel_pytree(t)[0]


def rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


SMALL = {
    "mlp": (
        partial(init_mlp, widths=(12, 8, 10)),
        lambda n, k: (
            jax.random.normal(k, (n, 12), jnp.float32),
            jax.random.randint(jax.random.fold_in(k, 1), (n,), 0, 10, jnp.int32),
        ),
    ),
    "cnn": (
        partial(init_cnn, channels=4, length=16),
        lambda n, k: (
            jax.random.normal(k, (n, 1, 16, 1), jnp.float32),
            jax.random.randint(jax.random.fold_in(k, 1), (n,), 0, 10, jnp.int32),
        ),
    ),
}
CHECKED = [
    ("gram", {"solver": "gram"}),
    ("gram_cg", {"solver": "gram_cg"}),
    ("cg (defaults)", {"solver": "cg"}),
    ("cholesky", {"solver": "cholesky"}),
    ("pinv", {"solver": "pinv"}),
    ("modular, layer", {"method": "modular"}),
    ("modular, primitive", {"method": "modular", "granularity": "primitive"}),
]


def check_routes(n=8, reference=None):
    """Each natchain route's optimiser direction against the dense pseudo-inverse, on small models.

    The direction each optimiser returns (before the learning rate) is compared with
    ``natural_gradient(..., solver="pinv")`` at the same damping, in the default float
    dtype (float64 under ``JAX_ENABLE_X64``) or against ``reference`` (flat float64
    directions by model name). The modular rule is a different direction by construction:
    only its cosine to the reference is reported.
    """
    dtype = jnp.zeros(()).dtype
    out = {"dtype": str(dtype), "batch": n, "damping": DAMPING, "cases": []}
    out["reference"] = "pinv, float64" if reference is not None else f"pinv, {dtype}"
    key = jax.random.PRNGKey(3)
    for name, (init, batch) in SMALL.items():
        model = MODELS[name]
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), init(key))
        x, y = batch(n, jax.random.fold_in(key, 2))
        x = jnp.asarray(x, dtype)
        case = {"model": name, "P": num_params(params), "routes": {}}
        if reference is None:
            ref = nc.natural_gradient(
                model.apply, params, x, y, FAMILY, solver="pinv", damping=DAMPING
            ).value
            case["reference"] = [float(v) for v in ravel_pytree(ref)[0]]
        else:
            ref = jnp.asarray(np.asarray(reference[name]), dtype)
        for label, transform in CHECKED:
            modular = transform.get("method") == "modular"
            opts = dict(model.options) if modular else {"damping": DAMPING}
            opt = nc.scale_by_natural_gradient(model.apply, FAMILY, **transform, **opts)
            grads = jax.grad(partial(mean_nll, model))(params, x, y)
            nat, _ = jax.jit(partial(opt.update, x=x, y=y))(grads, opt.init(params), params)
            entry = {"cosine": cosine(nat, ref)}
            if not modular:
                entry["rel_error"] = rel(nat, ref)
            case["routes"][label] = entry
        out["cases"].append(case)
    return out


def check_routes_float64():
    """:func:`check_routes` in a float64 subprocess (x64 must be set before jax starts)."""
    env = dict(os.environ, JAX_ENABLE_X64="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--check-routes-only"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_kfac(n=32):
    """kfac-jax's step uses the batch it is given: its update is ``−lr · C⁻¹ g(batch)``.

    One step with the inverse recomputed (``inverse_update_period=1``, no momentum) is
    compared with kfac-jax's own preconditioner (its curvature estimator, in the state
    the step returned) applied to the loss gradient of the same batch, and of another
    batch (which must not match). The loss kfac-jax reports must be the batch's loss.
    """
    key = jax.random.PRNGKey(5)
    out = {"batch": n, "cases": []}
    for name in ("mlp", "cnn"):
        model = MODELS[name]
        params = model.init(jax.random.fold_in(key, 1))
        x, y = model.batch(n, jax.random.fold_in(key, 2))
        x2, y2 = (a[n:] for a in model.batch(2 * n, jax.random.fold_in(key, 3)))
        opt, loss = kfac_optimizer(model, 1)
        state = opt.init(params, key, (x, y))
        before = jax.tree_util.tree_map(jnp.copy, params)
        new, new_state, stats = opt.step(
            jax.tree_util.tree_map(jnp.copy, params), state, key, batch=(x, y), global_step_int=0
        )
        delta = jax.tree_util.tree_map(jnp.subtract, new, before)
        estimator = opt._estimator  # noqa: SLF001 - kfac-jax's preconditioner, for the check

        def predicted(g, new_state=new_state, estimator=estimator):
            pg = estimator.multiply_inverse(
                new_state.estimator_state,
                g,
                identity_weight=KFAC_SETTINGS["l2_reg"] + KFAC_SETTINGS["damping"],
                exact_power=False,
                use_cached=False,
                pmap_axis_name=None,
            )
            return jax.tree_util.tree_map(lambda v: -LR * v, pg)

        g_same = jax.grad(loss)(before, (x, y))
        g_other = jax.grad(loss)(before, (x2, y2))
        blocks = [type(b).__name__ for b in getattr(estimator, "blocks", [])]
        out["cases"].append(
            {
                "model": name,
                "blocks": blocks,
                "loss_rel_diff": abs(float(stats["loss"]) - float(loss(before, (x, y))))
                / float(loss(before, (x, y))),
                "update_rel_error_same_batch": rel(delta, predicted(g_same)),
                "update_rel_error_other_batch": rel(delta, predicted(g_other)),
                "cosine_update_gradient": -cosine(delta, g_same),
            }
        )
    return out


# --------------------------------------------------------------------------- environment


def environment():
    import jaxlib

    try:
        from importlib.metadata import version

        kfac_version = version("kfac-jax")
    except Exception:
        kfac_version = None
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "kfac_jax": kfac_version,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "natchain": nc.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(jax.devices()[0]),
    }


# --------------------------------------------------------------------------- README


def _fmt_ratio(row, best=False):
    if row is None:
        return "—"
    if "skipped" in row:
        return "n/a"
    ratio = row["best_ratio"] if best else row["ratio"]
    if "cg_steps" in row and math.isfinite(row["residual"]):  # nan: not measured (minimal)
        return f"{ratio:.1f}× ({row['cg_steps']}, {row['residual']:.0e})"
    return f"{ratio:.1f}×"


def _fmt_mem(row):
    if row is None or row.get("memory_bytes") is None:
        return "—"
    return f"{row['memory_bytes'] / 2**20:.1f}"


def _para(text):
    return textwrap.fill(
        " ".join(text.split()), width=92, break_on_hyphens=False, break_long_words=False
    )


def _table(title, labels, batches, fmt):
    lines = [
        f"| {title} | " + " | ".join(f"B={b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    lines += [
        f"| {label} | " + " | ".join(fmt(label, b) for b in batches) + " |" for label in labels
    ]
    return lines + [""]


def readme_section(results):
    """The README's section between the markers, from the recorded results only."""
    rows = [r for r in results["rows"] if r["route"] != "load"]
    loads = [r for r in results["rows"] if r["route"] == "load"]
    env, rev, cfg = results["env"], results["git"], results["config"]
    cell = {(r["model"], r["route"], r["batch"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})
    for m in {r["model"] for r in rows}:
        for b in batches:
            sgd = cell.get((m, "optax SGD", b))
            for r in rows:
                if r["model"] == m and r["batch"] == b and "times" in r and sgd:
                    r["best_ratio"] = min(r["times"]) / min(sgd["times"])
    load = [x for r in loads for x in (r["load_start"], r["load_end"])]
    spread = max(max(r["times"]) / min(r["times"]) for r in rows if len(r.get("times", [])) > 1)
    kfac = ", ".join(f"`{k}={v}`" for k, v in cfg["kfac"].items())
    lines = [
        BEGIN,
        "## natchain beside optax and kfac-jax",
        "",
        _para(
            f"""Generated by `python benchmarks/peer.py` from `benchmarks/peer.json` — do not
            edit by hand. Every route is one full jitted optimiser step (loss gradient,
            direction, update) on the same batch, all in one process, as a ratio to the optax
            SGD step timed in the same rounds at the same batch size (SGD's own time on its
            row). After two warm-up calls the routes are called in turn,
            {"/".join(map(str, cfg["reps"]))} rounds at B = {"/".join(map(str, cfg["batches"]))}
            (a route whose call takes over {cfg["slow_call"]:g} s is timed once). One call of
            kfac-jax with period 10 is 10 consecutive steps, so each holds one inverse
            update; its time is per step. float32, categorical outputs, natchain damping
            {cfg["damping"]:g}, learning rate {cfg["lr"]:g} (Adam {cfg["adam_lr"]:g}). CG runs
            with natchain's defaults; steps taken and final relative residual in brackets."""
        ),
        "",
        _para(
            f"""kfac-jax: `kfac_jax.Optimizer`, loss registered with
            `register_softmax_cross_entropy_loss`, settings {kfac};
            `inverse_update_period` 1 or 10. It damps its Kronecker factors (factored
            Tikhonov), natchain the whole Fisher: the same number, not the same step."""
        ),
        "",
        _para(
            f"""1-minute load average during the run {min(load):.1f}–{max(load):.1f} on
            {env["cpu_count"]} cores; the benchmark's own threads count towards it, so on
            {env["cpu_count"]} cores a value near {env["cpu_count"]} is the run itself. A
            route's time per round still varies (a slow round took up to {spread:.0f}× the
            same route's fastest round; every round's time is in `peer.json`): the median
            table is the typical cost, the best-of-rounds table (fastest round over SGD's
            fastest) the cost without interference. A route timed once has only its one
            time in both."""
        ),
        "",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        labels = list(dict.fromkeys(r["route"] for r in rows if r["model"] == name))
        p = next(r["P"] for r in rows if r["model"] == name)

        def fmt(label, b, best, name=name):
            r = cell.get((name, label, b))
            if r is not None and label == "optax SGD" and "times" in r:
                return f"{(min(r['times']) if best else r['seconds']) * 1e3:.2f} ms"
            return _fmt_ratio(r, best)

        lines += [f"### {cfg['models'][name]} (P = {p})", ""]
        lines += _table("median (× SGD)", labels, batches, partial(fmt, best=False))
        lines += _table("best of rounds (× SGD)", labels, batches, partial(fmt, best=True))
        lines += _table(
            "peak memory (MiB)",
            labels,
            batches,
            lambda label, b, name=name: _fmt_mem(cell.get((name, label, b))),
        )
        notes = {}
        for r in rows:
            if r["model"] == name and "skipped" in r:
                notes.setdefault(r["skipped"], []).append(f"{r['route']} (B={r['batch']})")
        if notes:
            lines.append("n/a:")
            lines += [f"- {', '.join(v)}: {k}." for k, v in notes.items()]
            lines.append("")
    lines += [
        _para(
            """Peak memory: XLA's memory analysis of the compiled step (arguments + outputs +
            temporaries); for kfac-jax, of its step compiled once more inside `jax.jit` for
            this purpose only."""
        ),
        "",
        "### Overheads (ratio of the two median times above; best of rounds in brackets)",
        "",
        "| | " + " | ".join(f"{m} B={b}" for m in cfg["models"] for b in batches) + " |",
        "|---|" + "---:|" * (len(cfg["models"]) * len(batches)),
    ]
    for label, top, bottom in OVERHEADS:
        cells = []
        for m in cfg["models"]:
            for b in batches:
                t, u = cell.get((m, top, b)), cell.get((m, bottom, b))
                if t and u and "times" in t and "times" in u:
                    med = t["seconds"] / u["seconds"]
                    best = min(t["times"]) / min(u["times"])
                    cells.append(f"{med:.2f} ({best:.2f})")
                else:
                    cells.append("—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "### Checks of the comparison", ""]
    for check in results["checks"]["routes"]:
        lines.append(
            _para(
                f"""Each natchain optimiser direction ({check["dtype"]}, N = {check["batch"]},
                damping {check["damping"]:g}) against the dense pseudo-inverse
                ({check["reference"]}): relative error; for the modular rule, a different
                direction by construction, the cosine."""
            )
        )
        lines.append("")
        for case in check["cases"]:
            parts = []
            for label, e in case["routes"].items():
                parts.append(
                    f"{label} {e['rel_error']:.1e}"
                    if "rel_error" in e
                    else f"{label} cos {e['cosine']:.2f}"
                )
            lines.append(f"- {case['model']} (P = {case['P']}): " + ", ".join(parts) + ".")
        lines.append("")
    kf = results["checks"].get("kfac")
    if kf:
        lines += [
            _para(
                f"""kfac-jax uses the batch it is given (N = {kf["batch"]}, inverse every step):
                its update against `−lr · C⁻¹ g` with its own preconditioner `C` and the
                gradient `g` of the same batch, and of another batch; the loss it reports
                against the batch's:"""
            ),
            "",
        ]
        for c in kf["cases"]:
            lines.append(
                f"- {c['model']}: registered blocks {', '.join(c['blocks'])}; relative error "
                f"{c['update_rel_error_same_batch']:.1e} (same batch) vs "
                f"{c['update_rel_error_other_batch']:.2f} (other batch); loss relative "
                f"difference {c['loss_rel_diff']:.1e}; cosine(update, −g) "
                f"{c['cosine_update_gradient']:.2f}."
            )
        lines.append("")
    dirty = " (with uncommitted changes)" if rev["dirty"] else ""
    lines += [
        _para(
            "Measured on: "
            + ", ".join(f"{k} {v}" for k, v in env.items())
            + f"; git {rev['commit'][:12]}{dirty}; wall time "
            f"{results['wall_seconds'] / 60:.1f} min, process peak RSS "
            f"{results['max_rss_bytes'] / 2**30:.2f} GiB."
        ),
        END,
    ]
    return "\n".join(lines)


def write_readme(results):
    section = readme_section(results)
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)


# --------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument(
        "--reps", type=int, nargs="+", default=[15, 9, 5], help="calls timed at each batch size"
    )
    parser.add_argument("--only", nargs="+", help="time only routes whose label contains these")
    parser.add_argument("--quick", action="store_true", help="B = 32 only, 3 reps, print only")
    parser.add_argument("--write-readme", action="store_true", help="regenerate from peer.json")
    parser.add_argument("--check-routes-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allow-dirty", action="store_true", help="record from a dirty tree")
    args = parser.parse_args(argv)
    if args.check_routes_only:
        print(json.dumps(check_routes()))
        return
    if args.write_readme:
        write_readme(json.loads(RESULTS.read_text()))
        return
    rev = git_revision()
    record = not args.quick and not args.only
    if record and rev["dirty"] and not args.allow_dirty:
        raise SystemExit("uncommitted changes: commit first, or pass --allow-dirty.")
    if args.quick:
        args.batches, args.reps = [32], [3]
    skip_kfac = kfac_available()
    if skip_kfac:
        print(skip_kfac, file=sys.stderr)
    start = time.perf_counter()
    f64 = check_routes_float64()
    refs = {case["model"]: case.pop("reference") for case in f64["cases"]}
    checks = {"routes": [f64, check_routes(reference=refs)]}
    if not skip_kfac:
        checks["kfac"] = check_kfac()
    print(json.dumps(checks, indent=1), flush=True)
    rows = run(args.models, args.batches, args.reps, skip_kfac, only=args.only)
    results = {
        "env": environment(),
        "git": rev,
        "config": {
            "batches": args.batches,
            "reps": args.reps,
            "damping": DAMPING,
            "lr": LR,
            "adam_lr": ADAM_LR,
            "slow_call": SLOW_CALL,
            "kfac": {k: v for k, v in KFAC_SETTINGS.items()},
            "models": {m: MODELS[m].description for m in args.models},
        },
        "checks": checks,
        "rows": rows,
        "wall_seconds": time.perf_counter() - start,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if record:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_readme(results)


if __name__ == "__main__":
    main()
