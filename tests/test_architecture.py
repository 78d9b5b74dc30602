"""The layering holds: imports run one way, and across packages only through declared names.

- import-linter (contracts in pyproject.toml): benchmarks -> export | finetune -> zoo -> rlrr -> adapters.
- import-linter sees modules, not names: the AST check below makes every use of another project
  package go through a name in its `__init__`'s `__all__` (`rlrr.apply`, `from zoo import build`),
  never a submodule (`rlrr.state`, `from zoo.build import x`).
- Only `rlrr` touches `torch.nn.utils.parametrize`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapters", "rlrr", "zoo", "export", "finetune", "benchmarks")
PARAMETRIZE_OWNER = "rlrr"


def public_names(package: str) -> set[str]:
    return set(importlib.import_module(package).__all__)


def violations(source: str, own: str, filename: str = "<source>") -> list[str]:
    """Uses of other project packages that bypass their `__all__`, and parametrize outside its owner."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    bound: dict[str, str] = {}  # local name -> project package it names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if alias.name.startswith("torch.nn.utils.parametrize") and own != PARAMETRIZE_OWNER:
                    found.append(f"{filename}:{node.lineno} imports {alias.name} (only {PARAMETRIZE_OWNER} may)")
                if top in PACKAGES and top != own:
                    if alias.name != top:
                        found.append(f"{filename}:{node.lineno} imports submodule {alias.name}")
                    bound[alias.asname or top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top = node.module.split(".")[0]
            names = [a.name for a in node.names]
            if node.module == "torch.nn.utils" and "parametrize" in names and own != PARAMETRIZE_OWNER:
                found.append(f"{filename}:{node.lineno} imports torch.nn.utils.parametrize (only {PARAMETRIZE_OWNER} may)")
            if top in PACKAGES and top != own:
                if node.module != top:
                    found.append(f"{filename}:{node.lineno} imports from submodule {node.module}")
                else:
                    found += [f"{filename}:{node.lineno} imports {top}.{n}, not in {top}.__all__" for n in names if n not in public_names(top)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            package = bound[node.value.id]
            if node.attr not in public_names(package):
                found.append(f"{filename}:{node.lineno} uses {package}.{node.attr}, not in {package}.__all__")
    return found


def test_import_linter_contracts_are_kept() -> None:
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_use_each_other_only_through_declared_names(package: str) -> None:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        found += violations(path.read_text(), package, str(path.relative_to(ROOT)))
    assert found == []


def test_every_declared_name_exists() -> None:
    for package in PACKAGES:
        module = importlib.import_module(package)
        missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
        assert missing == [], f"{package}.__all__ names what it does not have: {missing}"


@pytest.mark.parametrize("source, expected", [
    ("from rlrr.state import read_adapter_file", "imports from submodule rlrr.state"),
    ("import rlrr.inject", "imports submodule rlrr.inject"),
    ("from rlrr import _Undo", "imports rlrr._Undo, not in rlrr.__all__"),
    ("import rlrr\nrlrr.multi.BANK", "uses rlrr.multi, not in rlrr.__all__"),
    ("import zoo as z\nz.weights", "uses zoo.weights, not in zoo.__all__"),
    ("from torch.nn.utils import parametrize", "only rlrr may"),
])
def test_the_name_check_catches_each_kind_of_breach(source: str, expected: str) -> None:
    found = violations(source, own="export")
    assert any(expected in f for f in found), found


def test_the_name_check_accepts_public_names() -> None:
    assert violations("import rlrr\nfrom zoo import build\nrlrr.apply\nfrom rlrr.api import x", own="rlrr") == []
