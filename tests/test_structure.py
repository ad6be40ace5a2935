"""The library's structural rules (scripts/check_structure.py): no import cycle, small classes and modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_structure.py"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_structure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checker_finds_a_cycle_hidden_in_a_function_and_oversized_code(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from pkg.a import f\n" + "class Big:\n" + "    x = 1\n" * 300)
    (pkg / "d.py").write_text("\n" * 601)
    problems = load_checker().check(pkg)
    assert "import cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a" in problems
    assert any("class Big has 301 lines" in p for p in problems)
    assert any(p.endswith("d.py: 601 lines (limit 600)") for p in problems)
    assert len(problems) == 3  # a package importing its own submodule is no cycle


def test_surgery_has_no_cycle_no_big_class_no_big_module():
    assert load_checker().check(ROOT / "surgery") == []


def test_every_package_ships_in_the_wheel():
    """A subpackage missing from pyproject's list works in an editable install and breaks a real one."""
    tomllib = __import__("pytest").importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "surgery").rglob("__init__.py")} | {
        "surgery_cli"
    }
    assert found - listed == set()
