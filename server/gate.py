"""The spine: classify -> decide -> hold -> act -> record, for every guarded tool call.

`Gate.call` is the whole path of one call in one place. Any error before the tool runs ends the
call without running it (fail closed); every call ends in exactly one terminal ledger event.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio
import mcp_types as types

from server.approvals import ApprovalBroker
from server.approvals.proof import prove_approval
from server.canonical import args_hash, canonical_json, sha256_hex
from server.classify import ClassifyContext, Redaction, extract_facts
from server.errors import InvalidArguments, LedgerError
from server.execution import limits_from_facts, running_under
from server.guarded import SECRET_RESULT_META
from server.ledger import Ledger
from server.models import Decision, RequestView, ToolCall
from server.outcomes import OUTCOMES
from server.policy import LivePolicy
from server.policy.engine import compact_facts

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
"""The caller's MCP progress channel: (progress, total, message)."""

tool_progress: ContextVar[ProgressFn | None] = ContextVar("keyturn_tool_progress", default=None)
"""While the gate runs a tool: the caller's progress channel, for the tool's own progress (an upstream server's,
in proxy mode). A context variable, so `Runnable.run` keeps its one argument."""


class Runnable(Protocol):
    """What the gate guards: a native GuardedTool or an upstream server's tool."""

    name: str
    annotations: dict[str, Any]
    classifiers: Mapping[str, str]

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]: ...

    async def run(self, arguments: dict[str, Any]) -> types.CallToolResult: ...


@dataclass(frozen=True)
class Identity:
    """Who is calling, as the transport established it (never from the arguments)."""

    principal: str
    on_behalf_of: str | None = None
    model: str | None = None
    client: str | None = None
    session: str | None = None


def error_result(text: str, **meta: Any) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        is_error=True,
        structured_content={"keyturn": meta} if meta else None,
    )


def result_digest(result: types.CallToolResult) -> str:
    return sha256_hex(canonical_json(result.model_dump(mode="json", by_alias=True, exclude_none=True)))


def _rules(decision: Decision) -> list[dict[str, Any]]:
    return [{"id": r.id, "outcome": r.outcome, "risk": r.risk, "reason": r.reason} for r in decision.rules]


def describe_rules(decision: Decision) -> str:
    """The rules that carried the decision (the most restrictive outcome), with their reasons."""
    winning = [r for r in decision.rules if r.outcome == decision.outcome]
    return "; ".join(f"rule {r.id!r}: {r.reason}" for r in winning) or decision.reason


