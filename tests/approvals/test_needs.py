"""What a held request needs, as every channel says it: merged over the rules that asked, in distinct people."""

from __future__ import annotations

import random

from server.approvals.quorum import ReviewerDirectory, needs, unsatisfiable
from server.models import ApproverGroup, ReviewSpec
from server.policy import parse_policy
from server.policy.engine import combine_reviews

ANY = ApproverGroup(name="any")
DBA2 = ApproverGroup(name="dba", members=("group:dba",), quorum=2)
SEC = ApproverGroup(name="security", members=("group:security",))


def vote(person: str, *groups: str, verdict: str = "approve") -> dict[str, object]:
    return {"person": person, "verdict": verdict, "groups": list(groups)}


def test_two_rules_that_each_ask_one_approval_need_one_person() -> None:
    spec = combine_reviews([ReviewSpec(groups=(ANY,)), ReviewSpec(groups=(ANY,))])
    need = needs(spec)
    assert (need.approvals, need.needed, need.met) == (0, 1, False)
    assert need.requirement() == "1 approval from any reviewer"
    assert need.progress() == "0 of 1 approval"
    assert needs(spec, [vote("alice", "any")]).met  # one click reaches it, and the count said so


def test_a_write_and_a_mass_change_need_two_people_not_three() -> None:
    one = ApproverGroup(name="any", quorum=1)
    two = ApproverGroup(name="any", quorum=2)
    spec = combine_reviews([ReviewSpec(groups=(one,)), ReviewSpec(groups=(two,))])
    need = needs(spec)
    assert need.needed == 2 and need.requirement() == "2 approvals from any reviewer (different people)"
    assert [(line.who, line.need) for line in need.lines] == [("any reviewer", 2)]
    after_one = needs(spec, [vote("alice", "any")])
    assert (after_one.approvals, after_one.needed, after_one.met) == (1, 2, False)
    assert after_one.progress() == "1 of 2 approvals"
    assert needs(spec, [vote("alice", "any"), vote("bob", "any")]).met


def test_denials_and_repeated_people_do_not_count() -> None:
    spec = ReviewSpec(groups=(ApproverGroup(name="any", quorum=2),))
    need = needs(spec, [vote("alice", "any"), vote("alice", "any"), vote("bob", "any", verdict="deny")])
    assert (need.approvals, need.needed) == (1, 2)


def test_groups_of_one_rule_need_distinct_people_and_each_line_counts() -> None:
    spec = ReviewSpec(groups=(DBA2, SEC))
    need = needs(spec)
    assert need.needed == 3 and not need.shared
    assert need.requirement() == "3 approvals from different people: 2 from group:dba and 1 from group:security"
    # "both" is a DBA and in security: one person fills one slot
    half = needs(spec, [vote("both", "dba", "security"), vote("alice", "dba")])
    assert (half.approvals, half.needed, half.met) == (2, 3, False)
    assert half.progress() == "2 of 3 approvals (2 of 2 from group:dba; 0 of 1 from group:security)"


def test_rules_with_other_groups_may_share_a_person_and_say_so() -> None:
    spec = combine_reviews([ReviewSpec(groups=(ApproverGroup(name="dba", members=("group:dba",)),)),
                            ReviewSpec(groups=(SEC,))])
    need = needs(spec)
    assert need.needed == 1 and need.shared  # a DBA who is in security fills both
    assert need.requirement().endswith("(one person may count toward more than one)")
    assert needs(spec, [vote("both", "dba", "security")]).met
    not_yet = needs(spec, [vote("alice", "dba")])
    assert (not_yet.approvals, not_yet.needed, not_yet.met) == (1, 2, False)


def test_any_reviewer_already_implied_by_a_stricter_rule_is_not_listed() -> None:
    spec = combine_reviews([ReviewSpec(groups=(ANY,)), ReviewSpec(groups=(DBA2, SEC))])
    need = needs(spec)
    assert need.needed == 3
    assert [line.who for line in need.lines] == ["group:dba", "group:security"]


