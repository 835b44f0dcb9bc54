"""Who may decide a request, and when enough have: reviewer identities mapped to people and groups, the quorum
rule (distinct people fill slots; every group of every matched rule must be filled), and what a request still
needs, in numbers and words, as every channel shows it (`needs`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.models import ApproverGroup, ReviewSpec

ANY_REVIEWER = "any reviewer"


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

    def reviewers(self) -> list[str]:
        """The people who can vote at all: those with at least one reviewer identity."""
        return sorted(set(self.identities.values()))


def quorum_met(spec: ReviewSpec, approvers: Sequence[str], directory: ReviewerDirectory) -> bool:
    """True when distinct people can fill every approval slot of every group (AND across groups).

    One person fills at most one slot, so "one DBA and one security engineer" needs two people
    even if one of them is both. Solved as a small bipartite matching.
    """
    return all(sum(map(len, _fill(groups, approvers, directory.eligible))) == _slots(groups)
               for groups in _requirements(spec).values())


def _requirements(spec: ReviewSpec) -> dict[str, list[ApproverGroup]]:
    """Each requirement's groups (one rule's; distinct people fill their slots)."""
    out: dict[str, list[ApproverGroup]] = {}
    for g in spec.groups:
        out.setdefault(g.requirement, []).append(g)
    return out


def _slots(groups: Sequence[ApproverGroup]) -> int:
    return sum(max(1, g.quorum) for g in groups)


def _fill(groups: Sequence[ApproverGroup], people: Iterable[str],
          eligible: Callable[[str, ApproverGroup], bool]) -> list[list[str]]:
    """The most slots distinct `people` can fill: for each group, the people in its slots (at most its quorum).
    Augmenting paths over the groups (a few), so thousands of people cost little."""
    owners: list[list[str]] = [[] for _ in groups]
    free = _slots(groups)

    def assign(person: str, seen: set[int]) -> bool:
        for i, group in enumerate(groups):
            if i in seen or not eligible(person, group):
                continue
            seen.add(i)
            if len(owners[i]) < max(1, group.quorum):
                owners[i].append(person)
                return True
            for k, other in enumerate(owners[i]):
                if assign(other, seen):  # `other` moved to another group's slot: this one is free for `person`
                    owners[i][k] = person
                    return True
        return False

    for person in dict.fromkeys(people):
        if not free:
            break  # full: nobody further can add a slot (and a directory of thousands is not searched)
        if assign(person, set()):
            free -= 1
    return owners


def directory_from(identities: Iterable[tuple[str, str]], people_groups: Mapping[str, Iterable[str]]) -> ReviewerDirectory:
    return ReviewerDirectory(
        identities=dict(identities),
        groups_of={p: frozenset(g) for p, g in people_groups.items()},
    )


# -- what a request needs, as every channel says it ---------------------------------------------------------


@dataclass(frozen=True)
class NeedLine:
    """Approvals needed from one set of people: `need` of them, `have` given so far."""

    who: str  # "any reviewer", "group:dba", "alice, bob"
    need: int
    have: int


@dataclass(frozen=True)
class Needs:
    """What a held request needs before it may run, merged over every rule that asked for a review.

    `needed` is how many distinct people must approve at least (the approvals so far that count, plus the fewest
    still missing); `lines` say from whom. Rules combine as requirements that one person may fill together, so
    two rules that each ask for one approval from any reviewer need one person, not two."""

    approvals: int
    needed: int
    lines: tuple[NeedLine, ...]
    shared: bool  # the lines come from different rules: one person may count toward more than one
    require_reason: bool

    @property
    def met(self) -> bool:
        return self.approvals >= self.needed and all(line.have >= line.need for line in self.lines)

    def requirement(self) -> str:
        """What is needed, in words: "2 approvals from any reviewer (different people)"."""
        if len(self.lines) == 1:
            line = self.lines[0]
            text = f"{_approvals(line.need)} from {line.who}" + (" (different people)" if line.need > 1 else "")
        else:
            parts = [f"{line.need} from {line.who}" for line in self.lines]
            text = f"{_approvals(self.needed)} from different people: " + " and ".join(parts)
            if self.shared:
                text += " (one person may count toward more than one)"
        return text

    def progress(self) -> str:
        """Where the request stands: "1 of 2 approvals" (with each line's count when there are several)."""
        text = f"{self.approvals} of {_approvals(self.needed)}"
        if len(self.lines) > 1:
            text += " (" + "; ".join(f"{min(line.have, line.need)} of {line.need} from {line.who}"
                                     for line in self.lines) + ")"
        return text

    def as_json(self) -> dict[str, Any]:
        return {"approvals": self.approvals, "needed": self.needed, "met": self.met,
                "require_reason": self.require_reason, "shared": self.shared,
                "lines": [{"who": line.who, "need": line.need, "have": min(line.have, line.need)}
                          for line in self.lines],
                "text": self.requirement(), "progress": self.progress()}


def _approvals(n: int) -> str:
    return f"{n} approval{'s' if n != 1 else ''}"


def who_text(group: ApproverGroup) -> str:
    return ", ".join(group.members) or ANY_REVIEWER


def needs(spec: ReviewSpec | None, votes: Sequence[Mapping[str, Any]] = ()) -> Needs:
    """What `spec` needs, given the `votes` recorded so far (each with `person`, `verdict` and the `groups` it
    counted for, as the broker records them). The one source of the numbers and words every channel shows."""
    spec = spec or ReviewSpec()
    counted: dict[str, set[str]] = {}
    for v in votes:
        if v.get("verdict") == "approve" and isinstance(v.get("person"), str):
            counted.setdefault(v["person"], set()).update(str(g) for g in v.get("groups") or ())

    def eligible(person: str, group: ApproverGroup) -> bool:
        return group.name in counted.get(person, set())

    requirements = _requirements(spec)
    merged: dict[tuple[str, ...], tuple[ApproverGroup, int, int]] = {}  # members -> (group, need, have)
    sources: dict[tuple[str, ...], set[str]] = {}
    missing = 0
    for name, groups in requirements.items():
        owners = _fill(groups, counted, eligible)
        missing = max(missing, _slots(groups) - sum(map(len, owners)))
        for g, filled in zip(groups, owners, strict=True):
            _, need, have = merged.get(g.members, (g, 0, 0))
            merged[g.members] = (g, max(need, max(1, g.quorum)), max(have, len(filled)))
            sources.setdefault(g.members, set()).add(name)
    totals = {name: _slots(groups) for name, groups in requirements.items()}
    lines: list[NeedLine] = []
    for members, (group, need, have) in merged.items():
        # "n from any reviewer" says nothing when another rule already needs n people or more.
        implied = not members and any(t >= need for r, t in totals.items() if r not in sources[members])
        if not implied or len(merged) == 1:
            lines.append(NeedLine(who_text(group), need, have))
    kept = [sources[m] for m, (g, _, _) in merged.items() if who_text(g) in {line.who for line in lines}]
    shared = len(lines) > 1 and not set.intersection(*kept)
    return Needs(approvals=len(counted), needed=len(counted) + missing, lines=tuple(lines), shared=shared,
                 require_reason=spec.require_reason)


# -- rules nobody can satisfy ------------------------------------------------------------------------------


def unsatisfiable(reviews: Iterable[tuple[str, ReviewSpec]], directory: ReviewerDirectory,
                  people: Iterable[str] = ()) -> list[str]:
    """One line for each review (a rule id and what it asks) that the configured reviewers can never approve: a
    quorum larger than the distinct people eligible for it, or a group nobody who can review is in. The people who
    can review: those with a reviewer identity, and `people` (configured people, who a chat channel may map to)."""
    people = sorted({*directory.reviewers(), *people})
    problems = []
    for rule, spec in reviews:
        if quorum_met(spec, people, directory):
            continue
        why = []
        for g in spec.groups:
            eligible = [p for p in people if directory.eligible(p, g)]
            if not eligible:
                why.append(f"nobody who can review is in {who_text(g)}")
            elif len(eligible) < g.quorum:
                why.append(f"{g.quorum} from {who_text(g)} but only {len(eligible)} reviewer(s) can: "
                           f"{', '.join(eligible)}")
        if not why:
            why.append(f"{needs(spec).requirement()}, from {len(people)} configured reviewer(s): {', '.join(people)}")
        problems.append(f"rule {rule!r} can never be approved: {'; '.join(why)}")
    return problems
