"""Loading a policy: every mistake is an error that says where (file, line, rule, field)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import PolicyError
from server.policy import PolicyErrors, load_policy, parse_policy

GOOD = """\
version: 1
default: review
rules:
  - id: sql-read
    tool: sql_query
    when: facts.sql.read_only
    outcome: allow
    risk: low
"""


def error_of(text: str, **kw: object) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="team.yaml", **kw)  # type: ignore[arg-type]
    return info.value


def test_a_good_policy_loads_with_its_digest_and_path(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    policy = load_policy(path)
    assert policy.path == path and len(policy.digest) == 64 and policy.default_outcome == "review"
    assert [r.id for r in policy.rules] == ["sql-read"] and policy.rules[0].line == 4


def test_a_cel_syntax_error_names_file_line_rule_and_field() -> None:
    e = error_of(
        GOOD + "  - id: broken\n    tool: x\n    when: 'facts.sql.kinds.all(k, k == \"select\"'\n    outcome: deny\n"
    )
    assert (e.file, e.line, e.rule, e.field) == ("team.yaml", 11, "broken", "when")
    assert "does not compile" in str(e) and "team.yaml" in str(e) and "line 11" in str(e)


def test_an_unknown_field_is_named_with_a_suggestion() -> None:
    e = error_of(GOOD.replace("    risk: low", "    risk: low\n    reson: typo"))
    assert (e.rule, e.field, e.line) == ("sql-read", "reson", 9)
    assert "did you mean 'reason'" in str(e)


def test_a_wrong_outcome_is_named() -> None:
    e = error_of(GOOD.replace("outcome: allow", "outcome: maybe"))
    assert (e.rule, e.field, e.line) == ("sql-read", "outcome", 7)


def test_a_nested_field_is_named_with_its_path() -> None:
    text = (
        GOOD + "  - id: r2\n    tool: x\n    outcome: review\n    review:\n      approvers: [{any: true, quorum: 0}]\n"
    )
    e = error_of(text)
    assert e.rule == "r2" and e.field == "review.approvers[0].quorum" and e.line == 13


def test_an_unknown_fact_is_caught_at_load_time() -> None:
    e = error_of(GOOD.replace("facts.sql.read_only", "facts.sql.readonly"))
    assert e.field == "when" and "unknown fact 'facts.sql.readonly'" in str(e)
    e = error_of(GOOD.replace("facts.sql.read_only", "facts.sqll.read_only"))
    assert "unknown fact family" in str(e)


def test_an_unknown_variable_is_caught_at_load_time() -> None:
    e = error_of(GOOD.replace("facts.sql.read_only", "fact.sql.read_only"))
    assert e.field == "when" and "unknown variable 'fact'" in str(e)


def test_macro_variables_are_not_unknown() -> None:
    parse_policy(GOOD.replace("facts.sql.read_only", 'facts.sql.tables.all(t, t.startsWith("x"))'))


def test_a_reason_placeholder_must_name_a_variable() -> None:
    e = error_of(GOOD + '    reason: "on {fact.sql.tables}"\n')
    assert e.field == "reason" and e.rule == "sql-read"


def test_duplicate_rule_ids_are_refused() -> None:
    e = error_of(GOOD + GOOD.split("rules:\n")[1])
    assert e.field == "id" and "duplicate rule id" in str(e) and e.line == 9


def test_duplicate_yaml_keys_are_refused() -> None:
    e = error_of(GOOD.replace("    risk: low", "    risk: low\n    risk: high"))
    assert e.line == 9 and "duplicate key" in str(e)


def test_bad_yaml_names_the_line() -> None:
    e = error_of("version: 1\nrules:\n  - id: [unclosed\n")
    assert e.file == "team.yaml" and e.line is not None and "not valid YAML" in str(e)


def test_wrong_version_is_refused() -> None:
    assert "version" in str(error_of(GOOD.replace("version: 1", "version: 2")))


def test_all_problems_are_reported_at_once() -> None:
    text = (
        GOOD.replace("outcome: allow", "outcome: nope") + "  - id: two\n    tool: x\n    outcome: deny\n    extra: 1\n"
    )
    e = error_of(text)
    assert isinstance(e, PolicyErrors) and len(e.problems) == 2
    assert {p.rule for p in e.problems} == {"sql-read", "two"}


def test_an_unknown_approver_group_is_refused_when_groups_are_known() -> None:
    text = GOOD + "  - id: drop\n    tool: x\n    outcome: review\n    review:\n      approvers: [{group: dbas}]\n"
    parse_policy(text)  # without configuration, names are not checked
    e = error_of(text, groups={"dba": {"alice"}}, people={"alice"})
    assert (e.rule, e.field, e.line) == ("drop", "review.approvers[0].group", 13)
    assert "unknown approver group 'dbas'" in str(e)


def test_an_unknown_person_is_refused() -> None:
    text = (
        GOOD
        + "  - id: drop\n    tool: x\n    outcome: review\n    review:\n      approvers: [{people: [alice, mallory]}]\n"
    )
    e = error_of(text, groups={}, people={"alice"})
    assert e.field == "review.approvers[0].people[1]" and "mallory" in str(e)


def test_a_quorum_larger_than_the_group_is_refused() -> None:
    text = (
        GOOD
        + "  - id: drop\n    tool: x\n    outcome: review\n    review:\n      approvers: [{group: dba, quorum: 3}]\n"
    )
    e = error_of(text, groups={"dba": {"alice", "carol"}}, people={"alice", "carol"})
    assert e.field == "review.approvers[0].quorum" and "has 2 member" in str(e)


def test_an_approver_entry_needs_exactly_one_kind() -> None:
    text = (
        GOOD + "  - id: r\n    tool: x\n    outcome: review\n    review:\n      approvers: [{group: dba, any: true}]\n"
    )
    assert "exactly one of" in str(error_of(text))


def test_review_settings_on_a_deny_rule_are_refused() -> None:
    text = GOOD + "  - id: r\n    tool: x\n    outcome: deny\n    review: {timeout: 5m}\n"
    assert error_of(text).rule == "r"


ESCALATIONS = """\
version: 1
escalations:
  first: [{after: 5m, notify: [sre], then: second}]
  second: [{after: 5m, notify: [security], then: first}]
