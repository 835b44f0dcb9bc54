"""A client transport that reports when the upstream goes away: a stdio upstream that exits closes its stdout,
which ends the read stream. (An HTTP upstream that stops answering is found by call timeouts and probes.)"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import anyio
from mcp.client import Transport
from mcp.shared.message import SessionMessage


class ReadStream(Protocol):
    """A client transport's read stream, as far as `EndWatched` uses it."""

    async def receive(self) -> SessionMessage | Exception: ...

    async def aclose(self) -> None: ...


TransportStreams = tuple[Any, Any]
"""What a client transport yields: its read stream and its write stream."""


class EndWatched:
    """A client transport whose read stream reports its end to `on_end`."""

    def __init__(self, transport: Transport, on_end: Callable[[str], None]) -> None:
        self._transport, self._on_end = transport, on_end

    async def __aenter__(self) -> TransportStreams:
        read, write = await self._transport.__aenter__()
        return _EndNotifying(read, self._on_end), write

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        return await self._transport.__aexit__(exc_type, exc, tb)


class _EndNotifying:
    def __init__(self, inner: ReadStream, on_end: Callable[[str], None]) -> None:
        self._inner, self._on_end = inner, on_end

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end("the upstream closed the connection (it exited or disconnected)")
            raise

    def __aiter__(self) -> _EndNotifying:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _EndNotifying:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        return None
