"""What the Python SDK's client (`mcp` 2.3) does with a held call over streamable HTTP, measured against a real
`keyturn serve --http` (docs/clients.md). Its own `read_timeout_seconds` is unset by default; what ends a long wait
is the HTTP client's read timeout (the SDK's default HTTP client: 300 s), counted from the last bytes received.
keyturn sends progress only to a caller that asked for it (a progress callback): those bytes keep the stream alive
past the read timeout until the approval; without them the read timeout ends the wait (here shortened to 2 s), and
keyturn records that the caller left while the request stays open."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import ReviewerAPI
from tests.helpers import eventually
from tests.reliability.conftest import RelHome, text


async def held_call(base: str, tag: str, read_timeout: float, progress: bool) -> tuple[str, Any]:
    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        pass

    try:
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=read_timeout)) as http:
            async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
                result = await client.call_tool("probe_run", {"tag": tag},
                                                progress_callback=on_progress if progress else None)
                return "result", result
    except Exception as e:  # what the agent's code sees
        return "error", e


async def test_without_progress_the_read_timeout_ends_the_wait_and_the_request_stays_open(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    with anyio.fail_after(60):
        ended, error = await held_call(base, "hold-py-quiet", read_timeout=2, progress=False)
    assert ended == "error", error
    # The transport's task group surfaces the HTTP client's read timeout.
    assert isinstance(error, httpx2.ReadTimeout) or (
        isinstance(error, BaseExceptionGroup) and error.subgroup(httpx2.ReadTimeout) is not None), repr(error)
    request = await api.wait_pending("probe_run")
    await eventually(lambda: "client.left" in [e["kind"] for e in rhome.ledger_events(request["id"])])
    assert rhome.calls()[request["id"]] == "pending"


async def test_with_progress_the_stream_outlives_the_read_timeout_until_the_approval(rhome: RelHome) -> None:
    base = rhome.serve_http()  # progress every 0.5 s (the test configuration)
    api = ReviewerAPI(base)
    outcome: list[tuple[str, Any]] = []

    async def call() -> None:
        outcome.append(await held_call(base, "hold-py-progress", read_timeout=2, progress=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        request = await api.wait_pending("probe_run")
        await anyio.sleep(5)  # well past its 2 s read timeout
        assert not outcome
        r = await api.vote(request["id"], "approve", "alice", "ok")
        assert r.status_code == 200, r.text
    ended, result = outcome[0]
    assert ended == "result" and not result.is_error, result
    assert '"hold-py-progress"' in text(result)
