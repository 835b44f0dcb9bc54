"""The sandbox a stdio upstream runs in: `tools.sandbox` (bubblewrap), with what this upstream may see of the host.

A command keyturn starts acts on the agent's arguments, so it runs out of keyturn's reach, like the shell pack's
commands: its own PID namespace (keyturn's processes and their `/proc/<pid>/environ` do not exist there), no
capabilities, no network unless the upstream's `network: true`, the system read-only, and of the rest of the host
only:

- its runtime, read-only, found from the command: the executable (`shutil.which`, symlinks followed), the
  interpreter its `#!` line names (`#!/usr/bin/env node` too), a Python virtualenv whole with the base Python its
  `pyvenv.cfg` points to (`home`), the topmost `node_modules` tree a script lies in, an interpreter's prefix (the
  parent of its `bin/`), else the file alone; `ro_paths` adds more;
- the files and directories its arguments name (`mount_args`, default on), read-only: a server told to act on a
  directory can read it, and writes only where the user said so;
- `mounts`, each read-only unless `writable: true`.

keyturn's state (ledger, `-wal`/`-shm`, every `<ledger>.*` secret, config, policy, secret store) is masked wherever
it lies under a mount, computed again at every (re)start. HOME and TMPDIR are the sandbox's private `/tmp`
unless `env` sets them. bubblewrap's own failure to start the command (it does not exist in the sandbox, a mount
failed) is read from the upstream's stderr (`StderrRelay`) and reported as such, not retried as a crash.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import anyio
import anyio.abc

from server.errors import ConfigError
from server.proxy.config import UpstreamConfig
from tools.sandbox import SYSTEM_PATHS, Sandbox, SandboxUnavailable, sandbox_failure

log = logging.getLogger(__name__)

SANDBOX_HOME = "/tmp"  # the sandbox's own tmpfs: private, writable, gone with the process
_INTERPRETERS = ("python", "node", "nodejs", "bun", "deno")
_VIRTUAL = (Path("/proc"), Path("/dev"), Path("/sys"))
_SHEBANG_MAX = 512
_FIX = "install bubblewrap (`apt-get install bubblewrap`; it needs Linux), or run this upstream unsandboxed with " \
       "`sandbox: off` on the upstream (on the command line: keyturn proxy --no-sandbox)"


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _system(path: Path) -> bool:
    return any(_inside(path, Path(p)) for p in SYSTEM_PATHS)


def _runtime_of(path: Path) -> list[Path]:
    """What must be visible for the program or script at `path` to run: see the module docstring."""
    if _system(path):
        return []
    for parent in path.parents:  # a virtualenv: its root holds pyvenv.cfg
        if (parent / "pyvenv.cfg").is_file():
            found = [parent]
            for line in (parent / "pyvenv.cfg").read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "home" and value.strip():
                    home = _real(value.strip())
                    found += _runtime_of(home / "python") if home.name == "bin" else [home]
            return found
    modules = [p for p in path.parents if p.name == "node_modules"]
    if modules:
        return [modules[-1]]  # the topmost: packages installed beside it are found there
    if path.name.startswith(_INTERPRETERS) and path.parent.name == "bin" and path.parent.parent != Path("/"):
        return [path.parent.parent]  # its prefix: the standard library, the runtime's own modules
    return [path]


def _interpreter(program: Path, path_env: str | None) -> str | None:
    """The interpreter a script's `#!` line names (`env` resolved on the upstream's PATH), or None."""
    try:
        with open(program, "rb") as f:
            head = f.read(_SHEBANG_MAX)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if not words:
        return None
    if Path(words[0]).name == "env":
        names = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        return shutil.which(names[0], path=path_env) if names else None
    return words[0]


def runtime_paths(program: str, path_env: str | None) -> tuple[str, list[Path]]:
    """The executable `program` names (on `path_env`, as the upstream's PATH) and the paths it needs to run."""
    found = shutil.which(program, path=path_env)
    if found is None:
        raise FileNotFoundError(f"{program}: no such command (looked on the upstream's PATH)")
    # Its directory by real path (mounts are made at real paths), its own name kept: a venv's `python` symlink
    # must be run by that name for Python to find its venv.
    executable = str(_real(os.path.dirname(os.path.abspath(found))) / os.path.basename(found))
    paths: list[Path] = []
    todo: list[str] = [executable]
    for _ in range(4):  # an interpreter of an interpreter ... (bounded: a `#!` loop ends here)
        if not todo:
            break
        current = todo.pop()
        for candidate in dict.fromkeys((Path(current), _real(current))):
            paths += _runtime_of(candidate)
        if (interpreter := _interpreter(_real(current), path_env)) is not None:
            todo.append(interpreter)
    return executable, list(dict.fromkeys(paths))


def _real_argument(arg: str, base: Path) -> str:
    """`arg` with an existing path in it (`PATH`, `--opt=PATH`) given by its real path: mounts are made at real
    paths, so a symlink on the way (`/home/u -> /data/home/u`) does not exist in the sandbox."""
    flag, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    if not value or "\x00" in value:
        return arg
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    try:
        if not path.exists() or not Path(value).is_absolute() or _real(path) == Path(os.path.abspath(path)):
            return arg
    except OSError:
        return arg
    return f"{flag}{sep}{_real(path)}"


def _argument_paths(args: Iterable[str], base: Path) -> list[Path]:
    """Existing files and directories the arguments name (`DIR`, `--opt=DIR`), relative ones from `base`."""
    found: list[Path] = []
    for arg in args:
        for value in dict.fromkeys((arg, arg.partition("=")[2] if arg.startswith("-") else "")):
            if not value or "\x00" in value:
                continue
            path = Path(os.path.expanduser(value))
            path = path if path.is_absolute() else base / path
            try:
                if not path.exists():
                    continue
            except OSError:
                continue
            real = _real(path)
            if real == Path("/") or _system(real) or any(_inside(real, v) or _inside(v, real) for v in _VIRTUAL):
                continue
            found += _runtime_of(real) if real.is_file() else [real]
    return found


@dataclass(frozen=True)
class UpstreamSandbox:
    """How one upstream's command is started in its sandbox; `argv()` is asked again at every (re)start."""

    upstream: str
    sandbox: Sandbox
    executable: str
    writable: tuple[Path, ...]
    read_only: tuple[Path, ...]  # the mounts that are not writable, and what the arguments name
    cwd: Path
    args: tuple[str, ...]  # the command's arguments, absolute paths in them by their real path

    @classmethod
    def plan(cls, config: UpstreamConfig, *, bwrap: str, env: Mapping[str, str],
             hidden: Callable[[], Iterable[Path]], base: Path | None = None) -> UpstreamSandbox:
        """Work out the mounts; `ConfigError` for a mount that does not exist or a cwd outside them,
        `FileNotFoundError` for a command that is not there. `base`: what relative paths are relative to."""
        assert config.command is not None
        where = f"upstream {config.name!r}"
        base = _real(config.cwd) if config.cwd else (base or Path.cwd())
        executable, runtime = runtime_paths(config.command, env.get("PATH"))
        writable: list[Path] = []
        read_only: list[Path] = []
        for mount in config.mounts:
            path = _real(os.path.expanduser(mount.path))
            if not path.exists():
                raise ConfigError(f"{where}: mount {mount.path} does not exist")
            (writable if mount.writable else read_only).append(path)
        ro_paths: list[Path] = []
        for extra in config.ro_paths:
            path = _real(os.path.expanduser(extra))
            if not path.exists():
                raise ConfigError(f"{where}: ro_paths: {extra} does not exist")
            ro_paths.append(path)
        mounted = [*writable, *read_only]
        # What the user mounted is mounted as they said: a runtime or argument path inside it adds nothing.
        ro_paths += [p for p in runtime if not any(_inside(p, m) for m in mounted)]
        if config.mount_args:
            read_only += [p for p in _argument_paths(config.args, base)
                          if not any(_inside(p, m) for m in [*mounted, *ro_paths])]
        every = [*writable, *read_only, *ro_paths]
        if config.cwd is not None:
            cwd = base
            if not any(_inside(cwd, m) for m in every) and not _inside(cwd, Path("/tmp")):
                raise ConfigError(f"{where}: cwd {config.cwd} is not inside one of its mounts "
                                  "(it would not exist in the sandbox): mount it, or pick a cwd inside a mount")
        else:  # keyturn's cwd when the upstream sees it (relative arguments then mean the same), else /
            here = _real(base)
            cwd = here if any(_inside(here, m) for m in [*writable, *read_only]) else Path("/")
        sandbox = Sandbox(bwrap=bwrap, network=config.network, ro_paths=tuple(dict.fromkeys(ro_paths)),
                          hidden=hidden)
        return cls(config.name, sandbox, executable, tuple(dict.fromkeys(writable)),
                   tuple(dict.fromkeys(read_only)), cwd, tuple(_real_argument(a, base) for a in config.args))

    def argv(self) -> list[str]:
        """bubblewrap's argv running the command, keyturn's state masked as it is now."""
        return self.sandbox.argv([self.executable, *self.args], cwd=self.cwd, writable=self.writable,
                                 read_only=self.read_only)

    def check_available(self) -> None:
        """Start a real sandbox with these mounts and check it (`tools.sandbox`); `SandboxUnavailable` names the fix."""
        try:
            self.sandbox.check_available(writable=self.writable, read_only=[*self.read_only])
        except SandboxUnavailable as e:
            reason = str(e).split("install bubblewrap", 1)[0].rstrip("; ").removesuffix("; else").rstrip("; ")
            raise SandboxUnavailable(f"upstream {self.upstream!r} cannot start in a sandbox: {reason}; {_FIX}") from None

    def describe(self) -> dict[str, Any]:
        """The sandbox's settings, for the ledger."""
        return {"upstream": self.upstream, "sandbox": "bubblewrap", "network": self.sandbox.network,
                "mounts": [{"path": str(p), "writable": True} for p in self.writable]
                + [{"path": str(p), "writable": False} for p in self.read_only],
                "runtime": [str(p) for p in self.sandbox.ro_paths], "cwd": str(self.cwd)}


def sandbox_env(env: dict[str, str], explicit: Mapping[str, str]) -> dict[str, str]:
    """The upstream's environment in its sandbox: HOME and TMPDIR are its private /tmp unless set explicitly."""
    return {**env, **{k: SANDBOX_HOME for k in ("HOME", "TMPDIR") if k not in explicit}}


class StderrRelay:
    """An upstream's stderr: each chunk passed on to keyturn's stderr as it comes; the first bytes kept, so that
    bubblewrap's own failure (its message opens stderr, before the command runs) can be told from a crash."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self._out = out
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self.errlog: TextIO = os.fdopen(write_fd, "w")
        self._head = b""
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> StderrRelay:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._forward)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        self.errlog.close()
        while self._drain():
            pass
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            os.close(self._read_fd)

    def failure(self) -> Exception | None:
        """bubblewrap's failure to start the command, if that is what happened (after the process ended)."""
        while self._drain():
            pass
        error = sandbox_failure(1, self._head.decode(errors="replace"))
        if error is None or isinstance(error, FileNotFoundError | PermissionError):
            return error
        return ConfigError(f"sandbox: {error}")

    def _drain(self) -> bool | None:
        """Pass on one chunk: True; nothing to read now: False; the end (every writer closed): None."""
        try:
            chunk = os.read(self._read_fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            return None
        if not chunk:
            return None
        if len(self._head) < _SHEBANG_MAX:
            self._head += chunk[:_SHEBANG_MAX - len(self._head)]
        try:
            self._out.write(chunk.decode(errors="replace"))
            self._out.flush()
        except (OSError, ValueError):
            pass
        return True

    async def _forward(self) -> None:
        while True:
            await anyio.wait_readable(self._read_fd)
            while (more := self._drain()) is True:
                pass
            if more is None:
                return
