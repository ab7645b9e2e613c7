"""Every exact natural-gradient route on one small MLP: agreement with dense pinv, and timing.

Run: ``python examples/exact_solvers.py`` (float64, a 10-16-16-4 tanh MLP on 8 examples).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import natchain as nc

jax.config.update("jax_enable_x64", True)


def mlp(params, x):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["W"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def main():
    key = jax.random.PRNGKey(0)
    widths = (10, 16, 16, 4)
    keys = jax.random.split(key, len(widths) + 1)
    params = [
        {"W": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, widths[:-1], widths[1:], strict=False)
    ]
    x = jax.random.normal(keys[-2], (8, widths[0]))
    y = jax.random.randint(keys[-1], (8,), 0, widths[-1])
    fam = nc.Categorical()
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
    print(f"P = {flat(params).size} parameters, N·m = {8 * widths[-1]} outputs, Categorical")
    for damping in (0.0, 1e-3):
        ref = flat(
            nc.natural_gradient(mlp, params, x, y, fam, solver="pinv", damping=damping).value
        )
        print(f"\ndamping = {damping:g}")
        print(f"{'solver':10s} {'rel. error vs pinv':>20s} {'time (ms)':>10s}  statistics")
        routes = [
            ("pinv", {}),
            ("cholesky", {}),
            ("gram", {}),
            ("gram_cg", {"tol": 1e-12}),
            ("cg", {"tol": 1e-12}),
        ]
        for solver, opts in routes:
            if solver in ("cholesky", "gram_cg") and damping == 0:
                continue  # both need damping > 0

            def run(solver=solver, damping=damping, opts=opts):
                return nc.natural_gradient(
                    mlp, params, x, y, fam, solver=solver, damping=damping, **opts
                )

            jax.block_until_ready(run())  # compile once
            t0 = time.perf_counter()
            sol = jax.block_until_ready(run())
            ms = (time.perf_counter() - t0) * 1e3
            err = float(jnp.linalg.norm(flat(sol.value) - ref) / jnp.linalg.norm(ref))
            stats = ", ".join(
                f"{k}={v:.3g}"
                if jnp.ndim(v) == 0 and jnp.issubdtype(jnp.result_type(v), jnp.floating)
                else f"{k}={v}"
                for k, v in sol.stats.items()
            )
            print(f"{solver:10s} {err:20.2e} {ms:10.2f}  {stats}")


if __name__ == "__main__":
    main()
