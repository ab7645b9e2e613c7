"""Smoke tests: every experiment's ``--smoke`` path runs, writes tidy rows, and resumes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

# ``experiments`` is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import __main__ as cli  # noqa: E402
from experiments._results import ResultStore  # noqa: E402

needs = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("optax", "matplotlib", "sklearn")),
    reason="needs the experiments extra (optax, matplotlib, scikit-learn)",
)

ROW_KEYS = {"method", "setting", "seed", "step", "metric", "value", "run"}


def _run(name, tmp_path, *extra):
    cli.main([name, "--smoke", "--quiet", "--results-dir", str(tmp_path), *extra])
    store = ResultStore(name, "smoke", root=tmp_path)
    return store


def test_results_store_is_tidy_atomic_and_resumable(tmp_path):
    store = ResultStore("demo", "smoke", root=tmp_path)
    assert not store.done("m", "s", 0)
    store.record("m", "s", 0, [{"step": 0, "metric": "loss", "value": 1.5}], config={"a": 1})
    store.record("m", "s", 1, [{"step": 0, "metric": "loss", "value": float("nan")}], config={})
    # A run whose rows were written but whose record was not (an interruption) is dropped.
    with open(store.rows_path, "a") as f:
        f.write(json.dumps({"run": "m|s|2", "metric": "loss", "value": 0.0}) + "\n")
    again = ResultStore("demo", "smoke", root=tmp_path)
    assert again.done("m", "s", 0) and again.done("m", "s", 1) and not again.done("m", "s", 2)
    rows = again.rows()
    assert len(rows) == 2 and all(set(r) == ROW_KEYS for r in rows)
    assert rows[1]["value"] == "nan"  # non-finite values are kept, as strings
    run = again.runs["m|s|0"]
    assert {"config", "git", "versions", "status"} <= set(run)
    assert run["versions"]["jax"]
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind


def test_experiments_cli_lists_experiments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "training" in out and "fisher_kinds" in out


@needs
def test_experiments_fisher_kinds_smoke(tmp_path):
    store = _run("fisher_kinds", tmp_path)
    rows = store.rows()
    dist = {
        m: max(
            float(r["value"])
            for r in rows
            if r["method"] == m and r["metric"] == "relative_distance"
        )
        for m in ("true-fisher", "empirical-fisher")
    }
    assert dist["true-fisher"] < 1e-10  # one unit step lands on the optimum
    assert dist["empirical-fisher"] > 0.1  # the empirical Fisher's does not
    assert (tmp_path / "fisher_kinds" / "smoke_field.png").exists()


@needs
def test_experiments_saturation_smoke(tmp_path):
    store = _run("saturation", tmp_path)
    runs = store.runs.values()
    assert runs and all(r["status"] == "ok" for r in runs)
    ratio = {r["setting"]: float(r["value"]) for r in store.rows() if r["metric"] == "norm_ratio"}
    assert set(ratio) == {f"rcond={rc}|scale={s}" for rc in ("0", "0.001") for s in ("1", "16")}
    # The cut-off bounds the modular step where tanh saturates.
    assert ratio["rcond=0.001|scale=16"] < ratio["rcond=0|scale=16"]


@needs
def test_experiments_agreement_smoke(tmp_path):
    from experiments.agreement.run import METRICS

    store = _run("agreement", tmp_path)
    rows = store.rows()
    assert {r["metric"] for r in rows} == set(METRICS)
    got = {(r["setting"], r["metric"]): float(r["value"]) for r in rows}
    assert got["depth=1", "relative_error"] < 1e-8  # one dense layer: the rule is exact
    assert got["depth=2", "relative_error"] > 1e-3  # parameters at two layers: it is not
    # ... yet every map has full row rank (batch 4, rank [X 1] = 4), so by the right-inverse
    # theorem the step solves F n = g and moves the centred logits as the exact one does:
    # float64 rounding through condition numbers of order 1e2 stays far below 1e-10.
    assert got["depth=2", "maps_full_row_rank"] == 1.0
    assert got["depth=2", "function_error"] < 1e-10
    assert got["depth=2", "fisher_error"] < 1e-10
    assert got["depth=2", "fisher_residual"] < 1e-10


@needs
def test_experiments_cost_smoke(tmp_path, capsys):
    store = _run("cost", tmp_path)
    runs = store.runs.values()
    assert runs and all(r["status"] == "ok" for r in runs)
    ratios = [float(r["value"]) for r in store.rows() if r["metric"] == "ratio"]
    assert ratios and all(np.isfinite(ratios)) and min(ratios) > 0
    out = capsys.readouterr().out
    assert "slope in N" in out
    assert (tmp_path / "cost" / "smoke_scaling.png").stat().st_size > 0


@needs
def test_experiments_nullspace_smoke(tmp_path):
    from experiments.nullspace import config
    from experiments.nullspace.run import EVAL_METRICS, STEP_METRICS

    store = _run("nullspace", tmp_path)
    runs = store.runs.values()
    assert {r["method"] for r in runs} == set(config.METHODS)
    assert all(r["status"] == "ok" for r in runs)
    rows = store.rows()
    assert {r["metric"] for r in rows} == set(EVAL_METRICS) | set(STEP_METRICS)
    first = {(r["method"], r["metric"]): float(r["value"]) for r in rows if r["step"] == 0}
    # Directions in range(F_theta) have no null component: the damped exact one is Jᵀu, the
    # projected one is projected (float64 round-off through C⁺, far below 1e-8).
    assert first["exact", "null_fraction"] < 1e-8
    assert first["modular-projected", "null_fraction"] < 1e-8
    # Batch 16 of 64-pixel digits: rank [X 1] = N and every map has full row rank, so by the
    # right-inverse theorem the modular step solves F n = g (float64: < 1e-8) although most
    # of it lies in null(F_theta) (measured ≈ 0.84 on this batch).
    assert first["modular", "residual"] < 1e-8
    assert first["modular", "null_fraction"] > 0.5
    assert first["modular-projected", "residual"] < 1e-8
    assert (tmp_path / "nullspace" / "smoke_curves.png").stat().st_size > 0
    assert "modular-projected" in (tmp_path / "nullspace" / "smoke_table.md").read_text()
