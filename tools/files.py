"""The files pack: read, write, move and delete files inside configured roots, and nowhere else.

Options (`tools: [{module: tools.files, options: {...}}]`):
  roots           directories the tools may touch (required). Relative roots are relative to the process's cwd;
                  a relative `path` argument is relative to the first root.
  max_read_bytes  bytes `files_read` returns at most (default 1 MiB); the true size is reported.

keyturn's own state is out of reach by construction, not by classification: a root that contains any of it (the
ledger and its `-wal`/`-shm` and `<ledger>.*` secrets, the config, the policy, the secret store; see
`server.execution.PackContext`), that lies inside it, or that contains or lies inside `/proc` (keyturn's process)
is a `ConfigError` at load. Roots are compared after resolving symlinks, so `/`, the ledger's directory, any
parent of it and a link to one of those are all refused. The shipped default policy lives in keyturn's checkout
(`policies/default.yaml`), so a root that contains the checkout is refused too unless `policy:` names a file
outside it. As a last guard `files_read` refuses to return a file that is one of keyturn's state files under
another name (a hard link).

Every path argument is resolved (symlinks followed) by `validate`, before any policy runs, and a path that lands
outside the roots is refused. The validated arguments carry the resolved paths, so the reviewer sees the real
target. Writes never follow a symlink at the final component.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio.to_thread
from pydantic import Field
from typing_extensions import TypedDict

from server.config import default_policy_path
from server.errors import ConfigError, InvalidArguments
from server.execution import PackContext
from server.guarded import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, cap_text, open_new, parse_options, real_roots, resolve_inside

PACK = "tools.files"


class FilesOptions(PackOptions):
    roots: list[str] = Field(min_length=1)
    max_read_bytes: int = Field(1_048_576, ge=0)


class ReadResult(TypedDict):
    path: str
    content: str
    size: int
    truncated: bool


class WriteResult(TypedDict):
    path: str
    bytes: int
    replaced: bool


class MoveResult(TypedDict):
    source: str
    destination: str


class DeleteResult(TypedDict):
    path: str
    was_directory: bool


def _read(path: Path, limit: int, context: PackContext) -> ReadResult:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) in _state_files(context):  # a hard link to keyturn's state inside a root
            raise PermissionError(f"{path} is one of keyturn's own state files under another name")
        size = st.st_size
        content, truncated = cap_text(f.read(limit + 1), limit)
    return {"path": str(path), "content": content, "size": size, "truncated": truncated}


def _state_files(context: PackContext) -> set[tuple[int, int]]:
    found = set()
    for p in context.existing_state():
        with contextlib.suppress(OSError):
            st = os.stat(p)
            found.add((st.st_dev, st.st_ino))
    return found


def _write(path: Path, content: str, overwrite: bool) -> WriteResult:
    data = content.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    replaced = path.exists()
    if not overwrite:
        with open_new(path, "wb", encoding=None) as f:  # refuses an existing file, and any symlink
            f.write(data)
        return {"path": str(path), "bytes": len(data), "replaced": False}
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    # Write beside, then rename over: a reader never sees half a file, and a symlink is replaced, not followed.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"path": str(path), "bytes": len(data), "replaced": replaced}


def _move(source: Path, destination: Path) -> MoveResult:
    if destination.exists() or destination.is_symlink():
        raise FileExistsError(f"{destination} already exists")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, destination)
    return {"source": str(source), "destination": str(destination)}


def _delete(path: Path) -> DeleteResult:
    if path.is_dir():
        path.rmdir()  # empty directories only: a recursive delete is not one call's worth of approval
        return {"path": str(path), "was_directory": True}
    path.unlink()
    return {"path": str(path), "was_directory": False}


def build_tools(opts: FilesOptions, context: PackContext | None = None) -> list[GuardedTool]:
    context = context if context is not None else PackContext()
    roots = real_roots(opts.roots)

    def inside(tool: str, args: dict[str, Any], *fields: str) -> dict[str, Any]:
        out = dict(args)
        for field in fields:
            real = resolve_inside(args[field], roots, tool=tool, field=field)
            if real in roots and tool != "files_read":
                raise InvalidArguments(f"{tool}: argument {field!r} is a root itself", tool=tool, field=field)
            out[field] = str(real)
        return out

    @guarded_tool(classifiers={"path": "path"}, annotations={"readOnlyHint": True, "openWorldHint": False}, roots=roots)
    async def files_read(path: str) -> ReadResult:
        """Read a text file (UTF-8; undecodable bytes replaced), up to the configured size."""
        return await anyio.to_thread.run_sync(_read, Path(path), opts.max_read_bytes, context)

    @guarded_tool(
        classifiers={"path": "path", "content": "size"},
        annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False},
        roots=roots,
    )
    async def files_write(path: str, content: str, overwrite: bool = False) -> WriteResult:
        """Write text to a file, creating parent directories. An existing file is replaced only with `overwrite`."""
        return await anyio.to_thread.run_sync(_write, Path(path), content, overwrite)

    @guarded_tool(
        classifiers={"source": "path", "destination": "path"},
        annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False},
        roots=roots,
    )
    async def files_move(source: str, destination: str) -> MoveResult:
        """Move or rename a file or directory. The destination must not exist."""
        return await anyio.to_thread.run_sync(_move, Path(source), Path(destination))

    @guarded_tool(
        classifiers={"path": "path"},
        annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False},
        roots=roots,
    )
    async def files_delete(path: str) -> DeleteResult:
        """Delete a file or an empty directory."""
        return await anyio.to_thread.run_sync(_delete, Path(path))

    files_read.check(lambda a: inside("files_read", a, "path"))
    files_write.check(lambda a: inside("files_write", a, "path"))
    files_move.check(lambda a: inside("files_move", a, "source", "destination"))
    files_delete.check(lambda a: inside("files_delete", a, "path"))

    @files_read.hint
    def _read_facts(args: dict[str, Any]) -> dict[str, Any]:
        p = Path(args["path"])
        return {"file": {"exists": p.exists(), "size": p.stat().st_size if p.is_file() else None}}

    @files_write.hint
    def _write_facts(args: dict[str, Any]) -> dict[str, Any]:
        p = Path(args["path"])
        facts = {"exists": p.exists(), "write_bytes": len(args["content"].encode("utf-8"))}
        return {"file": facts | ({"size": p.stat().st_size} if p.is_file() else {})}

    @files_move.hint
    def _move_facts(args: dict[str, Any]) -> dict[str, Any]:
        return {"file": _target_facts(Path(args["source"]))}

    @files_delete.hint
    def _delete_facts(args: dict[str, Any]) -> dict[str, Any]:
        return {"file": _target_facts(Path(args["path"]))}

    return [files_read, files_write, files_move, files_delete]


MAX_COUNTED = 10_000
"""Files a move or delete counts at most before saying "10,000+" (the count runs before the policy, on every call)."""


def _target_facts(path: Path) -> dict[str, Any]:
    """Whether `path` exists, its size (a file) or the bytes of the files under it (a directory), and how many files
    the call would move or delete (counted without following symlinks, up to `MAX_COUNTED`)."""
    if not path.exists() and not path.is_symlink():
        return {"exists": False, "files": 0}
    if not path.is_dir() or path.is_symlink():
        return {"exists": True, "size": path.lstat().st_size, "files": 1}
    files, size, capped = 0, 0, False
    for base, dirs, names in os.walk(path, followlinks=False):
        for name in names:
            files += 1
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(base, name)).st_size
            if files >= MAX_COUNTED:
                capped = True
                break
        if capped:
            break
        dirs.sort()
    return {"exists": True, "size": size, "files": files, "files_capped": capped}


def _what(path: Path, context: PackContext) -> str:
    if path == Path("/proc"):
        return "/proc (keyturn's process: its environment, memory and open files)"
    if path == context.ledger_path:
        return f"{path} (the ledger)"
    if context.ledger_path is not None and str(path).startswith(str(context.ledger_path)):
        return f"{path} (beside the ledger: its journal or secrets)"
    if path == default_policy_path():
        return f"{path} (the shipped default policy, in keyturn's checkout)"
    return f"{path} (keyturn's config, policy or secret store)"


def refuse_state(spelled: str, root: Path, context: PackContext) -> None:
    """Raise `ConfigError` when a tool working inside `root` could reach keyturn's own state or process."""
    reached = context.reaches_state(root)
    reached += [p for p in context.state_paths if root.is_relative_to(p) and p not in reached]  # inside a state dir
    if not reached:
        return
    shown = "; ".join(_what(p, context) for p in reached[:6]) + ("; ..." if len(reached) > 6 else "")
    where = repr(spelled) if Path(spelled) == root else f"{spelled!r} (resolves to {root})"
    fixes = []
    if context.ledger_path is not None and any(str(p).startswith(str(context.ledger_path)) for p in reached):
        fixes.append("move the ledger to a directory outside the root (`--db` or `db:` in the config)")
    if default_policy_path() in reached:
        fixes.append("give `--policy`/`policy:` a policy file outside the root (the default one is in keyturn's "
                     "checkout, under policies/, so a root that holds the checkout holds it)")
    if any(_what(p, context).endswith("secret store)") for p in reached):
        fixes.append("keep keyturn's config, policy and secret store outside the root")
    if Path("/proc") in reached:
        fixes.append("choose a root that neither contains nor lies inside /proc (so never `/`)")
    fixes.append("or choose a narrower root that holds only what agents may touch")
    raise ConfigError(
        f"tool pack {PACK!r}: roots: {where} contains keyturn's own state, which no tool may reach: {shown}. "
        f"To fix: {'; '.join(fixes)}."
    )


def register(registry: ToolRegistry, options: Mapping[str, Any], context: PackContext) -> None:
    opts = parse_options(FilesOptions, options, PACK)
    for spelled, root in zip(opts.roots, real_roots(opts.roots), strict=True):
        if not root.is_dir():
            raise ValueError(f"roots: {root} is not a directory")
        refuse_state(spelled, root, context)
    for tool in build_tools(opts, context):
        registry.add(tool)
