"""Runs every route on a batch sharded over forced host devices; writes one JSON table.

Started by ``tests/test_sharding.py`` in a subprocess, since the device count must be fixed
before JAX initialises: ``python tests/_sharding_worker.py OUT.json``. Each row holds the
largest relative difference from the single-device answer, the shapes of the hidden
layer's ``tanh`` in the compiled program, and (memory rows) the compiled program's
per-device temporary bytes.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, PartitionSpec  # noqa: E402

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import natchain as nc  # noqa: E402
from natchain._sharding import GramRows  # noqa: E402
from tests.cases import init_mlp, make_mlp  # noqa: E402

MODEL = make_mlp("tanh")
FAMILY = nc.Categorical()
N, WIDTHS = 16, (6, 12, 3)
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
_TANH = re.compile(r"= f64\[([\d,]*)\]\{[^}]*\} tanh\(")
_COLLECTIVE = re.compile(
    r"= (\([^)]*\)|[a-z0-9]+\[[\d,]*\])\S* "
    r"(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\("
)


def _exact(solver, damping=0.0):
    def fn(p, x, y):
        return nc.natural_gradient(MODEL, p, x, y, FAMILY, solver=solver, damping=damping).value

    return fn


def _modular(granularity):
    grad = nc.grad(MODEL, FAMILY, granularity=granularity)
    return lambda p, x, y: grad(p, x, y)


def _optimiser(**options):
    opt = nc.scale_by_natural_gradient(MODEL, FAMILY, **options)

    def fn(p, x, y):
        grads = jax.tree_util.tree_map(jnp.ones_like, p)
        return opt.update(grads, opt.init(p), p, x=x, y=y)[0]

    return fn


#: route name -> ``fn(params, x, y) -> pytree``; damped where the route needs it.
ROUTES = {
    "pinv": _exact("pinv"),
    "cholesky": _exact("cholesky", 1e-3),
    "gram": _exact("gram"),
    "cg": _exact(nc.CG(tol=1e-13), 1e-3),
    "gram_rows_factorised": _exact(nc.Gram(rows="batch")),
    "gram_rows_cg": _exact(nc.Gram(rows=GramRows("batch", 0, tol=1e-13, maxiter=1000)), 1e-3),
    "modular_layer": _modular("layer"),
    "modular_primitive": _modular("primitive"),
    "optimiser_exact": _optimiser(solver="gram", damping=1e-3),
    "optimiser_modular": _optimiser(method="modular"),
}


#: Routes also called eagerly (outside ``jit``) in explicit mode: those whose products over
#: the batch axis explicit mode refuses.
EAGER = ("gram", "modular_layer")


def _rel(a, b):
    a, b = (np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _data(n, widths, seed=0):
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = init_mlp(kp, widths)
    x = jax.random.normal(kx, (n, widths[0]))
    y = jax.random.randint(ky, (n,), 0, widths[-1])
    return params, x, y


def _sharded(mode, devices, x, y):
    devs = jax.devices()[:devices]
    mesh = jax.make_mesh((devices,), ("batch",), axis_types=(mode,), devices=devs)
    spec = PartitionSpec("batch")
    with jax.set_mesh(mesh):
        return mesh, jax.device_put(x, spec), jax.device_put(y, spec)


def route_rows():
    params, x, y = _data(N, WIDTHS)
    rows = []
    for name, fn in ROUTES.items():
        if name.startswith("gram_rows"):  # the same route on a one-device mesh
            mesh, x1, y1 = _sharded(AxisType.Explicit, 1, x, y)
            with jax.set_mesh(mesh):
                ref = jax.jit(fn)(params, x1, y1)
        else:
            ref = jax.jit(fn)(params, x, y)
        for mode_name, mode in MODES.items():
            t0 = time.perf_counter()
            mesh, xs, ys = _sharded(mode, 4, x, y)
            with jax.set_mesh(mesh):
                compiled = jax.jit(fn).lower(params, xs, ys).compile()
                value = compiled(params, xs, ys)
            text = compiled.as_text()
            shapes = sorted({m.group(1) for m in _TANH.finditer(text)})
            collectives = sorted(
                {f"{m[2]} {re.sub(r'[{][^}]*[}]', '', m[1])}" for m in _COLLECTIVE.finditer(text)}
            )
            rows.append(
                {
                    "route": name,
                    "mode": mode_name,
                    "rel_diff": _rel(value, ref),
                    "finite": all(bool(np.isfinite(v).all()) for v in jax.tree.leaves(value)),
                    "tanh_shapes": shapes,
                    "collectives": collectives,
                    "seconds": time.perf_counter() - t0,
                }
            )
        if name in EAGER:  # called outside jit, on concrete explicitly sharded arrays
            mesh, xs, ys = _sharded(AxisType.Explicit, 4, x, y)
            with jax.set_mesh(mesh):
                value = fn(params, xs, ys)
            rows.append({"route": name, "mode": "explicit_eager", "rel_diff": _rel(value, ref)})
    return rows


#: The memory measurement: a model small beside its Gram system, so the system dominates.
MEM_N, MEM_WIDTHS = 256, (4, 8, 3)


def memory_rows():
    params, x, y = _data(MEM_N, MEM_WIDTHS, seed=1)
    solver = nc.Gram(rows=GramRows("batch", max_dense_bytes=0, tol=1e-13, maxiter=1000))
    fn = _exact(solver, 1e-3)
    ref = jax.jit(_exact("gram", 1e-3))(params, x, y)
    rows = []
    for devices in (1, 2, 4):
        mesh, xs, ys = _sharded(AxisType.Explicit, devices, x, y)
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(params, xs, ys).compile()
            value = compiled(params, xs, ys)
        mem = compiled.memory_analysis()
        size = MEM_N * (MEM_WIDTHS[-1] - 1)  # Categorical: r = m - 1 factor columns
        rows.append(
            {
                "devices": devices,
                "temp_bytes": int(mem.temp_size_in_bytes),
                "argument_bytes": int(mem.argument_size_in_bytes),
                "system_bytes": size * size * 8,
                "rel_diff": _rel(value, ref),
            }
        )
    return rows


def main(out):
    t0 = time.perf_counter()
    table = {
        "devices": jax.device_count(),
        "n": N,
        "widths": WIDTHS,
        "routes": route_rows(),
        "memory": memory_rows(),
    }
    table["seconds"] = time.perf_counter() - t0
    Path(out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
