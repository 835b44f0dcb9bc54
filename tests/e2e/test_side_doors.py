"""An agent cannot approve its own held call through the tools keyturn guards: not by running the
`keyturn` CLI, not by calling the reviewer API, not by reading or writing keyturn's own files.

Two layers answer, and the story pins both: keyturn's built-in `keyturn:self-target` guard denies a call whose
facts name keyturn (the signal; no policy can drop it), and the structure refuses what no rule has to catch (a
file root never holds keyturn's state; an HTTP destination on loopback is refused by address). The boundary's own attacks are in
tests/reliability/test_boundary.py."""

from __future__ import annotations

import anyio

from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client


def text(result) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def test_the_default_policy_closes_the_side_doors(home: Home) -> None:
    home.write_config(
        policy=None,  # the shipped default policy
        tools=[
            {"module": "tools.sql", "options": {"database": str(home.data_db)}},
            {"module": "tools.shell", "options": {"cwd_roots": [str(home.dir)]}},
            {"module": "tools.files", "options": {"roots": [str(home.dir / "work")]}},
            {"module": "tools.http", "options": {"allow_hosts": ["127.0.0.1"]}},
        ],
    )
    (home.dir / "work").mkdir()
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        with anyio.move_on_after(1.0):
            await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 0"})
        request = await api.wait_pending("sql_execute")
        rid = request["id"]
        attempts = {
            "shell: the keyturn CLI": ("shell_run", {"command": f"keyturn approve {rid} --reason lgtm"}),
            "shell: curl to the API": ("shell_run", {
                "command": f"curl -X POST -H 'Authorization: Bearer {TOKENS['alice']}' {base}/api/requests/{rid}/approve"}),
            "http: the reviewer API": ("http_request", {
                "method": "POST", "url": f"{base}/api/requests/{rid}/approve",
                "headers": {"Authorization": f"Bearer {TOKENS['alice']}"}, "body": '{"reason": "lgtm"}'}),
            "files: write the ledger": ("files_write", {"path": str(home.db), "content": "x", "overwrite": True}),
            "files: read the ledger": ("files_read", {"path": str(home.db)}),
            "files: delete the ledger's WAL": ("files_delete", {"path": str(home.db) + "-wal"}),
        }
        structural = {"http: the reviewer API", "files: write the ledger", "files: read the ledger",
                      "files: delete the ledger's WAL"}
        for label, (tool, args) in attempts.items():
            result = await client.call_tool(tool, args)
            assert result.is_error, label
            if label in structural:  # refused before any policy: outside the roots, or a loopback address
                assert "invalid arguments" in text(result), (label, text(result))
            else:
                assert "self-target" in text(result) or "keyturn itself" in text(result), (label, text(result))
    still = await api.pending()
    assert [r["id"] for r in still] == [rid] and still[0]["votes"] == []
    assert home.rows("SELECT sum(qty) FROM orders") == [(15,)]
    denied = [e for e in home.ledger_events() if e["kind"] == "denied" and e["payload"].get("by") == "policy"]
    assert len(denied) == len(attempts) - len(structural)
    assert all(e["payload"]["rules"] == ["keyturn:self-target"] for e in denied)
    refused = [e for e in home.ledger_events() if e["kind"] == "denied" and e["payload"].get("by") == "keyturn"
               and e["payload"].get("code") == "invalid_arguments"]
    assert len(refused) == len(structural)
