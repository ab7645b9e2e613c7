"""Tidy, atomic, resumable result files shared by the experiments.

A result file ``results/<experiment>/<level>.jsonl`` holds one JSON object per line:

``{"method", "setting", "seed", "step", "metric", "value", "run"}``

— one measured number per row. ``run`` names the run the row belongs to; the run's
configuration, git revision, library versions, status (``ok``, ``diverged``, ``error``),
device count and wall time are stored once per run in ``<level>.runs.jsonl``. A run is a
``(method, setting, seed)`` triple: it is written whole, rows first and then its run
record, each file rewritten to a temporary file and moved into place with
``os.replace``, so an interrupted experiment loses at most the run in progress and a
restart skips every run already recorded (rows of a run without a record are dropped).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

_PACKAGES = ("natchain", "jax", "jaxlib", "optax", "numpy", "scikit-learn", "mnist1d")


def git_revision() -> str:
    """The repository's ``HEAD`` commit, with ``+dirty`` when the tree has changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict:
    """Versions of Python and the libraries the results depend on (``None`` if absent)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_count() -> int:
    """How many devices JAX sees (``python -m experiments ... --devices D`` sets it)."""
    import jax

    return jax.device_count()


def _clean(value):
    """JSON-safe floats: NaN and infinities are written as strings (honest, parseable)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _atomic_write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_id(method: str, setting: str, seed: int) -> str:
    return f"{method}|{setting}|{seed}"


class ResultStore:
    """The rows and run records of one experiment at one level (``smoke``/``quick``/``full``).

    Args:
        experiment: the experiment's name (a folder under ``root``).
        level: ``"smoke"``, ``"quick"`` or ``"full"``; each has its own files.
        root: the results folder (default: the repository's ``results/``).
        fresh: start over, discarding this level's existing results.
    """

    def __init__(self, experiment: str, level: str, root: Path | None = None, fresh=False):
        base = Path(root) if root is not None else RESULTS
        self.rows_path = base / experiment / f"{level}.jsonl"
        self.runs_path = base / experiment / f"{level}.runs.jsonl"
        self.experiment = experiment
        self.level = level
        # The revision is read before ``fresh`` deletes committed result files, which would
        # otherwise make a clean checkout look modified.
        self.git = git_revision()
        if fresh:
            for p in (self.rows_path, self.runs_path):
                if p.exists():
                    p.unlink()
        self.runs = {r["run"]: r for r in _read_lines(self.runs_path)}
        self.versions = library_versions()
        self.devices = device_count()

    def done(self, method: str, setting: str, seed: int) -> bool:
        """Whether this run is already recorded (it is then skipped on resume)."""
        return run_id(method, setting, seed) in self.runs

    def rows(self) -> list[dict]:
        """Every row of a recorded run."""
        return [r for r in _read_lines(self.rows_path) if r["run"] in self.runs]

    def record(self, method, setting, seed, rows, *, config, status="ok", wall_s=None, note=""):
        """Write one finished run: its rows, then its run record, each atomically.

        Args:
            method, setting, seed: the run.
            rows: dicts with ``step``, ``metric``, ``value``.
            config: the run's configuration (JSON-serialisable).
            status: ``"ok"``, ``"diverged"`` or ``"error"``.
            wall_s: the run's wall time in seconds.
            note: a short free-text remark (e.g. the error message).
        """
        rid = run_id(method, setting, seed)
        kept = [r for r in _read_lines(self.rows_path) if r["run"] in self.runs and r["run"] != rid]
        new = [
            {
                "method": method,
                "setting": setting,
                "seed": seed,
                "step": r["step"],
                "metric": r["metric"],
                "value": _clean(float(r["value"])),
                "run": rid,
            }
            for r in rows
        ]
        _atomic_write(self.rows_path, [json.dumps(r, sort_keys=True) for r in kept + new])
        self.runs[rid] = {
            "run": rid,
            "method": method,
            "setting": setting,
            "seed": seed,
            "status": status,
            "note": note,
            "wall_s": None if wall_s is None else round(float(wall_s), 3),
            "config": config,
            "config_hash": hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[
                :10
            ],
            "git": self.git,
            "versions": self.versions,
            "devices": self.devices,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if os.environ.get("XLA_FLAGS"):  # a run under non-default XLA settings says so
            self.runs[rid]["xla_flags"] = os.environ["XLA_FLAGS"]
        _atomic_write(self.runs_path, [json.dumps(r, sort_keys=True) for r in self.runs.values()])


def record_measurement(store, method, setting, seed, measure, *, config):
    """Run ``measure() -> {metric: value}`` once and record it as one run (step 0).

    An exception is recorded as the run's ``error`` status with its message, never
    hidden, and the experiment goes on; the run's wall time is recorded either way.
    """
    t0 = time.perf_counter()
    try:
        rows = [{"step": 0, "metric": k, "value": v} for k, v in measure().items()]
        status, note = "ok", ""
    except Exception as err:  # recorded, not hidden
        rows, status, note = [], "error", f"{type(err).__name__}: {err}"[:500]
    store.record(
        method,
        setting,
        seed,
        rows,
        config=config,
        status=status,
        note=note,
        wall_s=time.perf_counter() - t0,
    )


class Progress:
    """A progress line on stderr (``tqdm`` when it is installed, else a plain ``\\r`` line).

    Args:
        total: number of steps.
        desc: label printed before the count.
        enabled: set ``False`` to stay silent (tests).
    """

    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self._bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self._last > 0.5 or self.n >= self.total:
            extra = " ".join(f"{k}={v}" for k, v in info.items())
            sys.stderr.write(f"\r{self.desc} {self.n}/{self.total} {extra}   ")
            sys.stderr.flush()
            self._last = now

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
