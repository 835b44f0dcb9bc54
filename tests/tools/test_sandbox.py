"""tools.sandbox, tried as an attacker would: real commands through the real shell pack, against real files that
stand for keyturn's state. Each attempt here succeeds with `sandbox: off` (the last tests show it does)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.approvals import ApprovalBroker, ReviewerDirectory
from server.classify import ClassifyContext
from server.classify.shell import classify_shell
from server.config import Settings, ToolPack
from server.errors import ConfigError
from server.execution import PackContext, RunLimits, running_under
from server.gate import Gate, Identity
from server.guarded import GuardedTool, ToolRegistry, load_pack
from server.ledger import Ledger
from server.policy import LivePolicy
from server.runtime import running
from tools.sandbox import Limits, Sandbox, SandboxUnavailable

SECRET = "kt-secret-" + "4f9c2b7e1d0a"
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


@dataclass
class Keyturn:
    """keyturn's state on disk, each file holding SECRET, and the context its packs are loaded with."""

    home: Path
    context: PackContext

    @property
    def token(self) -> Path:
        return self.home / "keyturn.db.reviewer-token"

    def untouched(self) -> bool:
        files = ["keyturn.db", "keyturn.db-wal", "keyturn.db.reviewer-token", "keyturn.yaml", "policy.yaml",
                 "store/master.key"]
        return all(SECRET in (self.home / f).read_text() for f in files) and os.listdir(self.home / "store") == [
            "master.key"]


@pytest.fixture
def keyturn(tmp_path: Path) -> Keyturn:
    home = tmp_path / "home"
    (home / "store").mkdir(parents=True)
    (home / "project").mkdir()
    for name in ("keyturn.db", "keyturn.db-wal", "keyturn.db.reviewer-token", "keyturn.yaml", "policy.yaml",
                 "store/master.key"):
        (home / name).write_text(f"{name}: {SECRET}\n")
    (home / "project" / "in.txt").write_text("b\na\n")
    context = PackContext.for_state([home / "keyturn.db", home / "keyturn.yaml", home / "policy.yaml", home / "store"],
                                    ledger=home / "keyturn.db", secret_env={"SLACK_SIGNING_SECRET"})
    return Keyturn(home, context)


def shell(context: PackContext, root: Path, **options: Any) -> GuardedTool:
    registry = ToolRegistry()
    load_pack("tools.shell", registry, {"cwd_roots": [str(root)], **options}, context)
    tool = registry.get("shell_run")
    assert tool is not None
    return tool


async def sh(tool: GuardedTool, command: str, **arguments: Any) -> dict[str, Any]:
    result = await tool.run(tool.validate({"command": command, "use_shell": True, **arguments}))
    data: dict[str, Any] | None = result.structured_content
    assert data is not None
    return data


def judged_read_only() -> AbstractContextManager[None]:
    """What the gate sets around a run when the classifiers judged the call read-only."""
    return running_under(RunLimits(read_only=True))


# ------------------------------------------------------------------------------------------- keyturn's files


async def test_state_inside_a_root_cannot_be_read_by_any_spelling(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home)
    attempts = [
        "cat keyturn.db.reviewer-token", f"cat {keyturn.token}", "cat ./project/../keyturn.db.reviewer-token",
        "cat keyturn.db keyturn.db-wal keyturn.yaml policy.yaml store/master.key", "cat store/*",
        "grep -r kt-secret . /etc /tmp", "find . -type f -exec cat {} +", f"cat /proc/self/root{keyturn.token}",
        "ln keyturn.db.reviewer-token project/hard && cat project/hard",
        "ln -s ../keyturn.db.reviewer-token project/soft && cat project/soft",
        "cp keyturn.db.reviewer-token project/copy && cat project/copy", "od -c keyturn.db-wal", "tail -c 64 keyturn.db",
    ]
    for command in attempts:
        data = await sh(tool, command, timeout=60)
        assert SECRET not in data["stdout"] + data["stderr"], command
    # Masked, not moved: the state is still there for keyturn, and nothing new appeared beside it.
    assert keyturn.untouched()


