"""Upstreams keyturn starts run inside its security boundary: the agent, through the proxy, acts on a real filesystem
server (npm) and a real git server (PyPI) that serve a directory holding keyturn's ledger and secrets, and gets none
of keyturn's state, whatever the policy allows. A probe server shows what the sandbox leaves reachable: not
keyturn's process, not loopback without `network: true`, not the host beyond its mounts. And: a slow upstream is
waited for, a starting one says so, a sandbox that cannot be made refuses to start, `sandbox: off` is recorded."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import Client

from tests.conftest import ROOT
from tests.helpers import eventually
from tests.proxy.conftest import FS_SERVER, GIT_SERVER, HERE, ProxyHome, git, text

PROBE = HERE / "probe_server.py"
EXAMPLE_POLICY = ROOT / "examples" / "proxy-policy.yaml"
ALLOW_ALL = "version: 1\ndefault: allow\nrules: []\n"
FS_BIN = FS_SERVER.parents[3] / ".bin" / "mcp-server-filesystem"


class Installed:
    """keyturn installed inside the directory an upstream serves: ledger, embedded reviewer token, config, policy,
    and another `<ledger>.*` secret, as the embedded default lays them out."""

    def __init__(self, home: ProxyHome, served: Path, policy: str) -> None:
        self.home, self.served = home, served
        self.policy = served / "policy.yaml"
        self.policy.write_text(ALLOW_ALL if policy == "allow-all" else EXAMPLE_POLICY.read_text())
        home.db, home.config = served / "keyturn.db", served / "keyturn.yaml"
        (served / "keyturn.db.signing-key").write_text("signing-key-" + "a7c3e9" * 6)
        self.token = served / "keyturn.db.reviewer-token"

    def configure(self, upstream: dict[str, Any], **proxy: Any) -> None:
        self.home.config.write_text(yaml.safe_dump({
            "db": str(self.home.db), "policy": str(self.policy), "tools": [], "poll_interval_s": 0.1,
            "proxy": {"upstreams": [upstream], "connect_timeout": 30, **proxy}}))

    def secrets(self) -> list[str]:
        """What must never reach the agent: the reviewer token and the other secret (present once keyturn ran)."""
        return [self.token.read_text().strip(), (self.served / "keyturn.db.signing-key").read_text()]

    def state(self) -> list[Path]:
        names = ["keyturn.db", "keyturn.db-wal", "keyturn.db-shm", "keyturn.db.reviewer-token",
                 "keyturn.db.signing-key", "keyturn.yaml", "policy.yaml"]
        return [self.served / n for n in names]

    def digests(self) -> dict[str, str]:
        """keyturn's files that nothing but keyturn changes (the ledger is checked by `audit verify`)."""
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in self.state()
                if p.exists() and (not p.name.startswith("keyturn.db") or p.name.startswith("keyturn.db."))}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "served"
    path.mkdir()
    (path / "notes.txt").write_text("the user's notes\n")
    yield path


def _results_leak(results: list[str], secrets: list[str]) -> list[str]:
    return [r for r in results if any(s in r for s in secrets)]


@pytest.mark.parametrize("policy", ["example", "allow-all"])
async def test_the_filesystem_server_never_reaches_keyturns_state(
        home: ProxyHome, served: Path, tmp_path: Path, policy: str) -> None:
    kt = Installed(home, served, policy)
    kt.configure({"name": "files", "command": str(FS_BIN), "args": [str(served)],
                  "mounts": [{"path": str(served), "writable": True}]})
    outside = tmp_path / "outside.txt"
    outside.write_text("beside the mount")
    before: dict[str, str] = {}
    seen: list[str] = []
    with anyio.fail_after(120):
        async with Client(home.proxy_params()) as client:
            before = kt.digests()
            paths = [str(p) for p in kt.state()]

            async def call(tool: str, **arguments: Any) -> Any:
                result = await client.call_tool(tool, arguments)
                seen.append(text(result) + json.dumps(result.structured_content or {}) + json.dumps(result.meta or {}))
                return result

            for path in paths:
                read = await call("read_text_file", path=path)
                assert read.is_error or text(read) == "", text(read)
                await call("get_file_info", path=path)
                await call("read_media_file", path=path)
            await call("read_multiple_files", paths=paths)
            await call("list_directory", path=str(served))
            await call("directory_tree", path=str(served))
            await call("search_files", path=str(served), pattern="keyturn")
            if policy == "allow-all":  # nothing asks a human: every call reaches the upstream
                for path in paths:
                    await call("move_file", source=path, destination=str(served / "moved"))
                    await call("write_file", path=path, content="overwritten by the agent")
                    await call("edit_file", path=path, edits=[{"oldText": "", "newText": "x"}])
                wrote = await call("write_file", path=str(served / "report.md"), content="# report\n")
                assert not wrote.is_error, text(wrote)
                assert (served / "report.md").read_text() == "# report\n"  # the user's files: writable
                elsewhere = await call("read_text_file", path=str(outside))
                assert elsewhere.is_error and "beside the mount" not in text(elsewhere)
    assert not _results_leak(seen, kt.secrets())
    assert kt.digests() == before and not (served / "moved").exists()
    assert all(p.exists() for p in kt.state()[:1] + kt.state()[3:])
    verify = home.keyturn("audit", "verify", "--config", str(home.config))
    assert verify.returncode == 0 and "chain intact" in verify.stdout, verify.stdout + verify.stderr
    sandboxed = [e["payload"] for e in home.ledger_events() if e["kind"] == "upstream.sandboxed"]
    assert sandboxed and sandboxed[0]["upstream"] == "files" and sandboxed[0]["network"] is False
    assert {"path": str(served), "writable": True} in sandboxed[0]["mounts"]


