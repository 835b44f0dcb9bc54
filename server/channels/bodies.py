"""Reading request bodies before anyone is authenticated: bounded in size and in time while they stream.

Every endpoint that reads a body (Slack events, Teams activities, the sign-in and inbox forms, the decision
page, the reviewer API) reads it here. A declared Content-Length over the limit is refused before a byte of
the body is read; a body sent without one (chunked) is counted as it arrives and refused as soon as it passes
the limit; a body that has not all arrived within `READ_DEADLINE_S` is refused too. Either refusal closes the
connection, so the rest of the body is never read. So an unsigned POST costs at most `limit` bytes of memory
and `READ_DEADLINE_S` of a connection, whatever it claims to be, before any signature or token is checked.
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import Message

READ_DEADLINE_S = 10.0
"""How long a whole body may take to arrive (a slow partial body holds a connection no longer)."""
MAX_LENGTH_DIGITS = 18
CLOSE = {"Connection": "close"}  # uvicorn closes after answering: the rest of the body is never read


class BodyRefused(Exception):
    """The body is too large (413) or too slow (408); answer with `response()`, which closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> PlainTextResponse:
        return PlainTextResponse(self.message, status_code=self.status, headers=CLOSE)

    def json_response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=CLOSE)


def too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"the request body is larger than {limit} bytes")


async def read_body(request: Request, limit: int, *, deadline_s: float = READ_DEADLINE_S) -> bytes:
    """The whole body, at most `limit` bytes, arrived within `deadline_s`; `BodyRefused` otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > MAX_LENGTH_DIGITS or int(declared) > limit):
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(deadline_s) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise BodyRefused(408, f"the request body did not arrive within {deadline_s:g} s")
    return b"".join(chunks)


def replay(request: Request, body: bytes) -> Request:
    """A request like `request` whose body is `body` (already read), for code that reads the body itself."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()

    return Request(request.scope, receive)
