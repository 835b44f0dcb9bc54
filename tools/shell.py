"""The shell pack: run one command in a bubblewrap sandbox, without a shell unless asked, with a time limit.

Options (`tools: [{module: tools.shell, options: {...}}]`):
  cwd_roots        directories a command may run in (default: the process's cwd); the first is the default cwd.
                   They are the only directories of the host a command sees besides the system, see below.
  default_timeout  seconds when the call gives none (default 30); `max_timeout` caps what a call may ask (600).
  max_output       bytes kept of stdout and of stderr each (default 65536); the true sizes are reported.
  inherit_env      environment variables passed through from keyturn's own environment (default: PATH, HOME,
                   LANG, LC_ALL, TERM, TMPDIR, USER); `env` adds fixed ones. Nothing else reaches a command. A name
                   that holds one of keyturn's secrets, or that starts with `KEYTURN_`, is refused at load.
  sandbox          `on` (default) or `off` (YAML `false` too): see below.
  network          `true` lets commands use the host's network (default `false`: none at all).
  ro_paths         extra directories mounted read-only in the sandbox (a toolchain: `/opt/go`, `~/.pyenv`).
  bwrap            the bubblewrap binary (default `bwrap`, looked up on keyturn's PATH).
  cpu_seconds, memory_bytes, max_processes
                   limits for every process of a command: CPU time, address space (RLIMIT_AS), and RLIMIT_NPROC,
                   which the kernel does not enforce when keyturn runs as root (see `tools.sandbox`). Default: none.

The sandbox (`tools.sandbox`, bubblewrap): every command runs in its own PID, IPC, UTS, cgroup and (unless
`network: true`) network namespace, with no capabilities, a fresh `/proc`, a minimal `/dev` and a private `/tmp`.
It sees the system (`/usr`, `/bin`, `/sbin`, `/lib*`, `/etc`) and `ro_paths` read-only, and `cwd_roots`: writable
only when the decision allowed a write. A call the classifiers judged read-only (`current_limits().read_only`) runs
with the roots read-only, so a misjudged command fails with EROFS instead of writing. keyturn's own state (ledger
with its `-wal`/`-shm` and `<ledger>.*` secrets, config, policy, secret store) is masked wherever it lies under a
mount, checked again at every run; what lies outside the mounts (`../keyturn.db.reviewer-token` beside a root)
does not exist in the sandbox. keyturn's processes, their `/proc/<pid>/environ` and loopback listeners (its
reviewer API) are out of reach; with `network: true` the host's loopback is reachable, and the reviewer API then
still needs a reviewer's token, which the sandbox cannot read. bubblewrap is Linux-only: where it cannot create a
sandbox, the pack refuses to load (a `ConfigError` naming the fix) unless `sandbox: off`, which runs commands as
keyturn itself, logs a warning at every start and records a `sandbox.disabled` ledger event.

In the sandbox a command killed by a signal reports exit code 128 + the signal (without it: minus the signal).
A program that does not exist, or a sandbox that could not be set up, is a tool error, not a result.

A command is killed with its whole process group (with the sandbox: its whole PID namespace) when it times out,
when the call is cancelled, and when it exits, so nothing it started in the background outlives the call.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.abc
from pydantic import Field
from typing_extensions import TypedDict

from server.errors import ConfigError, InvalidArguments
from server.execution import PackContext, current_limits
from server.guarded import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, cap_text, parse_options, real_roots, resolve_inside
from tools.sandbox import Limits, Sandbox, sandbox_failure

PACK = "tools.shell"
_DRAIN_GRACE_S = 2.0
log = logging.getLogger(__name__)


class ShellOptions(PackOptions):
    cwd_roots: list[str] = Field(default_factory=lambda: ["."])
    default_timeout: float = Field(30.0, gt=0)
    max_timeout: float = Field(600.0, gt=0)
    max_output: int = Field(65_536, ge=0)
    inherit_env: list[str] = Field(default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER"])
    env: dict[str, str] = Field(default_factory=dict)
    sandbox: bool | Literal["on", "off"] = True
    network: bool = False
    ro_paths: list[str] = Field(default_factory=list)
    bwrap: str = "bwrap"
    cpu_seconds: int | None = Field(None, gt=0)
    memory_bytes: int | None = Field(None, gt=0)
    max_processes: int | None = Field(None, gt=0)

    @property
    def sandboxed(self) -> bool:
        return self.sandbox is True or self.sandbox == "on"

    @property
    def limits(self) -> Limits:
        return Limits(cpu_seconds=self.cpu_seconds, memory_bytes=self.memory_bytes, processes=self.max_processes)


class ShellResult(TypedDict):
    exit_code: int | None  # killed by a signal: 128 + it in the sandbox, minus it without
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


def build_tools(opts: ShellOptions, environ: Mapping[str, str], sandbox: Sandbox | None) -> list[GuardedTool]:
    """The pack's tools; `sandbox=None` runs commands as keyturn itself (only with `sandbox: off`)."""
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
        if sandbox is None:
            args = [*opts.limits.prefix(), *args]
        elif current_limits().read_only:  # judged read-only: executed read-only
            args = sandbox.argv(args, cwd=cwd, read_only=roots)
        else:
            args = sandbox.argv(args, cwd=cwd, writable=roots)
        result = await run_command(args, cwd=cwd, time_limit=timeout, max_output=opts.max_output, env=env)
        failure = sandbox_failure(result["exit_code"], result["stderr"]) if sandbox is not None else None
        if failure is not None:
            raise failure
        return result

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
            raise InvalidArguments("shell_run: argument 'cwd' is not a directory", tool="shell_run", field="cwd")
        return {**args, "cwd": str(real)}

    @shell_run.hint
    def _sandbox_facts(args: dict[str, Any]) -> dict[str, Any]:
        # What the command could touch, for the reviewer: the roots are writable unless the call is judged read-only.
        return {"sandbox": {"enabled": sandbox is not None, "writable": [str(r) for r in roots],
                            "network": bool(opts.network)}}

    return [shell_run]


def register(registry: ToolRegistry, options: Mapping[str, Any], context: PackContext | None = None) -> None:
    context = context if context is not None else PackContext()
    opts = parse_options(ShellOptions, options, PACK)
    if not opts.cwd_roots:
        raise ConfigError("cwd_roots must name at least one directory")
    for root in real_roots(opts.cwd_roots):
        if not Path(root).is_dir():
            raise ConfigError(f"cwd_roots: {root} is not a directory")
    for path in real_roots(opts.ro_paths):
        if not path.exists():
            raise ConfigError(f"ro_paths: {path} does not exist")
    for name in [*opts.inherit_env, *opts.env]:
        if name in context.secret_env or name.upper().startswith("KEYTURN_"):
            raise ConfigError(f"inherit_env/env: {name!r} holds keyturn's own secrets and may not reach a command")
    sandbox: Sandbox | None = None
    if opts.sandboxed:
        sandbox = Sandbox(bwrap=opts.bwrap, network=opts.network, ro_paths=real_roots(opts.ro_paths),
                          hidden=context.existing_state, limits=opts.limits)
        sandbox.check_available(writable=real_roots(opts.cwd_roots))
    else:
        opts.limits.prefix()  # prlimit must exist when limits are set
        log.warning("%s: the sandbox is off (`sandbox: off`): commands run as keyturn itself and can reach its "
                    "files, processes and network", PACK)
        context.record("sandbox.disabled", {"pack": PACK, "reason": "option sandbox: off",
                                            "cwd_roots": [str(r) for r in real_roots(opts.cwd_roots)]})
    for tool in build_tools(opts, os.environ, sandbox):
        registry.add(tool)
