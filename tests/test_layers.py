"""The import direction: passes/ is the lower layer (never imports onnxvit or torch), nothing imports in
a cycle, and what needs no model (checking a config, listing passes) imports no torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("onnxvit", "passes")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_passes_never_imports_onnxvit():
    offenders = {
        name: sorted(m for m in deps if m.startswith("onnxvit"))
        for name, deps in _graph().items()
        if name.startswith("passes")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _loaded_after(code: str) -> dict[str, bool]:
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in ('torch', 'onnxvit', 'timm')}}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_passes_loads_neither_onnxvit_nor_torch():
    assert _loaded_after("import passes") == {"torch": False, "onnxvit": False, "timm": False}


def test_every_pass_module_loads_neither_onnxvit_nor_torch():
    from passes import PASS_MODULES

    for module in sorted(set(PASS_MODULES.values())):
        assert _loaded_after(f"import passes.{module}") == {"torch": False, "onnxvit": False, "timm": False}, module


def test_config_validation_and_pass_listing_import_no_torch():
    example = REPO / "examples" / "deit_tiny_mixed.yaml"
    loaded = _loaded_after(f"from onnxvit.config import load_config; load_config({str(example)!r})")
    assert not loaded["torch"] and not loaded["timm"]
    listing = _loaded_after(
        "from click.testing import CliRunner; from onnxvit.cli import main\n"
        "result = CliRunner().invoke(main, ['passes']); assert result.exit_code == 0, result.output"
    )
    assert not listing["torch"]


def test_the_lazy_registry_names_every_pass_where_it_lives():
    from passes import PASS_MODULES, get_pass

    for name, module in PASS_MODULES.items():
        cls = get_pass(name)
        assert cls.name == name and cls.__module__ == f"passes.{module}"
    defined = {
        node.value.value
        for p in (REPO / "passes").glob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["name"]
    }
    assert defined == set(PASS_MODULES)  # a new pass without a registry entry fails here


def test_the_report_writer_knows_no_pass():
    from passes import PASS_MODULES

    source = (REPO / "onnxvit" / "report.py").read_text()
    assert not [name for name in PASS_MODULES if name in source]


def test_the_committed_reference_is_current():
    from onnxvit.reference import reference

    committed = (REPO / "docs" / "reference.md").read_text()
    assert committed == reference(), "docs/reference.md is stale: run `onnxvit reference > docs/reference.md`"


def test_every_option_is_described():
    from onnxvit.reference import reference

    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert rows and not [row for row in rows if row.rstrip().endswith("|  |")]
