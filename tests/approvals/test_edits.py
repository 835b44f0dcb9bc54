"""Edit, then approve, at the approvals' level: the review an edited call needs (never less than either call's),
the difference the agent is shown, and the chain's proof of an edited approval, which a changed edit, an edit by
the requester or votes cast before the edit cannot satisfy."""

from __future__ import annotations

from server.approvals.edits import (
    EditRefused,
    ProposedEdit,
    arguments_diff,
    chained_edit,
    combined_review,
)
from server.approvals.proof import approval_problem
from server.canonical import args_hash
from server.gate import Gate
from server.ledger import Ledger
from server.models import ApproverGroup, Decision, Event, ReviewSpec, Verdict
from tests.helpers import held_call
from tests.test_gate import AGENT, Runs, world  # noqa: F401 (a fixture)

ANY_ONE = ReviewSpec(groups=(ApproverGroup(name="reviewers", quorum=1, requirement="writes"),), timeout_s=600)


def decision(outcome: str, review: ReviewSpec | None = None) -> Decision:
    return Decision(outcome=outcome, risk="high", reason="r", review=review, policy_digest="p")  # type: ignore[arg-type]


def test_an_edited_call_needs_what_the_original_needed_and_what_it_needs_itself() -> None:
    # An edit the policy would allow at once still needs the original's review: an edit never lowers the bar.
    assert combined_review(ANY_ONE, decision("allow")) == ANY_ONE
    two_dbas = ReviewSpec(groups=(ApproverGroup(name="dba", members=("group:dba",), quorum=2, requirement="payroll"),),
                          timeout_s=300, require_reason=True, channels=("slack:#dba",))
    both = combined_review(ANY_ONE, decision("review", two_dbas))
    assert [(g.name, g.quorum, g.requirement) for g in both.groups] == [
        ("reviewers", 1, "writes"), ("dba", 2, "edited:payroll")]
    assert both.require_reason and both.timeout_s == 300 and both.channels == ("slack:#dba",)
    # What the original's groups already cover is not asked twice.
    assert combined_review(ANY_ONE, decision("review", ANY_ONE)).groups == ANY_ONE.groups


def test_the_difference_is_field_by_field() -> None:
    before = {"statement": "DELETE FROM t", "opts": {"limit": 5, "dry": True}, "gone": 1}
    after = {"statement": "DELETE FROM t WHERE id = 1", "opts": {"limit": 5, "dry": 1}, "new/key": [1]}
    assert arguments_diff(before, after) == [
        {"path": "/statement", "change": "changed", "before": "DELETE FROM t", "after": "DELETE FROM t WHERE id = 1"},
        {"path": "/opts/dry", "change": "changed", "before": True, "after": 1},  # true is not 1
        {"path": "/gone", "change": "removed", "before": 1},
        {"path": "/new~1key", "change": "added", "after": [1]},
    ]
    assert arguments_diff(before, before) == []


async def edited_request(gate: Gate, runs: Runs, ledger: Ledger) -> tuple[str, list[Event]]:
    """A real held call, edited and approved through the broker; its chained events up to the approval."""
    tool = gate.tools["write_thing"]  # type: ignore[attr-defined]
    async with held_call(gate, tool, {"key": "everything"}, AGENT) as call:
        request = await call.request()
        refused = await gate.judge_edit(tool, request, {"key": "everything", "extra": 1})
        assert isinstance(refused, EditRefused) and refused.code == "invalid_arguments"  # the tool's schema
        edit = await gate.judge_edit(tool, request, {"key": "one"})
        assert isinstance(edit, ProposedEdit)
        silent = await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve"),
                                             edit)
        assert not silent.accepted and silent.code == "reason_required"  # an edit says why
        ok = await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve",
                                              reason="one key only"), edit)
        assert ok.accepted and ok.state == "approved", ok
        result = await call.result()
    assert not result.is_error and runs.count == 1
    assert "alice changed the arguments" in result.content[0].text  # type: ignore[union-attr]
    events, broken = await ledger.call_chain(request.id)
    assert broken is None
    upto = next(i for i, e in enumerate(events) if e.kind == "approval.granted")
    return request.id, events[: upto + 1]


def replaced(events: list[Event], kind: str, **payload: object) -> list[Event]:
    return [e.model_copy(update={"payload": {**e.payload, **payload}}) if e.kind == kind else e for e in events]


async def test_the_chain_proves_an_edited_approval_only_for_the_edited_arguments(
        world: tuple[Gate, Runs, Ledger]) -> None:  # noqa: F811
    gate, runs, ledger = world
    _, events = await edited_request(gate, runs, ledger)
    directory = gate.broker.directory
    digest = next(e for e in events if e.kind == "decision").payload["policy_digest"]
    edited, sent = args_hash({"key": "one"}), args_hash({"key": "everything"})

    def problem(evs: list[Event], hash_: str = edited) -> str | None:
        return approval_problem(evs, args_hash=hash_, policy_digest=digest, directory=directory)

    assert problem(events) is None
    assert problem(events, sent) is not None  # not for the arguments the agent sent
    edit = chained_edit(events)
    assert edit is not None and not isinstance(edit, str) and edit.arguments == {"key": "one"}
    # The edit's arguments changed in the chain without their hash: refused.
    assert "do not match its hash" in str(problem(replaced(events, "arguments.edited", arguments={"key": "all"})))
    # The edit said to be the requester's own.
    assert problem(replaced(events, "arguments.edited", person="agent", reviewer="agent")) is not None
    # Two edits.
    twice = [*events[:-1], next(e for e in events if e.kind == "arguments.edited"), events[-1]]
    assert "more than one" in str(problem(twice))
    # The editor's vote moved before the edit does not count toward the edited call.
    vote_at = next(i for i, e in enumerate(events) if e.kind == "vote")
    edit_at = next(i for i, e in enumerate(events) if e.kind == "arguments.edited")
    early = list(events)
    early[vote_at], early[edit_at] = (events[vote_at].model_copy(update={"seq": events[edit_at].seq}),
                                      events[edit_at].model_copy(update={"seq": events[vote_at].seq}))
    assert "do not reach the quorum" in str(problem(sorted(early, key=lambda e: e.seq)))
