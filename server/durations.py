"""Durations as people write them in YAML (`30s`, `15m`, `2h`, `1h30m`, or a number of seconds), for the policy
and the configuration alike."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$"
)


def parse_duration(value: Any) -> float:
    """Seconds from `30s`, `15m`, `2h`, `1d`, `1h30m`, or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like 30s, 15m, 2h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m or not any(m.groups()):
            raise ValueError(f"invalid duration {value!r}: use e.g. 30s, 15m, 2h, 1h30m or a number of seconds")
        d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = d * 86400 + h * 3600 + mi * 60 + s
    else:
        raise ValueError("a duration must be a number of seconds or a string like 30s, 15m, 2h")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
