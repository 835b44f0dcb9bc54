"""Shared fixtures: a keyturn home (config, policy, SQLite database), real `keyturn serve` subprocesses,
MCP clients from the SDK over stdio and streamable HTTP, and a reviewer API client."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from server.canonical import sha256_hex
from tests.pg import Cluster, find_bindir, start_cluster
from tests.stores import Stores

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TOKENS = {
    "alice": "tok-alice-reviewer-0001",  # api:alice, groups dba
    "carol": "tok-carol-reviewer-0002",  # api:carol, groups dba
    "dave": "tok-dave-reviewer-0003",  # api:dave, no groups
    "bob": "tok-bob-reviewer-0004",  # api:bob: the person agent-bob acts for
    "agent-bob": "tok-agent-bob-0005",
    "agent-ci": "tok-agent-ci-0006",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Home:
    """A keyturn installation in a temporary directory."""

    dir: Path
    config: Path
    db: Path
    data_db: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def write_config(self, **extra: Any) -> None:
        cfg: dict[str, Any] = {
            "db": str(self.db),
            "policy": str(DATA / "spine-policy.yaml"),
            "people": {"alice": {"groups": ["dba"]}, "carol": {"groups": ["dba"]}, "dave": {}, "bob": {}},
            "reviewers": [
                {"identity": f"api:{p}", "person": p, "token_sha256": sha256_hex(TOKENS[p])}
                for p in ("alice", "carol", "dave", "bob")
            ],
            "tools": [{"module": "tools.sql", "options": {"database": str(self.data_db),
                                                           "export_dir": str(self.dir / "exports")}}],
            "progress_interval_s": 0.5,
            "poll_interval_s": 0.1,
        }
        cfg.update(extra)
        self.config.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("KEYTURN_TOKEN", None)
        return env

    def keyturn(self, *args: str, check: bool = False, token: str | None = None, url: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "server.cli", *args]
        env = self.env()
        if token:
            env["KEYTURN_TOKEN"] = token
        if url:
            env["KEYTURN_URL"] = url
        return subprocess.run(cmd, capture_output=True, text=True, env=env, check=check, timeout=timeout,
                              cwd=self.dir)

    def serve_http(self, port: int | None = None, *extra: str) -> str:
        port = port or free_port()
        with open(self.dir / f"serve-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--http", f"127.0.0.1:{port}", "--config",
                 str(self.config), *extra],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.dir)
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"keyturn serve exited: {(self.dir / f'serve-{port}.log').read_text()}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1):
                    return base
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError("keyturn serve did not start in 30 s")

    def stdio_params(self, *extra: str) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable, args=["-m", "server.cli", "serve", "--config", str(self.config), *extra],
            env={"PYTHONPATH": str(ROOT)}, cwd=str(self.dir))

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.data_db) as conn:
            return list(conn.execute(sql))

    def ledger_events(self, call_id: str | None = None) -> list[dict[str, Any]]:
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            q = "SELECT * FROM events" + (" WHERE call_id = ?" if call_id else "") + " ORDER BY seq"
            return [dict(r, payload=json.loads(r["payload"])) for r in conn.execute(q, (call_id,) if call_id else ())]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the whole run (see tests/pg.py), stopped and removed at the end."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server (initdb) is not installed; scripts/test-deps installs Debian's postgresql")
    cluster = start_cluster(bindir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    """The ledger stores a test runs against, once each: SQLite files, then PostgreSQL databases."""
    if request.param == "postgres":
        return Stores("postgres", tmp_path, request.getfixturevalue("postgres"))
    return Stores("sqlite", tmp_path)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(dir=tmp_path, config=tmp_path / "keyturn.yaml", db=tmp_path / "ledger.db", data_db=tmp_path / "app.db")
    with sqlite3.connect(h.data_db) as conn:
        conn.executescript(
            "CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, qty INTEGER);"
            "INSERT INTO orders(item, qty) VALUES ('apple', 3), ('pear', 5), ('plum', 7);"
            "CREATE TABLE payroll(id INTEGER PRIMARY KEY, name TEXT, salary INTEGER);"
            "INSERT INTO payroll(name, salary) VALUES ('eve', 100);")
    h.write_config()
    yield h
    h.stop_all()


@asynccontextmanager
async def agent_client(base: str, token: str | None = None, **kwargs: Any) -> AsyncIterator[Client]:
    """The SDK's client over streamable HTTP, with the agent's bearer token when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
        async with Client(streamable_http_client(f"{base}/mcp", http_client=http), **kwargs) as client:
            yield client


class ReviewerAPI:
    """The reviewer HTTP API, as a reviewer's own tool would call it."""

    def __init__(self, base: str) -> None:
        self.base = base

    async def request(self, method: str, path: str, who: str | None, body: Any = None) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
        async with httpx2.AsyncClient(timeout=30) as http:
            return await http.request(method, self.base + path, headers=headers, json=body)

    async def pending(self, who: str = "alice") -> list[dict[str, Any]]:
        r = await self.request("GET", "/api/requests?state=pending", who)
        assert r.status_code == 200, r.text
        return list(r.json()["requests"])

    async def wait_pending(self, tool: str, who: str = "alice", timeout: float = 20) -> dict[str, Any]:
        from tests.helpers import eventually  # (the helpers import the server: not at conftest load)

        async def held() -> dict[str, Any] | None:
            return next((req for req in await self.pending(who) if req["tool"] == tool), None)

        return await eventually(held, within=timeout)  # type: ignore[no-any-return]

    async def vote(self, request_id: str, verdict: str, who: str, reason: str | None = None) -> httpx2.Response:
        return await self.request("POST", f"/api/requests/{request_id}/{verdict}", who, {"reason": reason})
