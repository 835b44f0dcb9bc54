"""The `keyturn policy` subcommands: check, explain, test."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from server.cli.policy import cmd_check, cmd_explain, cmd_test
from server.config import Person, Settings
from tests.policy.conftest import POLICIES

SUITES = sorted(POLICIES.glob("**/*.tests.yaml"))


@pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])
def test_the_shipped_policies_pass_their_own_tests(suite: Path) -> None:
    out = io.StringIO()
    code = cmd_test(suite, out=out)
    assert code == 0, out.getvalue()
    assert " 0 failed" in out.getvalue()


def test_there_are_suites_for_the_default_and_the_examples() -> None:
    assert {s.name for s in SUITES} >= {
        "default.tests.yaml", "data-platform.tests.yaml", "infrastructure.tests.yaml", "read-only-agent.tests.yaml",
    }  # fmt: skip


def test_a_failing_case_fails_the_run_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\ndefault: review\nrules:\n  - {id: all, tool: '*', outcome: allow}\n")
    (tmp_path / "p.tests.yaml").write_text(
        "policy: p.yaml\ncases:\n"
        "  - {name: allowed, tool: t, expect: {outcome: allow}}\n"
        "  - {name: wrongly expected, tool: t, expect: {outcome: deny, rules: [nope]}}\n"
    )
    out = io.StringIO()
    assert cmd_test(tmp_path / "p.tests.yaml", out=out) == 1
    text = out.getvalue()
    assert "PASS  p.tests.yaml:3  allowed" in text
    assert "FAIL  p.tests.yaml:4  wrongly expected" in text
    assert "expected outcome deny, got allow" in text and "expected rule 'nope' to match" in text
    assert "1 passed, 1 failed" in text


def test_a_suite_whose_policy_is_broken_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nrules:\n  - {id: x, tool: t, outcome: nope}\n")
    (tmp_path / "p.tests.yaml").write_text("policy: p.yaml\ncases: []\n")
    assert cmd_test(tmp_path / "p.tests.yaml") == 1
    assert "rule 'x'" in capsys.readouterr().err


def test_check_says_ok_with_the_digest(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_check(POLICIES / "default.yaml") == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "rules, digest " in out


def test_check_lists_every_problem_with_its_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nrules:\n"
        "  - {id: a, tool: t, outcome: allow, when: 'facts.sql.nope'}\n"
        "  - {id: b, tool: t, outcome: review, review: {approvers: [{group: dbas}]}}\n"
    )
    settings = Settings(people={"alice": Person(groups=("dba",))})
    assert cmd_check(bad, settings) == 1
    err = capsys.readouterr().err
    assert f"error: file {bad}, line 3, rule 'a', field 'when': unknown fact 'facts.sql.nope'" in err
    assert f"error: file {bad}, line 4, rule 'b', field 'review.approvers[0].group'" in err
    assert "2 problems" in err


def test_the_default_policy_checks_against_the_embedded_single_reviewer_config() -> None:
    settings = Settings(people={"local": Person()})
    assert cmd_check(POLICIES / "default.yaml", settings, out=io.StringIO()) == 0


def test_explain_prints_the_decision_and_the_rules_that_matched() -> None:
    out = io.StringIO()
    code = cmd_explain(
        POLICIES / "default.yaml", "sql_execute", '{"statement": "DELETE FROM orders"}', "agent", None, out=out
    )
    text = out.getvalue()
    assert code == 0
    assert "decision  REVIEW  risk critical" in text
    assert "MATCH sql-mass-change" in text and "2 from any reviewer" in text
    assert "needs     2 approvals from any reviewer (different people)" in text
    assert "timeout   30m: sql-mass-change sets the highest bar" in text
    assert "sql.delete_without_where = true" in text


def test_explain_as_json_has_the_trace() -> None:
    out = io.StringIO()
    cmd_explain(POLICIES / "default.yaml", "shell_run", '{"command": "rm -rf /usr"}', "agent", None, as_json=True, out=out)
    trace = json.loads(out.getvalue())
    assert trace["decision"]["outcome"] == "deny"
    assert any(r["id"] == "shell-catastrophic" and r["matched"] for r in trace["rules"])
    assert trace["classifiers"] == {"command": "shell", "argv": "argv", "cwd": "path"}


def test_explain_with_explicit_classifiers_and_masked_arguments() -> None:
    out = io.StringIO()
    args = json.dumps({"q": "SELECT 1", "password": "hunter2"})
    assert cmd_explain(POLICIES / "default.yaml", "custom", args, "agent", None, classifiers={"q": "sql"}, out=out) == 0
    text = out.getvalue()
    assert "hunter2" not in text and "«redacted»" in text


def test_explain_refuses_arguments_that_are_not_a_json_object() -> None:
    out = io.StringIO()
    assert cmd_explain(POLICIES / "default.yaml", "t", "{not json", "agent", None, out=out) == 2
    assert cmd_explain(POLICIES / "default.yaml", "t", "[1]", "agent", None, out=out) == 2


@pytest.mark.parametrize(
    ("name", "people"),
    [
        ("data-platform.yaml", {"alice": ("dba",), "carol": ("dba",), "gita": ("governance",), "sam": ("security",)}),
        ("infrastructure.yaml", {"ana": ("sre",), "ben": ("sre",), "sam": ("security",)}),
        ("read-only-agent.yaml", {"local": ()}),
    ],
)
def test_the_examples_check_against_the_people_they_document(name: str, people: dict[str, tuple[str, ...]]) -> None:
    settings = Settings(people={p: Person(groups=g) for p, g in people.items()})
    out = io.StringIO()
    assert cmd_check(POLICIES / "examples" / name, settings, out=out) == 0, out.getvalue()
    assert "warning" not in out.getvalue()


def test_check_warns_about_functions_cel_does_not_have(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - {id: a, tool: t, outcome: deny, when: 'args.x.frobnicate()'}\n")
    out = io.StringIO()
    assert cmd_check(path, out=out) == 0
    assert "warning: rule 'a' (line 3): unknown function 'frobnicate'" in out.getvalue()


def test_check_with_a_config_names_the_rules_its_reviewers_can_never_approve(tmp_path: Path) -> None:
    embedded = Settings(db=tmp_path / "ledger.db")  # no reviewers configured: the one local reviewer
    out = io.StringIO()
    assert cmd_check(POLICIES / "default.yaml", embedded, out=out) == 0  # a warning, not an error
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: rule {rule!r} can never be approved: "
                        "2 from any reviewer but only 1 reviewer(s) can: owner"
                        for rule in ("sql-mass-change", "sql-large-change", "sql-impact-unknown")]
    two = Settings(db=tmp_path / "ledger.db", people={"alice": Person(), "bob": Person()})
    out = io.StringIO()
    assert cmd_check(POLICIES / "default.yaml", two, out=out) == 0
    assert "warning" not in out.getvalue()
    out = io.StringIO()
    assert cmd_check(POLICIES / "default.yaml", out=out) == 0  # without a config, nobody to count
    assert "warning" not in out.getvalue()


def test_explain_takes_measured_facts_and_shows_the_impact() -> None:
    out = io.StringIO()
    measured = json.dumps({"sql": {"impact": "measured", "impact_known": True, "rows_affected": 1204,
                                   "table_rows": 50311, "impact_table": "orders", "impact_verb": "delete"}})
    code = cmd_explain(POLICIES / "default.yaml", "sql_execute", '{"statement": "DELETE FROM orders WHERE s = 1"}',
                       "agent", None, out=out, measured_json=measured)
    text = out.getvalue()
    assert code == 0
    assert "MATCH sql-large-change" in text and "needs     2 approvals from any reviewer" in text
    assert "impact    would delete 1,204 of 50,311 rows in orders" in text
    unknown = io.StringIO()
    assert cmd_explain(POLICIES / "default.yaml", "sql_execute", '{"statement": "DELETE FROM orders WHERE s = 1"}',
                       "agent", None, out=unknown, measured_json='{"sequel": {}}') == 2
    assert "--facts must be a JSON object of fact families" in unknown.getvalue()


def test_a_policy_test_case_with_an_unknown_fact_family_fails(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nrules: []\n")
    (tmp_path / "p.tests.yaml").write_text(
        "policy: p.yaml\ncases:\n  - name: typo\n    tool: t\n    facts: {sqll: {rows_affected: 3}}\n"
        "    expect: {outcome: review}\n")
    out = io.StringIO()
    assert cmd_test(tmp_path / "p.tests.yaml", out=out) == 1
    assert "unknown fact family 'sqll'" in out.getvalue()