async def test_state_inside_a_root_cannot_be_changed_even_when_writes_are_allowed(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home)
    for command in ["echo x > keyturn.db", "echo x >> keyturn.db-wal", "rm -f keyturn.db.reviewer-token",
                    "mv keyturn.yaml project/", "truncate -s 0 policy.yaml", "touch store/planted",
                    "rm -rf store", "sed -i s/kt/xx/ keyturn.yaml", "cp project/in.txt keyturn.db.reviewer-token"]:
        await sh(tool, command)
    assert keyturn.untouched()
    assert (await sh(tool, "echo mine > project/out.txt"))["exit_code"] == 0  # the root itself is writable
    assert (keyturn.home / "project" / "out.txt").read_text() == "mine\n"


async def test_state_beside_a_root_does_not_exist_in_the_sandbox(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home / "project")
    os.symlink(keyturn.home, keyturn.home / "project" / "up")  # a link someone left in the root
    for command in ["cat ../keyturn.db.reviewer-token", f"cat {keyturn.token}", "cat ../store/master.key",
                    "cat up/keyturn.db.reviewer-token", "cat up/store/master.key",
                    "grep -rs kt-secret .. /tmp /root /home", f"ls -a {keyturn.home.parent.parent}"]:
        data = await sh(tool, command)
        assert SECRET not in data["stdout"] + data["stderr"], command
    # Up from the root there is only the way down to it: bwrap's empty directories, not the host's.
    assert (await sh(tool, "ls -a .."))["stdout"].split() == [".", "..", "project"]
    assert SECRET in keyturn.token.read_text()  # while it is there, for keyturn
    assert (await sh(tool, "ls -A /tmp"))["stdout"].split() == [keyturn.home.parts[2]]


async def test_a_secret_made_after_start_is_masked_at_the_next_run(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home)
    (keyturn.home / "keyturn.db.signing-key").write_text(SECRET)
    data = await sh(tool, "cat keyturn.db.signing-key")
    assert SECRET not in data["stdout"]


async def test_a_mask_creates_nothing_on_the_host(keyturn: Keyturn) -> None:
    """`-shm` and `-journal` do not exist: nothing is bound over them, so nothing is made for them."""
    tool = shell(keyturn.context, keyturn.home)
    assert (await sh(tool, "ls"))["exit_code"] == 0
    assert sorted(os.listdir(keyturn.home)) == ["keyturn.db", "keyturn.db-wal", "keyturn.db.reviewer-token",
                                                "keyturn.yaml", "policy.yaml", "project", "store"]


async def test_state_in_a_read_only_system_path_is_masked(keyturn: Keyturn, tmp_path: Path) -> None:
    """The same holds for what `ro_paths` (like /etc) shows: a config under it is masked."""
    toolchain = tmp_path / "toolchain"
    toolchain.mkdir()
    (toolchain / "keyturn.yaml").write_text(SECRET)
    context = PackContext.for_state([toolchain / "keyturn.yaml"])
    tool = shell(context, keyturn.home / "project", ro_paths=[str(toolchain)])
    assert SECRET not in (await sh(tool, f"cat {toolchain}/keyturn.yaml"))["stdout"]
    assert (await sh(tool, f"ls {toolchain}"))["stdout"] == "keyturn.yaml\n"


# ------------------------------------------------------------------------------------------- keyturn's process


async def test_keyturn_process_cannot_be_seen_or_signalled(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home / "project")
    me = os.getpid()
    environ = await sh(tool, f"cat /proc/{me}/environ /proc/{me}/cmdline")
    assert environ["exit_code"] != 0 and environ["stdout"] == ""
    assert (await sh(tool, f"ls /proc/{me}/root/ /proc/{me}/fd/"))["stdout"] == ""
    assert (await sh(tool, f"kill -0 {me}"))["exit_code"] != 0
    pids = [int(p) for p in (await sh(tool, "ls /proc"))["stdout"].split() if p.isdigit()]
    assert me not in pids and max(pids) < 50  # the sandbox's own few processes
    # Its pid 1 is the sandbox's init, whose environment is the command's: nothing of keyturn's.
    init_env = (await sh(tool, "tr '\\0' '\\n' < /proc/1/environ"))["stdout"].split()
    assert {e.split("=", 1)[0] for e in init_env} <= {"PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER"}


async def test_the_sandboxed_process_has_no_capability(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home / "project")
    status = (await sh(tool, "grep ^Cap /proc/self/status"))["stdout"].split()
    assert status[1::2] == ["0000000000000000"] * 5
    # So, root as it may be, it cannot undo a mask.
    data = await sh(tool, f"umount {keyturn.home}/keyturn.db.reviewer-token; cat {keyturn.home}/keyturn.db.reviewer-token",
                    cwd=str(keyturn.home / "project"))
    assert SECRET not in data["stdout"]


