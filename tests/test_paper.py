"""The paper is built from ``results/``: no hand-typed numbers, generated files reproduce.

**The number rule.** In the hand-written ``paper/*.tex`` every digit-bearing number must
come from a generated macro (``paper/generated/numbers.tex``) or a generated table, with
these exceptions, which are not measurements:

- single-digit integers ``0``–``9`` (mathematical constants and indices such as
  ``\\tfrac12``, ``1/N``, ``\\ell_2``, "Theorem 1");
- years ``1900``–``2099`` (as in "Amari 1998");
- anything inside a comment or inside the arguments of referencing and layout commands
  (``\\cite``, ``\\ref``, ``\\label``, ``\\input``, ``\\includegraphics``, ``\\usepackage``,
  ``\\documentclass``, ``\\begin``/``\\end``, ``\\IfFileExists``, ``\\bibliography``, ``\\test``
  — the last names a test function).

Anything else — a decimal, a percentage, a count of two digits or more — fails the test.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "paper"
GENERATE = PAPER / "scripts" / "generate.py"

_SKIP_ARGS = (
    "cite",
    "citet",
    "citep",
    "citealp",
    "citeauthor",
    "ref",
    "eqref",
    "label",
    "input",
    "include",
    "includegraphics",
    "usepackage",
    "documentclass",
    "begin",
    "end",
    "IfFileExists",
    "bibliography",
    "bibliographystyle",
    "test",
)
_COMMAND = re.compile(r"\\(" + "|".join(_SKIP_ARGS) + r")\*?(\s*\[[^\]]*\])*\s*\{[^{}]*\}")
_NUMBER = re.compile(r"(?<![A-Za-z\\])\d+(?:[.,]\d+)*")


def _strip(text: str) -> str:
    text = re.sub(r"(?<!\\)%.*", "", text)  # comments
    return _COMMAND.sub(" ", text)


def hand_typed_numbers(text: str) -> list[str]:
    """Digit-bearing tokens of ``text`` that the number rule (module docstring) refuses."""
    bad = []
    for tok in _NUMBER.findall(_strip(text)):
        if re.fullmatch(r"\d", tok) or re.fullmatch(r"(19|20)\d\d", tok):
            continue
        bad.append(tok)
    return bad


def test_paper_number_rule_catches_typed_numbers():
    assert hand_typed_numbers(r"accuracy 95.8\% in 12 runs") == ["95.8", "12"]
    assert hand_typed_numbers(r"\citep{amari1998natural} in 1998, $\tfrac12$, 1/N") == []
    assert (
        hand_typed_numbers("% 0.83 in a comment\n\\includegraphics[width=0.6\\linewidth]{f}") == []
    )


def test_paper_has_no_hand_typed_numbers():
    sources = sorted(PAPER.glob("*.tex"))
    assert sources, "paper/*.tex not found"
    found = {p.name: hand_typed_numbers(p.read_text()) for p in sources}
    assert not any(found.values()), f"numbers not produced by a generator: {found}"


def test_paper_macros_used_are_generated():
    defined = set(
        re.findall(r"\\newcommand\{\\(Num\w+)\}", (PAPER / "generated/numbers.tex").read_text())
    )
    for tex in PAPER.glob("*.tex"):
        used = set(re.findall(r"\\(Num[A-Za-z]+)", tex.read_text()))
        assert used <= defined, f"{tex.name} uses undefined macros {sorted(used - defined)}"


def test_paper_generated_files_reproduce_from_results(tmp_path):
    """Regenerating from the committed ``results/`` gives the committed files byte for byte."""
    subprocess.run(
        [sys.executable, str(GENERATE), "--results", str(ROOT / "results"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.tex")}
    committed = {p.name: p.read_text() for p in (PAPER / "generated").glob("*.tex")}
    assert sorted(fresh) == sorted(committed)
    for name, text in fresh.items():
        assert text == committed[name], f"paper/generated/{name} is stale: run make -C paper"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_paper_figures_build_from_results(tmp_path):
    subprocess.run(
        [sys.executable, str(PAPER / "scripts" / "figures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert {p.name for p in tmp_path.glob("*.pdf")} == {
        "training_curves.pdf",
        "fisher_field.pdf",
        "fisher_one_step.pdf",
        "saturation.pdf",
        "agreement.pdf",
        "cost.pdf",
        "nullspace.pdf",
    }
