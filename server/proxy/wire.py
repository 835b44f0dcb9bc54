"""keyturn's own client transport to a stdio upstream: the SDK's stdio transport, plus raw requests on the same pipes.

`StdioWire(params)` starts the server exactly as the SDK's `stdio_client` does (same environment, cwd, stderr,
own process group, the same shutdown: close stdin, wait, then kill the process tree) and is a client `Transport`:
the SDK `Client` runs over it unchanged (the handshake, tools/list, listen, pings, notifications ...).

`request()` is the hot path. It writes one JSON-RPC line with a string id (`keyturn-<n>`: the SDK client's ids
are integers, so the two never collide) and waits for its answer, which the stdout reader hands over as the parsed
dict, without validating it into the SDK's models and without the SDK's dispatcher. The reader also delivers
`notifications/progress` for those ids. Every other line goes to the SDK exactly as `stdio_client` parses it.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, TextIO

import anyio
import anyio.lowlevel
import mcp_types as types
import pydantic_core
from anyio.abc import ByteSendStream
from anyio.streams.text import TextReceiveStream
from mcp import StdioServerParameters
from mcp.client._transport import TransportStreams
from mcp.client.stdio import (  # the SDK's own spawn and shutdown steps, so both transports behave alike
    _WRITER_FLUSH_TIMEOUT,
    _aclose_all,
    _create_platform_compatible_process,
    _drain_stdout,
    _get_executable_command,
    _parse_line,
    _stop_server_process,
    get_default_environment,
)
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

log = logging.getLogger(__name__)

ID_PREFIX = "keyturn-"
_PROGRESS_QUEUED_MAX = 64  # progress a slow caller has not taken yet; past it, progress is dropped (never results)
_CANCEL_WRITE_TIMEOUT = 5.0  # as the SDK bounds its courtesy cancel


class ConnectionLost(MCPError):
    """The upstream went away with the request unanswered: the SDK's `CONNECTION_CLOSED` error, told apart from a
    JSON-RPC error response that merely uses the same code (-32000 is also the generic "server error")."""

    def __init__(self) -> None:
        super().__init__(code=types.CONNECTION_CLOSED, message="Connection closed")


class _Pending:
    """One raw request awaiting its answer: the reader fills it, the caller waits on `wake`."""

    __slots__ = ("answer", "progress", "wake", "wants_progress")

    def __init__(self, wants_progress: bool) -> None:
        self.answer: dict[str, Any] | Exception | None = None
        self.progress: deque[tuple[float, float | None, str | None]] = deque()
        self.wake = anyio.Event()
        self.wants_progress = wants_progress


class StdioWire:
    """A client transport over a server process's stdin/stdout that also serves raw requests (`request`)."""

    def __init__(self, server: StdioServerParameters, errlog: TextIO = sys.stderr) -> None:
        self.server = server
        self._errlog = errlog
        self._stdin: ByteSendStream | None = None
        self._pending: dict[str, _Pending] = {}
        self._next_id = 0
        self._closed = True
        self._broken: anyio.Event | None = None  # set when a raw write fails: the session must see the end
        self._cm: AbstractAsyncContextManager[TransportStreams] | None = None

    async def __aenter__(self) -> TransportStreams:
        self._cm = self._connect()
        return await self._cm.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(exc_type, exc, tb)

    @property
    def closed(self) -> bool:
        return self._closed

    async def request(self, method: str, params: Mapping[str, Any],
                      on_progress: ProgressFnT | None = None) -> dict[str, Any]:
        """Send `method` with `params`; return the response's `result` dict as the server sent it.

        Raises `MCPError` for a JSON-RPC error response, and `ConnectionLost` when the upstream went away
        after the request was written; `anyio.ClosedResourceError` / `BrokenResourceError` when it could not be
        written at all. Abandoned (cancelled, timed out), it sends `notifications/cancelled` for its id.
        """
        if self._closed or self._stdin is None:
            raise anyio.ClosedResourceError
        self._next_id += 1
        request_id = f"{ID_PREFIX}{self._next_id}"
        if on_progress is not None:
            params = {**params, "_meta": {**(params.get("_meta") or {}), "progressToken": request_id}}
        line = pydantic_core.to_json({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
                                     inf_nan_mode="null") + b"\n"
        pending = self._pending[request_id] = _Pending(on_progress is not None)
        written = False
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
            written = True  # as the SDK counts it: a write that started may have been delivered
            try:
                await self._stdin.send(self._encode(line))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as e:
                if self._broken is not None:
                    self._broken.set()
                raise anyio.BrokenResourceError from e
            while pending.answer is None:
                await pending.wake.wait()
                pending.wake = anyio.Event()
                while pending.progress:
                    await _report(on_progress, pending.progress.popleft())
        except anyio.get_cancelled_exc_class():
            if written and not self._closed:
                with anyio.move_on_after(_CANCEL_WRITE_TIMEOUT, shield=True) as scope:
                    await self._send_cancelled(request_id)
                if scope.cancelled_caught:
                    log.warning("cancel for %s not sent: the upstream's stdin is blocked", request_id)
            raise
        finally:
            self._pending.pop(request_id, None)
        answer = pending.answer
        if isinstance(answer, Exception):
            raise answer
        return answer

    # -- the connection ------------------------------------------------------------------------------

    def _encode(self, line: bytes) -> bytes:
        s = self.server
        if s.encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
            return line
        return line.decode().encode(s.encoding, errors=s.encoding_error_handler)

    async def _send_cancelled(self, request_id: str) -> None:
        # What the SDK's dispatcher sends for an abandoned request.
        message = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                   "params": {"requestId": request_id, "reason": "caller cancelled"}}
        try:
            assert self._stdin is not None
            await self._stdin.send(self._encode(pydantic_core.to_json(message) + b"\n"))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as e:
            log.debug("cancel for %s not sent: %s", request_id, e)

    def _end(self) -> None:
        """The connection is over: every waiting raw request fails as the SDK's waiters do."""
        self._closed = True
        for pending in self._pending.values():
            if pending.answer is None:
                pending.answer = ConnectionLost()
                pending.wake.set()

    def _take(self, line: str) -> bool:
        """Handle a line addressed to a raw request; False: it is the SDK's."""
        try:
            message = pydantic_core.from_json(line)
        except ValueError:
            return False
        if not isinstance(message, dict):
            return False
        if "method" not in message:
            request_id = message.get("id")
            if not (isinstance(request_id, str) and request_id.startswith(ID_PREFIX)):
                return False
            pending = self._pending.get(request_id)
            if pending is None:
                log.debug("dropping the answer to unknown or abandoned request %r", request_id)
            elif pending.answer is None:
                pending.answer = _answer(message)
                pending.wake.set()
            return True
        if message["method"] != "notifications/progress" or "id" in message:
            return False
        params = message.get("params")
        if not isinstance(params, dict):
            return False
        token = params.get("progressToken")
        if not (isinstance(token, str) and token.startswith(ID_PREFIX)):
            return False
        pending = self._pending.get(token)
        progress = _progress(params) if pending is not None and pending.wants_progress else None
        if pending is not None and progress is not None and len(pending.progress) < _PROGRESS_QUEUED_MAX:
            pending.progress.append(progress)
            pending.wake.set()
        return True

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[TransportStreams]:
        # `mcp.client.stdio.stdio_client`, step by step, with raw requests added: keep the two in step.
        server = self.server
        command = await _get_executable_command(server.command)
        process = await _create_platform_compatible_process(
            command=command, args=server.args, env=get_default_environment() | (server.env or {}),
            errlog=self._errlog, cwd=server.cwd)

        # The spawn succeeded; no awaits until the task group is entered, or a cancellation would leak the process.
        read_stream_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_stream, write_stream_reader = anyio.create_memory_object_stream[SessionMessage](0)
        assert process.stdin is not None and process.stdout is not None, "the server is spawned with pipes"
        self._stdin, self._closed, self._pending = process.stdin, False, {}
        broken = self._broken = anyio.Event()

        shutting_down = False
        writer_done = anyio.Event()

        async def stdout_reader() -> None:
            assert process.stdout, "Opened process is missing stdout"
            stdout = TextReceiveStream(process.stdout, encoding=server.encoding, errors=server.encoding_error_handler)
            try:
                async with read_stream_writer:
                    try:
                        buffer = ""
                        async for chunk in stdout:
                            lines = (buffer + chunk).split("\n")
                            buffer = lines.pop()
                            for line in lines:
                                if ID_PREFIX in line and self._take(line):
                                    continue
                                try:
                                    await read_stream_writer.send(_parse_line(line))
                                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                                    return
                    finally:
                        self._end()
                        await _drain_stdout(process)
            except anyio.ClosedResourceError:
                pass
            except (anyio.BrokenResourceError, ConnectionError):
                if not shutting_down:
                    log.exception("Reading from the MCP server's stdout failed mid-session")

        async def stdin_writer() -> None:
            assert process.stdin, "Opened process is missing stdin"
            try:
                async with write_stream_reader:
                    async for session_message in write_stream_reader:
                        json = session_message.message.model_dump_json(by_alias=True, exclude_unset=True)
                        data = (json + "\n").encode(encoding=server.encoding, errors=server.encoding_error_handler)
                        await process.stdin.send(data)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                self._end()
                await read_stream_writer.aclose()
            finally:
                writer_done.set()

        async def broken_watch() -> None:
            # A raw write that failed ends the session as a failed SDK write does: the read stream closes.
            await broken.wait()
            self._end()
            await read_stream_writer.aclose()

        async def shutdown() -> None:
            self._end()
            read_stream.close()
            write_stream.close()
            with anyio.move_on_after(_WRITER_FLUSH_TIMEOUT) as flush_scope:
                await writer_done.wait()
            if flush_scope.cancelled_caught:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            await _stop_server_process(process)
            await _aclose_all(read_stream, write_stream, read_stream_writer, write_stream_reader)
            await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stdout_reader)
            tg.start_soon(stdin_writer)
            tg.start_soon(broken_watch)
            try:
                yield read_stream, write_stream
            finally:
                shutting_down = True
                with anyio.CancelScope(shield=True):
                    await shutdown()
                tg.cancel_scope.cancel()
        await anyio.lowlevel.cancel_shielded_checkpoint()


