"""One call's redaction: a secret found in the arguments is masked wherever keyturn lets data leave, and nothing else is.

The secrets here are of three sorts: a declared one (the tool says the argument is a secret: nothing in the value
itself looks secret, so only the facts can tell), a secret-named field, and a secret-looking span inside a command.
"""

from __future__ import annotations

import json
import time
from typing import Any

from server.channels.slack.blocks import request_message
from server.channels.teams.cards import card_json, request_card
from server.classify import REDACTED, ClassifyContext, Redaction, extract_facts
from server.models import Decision, RequestView
from server.policy import parse_policy
from server.policy.testing import call_for

DECLARED = "correct horse battery staple"
NAMED = "hunter2-and-more"
PATTERN = "ghp_" + "RedactionUnit" + "0123456789abcdefghijklmnopq"
CLASSIFIERS = {"value": "secret", "path": "path"}


def arguments() -> dict[str, Any]:
    return {"value": DECLARED, "login": {"user": "bob", "password": NAMED},
            "command": f"git push https://x:{PATTERN}@github.com/o/r", "path": f"/srv/{DECLARED}/notes", "n": 3}


def redaction_of(args: dict[str, Any]) -> Redaction:
    return Redaction.of(args, extract_facts("t", args, CLASSIFIERS, {}, ClassifyContext()), rescan=False)


def test_a_secret_in_the_arguments_is_masked_in_the_redacted_arguments() -> None:
    args = arguments()
    r = redaction_of(args)
    assert r.arguments == {"value": REDACTED, "login": {"user": "bob", "password": REDACTED},
                           "command": f"git push https://x:{REDACTED}@github.com/o/r", "path": f"/srv/{REDACTED}/notes",
                           "n": 3}  # the declared secret is masked where another argument quotes it, too
    assert args == arguments()  # the arguments themselves are untouched: they are what runs
    assert set(r.values) == {DECLARED, NAMED, PATTERN}
    assert list(r.values) == sorted(r.values, key=len, reverse=True)  # the longest first: no half-masked secret


def test_an_error_message_quoting_a_secret_is_concealed() -> None:
    r = redaction_of(arguments())
    error = f"RuntimeError: upstream refused {DECLARED!r} for bob (password {NAMED}); token {PATTERN} revoked"
    assert r.conceal(error) == (f"RuntimeError: upstream refused '{REDACTED}' for bob (password {REDACTED}); "
                                f"token {REDACTED} revoked")
    # A secret-looking span is masked even when it is not one of the arguments'.
    other = "AKIA" + "REDACTIONUNIT234"
    assert other not in r.conceal(f"no such key {other}") and REDACTED in r.conceal(f"no such key {other}")


def test_a_nested_result_is_scrubbed_and_keeps_its_shape() -> None:
    r = redaction_of(arguments())
    result = {"content": [{"type": "text", "text": f"logged in with {NAMED}"}],
              "structuredContent": {"rows": [[1, DECLARED], (2, f"x{PATTERN}y")], "ok": True, "count": 2},
              "isError": False}
    scrubbed = r.scrub(result)
    assert scrubbed == {"content": [{"type": "text", "text": f"logged in with {REDACTED}"}],
                        "structuredContent": {"rows": [[1, REDACTED], [2, f"x{REDACTED}y"]], "ok": True, "count": 2},
                        "isError": False}
    assert r.scrub(f"{DECLARED}!") == f"{REDACTED}!"


