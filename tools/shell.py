"""The shell pack: run one command, without a shell unless asked, in an allowed directory, with a time limit.

Options (`tools: [{module: tools.shell, options: {...}}]`):
  cwd_roots        directories a command may run in (default: the process's cwd); the first is the default cwd.
  default_timeout  seconds when the call gives none (default 30); `max_timeout` caps what a call may ask (600).
  max_output       bytes kept of stdout and of stderr each (default 65536); the true sizes are reported.
  inherit_env      environment variables passed through from keyturn's own environment (default: PATH, HOME,
                   LANG, LC_ALL, TERM, TMPDIR, USER); `env` adds fixed ones. keyturn's own tokens stay out.

A command is killed with its whole process group when it times out, when the call is cancelled, and when it
exits, so nothing it started in the background outlives the call.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.abc
from pydantic import Field
from typing_extensions import TypedDict

from server.errors import InvalidArguments
from server.registry import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, cap_text, parse_options, real_roots, resolve_inside

PACK = "tools.shell"
_DRAIN_GRACE_S = 2.0


class ShellOptions(PackOptions):
    cwd_roots: list[str] = Field(default_factory=lambda: ["."])
    default_timeout: float = Field(30.0, gt=0)
    max_timeout: float = Field(600.0, gt=0)
    max_output: int = Field(65_536, ge=0)
    inherit_env: list[str] = Field(default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER"])
    env: dict[str, str] = Field(default_factory=dict)


class ShellResult(TypedDict):
    exit_code: int | None  # negative: killed by that signal
    timed_out: bool
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool
    duration_s: float


class _Capture:
    """Reads a pipe to its end, keeping the first `limit` bytes and counting all of them."""

    def __init__(self, limit: int) -> None:
        self.limit, self.kept, self.size = limit, bytearray(), 0
        self.done = anyio.Event()

    async def drain(self, stream: anyio.abc.ByteReceiveStream | None) -> None:
        try:
            if stream is not None:
                async for chunk in stream:
                    self.size += len(chunk)
                    room = self.limit - len(self.kept)
                    if room > 0:
                        self.kept += chunk[:room]
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            self.done.set()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_command(
    argv: list[str], *, cwd: str, time_limit: float, max_output: int, env: Mapping[str, str]
) -> ShellResult:
    """Run `argv` in its own session; capture capped output; kill the process group on timeout or cancel."""
    started = time.monotonic()
    out, err = _Capture(max_output), _Capture(max_output)
    timed_out = False
    proc = await anyio.open_process(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(out.drain, proc.stdout)
            tg.start_soon(err.drain, proc.stderr)
            with anyio.move_on_after(time_limit) as deadline:
                await proc.wait()
            timed_out = deadline.cancelled_caught
            _kill_group(proc.pid)
            await proc.wait()
            # A process that left the group can still hold the pipes open: read what is there, then stop.
            with anyio.move_on_after(_DRAIN_GRACE_S):
                await out.done.wait()
                await err.done.wait()
            tg.cancel_scope.cancel()
    finally:
        _kill_group(proc.pid)
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    stdout, cut_out = cap_text(bytes(out.kept), max_output)
    stderr, cut_err = cap_text(bytes(err.kept), max_output)
    return {
        "exit_code": None if timed_out else proc.returncode,
        "timed_out": timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_bytes": out.size,
        "stderr_bytes": err.size,
        "truncated": cut_out or cut_err or out.size > max_output or err.size > max_output,
        "duration_s": round(time.monotonic() - started, 3),
    }


def build_tools(opts: ShellOptions, environ: Mapping[str, str]) -> list[GuardedTool]:
    roots = real_roots(opts.cwd_roots)
    env = {k: environ[k] for k in opts.inherit_env if k in environ} | opts.env

    @guarded_tool(
        classifiers={"command": "shell", "argv": "argv", "cwd": "path"},
        annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": True},
        roots=roots,
    )
    async def shell_run(
        command: str | None = None,
        argv: list[str] | None = None,
        cwd: str | None = None,
        timeout: Annotated[float, Field(gt=0)] = opts.default_timeout,
        use_shell: bool = False,
    ) -> ShellResult:
        """Run a command and return its exit code and (capped) output.

        Give `argv` (a list) or `command` (split like a POSIX shell would, but no shell runs it). Only with
        `use_shell` is `command` given to /bin/sh, so pipes, globs and redirections work.
        """
        if use_shell:
            args = ["/bin/sh", "-c", command or ""]
        else:
            args = argv if argv is not None else shlex.split(command or "")
        assert cwd is not None  # the check fills it in
        return await run_command(args, cwd=cwd, time_limit=timeout, max_output=opts.max_output, env=env)

    @shell_run.check
    def _shell_check(args: dict[str, Any]) -> dict[str, Any]:
        command, argv = args["command"], args["argv"]
        if (command is None) == (argv is None):
            raise InvalidArguments("shell_run: give exactly one of 'command' or 'argv'", tool="shell_run")
        if args["use_shell"] and command is None:
            raise InvalidArguments("shell_run: 'use_shell' needs 'command'", tool="shell_run", field="use_shell")
        if command is not None and not args["use_shell"]:
            try:
                split = shlex.split(command)
            except ValueError as e:
                raise InvalidArguments(f"shell_run: 'command' {e}", tool="shell_run", field="command") from None
            if not split:
                raise InvalidArguments("shell_run: 'command' is empty", tool="shell_run", field="command")
        if argv is not None and (not argv or not argv[0]):
            raise InvalidArguments("shell_run: 'argv' must name a program", tool="shell_run", field="argv")
        if any("\x00" in part for part in [command or "", *(argv or [])]):
            raise InvalidArguments("shell_run: NUL bytes are not allowed", tool="shell_run")
        if args["timeout"] > opts.max_timeout:
            raise InvalidArguments(
                f"shell_run: 'timeout' may be at most {opts.max_timeout:g}s", tool="shell_run", field="timeout"
            )
        real = resolve_inside(args["cwd"] or str(roots[0]), roots, tool="shell_run", field="cwd")
        if not real.is_dir():
            raise InvalidArguments(f"shell_run: 'cwd' {real} is not a directory", tool="shell_run", field="cwd")
        return {**args, "cwd": str(real)}

    return [shell_run]


def register(registry: ToolRegistry, options: Mapping[str, Any]) -> None:
    opts = parse_options(ShellOptions, options, PACK)
    if not opts.cwd_roots:
        raise ValueError("cwd_roots must name at least one directory")
    for root in real_roots(opts.cwd_roots):
        if not Path(root).is_dir():
            raise ValueError(f"cwd_roots: {root} is not a directory")
    for tool in build_tools(opts, os.environ):
        registry.add(tool)
