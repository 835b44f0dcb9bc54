"""Secret-looking values -> facts, and the pattern scan that masks them (`redaction.Redaction` applies both).

Two signals: a value that *looks* like a credential (AWS keys, JWTs, private keys, provider
tokens, passwords inside URLs) wherever it appears, and a value stored under a key that *names*
a credential (`password`, `api_key`, `Authorization` ...). Pattern hits are masked in place so a
reviewer still sees the rest of a command; a value under a secret-named key is masked whole.
Facts never contain the secret itself, only where it was (JSON pointers) and what kind it looked like.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

REDACTED = "«redacted»"

PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "private_key",
        re.compile(
            r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----(?:[^-]++|-(?!----END))*+"
            r"(?:-----END (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----)?"
        ),
    ),
    ("aws_access_key_id", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[0-9A-Z]{16}\b")),
    (
        "aws_secret_access_key",
        re.compile(r"(?i)secret_?access_?key[\"']?\s*[:=]\s*[\"']?(?P<s>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"),
    ),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})")),
    ("gitlab_token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    ("slack_webhook", re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/]+")),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
    ("stripe_key", re.compile(r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}")),
    ("anthropic_key", re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}")),
    ("openai_key", re.compile(r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{32,}")),
    ("npm_token", re.compile(r"\bnpm_[A-Za-z0-9]{36}")),
    ("bearer_token", re.compile(r"(?i)\b(?:bearer|token|basic)\s+(?P<s>[A-Za-z0-9._~+/=-]{16,})")),
    ("url_password", re.compile(r"://[^/\s:@]+:(?P<s>[^/\s@]+)@")),
    (
        "password_assignment",
        re.compile(
            r"(?i)(?:p(?:assword|asswd|wd)|secret|a(?:pi_?key|ccess_?token|uth_?token))[A-Za-z_]*[\"']?\s*[:=]\s*[\"']?"
            r"(?!\$\{?[A-Za-z_])(?P<s>[^\s\"',;&]{6,})"
        ),
    ),
)
_SECRET_KEY_NAME = re.compile(
    r"(?i)^(?:.*[_-])?(?:password|passwd|passphrase|secret|token|api[_-]?key|apikey|private[_-]?key|"
    r"credentials?|client[_-]?secret|authorization|cookie|session[_-]?id|x[_-]api[_-]key)$"
)
_MIN_NAMED_LEN = 1


def empty() -> dict[str, Any]:
    return {"present": False, "fields": [], "kinds": [], "whole": []}


def pointer(parts: tuple[str | int, ...]) -> str:
    """A JSON pointer (RFC 6901) for a path into the arguments."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def walk_strings(value: Any, parts: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string in a JSON-like value, with its path. Dict keys are paths, not values."""
    if isinstance(value, str):
        yield parts, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from walk_strings(v, (*parts, str(k)))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from walk_strings(v, (*parts, i))


# A regex scan costs about 100 ns a character; a substring test costs almost nothing. Each pattern
# runs only when one of its literals is present (in the lower-cased text for case-insensitive ones).
_LITERALS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "private_key": (False, ("-----BEGIN",)),
    "aws_access_key_id": (False, ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA")),
    "aws_secret_access_key": (True, ("access",)),
    "jwt": (False, ("eyJ",)),
    "github_token": (False, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    "gitlab_token": (False, ("glpat-",)),
    "slack_token": (False, ("xox",)),
    "slack_webhook": (False, ("hooks.slack.com",)),
    "google_api_key": (False, ("AIza",)),
    "stripe_key": (False, ("k_live_", "k_test_")),
    "anthropic_key": (False, ("sk-ant-",)),
    "openai_key": (False, ("sk-",)),
    "npm_token": (False, ("npm_",)),
    "bearer_token": (True, ("bearer", "token", "basic")),
    "url_password": (False, ("://",)),
    "password_assignment": (True, ("password", "passwd", "pwd", "secret", "key", "token")),
}


_ANY_LITERAL = re.compile("|".join(re.escape(lit) for insensitive, lits in _LITERALS.values() if not insensitive for lit in lits))
_ANY_LITERAL_I = re.compile(
    "|".join(re.escape(lit) for insensitive, lits in _LITERALS.values() if insensitive for lit in lits), re.IGNORECASE)
"""One scan for any literal at all: most strings have none, and then no pattern can match."""


def _candidates(text: str) -> list[tuple[str, re.Pattern[str]]]:
    if _ANY_LITERAL.search(text) is None and _ANY_LITERAL_I.search(text) is None:
        return []
    lowered: str | None = None
    out = []
    for name, pattern in PATTERNS:
        insensitive, literals = _LITERALS[name]
        if insensitive and lowered is None:
            lowered = text.lower()
        hay = lowered if insensitive and lowered is not None else text
        if any(lit in hay for lit in literals):
            out.append((name, pattern))
    return out


def find_kinds(text: str) -> list[str]:
    return [name for name, pattern in _candidates(text) if pattern.search(text)]


def mask(text: str) -> str:
    """`text` with every secret-looking span replaced (only the secret part where the pattern names it)."""
    for _, pattern in _candidates(text):
        if "s" in pattern.groupindex:
            text = pattern.sub(_mask_group, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


def _mask_group(m: re.Match[str]) -> str:
    whole, start = m.group(0), m.start()
    return whole[: m.start("s") - start] + REDACTED + whole[m.end("s") - start :]


def classify_secrets(arguments: Mapping[str, Any], declared: list[str]) -> dict[str, Any]:
    """Where secret-looking values are. `declared` are argument names declared of kind "secret"."""
    facts = empty()
    fields: list[str] = []
    whole: list[str] = []
    kinds: list[str] = []
    for name in declared:
        if name in arguments and not isinstance(arguments[name], str) and arguments[name] is not None:
            fields.append(pointer((name,)))
            whole.append(pointer((name,)))
            kinds.append("declared")
    for parts, text in walk_strings(arguments):
        where = pointer(parts)
        named = (
            (parts and parts[0] in declared)
            or any(isinstance(p, str) and _SECRET_KEY_NAME.match(p) for p in parts)
            or _header_pair_secret(arguments, parts)
        )
        if named and len(text) >= _MIN_NAMED_LEN:
            fields.append(where)
            whole.append(where)
            kinds.append("declared" if parts and parts[0] in declared else "named_field")
            continue
        found = find_kinds(text)
        if found:
            fields.append(where)
            kinds.extend(found)
    facts["fields"] = fields
    facts["whole"] = whole
    facts["kinds"] = list(dict.fromkeys(kinds))
    facts["present"] = bool(fields)
    return facts


def _header_pair_secret(arguments: Mapping[str, Any], parts: tuple[str | int, ...]) -> bool:
    """Headers given as a list of [name, value] pairs: the value of an Authorization pair is secret."""
    if len(parts) < 2 or parts[-1] != 1:
        return False
    node: Any = arguments
    for p in parts[:-1]:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return False
    return (
        isinstance(node, list) and len(node) == 2 and isinstance(node[0], str) and bool(_SECRET_KEY_NAME.match(node[0]))
    )
