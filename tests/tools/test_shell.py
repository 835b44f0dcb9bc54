"""tools.shell: real processes in a temporary directory."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.errors import ConfigError, InvalidArguments, ToolError
from server.guarded import GuardedTool, ToolRegistry, load_pack


def shell_tool(root: Path, **options: Any) -> GuardedTool:
    reg = ToolRegistry()
    load_pack("tools.shell", reg, {"cwd_roots": [str(root)], **options})
    tool = reg.get("shell_run")
    assert tool is not None
    return tool


@pytest.fixture
def shell(tmp_path: Path) -> GuardedTool:
    (tmp_path / "work").mkdir()
    return shell_tool(tmp_path / "work", max_output=1000)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before it was opened, or reaped while it was read
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _poll(ready: Callable[[], bool], within: float = 10.0) -> None:
    # A process in the sandbox's PID namespace is not ours to wait on and has no event, so these waits poll, bounded.
    deadline = time.monotonic() + within
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def unique_sleep() -> list[str]:
    """A `sleep` argv no other process has: its pid inside the sandbox means nothing here, its cmdline finds it."""
    return ["sleep", str(500_000 + secrets.randbelow(400_000))]


def host_pids(argv: list[str]) -> list[int]:
    """The pids (as keyturn sees them) of the processes running exactly `argv`."""
    wanted, found = "".join(f"{a}\0" for a in argv).encode(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes() == wanted and alive(int(entry)):
                    found.append(int(entry))
    return found


async def wait_dead(pid: int) -> None:
    await anyio.to_thread.run_sync(_poll, lambda: not alive(pid))


async def host_pid(argv: list[str]) -> int:
    await anyio.to_thread.run_sync(_poll, lambda: len(host_pids(argv)) == 1)
    return host_pids(argv)[0]


async def release(fifo: Path) -> None:
    """Let a command blocked on `read x < fifo` go on."""
    await anyio.to_thread.run_sync(fifo.write_text, "go\n")


def test_declarations(shell: GuardedTool, tmp_path: Path) -> None:
    assert shell.roots == (tmp_path / "work",)
    assert shell.classifiers == {"command": "shell", "argv": "argv", "cwd": "path"}
    assert shell.annotations["destructiveHint"] is True
    assert shell.input_schema["properties"]["timeout"]["default"] == 30.0


async def test_argv_runs_without_a_shell(shell: GuardedTool, tmp_path: Path) -> None:
    data = (await shell.run({"argv": ["sh", "-c", "pwd; echo oops >&2; exit 3"]})).structured_content
    assert data["exit_code"] == 3 and data["timed_out"] is False
    assert data["stdout"] == f"{tmp_path / 'work'}\n"
    assert data["stderr"] == "oops\n"


async def test_command_is_split_not_interpreted_unless_use_shell(shell: GuardedTool) -> None:
    plain = (await shell.run({"command": "echo $HOME 'a b' | wc"})).structured_content
    assert plain["stdout"] == "$HOME a b | wc\n"
    shelled = (await shell.run({"command": "echo one two | wc -w", "use_shell": True})).structured_content
    assert shelled["stdout"].strip() == "2"


async def test_output_is_capped_with_its_true_size(shell: GuardedTool) -> None:
    data = (await shell.run({"command": "head -c 50000 /dev/zero | tr '\\0' x", "use_shell": True})).structured_content
    assert data["stdout"] == "x" * 1000
    assert data["stdout_bytes"] == 50000 and data["truncated"] is True


async def test_timeout_kills_the_whole_process_group(shell: GuardedTool) -> None:
    sleeper = unique_sleep()
    result: dict[str, Any] = {}

    async def call() -> None:
        command = f"{' '.join(sleeper)} & wait"
        result.update((await shell.run({"command": command, "use_shell": True, "timeout": 3})).structured_content)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            pid = await host_pid(sleeper)
    assert result["timed_out"] is True and result["exit_code"] is None
    await wait_dead(pid)


async def test_background_children_do_not_outlive_the_call(shell: GuardedTool, tmp_path: Path) -> None:
    sleeper, fifo = unique_sleep(), tmp_path / "work" / "go.fifo"
    os.mkfifo(fifo)
    result: dict[str, Any] = {}

    async def call() -> None:
        command = f"{' '.join(sleeper)} & read x < go.fifo"
        result.update((await shell.run({"command": command, "use_shell": True})).structured_content)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            pid = await host_pid(sleeper)  # the background child runs ...
            await release(fifo)  # ... and the command it was started by ends
    assert result["exit_code"] == 0 and result["timed_out"] is False
    await wait_dead(pid)


async def test_cancelling_the_call_kills_the_command(shell: GuardedTool) -> None:
    sleeper = unique_sleep()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(shell.run, {"command": f"exec {' '.join(sleeper)}", "use_shell": True})
            pid = await host_pid(sleeper)
            tg.cancel_scope.cancel()
        await wait_dead(pid)


async def test_keyturn_secrets_in_the_environment_are_not_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYTURN_SLACK_BOT_TOKEN", "xoxb-do-not-leak")
    tool = shell_tool(tmp_path, env={"GREETING": "hi"})
    out = (await tool.run({"argv": ["env"]})).structured_content["stdout"]
    assert "xoxb-do-not-leak" not in out
    assert "GREETING=hi" in out and "PATH=" in out


async def test_cwd_inside_the_roots_is_resolved(shell: GuardedTool, tmp_path: Path) -> None:
    (tmp_path / "work" / "sub").mkdir()
    args = shell.validate({"argv": ["pwd"], "cwd": "sub"})
    assert args["cwd"] == str(tmp_path / "work" / "sub")
    assert shell.validate({"argv": ["pwd"]})["cwd"] == str(tmp_path / "work")
    assert (await shell.run(args)).structured_content["stdout"] == f"{tmp_path / 'work' / 'sub'}\n"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({}, None),
        ({"command": "ls", "argv": ["ls"]}, None),
        ({"command": "echo 'unterminated"}, "command"),
        ({"command": "   "}, "command"),
        ({"argv": []}, "argv"),
        ({"argv": ["ls"], "use_shell": True}, "use_shell"),
        ({"argv": ["ls"], "cwd": "/"}, "cwd"),
        ({"argv": ["ls"], "cwd": "../"}, "cwd"),
        ({"argv": ["ls"], "cwd": "escape"}, "cwd"),
        ({"argv": ["ls"], "cwd": "missing"}, "cwd"),
        ({"argv": ["ls"], "timeout": 10_000}, "timeout"),
        ({"argv": ["ls"], "timeout": 0}, "timeout"),
        ({"argv": "ls"}, "argv"),
    ],
)
def test_refusals_happen_in_validate(
    shell: GuardedTool, tmp_path: Path, arguments: dict[str, Any], field: str | None
) -> None:
    os.symlink(tmp_path, tmp_path / "work" / "escape")
    with pytest.raises(InvalidArguments) as info:
        shell.validate(arguments)
    assert info.value.field == field


async def test_a_missing_program_is_a_tool_error(shell: GuardedTool) -> None:
    with pytest.raises(ToolError, match="FileNotFoundError"):
        await shell.run({"argv": ["definitely-not-a-program-kt"]})


def test_bad_roots_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_pack("tools.shell", ToolRegistry(), {"cwd_roots": [str(tmp_path / "nope")]})
    with pytest.raises(ConfigError, match="max_output"):
        load_pack("tools.shell", ToolRegistry(), {"max_output": -1})


def test_the_card_says_what_the_sandbox_lets_a_command_touch(tmp_path: Path) -> None:
    from server.classify import ClassifyContext, extract_facts
    from server.classify.impact import describe_impact

    (tmp_path / "work").mkdir()
    root = str((tmp_path / "work").resolve())

    def line(tool: GuardedTool, command: str) -> str | None:
        args = tool.validate({"command": command})
        facts = extract_facts(tool.name, args, tool.classifiers, tool.annotations, ClassifyContext())
        return describe_impact({**facts, "hints": tool.facts_hint(args)})

    boxed = shell_tool(tmp_path / "work")
    assert line(boxed, "ls -l") == "sandbox: read-only, no network"
    assert line(boxed, "touch x") == f"sandbox: may write only in {root}, no network"
    bare = shell_tool(tmp_path / "work", sandbox="off")
    assert line(bare, "touch x") == ("no sandbox: the command runs as keyturn itself and can write wherever keyturn "
                                     "can")
