"""Deciding: which rules match, who wins, and what happens when a condition breaks."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from server.policy import parse_policy
from server.policy.testing import approvals_needed, call_for
from tests.policy.conftest import decide_with

PRECEDENCE = """\
version: 1
default: review
default_risk: medium
review: {timeout: 15m, approvers: [{any: true, quorum: 1}]}
rules:
  - id: reads
    tool: "sql_*"
    when: facts.sql.read_only
    outcome: allow
    risk: low
    reason: "read of {facts.sql.tables}"
  - id: writes
    tool: "sql_*"
    when: facts.sql.writes
    outcome: review
    risk: medium
    reason: "write to {facts.sql.write_tables}"
  - id: mass-delete
    tool: sql_execute
    when: facts.sql.delete_without_where
    outcome: review
    risk: critical
    reason: "DELETE without WHERE on {facts.sql.tables}"
    review:
      approvers: [{group: dba, quorum: 2}, {group: security, quorum: 1}]
      timeout: 30m
      require_reason: true
      channels: ["slack:#db-approvals"]
      escalation: [{after: 10m, notify: [security]}]
  - id: payroll-never
    tool: "*"
    when: facts.sql.tables.exists(t, t == "payroll")
    outcome: deny
    risk: high
    reason: "payroll is off limits"
"""


@pytest.fixture
def policy():  # type: ignore[no-untyped-def]
    return parse_policy(PRECEDENCE)


def test_an_allow_rule_alone_allows(policy) -> None:  # type: ignore[no-untyped-def]
    d = decide_with(policy, "sql_query", {"query": "SELECT * FROM orders"})
    assert (d.outcome, d.risk, d.reason) == ("allow", "low", "read of orders")
    assert [r.id for r in d.rules] == ["reads"] and d.review is None
    assert d.policy_digest == policy.digest


def test_no_match_gets_the_default(policy) -> None:  # type: ignore[no-untyped-def]
    d = decide_with(policy, "jira_create_issue", {"summary": "x"})
    assert (d.outcome, d.risk, d.rules) == ("review", "medium", ())
    assert d.review is not None and d.review.timeout_s == 900 and "default" in d.reason


def test_deny_beats_review_beats_allow_and_every_match_is_listed(policy) -> None:  # type: ignore[no-untyped-def]
    d = decide_with(policy, "sql_execute", {"statement": "DELETE FROM payroll"})
    assert d.outcome == "deny" and d.risk == "critical"  # the highest risk of all matches, not the winner's
    assert [r.id for r in d.rules] == ["writes", "mass-delete", "payroll-never"]
    assert d.reason == "payroll is off limits" and d.review is None


def test_review_beats_allow(policy) -> None:  # type: ignore[no-untyped-def]
    d = decide_with(policy, "sql_execute", {"statement": "SELECT 1; UPDATE t SET a = 1 WHERE id = 2"})
    assert d.outcome == "review" and {r.id for r in d.rules} == {"writes"}


def test_several_review_rules_combine_approvers_and_take_the_highest_bars_timeout(policy) -> None:  # type: ignore[no-untyped-def]
    d = decide_with(policy, "sql_execute", {"statement": "DELETE FROM orders"})
    assert d.outcome == "review" and d.risk == "critical"
    assert d.reason == "write to orders; DELETE without WHERE on orders"
    review = d.review
    assert review is not None
    assert review.timeout_s == 1800  # `mass-delete` sets the highest bar (critical, 3 people): its own 30m applies
    assert review.require_reason and review.channels == ("slack:#db-approvals",)
    assert {(g.name, g.members, g.quorum) for g in review.groups} == {
        ("any", (), 1),
        ("dba", ("group:dba",), 2),
        ("security", ("group:security",), 1),
    }
    # each matching rule is its own requirement: the same person may count toward each
    assert len({g.requirement for g in review.groups}) == 2
    assert approvals_needed(d) == 3
    assert [(e.after_s, e.notify) for e in review.escalation] == [(600.0, ("security",))]


def test_principal_and_model_globs_narrow_a_rule() -> None:
    policy = parse_policy(
        "version: 1\ndefault: deny\nrules:\n"
        "  - {id: ci, tool: '*', principal: ['ci-*', 'build'], model: 'claude-*', outcome: allow}\n"
    )
    assert decide_with(policy, "x", principal="ci-7", model="claude-sonnet").outcome == "allow"
    assert decide_with(policy, "x", principal="ci-7", model=None).outcome == "deny"
    assert decide_with(policy, "x", principal="alice", model="claude-sonnet").outcome == "deny"


FAIL_CLOSED = """\
version: 1
default: allow
rules:
  - id: allow-when-small
    tool: "*"
    when: args.rows < 100
    outcome: allow
    risk: low
  - id: deny-when-prod
    tool: "*"
    when: args.target.startsWith("prod")
    outcome: deny
    risk: critical
  - id: review-big
    tool: "*"
    when: args.rows > 1000
    outcome: review
    risk: high