def test_the_json_says_the_same_as_the_words() -> None:
    spec = ReviewSpec(groups=(ApproverGroup(name="any", quorum=2),), require_reason=True)
    data = needs(spec, [vote("alice", "any")]).as_json()
    assert data == {"approvals": 1, "needed": 2, "met": False, "require_reason": True, "shared": False,
                    "lines": [{"who": "any reviewer", "need": 2, "have": 1}],
                    "text": "2 approvals from any reviewer (different people)", "progress": "1 of 2 approvals"}


DIRECTORY = ReviewerDirectory(identities={"api:owner": "owner"}, groups_of={})


def test_a_lone_reviewer_is_told_which_rules_it_can_never_approve() -> None:
    policy = parse_policy(
        "version: 1\ndefault: review\nrules:\n"
        "  - {id: two, tool: a, outcome: review, review: {approvers: [{any: true, quorum: 2}]}}\n"
        "  - {id: one, tool: b, outcome: review}\n"
        "  - {id: dbas, tool: c, outcome: review, review: {approvers: [{group: dba}]}}\n"
        "  - {id: disabled, tool: d, outcome: review, enabled: false, review: {approvers: [{any: true, quorum: 3}]}}\n")
    lines = unsatisfiable(policy.reviews(), DIRECTORY)
    assert lines == [
        "rule 'two' can never be approved: 2 from any reviewer but only 1 reviewer(s) can: owner",
        "rule 'dbas' can never be approved: nobody who can review is in group:dba",
    ]
    assert unsatisfiable(policy.reviews(), DIRECTORY, people=["alice"]) == [lines[1]]  # two people now


def test_people_who_are_in_two_groups_still_count_once() -> None:
    directory = ReviewerDirectory(identities={"api:both": "both"},
                                  groups_of={"both": frozenset({"dba", "security"})})
    spec = ReviewSpec(groups=(ApproverGroup(name="dba", members=("group:dba",)), SEC))
    [line] = unsatisfiable([("pair", spec)], directory)
    assert line.startswith("rule 'pair' can never be approved: 2 approvals from different people")


def test_the_words_agree_with_the_quorum_rule_on_many_random_reviews() -> None:
    from server.approvals.quorum import quorum_met

    rng = random.Random(19)
    names, group_names = ["a", "b", "c", "d", "e", "f"], ["dba", "security", "ops"]
    for _ in range(2000):
        directory = ReviewerDirectory({f"api:{p}": p for p in names},
                                      {p: frozenset(g for g in group_names if rng.random() < 0.4) for p in names})
        groups = [ApproverGroup(name=g, members=() if g == "any" else (f"group:{g}",), quorum=rng.randint(1, 3),
                                requirement=f"r{r}")
                  for r in range(rng.randint(1, 3)) for g in rng.sample([*group_names, "any"], rng.randint(1, 3))]
        spec = ReviewSpec(groups=tuple(groups))
        votes = [vote(p, *[g.name for g in groups if directory.eligible(p, g)]) for p in rng.sample(names, 4)]
        votes = [v for v in votes if v["groups"]]  # the broker refuses a vote that counts for no group
        need = needs(spec, votes)
        assert need.met == quorum_met(spec, [str(v["person"]) for v in votes], directory), (spec, votes)
        assert need.approvals <= need.needed or need.met
        assert need.needed <= need.approvals + max(sum(g.quorum for g in groups if g.requirement == r)
                                                   for r in {g.requirement for g in groups})


def test_thousands_of_configured_people_fill_wide_quorums() -> None:
    people = {f"p{i}": frozenset({"dba"} if i % 2 else {"security"}) for i in range(2000)}
    directory = ReviewerDirectory({f"api:{p}": p for p in people}, people)
    wide = ReviewSpec(groups=(ApproverGroup(name="dba", members=("group:dba",), quorum=50, requirement="r0"),
                              ApproverGroup(name="security", members=("group:security",), quorum=50, requirement="r0"),
                              ApproverGroup(name="any", quorum=50, requirement="r1")))
    assert unsatisfiable([("wide", wide)] * 20, directory) == []  # (a matching over groups, not over slots)
