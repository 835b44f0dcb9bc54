"""Prometheus metrics as an operator scrapes them from a running `keyturn serve --http`: calls by tool, outcome and
rule, calls held now, time to decision, votes by channel, ledger write latency, checkpoint age; on the agent port
or a port of their own with a bearer token. Parsed with prometheus-client's own parser."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client, free_port
from tests.helpers import eventually

SCRAPE_TOKEN = "scrape-token-19ad"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(url: str, token: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.get(url, headers=headers)


async def test_metrics_on_the_agent_port_tell_calls_holds_and_decisions(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    before = samples((await scrape(base + "/metrics")).text)
    assert value(before, "keyturn_held_calls") == 0
    results: list[Any] = []
    with anyio.fail_after(90):
        async with agent_client(base) as client:
            assert not (await client.call_tool("sql_query", {"query": "SELECT 1"})).is_error

            async def held() -> None:
                results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE id = 1"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(held)
                req = await api.wait_pending("sql_execute")
                now = samples((await scrape(base + "/metrics")).text)
                assert value(now, "keyturn_held_calls") == 1  # an agent waits on a reviewer, now
                await eventually(lambda: _pending(base), within=30)
                assert (await api.vote(req["id"], "approve", "alice", "ok")).status_code == 200
    assert not results[0].is_error
    r = await scrape(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)
    executed = {dict(labels)["tool"]: v for (n, labels), v in after.items()
                if n == "keyturn_calls_total" and dict(labels)["outcome"] == "executed"}
    assert executed == {"sql_query": 1, "sql_execute": 1}
    rules = {dict(labels)["tool"]: dict(labels)["rule"] for (n, labels), v in after.items()
             if n == "keyturn_calls_total"}
    decided = {e["payload"]["rules"][0]["id"] if e["payload"]["rules"] else "default"
               for e in home.ledger_events() if e["kind"] == "decision"}
    assert set(rules.values()) <= decided | {"default"} and rules["sql_execute"] in decided
    assert value(after, "keyturn_votes_total", channel="api", verdict="approve") == 1
    assert value(after, "keyturn_decisions_total", decision="approved") == 1
    assert value(after, "keyturn_time_to_decision_seconds_count", decision="approved") == 1
    assert value(after, "keyturn_held_calls") == 0
    assert value(after, "keyturn_ledger_write_seconds_count") > value(before, "keyturn_ledger_write_seconds_count")
    # No argument, principal or person ever becomes a label.
    text = r.text
    for secret in ("DELETE FROM", "orders WHERE", "alice", TOKENS["alice"], "local"):
        assert secret not in text


async def _pending(base: str) -> bool:
    return value(samples((await scrape(base + "/metrics")).text), "keyturn_pending_requests") == 1


async def test_metrics_on_a_port_of_their_own_want_the_scrapers_token(home: Home,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("KEYTURN_SCRAPE_TOKEN", SCRAPE_TOKEN)
    home.write_config(metrics={"listen": f"127.0.0.1:{port}", "token_env": "KEYTURN_SCRAPE_TOKEN"})
    base = home.serve_http()
    url = f"http://127.0.0.1:{port}/metrics"
    assert (await scrape(url)).status_code == 401
    assert (await scrape(url, "wrong")).status_code == 401
    ok = await scrape(url, SCRAPE_TOKEN)
    assert ok.status_code == 200 and "keyturn_held_calls" in ok.text
    assert (await scrape(base + "/metrics")).status_code == 404  # not on the agent port any more
    # The server still stops on its signal (the metrics server leaves the process's signals alone).
    proc = home.procs[-1]
    proc.terminate()
    assert proc.wait(30) is not None


def test_metrics_off_loopback_without_a_token_is_refused_before_anything_starts(home: Home) -> None:
    home.write_config(metrics={"listen": "0.0.0.0:9464"})
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--http", f"127.0.0.1:{free_port()}",
                           "--config", str(home.config)], capture_output=True, text=True, env=home.env(),
                          cwd=home.dir, timeout=60)
    assert done.returncode == 2 and "refusing to serve metrics on 0.0.0.0" in done.stderr
    assert not home.db.exists()  # nothing was recorded


async def test_metrics_can_be_switched_off(home: Home) -> None:
    home.write_config(metrics={"enabled": False})
    base = home.serve_http()
    assert (await scrape(base + "/metrics")).status_code == 404


def _serve_everywhere(home: Home, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--http", f"0.0.0.0:{port}", "--config",
                             str(home.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=home.env(), cwd=home.dir)
    home.procs.append(proc)  # type: ignore[arg-type]
    return proc


async def test_the_agent_port_off_loopback_serves_no_metrics_without_a_scraper_token(home: Home) -> None:
    """The same rule as for a port of their own: off loopback only a scraper with the token reads them."""
    import hashlib

    home.write_config(agents=[{"name": "ci-bot", "token_sha256": hashlib.sha256(b"agent-token-6a").hexdigest()}])
    port = free_port()
    proc = _serve_everywhere(home, port)

    async def healthy() -> bool:
        try:
            return (await scrape(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        except httpx2.HTTPError:
            return False

    await eventually(healthy, within=60)
    assert (await scrape(f"http://127.0.0.1:{port}/metrics")).status_code == 404
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "metrics are not served on 0.0.0.0" in err
