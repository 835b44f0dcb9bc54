"""The approvals broker: pending requests, eligibility, quorum, timeouts, wake-ups, and rejoining.

A channel (HTTP API, Slack, Teams, web) never decides: it reports a `Verdict` with an identity it
has verified, and `ApprovalBroker.decide` alone validates it, inside one ledger transaction, so a
vote accepted by any keyturn process sharing the database is checked against the stored request.

Rejoining: a held call's request outlives its first caller. The same principal calling the same tool with the
same arguments again (`rejoin`) finds the request in whatever state it is, until the request's expiry: pending
(wait), approved (run it now, once), running or ran (the outcome, and the result this process kept for it in
memory, never a second run). An approval that finds no caller waiting stays `approved`, not run, until one comes back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from server.approvals.edits import EditRefused, ProposedEdit, approved_hash, edit_refusal, record_edit
from server.approvals.grants import GrantRefused, ProposedGrant, consent, make_grant
from server.approvals.kept import KeptResults
from server.approvals.quorum import ReviewerDirectory, needs, quorum_met
from server.errors import LedgerError
from server.ledger import Row, Store, Subscription, Tx
from server.models import Event, RequestView, ReviewSpec, Verdict, VoteResult
from server.outcomes import OPEN_STATES

log = logging.getLogger(__name__)

WAKE_KINDS = frozenset({"approval.granted", "denied", "expired", "cancelled", "abandoned", "executed", "failed"})
SWEEP_BATCH = 1000
"""Expired requests one housekeeping round expires at most (the longest expired first); the next round goes on."""
POLL_RESCAN_EVENTS = 100_000
"""Past this many new events since the last poll, the poll reads the waiters' states instead of the new events."""


class Notifier(Protocol):
    """A reviewer channel's outbound side. Failures are recorded; they never approve anything."""

    name: str

    async def request_opened(self, request: RequestView) -> None: ...

    async def request_changed(self, request: RequestView, event: Event) -> None: ...


REJOINABLE_OPEN = ("pending", "approved", "running")
WAITING_FOR_AGENT = "approved, waiting for the agent to come back"
"""How an approved request that nobody has claimed yet reads to a reviewer: it runs when the agent calls again."""


