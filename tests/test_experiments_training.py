"""The training experiment: sweep → chosen.json → run, statuses, diagnostics, resume."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import __main__ as cli  # noqa: E402
from experiments import _data  # noqa: E402
from experiments._results import ResultStore  # noqa: E402

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("optax", "matplotlib", "sklearn")),
    reason="needs the experiments extra (optax, matplotlib, scikit-learn)",
)

ROW_KEYS = {"method", "setting", "seed", "step", "metric", "value", "run"}


def test_validation_split_is_carved_from_training_only():
    full, split = _data.load("digits"), _data.load("digits", validation=0.2)
    sizes = split.sizes()
    assert sizes["train"] + sizes["val"] == full.sizes()["train"]
    assert sizes["test"] == full.sizes()["test"] and full.sizes()["val"] == 0
    # Standardised with the remaining training examples' statistics (float64 sums of
    # ~1000 standardised values: 1e-12 is far above their rounding).
    np.testing.assert_allclose(split.x_train.mean(0), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="validation must be a fraction"):
        _data.load("digits", validation=1.5)


def test_fully_cut_map_is_reported():
    from experiments.training.run import _map_rows

    info = {
        "num_cut": 7,
        "maps": {
            "000_dense_dense": {"rank": 3, "num_cut": 0},
            "001_activation_tanh": {"rank": 0, "num_cut": 7},
        },
    }
    rows, dead = _map_rows(5, info, "natural")
    assert dead == ["001_activation_tanh"]
    by = {r["metric"]: r["value"] for r in rows}
    assert by["cut_fraction:001_activation_tanh"] == 1.0 and by["max_cut_fraction"] == 1.0
    rows, dead = _map_rows(5, {"rank": 0, "num_cut": 4, "maps": {}}, "natural")
    assert dead == ["solver"] and {"rank", "num_cut"} <= {r["metric"] for r in rows}


def test_full_level_refuses_to_run_without_a_sweep(tmp_path):
    from experiments.training.run import load_chosen

    with pytest.raises(FileNotFoundError, match="--sweep"):
        load_chosen(tmp_path, "full")


def test_training_smoke_sweep_then_run_and_resume(tmp_path, capsys):
    args = ["training", "--smoke", "--quiet", "--results-dir", str(tmp_path)]
    cli.main([*args, "--sweep"])
    chosen = json.loads((tmp_path / "training" / "smoke_chosen.json").read_text())
    digits = chosen["settings"]["digits"]
    assert set(chosen["protocol"]["sweep_seeds"]).isdisjoint(chosen["protocol"]["reported_seeds"])
    assert digits["ngd-exact-gram"]["hp"]["damping"] is not None
    assert len(digits["ngd-modular-layer"]["hp"]["rcond"]) == 2
    assert "at grid edge" in (tmp_path / "training" / "smoke_chosen_table.md").read_text()
    capsys.readouterr()
    cli.main(args)
    out = capsys.readouterr().out
    assert "| sgd |" in out and "time/step ÷ SGD" in out and "grid defaults" not in out
    store = ResultStore("training", "smoke", root=tmp_path)
    statuses = {r["method"]: r["status"] for r in store.runs.values()}
    assert set(statuses) == {"sgd", "adam", "ngd-exact-gram", "ngd-modular-layer", "kfac"}
    assert set(statuses.values()) <= {"ok", "diverged", "degenerate", "skipped"}
    from experiments._kfac import kfac_unavailable

    reason = kfac_unavailable()
    kfac = next(r for r in store.runs.values() if r["method"] == "kfac")
    assert (kfac["status"] == "skipped") == (reason is not None)
    if reason is not None:
        assert "kfac-jax unavailable" in kfac["note"]
    rows = store.rows()
    assert all(set(r) == ROW_KEYS for r in rows)
    metrics = {(r["method"], r["metric"]) for r in rows}
    for m in ("train_loss", "val_accuracy", "test_accuracy", "step_time_s", "saturation"):
        assert ("sgd", m) in metrics
    for m in ("step_norm", "null_fraction", "cosine", "fn_error", "rank", "num_cut"):
        assert ("ngd-exact-gram", m) in metrics
    assert ("ngd-modular-layer", "max_cut_fraction") in metrics
    assert any(m.startswith("cut_fraction:") for _, m in metrics)
    # The exact Gram direction compared with the exact direction: the damped solve is
    # clearly aligned with it (a loose bound: damping 0.1 tilts it; an unrelated direction
    # of this size has cosine near 0).
    cos = [r["value"] for r in rows if r["method"] == "ngd-exact-gram" and r["metric"] == "cosine"]
    assert all(np.isfinite(cos)) and min(cos) > 0.2
    assert (tmp_path / "training" / "smoke_curves.png").stat().st_size > 0
    before = store.runs_path.read_text()
    cli.main(args)  # resumes: every run is done, nothing is re-run
    assert store.runs_path.read_text() == before


def test_modular_cutoff_pairs_map_to_the_kinds_each_granularity_has():
    from experiments.training import config
    from experiments.training.run import _grid, rcond_mapping

    assert rcond_mapping((0.1, None)) == {"activation": 0.1, "dense": None}
    assert rcond_mapping((0.01, 0.01), "primitive") == {"default": 0.01}
    with pytest.raises(ValueError, match="primitive granularity"):
        rcond_mapping((0.1, None), "primitive")
    layer, prim = (
        _grid("ngd-modular-layer", "rcond", "full"),
        _grid("ngd-modular-primitive", "rcond", "full"),
    )
    assert config.DEFAULTS["modular"]["rcond"] in layer and len(layer) >= 9
    assert all(a == d for a, d in prim) and len(prim) >= 3
