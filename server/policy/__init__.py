"""The policy room: a YAML file of rules -> a compiled policy that turns a call and its facts into a Decision.

- `schema`: the file's shape (pydantic, extra="forbid")
- `loader`: YAML with line numbers, validation, precise errors (`load_policy`, `parse_policy`)
- `conditions`: CEL conditions and reason templates, compiled once
- `engine`: `CompiledPolicy.decide` / `.explain`
- `live`: `LivePolicy`, hot reload keeping the last good policy
- `testing`: policy test cases; `cli`: the `keyturn policy ...` subcommands
"""

from __future__ import annotations

from server.policy.engine import CompiledPolicy, CompiledRule, combine_reviews, complete_facts
from server.policy.live import LivePolicy
from server.policy.loader import PolicyErrors, load_policy, parse_policy

__all__ = [
    "CompiledPolicy",
    "CompiledRule",
    "LivePolicy",
    "PolicyErrors",
    "combine_reviews",
    "complete_facts",
    "load_policy",
    "parse_policy",
]
