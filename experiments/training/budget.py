"""Expected wall time of the full run and of the sweep, projected from a ``--quick`` run.

``python -m experiments.training.budget [RESULTS_DIR]`` reads ``training/quick.jsonl`` and
``quick.runs.jsonl`` (one seed per (setting, method), every method's median step time,
its first-step compile time and its whole wall time) and projects, per (setting, method),

- one full-level run: ``steps × step_time + evaluations × evaluation cost``, where the
  evaluation cost is what the quick run spent outside its timed steps and compilation,
  divided by its evaluations (an over-estimate: it includes compiling the evaluation and
  diagnostics, paid once per process);
- the full run: compilation once, then one such run per reported seed;
- the sweep: compilations (one per distinct non-learning-rate value for the natural-gradient
  methods, one per configuration for K-FAC) and, per configuration and sweep seed, a run of
  ``config.SWEEP["steps_fraction"]`` of the steps (its evaluation cost is over-estimated:
  sweep runs leave out the step diagnostics).

The quick run's times are those of the machine and load it ran on; say which.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.training import config
from experiments.training.run import _grid, _second, hp_type, run_length


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def measured(root):
    """Per (setting, method): ``{"step", "compile", "eval", "status"}`` from the quick run."""
    base = Path(root) / "training"
    rows = _read(base / "quick.jsonl")
    runs = {r["run"]: r for r in _read(base / "quick.runs.jsonl")}
    out = {}
    for rid, info in runs.items():
        rs = [r for r in rows if r["run"] == rid]
        get = {
            r["metric"]: float(r["value"])
            for r in rs
            if r["metric"] in ("step_time_s", "compile_s")
        }
        if "step_time_s" not in get:
            continue
        steps, every = run_length(info["setting"], info["method"], "quick")
        evals = 1 + sum(1 for k in range(1, steps + 1) if k % every == 0 or k == steps)
        rest = info["wall_s"] - get["compile_s"] - (steps - 1) * get["step_time_s"]
        out[(info["setting"], info["method"])] = {
            "step": get["step_time_s"],
            "compile": get["compile_s"],
            "eval": max(rest, 0.0) / evals,
            "status": info["status"],
        }
    # Evaluation costs the same for every method of a setting (its own diagnostics apart);
    # the median over the setting's methods leaves out the one-off compilations that the
    # first run of a setting pays.
    for setting in {s for s, _ in out}:
        costs = sorted(m["eval"] for (s, _), m in out.items() if s == setting)
        for (s, _), m in out.items():
            if s == setting:
                m["eval"] = costs[len(costs) // 2]
    return out


def _configs(method):
    """``(number of configurations, number of compilations)`` of the sweep for ``method``."""
    n_lr = len(_grid(method, "learning_rate", "full"))
    second = _second(method)
    n_second = 0 if second is None else len(_grid(method, second, "full"))
    n = n_lr + n_second
    compiles = n if hp_type(method) == "kfac" else 1 + n_second
    return n, compiles


def project(meas):
    """``{(setting, method): {"run", "full", "sweep"}}`` in seconds, and the totals."""
    seeds = len(config.LEVELS["full"]["seeds"])
    sweep_seeds = len(config.LEVELS["full"]["sweep_seeds"])
    out, total_full, total_sweep = {}, 0.0, 0.0
    for (setting, method), m in meas.items():
        steps, every = run_length(setting, method, "full")
        evals = 1 + steps // every
        run = steps * m["step"] + evals * m["eval"]
        full = m["compile"] + seeds * run
        n, compiles = _configs(method)
        s_steps = max(2, round(steps * config.SWEEP["steps_fraction"]))
        s_run = s_steps * m["step"] + (1 + s_steps // every) * m["eval"]
        sweep = compiles * m["compile"] + n * sweep_seeds * s_run
        out[(setting, method)] = {"run": run, "full": full, "sweep": sweep, "steps": steps}
        total_full += full
        total_sweep += sweep
    return out, total_full, total_sweep


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "results"
    proj, full, sweep = project(measured(root))
    print("| setting | method | steps | one run (s) | full (s) | sweep (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (setting, method), p in proj.items():
        print(
            f"| {setting} | {method} | {p['steps']} | {p['run']:.0f} | {p['full']:.0f} | "
            f"{p['sweep']:.0f} |"
        )
    print(f"\nfull run ≈ {full / 60:.1f} min, sweep ≈ {sweep / 60:.1f} min")


if __name__ == "__main__":
    main()
