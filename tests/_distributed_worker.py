"""One process of a two-process natural gradient joined by ``jax.distributed``.

``python tests/_distributed_worker.py PROCESS_ID PORT OUT.json``: each process has two
forced host devices and holds half of the batch; together they form a 4-device mesh
with the batch sharded over it, compute one natural gradient, and each writes the
(replicated) answer to ``OUT.json``. Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX initialises; importing this module changes nothing
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N, WIDTHS, DAMPING = 16, (6, 12, 3), 1e-3


def problem():
    """The batch and parameters (the same in every process and in the single-process test)."""
    from tests.cases import init_mlp  # natchain and the cases touch JAX: after initialize

    kp, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    params = init_mlp(kp, WIDTHS)
    x = np.asarray(jax.random.normal(kx, (N, WIDTHS[0])))
    y = np.asarray(jax.random.randint(ky, (N,), 0, WIDTHS[-1]))
    return params, x, y


def natural_gradient(params, x, y):
    import natchain as nc
    from tests.cases import make_mlp

    return nc.natural_gradient(
        make_mlp("tanh"), params, x, y, nc.Categorical(), solver="gram", damping=DAMPING
    ).value


def main(process_id: int, port: int, out: str) -> None:
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    params, x, y = problem()
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Explicit,))
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    half = slice(process_id * N // 2, (process_id + 1) * N // 2)  # this process's examples
    xs = jax.make_array_from_process_local_data(sharding, x[half], x.shape)
    ys = jax.make_array_from_process_local_data(sharding, y[half], y.shape)
    with jax.set_mesh(mesh):
        # under jit, as multi-process programs run: value checks need data a single process
        # cannot read whole, so they are left to the solver's statistics there
        value = jax.jit(natural_gradient)(params, xs, ys)
    leaves = [np.asarray(leaf.addressable_data(0)).tolist() for leaf in jax.tree.leaves(value)]
    Path(out).write_text(
        json.dumps(
            {
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "local_device_count": jax.local_device_count(),
                "leaves": leaves,
            }
        )
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
