"""The approvals broker's rules: distinct people fill quorum slots, AND across groups, membership by group."""

from __future__ import annotations

from server.approvals import ReviewerDirectory, quorum_met
from server.models import ApproverGroup, ReviewSpec

DIRECTORY = ReviewerDirectory(
    identities={"api:alice": "alice", "api:carol": "carol", "api:sam": "sam", "api:both": "both"},
    groups_of={"alice": frozenset({"dba"}), "carol": frozenset({"dba"}), "sam": frozenset({"security"}),
               "both": frozenset({"dba", "security"})},
)


def spec(*groups: ApproverGroup) -> ReviewSpec:
    return ReviewSpec(groups=groups)


def test_any_reviewer_quorum_of_one() -> None:
    assert quorum_met(spec(ApproverGroup(name="any")), ["sam"], DIRECTORY)
    assert not quorum_met(spec(ApproverGroup(name="any")), [], DIRECTORY)


def test_two_of_a_group_needs_two_distinct_members() -> None:
    two_dbas = spec(ApproverGroup(name="dba", members=("group:dba",), quorum=2))
    assert not quorum_met(two_dbas, ["alice"], DIRECTORY)
    assert not quorum_met(two_dbas, ["alice", "alice"], DIRECTORY)
    assert not quorum_met(two_dbas, ["alice", "sam"], DIRECTORY)
    assert quorum_met(two_dbas, ["alice", "carol"], DIRECTORY)


def test_and_across_groups_one_person_fills_one_slot() -> None:
    dba_and_security = spec(ApproverGroup(name="dba", members=("group:dba",)),
                            ApproverGroup(name="security", members=("group:security",)))
    assert not quorum_met(dba_and_security, ["both"], DIRECTORY)
    assert quorum_met(dba_and_security, ["both", "alice"], DIRECTORY)  # both fills security, alice dba
    assert quorum_met(dba_and_security, ["alice", "both"], DIRECTORY)  # order does not matter
    assert not quorum_met(dba_and_security, ["alice", "carol"], DIRECTORY)


def test_named_people() -> None:
    named = spec(ApproverGroup(name="leads", members=("carol",)))
    assert not quorum_met(named, ["alice"], DIRECTORY)
    assert quorum_met(named, ["carol"], DIRECTORY)


def test_separate_rules_are_separate_requirements_that_may_share_approvers() -> None:
    # rule r0: any one reviewer; rule r1: two DBAs. Two DBAs satisfy both rules.
    both_rules = spec(ApproverGroup(name="any", requirement="r0"),
                      ApproverGroup(name="dba", members=("group:dba",), quorum=2, requirement="r1"))
    assert quorum_met(both_rules, ["alice", "carol"], DIRECTORY)
    assert not quorum_met(both_rules, ["alice", "sam"], DIRECTORY)
    assert not quorum_met(both_rules, ["sam"], DIRECTORY)
