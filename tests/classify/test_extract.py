"""extract_facts as the gate calls it: every family present, hostile input never raises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.classify import KINDS, REDACTED, ClassifyContext, Redaction, empty_facts, extract_facts
from server.errors import ClassifierError

CTX = ClassifyContext(roots=(Path("/srv/agent"),), keyturn_urls=("http://127.0.0.1:8765",))


def test_every_family_is_present_for_a_tool_with_no_classifiers() -> None:
    f = extract_facts("anything", {"x": 1}, {}, {}, CTX)
    assert set(empty_facts()) <= set(f)
    assert f["sql"]["kinds"] == [] and f["shell"]["programs"] == [] and f["self_target"] is False


def test_facts_are_json_serialisable() -> None:
    args = {"query": "SELECT 1; DELETE FROM t", "command": "curl x | sh", "path": "../x", "url": "http://[::1]:8765/"}
    kinds = {"query": "sql", "command": "shell", "path": "path", "url": "url"}
    f = extract_facts("t", args, kinds, {"readOnlyHint": True}, CTX)
    assert json.loads(json.dumps(f)) == f


def test_annotations_are_normalised() -> None:
    f = extract_facts("t", {}, {}, {"readOnlyHint": True, "destructiveHint": "yes", "title": "T"}, CTX)
    assert f["annotations"] == {
        "read_only": True,
        "destructive": None,
        "idempotent": None,
        "open_world": None,
        "title": "T",
    }


def test_an_unknown_classifier_kind_is_a_configuration_error() -> None:
    with pytest.raises(ClassifierError, match="unknown classifier kind"):
        extract_facts("t", {"q": "x"}, {"q": "sqll"}, {}, CTX)
    with pytest.raises(ClassifierError, match="dialect"):
        extract_facts("t", {"q": "x"}, {"q": "sql:klingon"}, {}, CTX)


def test_a_dialect_is_honoured() -> None:
    f = extract_facts("t", {"q": "SELECT `a` FROM `t`"}, {"q": "sql:mysql"}, {}, CTX)
    assert f["sql"]["read_only"] and f["sql"]["tables"] == ["t"]


def test_several_sql_arguments_merge() -> None:
    f = extract_facts("t", {"a": "SELECT 1", "b": "DELETE FROM x"}, {"a": "sql", "b": "sql:postgres"}, {}, CTX)
    assert f["sql"]["statements"] == 2 and "delete" in f["sql"]["kinds"] and not f["sql"]["read_only"]


def test_a_non_string_sql_argument_fails_closed() -> None:
    f = extract_facts("t", {"q": {"nested": 1}}, {"q": "sql"}, {}, CTX)
    assert f["sql"]["unparseable"] and f["classifier_errors"]


def test_sizes_and_declared_env() -> None:
    f = extract_facts("t", {"rows": 5000, "body": "x" * 10, "stage": "prod"}, {"rows": "size", "stage": "env"}, {}, CTX)
    assert f["size"]["max"] == 5000 and f["size"]["total_chars"] == 14
    assert f["env"]["prod"]


def test_redact_masks_declared_secrets() -> None:
    args = {"name": "db", "value": "correct horse battery staple"}
    f = extract_facts("secrets_rotate", args, {"value": "secret"}, {}, CTX)
    assert Redaction.of(args, f).arguments == {"name": "db", "value": REDACTED}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=200),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
hostile_text = st.sampled_from(
    ["'", '"', "$(", "`", "\x00", "; rm -rf /", "/*!", "../../", "http://[", "eyJ", "\\", "\n", "|| sh", "%00", "🙂"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=json_values | st.lists(hostile_text, max_size=8).map("".join),
    kind=st.sampled_from([*sorted(KINDS - {"sql"}), "sql", "sql:postgres"]),
)
def test_extract_facts_never_raises_on_hostile_input(value: object, kind: str) -> None:
    f = extract_facts("t", {"x": value, "y": [value]}, {"x": kind}, {}, CTX)
    json.dumps(f)
    Redaction.of({"x": value}, f)
