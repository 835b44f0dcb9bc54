"""A held call, from the agent's side: open its request (or rejoin the same call's request), wait while humans
decide (progress while waiting, expiry, the caller leaving), and when approved, prove the approval from the chain
and claim it (exactly one waiter wins), then run it through the gate's `run` (with the arguments a reviewer
edited, when one did: `server.approvals.edits`). A retry of a call that ran gets
that run's outcome, never a second run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import anyio
import mcp_types as types

from server.approvals.broker import ApprovalBroker
from server.approvals.edits import ChainedEdit, chained_edit
from server.approvals.proof import prove_approval
from server.approvals.quorum import needs
from server.classify import Redaction
from server.errors import LedgerError
from server.ledger import Store
from server.models import Decision, RequestView, ToolCall
from server.outcomes import OUTCOMES, closed_result, error_result, left_result, ran_before_result
from server.records import open_call

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
"""The caller's MCP progress channel: (progress, total, message)."""

class RunFn(Protocol):
    """Runs the approved call (the gate's act and record), under the request's id; `edit` when a reviewer changed
    its arguments (the call then carries the edited ones)."""

    def __call__(self, call: ToolCall, *, edit: ChainedEdit | None = None) -> Awaitable[types.CallToolResult]: ...


on_hold: ContextVar[Callable[[str], None] | None] = ContextVar("keyturn_on_hold", default=None)
"""Set by a caller that answers a held call with a task (`server.serving.tasks`): told the request's id once the
call is held, before it waits for the decision."""


