"""A client transport watched from keyturn's side of the SDK's client: what came back for each forwarded call, and
when the upstream went away.

- The end of the read stream (a stdio upstream that exits closes its stdout) is reported to `on_end`. An HTTP
  upstream that stops answering is found by call timeouts and probes instead.
- A JSON-RPC error that arrives for a forwarded call is noted on that call's `Sent`: the SDK raises the same
  `MCPError(-32000)` for a server's own "server error" answer as for a connection that closed, and only the wire
  can tell them apart.
- A `MalformedMessage` (from `server.proxy.stdio_client`) that answers a request becomes that request's JSON-RPC
  error, so the call fails at once instead of waiting for an answer that will never parse; its `Sent` says what
  was wrong. One whose request cannot be told is logged and dropped: it fails nothing it might not belong to.

The id of a forwarded call's request is learnt as the SDK writes it: `sending(sent)` marks the task that calls
the SDK's client, and the write stream, written from that task, fills in `sent.request_id`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp.client import Transport
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.message import SessionMessage

from server.proxy.stdio_client import MalformedMessage

log = logging.getLogger(__name__)


class ReadStream(Protocol):
    """A client transport's read stream, as far as `Watched` uses it."""

    async def receive(self) -> SessionMessage | Exception: ...

    async def aclose(self) -> None: ...


class WriteStream(Protocol):
    """A client transport's write stream, as far as `Watched` uses it."""

    async def send(self, item: SessionMessage, /) -> None: ...

    async def aclose(self) -> None: ...


TransportStreams = tuple[Any, Any]
"""What a client transport yields: its read stream and its write stream."""


@dataclass
class Sent:
    """One forwarded call, as the wire saw it."""

    request_id: types.RequestId | None = None
    answered_with_error: bool = False  # a JSON-RPC error arrived with its id
    malformed: str | None = None  # what was wrong with the answer that arrived with its id


_sending: ContextVar[Sent | None] = ContextVar("keyturn_sending", default=None)


class Watched:
    """A client transport whose streams are watched (see the module's docstring); `name` names the upstream in
    what is logged."""

    def __init__(self, transport: Transport, on_end: Callable[[str], None], name: str) -> None:
        self._transport, self._on_end, self.name = transport, on_end, name
        self._sent: dict[types.RequestId, Sent] = {}

    @contextmanager
    def sending(self, sent: Sent) -> Iterator[Sent]:
        """While this task forwards one call through the SDK's client: its request is noted on `sent`."""
        token = _sending.set(sent)
        try:
            yield sent
        finally:
            _sending.reset(token)
            if sent.request_id is not None:
                self._sent.pop(coerce_request_id(sent.request_id), None)

    async def __aenter__(self) -> TransportStreams:
        read, write = await self._transport.__aenter__()
        return _WatchedRead(read, self), _WatchedWrite(write, self)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        return await self._transport.__aexit__(exc_type, exc, tb)

    def _written(self, item: SessionMessage) -> None:
        sent = _sending.get()
        message = item.message
        if sent is not None and isinstance(message, types.JSONRPCRequest) and message.method == "tools/call":
            if sent.request_id is not None:  # sent again (the SDK resends after a stale tool listing)
                self._sent.pop(coerce_request_id(sent.request_id), None)
            sent.request_id = message.id
            self._sent[coerce_request_id(message.id)] = sent

    def _received(self, item: SessionMessage | Exception) -> SessionMessage | Exception:
        if isinstance(item, MalformedMessage):
            if item.request_id is None:
                log.warning("upstream %s sent a message keyturn cannot take (%s), answering no request it can "
                            "tell: dropped", self.name, item.problem)
                return item
            sent = self._sent.get(coerce_request_id(item.request_id))
            if sent is not None:
                sent.malformed = item.problem
            log.warning("upstream %s sent a malformed answer to request %r: %s", self.name, item.request_id,
                        item.problem)
            error = types.ErrorData(code=types.PARSE_ERROR, message=f"malformed answer: {item.problem}")
            return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=item.request_id, error=error))
        if isinstance(item, SessionMessage) and isinstance(item.message, types.JSONRPCError):
            request_id = item.message.id
            sent = self._sent.get(coerce_request_id(request_id)) if request_id is not None else None
            if sent is not None:
                sent.answered_with_error = True
        return item


class _WatchedRead:
    def __init__(self, inner: ReadStream, watched: Watched) -> None:
        self._inner, self._watched = inner, watched

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            item = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._watched._on_end("the upstream closed the connection (it exited or disconnected)")
            raise
        return self._watched._received(item)

    def __aiter__(self) -> _WatchedRead:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedRead:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        return None


class _WatchedWrite:
    def __init__(self, inner: WriteStream, watched: Watched) -> None:
        self._inner, self._watched = inner, watched

    async def send(self, item: SessionMessage, /) -> None:
        self._watched._written(item)
        await self._inner.send(item)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedWrite:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        return None