@pytest.mark.parametrize("policy", ["example", "allow-all"])
async def test_the_git_server_never_reaches_keyturns_state(home: ProxyHome, served: Path, policy: str) -> None:
    git(served, "init", "-q", "-b", "main")
    git(served, "config", "user.email", "agent@example.com")
    git(served, "config", "user.name", "Agent")
    git(served, "add", "notes.txt")
    git(served, "commit", "-q", "-m", "notes")
    kt = Installed(home, served, policy)
    kt.configure({"name": "git", "command": str(GIT_SERVER), "mounts": [{"path": str(served), "writable": True}]})
    seen: list[str] = []
    with anyio.fail_after(120):
        async with Client(home.proxy_params()) as client:
            before = kt.digests()
            names = [p.name for p in kt.state()]

            async def call(tool: str, **arguments: Any) -> Any:
                result = await client.call_tool(tool, {"repo_path": str(served), **arguments})
                seen.append(text(result))
                # The repository holds keyturn's ledger: keyturn's built-in guard refuses, and says so; a call
                # that gets past the facts runs in the sandbox, where keyturn's files are masked.
                if result.is_error:
                    refused.append(tool)
                    assert "keyturn:self-target" in text(result), text(result)
                return result

            refused: list[str] = []
            await call("git_status")
            await call("git_diff_unstaged")
            await call("git_show", revision="HEAD")
            if policy == "allow-all":
                await call("git_add", files=names)
                (served / "todo.txt").write_text("the user's work\n")
                await call("git_add", files=["todo.txt"])
                await call("git_diff_staged")
                await call("git_diff", target="HEAD")
                await call("git_commit", message="the agent commits keyturn's files")
                await call("git_show", revision="HEAD")
                await call("git_log")
    if policy == "allow-all":  # the guard named itself: these changes name a folder that holds the ledger
        assert refused
    assert not _results_leak(seen, kt.secrets())
    for name in ("keyturn.db.reviewer-token", "keyturn.db.signing-key", "keyturn.yaml", "policy.yaml"):
        blob = git(served, "log", "--all", "-p", "--", name)  # what the commit holds of it, on the host
        assert not _results_leak([blob], kt.secrets())
    assert kt.digests() == before


async def test_the_upstream_cannot_see_keyturns_process_nor_its_loopback(home: ProxyHome, served: Path) -> None:
    kt = Installed(home, served, "allow-all")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    kt.configure({"name": "probe", "command": sys.executable, "args": [str(PROBE)]})
    with listener, anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            pids = json.loads(text(await client.call_tool("processes", {})))
            keyturn_pid = _keyturn_pid(home)
            environ = await client.call_tool("read", {"path": f"/proc/{keyturn_pid}/environ"})
            loopback = await client.call_tool("connect", {"host": "127.0.0.1", "port": port})
            token = await client.call_tool("read", {"path": str(kt.token)})
            (served / "notes-link.txt").symlink_to(kt.token)  # past the built-in guard's facts: the sandbox answers
            linked = await client.call_tool("read", {"path": str(served / "notes-link.txt")})
            beside = await client.call_tool("read", {"path": str(served / "notes.txt")})
    assert keyturn_pid not in pids and len(pids) <= 3  # its own PID namespace: bubblewrap's init and itself
    assert environ.is_error and "FileNotFoundError" in text(environ)
    assert loopback.is_error and "connected" not in text(loopback)
    assert token.is_error and linked.is_error and beside.is_error  # nothing of the host but the system and runtime
    assert "keyturn:self-target" not in text(linked) and kt.secrets()[0] not in text(linked)


def _keyturn_pid(home: ProxyHome) -> int:
    """The pid of the `keyturn proxy` process serving `home` (its registered instance)."""
    import sqlite3

    with sqlite3.connect(home.db) as conn:
        return int(conn.execute("SELECT pid FROM instances").fetchone()[0])


