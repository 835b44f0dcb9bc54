"""What a call would touch, in one line a reviewer reads before approving, and the facts a tool measured merged in.

A tool measures before the policy decides (`GuardedTool.impact`: the rows a SQL write matches and its table's size)
or knows cheaply (`GuardedTool.hint`: whether a file exists and its size, what the shell sandbox lets a command
write). `describe_impact` turns those facts into the line every card shows: "would delete 1,204 of 50,311 rows in
orders", "impact unknown: counting the rows took longer than 2s", "sandbox: read-only".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["describe_impact", "with_measured"]


def with_measured(facts: Mapping[str, Any], measured: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`facts` with a tool's measured facts merged into their families (a family's fields replaced one by one)."""
    out = dict(facts)
    for family, values in measured.items():
        current = out.get(family)
        out[family] = {**current, **values} if isinstance(current, Mapping) else dict(values)
    return out


def describe_impact(facts: Mapping[str, Any]) -> str | None:
    """The reviewer's line on what the call would touch, or None when nothing says."""
    parts = [p for p in (_sql(facts.get("sql")), _file(_hint(facts, "file")), _sandbox(facts)) if p]
    return "; ".join(parts) or None


def _sql(sql: Any) -> str | None:
    if not isinstance(sql, Mapping) or not sql.get("impact"):
        return None
    if sql.get("impact") != "measured":
        return f"impact unknown: {sql.get('impact_reason') or 'not measured'}"
    rows, total, table, verb = sql.get("rows_affected"), sql.get("table_rows"), sql.get("impact_table"), sql.get(
        "impact_verb")
    if not isinstance(rows, int) or not isinstance(total, int):
        return "impact unknown: not measured"
    if verb == "insert":
        return f"would insert {rows:,} {_rows(rows)} into {table} (it has {total:,})"
    return f"would {verb} {rows:,} of {total:,} {_rows(total)} in {table}"


def _rows(n: int) -> str:
    return "row" if n == 1 else "rows"


def _hint(facts: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    hints = facts.get("hints")
    value = hints.get(name) if isinstance(hints, Mapping) else None
    return value if isinstance(value, Mapping) else None


def _file(file: Mapping[str, Any] | None) -> str | None:
    if file is None:
        return None
    parts = []
    if "exists" in file:
        if not file["exists"]:
            parts.append("the target does not exist yet")
        elif isinstance(file.get("size"), int):
            parts.append(f"the target exists ({file['size']:,} bytes)")
        else:
            parts.append("the target exists")
    if isinstance(file.get("files"), int):
        more = "+" if file.get("files_capped") else ""
        parts.append(f"{file['files']:,}{more} {'file' if file['files'] == 1 else 'files'}")
    if isinstance(file.get("write_bytes"), int):
        parts.append(f"writes {file['write_bytes']:,} bytes")
    return ", ".join(parts) or None


def _sandbox(facts: Mapping[str, Any]) -> str | None:
    box = _hint(facts, "sandbox")
    if box is None:
        return None
    if not box.get("enabled"):
        return "no sandbox: the command runs as keyturn itself and can write wherever keyturn can"
    shell = facts.get("shell")
    net = ", with network" if box.get("network") else ", no network"
    if isinstance(shell, Mapping) and shell.get("read_only") is True:
        return f"sandbox: read-only{net}"
    roots = [str(r) for r in box.get("writable", []) if isinstance(r, str)]
    return f"sandbox: may write only in {', '.join(roots) or '(nothing)'}{net}"
