"""The per-call shortcuts of the gate's hot path give exactly what the long way gives.

- the one-scan literal prefilter never drops a pattern the per-pattern literal test would run;
- `Redaction.of(..., rescan=False)` masks what a full re-scan masks;
- the ledger's compact facts restore to the very facts the policy decided on.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from server.classify import ClassifyContext, Redaction, extract_facts
from server.classify import secrets as S
from server.policy.engine import compact_facts, complete_facts

LITERAL_TEXT = st.lists(
    st.sampled_from([*"akeystokenpbrwdcKEYSTOKEN_-=:/ \u017f\u212a\u0130", "AKIA", "sk-", "eyJ", "://", "key", "token"]),
    max_size=20,
).map("".join)


def candidates_the_long_way(text: str) -> list[tuple[str, re.Pattern[str]]]:
    lowered = text.lower()
    out = []
    for name, pattern in S.PATTERNS:
        insensitive, literals = S._LITERALS[name]
        hay = lowered if insensitive else text
        if any(lit in hay for lit in literals):
            out.append((name, pattern))
    return out


@settings(max_examples=400, deadline=None)
@given(LITERAL_TEXT | st.text(max_size=60))
def test_the_prefilter_never_drops_a_candidate(text: str) -> None:
    assert set(candidates_the_long_way(text)) <= set(S._candidates(text))


def test_case_folded_literals_still_count() -> None:
    # U+212A KELVIN SIGN lower-cases to "k": "\u212aey=..." is a password assignment to the long way too.
    text = "api_\u212aey=abcdefgh123"
    assert {n for n, _ in candidates_the_long_way(text)} <= {n for n, _ in S._candidates(text)}
    assert S._candidates("hello from the benchmark") == []


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30)
    | st.sampled_from(["password=hunter22", "AKIAIOSFODNN7EXAMPLE", "Bearer abcdefghijklmnop1234", "plain"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["text", "token", "api_key", "headers", "q", "password", "note"]), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["text", "token", "query", "headers", "body"]), JSONISH, max_size=4))
def test_redacting_with_the_gates_facts_equals_a_full_rescan(arguments: dict[str, object]) -> None:
    facts = extract_facts("t", arguments, {}, {}, ClassifyContext())
    assert Redaction.of(arguments, facts, rescan=False).arguments == Redaction.of(arguments, facts).arguments


def test_nothing_to_mask_returns_the_arguments_themselves() -> None:
    arguments = {"text": "hello"}
    facts = extract_facts("t", arguments, {}, {}, ClassifyContext())
    assert Redaction.of(arguments, facts, rescan=False).arguments is arguments
    with_secret = {"text": "PGPASSWORD=hunter22 psql"}
    masked = Redaction.of(with_secret, extract_facts("t", with_secret, {}, {}, ClassifyContext()), rescan=False).arguments
    assert "hunter22" not in str(masked) and with_secret["text"] == "PGPASSWORD=hunter22 psql"


def test_compact_facts_restore_exactly() -> None:
    arguments = {"q": "DELETE FROM prod_users", "note": "password=hunter22"}
    facts = complete_facts(extract_facts("t", arguments, {"q": "sql"}, {"destructiveHint": True}, ClassifyContext()))
    compact = compact_facts(facts)
    assert complete_facts(compact) == facts
    assert compact["sql"]["destructive"] is True and "shell" not in compact and "paths" not in compact
    assert compact_facts(complete_facts({})) == {}


def test_compact_facts_keep_a_value_that_only_equals_the_default_in_python() -> None:
    facts = complete_facts({"sql": {"present": 0}, "self_target": 0, "hints": {"rows": 3}})
    compact = compact_facts(facts)
    assert compact == {"sql": {"present": 0}, "self_target": 0, "hints": {"rows": 3}}
    restored = complete_facts(compact)
    assert type(restored["sql"]["present"]) is int and type(restored["self_target"]) is int
