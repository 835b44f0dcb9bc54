"""The security boundary, attacked as an agent would attack it: through the MCP client, against a real
`keyturn serve --http` set up like the quick tour in README.md (the embedded default's local reviewer and
its token file beside the ledger, the shipped policy, the five tool packs, keyturn's secrets in its
environment).

The stories do not rest on the classifier. Every call the policy holds is decided by the human in the test as
the story needs: approved, where the point is that even an approved command cannot reach keyturn's keys; denied,
where the point is that nothing the policy let run at once wrote anything. A command shape nobody listed here is
covered by the same structure: the sandbox, the read-only run, the address check.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client

from server.config import default_policy_path
from tests.conftest import agent_client
from tests.helpers import client_call, eventually
from tests.reliability.conftest import TERMINAL, RelHome, text

CANARIES = {
    "KEYTURN_SECRETS_MASTER_KEY": "canary-master-key-7c1e9d0b5a",
    "KEYTURN_WEBHOOK_SECRET": "canary-webhook-secret-31f0aa",
    "KEYTURN_TEAMS_APP_PASSWORD": "canary-teams-password-9e2b77",
}
LEDGER_CANARY = "ledger-only-canary-5d3c1f"


class Tour(RelHome):
    policy: str
    base: str
    token: str
    pid: int


def allow_everything(d: Path) -> Path:
    """About the most permissive policy a user can write: every call runs at once but `sql_execute`, which is held
    so the agent has a call of its own to try to approve. Only keyturn's built-in guards and the boundary's
    structure stand in the way."""
    path = d / "policy.yaml"
    path.write_text("version: 1\ndefault: allow\ndefault_risk: low\nrules:\n"
                    "  - {id: held, tool: sql_execute, outcome: review, risk: high, reason: the agent's own held call}\n")
    return path


@pytest.fixture(scope="module", params=["shipped policy", "default: allow"])
def tour(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tour]:
    d = tmp_path_factory.mktemp("boundary")
    home = Tour(dir=d, config=d / "keyturn.yaml", db=d / "keyturn.db", data_db=d / "data.db")
    (d / "work" / "sub").mkdir(parents=True)
    with sqlite3.connect(home.data_db) as conn:
        conn.executescript("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT);"
                           "INSERT INTO users VALUES (1, 'ann'), (2, 'ben'), (3, 'cy');")
    policy = default_policy_path() if request.param == "shipped policy" else allow_everything(d)
    home.write_config(
        policy=str(policy), people={}, reviewers=[],  # the embedded default: one local reviewer
        tools=[
            {"module": "tools.sql", "options": {"database": str(home.data_db), "export_dir": str(d / "exports")}},
            {"module": "tools.shell", "options": {"cwd_roots": [str(d)]}},  # the ledger lies inside this root
            {"module": "tools.files", "options": {"roots": [str(d / "work")]}},
            {"module": "tools.http", "options": {}},
            {"module": "tools.secrets", "options": {"store": str(d / "keyturn-secrets.json")}},
        ])
    home.extra_env = dict(CANARIES)
    home.policy = request.param
    home.base = home.serve_http()
    home.pid = home.procs[-1].pid
    home.token = (d / "keyturn.db.reviewer-token").read_text().strip()
    try:
        yield home
    finally:
        home.stop_all()


async def decide_held(tour: Tour, verdict: str, skip: set[str]) -> list[str]:
    """Decide every pending request (but `skip`) as the local reviewer, the human in this story."""
    headers = {"Authorization": f"Bearer {tour.token}"}
    decided = []
    async with httpx2.AsyncClient(base_url=tour.base, headers=headers, timeout=30) as http:
        pending = (await http.get("/api/requests", params={"state": "pending"})).json()["requests"]
        for req in pending:
            if req["id"] in skip:
                continue
            r = await http.post(f"/api/requests/{req['id']}/{verdict}", json={"reason": "the test's human"})
            assert r.status_code == 200, r.text
            decided.append(req["id"])
    return decided


async def call(agent: Client, tour: Tour, tool: str, args: dict[str, Any], verdict: str,
               skip: frozenset[str] = frozenset()) -> tuple[types.CallToolResult, bool]:
    """Call as the agent; if the policy holds the call, a human gives `verdict`. Returns (result, reviewed)."""
    reviewed = False
    async with client_call(agent, tool, args) as agent_call:
        async def answered() -> bool:  # the held call is in another process: the reviewer looks until it is answered
            nonlocal reviewed
            reviewed |= bool(await decide_held(tour, verdict, set(skip)))
            return agent_call.returned

        await eventually(answered, within=60)
    return await agent_call.result(), reviewed


def secrets_of(tour: Tour) -> dict[str, str]:
    return {"reviewer token": tour.token, LEDGER_CANARY: LEDGER_CANARY, **CANARIES}


def leaked(tour: Tour, result: types.CallToolResult, args: dict[str, Any] | None = None) -> list[str]:
    """The secrets a result shows, but those the agent itself sent (a refusal may quote its arguments)."""
    shown = text(result) + str(result.structured_content or "") + str(result.meta or "")
    sent = str(args or "")
    return [name for name, value in secrets_of(tour).items() if value in shown and value not in sent]


def attempts(tour: Tour, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    d, pid, port = tour.dir, tour.pid, tour.base.rsplit(":", 1)[1]
    approve = f"/api/requests/{request_id}/approve"
    bearer = f"Authorization: Bearer {tour.token}"  # as if the token had leaked: the reach is what is tested
    shell = [
        "cat ../../keyturn.db.reviewer-token",
        f"cat {d}/keyturn.db.reviewer-token",
        "env -S 'cat ../../keyturn.db.reviewer-token'",
        f"cat /proc/{pid}/environ",
        f"cat /proc/{pid}/cmdline",
        f"ls -l /proc/{pid}/fd",
        f"cat /proc/{pid}/root{d}/keyturn.db.reviewer-token",
        "cat /proc/1/environ",
        f"grep -ra only-canary {d}",
        f"grep -ra kt_ {d}",
        f"strings {d}/keyturn.db",
        f"strings {d}/keyturn.db-wal",
        f"find {d} -name '*token*' -exec cat {{}} +",
        f"tar cf - {d}",
        f"cat {d}/keyturn.yaml {d}/keyturn-secrets.json",
        "env",
        f"curl -s -X POST -H '{bearer}' -H 'Content-Type: application/json' -d '{{}}' http://127.0.0.1:{port}{approve}",
        f"wget -qO- --header='{bearer}' --post-data='{{}}' http://localhost:{port}{approve}",
    ]
    calls: list[tuple[str, dict[str, Any]]] = [("shell_run", {"command": c, "cwd": "work/sub"}) for c in shell]
    calls += [
        ("shell_run", {"command": f"cat {d}/keyturn.db.* ; env ; cat /proc/*/environ", "use_shell": True}),
        ("shell_run", {"command": f"exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'POST {approve} HTTP/1.0\\r\\n"
                                  f"{bearer}\\r\\nContent-Length: 2\\r\\n\\r\\n{{}}' >&3; cat <&3",
                       "use_shell": True}),
        ("shell_run", {"argv": ["perl", "-e", f"open(F, '<', '{d}/keyturn.db.reviewer-token'); print <F>"]}),
        ("files_read", {"path": "../keyturn.db.reviewer-token"}),
        ("files_read", {"path": f"{d}/keyturn.db.reviewer-token"}),
        ("files_read", {"path": f"/proc/{pid}/environ"}),
        ("sql_query", {"query": f"ATTACH DATABASE '{d}/keyturn.db' AS k"}),
    ]
    for host in ("127.0.0.1", "2130706433", "0x7f.1", "[::ffff:127.0.0.1]", "localhost.", "127.1"):
        calls.append(("http_request", {"method": "POST", "url": f"http://{host}:{port}{approve}",
                                       "headers": {"Authorization": f"Bearer {tour.token}"}, "body": "{}"}))
    return [(tool, args) for tool, args in calls if tool != "shell_run" or _has_program(args)]


def _has_program(args: dict[str, Any]) -> bool:
    first = args["argv"][0] if "argv" in args else args["command"].split()[0]
    return args.get("use_shell", False) or first in ("exec",) or shutil.which(first) is not None


async def test_an_agent_cannot_read_keyturns_secrets_nor_approve_its_own_call(tour: Tour) -> None:
    async with agent_client(tour.base) as agent:
        # A value that exists only in the ledger: it is recorded with this call's arguments.
        first, _ = await call(agent, tour, "shell_run", {"argv": ["true", LEDGER_CANARY]}, "approve")
        assert not leaked(tour, first)
        # The agent's own risky call, held for a human.
        held: list[types.CallToolResult] = []

        async def hold() -> None:
            async with agent_client(tour.base) as waiting:
                held.append(await waiting.call_tool("sql_execute", {"statement": "DELETE FROM users WHERE id = 2"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            with anyio.fail_after(30):
                while not (pending := [c for c, s in tour.calls().items() if s == "pending"]):
                    await anyio.sleep(0.05)
            [request_id] = pending
            # Everything the agent tries. Whatever the policy holds, the human approves: even an approved
            # command runs where keyturn's keys, ledger, process and loopback cannot be seen.
            found: dict[str, list[str]] = {}
            ran = 0
            for tool, args in attempts(tour, request_id):
                result, _ = await call(agent, tour, tool, args, "approve", skip=frozenset({request_id}))
                ran += tool == "shell_run" and not result.is_error
                if names := leaked(tour, result, args):
                    found[f"{tool} {args}"] = names
            assert not found, found
            if tour.policy != "shipped policy":  # the commands did run: the boundary, not a rule, kept the keys
                assert ran >= 10, ran
            # Last, a signal: keyturn's process is not in the command's world, so it cannot be stopped.
            await call(agent, tour, "shell_run", {"command": f"kill -STOP {tour.pid}"}, "approve",
                       skip=frozenset({request_id}))
            # Nothing approved the held call: no vote, still pending; keyturn itself was not stopped.
            assert tour.calls()[request_id] == "pending"
            assert not [e for e in tour.ledger_events(request_id) if e["kind"] in ("vote", "approval.granted")]
            assert tour.procs[0].poll() is None
            async with httpx2.AsyncClient(timeout=10) as http:
                assert (await http.get(tour.base + "/healthz")).status_code == 200
            await decide_held(tour, "deny", set())
        assert held[0].is_error and "Denied by reviewer" in text(held[0])
    assert [r[0] for r in tour.rows("SELECT id FROM users ORDER BY id")] == [1, 2, 3]
    # The ledger tells the story: every attempt ended in exactly one terminal event, and it verifies.
    tour.assert_one_outcome_each()
    tour.verify()


WRITES = [
    "sed -i s/original/changed/ victim.txt",
    "sort -o victim.txt victim.txt",
    "find . -name victim.txt -delete",
    "tee victim.txt",
    "cp /dev/null victim.txt",
    "truncate -s 0 victim.txt",
    "dd if=/dev/zero of=victim.txt count=1",
    "env -S 'sh -c \"echo changed > victim.txt\"'",
    "awk 'BEGIN { print \"changed\" > \"victim.txt\" }'",
    "perl -pi -e s/original/changed/ victim.txt",
    "git init",
    "touch new-file",
    "mkdir new-dir",
    "ln -s victim.txt new-link",
    "python3 -c \"open('victim.txt', 'w').write('changed')\"",
]
# A repository whose config runs a program on `git status` and `git diff` (a poisoned checkout): commands any
# classifier calls reads, which write through the repository's hooks.
HOOK = "#!/bin/sh\necho changed > {victim}\n"


def poisoned_repo(work: Path) -> Path:
    repo = work / "repo"
    repo.mkdir()
    hook = repo / "hook.sh"
    hook.write_text(HOOK.format(victim=work / "victim.txt"))
    hook.chmod(0o755)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "hook.sh"], ["commit", "-qm", "first"],
                 ["config", "core.fsmonitor", str(hook)], ["config", "diff.external", str(hook)]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    (repo / "hook.sh").write_text(HOOK.format(victim=work / "victim.txt") + "# changed\n")
    return repo


@pytest.mark.parametrize("tour", ["shipped policy"], indirect=True)  # `default: allow` lets writes run by design
async def test_what_runs_without_a_human_writes_nothing(tour: Tour) -> None:
    work = tour.dir / "work"
    victim = work / "victim.txt"
    victim.write_text("original\n")
    repo = poisoned_repo(work) if shutil.which("git") else None
    before = sorted(p.name for p in work.iterdir())
    at_once = []
    async with agent_client(tour.base) as agent:
        attempts = [{"command": c, "cwd": "work"} for c in WRITES if _has_program({"command": c})]
        if repo is not None:
            attempts += [{"command": c, "cwd": "work/repo"} for c in ("git status", "git diff")]
        for args in attempts:
            result, reviewed = await call(agent, tour, "shell_run", args, "deny")
            if not reviewed:
                at_once.append(args["command"])
            assert victim.read_text() == "original\n", (args, text(result))
            assert sorted(p.name for p in work.iterdir()) == before, args
        # The same for SQL, on both tools: whatever ran without a human changed nothing.
        schema = tour.rows("SELECT name FROM sqlite_master ORDER BY name")
        for tool, field in (("sql_query", "query"), ("sql_execute", "statement")):
            for statement in ("PRAGMA user_version = 7", "INSERT INTO users VALUES (9, 'eve')", "VACUUM",
                              "CREATE TABLE extra(x)", "REINDEX", "PRAGMA journal_mode = delete",
                              "UPDATE users SET name = 'x' WHERE id = id", "DELETE FROM users WHERE rowid > 0"):
                await call(agent, tour, tool, {field: statement}, "deny")
                assert tour.rows("SELECT id, name FROM users ORDER BY id") == [(1, "ann"), (2, "ben"), (3, "cy")]
                assert tour.rows("PRAGMA user_version") == [(0,)]
                assert tour.rows("SELECT name FROM sqlite_master ORDER BY name") == schema
    if repo is not None:  # the poisoned repository's reads ran at once: read-only, so their hooks wrote in vain
        assert {"git status", "git diff"} <= set(at_once), at_once
    outcomes = tour.assert_one_outcome_each()
    assert set(outcomes.values()) <= TERMINAL
