"""What the SQLite and PostgreSQL stores do the same way: every read and write here goes through the store's own
`_read` (a snapshot on a connection of its kind) and `transaction` (one unit that appends to the chain), so the
stores differ only in how they connect, lock the chain and wake followers."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.canonical import canonical_json
from server.errors import LedgerError
from server.ledger import audit as audit_module
from server.ledger import bundle, chain, queries
from server.ledger.audit import AuditResult
from server.ledger.checkpoints import Checkpoint, unique
from server.ledger.feed import Listener
from server.ledger.queries import CALL_STATES_CHUNK, Row, row_to_event
from server.ledger.tx import Tx
from server.models import Event, RequestView, ReviewSpec

if TYPE_CHECKING:
    pass

T = TypeVar("T")


class SharedStore:
    """The `Store` methods both stores share; each store gives `_read`, `transaction`, `open` and `close`."""

    _listeners: list[Listener]
    _chain_watch: chain.ChainWatch

    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, long: bool = False) -> T:
        raise NotImplementedError

    async def transaction(self, body: Callable[[Tx], T]) -> T:
        raise NotImplementedError

    async def open(self) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(events)` after each commit in this process (what `follow` is made of). Returns an
        unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def append(self, kind: str, call_id: str | None, payload: dict[str, Any]) -> Event:
        return await self.transaction(lambda tx: tx.append(kind, call_id, payload))

    async def open_call(
        self,
        *,
        call_id: str,
        tool: str,
        principal: str,
        on_behalf_of: str | None,
        model: str | None,
        args_hash: str,
        redacted_arguments: dict[str, Any],
        state: str,
        holder: str | None,
        events: Iterable[tuple[str, dict[str, Any]]],
        risk: str | None = None,
        reason: str | None = None,
        rules: list[dict[str, Any]] | None = None,
        review: ReviewSpec | None = None,
        policy_digest: str | None = None,
        expires: float | None = None,
        outcome_reason: str | None = None,
        finish: tuple[str, dict[str, Any]] | None = None,
    ) -> list[Event]:
        """Insert a call's row and its first events in one transaction; with `finish` (an outcome and its payload),
        end the call that way in the same transaction (`Tx.finish`), with `outcome_reason`."""
        event_list = list(events)

        def body(tx: Tx) -> list[Event]:
            tx.insert_call(call_id, {
                "tool": tool, "principal": principal, "on_behalf_of": on_behalf_of, "model": model,
                "args_hash": args_hash, "arguments": canonical_json(redacted_arguments), "state": state, "risk": risk,
                "reason": reason, "rules": canonical_json(rules or []),
                "review": review.model_dump_json() if review else None, "policy_digest": policy_digest,
                "expires": expires, "holder": holder, "outcome_reason": None if finish else outcome_reason,
            })
            appended = tx.append_many(call_id, event_list)
            if finish is not None and not tx.finish(call_id, finish[0], finish[1], outcome_reason):
                raise LedgerError(f"a new call cannot end as {finish[0]} from {state}")
            return [*appended, *tx.appended[len(appended):]]

        return await self.transaction(body)

    async def mutate_call(self, call_id: str, body: Callable[[Tx, Row | None], T]) -> T:
        """Read a call's row and change it atomically: `body(tx, row)` decides, appends and updates."""
        return await self.transaction(lambda tx: body(tx, tx.call_row(call_id)))

    async def transition(
        self,
        call_id: str,
        from_states: Iterable[str],
        to_state: str,
        event_kind: str,
        payload: dict[str, Any],
        *,
        holder: str | None = None,
        outcome_reason: str | None = None,
    ) -> bool:
        """Move an open call from one of `from_states` to `to_state` with one event; False if someone else moved it
        first. Never to a terminal state (that is `finish`), and never from one."""
        columns: dict[str, Any] = {}
        if holder is not None:
            columns["holder"] = holder
        if outcome_reason is not None:
            columns["outcome_reason"] = outcome_reason

        def body(tx: Tx) -> bool:
            if not tx.move(call_id, from_states, to_state, **columns):
                return False
            tx.append(event_kind, call_id, payload)
            return True

        return await self.transaction(body)

    async def finish(self, call_id: str, outcome: str, payload: dict[str, Any], *, reason: str | None = None) -> bool:
        """End the call as `outcome` (one of `server.outcomes.OUTCOMES`): its final state and its one terminal
        event, in one transaction. False when it had already ended, or is not in a state it ends from that way."""
        return await self.transaction(lambda tx: tx.finish(call_id, outcome, payload, reason))

    async def get_call(self, call_id: str) -> RequestView | None:
        return await self._read(lambda conn: queries.get_call(conn, call_id))

    async def holder(self, call_id: str) -> str | None:
        """The process holding the call now (None for none, or no such call)."""
        return await self._read(lambda conn: queries.holder(conn, call_id))

    async def call_states(self, call_ids: Sequence[str]) -> dict[str, str]:
        """The states of `call_ids`, read a few hundred at a time as quick units on the loop's thread. (As one long
        read in another thread, with a busy loop, it would get the GIL back only every switch interval for each
        row: seconds for thousands of waiters.)"""
        states: dict[str, str] = {}
        ids = list(call_ids)
        for start in range(0, len(ids), CALL_STATES_CHUNK):
            chunk = ids[start:start + CALL_STATES_CHUNK]
            states.update(await self._read(lambda conn, chunk=chunk: queries.call_states(conn, chunk)))  # type: ignore[misc]
        return states

    async def expired_calls(self, now: float, limit: int = 1000) -> list[str]:
        """Open (pending or approved) calls whose expiry has passed, the longest expired first: an index lookup
        of those alone, however many calls are open."""
        return await self._read(lambda conn: queries.expired_calls(conn, now, limit))

    async def count_calls(self, states: Iterable[str] = ("pending",), limit: int = 100_000) -> int:
        """How many calls are in `states` (at most `limit`), without reading them."""
        wanted = list(states)
        return await self._read(lambda conn: queries.count_calls(conn, wanted, limit))

    async def find_open(self, principal: str, tool: str, args_hash: str) -> RequestView | None:
        """An open (pending or approved) request for the same principal, tool and arguments, if any."""
        return await self._read(lambda conn: queries.find_open(conn, principal, tool, args_hash))

    async def find_rejoinable(self, principal: str, tool: str, args_hash: str, now: float) -> RequestView | None:
        """The held request the same call (principal, tool, arguments) rejoins: an open one (pending, approved,
        running), else the newest that ran (executed, failed) and whose expiry has not passed."""
        return await self._read(lambda conn: queries.find_rejoinable(conn, principal, tool, args_hash, now))

    async def last_event(self, call_id: str) -> Event | None:
        """The call's latest event (what a channel shows as its news)."""
        return await self._read(lambda conn: queries.last_event(conn, call_id))

    async def tail(self, n: int = 20) -> list[Event]:
        return await self._read(lambda conn: queries.tail(conn, n))

    async def call_facets(self, limit: int = 200) -> dict[str, list[str]]:
        """The distinct tools, principals and reviewing people seen, for search suggestions."""
        return await self._read(lambda conn: queries.call_facets(conn, limit), long=True)

    async def head_seq(self) -> int:
        return await self._read(queries.head_seq)

    async def call_chain(self, call_id: str) -> tuple[list[Event], str | None]:
        """The chained events of `call_id`, read with the chain they span checked (see `chain.ChainWatch`: what was
        appended since the last proof, and the call's own events against the hashes they were verified with).
        Returns (events, None), or ([], the first break)."""
        rows, broken = await self._read(lambda conn: self._chain_watch.call_chain(conn, call_id), long=True)
        return [row_to_event(r) for r in rows], broken

    async def verify(self) -> chain.VerifyResult:
        """Recompute the chain; name the first event whose hash, link or sequence number is wrong."""
        return await self._read(chain.verify, long=True)

    async def audit(self, given: Sequence[Checkpoint] = (), key: Ed25519PublicKey | None = None, *,
                    own_key_id: str | None = None, tables: bool = True) -> tuple[AuditResult, list[Checkpoint]]:
        """`audit verify` in one snapshot: the chain, the head row, the tables, and the checkpoints `given` with the
        ledger's own copies by `own_key_id` (when set), all signed by `key`. Returns the result and the checkpoints
        it checked."""

        def check(conn: sqlite3.Connection) -> tuple[AuditResult, list[Checkpoint]]:
            own = queries.stored_checkpoints(conn, key_id=own_key_id) if own_key_id is not None else []
            known = unique([*given, *own])
            return audit_module.audit(conn, known, key, tables=tables), known

        return await self._read(check, long=True)

    async def stored_checkpoints(self, after_seq: int = 0, key_id: str | None = None) -> list[Checkpoint]:
        """The checkpoints kept in the ledger's own table after `after_seq` (by `key_id`, when given)."""
        return await self._read(lambda conn: queries.stored_checkpoints(conn, after_seq, key_id), long=True)

    async def store_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Keep `checkpoint` in the ledger's table; False if one for that seq and key was already there."""
        return await self.transaction(lambda tx: tx.store_checkpoint(checkpoint))

    async def extension(self, key_id: str, anchor_of: Callable[[list[Checkpoint]], tuple[int, str]], *,
                        force: bool = False) -> tuple[int, str, str] | str | None:
        """In one snapshot: `anchor_of(the latest checkpoint kept by key_id, if any)` picks the trusted (seq, hash);
        None when the head is that event already (unless `force`); else whether the chain from it to the head is
        intact: (head seq, head hash, first event's hash), or what is wrong (see `audit.extends`)."""

        def read(conn: sqlite3.Connection) -> tuple[int, str, str] | str | None:
            kept = queries.stored_checkpoints(conn, key_id=key_id)
            anchor = anchor_of(kept[-1:])
            if not force and anchor[0] == queries.head_seq(conn) != 0:
                return None
            return audit_module.extends(conn, anchor[0], anchor[1])

        return await self._read(read, long=True)

    async def event_hashes(self, seq: int) -> tuple[str, str] | None:
        """(hash of event `seq`, hash of event 1), or None when either is missing."""
        return await self._read(lambda conn: queries.event_hashes(conn, seq), long=True)

    async def export_bundle(self, first: int, last: int, cover: Checkpoint, known: Sequence[Checkpoint],
                            key: Ed25519PublicKey) -> dict[str, Any]:
        """The audit bundle of events `first`..`cover.seq` (see `bundle.export`)."""
        return await self._read(lambda conn: bundle.export(conn, first, last, cover, known, key), long=True)

    async def grants(self, *, live_only: bool = True, limit: int = 500) -> list[Row]:
        return await self._read(lambda conn: queries.grants(conn, live_only, limit), long=True)

    async def live_grants(self, principal: str, tool: str) -> list[Row]:
        return await self._read(lambda conn: queries.live_grants(conn, principal, tool))

    async def grant(self, grant_id: str) -> Row | None:
        return await self._read(lambda conn: queries.grant(conn, grant_id))

    async def grants_due(self, now: float, limit: int = 1000) -> list[str]:
        return await self._read(lambda conn: queries.grants_due(conn, now, limit))

    async def remove_instance(self, instance_id: str) -> None:
        await self.transaction(lambda tx: tx.remove_instance(instance_id))

    async def add_web_session(self, id_sha256: str, identity: str, token_fp: str, expires: float) -> None:
        """Record a new session (and forget the ones whose time has passed)."""
        await self.transaction(lambda tx: tx.add_web_session(id_sha256, identity, token_fp, expires))

    async def web_session(self, id_sha256: str) -> Row | None:
        return await self._read(lambda conn: queries.web_session(conn, id_sha256))

    async def touch_web_session(self, id_sha256: str) -> None:
        await self.transaction(lambda tx: tx.touch_web_session(id_sha256))

    async def revoke_web_session(self, id_sha256: str) -> None:
        await self.transaction(lambda tx: tx.revoke_web_session(id_sha256))
