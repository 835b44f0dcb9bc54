"""OpenTelemetry traces from a real `keyturn serve --http` to a local OTLP/HTTP collector (protobuf, decoded with
OpenTelemetry's own message definitions), switched on by the standard environment variables alone: keyturn's spans
for each step of a call, under the `mcp` SDK's span for the request, naming the call and never its arguments."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import anyio
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import Home, ReviewerAPI, agent_client
from tests.helpers import LocalHTTP, eventually

SECRET_ARGUMENT = "canary-argument-8f3e"


class Collector:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for rs in request.resource_spans:
                    service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            collector.spans.append({
                                "name": sp.name, "trace": sp.trace_id.hex(), "id": sp.span_id.hex(),
                                "parent": sp.parent_span_id.hex(), "service": service,
                                "attributes": {a.key: a.value.string_value or a.value.int_value
                                               for a in sp.attributes}})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = LocalHTTP(Handler)
        self.url = self.http.url


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.http.close()


async def test_each_step_of_a_call_is_a_span_under_the_sdks_request_span(
        home: Home, collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "keyturn-test")
    base = home.serve_http()
    api = ReviewerAPI(base)
    results: list[Any] = []
    with anyio.fail_after(90):
        async with agent_client(base) as client:
            assert not (await client.call_tool("sql_query", {"query": f"SELECT '{SECRET_ARGUMENT}'"})).is_error

            async def held() -> None:
                results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE id = 1"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(held)
                req = await api.wait_pending("sql_execute")
                assert (await api.vote(req["id"], "approve", "alice", "ok")).status_code == 200
    assert not results[0].is_error
    calls = {e["payload"]["tool"]: e["call_id"] for e in home.ledger_events() if e["kind"] == "call.received"}

    def steps(tool: str) -> list[str]:
        return sorted(s["name"] for s in collector.spans if s["attributes"].get("keyturn.call_id") == calls[tool])

    await eventually(lambda: "keyturn.run" in steps("sql_execute"), within=30)
    assert steps("sql_query") == ["keyturn.classify", "keyturn.decide", "keyturn.record", "keyturn.record",
                                  "keyturn.run"]
    assert {"keyturn.classify", "keyturn.decide", "keyturn.hold", "keyturn.run"} <= set(steps("sql_execute"))
    # keyturn's spans are children of the SDK's span for that tools/call request, in the same trace.
    by_id = {s["id"]: s for s in collector.spans}
    decide = next(s for s in collector.spans if s["name"] == "keyturn.decide"
                  and s["attributes"]["keyturn.call_id"] == calls["sql_query"])
    assert decide["attributes"]["keyturn.outcome"] == "allow"
    parent = by_id[decide["parent"]]
    assert parent["name"] == "tools/call sql_query" and parent["trace"] == decide["trace"]
    assert {s["service"] for s in collector.spans} == {"keyturn-test"}
    # No argument ever reaches a span.
    assert all(SECRET_ARGUMENT not in str(s) and "DELETE FROM" not in str(s) for s in collector.spans)


def test_traces_stay_off_without_the_environment(home: Home) -> None:
    from server import tracing
    from server.config import Telemetry

    assert not Telemetry().traces_exported({})
    with tracing.span("run", "c", "t") as s:  # off: the shared no-op
        assert not s.is_recording()
