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

# Scripts whose ``modular`` section needs layer granularity to recognise the framework's
# dense layer (Flax ``Dense`` / ``nnx.Linear`` with a bias, ``eqx.nn.Linear``) as one map.
# Until it does, that section is expected to fail and the rest of the script must pass;
# once the whole script passes, the test fails until its name is removed here.
LAYER_RECOGNITION_PENDING = {"flax_linen.py", "flax_nnx.py", "equinox_models.py"}

# Third-party packages a script needs beyond the test extra. Without them the script is
# skipped, with the reason; CI installs the docs extra and sets NATCHAIN_REQUIRE_DOCS_EXTRA,
# which turns a missing package into a failure.
NEEDS = {"flax_linen.py": "flax", "flax_nnx.py": "flax", "equinox_models.py": "equinox"}


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


def _section(lines: list[str], name: str) -> tuple[int, int]:
    """1-based line numbers of a snippet section's start and end markers."""
    start = lines.index(f"# --8<-- [start:{name}]") + 1
    end = lines.index(f"# --8<-- [end:{name}]") + 1
    return start, end


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


# ---- tutorials and how-tos ----------------------------------------------------------------------


def test_docs_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"quickstart.py", "modular_vs_exact.py", "training.py"} <= names
    assert set(NEEDS) <= names and LAYER_RECOGNITION_PENDING <= names


# Runs a script in three parts in one namespace: before its modular section, the section
# (a failure there is recorded, not raised), and after it. Line numbers stay the file's.
_SECTIONED = r"""
import json, sys, traceback
path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = open(path).read().splitlines(keepends=True)
ns = {"__name__": "__main__", "__file__": path}
part = lambda a, b: compile("\n" * a + "".join(lines[a:b]), path, "exec")
exec(part(0, start - 1), ns)
failure = None
try:
    exec(part(start - 1, end), ns)
except Exception as err:
    line = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == path][-1]
    failure = {"line": line, "error": f"{type(err).__name__}: {str(err)[:300]}"}
exec(part(end, len(lines)), ns)
print("SECTION-RESULT " + json.dumps(failure))
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_docs_script_runs(script):
    need = NEEDS.get(script.name)
    if need is not None and importlib.util.find_spec(need) is None:
        message = f"{script.name} needs {need} (the docs extra): pip install -e '.[docs]'"
        if os.environ.get("NATCHAIN_REQUIRE_DOCS_EXTRA"):
            pytest.fail(message)
        pytest.skip(message)
    if script.name not in LAYER_RECOGNITION_PENDING:
        result = _run([str(script)])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return
    lines = script.read_text().splitlines()
    start, end = _section(lines, "modular")
    result = _run(["-c", _SECTIONED, str(script), str(start), str(end)])
    # Everything outside the modular section must run today.
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    failure = json.loads(result.stdout.rsplit("SECTION-RESULT ", 1)[1])
    assert failure is not None, (
        f"{script.name} now runs in full: remove it from LAYER_RECOGNITION_PENDING."
    )
    line = failure["line"]
    pytest.xfail(
        f"{script.name}: layer granularity does not yet recognise this framework's dense "
        f"layer (line {line}: {lines[line - 1].strip()} -> {failure['error']})"
    )


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


def test_sectioned_runner_records_a_failing_section_and_runs_the_rest(tmp_path):
    script = tmp_path / "demo.py"
    body = ["a = 1", "# --8<-- [start:modular]", "raise ValueError('x')", "# --8<-- [end:modular]"]
    script.write_text("\n".join([*body, "assert a == 1", "print('after')"]) + "\n")
    result = _run(["-c", _SECTIONED, str(script), "2", "4"])
    assert result.returncode == 0, result.stderr
    assert "after" in result.stdout
    assert json.loads(result.stdout.rsplit("SECTION-RESULT ", 1)[1])["line"] == 3
    script.write_text("\n".join([*body[:2], "b = 2", body[3], "assert b == 2"]) + "\n")
    result = _run(["-c", _SECTIONED, str(script), "2", "4"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.rsplit("SECTION-RESULT ", 1)[1]) is None
