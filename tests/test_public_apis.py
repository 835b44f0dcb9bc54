"""keyturn uses its dependencies through their public API only: no module under `server/`, `tools/`, `benchmarks/` or
`examples/` imports a private (`_`-prefixed) module or name of `mcp`, `mcp_types` or `aiosqlite`, reads a private
attribute of one of those modules, or a private attribute of an object it got from one of them."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("mcp", "mcp_types", "aiosqlite")
CHECKED = ("server", "tools", "benchmarks", "examples")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library(module: str) -> bool:
    return module.split(".")[0] in LIBRARIES


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def _root(node: ast.AST) -> str | None:
    """The name an expression starts from: `aiosqlite` for `await aiosqlite.connect(...).cursor()`."""
    while True:
        if isinstance(node, ast.Await):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        else:
            return node.id if isinstance(node, ast.Name) else None


class _Module:
    """What one module binds from the libraries: module aliases, imported names, and objects made from them."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.aliases: set[str] = set()  # names that are a library module or something imported from one
        self.bound: set[str] = set()  # dotted names holding objects made by a library (`db`, `self._db`)
        self.library_functions: set[str] = set()  # functions annotated to return a library's object
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _library(a.name):
                        self.aliases.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _library(node.module):
                self.aliases.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and self._mentions(node.returns):
                self.library_functions.add(node.name)
        for _ in range(3):  # until assignments of assignments are followed
            self._bind()

    def _mentions(self, annotation: ast.AST | None) -> bool:
        if annotation is None:
            return False
        return any(isinstance(n, ast.Name) and n.id in self.aliases for n in ast.walk(annotation))

    def _made_by_library(self, value: ast.AST | None) -> bool:
        if value is None:
            return False
        if (dotted := _dotted(value)) is not None and dotted in self.bound:
            return True
        if isinstance(value, ast.Await):
            value = value.value
        if isinstance(value, ast.Call) and (name := _dotted(value.func)) is not None:
            if name.rsplit(".", 1)[-1] in self.library_functions and (name.count(".") == 0 or name.startswith("self.")):
                return True
        return _root(value) in self.aliases and _dotted(value) not in self.aliases

    def _bind(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.AnnAssign):
                if self._mentions(node.annotation) or self._made_by_library(node.value):
                    self._add(node.target)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        for t, v in zip(target.elts, node.value.elts, strict=False):
                            if self._made_by_library(v):
                                self._add(t)
                    elif self._made_by_library(node.value):
                        self._add(target)
            elif isinstance(node, ast.arg) and self._mentions(node.annotation):
                self.bound.add(node.arg)

    def _add(self, target: ast.AST) -> None:
        if (dotted := _dotted(target)) is not None:
            self.bound.add(dotted)

    def findings(self) -> Iterator[tuple[int, str, str]]:
        """(line, private name, what) for each use of a library's private API."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if _library(a.name) and any(_private(p) for p in parts):
                        yield node.lineno, next(p for p in parts if _private(p)), f"import {a.name}"
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _library(node.module):
                parts = node.module.split(".")
                if any(_private(p) for p in parts):
                    yield node.lineno, next(p for p in parts if _private(p)), f"from {node.module} import ..."
                for a in node.names:
                    if _private(a.name):
                        yield node.lineno, a.name, f"from {node.module} import {a.name}"
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                base = _dotted(node.value)
                if base is None:
                    continue
                if base.split(".")[0] in self.aliases and base not in self.bound:
                    yield node.lineno, node.attr, f"{base}.{node.attr} (a private name of a library module)"
                elif base in self.bound:
                    yield node.lineno, node.attr, f"{base}.{node.attr} (a private attribute of a library's object)"


def findings(source: str) -> list[tuple[int, str, str]]:
    return sorted(set(_Module(ast.parse(source)).findings()))


def checked_files() -> list[Path]:
    return sorted(p for top in CHECKED for p in (ROOT / top).rglob("*.py"))


def test_no_module_uses_a_private_name_of_mcp_mcp_types_or_aiosqlite() -> None:
    found = []
    for path in checked_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, _, what in findings(path.read_text(encoding="utf-8")):
            found.append(f"{rel}:{line}: {what}")
    assert found == [], "private APIs of dependencies in use:\n" + "\n".join(found)


def test_the_check_finds_each_kind_of_private_use() -> None:
    source = (
        "import aiosqlite\n"
        "import mcp\n"
        "import mcp._y\n"
        "import mcp_types as types\n"
        "from mcp.client._transport import Transport\n"
        "from mcp.client.session import _x\n"
        "from mcp.server import lowlevel\n"
        "span = mcp.server._otel\n"
        "low = lowlevel._hidden\n"
        "v = types._version\n"
        "class Store:\n"
        "    def __init__(self) -> None:\n"
        "        self._db: aiosqlite.Connection | None = None\n"
        "    async def open(self) -> None:\n"
        "        self._db = await aiosqlite.connect('x')\n"
        "        await self._db._execute(print, self._db._conn)\n"
        "    def _open(self) -> aiosqlite.Connection:\n"
        "        return self._db\n"
        "    async def unit(self) -> None:\n"
        "        db = self._open()\n"
        "        db._tx\n"
    )
    assert [(line, name) for line, name, _ in findings(source)] == [
        (3, "_y"), (5, "_transport"), (6, "_x"), (8, "_otel"), (9, "_hidden"), (10, "_version"),
        (16, "_conn"), (16, "_execute"), (21, "_tx")]


def test_the_check_leaves_public_use_and_keyturns_own_private_names_alone() -> None:
    source = (
        "import aiosqlite\n"
        "import mcp_types as types\n"
        "from mcp.client import Transport\n"
        "class Store:\n"
        "    def __init__(self) -> None:\n"
        "        self._db: aiosqlite.Connection | None = None\n"
        "        self._count = 0\n"
        "    async def open(self) -> None:\n"
        "        self._db = await aiosqlite.connect('x')\n"
        "        self._private_helper()\n"
        "        await self._db.execute('SELECT 1')\n"
        "        print(types.__name__, self._count)\n"
    )
    assert findings(source) == []