async def test_no_keyturn_variable_reaches_a_command(keyturn: Keyturn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYTURN_REVIEWER_TOKEN", SECRET)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SECRET)
    tool = shell(keyturn.context, keyturn.home / "project")
    data = await sh(tool, "env; cat /proc/self/environ /proc/1/environ")
    assert SECRET not in data["stdout"] and "KEYTURN_" not in data["stdout"]


@pytest.mark.parametrize("options", [{"inherit_env": ["PATH", "KEYTURN_REVIEWER_TOKEN"]}, {"env": {"KEYTURN_X": "1"}},
                                     {"inherit_env": ["SLACK_SIGNING_SECRET"]}, {"env": {"SLACK_SIGNING_SECRET": "1"}}])
def test_a_variable_that_holds_keyturn_secrets_is_refused_at_load(keyturn: Keyturn, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="keyturn's own secrets"):
        shell(keyturn.context, keyturn.home / "project", **options)


# ------------------------------------------------------------------------------------------- keyturn's network


@pytest.fixture
def loopback_listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's 127.0.0.1, standing for keyturn's reviewer API. The kernel completes a
    connection before anyone accepts it, so once a command has ended, a non-blocking accept tells if it connected."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        yield listener


def accepted(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            listener.accept()[0].close()
        except BlockingIOError:
            return count
        count += 1


def python_tool(context: PackContext, root: Path, **options: Any) -> tuple[GuardedTool, str]:
    """The shell pack with this Python visible read-only (coreutils cannot open a socket)."""
    return shell(context, root, ro_paths=[sys.base_prefix], **options), os.path.realpath(sys.executable)


CONNECT = """
import socket, sys
for host in sys.argv[2:]:
    try:
        socket.create_connection((host, int(sys.argv[1])), timeout=5).close()
        print("connected", host)
    except OSError as e:
        print("refused", host, e)
"""
SPELLINGS = ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "127.1", "0.0.0.0", "::ffff:127.0.0.1"]


async def test_host_loopback_is_out_of_reach_without_network(
    keyturn: Keyturn, loopback_listener: socket.socket
) -> None:
    tool, python = python_tool(keyturn.context, keyturn.home / "project")
    port = str(loopback_listener.getsockname()[1])
    data = (await tool.run(tool.validate({"argv": [python, "-I", "-c", CONNECT, port, *SPELLINGS]}))).structured_content
    assert data is not None and data["exit_code"] == 0, data
    outcomes = [line.split()[0] for line in data["stdout"].splitlines()]
    assert outcomes == ["refused"] * len(SPELLINGS), data["stdout"]
    assert accepted(loopback_listener) == 0


async def test_network_true_shares_the_host_network_loopback_included(
    keyturn: Keyturn, loopback_listener: socket.socket
) -> None:
    tool, python = python_tool(keyturn.context, keyturn.home / "project", network=True)
    port = str(loopback_listener.getsockname()[1])
    data = (await tool.run(tool.validate({"argv": [python, "-I", "-c", CONNECT, port, "127.0.0.1"]}))).structured_content
    assert data is not None and data["stdout"] == "connected 127.0.0.1\n", data
    assert accepted(loopback_listener) == 1


# ------------------------------------------------------------------------------------------- judged read-only


WRITES = ["echo x > new.txt", "echo x >> in.txt", "touch new.txt", "echo x | tee new.txt", "cp in.txt new.txt",
          "sed -i s/a/z/ in.txt", "mkdir newdir", "rm in.txt", "mv in.txt new.txt", "sort -o in.txt in.txt",
          "ln -s in.txt new.txt", "chmod 600 in.txt", "truncate -s 0 in.txt"]


async def test_a_call_judged_read_only_cannot_write_by_any_spelling(keyturn: Keyturn) -> None:
    project = keyturn.home / "project"
    tool = shell(keyturn.context, project)
    with judged_read_only():
        for command in WRITES:
            data = await sh(tool, command)
            assert data["exit_code"] != 0 and "Read-only file system" in data["stderr"], (command, data)
        assert (await sh(tool, "cat in.txt; echo scratch > /tmp/x && cat /tmp/x"))["stdout"] == "b\na\nscratch\n"
    assert os.listdir(project) == ["in.txt"] and (project / "in.txt").read_text() == "b\na\n"
    assert oct((project / "in.txt").stat().st_mode & 0o777) == "0o644"


async def test_a_call_not_judged_read_only_writes(keyturn: Keyturn) -> None:
    project = keyturn.home / "project"
    tool = shell(keyturn.context, project)
    for command in ["touch new.txt", "echo x | tee -a in.txt", "sed -i s/b/z/ in.txt"]:
        assert (await sh(tool, command))["exit_code"] == 0, command
    assert (project / "new.txt").exists() and (project / "in.txt").read_text() == "z\na\nx\n"


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[Gate]:
    policy = LivePolicy(DEFAULT_POLICY)
    policy.load()
    async with Ledger(tmp_path / "ledger.db") as ledger:
        broker = ApprovalBroker(ledger=ledger, directory=ReviewerDirectory(identities={}, groups_of={}))
        yield Gate(ledger=ledger, broker=broker, policy=policy, classify_context=ClassifyContext())


def poisoned_repo(project: Path) -> Path:
    """A repository whose config runs a program on `git status` and `git diff` (core.fsmonitor, diff.external):
    commands a classifier calls reads, which write through the checkout's own hooks."""
    repo = project / "repo"
    repo.mkdir()
    hook = repo / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho written > {project / 'out.txt'}\n")
    hook.chmod(0o755)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "hook.sh"], ["commit", "-qm", "first"],
                 ["config", "core.fsmonitor", str(hook)], ["config", "diff.external", str(hook)]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    with hook.open("a") as f:
        f.write("# a change, so git diff has something to show\n")
    return repo


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("command", ["git status", "git diff"])
async def test_a_write_the_classifier_missed_fails_through_the_gate(
    keyturn: Keyturn, gate: Gate, command: str
) -> None:
    """The shipped policy allows what the classifier judged read-only; the run is read-only, so the write fails."""
    project = keyturn.home / "project"
    poisoned_repo(project)
    tool = shell(keyturn.context, project)
    assert classify_shell([command])["read_only"]  # the classifier's view: a read
    with anyio.fail_after(60):  # allowed at once: nothing here waits for a human
        result = await gate.call(tool, {"command": command, "cwd": "repo"}, Identity(principal="agent"))
    assert not result.is_error and result.structured_content is not None  # allowed and run
    assert "Read-only file system" in result.structured_content["stderr"], result.structured_content
    assert not (project / "out.txt").exists()
    assert sorted(os.listdir(project)) == ["in.txt", "repo"]


