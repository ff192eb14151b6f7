"""Layers that never import upward: the product package never imports the development stack,
and the lifecycle core imports no I/O (kopf's `_cogs` never imports `_core`, the same idea)."""
import ast
from pathlib import Path

import pytest

OPERATOR = Path(__file__).resolve().parents[2] / "operator"
# what the core may import: the standard library's pure parts, pydantic models, itself
CORE_FORBIDDEN = ("kopf", "kubernetes_asyncio", "libvirt", "aiohttp", "asyncio", "subprocess", "socket",
                  "os", "threading", "novalet.kube", "novalet.virt", "novalet.agent", "novalet.controller",
                  "novalet_dev")


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved in `package`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module)
    return names


def modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(OPERATOR).with_suffix("")
        package = ".".join(rel.parts[:-1])  # a module and its package's __init__ resolve alike
        yield path, package


@pytest.mark.parametrize("path,package", list(modules(OPERATOR / "novalet")), ids=lambda v: str(v)[-40:])
def test_the_product_never_imports_the_development_stack(path, package):
    assert not {m for m in imports_of(path, package) if m.split(".")[0] == "novalet_dev"}


@pytest.mark.parametrize("path,package", list(modules(OPERATOR / "novalet" / "core")), ids=lambda v: str(v)[-30:])
def test_the_core_imports_no_io(path, package):
    bad = {m for m in imports_of(path, package) if any(m == f or m.startswith(f + ".") for f in CORE_FORBIDDEN)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a relative import that climbs into the dev stack is caught."""
    sample = tmp_path / "m.py"
    sample.write_text("from ..agent import engine\nimport novalet_dev.cli\n")
    assert imports_of(sample, "novalet.core") == {"novalet.agent", "novalet_dev.cli"}


def test_dev_commands_come_in_through_the_entry_point():
    from novalet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["dev", "status"]).func is not None
