"""The ledger's one feed: followers of the chain (the approvals broker, the reviewer channels, the inbox) each
hold a `Subscription` to the event kinds they care about.

A subscription is woken at once when this process commits an event of those kinds (after the commit), and reads
what was appended after the last sequence number it saw, by any process. Another process's appends wake nobody
here: a follower waits at most its poll interval, then looks (`read`, or the cheaper `calls_changed`). On
PostgreSQL, LISTEN/NOTIFY is the wake-up for other processes' appends; the reads are the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import anyio

from server.models import Event

Listener = Callable[[Sequence[Event]], None]


class FeedSource(Protocol):
    """What a subscription needs of a store."""

    def subscribe(self, listener: Listener) -> Callable[[], None]: ...
    async def head_seq(self) -> int: ...
    async def events(self, call_id: str | None = None, *, after_seq: int = 0, limit: int = 10_000) -> list[Event]: ...
    async def calls_with_events(self, kinds: Iterable[str], after_seq: int, upto_seq: int) -> set[str]: ...


class Subscription:
    """A follower's place in the ledger: the kinds it wants (None: all), the last sequence number it has seen, and
    its wake-up. `on_local(events)`, when given, is called with this process's committed events of those kinds
    as they commit (to wake a waiter at once, say)."""

    def __init__(self, source: FeedSource, kinds: Iterable[str] | None = None,
                 on_local: Listener | None = None) -> None:
        self.source = source
        self.kinds = frozenset(kinds) if kinds is not None else None
        self.last_seq: int | None = None
        self._on_local = on_local
        self._wake = anyio.Event()
        self._unsubscribe = source.subscribe(self._committed)

    def wanted(self, event: Event) -> bool:
        return self.kinds is None or event.kind in self.kinds

    def _committed(self, events: Sequence[Event]) -> None:
        mine = [e for e in events if self.wanted(e)]
        if mine:
            if self._on_local is not None:
                self._on_local(mine)
            self._wake.set()

    def wake(self) -> None:
        """Wake the follower now (it has been told of a change another way)."""
        self._wake.set()

    async def wait(self, timeout: float) -> bool:
        """Until an event of the kinds is committed here (or `wake`), at most `timeout` seconds: the poll interval
        for other processes' appends. True when woken."""
        with anyio.move_on_after(max(0.0, timeout)):
            await self._wake.wait()
        woken = self._wake.is_set()
        self._wake = anyio.Event()
        return woken

    async def start(self) -> int:
        """Begin at the chain's head (unless begun already); returns the sequence number followed from."""
        if self.last_seq is None:
            self.last_seq = await self.source.head_seq()
        return self.last_seq

    async def read(self, limit: int = 1000) -> list[Event]:
        """The events of the kinds appended since the last look, by any process, looking at `limit` events at most
        (when there were more, the subscription wakes itself to read on)."""
        after = await self.start()
        if await self.source.head_seq() == after:  # a quick look first: nothing new is the common case
            return []
        events = await self.source.events(after_seq=after, limit=limit)
        if events:
            self.last_seq = events[-1].seq
        if len(events) >= limit:
            self._wake.set()
        return [e for e in events if self.wanted(e)]

    async def calls_changed(self, rescan: Callable[[], Awaitable[set[str]]], rescan_after: int) -> set[str]:
        """The calls with an event of the kinds appended since the last look, by any process: a cheap head check,
        then a range of the chain (so a look costs what was appended, not how many calls there are). On the first
        look, or more than `rescan_after` events behind, `rescan()` says which calls changed instead."""
        head = await self.source.head_seq()
        if head == self.last_seq:
            return set()
        if self.last_seq is None or head - self.last_seq > rescan_after or self.kinds is None:
            moved = await rescan()
        else:
            moved = await self.source.calls_with_events(self.kinds, self.last_seq, head)
        self.last_seq = head
        return moved

    def close(self) -> None:
        self._unsubscribe()