rules:
  - id: r
    tool: x
    outcome: review
    review: {escalation: first, timeout: 1h}
"""


def test_an_escalation_cycle_is_refused() -> None:
    e = error_of(ESCALATIONS)
    assert "escalation cycle: first -> second -> first" in str(e)
    assert (e.line, e.field) == (4, "escalations.second[0].then")  # where the chain closes


def test_an_escalation_chain_flattens_in_time_order() -> None:
    policy = parse_policy(ESCALATIONS.replace(", then: first", ""))
    review = policy.rules[0].review
    assert review is not None
    assert [(e.after_s, e.notify) for e in review.escalation] == [(300.0, ("sre",)), (600.0, ("security",))]


def test_an_escalation_that_can_never_fire_is_refused() -> None:
    e = error_of(ESCALATIONS.replace(", then: first", "").replace("timeout: 1h", "timeout: 8m"))
    assert "never fires" in str(e) and e.rule == "r"


def test_escalation_targets_are_checked_against_the_configuration() -> None:
    text = ESCALATIONS.replace(", then: first", "")
    e = error_of(text, groups={"sre": {"a"}}, people={"a"})
    assert "unknown group or person 'security'" in str(e)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("45", 45)])
def test_durations(text: str, seconds: float) -> None:
    policy = parse_policy(f"version: 1\nreview: {{timeout: {text}}}\n")
    assert policy.default_review.timeout_s == seconds


def test_a_bad_duration_is_named() -> None:
    e = error_of("version: 1\nreview:\n  timeout: soon\n")
    assert e.field == "review.timeout" and e.line == 3 and "invalid duration" in str(e)


def test_a_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")


def test_recursive_yaml_aliases_are_refused() -> None:
    with pytest.raises(PolicyError):
        parse_policy("version: 1\nvars: &a\n  x: *a\n")


def test_an_empty_file_is_refused() -> None:
    assert "empty" in str(error_of(""))


def test_a_yaml_boolean_where_text_belongs_gets_a_hint() -> None:
    e = error_of("version: 1\nrules:\n  - {id: off, tool: x, outcome: deny}\n")
    assert e.field == "id" and "quote it" in str(e)


ROUNDS = """\
version: 1
default: review
rules:
  - id: a
    tool: "*"
    outcome: allwo
    when: facts.sql.read_olny
    reason: "reads {facts.sql.tabels}"
  - id: a
    tool: "*"
    outcome: allow
    reason: "from {fact.urls.hosts}"
  - id: c
    tool: "*"
    outcome: deny
    when: "facts.sql.writes &&"
    extra_field: 1
"""


def test_schema_cel_template_and_duplicate_problems_come_in_one_round() -> None:
    """A file with schema problems still has its conditions, reasons and ids checked: one run lists every problem,
    instead of a round of fixes for each kind."""
    e = error_of(ROUNDS)
    assert isinstance(e, PolicyErrors)
    found = {(p.rule, p.field, p.line): str(p) for p in e.problems}
    assert set(found) == {("a", "outcome", 6), ("c", "extra_field", 17), ("a", "when", 7), ("a", "reason", 8),
                          ("a", "id", 9), ("a", "reason", 12), ("c", "when", 16)}, found
    assert "did you mean 'facts.sql.read_only'?" in found[("a", "when", 7)]
    assert "duplicate rule id" in found[("a", "id", 9)]
    assert "does not compile" in found[("c", "when", 16)]


def test_a_reason_naming_a_fact_that_does_not_exist_is_an_error_with_a_suggestion() -> None:
    e = error_of(GOOD + '    reason: "reads {facts.sql.tabels}"\n')
    assert e.field == "reason" and e.rule == "sql-read"
    assert "unknown fact 'facts.sql.tabels'" in str(e) and "did you mean 'facts.sql.tables'?" in str(e)
    family = error_of(GOOD + '    reason: "reads {facts.sqll.tables}"\n')
    assert "unknown fact family 'facts.sqll'" in str(family) and "did you mean 'facts.sql'?" in str(family)
    root = error_of(GOOD + '    reason: "reads {fact.sql.tables}"\n')
    assert "did you mean {facts.sql.tables}?" in str(root)
    # Real facts, their families and the other variables stay fine.
    parse_policy(GOOD + '    reason: "{facts.sql.tables} {facts.sql} {facts.self_target} {args.query} {tool}"\n')
