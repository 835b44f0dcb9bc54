"""`keyturn audit tail`'s one line per event: every end says what it recorded (a digest, or why there is none),
and policy events say what happened, without `--json`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio

from server.cli.main import _event_line
from server.config import Settings, ToolPack
from server.gate import Identity
from server.models import Event
from server.runtime import running
from tests.helpers import outcome_of


def line(kind: str, payload: dict[str, Any], call_id: str | None = "c1") -> str:
    return _event_line(Event(seq=7, ts=0.0, kind=kind, call_id=call_id, payload=payload, prev_hash="0", hash="1"))


def test_an_executed_call_shows_its_result_digest() -> None:
    shown = line("executed", {"result_digest": "ab" * 32, "is_error": False})
    assert f"result sha256 {'ab' * 32}" in shown and "None" not in shown


def test_a_failed_call_says_whether_it_has_an_error_result_or_why_it_has_none() -> None:
    assert f"error result sha256 {'cd' * 32}" in line("failed", {"result_digest": "cd" * 32, "is_error": True})
    shown = line("failed", {"error": "ToolError: no such table: orders"})
    assert "no result: ToolError: no such table: orders" in shown and "sha256" not in shown
    assert "no result: none recorded" in line("executed", {})
    noted = line("failed", {"error": "the caller cancelled the call while it ran", "cancelled_by": "caller"})
    assert "the caller cancelled the call while it ran" in noted


def test_policy_events_and_a_caller_leaving_say_why() -> None:
    rejected = line("policy.rejected", {"path": "p.yaml", "error": "rule 'x', field 'when', line 5: bad"}, None)
    assert "not applied" in rejected and "line 5" in rejected
    assert "12 rules, digest 0123456789ab" in line("policy.loaded", {"rules": 12, "digest": "0123456789abcdef"}, None)
    assert "the caller's connection closed" in line("client.left", {"reason": "the caller's connection closed"})


async def test_audit_show_tells_a_refusal_before_any_policy_plainly(tmp_path: Path) -> None:
    """A call whose arguments are not valid for its tool is refused before the policy is asked: `audit show` says
    so, instead of `risk None; None; policy None` and an empty hash."""
    (tmp_path / "policy.yaml").write_text("version: 1\ndefault: allow\n")
    (tmp_path / "root").mkdir()
    settings = Settings(db=tmp_path / "k.db", policy=tmp_path / "policy.yaml",
                        tools=(ToolPack(module="tools.files", options={"roots": [str(tmp_path / "root")]}),))
    async with running(settings) as kt:
        tool = kt.find_tool("files_read")
        assert tool is not None
        refused = await kt.gate.call(tool, {"path": 42}, Identity(principal="agent"))
    call_id = outcome_of(refused)["call_id"]
    shown = await anyio.run_process([sys.executable, "-m", "server.cli", "audit", "show", call_id,
                                     "--db", str(tmp_path / "k.db")], check=False)
    stdout = shown.stdout.decode()
    assert shown.returncode == 0, shown.stderr
    assert "decision: none: denied by keyturn before the policy was asked" in stdout, stdout
    assert "None" not in stdout.split("decision:")[1].splitlines()[0]
    # One word for the end, the ledger's and the agent's, and no placeholder where arguments are not kept.
    assert outcome_of(refused)["outcome"] == "denied" and "outcome: denied: invalid arguments" in stdout, stdout
    assert "«unclassified»" not in stdout and "arguments: not kept" in stdout, stdout
    assert "by keyturn: invalid arguments" in stdout and "[invalid_arguments]" in stdout, stdout
