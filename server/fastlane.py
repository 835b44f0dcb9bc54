"""The stdio fast lane: well-formed `tools/call` requests for guarded tools go straight to the gate.

The MCP SDK's low-level `Server` spends about half a millisecond on each request's plumbing (pydantic
validation of the JSON-RPC message, a dispatcher task, context streams, an OpenTelemetry span, result
serialisation): more than keyturn's whole guard. `stdio_transport` offers every line it reads to
`FastLane.take` first. The lane takes a line only when all of these hold:

- the session completed the SDK's `initialize` handshake (the lane watches the request go in and its result
  come out) at a handshake-era protocol version, not a 2026-era stateless one;
- the line is a JSON object with exactly `jsonrpc: "2.0"`, `method: "tools/call"`, an int or string `id`, and
  `params` holding only `name`, `arguments` (an object) and `_meta` (an object, no reserved
  `io.modelcontextprotocol/` keys), which the SDK's own validators accept;
- `name` is a guarded tool (not `keyturn_status` or `keyturn_cancel`) and no call with that id is in flight here.

It then parses the line once, calls `Gate.call` with the same identity, arguments and progress channel the
SDK path would give, and writes the JSON-RPC response the SDK would write, through the same writer. The gate
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
from mcp.shared.dispatcher import as_request_id, coerce_request_id
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import handler_exception_to_error_data, progress_token_from_params
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
SHUTDOWN_WRITE_TIMEOUT = 1.0
"""How long a call cut short by shutdown may try to tell the client so (as the SDK's dispatcher does)."""


class LineSink(Protocol):
    """The transport's writer: `send` writes one whole line at once, so lines never interleave."""

    def send(self, line: bytes) -> None: ...

    async def flush(self) -> None: ...


@dataclass
class _Call:
    id: types.RequestId
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    cancelled: bool = False  # by the client: never answered


class FastLane:
    """Answers the `tools/call` requests it takes on one stdio session; see the module docstring."""

    def __init__(self, kt: Keyturn, identity: Identity) -> None:
        self._kt = kt
        self._identity = identity  # principal and on_behalf_of; client and model are the session's and call's
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
        return self._version is not None and not self._initializing and self._tg is not None

    def take(self, line: bytes) -> bool:
        """Whether the lane took this line read from stdin (and answers it); if not, it goes to the SDK."""
        try:
            if b'"tools/call"' in line and self.ready and self._take_call(line):
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
        if version in MODERN_PROTOCOL_VERSIONS or version not in HANDSHAKE_PROTOCOL_VERSIONS or not (
                isinstance(name, str) and isinstance(client_version, str)):
            self._version, self._client = None, None
        else:
            self._version, self._client = version, client_label(name, client_version)

    # -- reading ----------------------------------------------------------------------------------

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
        if any(key.startswith(RESERVED_META_PREFIX) for key in meta):
            return False
        key = coerce_request_id(rid)
        tool = None if name in BUILTIN or key in self._in_flight else self._kt.find_tool(name)
        if tool is None or self._tg is None or not self._sdk_accepts(params):
            return False
        token = progress_token_from_params(params)  # the SDK's rule for whether a call reports progress
        who = Identity(principal=self._identity.principal, on_behalf_of=self._identity.on_behalf_of,
                       model=model_from_meta(meta), client=self._client, session=None)
        progress = monotonic_progress(partial(self._progress, token)) if token is not None else None
        call = self._in_flight[key] = _Call(rid)
        log.debug("fast lane: tools/call %s id=%r", name, rid)
        self._tg.start_soon(self._serve, call, key, tool, arguments, who, progress)
        return True

    def _sdk_accepts(self, params: dict[str, Any]) -> bool:
        """Whether the SDK would hand these params to the handler (`ServerRunner._on_request`): what it refuses,
        it refuses with its own errors."""
        assert self._version is not None
        try:
            mcp_methods.validate_client_request("tools/call", self._version, params)
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
                line = self._result_line(call.id, result)
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

    def _result_line(self, rid: types.RequestId, result: types.CallToolResult) -> bytes:
        """The response line the SDK writes for `result` (`ServerRunner._serialize`, then the stdio writer)."""
        assert self._version is not None
        dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        try:
            # Checked against the negotiated version's schema, and trimmed to it, as the SDK does.
            dumped = mcp_methods.serialize_server_result("tools/call", self._version, dumped)
        except ValidationError:
            log.exception("fast lane: the gate returned an invalid result")
            raise MCPError(code=types.INTERNAL_ERROR, message="Handler returned an invalid result") from None
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
