"""The client side of a stdio upstream's connection: its process, and newline-delimited JSON-RPC over its pipes,
behind the SDK's public client `Transport` interface (what `mcp.Client` connects through).

keyturn reads the upstream's stdout itself, as bytes, one line at a time, so that a line it cannot take is seen
whole: a line that is not UTF-8 or not a JSON-RPC message becomes a `MalformedMessage` (with the request id it
carries, when that can be read from it) instead of being dropped or wedging the reader. `server.proxy.transport`
turns one that answers a request into that request's failure. Everything else is the SDK's own stdio transport's
behaviour: the process in its own session, its stdin closed at the end, then its whole process group terminated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, TextIO

import anyio
import mcp_types as types
from anyio.abc import Process
from mcp import StdioServerParameters
from mcp.client.stdio import get_default_environment
from mcp.os.posix.utilities import terminate_posix_process_tree
from mcp.shared.message import SessionMessage

log = logging.getLogger(__name__)

MAX_LINE = 2**28
"""The longest line read from an upstream (256 MiB): past it, the connection is ended."""
_EXIT_WAIT = 2.0  # after stdin closes, how long the upstream has to exit before its process group is terminated


class MalformedMessage(ValueError):
    """A line from an upstream that is not a JSON-RPC message keyturn can take: `problem` says what is wrong;
    `request_id` is the id of the request it answers, when one could be read from it."""

    def __init__(self, problem: str, request_id: types.RequestId | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.request_id = request_id


def parse_line(line: bytes) -> SessionMessage | MalformedMessage:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return MalformedMessage("it is not valid UTF-8", _answered_id(line.decode("utf-8", "replace")))
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(text, by_name=False))
    except ValueError:
        pass
    try:
        raw: Any = json.loads(text)
    except ValueError:
        return MalformedMessage("it is not JSON", None)
    return MalformedMessage(_describe(raw), _answered_id(raw))


def _answered_id(raw: Any) -> types.RequestId | None:
    """The id of the request a malformed message answers: only a message without a method answers anything."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if not isinstance(raw, dict) or "method" in raw:
        return None
    request_id = raw.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    return request_id


def _describe(raw: Any) -> str:
    if not isinstance(raw, dict):
        return "it is not a JSON-RPC message (not a JSON object)"
    if raw.get("jsonrpc") != "2.0":
        return f"its jsonrpc version is {json.dumps(raw.get('jsonrpc'))[:40]}, not \"2.0\""
    if "result" in raw and not isinstance(raw["result"], dict):
        return "its result is not a JSON object"
    if "error" in raw:
        return "its error is not a JSON-RPC error (an object with an integer code and a message)"
    return "it is not a valid JSON-RPC message"


@asynccontextmanager
async def stdio_lines(server: StdioServerParameters, errlog: TextIO) -> AsyncIterator[tuple[Any, Any]]:
    """Start `server` and speak newline-delimited JSON-RPC with it (see the module's docstring)."""
    process = await anyio.open_process([server.command, *server.args], env=get_default_environment() | (server.env or {}),
                                       stderr=errlog, cwd=server.cwd, start_new_session=True)
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def reader() -> None:
        assert process.stdout is not None
        async with read_writer:
            buffer = b""
            with suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                while True:
                    buffer += await process.stdout.receive()
                    *lines, buffer = buffer.split(b"\n")
                    if len(buffer) > MAX_LINE:
                        log.warning("an upstream wrote a line longer than %d bytes: ending its connection", MAX_LINE)
                        return
                    for line in lines:
                        if line.strip():
                            await read_writer.send(parse_line(line))

    async def writer() -> None:
        assert process.stdin is not None
        try:
            async with write_reader:
                async for message in write_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                    await process.stdin.send(data.encode())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            await read_writer.aclose()  # the upstream cannot be written to: its connection has ended

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):
                write_stream.close()
                read_stream.close()
                await _stop(process)
            tg.cancel_scope.cancel()


async def _stop(process: Process) -> None:
    """Close its stdin, give it `_EXIT_WAIT` to exit, then terminate its whole process group."""
    assert process.stdin is not None and process.stdout is not None
    with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        await process.stdin.aclose()
    if not await _exited(process):
        await terminate_posix_process_tree(process)
        await _exited(process)
    with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        await process.stdout.aclose()


async def _exited(process: Process) -> bool:
    """Whether it exits within `_EXIT_WAIT`. Polled: on asyncio, `process.wait()` also waits for its pipes to close,
    which a child that inherited them may keep open."""
    with anyio.move_on_after(_EXIT_WAIT):
        while process.returncode is None:  # noqa: ASYNC110 (see above: no event tells of the exit alone)
            await anyio.sleep(0.01)
    return process.returncode is not None
