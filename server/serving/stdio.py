"""MCP over this process's stdin and stdout, read and written on the event loop.

`stdio_transport` gives `Server.run` its streams through the SDK's public `stdio_server(stdin, stdout)`, fed by
the loop's own pipe transports where it can (fewer thread hand-offs per message than the SDK's default).
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.stdio import stdio_server

STDIO_MAX_LINE = 2**28
"""The longest JSON-RPC message read from stdin (256 MiB)."""


@asynccontextmanager
async def stdio_transport() -> AsyncIterator[tuple[Any, Any]]:
    """MCP over this process's stdin and stdout: `(read_stream, write_stream)` for `Server.run`.

    The SDK's `stdio_server` hands every line read, every write and every flush to a worker thread: three
    thread hand-offs per call, which cost more than the gate itself on a small machine. When stdin and stdout
    are pipes or sockets (how MCP clients start servers) and the loop is asyncio, the same SDK transport is fed
    by the loop's own pipe transports instead; otherwise it is the SDK's as it is. While serving, fd 0 reads
    /dev/null and fd 1 writes to stderr, as with the SDK, so a tool's stray output cannot corrupt the protocol.
    """
    if not _loop_pipes_usable():
        async with stdio_server() as streams:
            yield streams
        return
    loop = asyncio.get_running_loop()
    sys.stdout.flush()
    wire_in, wire_out = os.dup(0), os.dup(1)  # the wire, for the loop's transports (which close them)
    saved_in, saved_out = os.dup(0), os.dup(1)  # to restore fd 0 and fd 1 afterwards
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
        reader = asyncio.StreamReader(limit=STDIO_MAX_LINE)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire_in, "rb", buffering=0))
        write_transport, write_protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(wire_out, "wb", buffering=0))
        writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
        try:
            async with stdio_server(_Lines(reader), _Sink(writer)) as streams:  # type: ignore[arg-type]
                yield streams
        finally:
            read_transport.close()
            write_transport.close()
    finally:
        try:
            sys.stdout.flush()  # what tools printed goes where fd 1 pointed while they ran
        except (OSError, ValueError):
            pass
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        for fd in (null, saved_in, saved_out):
            os.close(fd)


def _loop_pipes_usable() -> bool:
    try:
        asyncio.get_running_loop()  # (not under trio)
        if sys.platform == "win32":
            return False
        if sys.stdin is None or sys.stdout is None or sys.stdin.fileno() != 0 or sys.stdout.fileno() != 1:
            return False
        # A terminal can be watched by the loop; another character device (/dev/null) or a regular file cannot.
        return all(stat.S_ISFIFO(m) or stat.S_ISSOCK(m) or (stat.S_ISCHR(m) and os.isatty(fd))
                   for fd, m in ((0, os.fstat(0).st_mode), (1, os.fstat(1).st_mode)))
    except (OSError, ValueError, AttributeError, RuntimeError):
        return False


class _Lines:
    """stdin's lines as the SDK's `stdio_server` iterates them (text, newline included)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


class _Sink:
    """stdout as the SDK's `stdio_server` writes to it: one whole line per write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()
