"""Two processes joined by ``jax.distributed`` compute one natural gradient together.

Each process (``tests/_distributed_worker.py``) has two forced host devices and half of
the batch; the four devices form one mesh with the batch sharded over it. The answer
must equal the single-process one. The coordinator listens on 127.0.0.1 only, on a port
the OS says is free, and every wait is bounded, so the test stops by itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests._distributed_worker import natural_gradient, problem

WORKER = Path(__file__).with_name("_distributed_worker.py")
TIMEOUT_S = 240  # two cold JAX starts and one compile each, on a loaded two-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # stop at once when either process fails: the other would wait for its peer
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [p.communicate()[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"a process exited with {p.returncode}:\n{log[-3000:]}"
    return [json.loads(o.read_text()) for o in outs]


def test_two_process_natural_gradient_equals_single_process(tmp_path):
    results = _run_two_processes(tmp_path)
    params, x, y = problem()
    ref = [np.asarray(leaf) for leaf in natural_gradient_leaves(params, x, y)]
    scale = max(np.max(np.abs(r)) for r in ref)
    for res in results:
        assert res["process_count"] == 2
        assert res["device_count"] == 4 and res["local_device_count"] == 2
        got = [np.asarray(leaf) for leaf in res["leaves"]]
        diff = max(np.max(np.abs(g - r)) for g, r in zip(got, ref, strict=True))
        # float64, the same Gram route: only the order of the batch sums differs.
        assert diff <= 1e-10 * scale, diff / scale


def natural_gradient_leaves(params, x, y):
    import jax

    return jax.tree.leaves(natural_gradient(params, x, y))
