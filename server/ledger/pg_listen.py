"""One LISTEN connection per keyturn instance: a commit by any other instance wakes this instance's followers.

The connection lives in a thread of its own, blocked in psycopg's `notifies()`. A notification from another
instance (each store tags its own NOTIFYs, and skips them here) calls `wake()` on the event loop. When the
connection is lost it is made again with backoff (0.1 s doubling to 5 s); meanwhile `connected` is False, and
followers fall back to polling (`PostgresStore.wake_interval`). On every (re)connection the followers are woken
once, to read whatever was appended while nobody listened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from server.config import safe_url
from server.ledger.pg_db import db_error, import_psycopg

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class NotifyListener:
    def __init__(self, url: str, channel: str, own_token: str, wake: Callable[[], None]) -> None:
        self.url = url
        self.channel = channel
        self.own_token = own_token
        self._wake = wake
        self.connected = False
        self.notifications = 0  # from other instances, since start
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._first = threading.Event()

    async def start(self) -> None:
        """Start listening; returns once the first connection was tried (so a store that just opened is woken
        by the next commit anywhere)."""
        self._token = anyio.lowlevel.current_token()
        self._thread = threading.Thread(target=self._run, name="keyturn-ledger-listen", daemon=True)
        self._thread.start()
        await anyio.to_thread.run_sync(self._first.wait, 15.0)

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._thread.join, 5.0)

    def _signal(self) -> None:
        try:
            anyio.from_thread.run_sync(self._wake, token=self._token)
        except RuntimeError:  # the event loop has ended
            self._stopping.set()

    def _run(self) -> None:
        psycopg = import_psycopg()
        pause = BACKOFF_FIRST_S
        while not self._stopping.is_set():
            conn = None
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5, application_name="keyturn-listen")
                conn.execute(f"LISTEN {self.channel}")
                self.connected = True
                self._first.set()
                pause = BACKOFF_FIRST_S
                self._signal()  # catch up with what was appended while nobody listened
                while not self._stopping.is_set():
                    for note in conn.notifies(timeout=0.5):
                        if not note.payload.startswith(self.own_token + ":"):
                            self.notifications += 1
                            self._signal()
                        if self._stopping.is_set():
                            break
            except psycopg.Error as e:
                if not self._stopping.is_set():
                    log.warning("ledger notifications from %s lost (%s); reconnecting in %.1f s",
                                safe_url(self.url), db_error(e, self.url), pause)
            finally:
                self.connected = False
                self._first.set()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            self._stopping.wait(pause)
            pause = min(pause * 2, BACKOFF_MAX_S)
