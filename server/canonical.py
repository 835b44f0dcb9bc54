"""Canonical JSON and hashes: the byte form that approvals are bound to and the ledger chains."""

from __future__ import annotations

import hashlib
import json
from typing import Any

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""One encoder for every call (`json.dumps` with options builds a new one each time)."""


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept as is."""
    return _ENCODER.encode(value)


def sha256_hex(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def args_hash(arguments: dict[str, Any]) -> str:
    """The hash an approval is bound to: tool arguments in canonical JSON."""
    return sha256_hex(canonical_json(arguments))
