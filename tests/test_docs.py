"""The documentation cannot rot: every tutorial, how-to and README block runs, the API
reference lists every public name, generated pages are up to date, and no file points at a
document outside the project.

Scripts run in a fresh interpreter each (``python script.py`` from the repository root),
as a reader would run them: this suite's float64 set-up (``conftest.py``) must not leak
into code written for JAX's float32 default.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import natchain
import natchain.diagnostics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCRIPTS = sorted((DOCS / "tutorials").glob("*.py")) + sorted((DOCS / "howto").glob("*.py"))


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python *args`` from the repository root in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


# ---- tutorials and how-tos ----------------------------------------------------------------------


def test_docs_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"quickstart.py", "modular_vs_exact.py", "training.py"} <= names
    assert {"flax_linen.py", "flax_nnx.py", "equinox_models.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_docs_script_runs(script):
    """Every tutorial and how-to runs as a reader would run it (Flax and Equinox are in the
    test extra, so the framework how-tos run here too)."""
    result = _run([str(script)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_docs_every_script_is_shown_on_a_page():
    """A page includes each script whole, so what the reader sees is what the tests run."""
    pages = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    for script in SCRIPTS:
        rel = script.relative_to(ROOT).as_posix()
        assert f'--8<-- "{rel}"' in pages, f"no page includes {rel}"


# ---- README --------------------------------------------------------------------------------------


def test_readme_python_blocks_run():
    """Every ``python`` block of the README, in order, as one program (a reader's session)."""
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README has no python block"
    result = _run(["-c", "\n\n".join(blocks)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_readme_keeps_the_setup_commands():
    readme = (ROOT / "README.md").read_text()
    for command in (
        'pip install -e ".[experiments]" && python -m experiments training --quick',
        'pip install -e ".[test]" && python -m pytest -q',
        'pip install -e ".[docs]" && mkdocs build --strict',
    ):
        assert command in readme, command


def test_python_blocks_are_extracted():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert _python_blocks(text) == ["x = 1\n", "y = 2\n"]


# ---- API reference -------------------------------------------------------------------------------


def _reference_entries() -> set[str]:
    entries = set()
    for page in (DOCS / "api").glob("*.md"):
        entries |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M))
    return entries


def _public_names() -> set[str]:
    return {f"natchain.{n}" for n in natchain.__all__} | {
        f"natchain.diagnostics.{n}" for n in natchain.diagnostics.__all__
    }


def test_api_reference_lists_every_public_name():
    missing = sorted(_public_names() - _reference_entries())
    assert not missing, f"add a '::: <name>' line to docs/api/ for each of {missing}"


def test_api_reference_lists_only_public_names():
    stale = sorted(_reference_entries() - _public_names() - {"natchain.diagnostics"})
    assert not stale, f"docs/api/ documents names that are not public: {stale}"


# ---- generated pages and references --------------------------------------------------------------


def test_solvers_page_is_generated_from_the_benchmark_results():
    spec = importlib.util.spec_from_file_location("generate_solvers", DOCS / "generate_solvers.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)

    results = json.loads(gen.RESULTS.read_text())
    text = gen.render(results, gen._settings())
    assert (DOCS / "solvers.md").read_text() == text, "run python docs/generate_solvers.py"
    # The page follows the results: a changed measurement changes the page.
    changed = json.loads(json.dumps(results))
    changed["rows"][1]["ratio"] += 1.0
    assert gen.render(changed, gen._settings()) != text


def test_theory_page_has_the_numbered_sections_the_code_points_at():
    theory = (DOCS / "theory.md").read_text()
    for heading in ("## 1. Notation", "## 2. Exact routes", "## 3. The natural chain rule"):
        assert re.search(rf"^{re.escape(heading)}$", theory, flags=re.M), heading


_SKIP_DIRS = {".git", "site", "build", "dist", "node_modules", "__pycache__"}
_TEXT = {".py", ".md", ".yml", ".yaml", ".toml", ".cff", ".tex", ".txt", ".cfg", ".sty", ""}


def _project_text_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [
            d for d in dirnames if d not in _SKIP_DIRS and (d == ".ci" or not d.startswith("."))
        ]
        for name in filenames:
            if name == ".git":  # a worktree's pointer to its repository, not project text
                continue
            path = Path(dirpath) / name
            if path.suffix in _TEXT and path.stat().st_size < 2_000_000:
                yield path


def test_no_file_points_at_a_document_outside_the_project():
    # The patterns are assembled so that this file does not match them itself.
    outside = re.compile("|".join(["DES" + "IGN", "/wo" + "rk/"]))
    hits = []
    for path in _project_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [
            f"{path.relative_to(ROOT)}:{i}"
            for i, line in enumerate(text.splitlines(), 1)
            if outside.search(line)
        ]
    assert not hits, hits
