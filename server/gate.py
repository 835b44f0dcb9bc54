"""The spine: classify -> decide -> hold -> act -> record, for every guarded tool call.

`Gate.call` is the whole path of one call in one place. Any error before the tool runs ends the
call without running it (fail closed); every call ends in exactly one terminal ledger event. Holding a call while
humans decide is the approvals' (`server.approvals.holding`); what the agent reads of an end is in
`server.outcomes`; what the ledger keeps of a call is in `server.records`.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Mapping
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import InitVar, dataclass, field, replace
from typing import Any, Protocol

import anyio
import mcp_types as types

from server.approvals import ApprovalBroker
from server.approvals.edits import ChainedEdit, EditRefused, ProposedEdit, arguments_diff, edit_note, has_masked
from server.approvals.grants import find_cover, grant_note, use_grant
from server.approvals.holding import Holding, ProgressFn
from server.cancelling import CallerCancel, unwatched, watching_cancel
from server.canonical import args_hash, canonical_json, sha256_hex
from server.classify import ClassifyContext, Redaction, extract_facts
from server.classify.impact import with_measured
from server.errors import InvalidArguments, LedgerError
from server.execution import limits_from_facts, running_under
from server.guarded import SECRET_RESULT_META
from server.ledger import Store
from server.logs import current_call
from server.models import Decision, RequestView, ToolCall
from server.outcomes import OUTCOMES, REFUSALS, error_result, unrecorded_result
from server.policy import LivePolicy
from server.records import UNCLASSIFIED, describe_rules, impact_record, open_call
from server.tracing import span

__all__ = ["Gate", "Identity", "ProgressFn", "Runnable", "error_result", "result_digest", "tool_progress"]

log = logging.getLogger(__name__)

CANCELLED_WHILE_RUNNING = ("the caller cancelled the call while it ran; the tool was told to stop, and it may or "
                           "may not have acted")
CANCELLED_NOT_STOPPED = ("the caller cancelled the call while it ran; the tool cannot be stopped mid-run, so it ran "
                         "to its end, and its result was not delivered to that caller")

tool_progress: ContextVar[ProgressFn | None] = ContextVar("keyturn_tool_progress", default=None)
"""While the gate runs a tool: the caller's progress channel, for the tool's own progress (an upstream server's,
in proxy mode). A context variable, so `Runnable.run` keeps its one argument."""


class Runnable(Protocol):
    """What the gate guards: a native GuardedTool or an upstream server's tool. A runnable with a true
    `interruptible` attribute (an upstream's tool) is stopped when its caller cancels it while it runs; any other
    runs to its end (see `server.cancelling`)."""

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


def result_digest(result: types.CallToolResult) -> str:
    return sha256_hex(canonical_json(result.model_dump(mode="json", by_alias=True, exclude_none=True)))


@dataclass(frozen=True)
class Refusal:
    """A call refused before any decision: its code (an outcome of `server.outcomes.REFUSALS`), the reason (masked
    with the call's redaction), and what the ledger keeps of its arguments (None: only their hash, when they could
    not be judged)."""

    code: str
    message: str
    redaction: Redaction
    arguments: dict[str, Any] | None = None


@dataclass
class Gate:
    ledger: Store
    broker: ApprovalBroker
    policy: LivePolicy
    classify_context: ClassifyContext
    progress_interval_s: InitVar[float] = 10.0
    """How often a held call reports progress while it waits (the holding's; not kept here)."""
    holding: Holding = field(init=False)
    _unrecorded: dict[str, tuple[str, dict[str, Any], str | None, str]] = field(default_factory=dict)
    """Runs whose terminal event the ledger refused: call id -> (kind, payload, outcome reason, error)."""

    def __post_init__(self, progress_interval_s: float) -> None:
        self.holding = Holding(self.ledger, self.broker, progress_interval_s)

    async def call(
        self, tool: Runnable, arguments: dict[str, Any], who: Identity, progress: ProgressFn | None = None,
        gone: anyio.Event | None = None,
    ) -> types.CallToolResult:
        """`gone`, when the transport can tell: set once the caller's connection for this call has closed. A held
        call then stops waiting (its request stays open for the caller's retry) instead of running for nobody."""
        call, refusal = self._check(tool, arguments, who)
        current_call.set(call.call_id)  # every log line from here on names the call
        judged = refusal or await self._classify_and_decide(tool, call)
        if log.isEnabledFor(logging.INFO):
            log.info("%s from %s: %s", tool.name, who.principal,
                     "refused" if isinstance(judged, Refusal) else f"{judged[0].outcome} ({judged[0].risk})")
        if isinstance(judged, Refusal):
            return await self._refuse(call, judged)
        decision, redaction = judged
        try:
            if decision.outcome == "deny":
                return await self._deny(call, redaction, decision)
            # The caller's cancel is watched outside the shields below when there is something to stop: the run's
            # progress, and an interruptible run (an upstream's), which still ends in its one terminal event. (The
            # watch is a task per call: a call with neither is not watched, and runs as before.)
            watched = progress is not None or getattr(tool, "interruptible", False)
            async with watching_cancel() if watched else unwatched() as caller:
                act = functools.partial(self._act, tool, decision=decision, progress=progress, redaction=redaction,
                                        caller=caller)
                if decision.outcome == "allow":
                    with anyio.CancelScope(shield=True):  # once recorded, the call runs to a terminal event
                        with span("record", call.call_id, tool.name, event="call.received"):
                            await open_call(self.ledger, call, redaction.arguments, decision, state="allowed",
                                            holder=self.broker.instance_id)
                        return await act(call)
                if (cover := await find_cover(self.ledger, call, decision)) is not None:
                    # A live standing grant covers it: its use is taken and the call recorded before it runs, at once.
                    with anyio.CancelScope(shield=True):
                        used = await use_grant(self.ledger, cover, call, redaction.arguments, decision,
                                               self.broker.instance_id, self.broker.directory)
                        if used is not None:
                            ran = await act(call, decision=decision.model_copy(update={"outcome": "allow"}))
                            return grant_note(ran, used)
                with span("hold", call.call_id, tool.name):
                    return await self.holding.hold(call, redaction, decision, act, progress, gone)
        except LedgerError as e:
            log.error("ledger failure on %s: %s", call.call_id, e)
            # The cause, not where the ledger lives (its path, its database's address): that is the log's.
            return error_result(f"keyturn could not record this call, so it did not run: {e.public}",
                                outcome="error", call_id=call.call_id)

    # -- the steps -------------------------------------------------------------------------------

    def _check(self, tool: Runnable, arguments: dict[str, Any], who: Identity) -> tuple[ToolCall, Refusal | None]:
        """The tool's own validation normalises the arguments: what is hashed, classified, approved and run."""
        refusal = None
        try:
            arguments = tool.validate(arguments)
            digest = args_hash(arguments)
        except InvalidArguments as e:
            digest, refusal = "", Refusal("invalid_arguments", f"invalid arguments: {e}", Redaction.guess(arguments))
        except (TypeError, ValueError):
            digest, refusal = "", Refusal("invalid_arguments", "invalid arguments: they must be plain JSON "
                                          "(no NaN or Infinity)", Redaction.guess(arguments))
        except Exception as e:
            # A tool's check that broke its contract (it may raise only InvalidArguments): the call cannot be
            # checked, so it is denied, and recorded like any other refusal. The error may quote the arguments.
            redaction = Redaction.guess(arguments)
            log.error("checking the arguments of %s failed: %s", tool.name, redaction.conceal(f"{type(e).__name__}: {e}"))
            log.debug("argument check traceback", exc_info=True)
            digest, refusal = "", Refusal(
                "error", f"keyturn could not check this call's arguments ({type(e).__name__})", redaction)
        # Built from values this process made or validated just now (not validated again: this runs for every call).
        call = ToolCall.model_construct(
            call_id=uuid.uuid4().hex, tool=tool.name, arguments=arguments, args_hash=digest,
            principal=who.principal, on_behalf_of=who.on_behalf_of, model=who.model, client=who.client,
            session=who.session, annotations=tool.annotations,
        )
        return call, refusal

    async def _classify_and_decide(self, tool: Runnable, call: ToolCall) -> tuple[Decision, Redaction] | Refusal:
        """Facts from the arguments, one redaction from the facts, what the tool will refuse (its own word, before
        the policy: a call that can never succeed goes to nobody), the policy's decision: any failure is a denial,
        never a pass."""
        arguments, redaction = call.arguments, None
        try:
            context = self.classify_context
            roots = getattr(tool, "roots", ())
            if roots:
                context = replace(context, roots=tuple(roots))
            with span("classify", call.call_id, tool.name):
                facts = extract_facts(tool.name, arguments, tool.classifiers, tool.annotations, context)
                facts_hint = getattr(tool, "facts_hint", None)
                if facts_hint is not None and (hints := facts_hint(arguments)):
                    facts = {**facts, "hints": hints}
                redaction = Redaction.of(arguments, facts, rescan=False)  # (the facts were found in these now)
                assess = getattr(tool, "assess", None)  # a native tool's own word: what it refuses, what it touches
                if assess is not None:
                    reason, measured = await assess(arguments)
                    if reason:
                        return Refusal("tool_refuses", f"{tool.name} would refuse it: {reason}", redaction,
                                       redaction.arguments)
                    if measured:
                        facts = with_measured(facts, measured)
            with span("decide", call.call_id, tool.name) as step:
                decision = self.policy.current.decide(call, facts, redaction=redaction)  # reasons, facts masked
                step.set_attributes({"keyturn.outcome": decision.outcome, "keyturn.risk": decision.risk or ""})
            return decision, redaction
        except Exception as e:
            # The error may quote the arguments: log and record it masked (the traceback only at debug level).
            redaction = redaction or Redaction.guess(arguments)
            log.error("classification or policy failed for %s: %s", tool.name, redaction.conceal(f"{type(e).__name__}: {e}"))
            log.debug("classification or policy traceback", exc_info=True)
            return Refusal("error", f"keyturn could not evaluate this call ({e})", redaction)

    async def _refuse(self, call: ToolCall, refusal: Refusal) -> types.CallToolResult:
        # Arguments that could not be judged are not stored, only their hash; the message may quote them.
        message = refusal.redaction.conceal(refusal.message)
        end = OUTCOMES[REFUSALS[refusal.code]]
        stored = refusal.arguments if refusal.arguments is not None else UNCLASSIFIED
        try:
            await open_call(self.ledger, call, stored, None, state="received", holder=self.broker.instance_id,
                            outcome_reason=message,
                            finish=(end.name, {"by": "keyturn", "code": refusal.code, "reason": message}))
        except LedgerError as e:
            log.error("ledger failure while refusing %s: %s", call.call_id, e)
        return error_result(f"Denied by keyturn: {message}", outcome=end.label, by="keyturn", code=refusal.code,
                            call_id=call.call_id, reason=message)

    async def _deny(self, call: ToolCall, redaction: Redaction, decision: Decision) -> types.CallToolResult:
        why = describe_rules(decision)
        end = OUTCOMES["denied_by_policy"]
        rules = [r.id for r in decision.rules]
        await open_call(self.ledger, call, redaction.arguments, decision, state="received",
                        holder=self.broker.instance_id,
                        finish=(end.name, {"by": "policy", "rules": rules, "reason": why}))
        return error_result(f"Denied by policy: {why}", outcome=end.label, by="policy", call_id=call.call_id,
                            rules=rules, risk=decision.risk)

    async def judge_edit(self, tool: Runnable, view: RequestView,
                         arguments: dict[str, Any]) -> ProposedEdit | EditRefused:
        """A reviewer's changed arguments for the held request `view`, judged like the agent's own call would be
        (the tool's validation, the classifiers, the live policy), as the same principal; or why not."""
        if has_masked(view.arguments):
            return EditRefused("masked_values", "this call's arguments hold values keyturn masks, so they cannot be "
                                                "edited; deny it with guidance instead")
        who = Identity(view.principal, view.on_behalf_of, view.model)
        call, refusal = self._check(tool, arguments, who)
        if refusal is not None:
            return EditRefused("invalid_arguments", f"the edited call was refused: {refusal.message}")
        judged = await self._classify_and_decide(tool, call)
        if isinstance(judged, Refusal):
            return EditRefused("invalid_arguments", f"the edited call was refused: {judged.message}")
        decision, redaction = judged
        if redaction.values or has_masked(redaction.arguments):
            return EditRefused("masked_values", "an edit cannot bring values keyturn masks as secrets")
        if decision.outcome == "deny":
            return EditRefused("denied_by_policy", f"the edited call is denied by policy: {describe_rules(decision)}")
        return ProposedEdit(call.arguments, call.args_hash, decision, arguments_diff(view.arguments, call.arguments))

    async def _edited_limits(self, tool: Runnable, call: ToolCall, decision: Decision) -> Decision | str:
        """The decision to run an edited call under: its own facts (a call edited to a write does not run under the
        read-only limits of the original, nor the other way round), judged again here; or why it cannot run."""
        checked, refusal = self._check(tool, dict(call.arguments), Identity(call.principal, call.on_behalf_of,
                                                                             call.model))
        if refusal is not None or checked.args_hash != call.args_hash:
            return "the edited arguments no longer check as they did when approved"
        judged = await self._classify_and_decide(tool, checked)
        if isinstance(judged, Refusal) or judged[0].outcome == "deny":
            return "the edited call cannot be judged again as it was when approved"
        return decision.model_copy(update={"facts": judged[0].facts})

    async def _act(
        self, tool: Runnable, call: ToolCall, *, decision: Decision, progress: ProgressFn | None = None,
        redaction: Redaction | None = None, caller: CallerCancel | None = None, edit: ChainedEdit | None = None,
    ) -> types.CallToolResult:
        """Run the call under what its decision relied on, and record its one outcome before returning it.
        `caller` tells of the caller's cancel (see `server.cancelling`); `edit`, when a reviewer changed the
        arguments (`call` carries the edited ones): the result then says so."""
        if edit is not None:
            limits = await self._edited_limits(tool, call, decision)
            if isinstance(limits, str):
                return await self._failed(call.call_id, limits, f"the edited call did not run: {limits}")
            decision = limits
        caller = caller if caller is not None else CallerCancel()
        token = tool_progress.set(caller.muted(progress))
        stoppable = caller.interruptible() if getattr(tool, "interruptible", False) else nullcontext()
        try:
            # What the decision relied on is enforced by the run: a call judged read-only runs read-only.
            with running_under(limits_from_facts(decision.facts)) as report, stoppable as run, \
                    span("run", call.call_id, tool.name):
                result = await tool.run(call.arguments)
            if edit is not None:
                result = edit_note(result, edit)
        except Exception as e:
            # A tool's error can quote its arguments (a driver's "no such column: <secret>"): masked like them.
            conceal = (redaction or Redaction.guess(call.arguments)).conceal
            edited = f" (it ran as reviewer {edit.person} edited it: {edit.reason})" if edit is not None else ""
            return await self._failed(call.call_id, conceal(f"{type(e).__name__}: {e}"),
                                      f"the tool failed{edited}: {conceal(str(e))}")
        finally:
            tool_progress.reset(token)
        if run is not None and run.cancelled_caught:
            return await self._failed(call.call_id, CANCELLED_WHILE_RUNNING, f"cancelled: {CANCELLED_WHILE_RUNNING}",
                                      cancelled_by="caller")
        try:
            kind = "failed" if result.is_error else "executed"
            result_json = canonical_json(result.model_dump(mode="json", by_alias=True, exclude_none=True))
            payload: dict[str, Any] = {"result_digest": sha256_hex(result_json), "is_error": bool(result.is_error)}
            payload.update(impact_record(decision.facts, report.rows))  # the real count beside the estimate
            if caller.cancelled:  # a run that cannot be stopped ran to its end; nobody receives its result
                payload["note"] = CANCELLED_NOT_STOPPED
        except Exception as e:
            # Not a result keyturn can record (nor, so, return): the run still ends in one terminal event.
            reason = f"the tool's result could not be recorded ({type(e).__name__})"
            log.error("%s: %s", call.call_id, reason)
            return await self._failed(call.call_id, reason, f"the tool ran, but {reason}, so it is withheld")
        if decision.outcome == "review" and not (result.meta or {}).get(SECRET_RESULT_META):
            # Kept for a retry in case this caller cannot receive it (it gave up without a word); a secret is not.
            try:
                await self.broker.kept.keep(call.call_id, result_json, (await self._expiry(call.call_id)))
            except LedgerError as e:
                log.warning("could not keep the result of %s for a retry: %s", call.call_id, e)
        with span("record", call.call_id, tool.name, event=kind):
            recorded = await self._record_outcome(call.call_id, kind, payload, None)
        if not recorded:
            return self._unrecorded_result(call.call_id)
        if decision.outcome == "review":  # only a reviewed call has messages to update
            try:
                await self.broker.announce_change(call.call_id)
            except LedgerError as e:  # the outcome is recorded: a message update must not change what the agent gets
                log.warning("could not announce the outcome of %s: %s", call.call_id, e)
        return result

    async def _failed(self, call_id: str, reason: str, message: str, **extra: Any) -> types.CallToolResult:
        """End a run that did not give a result to return: recorded `failed` with `reason` (and `extra`); the agent
        gets `message`."""
        if not await self._record_outcome(call_id, "failed", {"error": reason, **extra}, reason):
            return self._unrecorded_result(call_id)
        return error_result(message, outcome=OUTCOMES["failed"].label, call_id=call_id)

    async def _record_outcome(self, call_id: str, kind: str, payload: dict[str, Any], reason: str | None) -> bool:
        """Record a run's terminal event. When the ledger cannot take it, keep it for `record_pending_outcomes`
        (the tool did run: its outcome must still reach the ledger once the ledger recovers) and return False."""
        try:
            await self.ledger.finish(call_id, kind, payload, reason=reason)
        except LedgerError as e:
            log.error("the tool ran but its outcome could not be recorded for %s (kept to retry): %s", call_id, e)
            self._unrecorded[call_id] = (kind, payload, reason, e.public)
            return False
        return True

    def _unrecorded_result(self, call_id: str) -> types.CallToolResult:
        return unrecorded_result(call_id, self._unrecorded[call_id][3])

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