@dataclass
class Holding:
    ledger: Store
    broker: ApprovalBroker
    progress_interval_s: float = 10.0

    async def hold(
        self, call: ToolCall, redaction: Redaction, decision: Decision, run: RunFn,
        progress: ProgressFn | None = None, gone: anyio.Event | None = None,
    ) -> types.CallToolResult:
        """Hold `call` until its request is decided; run it (once) with `run` when approved and claimed here."""
        assert decision.review is not None
        # The same call again while its request lives: rejoin it in whatever state it is.
        rejoined = await self.broker.rejoin(call.principal, call.tool, call.args_hash, decision.policy_digest,
                                            self.broker.instance_id)
        if rejoined is not None:
            request_id = rejoined.id
            if rejoined.state in ("running", "executed", "failed"):
                return await self._outcome_for_retry(request_id, call, progress, gone)
        else:
            request_id = call.call_id
            expires = time.time() + decision.review.timeout_s
            await open_call(self.ledger, call, redaction.arguments, decision, state="pending",
                            holder=self.broker.instance_id, expires=expires,
                            extra=[("approval.requested", {"review": decision.review.model_dump(), "expires": expires})])
            view = await self.ledger.get_call(request_id)
            assert view is not None
            await self.broker.announce(view)
            del view  # not kept while the call waits (see `_wait`)

        if (held := on_hold.get()) is not None:
            held(request_id)
        found = await self._wait_for_caller(request_id, ("pending",), progress, gone)
        if found is None:
            return left_result(request_id)
        if found.state != "approved":
            return closed_result(found)
        with anyio.CancelScope(shield=True):
            # The tables said approved; only the chain can say so. A state flipped or a vote forged behind
            # keyturn's back runs nothing, and is recorded as a refusal.
            # A reviewer may have edited the arguments: what runs is then exactly the edited ones (from the chain).
            events, broken = await self.ledger.call_chain(request_id)
            edit = chained_edit(events) if broken is None else None
            if isinstance(edit, str):
                return await self._unproven(request_id, edit)
            target = call if edit is None else call.model_copy(
                update={"arguments": edit.arguments, "args_hash": edit.args_hash})
            problem = await prove_approval(self.ledger, request_id, args_hash=target.args_hash,
                                           policy_digest=decision.policy_digest, directory=self.broker.directory)
            if problem is not None:
                return await self._unproven(request_id, problem)
            # One conditional write: exactly one process (and one waiting call) wins the approval.
            claimed = await self.ledger.transition(
                request_id, ("approved",), "running", "execution.started",
                {"holder": self.broker.instance_id, "args_hash": target.args_hash}, holder=self.broker.instance_id,
            )
            if claimed:
                return await run(target.model_copy(update={"call_id": request_id}), edit=edit)
        # Another waiter (a retry, or another process) won it: this caller gets that run's outcome.
        return await self._outcome_for_retry(request_id, call, progress, gone)

    async def _unproven(self, request_id: str, problem: str) -> types.CallToolResult:
        log.error("request %s is approved in the ledger's tables but not by its chain: %s", request_id, problem)
        reason = f"the approval is not proven by the ledger's chain ({problem}); it did not run"
        await self.ledger.finish(request_id, "unproven",
                                 {"by": "keyturn", "code": "approval_not_proven", "reason": reason}, reason=reason)
        return error_result(f"Denied by keyturn: request {request_id}: {reason}.", outcome=OUTCOMES["unproven"].label,
                            by="keyturn", code="approval_not_proven", request_id=request_id)

    async def _wait_for_caller(
        self, request_id: str, through: tuple[str, ...], progress: ProgressFn | None, gone: anyio.Event | None,
    ) -> RequestView | None:
        """`_wait` while the caller is there: None once it is known to be gone (its connection closed, or its
        request cancelled), recorded as `client.left`; the request itself stays as it is."""
        try:
            found = await self._wait(request_id, progress, through, gone)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._record_left(request_id, "the caller cancelled its request")
            raise
        if found is None:
            await self._record_left(request_id, "the caller's connection closed")
        return found

    async def _record_left(self, request_id: str, reason: str) -> None:
        try:
            await self.ledger.append("client.left", request_id, {"reason": reason})
        except LedgerError as e:
            log.warning("could not record that the caller of %s left: %s", request_id, e)

    async def _outcome_for_retry(
        self, request_id: str, call: ToolCall, progress: ProgressFn | None, gone: anyio.Event | None,
    ) -> types.CallToolResult:
        """A retry of a request that another caller is running or has run: its outcome, never a second run."""
        found = await self._wait_for_caller(request_id, ("approved", "running"), progress, gone)
        if found is None:
            return left_result(request_id)
        if found.state not in ("executed", "failed"):
            return closed_result(found)
        delivery = await self.broker.kept.deliver(request_id, call.principal)
        if delivery is None:
            return closed_result(found)
        if delivery.result_json is not None:
            return types.CallToolResult.model_validate_json(delivery.result_json)
        return ran_before_result(request_id, delivery.kind, delivery.ran_at, delivery.reason)

    async def _wait(self, request_id: str, progress: ProgressFn | None, through: tuple[str, ...] = ("pending",),
                    gone: anyio.Event | None = None) -> RequestView | None:
        """Wait while the request is in one of `through`; return it in the state it moved to, or None as soon as
        `gone` is set."""
        started = time.monotonic()
        with self.broker.watching(request_id):
            while True:
                if gone is not None and gone.is_set():
                    return None
                view = await self.ledger.get_call(request_id)
                if view is None:
                    raise LedgerError(f"request {request_id} vanished from the ledger")
                if view.state not in through:
                    return view
                now = time.time()
                if view.state in ("pending", "approved") and view.expires is not None and now >= view.expires:
                    await self.broker.expire(request_id)
                    continue
                if progress is not None:
                    await progress(time.monotonic() - started, None, waiting_message(view))
                remaining = (view.expires - now) if view.expires is not None else self.progress_interval_s
                if view.state == "running":
                    remaining = self.progress_interval_s  # a run ends when the tool returns, not at the expiry
                del view  # read again on waking: not kept while waiting, it is a fifth of a held call's memory
                await self.broker.wait_for_change(request_id, min(self.progress_interval_s, remaining), gone)


def waiting_message(view: RequestView) -> str:
    """The progress message of a held call (what it still needs, as every channel says it: `quorum.needs`)."""
    if view.state != "pending":
        return f"keyturn request {view.id}: {view.tool} was approved and is being run; waiting for its result"
    need = needs(view.review, view.votes)
    left = int(view.expires - time.time()) if view.expires else 0
    return (f"keyturn request {view.id}: waiting for human approval of {view.tool} "
            f"({need.progress()}; needs {need.requirement()}; expires in {left}s)")
