"""Batch-sharded natural gradients on 4 forced host devices, both JAX sharding modes.

The device count must be set before JAX initialises, so one subprocess
(``tests/_sharding_worker.py``) runs every route once per mode and writes a table; the
tests below read it. Forced host devices share this machine's cores: they show
correctness and memory, never speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import natchain as nc
from natchain._sharding import GramRows
from tests.cases import make_case

WORKER = Path(__file__).with_name("_sharding_worker.py")
ROUTES = (
    "pinv",
    "cholesky",
    "gram",
    "cg",
    "gram_rows_factorised",
    "gram_rows_cg",
    "modular_layer",
    "modular_primitive",
    "optimiser_exact",
    "optimiser_modular",
)
MODES = ("auto", "explicit")
EAGER = ("gram", "modular_layer")
DEVICES, N = 4, 16


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "table.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _row(table, route, mode):
    (row,) = [r for r in table["routes"] if r["route"] == route and r["mode"] == mode]
    return row


def test_sharding_table_covers_every_route_and_mode(table):
    assert table["devices"] == DEVICES and table["n"] == N
    assert {(r["route"], r["mode"]) for r in table["routes"]} == {
        (a, b) for a in ROUTES for b in MODES
    } | {(a, "explicit_eager") for a in EAGER}


@pytest.mark.parametrize("route", EAGER)
def test_sharded_route_called_eagerly_in_explicit_mode_equals_single_device(table, route):
    # outside jit the entry point's value checks read the sharded arrays, and the wrapper
    # runs on concrete arrays rather than tracers; tolerance as below
    assert _row(table, route, "explicit_eager")["rel_diff"] <= 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ROUTES)
def test_sharded_route_equals_single_device(table, route, mode):
    row = _row(table, route, mode)
    assert row["finite"]
    # float64, the same algorithm on one device: only the order of the batch sums (and,
    # for CG, of the iterates' round-off) differs; measured ≤ 1.2e-13.
    assert row["rel_diff"] <= 1e-10, row


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ROUTES)
def test_sharded_route_runs_per_example_work_on_its_rows(table, route, mode):
    # The hidden layer's tanh in the compiled (partitioned) program acts on N/D examples:
    # the forward and backward passes are never gathered onto one device.
    shapes = _row(table, route, mode)["tanh_shapes"]
    assert shapes, "no tanh in the compiled program"
    for shape in shapes:
        assert int(shape.split(",")[0]) == N // DEVICES, shapes


P, R = 6 * 12 + 12 + 12 * 3 + 3, 2  # parameters of the 6-12-3 MLP; Categorical(3): r = m − 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ["gram_rows_factorised", "gram_rows_cg"])
def test_row_sharded_gram_never_gathers_the_jacobian_rows(table, route, mode):
    collectives = _row(table, route, mode)["collectives"]
    block = f"f64[{N * R // DEVICES},{P}]"
    # the rows B_i = M_iᵀ J_i move only around the ring, one device's block at a time ...
    assert f"collective-permute {block}" in collectives, collectives
    assert not any(c.startswith("all-gather") and f",{P}]" in c for c in collectives)
    # ... and the iterative solve never gathers the system: only N·r vectors
    system = f"all-gather f64[{N * R},{N * R}]"
    assert (system in collectives) == (route == "gram_rows_factorised"), collectives


def test_row_sharded_gram_memory_falls_as_one_over_devices(table):
    rows = {r["devices"]: r for r in table["memory"]}
    assert sorted(rows) == [1, 2, 4]
    one = rows[1]["temp_bytes"]
    for d, row in rows.items():
        system = row["system_bytes"]
        # every device holds its rows of the system, (N·r)²/D numbers ...
        assert row["temp_bytes"] >= system / d
        # ... and going from 1 to D devices saves at least 90% of the system's share that
        # moved away, (1 − 1/D)·(N·r)² (the rest is the per-example Jacobian rows, also
        # sharded, and a chunk of one block product in flight).
        assert one - row["temp_bytes"] >= 0.9 * (1 - 1 / d) * system, (d, row, one)


def test_row_sharded_gram_answer_unchanged(table):
    for row in table["memory"]:
        # CG to a relative residual of 1e-13 on C + 1e-3·I, against the dense single-device
        # Gram route (Cholesky): measured ≤ 3.1e-13.
        assert row["rel_diff"] <= 1e-10, row


_MC_ON_ONE_DEVICE_MESH = """
import json
import jax
jax.config.update("jax_enable_x64", True)
import natchain as nc
from tests.cases import make_case

# kind="mc": g is not in the range of F_blk, so the split right-hand side carries a part z
kind, damping = "mc", 1e-3
case = make_case("categorical", widths=(3, 4), batch=4)
key = jax.random.PRNGKey(3)
args = (case["model"], case["params"], case["x"], case["y"], case["family"])
ref = nc.natural_gradient(*args, solver="gram", kind=kind, damping=damping, key=key)
mesh = jax.make_mesh((1,), ("batch",), devices=jax.devices()[:1])
with jax.set_mesh(mesh):
    rows = nc.Gram(rows="batch")
    sol = nc.natural_gradient(*args, solver=rows, kind=kind, damping=damping, key=key)
a, b = (jax.flatten_util.ravel_pytree(s.value)[0] for s in (sol, ref))
print(json.dumps({"diff": float(abs(a - b).max()), "scale": float(abs(b).max()),
                  "row_blocks": int(sol.stats["row_blocks"])}))
"""


def test_row_sharded_gram_monte_carlo_fisher_on_one_device_mesh_equals_gram():
    # Run in a fresh interpreter: compiling this program late in one long pytest process
    # crashed XLA's CPU compiler (a segmentation fault inside backend_compile) twice, while
    # the same program compiles and passes in a process of its own.
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", _MC_ON_ONE_DEVICE_MESH],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # float64, the same output-space system: eigh / Cholesky of the same C.
    assert res["diff"] <= 1e-10 * res["scale"], res
    assert res["row_blocks"] == 1


def test_gram_rows_refuses_bad_configuration():
    with pytest.raises(ValueError, match="rows axis"):
        nc.Gram(rows=3)
    with pytest.raises(ValueError, match="max_dense_bytes"):
        GramRows("batch", max_dense_bytes=-1)
    with pytest.raises(ValueError, match="tol"):
        GramRows("batch", tol=0.0)
    with pytest.raises(ValueError, match="maxiter"):
        GramRows("batch", maxiter=0)


def test_gram_rows_without_a_mesh_says_how_to_give_one():
    case = make_case("categorical", widths=(3, 4), batch=4)
    args = (case["model"], case["params"], case["x"], case["y"], case["family"])
    with pytest.raises(ValueError, match="set_mesh"):
        nc.natural_gradient(*args, solver=nc.Gram(rows="batch"))
