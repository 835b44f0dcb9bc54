"""A caller's cancel, as a shielded run sees it.

Once a call is recorded, it runs to a terminal event: its run and its recording are shielded from cancellation,
so a cancel can never skip the ledger. The caller may still cancel it (MCP `notifications/cancelled`, which the
SDK delivers as a cancellation of the request's handler). `watching_cancel` notices that cancel outside the
shield and tells the run:

- progress for the call stops at once (nobody is listening for it any more);
- an interruptible run (an upstream server's tool: the SDK's client then sends the upstream its own
  `notifications/cancelled`) is cancelled, and the gate records that the caller cancelled it while it ran;
- any other run (a native tool, which may be mid-write and cannot be safely stopped) runs to its end and is
  recorded as it ended, with a note that its caller cancelled it; its result is delivered to nobody.

The watch is a task per call (about 0.25 ms on a 2-core machine): the gate watches only a call that has something
to stop, progress or an interruptible run. A native tool's call without progress is not watched: it runs to its
end and is recorded as it ended, without the note.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio

from server.approvals.holding import ProgressFn


class CallerCancel:
    """Whether the caller of one call has cancelled it; see the module's docstring."""

    def __init__(self) -> None:
        self.cancelled = False
        self._done = False
        self._runs: list[anyio.CancelScope] = []

    def fire(self) -> None:
        if self._done or self.cancelled:
            return
        self.cancelled = True
        for scope in self._runs:
            scope.cancel()

    @contextmanager
    def interruptible(self) -> Iterator[anyio.CancelScope]:
        """A scope the caller's cancel cancels (already cancelled if the caller has): the run of a tool that can
        be stopped. Use it inside the shield; check `cancelled_caught` after."""
        scope = anyio.CancelScope()
        if self.cancelled:
            scope.cancel()
        self._runs.append(scope)
        try:
            with scope:
                yield scope
        finally:
            self._runs.remove(scope)

    def muted(self, progress: ProgressFn | None) -> ProgressFn | None:
        """`progress`, silent once the caller has cancelled."""
        if progress is None:
            return None
        report = progress

        async def muted(value: float, total: float | None, message: str | None) -> None:
            if not self.cancelled:
                await report(value, total, message)

        return muted


@asynccontextmanager
async def unwatched() -> AsyncIterator[CallerCancel]:
    """No watch (a call with no progress and a run that cannot be stopped): a cancel is never seen by the run."""
    yield CallerCancel()


@asynccontextmanager
async def watching_cancel() -> AsyncIterator[CallerCancel]:
    """Watch for the cancellation of the enclosing scope while the body runs shielded. Enter it outside the
    shield; the cancellation itself still propagates once the body is done."""
    watch = CallerCancel()

    async def wait() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            watch.fire()
            raise

    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        try:
            yield watch
        except Exception as e:  # raised as it is, not in the task group's ExceptionGroup
            failure = e
        finally:
            watch._done = True
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