def _instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class ApprovalBroker:
    ledger: Store
    directory: ReviewerDirectory
    poll_interval_s: float = 0.25
    notifiers: list[Notifier] = field(default_factory=list)
    instance_id: str = field(default_factory=_instance_id)
    rejoin_window_s: float = 0.0
    """How long a call whose holding process died stays open for the agent to call again (on any instance) before
    it is `abandoned`: where liveness is a lease in the database (PostgreSQL), from the end of the holder's lease."""
    _waiters: dict[str, anyio.Event] = field(default_factory=dict)
    _watching: dict[str, int] = field(default_factory=dict)  # request id -> calls waiting on it now

    feed: Subscription = field(init=False)
    kept: KeptResults = field(init=False)

    def __post_init__(self) -> None:
        self.feed = self.ledger.follow(WAKE_KINDS, on_local=self._on_events)
        self.kept = KeptResults(self.ledger)

    @property
    def held_now(self) -> int:
        """How many requests calls in this process are waiting on now."""
        return len(self._watching)

    # -- wake-ups --------------------------------------------------------------------------------

    def _on_events(self, events: Sequence[Event]) -> None:
        for e in events:
            if e.call_id in self._waiters:
                self._waiters[e.call_id].set()

    @contextmanager
    def watching(self, request_id: str) -> Iterator[None]:
        """Keep `request_id`'s wake-up registered while a call waits on it, across `wait_for_change` rounds (so a
        change between two rounds is not missed); drop it when the last waiter leaves, however the wait ended
        (decided, expired, the client gone). Without this, every wait that ended without a wake-up stayed here."""
        self._watching[request_id] = self._watching.get(request_id, 0) + 1
        self._waiters.setdefault(request_id, anyio.Event())
        try:
            yield
        finally:
            left = self._watching.pop(request_id) - 1
            if left:
                self._watching[request_id] = left
            else:
                self._waiters.pop(request_id, None)

    def has_waiter(self, request_id: str) -> bool:
        """True while a call in this process waits on `request_id` (its client not known to be gone)."""
        return request_id in self._watching

    async def wait_for_change(self, request_id: str, timeout: float, also: anyio.Event | None = None) -> None:
        """Return when the request leaves `pending` (in this process or another), when `also` is set (the caller
        is gone), or after `timeout` seconds."""
        event = self._waiters.setdefault(request_id, anyio.Event())
        try:
            with anyio.move_on_after(max(0.0, timeout)):
                if also is None:
                    await event.wait()
                else:
                    await first_of(event, also)
        finally:
            if request_id not in self._watching:
                if self._waiters.get(request_id) is event:
                    del self._waiters[request_id]
            elif event.is_set() and self._waiters.get(request_id) is event:
                self._waiters[request_id] = anyio.Event()  # consumed: the next round waits for the next change

    async def poll_store(self) -> None:
        """Learn of decisions recorded by other processes: a cheap head check, then what was appended since the
        last poll (the calls with a decision or an end among the new events), so a poll costs what changed, not
        how many calls wait. The first poll with waiters, and one that fell far behind, reads their states."""
        while True:
            # Woken at once by another instance's commit where the store announces them (PostgreSQL's NOTIFY);
            # else, or while those announcements are down, every poll interval.
            interval = self.ledger.wake_interval(self.poll_interval_s)
            if interval > self.poll_interval_s:
                await self.feed.wait(interval)
            else:
                await anyio.sleep(interval)
            if not self._waiters:
                continue
            try:
                moved = await self.feed.calls_changed(self._moved_waiters, POLL_RESCAN_EVENTS)
            except LedgerError as e:
                log.warning("poll of the store failed: %s", e)
                continue
            for request_id in moved:
                if request_id in self._waiters:
                    self._waiters[request_id].set()

    async def _moved_waiters(self) -> set[str]:
        states = await self.ledger.call_states(list(self._waiters))
        return {request_id for request_id, state in states.items() if state != "pending"}

    # -- notifications ---------------------------------------------------------------------------

    async def announce(self, request: RequestView) -> None:
        """Tell every channel about a new held request; record deliveries and failures."""
        for notifier in self.notifiers:
            try:
                await notifier.request_opened(request)
                await self.ledger.append("notified", request.id, {"channel": notifier.name})
            except Exception as e:  # a channel failure must never block or approve
                log.warning("channel %s failed to announce %s: %s", notifier.name, request.id, e)
                try:
                    await self.ledger.append("notify.failed", request.id, {"channel": notifier.name, "error": str(e)})
                except LedgerError:
                    log.exception("could not record a notification failure")

    async def announce_change(self, request_id: str) -> None:
        """Tell the channels of the request's latest event (read only when there is a channel to tell)."""
        if not self.notifiers:
            return
        view = await self.ledger.get_call(request_id)
        event = await self.ledger.last_event(request_id)
        if view is None or event is None:
            return
        for notifier in self.notifiers:
            try:
                await notifier.request_changed(view, event)
            except Exception as e:
                log.warning("channel %s failed to update %s: %s", notifier.name, request_id, e)

    # -- the one place a verdict is judged ------------------------------------------------------

    async def decide(self, verdict: Verdict, edit: ProposedEdit | EditRefused | None = None,
                     grant: ProposedGrant | GrantRefused | None = None) -> VoteResult:
        """Judge and record one reviewer's verdict: accepted, or refused (a refusal of a known request is recorded
        as `vote.refused`). With `edit` (an approval only): the reviewer's changed arguments, judged by the gate
        (`server.approvals.edits`); the approval is then for the edited call, which needs what its review says.
        With `grant` (an approval only, judged by `server.approvals.grants.prepare_grant`): the vote agrees to a
        standing grant; the vote that completes the quorum makes it, when every approver agreed to one."""
        person = self.directory.person(verdict.reviewer)
        reason = (verdict.reason or "").strip() or None

        def body(tx: Tx, row: Row | None) -> VoteResult:
            if row is None:
                return VoteResult(verdict.request_id, False, "", f"no request {verdict.request_id}", "unknown")

            def refuse(message: str, code: str) -> VoteResult:
                tx.append(
                    "vote.refused",
                    verdict.request_id,
                    {"reviewer": verdict.reviewer, "person": person, "verdict": verdict.verdict,
                     "channel": verdict.channel, "code": code, "message": message},
                )
                return VoteResult(verdict.request_id, False, row["state"], message, code)

            if person is None:
                return refuse(f"{verdict.reviewer} is not a configured reviewer", "unknown_reviewer")
            state = row["state"]
            votes = tx.votes(verdict.request_id)
            mine = next((v for v in votes if v["person"] == person), None)
            if state == "approved" and mine is not None and verdict.verdict == "deny":
                pass  # an approver takes their approval back before the call is claimed to run: see `_change`
            elif state != "pending":
                ran = " (it was claimed to run: an approval cannot be taken back now)" if mine is not None and \
                    verdict.verdict == "deny" and state in ("running", "executed", "failed") else ""
                return refuse(f"request {verdict.request_id} is {state}, not pending{ran}", "not_pending")
            if row["expires"] is not None and tx.now >= row["expires"]:
                return refuse(f"request {verdict.request_id} has expired", "expired")
            if person in {row["principal"], row["on_behalf_of"]} or verdict.reviewer == row["principal"]:
                return refuse("the requester cannot approve or deny its own request", "self_approval")
            spec = ReviewSpec.model_validate_json(row["review"]) if row["review"] else ReviewSpec()
            groups = [g.name for g in spec.groups if self.directory.eligible(person, g)]
            if not groups:
                return refuse(f"{person} is not eligible to review this request (needs {needs(spec).requirement()})",
                              "not_eligible")
            if verdict.verdict == "deny" and not reason:
                return refuse("a denial needs a reason", "reason_required")
            if mine is not None:
                if mine["verdict"] == "deny":
                    return refuse(f"{person} denied this request; a denial is final", "duplicate")
                if verdict.verdict == "approve":
                    return refuse(f"{person} has already approved this request", "duplicate")
                return self._change(tx, verdict, row, person, reason, groups)
            if verdict.verdict == "approve" and spec.require_reason and not reason:
                return refuse("this policy requires a reason with every approval", "reason_required")
            consents: list[dict[str, Any]] = []
            if grant is not None:
                refused_grant = grant if isinstance(grant, GrantRefused) else None
                if verdict.verdict != "approve" or edit is not None:
                    refused_grant = GrantRefused("bad_request", "a grant is made by a plain approval (not a denial, "
                                                                "not with edited arguments)")
                elif refused_grant is None and tx.call_events(verdict.request_id, ("arguments.edited",)):
                    refused_grant = GrantRefused("grant_after_edit", "a call whose arguments a reviewer edited cannot "
                                                                     "become a grant")
                elif refused_grant is None and isinstance(grant, ProposedGrant) and \
                        grant.policy_digest != row["policy_digest"]:
                    refused_grant = GrantRefused("policy_changed", "the policy changed since this request was made")
                if refused_grant is not None:
                    return refuse(refused_grant.message, refused_grant.code)
                assert isinstance(grant, ProposedGrant)
                consents = [p["grant"] for kind, p in tx.call_events(verdict.request_id, ("vote",))
                            if p.get("verdict") == "approve" and isinstance(p.get("grant"), dict)]
                if len(consents) != sum(1 for v in votes if v["verdict"] == "approve"):
                    return refuse("a grant needs every approver's agreement, and an earlier approver approved this "
                                  "call only: approve it without a grant", "grant_not_agreed")
                consents.append(consent(grant))

            args_hash = approved_hash(tx, row)  # the edited arguments' once a reviewer edited them
            if edit is not None:
                refused = edit if isinstance(edit, EditRefused) else edit_refusal(row, votes, edit, tx)
                if verdict.verdict != "approve":
                    refused = EditRefused("bad_request", "only an approval can edit the arguments")
                if refused is None and not reason:
                    refused = EditRefused("reason_required", "an edit needs a reason (the agent reads it)")
                if refused is not None:
                    return refuse(refused.message, refused.code)
                assert isinstance(edit, ProposedEdit)
                spec = record_edit(tx, row, edit, reviewer=verdict.reviewer, person=person, reason=reason,
                                   channel=verdict.channel)
                groups = [g.name for g in spec.groups if self.directory.eligible(person, g)]
                args_hash = edit.args_hash
            tx.add_vote(verdict.request_id, person, verdict.reviewer, verdict.verdict, reason, groups)
            vote_payload: dict[str, Any] = {"reviewer": verdict.reviewer, "person": person, "verdict": verdict.verdict,
                            "reason": reason, "channel": verdict.channel, "groups": groups}
            if args_hash != row["args_hash"]:
                vote_payload["args_hash"] = args_hash  # a vote for the edited call
            if consents:
                vote_payload["grant"] = consents[-1]  # this approver agrees to a standing grant on these terms
            tx.append("vote", verdict.request_id, vote_payload)
            if verdict.verdict == "deny":
                tx.finish(verdict.request_id, "denied_by_reviewer", {"by": "reviewer", "person": person,
                                                                      "reviewer": verdict.reviewer, "reason": reason},
                          f"denied by {person}: {reason}")
                return VoteResult(verdict.request_id, True, "denied", f"denied by {person}", "denied")
            approvers = [v["person"] for v in votes if v["verdict"] == "approve"] + [person]
            if quorum_met(spec, approvers, self.directory):
                # The approval is bound to this request's tool + arguments hash + policy digest, and expires.
                expires = tx.now + spec.timeout_s
                tx.set_state(verdict.request_id, "approved", expires=expires)
                tx.append("approval.granted", verdict.request_id, {
                    "approvers": approvers, "tool": row["tool"], "args_hash": args_hash,
                    "policy_digest": row["policy_digest"], "expires": expires})
                if consents:
                    assert isinstance(grant, ProposedGrant)
                    grant_id = make_grant(tx, row, grant, consents, approvers, person=person,
                                          reviewer=verdict.reviewer, reason=reason, channel=verdict.channel)
                    return VoteResult(verdict.request_id, True, "approved",
                                      f"approved: quorum reached; standing grant {grant_id} made", "approved")
                return VoteResult(verdict.request_id, True, "approved", "approved: quorum reached", "approved")
            progress = needs(spec, [*votes, {"person": person, "verdict": "approve", "groups": groups}]).progress()
            lead = ("arguments edited; the edited call needs more approvals: " if isinstance(edit, ProposedEdit)
                    else "vote recorded (agreeing to a grant, made once every approver agrees): " if consents
                    else "vote recorded: ")
            return VoteResult(verdict.request_id, True, "pending", f"{lead}{progress}; more are needed", "recorded")

        result = await self.ledger.mutate_call(verdict.request_id, body)
        if not result.accepted:
            return result
        await self.announce_change(verdict.request_id)
        if result.code == "approved":
            waiting = self.has_waiter(verdict.request_id)
            edited = "arguments edited and " if isinstance(edit, ProposedEdit) else ""
            made = result.message.partition("; standing grant ")[2]
            made = f"; standing grant {made}" if made else ""
            result = VoteResult(result.request_id, True, "approved", f"{edited}approved: quorum reached{made}" + (
                "; running it for the waiting agent" if waiting else
                f"; {WAITING_FOR_AGENT} (it runs once when the agent repeats the call, before the request expires)"),
                "approved")
        return result

    @staticmethod
    def _change(tx: Tx, verdict: Verdict, row: Row, person: str, reason: str | None, groups: list[str]) -> VoteResult:
        """A reviewer who approved denies before the call is claimed to run: the vote is recorded as changed (the
        `vote` event says what it was), and the request is denied as by any reviewer's denial. The claim to run and
        this denial are each one conditional change of the call's state, so exactly one of them wins."""
        request_id = verdict.request_id
        tx.change_vote(request_id, person, verdict.reviewer, "deny", reason, groups)
        tx.append("vote", request_id, {"reviewer": verdict.reviewer, "person": person, "verdict": "deny",
                                       "reason": reason, "channel": verdict.channel, "groups": groups,
                                       "changed_from": "approve"})
        tx.finish(request_id, "denied_by_reviewer", {"by": "reviewer", "person": person, "reviewer": verdict.reviewer,
                                                     "reason": reason, "changed_vote": True},
                  f"denied by {person} (who had approved): {reason}")
        was = " (its approval is withdrawn: it will not run)" if row["state"] == "approved" else ""
        return VoteResult(request_id, True, "denied", f"denied by {person}, who had approved{was}", "denied")

    # -- rejoining -------------------------------------------------------------------------------

    async def rejoin(self, principal: str, tool: str, args_hash: str, policy_digest: str,
                     holder: str) -> RequestView | None:
        """The held request this call (the same principal, tool and arguments, under the same policy) rejoins,
        recorded as `call.rejoined`; None when there is none, and a new request is to be opened.

        An open request made under another policy is withdrawn (`cancelled`, superseded); one that already ran
        under another policy is left as it is. A pending or approved request is taken over by `holder` (this
        process: the one whose caller is waiting); a running one stays with the process running it."""
        view = await self.ledger.find_rejoinable(principal, tool, args_hash, time.time())
        if view is None:
            return None
        if view.policy_digest != policy_digest:
            if view.state in ("pending", "approved"):
                await self.ledger.finish(view.id, "cancelled",
                                         {"by": "keyturn", "reason": "superseded: the policy changed"},
                                         reason="superseded: the policy changed")
            return None

        def body(tx: Tx, row: Row | None) -> str | None:
            if row is None:
                return None
            state = row["state"]
            if state in ("pending", "approved"):
                tx.set_holder(view.id, holder)
            elif state not in ("running", "executed", "failed"):
                return None  # closed meanwhile (expired, cancelled, denied): a new request
            tx.append("call.rejoined", view.id, {"principal": principal, "holder": holder, "state": state})
            return str(state)

        if await self.ledger.mutate_call(view.id, body) is None:
            return None
        return await self.ledger.get_call(view.id)

    # -- timeouts and restarts ------------------------------------------------------------------

    async def expire(self, request_id: str, reason: str = "no reviewer decided before the timeout") -> bool:
        """Pending (or approved but never run) past its expiry: record `expired`, never a human's denial."""
        done = await self.ledger.finish(request_id, "expired", {"reason": reason}, reason=reason)
        if done:
            await self.announce_change(request_id)
        return done

    async def sweep_expired(self) -> int:
        """Expire every open request whose time has passed, whichever process holds it; forget the results kept
        for requests whose time has passed."""
        self.kept.forget_expired(time.time())
        count = 0
        for request_id in await self.ledger.expired_calls(time.time(), limit=SWEEP_BATCH):
            if await self.expire(request_id):
                count += 1
        return count

    async def abandon_orphans(self, alive: Callable[[Row], Awaitable[bool]] | None = None) -> list[str]:
        """Mark `abandoned` every open call whose holding process is gone (run at start-up, and now and then).

        Where the store keeps leases (PostgreSQL: an `alive` column), a holder is alive while its lease runs, and its
        calls are kept open for `rejoin_window_s` after the lease ended, for the agent to call again on any instance
        (`rejoin`); elsewhere, by the process id on this host, or a heartbeat within 30 s."""
        instances = {row["id"]: row for row in await self.ledger.instances()}
        host = socket.gethostname()

        async def is_alive(holder: str | None) -> bool:
            if holder is None or holder == self.instance_id:
                return holder == self.instance_id
            row = instances.get(holder)
            if row is None:
                return False
            if alive is not None:
                return await alive(row)
            if "alive" in row:  # a lease, on the database's clock; then the rejoin window
                return bool(row["alive"]) or float(row["dead_for"]) < self.rejoin_window_s
            if row["host"] == host:
                return _pid_alive(int(row["pid"]))
            return bool(time.time() - row["heartbeat"] < 30.0)

        abandoned = []
        open_states = OPEN_STATES
        for row in await self.ledger.open_calls_held_elsewhere(open_states, self.instance_id):
            if await is_alive(row["holder"]):
                continue
            holder = await self._holder(row["id"])  # read again: it may have changed hands since
            if await is_alive(holder):
                continue
            stage = row["state"]
            ok = await self.ledger.finish(
                row["id"], "abandoned",
                {"stage": stage, "holder": holder,
                 "reason": "the keyturn process holding this call stopped" +
                 ("; the tool's outcome is unknown" if stage == "running" else "")},
                reason="process stopped while " + stage,
            )
            if ok:
                abandoned.append(row["id"])
        for stale in instances:
            if stale != self.instance_id and not await is_alive(stale):
                await self.ledger.remove_instance(stale)
        return abandoned

    async def _holder(self, request_id: str) -> str | None:
        return await self.ledger.holder(request_id)

    async def cancel(self, request_id: str, principal: str, reason: str) -> bool:
        """The requesting agent withdraws its own open request."""

        def body(tx: Tx, row: Row | None) -> bool:
            if row is None or row["principal"] != principal or row["state"] not in ("pending", "approved"):
                return False
            return tx.finish(request_id, "cancelled", {"by": principal, "reason": reason}, reason)

        done = await self.ledger.mutate_call(request_id, body)
        if done:
            await self.announce_change(request_id)
        return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def first_of(*events: anyio.Event) -> None:
    """Until any one of `events` is set."""
    async with anyio.create_task_group() as tg:
        async def first(e: anyio.Event) -> None:
            await e.wait()
            tg.cancel_scope.cancel()

        for e in events:
            tg.start_soon(first, e)