"""


def test_a_deny_rule_whose_condition_errors_denies() -> None:
    policy = parse_policy(FAIL_CLOSED)
    d = decide_with(policy, "bulk_load", {"rows": 5})  # no `target`: the deny rule cannot be evaluated
    assert d.outcome == "deny" and d.risk == "critical"
    denied = next(r for r in d.rules if r.id == "deny-when-prod")
    assert denied.reason.startswith("condition error:") and "target" in denied.reason
    assert {"rule": "deny-when-prod", "error": denied.reason.removeprefix("condition error: ")} in d.facts[
        "condition_errors"
    ]


def test_a_type_mismatch_fails_closed_too() -> None:
    policy = parse_policy(FAIL_CLOSED)
    d = decide_with(policy, "bulk_load", {"rows": "many", "target": "dev"})
    assert d.outcome == "review"  # review-big errored -> matched; allow-when-small errored -> not applied
    assert [r.id for r in d.rules] == ["review-big"]
    assert {e["rule"] for e in d.facts["condition_errors"]} == {"allow-when-small", "review-big"}


def test_an_allow_rule_that_errors_never_allows() -> None:
    policy = parse_policy(FAIL_CLOSED.replace("default: allow", "default: review"))
    d = decide_with(policy, "bulk_load", {"rows": "many", "target": "dev"})
    assert d.outcome == "review" and "allow-when-small" not in [r.id for r in d.rules]


def test_a_condition_that_is_not_a_boolean_fails_closed() -> None:
    policy = parse_policy(
        "version: 1\ndefault: allow\nrules:\n  - {id: odd, tool: '*', when: 'args.n', outcome: deny}\n"
    )
    d = decide_with(policy, "t", {"n": 3})
    assert d.outcome == "deny" and "not a bool" in d.rules[0].reason


def test_a_missing_fact_family_never_errors() -> None:
    policy = parse_policy(PRECEDENCE)
    call = call_for("sql_query", {"query": "SELECT 1"})
    d = policy.decide(call, {})  # the gate always passes full facts; a caller that does not still gets defaults
    assert d.outcome == "review" and "condition_errors" not in d.facts


def test_annotations_raise_the_default_risk_but_never_lower_a_rule() -> None:
    policy = parse_policy(PRECEDENCE)
    assert decide_with(policy, "purge", annotations={"destructiveHint": True}).risk == "high"
    assert decide_with(policy, "purge", annotations={}).risk == "medium"
    read = decide_with(policy, "sql_query", {"query": "DELETE FROM payroll"}, annotations={"readOnlyHint": True})
    assert read.outcome == "deny" and read.risk == "high"
    # a matched rule's risk stands: the tool calling itself destructive does not overrule the SQL facts
    write = decide_with(policy, "sql_execute", {"statement": "UPDATE t SET a = 1 WHERE id = 2"})
    assert write.risk == "medium"


def test_time_and_vars_are_available_to_conditions() -> None:
    policy = parse_policy(
        """\
version: 1
default: allow
vars: {freeze_hours: [22, 23], hosts: ["*.example.com", api.github.com]}
rules:
  - id: night-freeze
    tool: deploy
    when: time.getHours() in vars.freeze_hours
    outcome: deny
  - id: foreign-host
    tool: fetch
    when: '!facts.urls.hosts.all(h, glob(h, vars.hosts))'
    outcome: review