async def test_network_true_reaches_the_hosts_loopback(home: ProxyHome, served: Path) -> None:
    kt = Installed(home, served, "allow-all")
    listener = socket.create_server(("127.0.0.1", 0))
    kt.configure({"name": "probe", "command": sys.executable, "args": [str(PROBE)], "network": True})
    with listener, anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            loopback = await client.call_tool("connect", {"host": "127.0.0.1", "port": listener.getsockname()[1]})
    assert not loopback.is_error and "connected" in text(loopback)
    sandboxed = [e["payload"] for e in home.ledger_events() if e["kind"] == "upstream.sandboxed"]
    assert sandboxed[0]["network"] is True


async def test_a_slow_upstream_is_waited_for_up_to_startup_wait(home: ProxyHome, served: Path) -> None:
    kt = Installed(home, served, "allow-all")
    kt.configure({"name": "probe", "command": sys.executable, "args": [str(PROBE), "--sleep", "3"]},
                 connect_timeout=1, startup_wait=30)
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            assert "processes" in {t.name for t in (await client.list_tools()).tools}
            assert not (await client.call_tool("processes", {})).is_error


async def test_a_call_while_the_upstream_starts_names_it_and_its_state(home: ProxyHome, served: Path) -> None:
    kt = Installed(home, served, "example")
    gate = served / "gate"
    gate.mkdir()
    kt.configure({"name": "probe", "command": sys.executable, "args": [str(PROBE), "--wait-for", str(gate / "open")],
                  "mounts": [{"path": str(gate)}]}, startup_wait=0.2)
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            early = await client.call_tool("processes", {})
            assert early.is_error and "upstream 'probe' is still starting" in text(early), text(early)
            (gate / "open").touch()
            async def started() -> Any:
                answer = await client.call_tool("processes", {})
                return None if answer.is_error else answer

            later = await eventually(started, within=60, every=0.1)
    assert json.loads(text(later))


async def test_the_directory_holding_keyturns_policy_cannot_be_moved_aside(home: ProxyHome, served: Path) -> None:
    """Were it renamed, a directory of the agent's making, with a policy of its own, could take its place."""
    conf = served / "conf"
    conf.mkdir()
    (conf / "policy.yaml").write_text(ALLOW_ALL)
    home.db, home.config = served / "keyturn.db", conf / "keyturn.yaml"
    home.config.write_text(yaml.safe_dump({"db": str(home.db), "policy": str(conf / "policy.yaml"), "tools": [],
                                           "proxy": {"upstreams": [{"name": "files", "command": str(FS_BIN),
                                                                    "args": [str(served)], "mounts": [
                                                                        {"path": str(served), "writable": True}]}]}}))
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            moved = await client.call_tool("move_file", {"source": str(conf), "destination": str(served / "old")})
    assert moved.is_error and (conf / "policy.yaml").read_text() == ALLOW_ALL and not (served / "old").exists()


def test_no_sandbox_no_start(home: ProxyHome, served: Path) -> None:
    kt = Installed(home, served, "example")
    kt.configure({"name": "probe", "command": sys.executable, "args": [str(PROBE)]}, bwrap=str(served / "no-bwrap"))
    out = home.keyturn("proxy", "--config", str(home.config), timeout=60)
    assert out.returncode == 2, out.stderr
    assert "upstream 'probe' cannot start in a sandbox" in out.stderr
    assert "apt-get install bubblewrap" in out.stderr and "sandbox: off" in out.stderr and "--no-sandbox" in out.stderr
    assert "Traceback" not in out.stderr


async def test_sandbox_off_runs_it_with_a_warning_and_a_ledger_event(home: ProxyHome, served: Path) -> None:
    kt = Installed(home, served, "allow-all")
    kt.configure({"name": "probe", "command": sys.executable, "args": [str(PROBE)], "sandbox": "off"},
                 bwrap=str(served / "no-bwrap"))
    (served / "notes-link.txt").symlink_to(kt.token)  # a name keyturn's built-in guard does not recognise
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            token = await client.call_tool("read", {"path": str(served / "notes-link.txt")})
    assert not token.is_error and kt.secrets()[0] in text(token)  # what the sandbox prevents, without it
    disabled = [e["payload"] for e in home.ledger_events() if e["kind"] == "sandbox.disabled"]
    assert [d["upstream"] for d in disabled] == ["probe"]


def test_command_line_flags_mount_and_name_the_upstream(home: ProxyHome, served: Path) -> None:
    kt = Installed(home, served, "example")
    home.config.write_text(yaml.safe_dump({"db": str(home.db), "policy": str(kt.policy), "tools": []}))
    out = home.keyturn("proxy", "--config", str(home.config), "--mount", str(served / "missing"), "--",
                       str(FS_BIN), str(served), timeout=60)
    assert out.returncode == 2 and "upstream 'filesystem'" in out.stderr and "does not exist" in out.stderr
    out = home.keyturn("proxy", "--config", str(home.config), "--mount-rw", str(served), timeout=60)
    assert out.returncode == 2 and "apply to a command after --" in out.stderr
    assert os.listdir(served).count("keyturn.db") == 1
