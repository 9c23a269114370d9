"""What pyproject.toml claims about the package holds: every module parses at the Python floor
of ``requires-python``, ruff lints for that same floor, and the dependency ranges admit the
torch versions the README names as tested."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _floor() -> tuple[int, int]:
    # a regex, not tomllib: tomllib is Python 3.11+, and the suite runs at the floor too
    m = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"\s*$', PYPROJECT, re.M)
    assert m, "pyproject.toml has no requires-python = \">=X.Y\" line"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("path", sorted((ROOT / "fusedres").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_parses_at_the_python_floor(path: Path) -> None:
    """Syntax newer than the floor (match at 3.9, except* at 3.10, ...) fails here. What the
    parser cannot see — a runtime ``X | Y`` of types (3.10), a stdlib name added later — is
    covered by the floor being at least what torch itself requires (3.10 from torch 2.9 on)."""
    ast.parse(path.read_text(), filename=str(path), feature_version=_floor())


def test_floor_is_what_the_code_and_torch_need() -> None:
    # fusedres/models.py evaluates `type[...] | type[...]` at import (PEP 604, Python 3.10)
    assert _floor() >= (3, 10)


def test_ruff_targets_the_floor() -> None:
    m = re.search(r'^target-version\s*=\s*"py(\d)(\d+)"\s*$', PYPROJECT, re.M)
    assert m, "pyproject.toml has no ruff target-version"
    assert (int(m.group(1)), int(m.group(2))) == _floor()


@pytest.mark.parametrize("torch_version", ["2.11.0", "2.14.1"])
def test_dependencies_admit_the_tested_torch(torch_version: str) -> None:
    """torch 2.11 (the GPU image) and 2.14 (CPU machines), as the README says."""
    packaging_version = pytest.importorskip("packaging.version")
    m = re.search(r'"torch>=([\d.]+)"', PYPROJECT)
    assert m, "pyproject.toml names no torch>= dependency"
    assert packaging_version.Version(torch_version) >= packaging_version.Version(m.group(1))
