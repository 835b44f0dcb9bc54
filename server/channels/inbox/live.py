"""Live inbox updates as server-sent events: "something changed, fetch the list again".

Commits in this process arrive through `Ledger.subscribe`; decisions and held calls recorded by
other processes sharing the database are noticed by polling the chain's head, as the broker does.
A stream ends by itself after a while (the browser reconnects), so no connection outlives a shutdown
by long, and a session that ends mid-stream ends the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.channels.inbox.sessions import Session, harden
from server.channels.inbox.site import Site
from server.errors import LedgerError
from server.models import Event

# What changes the list of pending requests or what a card shows.
RELEVANT = frozenset({"approval.requested", "call.rejoined", "vote", "approval.granted", "execution.started",
                      "executed", "failed", "denied", "expired", "cancelled", "abandoned"})
STREAM_S = 25.0
KEEPALIVE_S = 10.0
RETRY_MS = 1000


def relevant(events: Sequence[Event]) -> bool:
    return any(e.kind in RELEVANT and e.call_id is not None for e in events)


class Live:
    def __init__(self, site: Site, *, stream_s: float = STREAM_S) -> None:
        self.site = site
        self.kt = site.kt
        self.stream_s = stream_s
        self.poll_s = max(0.1, float(site.kt.settings.poll_interval_s))

    async def events(self, request: Request, session: Session) -> Response:
        ledger = self.kt.ledger

        async def stream() -> AsyncIterator[str]:
            feed = ledger.follow(RELEVANT)
            try:
                last = await feed.start()
                yield f"retry: {RETRY_MS}\nevent: hello\ndata: {last}\n\n"
                deadline = time.monotonic() + self.stream_s
                quiet_since = time.monotonic()
                while time.monotonic() < deadline:
                    changed = await feed.wait(self.poll_s)
                    try:
                        if await self.site.sessions.read(request) is None:
                            yield "event: signed-out\ndata: \n\n"
                            return
                        news = await feed.read()  # this process's and others' appends alike
                        changed = changed or relevant(news)
                    except LedgerError:
                        continue
                    if changed:
                        quiet_since = time.monotonic()
                        yield f"data: {feed.last_seq}\n\n"
                    elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                        quiet_since = time.monotonic()
                        yield ": keep-alive\n\n"
            finally:
                feed.close()

        response = StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"X-Accel-Buffering": "no"})
        return harden(response)
