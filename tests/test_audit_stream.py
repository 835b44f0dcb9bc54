"""Audit streaming, as an auditor and a SIEM meet it: `keyturn audit follow` on a running server's ledger, and the
`audit_sink:` posting every event to a real HTTP collector on 127.0.0.1 that fails, is restarted behind, and
whose keyturn is killed mid-stream. Nothing may be lost; a repeat is allowed only as a whole batch sent again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.config import load_settings
from server.errors import ConfigError
from tests.conftest import Home, agent_client
from tests.helpers import LocalHTTP, eventually

TOKEN = "sink-token-5e1f"


class Collector:
    """A SIEM's HTTP collector: takes JSON lines with the right bearer token; refuses (503) while `failing`."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.refused = 0
        self.unauthorized = 0
        self.failing = 0  # how many more requests to refuse
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with collector.lock:
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        collector.unauthorized += 1
                        self.send_response(401)
                    elif collector.failing > 0:
                        collector.failing -= 1
                        collector.refused += 1
                        self.send_response(503)
                    else:
                        events = [json.loads(line) for line in body.decode().splitlines()]
                        assert self.headers["X-Keyturn-First-Seq"] == str(events[0]["seq"])
                        assert self.headers["X-Keyturn-Last-Seq"] == str(events[-1]["seq"])
                        collector.batches.append(events)
                        self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = LocalHTTP(Handler)
        self.url = self.http.url + "/ingest"

    def seqs(self) -> list[int]:
        with self.lock:
            return [e["seq"] for batch in self.batches for e in batch]


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.http.close()


def ledger_head(home: Home) -> int:
    return max(e["seq"] for e in home.ledger_events())


def start_follow(home: Home, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server.cli", "audit", "follow", "--config", str(home.config),
                             *args], stdout=subprocess.PIPE, env=home.env(), cwd=home.dir, text=True)


async def some_calls(base: str, n: int) -> None:
    async with agent_client(base) as client:
        for i in range(n):
            result = await client.call_tool("sql_query", {"query": f"SELECT {i}"})
            assert not result.is_error


async def test_follow_prints_events_as_they_are_appended_and_resumes_from_a_sequence_number(home: Home) -> None:
    base = home.serve_http()
    follow = start_follow(home, "--format", "jsonl", "--from", "1")
    try:
        with anyio.fail_after(60):
            await some_calls(base, 3)
        head = ledger_head(home)
        assert follow.stdout is not None
        lines = [json.loads(follow.stdout.readline()) for _ in range(head)]
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(10)
        assert follow.stdout is not None
        follow.stdout.close()
    assert follow.returncode == 130  # interrupted: the usual exit for ^C
    assert [e["seq"] for e in lines] == list(range(1, head + 1))  # every event, in order, none twice
    assert sum(e["kind"] == "executed" for e in lines) == 3
    assert all(e["hash"] and "payload" in e for e in lines)

    # Resuming: from a sequence number, the events from there on (a reader's stored cursor + 1).
    again = start_follow(home, "--from", str(head - 1))
    try:
        assert again.stdout is not None
        text = [again.stdout.readline(), again.stdout.readline()]
    finally:
        again.send_signal(signal.SIGINT)
        again.wait(10)
        assert again.stdout is not None
        again.stdout.close()
    assert text[0].startswith(f"#{head - 1} ") and text[1].startswith(f"#{head} ")

    bad = home.keyturn("audit", "follow", "--config", str(home.config), "--from", "0")
    assert bad.returncode == 2 and "--from takes a sequence number" in bad.stderr


async def test_the_sink_delivers_every_event_at_least_once_through_failures_and_a_kill(
        home: Home, collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    cursor = home.dir / "sink.cursor"
    home.write_config(audit_sink={"url": collector.url, "token_env": "SINK_TOKEN", "batch": 5,
                                  "cursor_file": str(cursor)})
    monkeypatch.setenv("SINK_TOKEN", TOKEN)  # (the server's environment is the test's)
    collector.failing = 3  # the collector is down at first: keyturn retries, with backoff, and loses nothing
    base = home.serve_http()
    with anyio.fail_after(120):
        await some_calls(base, 4)
        head = ledger_head(home)
        await eventually(lambda: collector.seqs() and collector.seqs()[-1] >= head, within=60)
    assert collector.refused == 3 and collector.unauthorized == 0
    assert sorted(set(collector.seqs())) == list(range(1, head + 1))
    assert all(len(b) <= 5 for b in collector.batches)
    await eventually(lambda: cursor.exists() and int(cursor.read_text()) == head, within=30)

    # keyturn dies (kill -9) while the collector refuses: what was not delivered is delivered by the next start.
    collector.failing = 10**6
    with anyio.fail_after(60):
        await some_calls(base, 2)
    undelivered_from = int(cursor.read_text()) + 1
    proc = home.procs.pop()
    proc.kill()
    proc.wait()
    collector.failing = 0
    base = home.serve_http()
    with anyio.fail_after(120):
        await some_calls(base, 1)
        head = ledger_head(home)
        await eventually(lambda: collector.seqs() and collector.seqs()[-1] >= head, within=60)
    seqs = collector.seqs()
    assert sorted(set(seqs)) == list(range(1, head + 1))  # nothing lost
    assert undelivered_from <= head
    # Order kept: every batch continues from the one before it, or repeats a tail of it (sent again).
    for before, after in zip(collector.batches, collector.batches[1:], strict=False):
        assert after[0]["seq"] <= before[-1]["seq"] + 1
    await eventually(lambda: int(cursor.read_text()) == head, within=30)


def test_a_sink_config_is_checked_when_keyturn_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be an http:// or https:// URL"):
        load_settings(None, audit_sink={"url": "file:///etc/passwd"})
    with pytest.raises(ConfigError, match="batch"):
        load_settings(None, audit_sink={"url": "http://127.0.0.1:1/", "batch": 0})
    from server.streaming import AuditSink

    settings = load_settings(None, db=str(tmp_path / "k.db"), audit_sink={"url": "http://127.0.0.1:1/",
                                                                          "token_env": "NOT_SET_ANYWHERE"})
    assert settings.audit_sink is not None
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE, which is not set"):
        AuditSink(None, settings.audit_sink, settings.db, environ={})  # type: ignore[arg-type]
    sink = AuditSink(None, settings.audit_sink.model_copy(update={"token_env": None}), settings.db,  # type: ignore[arg-type]
                     environ={})
    assert sink.cursor_file == tmp_path / "k.db.audit-sink-cursor"
    sink.cursor_file.write_text("twelve\n")
    with pytest.raises(ConfigError, match="does not hold a sequence number"):
        sink.read_cursor()
    sink.cursor_file.write_text("12\n")
    assert sink.read_cursor() == 12


def test_serve_refuses_to_start_with_a_broken_cursor(home: Home, collector: Collector) -> None:
    (home.dir / "sink.cursor").write_text("not a number")
    home.write_config(audit_sink={"url": collector.url, "cursor_file": str(home.dir / "sink.cursor")})
    with pytest.raises(RuntimeError, match="does not hold a sequence number"):
        home.serve_http()
