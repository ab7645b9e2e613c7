"""Committed results name the committed code they were measured with.

Every run record (``results/<set>/*.runs.jsonl``) carries the git revision of the checkout
that produced it (``experiments._results.git_revision``): a commit hash, with ``+dirty``
when the tracked files had uncommitted changes, or ``unknown`` outside a git checkout. A
result is reproducible from the repository's history only if its records name a commit
that the history contains, without ``+dirty``.

**Covered** (:data:`COVERED`): every result set, each regenerated from a clean, committed
checkout. :data:`PENDING` lists sets whose records still await such a rerun (none now). A
result set in neither list fails the test, so a new one must be classified.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

COVERED = ("agreement", "census", "cost", "fisher_kinds", "nullspace", "saturation", "training")
PENDING: tuple[str, ...] = ()


def _records(name: str) -> list[dict]:
    records = []
    for path in sorted((RESULTS / name).glob("*.runs.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


def _in_history(revision: str) -> bool:
    return _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}").returncode == 0


def committed_revision_problem(revision, in_history=_in_history) -> str | None:
    """Why ``revision`` does not name a committed revision of this history (``None``: it does)."""
    if not revision or revision == "unknown":
        return f"unknown revision {revision!r}"
    if str(revision).endswith("+dirty"):
        return f"{revision!r}: measured with uncommitted changes"
    if not in_history(str(revision)):
        return f"{revision!r}: not a commit of this repository's history"
    return None


def test_provenance_check_rejects_dirty_and_unknown_revisions():
    """The check itself: dirty, unknown and foreign revisions fail; a known commit passes."""
    known = {"c7f6f524505b"}
    assert committed_revision_problem("c7f6f524505b", known.__contains__) is None
    assert "uncommitted" in committed_revision_problem("c7f6f524505b+dirty", known.__contains__)
    assert "unknown" in committed_revision_problem("unknown", known.__contains__)
    assert "unknown" in committed_revision_problem(None, known.__contains__)
    assert "history" in committed_revision_problem("0123456789ab", known.__contains__)


def test_provenance_every_result_set_is_classified():
    sets = {p.name for p in RESULTS.iterdir() if p.is_dir()}
    assert sets <= set(COVERED) | set(PENDING), sorted(sets - set(COVERED) - set(PENDING))
    assert not set(COVERED) & set(PENDING)


def _has_git() -> bool:
    return shutil.which("git") is not None and _git("rev-parse", "--git-dir").returncode == 0


@pytest.mark.skipif(
    not _has_git(), reason="needs git and a git checkout (revisions are looked up in its history)"
)
@pytest.mark.parametrize("name", COVERED)
def test_provenance_covered_results_name_committed_revisions(name):
    records = _records(name)
    assert records, f"results/{name} has no run records"
    problems = {
        r.get("run"): why
        for r in records
        if (why := committed_revision_problem(r.get("git"))) is not None
    }
    assert not problems, f"results/{name}: {len(problems)} records: {list(problems.items())[:5]}"
