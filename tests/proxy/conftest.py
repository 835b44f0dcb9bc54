"""Fixtures for the proxy tests: real upstream MCP servers (mcp-server-git from PyPI, the filesystem server from
npm, installed by scripts/test-deps; and two small ones of our own), a git repository and a directory for them
to act on, and `keyturn proxy` subprocesses in front of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import StdioServerParameters

from tests.conftest import ROOT, Home, free_port

HERE = Path(__file__).resolve().parent
POLICY = HERE / "proxy-policy.yaml"
FLAKY = HERE / "flaky_server.py"
HTTP_UPSTREAM = HERE / "http_upstream.py"
FS_SERVER = ROOT / ".test-deps" / "node_modules" / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
GIT_SERVER = Path(sys.executable).parent / "mcp-server-git"


def _require(path: Path) -> str:
    if not path.exists():
        pytest.fail(f"{path} is missing: install the test upstreams with `scripts/test-deps {Path(sys.prefix)}`")
    return str(path)


def git_upstream(*repos: Path, **extra: Any) -> dict[str, Any]:
    """The git server, its sandbox showing `repos` (writable: commits land there)."""
    return {"name": "git", "command": _require(GIT_SERVER),
            "mounts": [{"path": str(r), "writable": True} for r in repos], **extra}


def fs_upstream(root: Path, **extra: Any) -> dict[str, Any]:
    """The filesystem server acting on `root`, writable in its sandbox."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/test-deps needs Node >= 20)")
    return {"name": "files", "command": node, "args": [_require(FS_SERVER), str(root)],
            "mounts": [{"path": str(root), "writable": True}], **extra}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit and one staged, uncommitted file."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "agent@example.com")
    git(path, "config", "user.name", "Agent")
    (path / "README.md").write_text("hello\n")
    git(path, "add", "README.md")
    git(path, "commit", "-q", "-m", "initial commit")
    (path / "notes.txt").write_text("staged work\n")
    git(path, "add", "notes.txt")
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """The directory the filesystem server may act on."""
    path = tmp_path / "files"
    path.mkdir()
    (path / "hello.txt").write_text("hello from disk\n")
    return path


class ProxyHome(Home):
    """A keyturn installation whose config has a `proxy:` section."""

    def configure(self, upstreams: list[dict[str, Any]], **proxy: Any) -> None:
        self.write_config(tools=[], policy=str(POLICY), proxy={
            "upstreams": upstreams, "restart_backoff": 0.2, "restart_backoff_max": 1, "reconnect_wait": 5,
            "connect_timeout": 20, **proxy})

    def proxy_params(self, *extra: str) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable, args=["-m", "server.cli", "proxy", "--config", str(self.config), *extra],
            env={"PYTHONPATH": str(ROOT)}, cwd=str(self.dir))

    def start(self, args: list[str], log_name: str, ready_url: str | None = None) -> subprocess.Popen[bytes]:
        with open(self.dir / log_name, "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.dir)
        self.procs.append(proc)
        if ready_url is not None:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{args[:4]} exited: {(self.dir / log_name).read_text()}")
                try:
                    with urllib.request.urlopen(ready_url, timeout=1):
                        break
                except urllib.error.HTTPError:
                    break  # it answers
                except (urllib.error.URLError, ConnectionError, OSError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{args[:4]} did not start: {(self.dir / log_name).read_text()}") from None
                    time.sleep(0.1)
        return proc

    def proxy_http(self, *extra: str) -> str:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        self.start([sys.executable, "-m", "server.cli", "proxy", "--http", f"127.0.0.1:{port}",
                    "--config", str(self.config), *extra], f"proxy-{port}.log", base + "/healthz")
        return base

    def calls(self) -> list[dict[str, Any]]:
        """What the flaky upstream received."""
        path = self.dir / "calls.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def flaky(self, **extra: Any) -> dict[str, Any]:
        # It writes its call log in the home directory, which holds keyturn's ledger too (masked in its sandbox).
        return {"name": "flaky", "command": sys.executable,
                "args": [str(FLAKY), str(self.dir / "calls.log"), str(self.dir / "down")],
                "mounts": [{"path": str(self.dir), "writable": True}],
                "classifiers": {"run_query": {"query": "sql"}}, **extra}

    def terminal(self, call_id: str) -> str:
        """The kind of the call's last ledger event."""
        return str(self.ledger_events(call_id)[-1]["kind"])


@pytest.fixture
def home(tmp_path: Path) -> Iterator[ProxyHome]:
    h = ProxyHome(dir=tmp_path, config=tmp_path / "keyturn.yaml", db=tmp_path / "ledger.db",
                  data_db=tmp_path / "unused.db")
    yield h
    h.stop_all()


def host_pids(*markers: str) -> list[int]:
    """The host's pids of live processes whose command line holds every marker (not bubblewrap's own: inside a
    sandbox a process knows only its PID namespace's pid)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        line = b" ".join(argv).decode(errors="replace")
        if state != "Z" and Path(argv[0].decode(errors="replace")).name != "bwrap" and all(m in line for m in markers):
            found.append(int(entry))
    return found


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")