def _answer(message: dict[str, Any]) -> dict[str, Any] | Exception:
    """A response's result, or the exception its caller raises: `MCPError` for a JSON-RPC error."""
    result, error = message.get("result"), message.get("error")
    if message.get("jsonrpc") == "2.0" and isinstance(result, dict) and "error" not in message:
        return result
    if message.get("jsonrpc") == "2.0" and isinstance(error, dict) and "result" not in message:
        try:
            data = types.ErrorData.model_validate(error, by_name=False)
        except ValueError:
            pass
        else:
            return MCPError(code=data.code, message=data.message, data=data.data)
    log.warning("malformed answer to %s from the upstream", message.get("id"))
    return ValueError(f"the upstream sent a malformed answer to {message.get('id')}")


def _progress(params: dict[str, Any]) -> tuple[float, float | None, str | None] | None:
    # As the SDK's dispatcher reads a progress notification.
    progress, total, message = params.get("progress"), params.get("total"), params.get("message")
    if not isinstance(progress, int | float) or isinstance(progress, bool):
        return None
    return (float(progress), float(total) if isinstance(total, int | float) else None,
            message if isinstance(message, str) else None)


async def _report(on_progress: ProgressFnT | None, progress: tuple[float, float | None, str | None]) -> None:
    if on_progress is None:
        return
    try:
        await on_progress(*progress)
    except Exception:
        log.exception("progress callback raised")
