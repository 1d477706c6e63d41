"""The package's shape, checked on every run beside `lint-imports` (the floors):
no module, test or benchmark reaches into another module's `_private` names."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _python_files() -> list[Path]:
    return sorted(
        path for folder in ("jobs_app", "tests", "bench") for path in (REPO / folder).rglob("*.py")
    )


def _reaches(tree: ast.Module) -> list[str]:
    """`from jobs_app.x import _name`, and `module._name` on a jobs_app module imported
    as `module`."""
    found: list[str] = []
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobs_app"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jobs_app"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_another_modules_private_names() -> None:
    offences = {
        str(path.relative_to(REPO)): reached
        for path in _python_files()
        if (reached := _reaches(ast.parse(path.read_text())))
    }
    assert offences == {}


def test_the_check_sees_a_private_import() -> None:
    tree = ast.parse(
        "from jobs_app.services import jobs\njobs._HIDDEN\nfrom jobs_app.db import _x\n"
    )
    assert _reaches(tree) == ["from jobs_app.db import _x", "jobs._HIDDEN"]
