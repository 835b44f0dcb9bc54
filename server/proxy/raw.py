"""`tools/call` written by keyturn on a stdio upstream's pipes (`wire.py`), without the SDK client's per-call machinery:
the request the SDK `Client.call_tool` would send (bar its string id), and its result read as the SDK reads it.

Only where keyturn knows exactly what the SDK would send: the protocol versions checked against the SDK below, and
a `Client` without sampling, elicitation or roots callbacks, extensions or a log level (which would change the
2026-era `_meta` envelope or how results are parsed). Anything else goes through `Client.call_tool`.
"""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp import Client
from mcp.client._input_required import run_input_required_driver
from mcp.client.session import DEFAULT_CLIENT_INFO, ClientRequestContext, _clamp_inbound_ttl, _later_revision_fields
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import TypeAdapter

from server.proxy.wire import StdioWire

# The 2026-era envelope (protocol version, client info, capabilities in every request's `_meta`: the SDK's
# `_make_modern_stamp`; the server's inbound ladder requires the version and the capabilities) was checked for
# 2026-07-28 only; a later revision may ask for more, so it goes through the SDK until checked.
VERSIONS = frozenset({*HANDSHAKE_PROTOCOL_VERSIONS, "2026-07-28"})
_RESULT: TypeAdapter[types.CallToolResult | types.InputRequiredResult] = TypeAdapter(
    types.CallToolResult | types.InputRequiredResult)


class RawToolCalls:
    """The tools/call requests of one connection: `client` (initialized) over `wire`."""

    def __init__(self, client: Client, wire: StdioWire) -> None:
        self.client, self.wire = client, wire
        self.version = client.protocol_version
        self._envelope: dict[str, Any] | None = None
        if self.version in MODERN_PROTOCOL_VERSIONS:
            info = client.client_info or DEFAULT_CLIENT_INFO
            self._envelope = {types.PROTOCOL_VERSION_META_KEY: self.version,
                              types.CLIENT_INFO_META_KEY: info.model_dump(by_alias=True, mode="json", exclude_none=True),
                              types.CLIENT_CAPABILITIES_META_KEY: {}}

    @classmethod
    def over(cls, client: Client, transport: object) -> RawToolCalls | None:
        """Raw calls for this connection, or None where they would not be exactly the SDK client's."""
        if not isinstance(transport, StdioWire) or client.protocol_version not in VERSIONS:
            return None
        if (client.sampling_callback or client.elicitation_callback or client.list_roots_callback or client.extensions
                or client.log_level is not None):
            return None
        return cls(client, transport)

    @property
    def closed(self) -> bool:
        return self.wire.closed

    async def call(self, tool: str, arguments: dict[str, Any], progress: ProgressFnT | None) -> types.CallToolResult:
        """`Client.call_tool(tool, arguments, progress_callback=progress)`, with the same results and errors."""
        params: dict[str, Any] = {"name": tool, "arguments": arguments}
        if self._envelope is not None:
            params["_meta"] = dict(self._envelope)
        result = _tool_result(await self.wire.request("tools/call", params, progress), self.version)
        if isinstance(result, types.InputRequiredResult):
            return await _input_rounds(self.client, tool, arguments, result, progress)
        if not result.is_error:
            await self.client.session.validate_tool_result(tool, result)
        return result


def _tool_result(raw: dict[str, Any], version: str) -> types.CallToolResult | types.InputRequiredResult:
    """What the SDK's `ClientSession.send_request` makes of a tools/call result: checked against the negotiated
    revision's shape, stripped of later revisions' fields, parsed."""
    _clamp_inbound_ttl(raw)
    try:
        methods.validate_server_result("tools/call", version, raw)
    except KeyError:
        pass
    if not (foreign := _later_revision_fields("tools/call", version)).isdisjoint(raw):
        raw = {key: value for key, value in raw.items() if key not in foreign}
    return _RESULT.validate_python(raw, by_name=False)


async def _input_rounds(client: Client, tool: str, arguments: dict[str, Any], first: types.InputRequiredResult,
                        progress: ProgressFnT | None) -> types.CallToolResult:
    """A 2026-era server asked for input: the remaining rounds go through the SDK, as `Client.call_tool` drives
    them (keyturn's client has no callbacks to answer with, so a request for input is refused)."""
    session = client.session

    async def dispatch(key: str, request: types.InputRequest) -> types.InputResponse | types.ErrorData:
        meta = request.params.meta if request.params else None
        return await session.dispatch_input_request(ClientRequestContext(session=session, request_id=key, meta=meta),
                                                    request)

    async def retry(responses: types.InputResponses | None,
                    state: str | None) -> types.CallToolResult | types.InputRequiredResult:
        return await session.call_tool(tool, arguments, progress_callback=progress, input_responses=responses,
                                       request_state=state, allow_input_required=True)

    return await run_input_required_driver(first, dispatch=dispatch, retry=retry,
                                           max_rounds=client.input_required_max_rounds)
