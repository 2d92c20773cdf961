"""The layering the README's layout map states, checked on every import in the source tree:
brainmri <- components <- kfp_components <- pipelines; serving imports only brainmri; the
step logic never imports KFP (KFP strips ``dsl.component`` inside a running task)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import
ALLOWED = {
    "brainmri": {"brainmri"},
    "components": {"brainmri", "components"},
    "serving": {"brainmri", "serving"},
    "pipelines": {"brainmri", "components", "pipelines", "serving"},
}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_module_imports_a_higher_layer(package: str) -> None:
    wrong = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / package).glob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] in ALLOWED and module.split(".")[0] not in ALLOWED[package]
    }
    assert not wrong


def test_step_logic_never_imports_kfp() -> None:
    wrong = {
        path.name
        for path in (ROOT / "components").glob("*.py")
        if path.name != "kfp_components.py"
        and any(m.split(".")[0] == "kfp" for m in imported_modules(path))
    }
    assert not wrong
