"""Who may decide a request, and when enough have: reviewer identities mapped to people and groups, and the quorum
rule (distinct people fill slots; every group of every matched rule must be filled)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.models import ApproverGroup, ReviewSpec


@dataclass(frozen=True)
class ReviewerDirectory:
    """Who a verified reviewer identity is: the person and their groups (from config)."""

    identities: Mapping[str, str]  # identity -> person
    groups_of: Mapping[str, frozenset[str]]  # person -> groups

    def person(self, identity: str) -> str | None:
        return self.identities.get(identity)

    def is_member(self, person: str, member: str) -> bool:
        if member.startswith("group:"):
            return member[len("group:") :] in self.groups_of.get(person, frozenset())
        return member == person

    def eligible(self, person: str, group: ApproverGroup) -> bool:
        return not group.members or any(self.is_member(person, m) for m in group.members)


def quorum_met(spec: ReviewSpec, approvers: Sequence[str], directory: ReviewerDirectory) -> bool:
    """True when distinct people can fill every approval slot of every group (AND across groups).

    One person fills at most one slot, so "one DBA and one security engineer" needs two people
    even if one of them is both. Solved as a small bipartite matching.
    """
    requirements: dict[str, list[ApproverGroup]] = {}
    for g in spec.groups:
        requirements.setdefault(g.requirement, []).append(g)
    return all(_slots_filled(groups, approvers, directory) for groups in requirements.values())


def _slots_filled(groups: Sequence[ApproverGroup], approvers: Sequence[str], directory: ReviewerDirectory) -> bool:
    slots = [g for g in groups for _ in range(max(1, g.quorum))]
    owner: dict[int, str] = {}

    def assign(person: str, seen: set[int]) -> bool:
        for i, group in enumerate(slots):
            if i in seen or not directory.eligible(person, group):
                continue
            seen.add(i)
            if i not in owner or assign(owner[i], seen):
                owner[i] = person
                return True
        return False

    for person in dict.fromkeys(approvers):
        assign(person, set())
    return len(owner) == len(slots)


def directory_from(identities: Iterable[tuple[str, str]], people_groups: Mapping[str, Iterable[str]]) -> ReviewerDirectory:
    return ReviewerDirectory(
        identities=dict(identities),
        groups_of={p: frozenset(g) for p, g in people_groups.items()},
    )