"""
    )
    night, noon = datetime(2025, 1, 1, 22, 30, tzinfo=UTC), datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert decide_with(policy, "deploy", now=night).outcome == "deny"
    assert decide_with(policy, "deploy", now=noon).outcome == "allow"
    kinds = {"url": "url"}
    assert decide_with(policy, "fetch", {"url": "https://a.example.com/x"}, classifiers=kinds).outcome == "allow"
    assert decide_with(policy, "fetch", {"url": "https://evil.test/x"}, classifiers=kinds).outcome == "review"


def test_has_on_a_fact_is_true_and_on_args_tests_presence() -> None:
    policy = parse_policy(
        "version: 1\ndefault: deny\nrules:\n"
        "  - {id: a, tool: '*', when: 'has(facts.sql.kinds) && has(args.limit) && args.limit < 10', outcome: allow}\n"
    )
    assert decide_with(policy, "t", {"limit": 5}).outcome == "allow"
    assert decide_with(policy, "t", {}).outcome == "deny"


def test_reasons_never_leak_secrets_from_arguments() -> None:
    policy = parse_policy(
        "version: 1\nrules:\n  - {id: r, tool: '*', outcome: review, reason: 'runs {args.command} as {principal}'}\n"
    )
    d = decide_with(policy, "shell_run", {"command": "PGPASSWORD=hunter22 psql"})
    assert d.reason == "runs PGPASSWORD=«redacted» psql as agent"


def test_with_the_calls_redaction_reasons_and_facts_are_masked_and_what_the_policy_said_is_kept() -> None:
    from server.classify import ClassifyContext, Redaction, extract_facts

    policy = parse_policy(
        "version: 1\nrules:\n  - {id: reads, tool: 'read_*', outcome: allow, risk: low, reason: 'reads {facts.paths.all}'}\n"
    )
    args = {"path": "/srv/ow/notes", "password": "ow"}  # a short secret: "ow" is in "allow" and "low" as well
    facts = extract_facts("read_file", args, {"path": "path"}, {}, ClassifyContext())
    redaction = Redaction.of(args, facts, rescan=False)
    d = policy.decide(call_for("read_file", args), facts, redaction=redaction)
    assert (d.outcome, d.risk, d.policy_digest) == ("allow", "low", policy.digest)
    assert [(r.id, r.outcome, r.risk) for r in d.rules] == [("reads", "allow", "low")]
    assert "/srv/ow/" not in d.reason and "/srv/«redacted»/notes" in d.reason
    assert d.facts["paths"]["all"] == ["/srv/«redacted»/notes"]
    # Without it (policy tests, replay), the decision is the policy's alone: facts as the classifiers found them.
    assert policy.decide(call_for("read_file", args), facts).facts["paths"]["all"] == ["/srv/ow/notes"]


def test_explain_traces_every_rule_with_why(policy) -> None:  # type: ignore[no-untyped-def]
    call = call_for("sql_execute", {"statement": "DELETE FROM orders"})
    from server.classify import ClassifyContext, extract_facts

    facts = extract_facts(call.tool, call.arguments, {"statement": "sql"}, {}, ClassifyContext())
    trace = policy.explain(call, facts)
    by_id = {r["id"]: r for r in trace["rules"]}
    assert by_id["reads"] == {
        "id": "reads", "line": 6, "outcome": "allow", "risk": "low", "considered": True, "matched": False,
        "why": "condition false", "when": "facts.sql.read_only",
    }  # fmt: skip
    assert by_id["mass-delete"]["matched"] and by_id["mass-delete"]["why"] == "condition true"
    assert trace["decision"]["outcome"] == "review" and trace["facts"]["sql"]["delete_without_where"]
    other = policy.explain(call_for("shell_run", {"command": "ls"}), {})
    assert {r["considered"] for r in other["rules"] if r["id"] != "payroll-never"} == {False}
    assert "does not match" in next(r for r in other["rules"] if r["id"] == "mass-delete")["why"]


def test_the_tool_index_agrees_with_checking_every_rule() -> None:
    rng = random.Random(7)
    globs = ["sql_*", "sql_query", "*", "files_?ead", "files_[rw]*", "shell_run", "http_*", "x*y", "[!s]*"]
    rules = "".join(
        f"  - {{id: r{i}, tool: {rng.sample(globs, rng.randint(1, 3))}, outcome: allow}}\n" for i in range(60)
    )
    policy = parse_policy("version: 1\nrules:\n" + rules)
    for tool in ["sql_query", "sql_execute", "files_read", "files_write", "shell_run", "http_request", "xay", "zz", ""]:
        assert [r.id for r in policy.candidates(tool)] == [r.id for r in policy.rules if r.matches_tool(tool)], tool


def test_a_disabled_rule_never_matches() -> None:
    policy = parse_policy(
        "version: 1\ndefault: allow\nrules:\n  - {id: dormant, tool: '*', outcome: deny, enabled: false}\n"
    )
    assert decide_with(policy, "t").outcome == "allow"


def test_the_shipped_mass_change_rule_keeps_its_own_30_minutes() -> None:
    from server.policy import load_policy
    from tests.policy.conftest import POLICIES

    shipped = load_policy(POLICIES / "default.yaml")
    d = decide_with(shipped, "sql_execute", {"statement": "DELETE FROM users"})
    assert {r.id for r in d.rules} >= {"sql-write", "sql-mass-change"}
    assert d.review is not None and d.review.timeout_s == 1800  # not sql-write's 15m
    assert approvals_needed(d) == 2  # two people, not 1 + 2
    trace = shipped.explain(call_for("sql_execute", {"statement": "DELETE FROM users"}),
                            extract_sql("DELETE FROM users"))
    assert trace["timeout"]["rule"] == "sql-mass-change" and trace["timeout"]["timeout_s"] == 1800
    assert "highest bar" in trace["timeout"]["why"] and "sql-write 900s" in trace["timeout"]["why"]


def extract_sql(statement: str) -> dict[str, object]:
    from server.classify import ClassifyContext, extract_facts

    return extract_facts("sql_execute", {"statement": statement}, {"statement": "sql"}, {}, ClassifyContext())


TIMEOUTS = """\
version: 1
review: {timeout: 15m}
rules:
  - {id: a-long, tool: t, outcome: review, risk: high, review: {timeout: 2h}}
  - {id: b-short, tool: t, outcome: review, risk: high, review: {timeout: 5m}}
  - {id: c-two, tool: t, when: 'args.two == true', outcome: review, risk: high,
     review: {timeout: 1h, approvers: [{any: true, quorum: 2}]}}
  - {id: d-critical, tool: t, when: 'args.critical == true', outcome: review, risk: critical,
     review: {timeout: 10m}}
"""


def test_the_rule_with_the_highest_bar_gives_the_timeout_risk_first_then_quorum_then_the_shorter() -> None:
    policy = parse_policy(TIMEOUTS)
    same_bar = decide_with(policy, "t", {"two": False, "critical": False})
    assert same_bar.review is not None and same_bar.review.timeout_s == 300  # a tie: the shorter
    more_people = decide_with(policy, "t", {"two": True, "critical": False})
    assert more_people.review is not None and more_people.review.timeout_s == 3600  # two people: 1h
    critical = decide_with(policy, "t", {"two": True, "critical": True})
    assert critical.review is not None and critical.review.timeout_s == 600  # risk before quorum
    trace = policy.explain(call_for("t", {"two": True, "critical": True}), {})
    assert trace["timeout"]["rule"] == "d-critical"
    alone = parse_policy("version: 1\nrules:\n  - {id: only, tool: t, outcome: review, review: {timeout: 7m}}\n")
    assert alone.explain(call_for("t", {}), {})["timeout"] == {
        "rule": "only", "timeout_s": 420.0, "why": "the only rule that asked for a review (only)"}
    assert alone.explain(call_for("other", {}), {})["timeout"]["rule"] is None  # the policy's default review
