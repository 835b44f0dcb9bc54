"""The stdio fast lane: well-formed `tools/call` requests for guarded tools go straight to the gate.

The MCP SDK's low-level `Server` spends about half a millisecond on each request's plumbing (pydantic
validation of the JSON-RPC message, a dispatcher task, context streams, an OpenTelemetry span, result
serialisation): more than keyturn's whole guard. `stdio_transport` offers every line it reads to
`FastLane.take` first. The lane takes a line only when all of these hold:

- the SDK has settled the session's protocol era from the client's first request (the lane never takes that
  one), and either
  - it is a handshake-era session (2024-11-05 to 2025-11-25) that completed the SDK's `initialize` handshake (the
    lane watches the request go in and its result come out), and the call's `_meta` holds no reserved
    `io.modelcontextprotocol/` keys; or
  - it is a 2026-era session (each request carries its own protocol version, client info and capabilities in
    `_meta`; the SDK's own `Client` opens these by default), and the call's envelope passes the SDK's inbound
    ladder and holds no reserved key beyond those three;
- the line is a JSON object with exactly `jsonrpc: "2.0"`, `method: "tools/call"`, an int or string `id`, and
  `params` holding only `name`, `arguments` (an object) and `_meta` (an object), which the SDK's own validators
  accept at the session's (or, in the 2026 era, the request's) protocol version;
- `name` is a guarded tool (not `keyturn_status` or `keyturn_cancel`) and no call with that id is in flight here.

It then parses the line once, calls `Gate.call` with the same identity, arguments and progress channel the
SDK path would give, and writes the JSON-RPC response the SDK would write (in the 2026 era with the
`resultType` and `serverInfo` stamp the SDK adds), through the same writer. The gate
stays the only way to a tool: the lane skips the SDK's plumbing, never the guard. Every other line goes to the
SDK exactly as read and gets the SDK's own answers and errors. A `notifications/cancelled` naming a call in
flight here cancels it (that call is then never answered, as with the SDK) and goes on to the SDK as well.

The CLI leaves the lane out when `KEYTURN_STDIO_FASTLANE=0`, for comparison or as an escape hatch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import anyio
import anyio.abc
import mcp_types as types
from mcp.server._otel import OpenTelemetryMiddleware
from mcp.server.connection import _typed
from mcp.server.lowlevel import Server
from mcp.server.runner import _has_modern_envelope  # the SDK's own era rule, so both decide alike
from mcp.shared.dispatcher import as_request_id, coerce_request_id
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import InboundLadderRejection, classify_inbound_request
from mcp.shared.jsonrpc_dispatcher import handler_exception_to_error_data, progress_token_from_params
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY, SERVER_INFO_META_KEY
from mcp_types import methods as mcp_methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from pydantic_core import from_json, to_json

from server.app import Keyturn
from server.gate import Identity, ProgressFn, Runnable
from server.mcp_app import BUILTIN, client_label, model_from_meta, monotonic_progress

log = logging.getLogger(__name__)

PARAM_KEYS = frozenset({"name", "arguments", "_meta"})
REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
RESERVED_META_PREFIX = "io.modelcontextprotocol/"
ENVELOPE_KEYS = frozenset({PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY, CLIENT_CAPABILITIES_META_KEY})
LEGACY, MODERN = "handshake", "2026"
SHUTDOWN_WRITE_TIMEOUT = 1.0
"""How long a call cut short by shutdown may try to tell the client so (as the SDK's dispatcher does)."""


class LineSink(Protocol):
    """The transport's writer: `send` writes one whole line at once, so lines never interleave."""

    def send(self, line: bytes) -> None: ...

    async def flush(self) -> None: ...


@dataclass
class _Call:
    id: types.RequestId
    version: str  # the protocol version the answer is shaped for
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    cancelled: bool = False  # by the client: never answered


class FastLane:
    """Answers the `tools/call` requests it takes on one stdio session; see the module docstring."""

    def __init__(self, kt: Keyturn, identity: Identity, server: Server[Any]) -> None:
        self._kt = kt
        self._identity = identity  # principal and on_behalf_of; client and model are the session's and call's
        self._stamp = server.server_info_stamp  # what the SDK stamps on 2026-era results (a fresh copy: ours)
        # A cache hint on tools/call would change the SDK's answers; the lane does not reproduce hints, so stands down.
        # Nor does it run request middleware, so it stands down if there is any beyond the SDK's tracing span.
        self._off = "tools/call" in server.cache_hints or any(
            not isinstance(m, OpenTelemetryMiddleware) for m in server.middleware)
        self._era: str | None = None  # settled by the client's first request, as the SDK settles it
        self._envelope: tuple[Any, Any, str | None] | None = None  # the last 2026 client info and capabilities seen
        self._sink: LineSink | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._initializing: dict[types.RequestId, tuple[Any, Any]] = {}  # `initialize` ids sent to the SDK -> clientInfo
        self._version: str | None = None  # negotiated by the SDK; None until a handshake succeeds
        self._client: str | None = None
        self._in_flight: dict[types.RequestId, _Call] = {}

    @asynccontextmanager
    async def serving(self, sink: LineSink) -> AsyncIterator[None]:
        """Take calls while inside, writing to `sink`; calls still running when it ends are cancelled."""
        async with anyio.create_task_group() as tg:
            self._sink, self._tg = sink, tg
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    @property
    def ready(self) -> bool:
        if self._tg is None or self._off:
            return False
        if self._era == MODERN:
            return True
        return self._era == LEGACY and self._version is not None and not self._initializing

    def take(self, line: bytes) -> bool:
        """Whether the lane took this line read from stdin (and answers it); if not, it goes to the SDK."""
        try:
            if self._era is None:
                self._settle_era(line)
            elif b'"tools/call"' in line and self.ready and self._take_call(line):
                return True
            if b'"initialize"' in line or (self._in_flight and b'"notifications/cancelled"' in line):
                self._observe(from_json(line))
        except ValueError:
            pass  # not JSON: the SDK's to answer
        except Exception:  # the lane must never cost the SDK a line
            log.exception("fast lane: passing a line on to the SDK after an error")
        return False

    def sent(self, text: str) -> None:
        """Watch a line the SDK writes: the result of an `initialize` completes (or renews) the handshake."""
        if not self._initializing:
            return
        try:
            message = from_json(text)
        except ValueError:
            return
        if not isinstance(message, dict) or (rid := as_request_id(message.get("id"))) is None:
            return
        client_info = self._initializing.pop(rid, None)
        if client_info is None:
            return
        result = message.get("result")
        version = result.get("protocolVersion") if isinstance(result, dict) else None
        if not isinstance(version, str):
            return  # refused: the SDK keeps the session as it was, and so does the lane
        name, client_version = client_info
        if version not in HANDSHAKE_PROTOCOL_VERSIONS or not (isinstance(name, str) and isinstance(client_version, str)):
            self._version, self._client = None, None
        else:
            self._version, self._client = version, client_label(name, client_version)

    # -- reading ----------------------------------------------------------------------------------

    def _settle_era(self, line: bytes) -> None:
        """Follow the SDK's choice of era (`serve_dual_era_loop`): its first request that parses as one decides,
        2026 if it is not `initialize` and carries the 2026 envelope, else the handshake era. The lines up to and
        including that one all go to the SDK."""
        try:  # the SDK's own parse of the line, as its stdio reader does it
            message = types.jsonrpc_message_adapter.validate_json(line.decode("utf-8", errors="replace"),
                                                                   by_name=False)
        except ValueError:
            return
        if isinstance(message, types.JSONRPCRequest):
            modern = message.method != "initialize" and _has_modern_envelope(message.params)
            self._era = MODERN if modern else LEGACY
            log.debug("fast lane: the session is in the %s era", self._era)

    def _observe(self, message: Any) -> None:
        """A line for the SDK that the lane must know of: an `initialize` request, or a cancellation."""
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return
        params = message.get("params")
        if message.get("method") == "initialize":
            rid = as_request_id(message.get("id"))
            if rid is None or not isinstance(params, dict | None):
                return  # the SDK drops it unanswered
            info = params.get("clientInfo") if params is not None else None
            info = info if isinstance(info, dict) else {}
            self._initializing[rid] = (info.get("name"), info.get("version"))
        elif message.get("method") == "notifications/cancelled" and isinstance(params, dict):
            rid = as_request_id(params.get("requestId"))
            call = self._in_flight.get(coerce_request_id(rid)) if rid is not None else None
            if call is not None:
                log.debug("fast lane: the client cancelled id=%r", call.id)
                call.cancelled = True
                call.scope.cancel()

    def _take_call(self, line: bytes) -> bool:
        try:
            message = from_json(line)  # the SDK's own JSON parser, so both lanes read a line alike
        except ValueError:
            return False
        if not (isinstance(message, dict) and message.keys() <= REQUEST_KEYS and message.get("jsonrpc") == "2.0"
                and message.get("method") == "tools/call"):
            return False
        rid = message.get("id")
        params = message.get("params")
        if not (isinstance(rid, int | str) and not isinstance(rid, bool) and isinstance(params, dict)
                and params.keys() <= PARAM_KEYS):
            return False
        name = params.get("name")
        arguments = params.get("arguments", {})
        meta = params.get("_meta", {})
        if not (isinstance(name, str) and isinstance(arguments, dict) and isinstance(meta, dict)):
            return False
        if self._era == MODERN:
            if any(key.startswith(RESERVED_META_PREFIX) and key not in ENVELOPE_KEYS for key in meta):
                return False
            route = classify_inbound_request({"method": "tools/call", "params": params})
            if isinstance(route, InboundLadderRejection):
                return False  # the SDK's to refuse, with its own error
            version, client = route.protocol_version, self._envelope_client(route.client_info,
                                                                             route.client_capabilities)
        else:
            if any(key.startswith(RESERVED_META_PREFIX) for key in meta):
                return False
            assert self._version is not None
            version, client = self._version, self._client
        key = coerce_request_id(rid)
        tool = None if name in BUILTIN or key in self._in_flight else self._kt.find_tool(name)
        if tool is None or self._tg is None or not self._sdk_accepts(params, version):
            return False
        token = progress_token_from_params(params)  # the SDK's rule for whether a call reports progress
        who = Identity(principal=self._identity.principal, on_behalf_of=self._identity.on_behalf_of,
                       model=model_from_meta(meta), client=client, session=None)
        progress = monotonic_progress(partial(self._progress, token)) if token is not None else None
        call = self._in_flight[key] = _Call(rid, version)
        log.debug("fast lane: tools/call %s id=%r", name, rid)
        self._tg.start_soon(self._serve, call, key, tool, arguments, who, progress)
        return True

    def _envelope_client(self, info: Any, capabilities: Any) -> str | None:
        """The client label the SDK's `Connection.from_envelope` gives a 2026 request: `name/version` when both its
        client info and its capabilities are well formed, else none (a mis-shaped value reads as not supplied)."""
        if self._envelope is not None and self._envelope[0] == info and self._envelope[1] == capabilities:
            return self._envelope[2]  # the same client sends the same envelope on every request
        implementation = _typed(types.Implementation, info)  # the SDK's own reading of an envelope value
        client = None
        if implementation is not None and _typed(types.ClientCapabilities, capabilities) is not None:
            client = client_label(implementation.name, implementation.version)
        self._envelope = (info, capabilities, client)
        return client

    def _sdk_accepts(self, params: dict[str, Any], version: str) -> bool:
        """Whether the SDK would hand these params to the handler (`ServerRunner._on_request`): what it refuses,
        it refuses with its own errors."""
        try:
            mcp_methods.validate_client_request("tools/call", version, params)
            types.CallToolRequestParams.model_validate(params, by_name=False)
        except (ValidationError, KeyError, ValueError):
            return False
        return True

    # -- answering --------------------------------------------------------------------------------

    async def _serve(self, call: _Call, key: types.RequestId, tool: Runnable, arguments: dict[str, Any],
                     who: Identity, progress: ProgressFn | None) -> None:
        """One call, answered as the SDK's dispatcher answers a request (`JSONRPCDispatcher._handle_request`)."""
        answered = False
        try:
            with call.scope:
                try:
                    result = await self._kt.gate.call(tool, arguments, who, progress)
                finally:
                    if self._in_flight.get(key) is call:
                        del self._in_flight[key]
                line = self._result_line(call.id, call.version, result)
                if not call.cancelled:
                    answered = True
                    await self._write(line)
        except anyio.get_cancelled_exc_class():
            # Shutdown: say so, as the SDK does, unless an answer went out or the client stopped waiting.
            if not answered and not call.cancelled:
                with anyio.move_on_after(SHUTDOWN_WRITE_TIMEOUT, shield=True):
                    await self._write(_error_line(call.id, types.ErrorData(code=types.CONNECTION_CLOSED,
                                                                           message="Connection closed")))
            raise
        except Exception as e:
            error = handler_exception_to_error_data(e)
            if error is None:
                log.exception("fast lane: the call id=%r failed", call.id)
                error = types.ErrorData(code=types.INTERNAL_ERROR, message="Internal server error")
            if not answered and not call.cancelled:
                await self._write(_error_line(call.id, error))

    def _result_line(self, rid: types.RequestId, version: str, result: types.CallToolResult) -> bytes:
        """The response line the SDK writes for `result` (`ServerRunner._serialize`, then the stdio writer)."""
        dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        try:
            # Checked against the version's schema, and trimmed to it, as the SDK does.
            dumped = mcp_methods.serialize_server_result("tools/call", version, dumped)
        except ValidationError:
            log.exception("fast lane: the gate returned an invalid result")
            raise MCPError(code=types.INTERNAL_ERROR, message="Handler returned an invalid result") from None
        if version in MODERN_PROTOCOL_VERSIONS:  # as `ServerRunner._serialize` and `_stamp_server_info`
            if dumped.get("resultType") is None:
                dumped["resultType"] = "complete"
            meta = dumped.get("_meta")
            if meta is None:
                dumped["_meta"] = {SERVER_INFO_META_KEY: self._stamp}
            elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
                dumped["_meta"] = {**meta, SERVER_INFO_META_KEY: self._stamp}
        # As `JSONRPCResponse(...).model_dump_json(by_alias=True, exclude_unset=True)`: same fields, same bytes.
        return to_json({"jsonrpc": "2.0", "id": rid, "result": dumped}, inf_nan_mode="null") + b"\n"

    async def _progress(self, token: types.ProgressToken, progress: float, total: float | None,
                        message: str | None) -> None:
        params: dict[str, Any] = {"progressToken": token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        note = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params=params)
        await self._write(note.model_dump_json(by_alias=True, exclude_unset=True).encode("utf-8") + b"\n")

    async def _write(self, line: bytes) -> None:
        if self._sink is None:
            return
        try:
            self._sink.send(line)
            await self._sink.flush()
        except (ConnectionError, OSError) as e:  # the client is gone
            log.debug("fast lane: a line was not delivered: %s", e)


def _error_line(rid: types.RequestId, error: types.ErrorData) -> bytes:
    response = types.JSONRPCError(jsonrpc="2.0", id=rid, error=error)
    return response.model_dump_json(by_alias=True, exclude_unset=True).encode("utf-8") + b"\n"
