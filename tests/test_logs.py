"""Log lines an operator's pipeline can read: `--log-format json` gives one JSON object per line on stderr, each
line logged while a call is served names the call (`call_id`, the id `keyturn audit show` takes), and uvicorn's own
lines come through the same handler."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import anyio

from server.logs import CallIdFilter, JsonFormatter, current_call
from tests.conftest import Home, agent_client, free_port


def test_a_json_line_carries_the_call_id_of_the_task_that_logged_it() -> None:
    record = logging.LogRecord("server.gate", logging.WARNING, __file__, 1, "x %s", ("y",), None)
    token = current_call.set("c-123")
    try:
        CallIdFilter().filter(record)
    finally:
        current_call.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["call_id"] == "c-123" and line["message"] == "x y" and line["level"] == "warning"
    assert line["logger"] == "server.gate" and line["ts"].endswith("Z")
    outside = logging.LogRecord("server", logging.ERROR, __file__, 1, "z", (), None)
    CallIdFilter().filter(outside)
    assert json.loads(JsonFormatter().format(outside))["call_id"] is None


def _serve(home: Home, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--http", f"127.0.0.1:{port}", "--config", str(home.config),
         "--log-format", "json", "--log-level", "INFO"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=home.env(), cwd=home.dir)


async def test_serve_logs_json_lines_naming_each_call(home: Home) -> None:
    port = free_port()
    proc = _serve(home, port)
    try:
        base = f"http://127.0.0.1:{port}"
        with anyio.fail_after(60):
            while True:
                try:
                    async with agent_client(base) as client:
                        ok = await client.call_tool("sql_query", {"query": "SELECT 1"})
                        bad = await client.call_tool("sql_query", {"nope": 1})
                    break
                except Exception:  # not listening yet
                    await anyio.sleep(0.2)
        assert not ok.is_error and bad.is_error
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert all(line.startswith("{") for line in err.splitlines() if line.strip()), err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    assert lines
    calls = {e["call_id"]: e for e in home.ledger_events() if e["kind"] == "call.received"}
    decided = [line for line in lines if line["logger"] == "server.gate"]
    assert {line["call_id"] for line in decided} == set(calls)
    assert any("sql_query from " in line["message"] and "allow" in line["message"] for line in decided)
    assert any(line["message"].endswith(": refused") for line in decided)
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's lines, as JSON too