# ------------------------------------------------------------------------------------------- resources


async def test_resource_limits_reach_every_process_of_a_command(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home / "project", cpu_seconds=1, memory_bytes=256 * 2**20, max_processes=64)
    limits = (await sh(tool, "cat /proc/self/limits"))["stdout"]
    assert [line.split()[-3:-1] for line in limits.splitlines()
            if line.startswith(("Max cpu time", "Max processes", "Max address space"))] == [
        ["1", "1"], ["64", "64"], [str(256 * 2**20)] * 2]
    spin = await sh(tool, "while :; do :; done", timeout=60)
    # Killed after one CPU second: SIGKILL, as the hard limit equals the soft one (SIGXCPU would do too).
    assert spin["timed_out"] is False and spin["exit_code"] in (128 + 9, 128 + 24), spin


async def test_memory_limit_stops_a_command_that_grows_past_it(keyturn: Keyturn) -> None:
    tool = shell(keyturn.context, keyturn.home / "project", memory_bytes=64 * 2**20)
    data = await sh(tool, "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo grew ${#x}")
    assert data["exit_code"] != 0 and "grew" not in data["stdout"], data


# ------------------------------------------------------------------------------------------- failing closed


def test_the_pack_refuses_to_load_without_bwrap(keyturn: Keyturn, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"apt-get install bubblewrap.*sandbox: off"):
        shell(keyturn.context, keyturn.home / "project", bwrap=str(tmp_path / "no-such-bwrap"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ConfigError, match="bubblewrap"):
        shell(keyturn.context, keyturn.home / "project")
    assert keyturn.context.events == []


def test_the_pack_refuses_a_bwrap_that_cannot_make_a_sandbox(keyturn: Keyturn, tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(ConfigError, match=r"No permissions to create new namespace.*sandbox: off"):
        shell(keyturn.context, keyturn.home / "project", bwrap=str(fake))


def test_a_bwrap_that_runs_the_command_unsandboxed_is_refused(tmp_path: Path) -> None:
    """check_available looks at what it got: a 'bwrap' that just runs the command shares keyturn's namespaces."""
    fake = tmp_path / "bwrap"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done; shift; exec "$@"\n')
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="namespace"):
        Sandbox(bwrap=str(fake)).check_available()


@pytest.mark.parametrize("off", [False, "off"])
async def test_sandbox_off_loads_warns_and_is_recorded(
    keyturn: Keyturn, tmp_path: Path, caplog: pytest.LogCaptureFixture, off: Any
) -> None:
    with caplog.at_level(logging.WARNING, logger="tools.shell"):
        tool = shell(keyturn.context, keyturn.home, sandbox=off, bwrap=str(tmp_path / "no-such-bwrap"))
    assert "sandbox is off" in caplog.text
    assert keyturn.context.events == [("sandbox.disabled", {"pack": "tools.shell", "reason": "option sandbox: off",
                                                            "cwd_roots": [str(keyturn.home)]})]
    # What the sandbox stops, without it: the attacks above succeed (so they can fail).
    assert SECRET in (await sh(tool, "cat keyturn.db.reviewer-token"))["stdout"]
    assert (await sh(tool, f"kill -0 {os.getpid()}"))["exit_code"] == 0
    with judged_read_only():
        assert (await sh(tool, "touch project/new.txt"))["exit_code"] == 0


async def test_sandbox_off_is_in_the_ledger_of_a_started_keyturn(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "ledger.db", tools=(
        ToolPack(module="tools.shell", options={"cwd_roots": [str(tmp_path)], "sandbox": "off"}),))
    async with running(settings) as kt:
        events = await kt.ledger.tail(10)
    disabled = [e.payload for e in events if e.kind == "sandbox.disabled"]
    assert len(disabled) == 1 and disabled[0]["pack"] == "tools.shell"


ALLOW_SHELL = """
version: 1
default: deny
rules:
  - {id: any-command, tool: shell_run, outcome: allow, risk: low, reason: the sandbox is the wall}
"""


async def test_a_started_keyturn_hides_its_state_from_a_root_that_holds_it(tmp_path: Path) -> None:
    """A real keyturn whose ledger, config and policy lie in the shell's root, under a policy that allows every
    command. keyturn's built-in guard denies commands whose facts name its files; these, run from a
    sub-directory and spelled with globs, get past the facts and run: the sandbox is what hides the state."""
    (tmp_path / "policy.yaml").write_text(ALLOW_SHELL)
    (tmp_path / "sub").mkdir()
    settings = Settings(db=tmp_path / "ledger.db", policy=tmp_path / "policy.yaml", tools=(
        ToolPack(module="tools.shell", options={"cwd_roots": [str(tmp_path)]}),))
    async with running(settings) as kt:
        tool = kt.find_tool("shell_run")
        assert tool is not None
        for command in ["cat ../*", "grep -ra process.started ..", "cat ../p*.yaml",
                        "for f in ../l*.db; do echo x > $f; done"]:
            result = await kt.gate.call(tool, {"command": command, "use_shell": True, "cwd": "sub"},
                                        Identity(principal="agent"))
            assert not result.is_error and result.structured_content is not None, (command, result.content)
            assert "process.started" not in result.structured_content["stdout"], command
            assert "any-command" not in result.structured_content["stdout"], command
        assert "process.started" in [e.kind for e in await kt.ledger.tail(50)]
        assert "sandbox.disabled" not in [e.kind for e in await kt.ledger.tail(50)]
    assert b"process.started" in (tmp_path / "ledger.db").read_bytes()  # there all along, and unharmed


# ------------------------------------------------------------------------------------------- the module itself


def test_the_host_proc_dev_or_whole_root_cannot_be_mounted(keyturn: Keyturn) -> None:
    with pytest.raises(ConfigError, match="/proc"):
        Sandbox(ro_paths=(Path("/proc/1"),))
    with pytest.raises(ConfigError, match="/dev"):
        Sandbox().argv(["true"], cwd="/dev/shm", writable=["/dev/shm"])
    with pytest.raises(ConfigError, match="may not be /:"):
        shell(keyturn.context, Path("/"))


def test_limits_are_a_prlimit_prefix() -> None:
    assert Limits().prefix() == []
    prefix = Limits(cpu_seconds=5, memory_bytes=1024, processes=3).prefix()
    assert prefix[1:] == ["--cpu=5:5", "--as=1024:1024", "--nproc=3:3", "--"]
    assert os.path.basename(prefix[0]) == "prlimit"
