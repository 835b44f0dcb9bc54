"""One call's redaction: made once from the call's arguments and what the classifiers found, applied wherever
data leaves keyturn.

`Redaction.of(arguments, facts)` masks the arguments (a secret-named or declared field whole, a secret-looking
span in place, and those secrets again wherever another argument quotes them) and keeps the secret values it
masked. It then offers what each place needs:

- `arguments`: the redacted copy, for the ledger and the reviewers (Slack, Teams and the inbox render from it);
- `scrub(value)`: any text or JSON-like structure (a decision's facts and reasons, a result) with every secret
  found in the arguments masked wherever it is quoted;
- `conceal(text)`: a message keyturn says or writes (an error for the agent, the ledger or the log): scrubbed,
  and every secret-looking span masked as well.

`Redaction.guess(arguments)` is for arguments that could not be classified (invalid, or the classifiers
failed): it never raises, so masking is never why a refusal fails.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.classify.secrets import REDACTED, classify_secrets, mask, pointer


@dataclass(eq=False, slots=True)
class Redaction:
    """What one call's secrets are, and how to keep them from leaving keyturn."""

    arguments: dict[str, Any]
    """The redacted arguments. When nothing was masked, the arguments themselves (not a copy: do not change it)."""
    values: tuple[str, ...] = ()
    """The secret strings masked in the arguments, longest first (so no secret is left half masked)."""

    @classmethod
    def of(cls, arguments: Mapping[str, Any], facts: Mapping[str, Any] | None = None, *,
           rescan: bool = True) -> Redaction:
        """Whole values for named/declared fields (from `facts["secrets"]`), secret-looking spans elsewhere.

        Every string is scanned again, so a caller without facts still gets a masked copy. `rescan=False` is for
        the caller that has just computed `facts` from these very `arguments` (the gate): when they found no
        secret at all, nothing can be masked and the arguments are kept as they are."""
        found = facts.get("secrets") if isinstance(facts, Mapping) else None
        found = found if isinstance(found, Mapping) else None
        if not rescan and found is not None and found.get("present") is False and not found.get("whole"):
            return cls(arguments if isinstance(arguments, dict) else dict(arguments))
        whole = set(found.get("whole", ())) if found is not None else set()
        declared = [w.split("/")[1] for w in whole if w.count("/") == 1]
        whole |= set(classify_secrets(arguments, declared)["whole"])
        redacted = _redact(copy.deepcopy(dict(arguments)), (), whole)
        values = _replaced(arguments, redacted)
        # A secret found in one argument may be quoted in another (`mysql -p<password>`): masked there too.
        return cls(_scrub(redacted, values) if values else redacted, values)

    @classmethod
    def guess(cls, arguments: Any) -> Redaction:
        """For arguments without facts: what a scan of their own finds. Never raises; when even that fails (not a
        mapping, too deep), only the secret-looking spans of `conceal` are masked."""
        try:
            return cls.of(arguments)
        except Exception:
            return cls({})

    def scrub(self, value: Any) -> Any:
        """`value` (text, or a JSON-like structure: keys are kept) with every secret of the arguments masked."""
        hidden = self.values
        return _scrub(value, hidden) if hidden else value

    def conceal(self, text: str) -> str:
        """`text` (a message, which may quote the arguments) with the arguments' secrets and every secret-looking
        span masked. For whatever keyturn records or says about the call."""
        return mask(self.scrub(text))


def _redact(value: Any, parts: tuple[str | int, ...], whole: set[str]) -> Any:
    if parts and pointer(parts) in whole:
        return REDACTED
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: _redact(v, (*parts, str(k)), whole) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, (*parts, i), whole) for i, v in enumerate(value)]
    return value


def _replaced(original: Any, redacted: Any) -> tuple[str, ...]:
    """The strings of `original` that redaction replaced, longest first."""
    found: set[str] = set()

    def walk(a: Any, b: Any) -> None:
        if isinstance(a, str) and a != b:
            if not isinstance(b, str) or b == REDACTED:
                found.add(a)
                return
            # b is a with some spans replaced by REDACTED: recover those spans.
            pieces, pos = b.split(REDACTED), 0
            for before, after in itertools.pairwise(pieces):
                start = a.find(before, pos) + len(before) if before else pos
                end = a.find(after, start) if after else len(a)
                if start < 0 or end < start:
                    found.add(a)
                    return
                found.add(a[start:end])
                pos = end
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in a:
                walk(a[k], b.get(k))
        elif isinstance(a, list) and isinstance(b, list):
            for x, y in zip(a, b, strict=False):
                walk(x, y)

    walk(original, redacted)
    return tuple(sorted((v for v in found if v), key=len, reverse=True))


def _scrub(value: Any, hidden: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for secret in hidden:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, hidden) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, hidden) for v in value]
    return value
