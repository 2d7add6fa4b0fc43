"""The arrows of DESIGN.md, checked by walking every import with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tunnel", "server", "client", "homeport")
#: What each package may import from the project.
ALLOWED = {
    "tunnel": {"tunnel"},
    "server": {"tunnel", "server"},
    "client": {"tunnel", "client"},
    "homeport": {"tunnel", "server", "client", "homeport"},
}
#: The sans-I/O core: no event loop, no sockets, no clock, no I/O libraries.
PURE = ("errors", "frames", "events", "window", "mux", "backoff")
FORBIDDEN_IN_PURE = {
    "asyncio",
    "socket",
    "ssl",
    "time",
    "websockets",
    "aiohttp",
    "uvloop",
    "httptools",
    "selectors",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_only_the_allowed_way(package: str) -> None:
    wrong = []
    for path in modules(package):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", PURE)
def test_the_protocol_core_does_no_io(module: str) -> None:
    names = {n.split(".")[0] for n in imports_of(ROOT / "tunnel" / f"{module}.py")}
    assert not names & FORBIDDEN_IN_PURE


def test_the_checker_catches_a_wrong_arrow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from server.proxy import PublicServer\nimport asyncio\n")
    assert {"server.proxy", "asyncio"} <= imports_of(bad)
