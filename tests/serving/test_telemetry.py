"""The MCP SDK's per-message OpenTelemetry span is kept only when traces are exported: `telemetry: {traces: auto}`
reads the standard OpenTelemetry environment, `on` and `off` force it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from opentelemetry import trace

from server.config import Person, Settings, Telemetry, ToolPack, load_settings
from server.errors import ConfigError
from server.runtime import running
from server.serving.mcp import build_mcp_server
from tests.conftest import DATA


class RecordingTracer(trace.NoOpTracer):
    """A tracer that notes the name of every span started through it."""

    def __init__(self) -> None:
        self.names: list[str] = []

    @contextmanager
    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:  # type: ignore[override]
        self.names.append(name)
        yield trace.INVALID_SPAN


class RecordingProvider(trace.NoOpTracerProvider):
    def __init__(self) -> None:
        self.tracer = RecordingTracer()

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return self.tracer


def recording_tracer() -> RecordingTracer:
    """The process's tracer provider, installed once (OpenTelemetry allows one per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, RecordingProvider):
        provider = RecordingProvider()
        trace.set_tracer_provider(provider)
    return provider.tracer


@pytest.mark.parametrize(("traces", "environ", "kept"), [
    ("auto", {}, False),
    ("auto", {"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ("auto", {"OTEL_TRACES_EXPORTER": " None "}, False),
    ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ("auto", {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ("on", {}, True),
    ("on", {"OTEL_TRACES_EXPORTER": "none"}, True),
    ("off", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
])
def test_traces_are_kept_when_the_environment_exports_them_or_the_setting_forces_it(
        traces: Any, environ: dict[str, str], kept: bool) -> None:
    assert Telemetry(traces=traces).traces_exported(environ) is kept


def test_the_setting_is_read_from_the_config_file_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "keyturn.yaml"
    assert load_settings(None).telemetry.traces == "auto"
    config.write_text("telemetry: {traces: off}\n", encoding="utf-8")
    assert load_settings(config).telemetry.traces == "off"
    config.write_text("telemetry: {traces: sometimes}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="traces"):
        load_settings(config)


@pytest.mark.parametrize("traces", [True, False])
async def test_the_sdk_span_per_message_is_there_only_when_traces_are_kept(tmp_path: Path, traces: bool) -> None:
    tracer = recording_tracer()
    settings = Settings(db=tmp_path / "ledger.db", policy=DATA / "spine-policy.yaml",
                        people={"alice": Person(groups=("dba",)), "carol": Person(groups=("dba",))},
                        tools=(ToolPack(module="tools.sql", options={"database": str(tmp_path / "app.db")}),))
    async with running(settings) as kt:
        server = build_mcp_server(kt, traces=traces)
        assert [type(m).__name__ for m in server.middleware] == (["OpenTelemetryMiddleware"] if traces else [])
        tracer.names.clear()
        async with Client(server) as client:
            result = await client.call_tool("keyturn_status", {"request_id": "nope"})
    assert result.is_error
    assert ("tools/call keyturn_status" in tracer.names) is traces, tracer.names