@dataclass
class Gate:
    ledger: Ledger
    broker: ApprovalBroker
    policy: LivePolicy
    classify_context: ClassifyContext
    progress_interval_s: float = 10.0
    _unrecorded: dict[str, tuple[str, dict[str, Any], str | None, str]] = field(default_factory=dict)
    """Runs whose terminal event the ledger refused: call id -> (kind, payload, outcome reason, error)."""

    async def call(
        self, tool: Runnable, arguments: dict[str, Any], who: Identity, progress: ProgressFn | None = None,
        gone: anyio.Event | None = None,
    ) -> types.CallToolResult:
        """`gone`, when the transport can tell: set once the caller's connection for this call has closed. A held
        call then stops waiting (its request stays open for the caller's retry) instead of running for nobody."""
        # The tool's own validation normalises the arguments: what is hashed, classified, approved and run.
        problem, code = None, "invalid_arguments"
        redaction: Redaction | None = None  # made once: from the facts, or guessed for arguments without any
        try:
            arguments = tool.validate(arguments)
            digest = args_hash(arguments)
        except InvalidArguments as e:
            digest, problem = "", f"invalid arguments: {e}"
        except (TypeError, ValueError):
            digest, problem = "", "invalid arguments: arguments must be plain JSON (no NaN or Infinity)"
        except Exception as e:
            # A tool's check that broke its contract (it may raise only InvalidArguments): the call cannot be
            # checked, so it is denied, and recorded like any other refusal. The error may quote the arguments.
            redaction = Redaction.guess(arguments)
            log.error("checking the arguments of %s failed: %s", tool.name, redaction.conceal(f"{type(e).__name__}: {e}"))
            log.debug("argument check traceback", exc_info=True)
            digest, code = "", "error"
            problem = f"denied: keyturn could not check this call's arguments ({type(e).__name__})"
        # Built from values this process made or validated just now (not validated again: this runs for every call).
        call = ToolCall.model_construct(
            call_id=uuid.uuid4().hex, tool=tool.name, arguments=arguments, args_hash=digest,
            principal=who.principal, on_behalf_of=who.on_behalf_of, model=who.model, client=who.client,
            session=who.session, annotations=tool.annotations,
        )
        if problem is not None:
            return await self._refuse(call, redaction or Redaction.guess(arguments), code, problem)
        # classify + decide: any failure here is a denial, never a pass.
        try:
            context = self.classify_context
            roots = getattr(tool, "roots", ())
            if roots:
                context = replace(context, roots=tuple(roots))
            facts = extract_facts(tool.name, arguments, tool.classifiers, tool.annotations, context)
            facts_hint = getattr(tool, "facts_hint", None)
            if facts_hint is not None and (hints := facts_hint(arguments)):
                facts = {**facts, "hints": hints}
            redaction = Redaction.of(arguments, facts, rescan=False)  # (the facts were found in these arguments now)
            decision = self.policy.current.decide(call, facts, redaction=redaction)  # its reasons and facts masked
        except Exception as e:
            # The error may quote the arguments: log and record it masked (the traceback only at debug level).
            redaction = redaction or Redaction.guess(arguments)
            log.error("classification or policy failed for %s: %s", tool.name, redaction.conceal(f"{type(e).__name__}: {e}"))
            log.debug("classification or policy traceback", exc_info=True)
            return await self._refuse(call, redaction, "error", f"denied: keyturn could not evaluate this call ({e})")

        try:
            if decision.outcome == "deny":
                return await self._deny(call, redaction.arguments, decision)
            if decision.outcome == "allow":
                # Once recorded, the call runs to a terminal event even if the client goes away.
                with anyio.CancelScope(shield=True):
                    await self._open(call, redaction.arguments, decision, state="allowed")
                    return await self._run(tool, call, decision, progress, redaction)
            return await self._hold(tool, call, redaction, decision, progress, gone)
        except LedgerError as e:
            log.error("ledger failure on %s: %s", call.call_id, e)
            return error_result(f"keyturn could not record this call, so it did not run: {e}", outcome="error")

    # -- the branches --------------------------------------------------------------------------

    def _decision_payload(self, decision: Decision, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "outcome": decision.outcome, "risk": decision.risk, "reason": decision.reason,
            "rules": rules if rules is not None else _rules(decision), "policy_digest": decision.policy_digest,
            "facts": compact_facts(decision.facts),  # only what differs from the defaults: a replay restores them
            "review": decision.review.model_dump() if decision.review else None,
        }

    def _received_payload(self, call: ToolCall, redacted: dict[str, Any]) -> dict[str, Any]:
        return {
            "tool": call.tool, "arguments": redacted, "args_hash": call.args_hash, "principal": call.principal,
            "on_behalf_of": call.on_behalf_of, "model": call.model, "client": call.client, "session": call.session,
        }

    async def _open(
        self, call: ToolCall, redacted: dict[str, Any], decision: Decision, *, state: str,
        extra: list[tuple[str, dict[str, Any]]] | None = None, expires: float | None = None,
        finish: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        rules = _rules(decision)
        await self.ledger.open_call(
            call_id=call.call_id, tool=call.tool, principal=call.principal, on_behalf_of=call.on_behalf_of,
            model=call.model, args_hash=call.args_hash, redacted_arguments=redacted, state=state,
            holder=self.broker.instance_id, risk=decision.risk, reason=decision.reason,
            rules=rules, review=decision.review, policy_digest=decision.policy_digest, expires=expires,
            events=[("call.received", self._received_payload(call, redacted)),
                    ("decision", self._decision_payload(decision, rules)), *(extra or [])],
            finish=finish,
        )

    async def _refuse(self, call: ToolCall, redaction: Redaction, code: str, message: str) -> types.CallToolResult:
        # Arguments that could not be classified are not stored, only their hash; the message may quote them.
        message = redaction.conceal(message)
        end = OUTCOMES["refused" if code == "error" else "invalid"]
        try:
            await self.ledger.open_call(
                call_id=call.call_id, tool=call.tool, principal=call.principal, on_behalf_of=call.on_behalf_of,
                model=call.model, args_hash=call.args_hash, redacted_arguments={"«unclassified»": True},
                state="received", holder=self.broker.instance_id, outcome_reason=message,
                events=[("call.received", self._received_payload(call, {"«unclassified»": True}))],
                finish=(end.name, {"by": "keyturn", "code": code, "reason": message}),
            )
        except LedgerError as e:
            log.error("ledger failure while refusing %s: %s", call.call_id, e)
        return error_result(message, outcome=end.label, code=code, call_id=call.call_id)

    async def _deny(self, call: ToolCall, redacted: dict[str, Any], decision: Decision) -> types.CallToolResult:
        why = describe_rules(decision)
        end = OUTCOMES["denied_by_policy"]
        await self._open(call, redacted, decision, state="received",
                         finish=(end.name, {"by": "policy", "rules": [r.id for r in decision.rules], "reason": why}))
        return error_result(f"Denied by policy: {why}", outcome=end.label, by="policy", call_id=call.call_id,
                            rules=[r.id for r in decision.rules], risk=decision.risk)

    async def _run(
        self, tool: Runnable, call: ToolCall, decision: Decision, progress: ProgressFn | None = None,
        redaction: Redaction | None = None,
    ) -> types.CallToolResult:
        token = tool_progress.set(progress)
        try:
            # What the decision relied on is enforced by the run: a call judged read-only runs read-only.
            with running_under(limits_from_facts(decision.facts)):
                result = await tool.run(call.arguments)
        except Exception as e:
            # A tool's error can quote its arguments (a driver's "no such column: <secret>"): masked like them.
            conceal = (redaction or Redaction.guess(call.arguments)).conceal
            return await self._failed(call.call_id, conceal(f"{type(e).__name__}: {e}"), f"the tool failed: {conceal(str(e))}")
        finally:
            tool_progress.reset(token)
        try:
            kind = "failed" if result.is_error else "executed"
            result_json = canonical_json(result.model_dump(mode="json", by_alias=True, exclude_none=True))
            payload = {"result_digest": sha256_hex(result_json), "is_error": bool(result.is_error)}
        except Exception as e:
            # Not a result keyturn can record (nor, so, return): the run still ends in one terminal event.
            reason = f"the tool's result could not be recorded ({type(e).__name__})"
            log.error("%s: %s", call.call_id, reason)
            return await self._failed(call.call_id, reason, f"the tool ran, but {reason}, so it is withheld")
        if decision.outcome == "review" and not (result.meta or {}).get(SECRET_RESULT_META):
            # Kept for a retry in case this caller cannot receive it (it gave up without a word); a secret is not.
            try:
                await self.broker.keep_result(call.call_id, result_json, (await self._expiry(call.call_id)))
            except LedgerError as e:
                log.warning("could not keep the result of %s for a retry: %s", call.call_id, e)
        if not await self._record_outcome(call.call_id, kind, payload, None):
            return self._unrecorded_result(call.call_id)
        if decision.outcome == "review" and self.broker.notifiers:  # only a reviewed call has messages to update
            try:
                event = (await self.ledger.events(call.call_id))[-1]
                await self.broker.announce_change(call.call_id, event)
            except LedgerError as e:  # the outcome is recorded: a message update must not change what the agent gets
                log.warning("could not announce the outcome of %s: %s", call.call_id, e)
        return result

    async def _failed(self, call_id: str, reason: str, message: str) -> types.CallToolResult:
        """End a run that did not give a result to return: recorded `failed` with `reason`; the agent gets `message`."""
        if not await self._record_outcome(call_id, "failed", {"error": reason}, reason):
            return self._unrecorded_result(call_id)
        return error_result(message, outcome=OUTCOMES["failed"].label, call_id=call_id)

    async def _record_outcome(self, call_id: str, kind: str, payload: dict[str, Any], reason: str | None) -> bool:
        """Record a run's terminal event. When the ledger cannot take it, keep it for `record_pending_outcomes`
        (the tool did run: its outcome must still reach the ledger once the ledger recovers) and return False."""
        try:
            await self.ledger.finish(call_id, kind, payload, reason=reason)
        except LedgerError as e:
            log.error("the tool ran but its outcome could not be recorded for %s (kept to retry): %s", call_id, e)
            self._unrecorded[call_id] = (kind, payload, reason, str(e))
            return False
        return True

    def _unrecorded_result(self, call_id: str) -> types.CallToolResult:
        error = self._unrecorded[call_id][3]
        return error_result(
            f"The tool ran, but keyturn could not record its outcome ({error}), so its result is withheld. "
            "Do not repeat the call: it has run. keyturn records the outcome as soon as its ledger is writable again.",
            outcome="unrecorded", call_id=call_id)

    async def record_pending_outcomes(self) -> int:
        """Record the outcomes of runs the ledger could not take at the time; returns how many are still waiting."""
        for call_id, (kind, payload, reason, _) in list(self._unrecorded.items()):
            try:
                await self.ledger.finish(call_id, kind, payload, reason=reason)
            except LedgerError:
                break  # still failing: try again at the next round
            del self._unrecorded[call_id]
        return len(self._unrecorded)

    async def _expiry(self, request_id: str) -> float | None:
        view = await self.ledger.get_call(request_id)
        return view.expires if view is not None else None

    async def _hold(
        self, tool: Runnable, call: ToolCall, redaction: Redaction, decision: Decision,
        progress: ProgressFn | None, gone: anyio.Event | None = None,
    ) -> types.CallToolResult:
        assert decision.review is not None
        # The same call again while its request lives: rejoin it in whatever state it is (approvals own this).
        rejoined = await self.broker.rejoin(call.principal, call.tool, call.args_hash, decision.policy_digest,
                                            self.broker.instance_id)
        if rejoined is not None:
            request_id = rejoined.id
            if rejoined.state in ("running", "executed", "failed"):
                return await self._outcome_for_retry(request_id, call, progress, gone)
        else:
            request_id = call.call_id
            expires = time.time() + decision.review.timeout_s
            await self._open(call, redaction.arguments, decision, state="pending", expires=expires,
                             extra=[("approval.requested", {"review": decision.review.model_dump(),
                                                            "expires": expires})])
            view = await self.ledger.get_call(request_id)
            assert view is not None
            await self.broker.announce(view)
            del view  # not kept while the call waits (see `_wait`)

        found = await self._wait_for_caller(request_id, ("pending",), progress, gone)
        if found is None:
            return self._left_result(request_id)
        view = found
        if view.state == "approved":
            with anyio.CancelScope(shield=True):
                # The tables said approved; only the chain can say so. A state flipped or a vote forged behind
                # keyturn's back runs nothing, and is recorded as a refusal.
                problem = await prove_approval(self.ledger, request_id, args_hash=call.args_hash,
                                               policy_digest=decision.policy_digest, directory=self.broker.directory)
                if problem is not None:
                    return await self._unproven(request_id, problem)
                # One conditional write: exactly one process (and one waiting call) wins the approval.
                claimed = await self.ledger.transition(
                    request_id, ("approved",), "running", "execution.started",
                    {"holder": self.broker.instance_id, "args_hash": call.args_hash}, holder=self.broker.instance_id,
                )
                if claimed:
                    run_call = call.model_copy(update={"call_id": request_id})
                    return await self._run(tool, run_call, decision, progress, redaction)
            # Another waiter (a retry, or another process) won it: this caller gets that run's outcome.
            return await self._outcome_for_retry(request_id, call, progress, gone)
        return self._closed_result(view)

    async def _unproven(self, request_id: str, problem: str) -> types.CallToolResult:
        log.error("request %s is approved in the ledger's tables but not by its chain: %s", request_id, problem)
        reason = f"the approval is not proven by the ledger's chain ({problem}); it did not run"
        await self.ledger.finish(request_id, "unproven",
                                 {"by": "keyturn", "code": "approval_not_proven", "reason": reason}, reason=reason)
        return error_result(f"Request {request_id} was refused: {reason}.", outcome=OUTCOMES["unproven"].label,
                            code="approval_not_proven", request_id=request_id)

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

    @staticmethod
    def _left_result(request_id: str) -> types.CallToolResult:
        # Nobody receives this (the caller is gone); it says what the ledger says.
        return error_result(f"Request {request_id} is still open: call again with the same arguments to rejoin it.",
                            outcome="left", request_id=request_id)

    async def _outcome_for_retry(
        self, request_id: str, call: ToolCall, progress: ProgressFn | None, gone: anyio.Event | None,
    ) -> types.CallToolResult:
        """A retry of a request that another caller is running or has run: its outcome, never a second run."""
        found = await self._wait_for_caller(request_id, ("approved", "running"), progress, gone)
        if found is None:
            return self._left_result(request_id)
        if found.state not in ("executed", "failed"):
            return self._closed_result(found)
        delivery = await self.broker.deliver(request_id, call.principal)
        if delivery is None:
            return self._closed_result(found)
        if delivery.result_json is not None:
            return types.CallToolResult.model_validate_json(delivery.result_json)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(delivery.ran_at))
        how = "and failed" + (f": {delivery.reason}" if delivery.reason else "") if delivery.kind == "failed" else ""
        return error_result(
            f"Request {request_id} was approved and ran at {when} {how}".rstrip() + ". Its result is not kept "
            "(it may carry a secret, or its time has passed); it was not run again.",
            outcome="already_executed" if delivery.kind == "executed" else "failed", request_id=request_id,
            ran_at=delivery.ran_at)

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
                    await progress(time.monotonic() - started, None, self._waiting_message(view))
                remaining = (view.expires - now) if view.expires is not None else self.progress_interval_s
                if view.state == "running":
                    remaining = self.progress_interval_s  # a run ends when the tool returns, not at the expiry
                del view  # read again on waking: not kept while waiting, it is a fifth of a held call's memory
                await self.broker.wait_for_change(request_id, min(self.progress_interval_s, remaining), gone)

    @staticmethod
    def _waiting_message(view: RequestView) -> str:
        spec = view.review
        needs = "; ".join(f"{g.quorum} from {', '.join(g.members) or 'any reviewer'}" for g in spec.groups) if spec else ""
        approvals = sum(1 for v in view.votes if v["verdict"] == "approve")
        left = int(view.expires - time.time()) if view.expires else 0
        if view.state != "pending":
            return f"keyturn request {view.id}: {view.tool} was approved and is being run; waiting for its result"
        return (f"keyturn request {view.id}: waiting for human approval of {view.tool} "
                f"({approvals} approval(s) so far; needs {needs}; expires in {left}s)")

    @staticmethod
    def _closed_result(view: RequestView) -> types.CallToolResult:
        if view.state == "denied":
            deny = next((v for v in reversed(view.votes) if v["verdict"] == "deny"), None)
            who = deny["person"] if deny else "keyturn"
            return error_result(f"Denied by reviewer {who}: {deny['reason'] if deny else view.outcome_reason}",
                                outcome="denied", by="reviewer", request_id=view.id, reviewer=who,
                                reason=deny["reason"] if deny else view.outcome_reason)
        if view.state == "expired":
            return error_result(f"Request {view.id} expired: no reviewer decided in time; it did not run.",
                                outcome="expired", request_id=view.id)
        if view.state == "executed":
            return error_result(f"Request {view.id} was already run once; an approval runs exactly once. "
                                "Call again to ask for a new approval.", outcome="already_executed", request_id=view.id)
        return error_result(f"Request {view.id} is {view.state}: {view.outcome_reason or ''}".strip(),
                            outcome=view.state, request_id=view.id)
