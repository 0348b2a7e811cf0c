"""Imports only go down: pipeline/ on top; passes/, export/, engines/ below it; calibrate/ below
them; core/ at the bottom. The test walks the AST of every module (imports inside functions
and under ``if TYPE_CHECKING`` count too) and names each import that goes up or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOOR = {"core": 0, "calibrate": 1, "passes": 2, "export": 2, "engines": 2, "pipeline": 3}
"""Floor of each top-level package. A module may import packages on lower floors, and its own
package; not a package on its own floor (siblings stay independent) or above."""


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``path`` that names a project package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in FLOOR:
                out.append((node.lineno, top))
    return out


def violations() -> list[str]:
    bad = []
    for pkg, floor in FLOOR.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, top in imported_packages(path):
                if top != pkg and FLOOR[top] >= floor:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {top} (floor {FLOOR[top]}) from floor {floor}")
    return bad


def test_imports_only_go_down():
    bad = violations()
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_checker_catches_an_upward_import(tmp_path, monkeypatch):
    # the check itself must be able to fail: a fake lower-floor module that imports pipeline
    fake = tmp_path / "calibrate"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from pipeline.build import Builder\n    return Builder\n", encoding="utf-8")
    assert imported_packages(fake / "bad.py") == [(2, "pipeline")]
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    for pkg in FLOOR:
        (tmp_path / pkg).mkdir(exist_ok=True)
    assert violations() == ["calibrate/bad.py:2 imports pipeline (floor 3) from floor 1"]


@pytest.mark.parametrize("pkg", sorted(FLOOR))
def test_every_package_exists(pkg):
    assert (ROOT / pkg / "__init__.py").is_file()