def test_a_message_to_a_reviewers_channel_never_shows_the_secret() -> None:
    """Slack and Teams render the request from what the gate records: the redacted arguments and the decision the
    engine made with the same redaction, whose reasons quote an argument and a fact that hold the declared secret."""
    policy = parse_policy("version: 1\nrules:\n  - {id: r, tool: '*', outcome: review, risk: high, "
                          "reason: 'reads {facts.paths.all} with {args.value}'}\n")
    args = arguments()
    facts = extract_facts("files_read", args, CLASSIFIERS, {}, ClassifyContext())
    r = Redaction.of(args, facts, rescan=False)
    decision = policy.decide(call_for("files_read", args), facts, redaction=r)
    assert DECLARED not in json.dumps(decision.model_dump(mode="json"))
    assert decision.outcome == "review" and decision.risk == "high" and decision.policy_digest == policy.digest
    view = recorded_view(r.arguments, decision)
    slack = json.dumps(request_message(view), ensure_ascii=False)
    teams = json.dumps(card_json(request_card(view)), ensure_ascii=False)
    for message in (slack, teams):
        assert DECLARED not in message and NAMED not in message and PATTERN not in message
        assert REDACTED in message and "bob" in message and "/notes" in message


def recorded_view(redacted: dict[str, Any], decision: Decision) -> RequestView:
    rules = [{"id": m.id, "outcome": m.outcome, "risk": m.risk, "reason": m.reason} for m in decision.rules]
    return RequestView(id="req-1", tool="files_read", principal="agent", on_behalf_of=None, model=None, args_hash="h",
                       arguments=redacted, state="pending", risk=decision.risk, reason=decision.reason, rules=rules,
                       review=decision.review, created=time.time(), expires=time.time() + 600, votes=[],
                       policy_digest=decision.policy_digest)


def test_a_value_that_is_not_a_secret_is_left_alone() -> None:
    args = {"note": "token bucket of 5", "sha": "a" * 40, "query": "SELECT password_hash FROM users", "user": "bob"}
    r = redaction_of(args)
    assert r.arguments is args and r.values == ()
    text = "bob: token bucket of 5 (SELECT password_hash FROM users)"
    assert r.conceal(text) == text and r.scrub({"t": [text]}) == {"t": [text]}
    # Beside a secret, the words around it stay: only the secret itself goes.
    r = redaction_of({"user": "bob", "password": "hunter22"})
    assert r.conceal("login bob:hunter22 refused; hunter2 is not it") == f"login bob:{REDACTED} refused; hunter2 is not it"


def test_rescan_masks_without_facts_and_the_facts_add_declared_secrets() -> None:
    args = arguments()
    facts = extract_facts("t", args, CLASSIFIERS, {}, ClassifyContext())
    # Without facts, every string is scanned again: the named field and the secret-looking span are still masked,
    # but nothing says `value` was declared a secret.
    lost = Redaction.of(args, {})
    assert lost.arguments["login"]["password"] == REDACTED and PATTERN not in lost.arguments["command"]
    assert lost.arguments["value"] == DECLARED
    # With the facts, a full rescan and the gate's shortcut agree.
    assert Redaction.of(args, facts).arguments == Redaction.of(args, facts, rescan=False).arguments
    # A declared secret that is not text is masked whole, and only the facts know it.
    structured = {"value": {"k": 1}}
    found = extract_facts("t", structured, {"value": "secret"}, {}, ClassifyContext())
    assert Redaction.of(structured, found, rescan=False).arguments == {"value": REDACTED}
    assert Redaction.of(structured, {}).arguments == structured
    # The shortcut trusts facts that found nothing: the arguments themselves, not a copy.
    clean = {"text": "hello"}
    assert Redaction.of(clean, extract_facts("t", clean, {}, {}, ClassifyContext()), rescan=False).arguments is clean
    assert Redaction.of(clean, {}).arguments == clean and Redaction.of(clean, {}).arguments is not clean


def test_a_guess_never_raises_and_still_masks_what_looks_secret() -> None:
    assert Redaction.guess({"password": NAMED}).conceal(f"bad {NAMED}") == f"bad {REDACTED}"
    deep: Any = PATTERN
    for _ in range(5000):
        deep = [deep]
    for hopeless in ("not a mapping", {"x": deep}, {"n": float("nan")}):
        r = Redaction.guess(hopeless)
        assert r.conceal(f"refused {PATTERN}") == f"refused {REDACTED}"
