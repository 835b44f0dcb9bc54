"""The proxy over HTTP, both ways: `keyturn proxy --http` serving agents over streamable HTTP (with the reviewer
API in the same process), and `--upstream-url` guarding a streamable HTTP upstream that wants a bearer token."""

from __future__ import annotations

import html
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client

from tests.conftest import TOKENS, ReviewerAPI, agent_client, free_port
from tests.helpers import eventually, outcome_of
from tests.proxy.conftest import HTTP_UPSTREAM, ProxyHome, git, git_upstream, text


async def test_proxy_serving_http_with_its_own_reviewer_api(home: ProxyHome, repo: Path) -> None:
    home.configure([git_upstream(repo)])
    base = home.proxy_http()
    api = ReviewerAPI(base)
    results: list[types.CallToolResult] = []
    with anyio.fail_after(60):
        async with agent_client(base) as client:
            assert "git_commit" in {t.name for t in (await client.list_tools()).tools}
            log = await client.call_tool("git_log", {"repo_path": str(repo)})
            assert not log.is_error and "initial commit" in text(log)

            async def agent() -> None:
                results.append(await client.call_tool("git_commit", {"repo_path": str(repo), "message": "over http"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                req = await api.wait_pending("git_commit")
                await _inbox_names_the_upstream(base, req["id"])
                assert (await api.vote(req["id"], "approve", "alice", "ok")).status_code == 200
    assert not results[0].is_error, text(results[0])
    assert git(repo, "log", "-1", "--format=%s").strip() == "over http"
    assert home.terminal(req["id"]) == "executed"

    async def upstream_up() -> bool:  # the metrics tell the upstream's health (read every few seconds)
        async with httpx2.AsyncClient(timeout=30) as http:
            return 'keyturn_upstream_up{upstream="git"} 1.0' in (await http.get(base + "/metrics")).text

    await eventually(upstream_up, within=30)


async def _inbox_names_the_upstream(base: str, request_id: str) -> None:
    """A reviewer signed in to the web inbox sees which upstream server a held call goes to, under its own name."""
    async with httpx2.AsyncClient(base_url=base, timeout=30, headers={"Origin": base}) as http:
        page = (await http.get("/login")).text
        csrf = html.unescape(re.search(r'name="csrf" value="([^"]+)"', page).group(1))  # type: ignore[union-attr]
        assert (await http.post("/login", data={"csrf": csrf, "token": TOKENS["alice"], "next": "/inbox"})
                ).status_code == 303
        shown = "upstream server <code>git: git_commit</code>"
        assert shown in (await http.get("/inbox")).text
        assert shown in (await http.get(f"/inbox/requests/{request_id}")).text
        icon = await http.get("/inbox/static/favicon.svg")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        assert "default-src 'self'" in icon.headers["content-security-policy"]
        assert '<link rel="icon" href="/inbox/static/favicon.svg"' in (await http.get("/inbox")).text


def _start_notes(home: ProxyHome, port: int, notes: Path) -> Any:
    return home.start([sys.executable, str(HTTP_UPSTREAM), str(port), "s3cret-upstream-token", str(notes)],
                      f"notes-{port}.log", f"http://127.0.0.1:{port}/mcp")


async def test_an_http_upstream_with_a_token_is_guarded_and_reconnected(home: ProxyHome, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("- buy milk\n")
    port = free_port()
    upstream = _start_notes(home, port, notes)
    home.configure([], call_timeout=3, connect_timeout=3)
    api = ReviewerAPI(home.serve_http())
    params = home.proxy_params("--upstream-url", f"http://127.0.0.1:{port}/mcp",
                               "--header", "Authorization: Bearer s3cret-upstream-token")
    results: list[types.CallToolResult] = []
    with anyio.fail_after(90):
        async with Client(params) as client:
            read = await client.call_tool("read_note", {"name": "todo.md"})
            assert not read.is_error and "buy milk" in text(read)

            async def agent() -> None:
                results.append(await client.call_tool("write_note", {"name": "todo.md", "text": "- nothing\n"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                req = await api.wait_pending("write_note")
                assert (notes / "todo.md").read_text() == "- buy milk\n"
                assert (await api.vote(req["id"], "approve", "alice", "ok")).status_code == 200
            assert not results[0].is_error, text(results[0])
            assert (notes / "todo.md").read_text() == "- nothing\n"

            os.kill(upstream.pid, signal.SIGKILL)
            upstream.wait()
            down = await client.call_tool("read_note", {"name": "todo.md"})
            assert down.is_error and "upstream '127-0-0-1'" in text(down)  # named after its host
            _start_notes(home, port, notes)
            async def read_back() -> types.CallToolResult | None:
                answer = await client.call_tool("read_note", {"name": "todo.md"})
                return None if answer.is_error else answer

            back = await eventually(read_back, within=30, every=0.2)
            assert "nothing" in text(back)
    assert home.terminal(req["id"]) == "executed"
    assert home.terminal(outcome_of(down)["call_id"]) == "failed"
