"""OpenTelemetry traces: keyturn's own spans for the steps of a call, under the `mcp` SDK's span for the request.

Off by default. They are on when the standard environment says traces go somewhere (`OTEL_TRACES_EXPORTER`,
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; see `server.config.Telemetry`): keyturn then
installs the OpenTelemetry SDK's tracer provider with the exporter those variables choose (`otlp`, the default, over
HTTP/protobuf; or `console`, on stderr), unless the process already has one (`opentelemetry-instrument`).

Spans: `keyturn.classify`, `keyturn.decide`, `keyturn.hold`, `keyturn.run` and `keyturn.record`, each carrying
`keyturn.call_id` and `keyturn.tool` (and the outcome where there is one): never arguments, facts or results.
With traces off, `span` is a shared no-op (even the OpenTelemetry API's no-op spans cost tens of microseconds each,
against a guard measured in hundreds).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace

from server.errors import ConfigError

log = logging.getLogger(__name__)

tracer = trace.get_tracer("keyturn")


_enabled = False
_OFF: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)  # its set_attributes does nothing


def span(step: str, call_id: str, tool: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
    """A span for one step of a call: `keyturn.<step>` (a no-op while traces are off)."""
    if not _enabled:
        return _OFF
    return tracer.start_as_current_span(f"keyturn.{step}", attributes={
        "keyturn.call_id": call_id, "keyturn.tool": tool,
        **{f"keyturn.{k}": v for k, v in attributes.items() if v is not None}})


def configure(environ: Mapping[str, str]) -> Any:
    """Install the SDK's tracer provider with the exporter the environment names; returns it (to shut it down at
    exit), or None when the process already has a provider of its own. `ConfigError` when the SDK is missing."""
    global _enabled
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        _enabled = True
        return None  # configured already (opentelemetry-instrument, or the embedding program)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        raise ConfigError("traces are switched on (the OTEL_* environment or telemetry.traces) but the "
                          "OpenTelemetry SDK is not installed: pip install 'keyturn[otel]'") from None
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    exporters: list[SpanExporter] = []
    for name in names or ["otlp"]:
        if name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                                     "http/protobuf"))
            if protocol != "http/protobuf":
                raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: keyturn exports traces over "
                                  "http/protobuf")
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise ConfigError("OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'keyturn[otel]'") \
                    from None
            exporters.append(OTLPSpanExporter())  # (its endpoint, headers and timeout from OTEL_EXPORTER_OTLP_*)
        elif name == "console":
            exporters.append(ConsoleSpanExporter(out=sys.stderr))  # never stdout: a stdio server speaks MCP there
        elif name != "none":
            raise ConfigError(f"OTEL_TRACES_EXPORTER {name!r}: keyturn knows otlp, console and none")
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "keyturn")})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _enabled = True
    return provider


def shutdown(provider: Any) -> None:
    """Send what is batched and stop (at exit)."""
    if provider is not None:
        try:
            provider.shutdown()
        except Exception as e:  # an exporter that cannot reach its collector at exit
            log.warning("traces not all sent at exit: %s", e)
