"""The policy file's shape: pydantic models with `extra="forbid"`, so a typo is an error with a place.

```yaml
version: 1
default: review            # outcome when no rule matches
default_risk: medium
review: {timeout: 15m, approvers: [{any: true, quorum: 1}]}
vars: {allowed_hosts: [api.github.com]}            # constants, `vars.allowed_hosts` in conditions
escalations: {oncall: [{after: 10m, notify: [sre]}]}  # named chains a rule can refer to
rules:
  - id: sql-read
    tool: sql_query        # glob or list of globs; also `principal:` and `model:`
    when: facts.sql.read_only
    outcome: allow
    risk: low
    reason: "read-only query on {facts.sql.tables}"
```
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from server.durations import Duration
from server.models import Outcome, RiskLevel

RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,99}$")
CHANNEL = re.compile(r"^(slack|teams|web|api|email)(:.+)?$")

Globs = Annotated[tuple[str, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApproverSpec(_Strict):
    """One approval requirement: `{group: dba, quorum: 2}`, `{people: [alice, bob]}` or `{any: true}`."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    group: str | None = None
    people: tuple[str, ...] | None = None
    any_: bool = Field(False, alias="any")
    quorum: int = Field(1, ge=1, le=50)

    @model_validator(mode="after")
    def _exactly_one(self) -> ApproverSpec:
        given = [n for n, v in (("group", self.group), ("people", self.people), ("any", self.any_)) if v]
        if len(given) != 1:
            raise ValueError(f"an approver entry needs exactly one of group, people, any: true (got {given or 'none'})")
        if self.people is not None:
            if not self.people:
                raise ValueError("people: needs at least one name")
            if len(set(self.people)) != len(self.people):
                raise ValueError("people: names repeat")
            if self.quorum > len(self.people):
                raise ValueError(f"quorum {self.quorum} is more than the {len(self.people)} people listed")
        return self


class EscalationStep(_Strict):
    """After `after` without a decision, notify `notify` (groups or people); `then:` continues with a named chain."""

    after: Duration
    notify: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    then: str | None = None

    @model_validator(mode="after")
    def _does_something(self) -> EscalationStep:
        if not (self.notify or self.channels or self.then):
            raise ValueError("an escalation step needs notify, channels or then")
        for c in self.channels:
            if not CHANNEL.match(c):
                raise ValueError(f"channel {c!r} must look like slack:#room, teams:<name>, web or api")
        return self


class GrantLimits(_Strict):
    """The bounds of every standing grant (`review: {grants: {max_for: 8h, max_uses: 100}}`): a reviewer asking for
    more is refused, never clamped. `review: {grants: false}` forbids grants under the whole policy."""

    enabled: bool = True
    max_for: Duration = 8 * 3600.0
    max_uses: int = Field(100, ge=1, le=100_000)

    @field_validator("max_for")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("max_for must be a positive duration")
        return v


class ReviewBlock(_Strict):
    """Review settings; a rule's block overrides the policy's `review:` defaults field by field."""

    approvers: tuple[ApproverSpec, ...] | None = None
    timeout: Duration | None = None
    require_reason: bool | None = None
    channels: tuple[str, ...] | None = None
    escalation: tuple[EscalationStep, ...] | str | None = None
    grants: Annotated[GrantLimits | None, BeforeValidator(
        lambda v: {"enabled": v} if isinstance(v, bool) else v)] = None
    """Policy level only: the bounds of standing grants, or false to forbid them (a rule says `grants: false`)."""

    @field_validator("approvers")
    @classmethod
    def _some(cls, v: tuple[ApproverSpec, ...] | None) -> tuple[ApproverSpec, ...] | None:
        if v is not None and not v:
            raise ValueError("approvers: needs at least one entry (use [{any: true}] for any reviewer)")
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for c in v or ():
            if not CHANNEL.match(c):
                raise ValueError(f"channel {c!r} must look like slack:#room, teams:<name>, web or api")
        return v


class RuleSpec(_Strict):
    id: str
    description: str | None = None
    tool: Globs
    principal: Globs = ("*",)
    model: Globs = ("*",)
    when: str | None = None
    outcome: Outcome
    risk: RiskLevel | None = None  # None: the policy's default_risk
    reason: str | None = None
    review: ReviewBlock | None = None
    grants: bool | None = None
    """Whether a reviewer may turn an approval under this rule into a standing grant (None: yes, unless the rule's
    risk is critical)."""
    enabled: bool = True

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not RULE_ID.match(v):
            raise ValueError("a rule id is letters, digits and _ . : / - (starting with a letter or digit)")
        if v.lower().startswith("keyturn:"):
            raise ValueError("rule ids starting with 'keyturn:' name keyturn's built-in guards; choose another")
        return v

    @field_validator("tool", "principal", "model")
    @classmethod
    def _globs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or any(not isinstance(g, str) or not g for g in v):
            raise ValueError("needs a non-empty glob or list of globs")
        return v

    @field_validator("when")
    @classmethod
    def _when(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("when: is empty (leave it out to match every call)")
        return v

    @model_validator(mode="after")
    def _review_only_for_review(self) -> RuleSpec:
        if self.review is not None and self.outcome != "review":
            raise ValueError(f"review: settings only apply to outcome review (this rule's outcome is {self.outcome})")
        if self.grants is not None and self.outcome != "review":
            raise ValueError(f"grants: only applies to outcome review (this rule's outcome is {self.outcome})")
        if self.review is not None and self.review.grants is not None:
            raise ValueError("review.grants (the bounds of grants) is set in the policy's top-level review: block; "
                             "a rule forbids grants with grants: false")
        return self


class PolicySpec(_Strict):
    version: Literal[1]
    description: str | None = None
    default: Outcome = "review"
    default_risk: RiskLevel = "medium"
    review: ReviewBlock = ReviewBlock()
    vars: dict[str, Any] = Field(default_factory=dict)
    escalations: dict[str, tuple[EscalationStep, ...]] = Field(default_factory=dict)
    rules: tuple[RuleSpec, ...] = ()
