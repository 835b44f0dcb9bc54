"""keyturn in front of two real third-party MCP servers, mcp-server-git (PyPI) and the filesystem server (npm),
over stdio as a desktop agent runs it: the same tools, reads allowed, destructive calls held for a human and
run exactly as approved, denied calls with no effect on disk, every call in the ledger."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from tests.conftest import ReviewerAPI
from tests.proxy.conftest import FS_SERVER, GIT_SERVER, ProxyHome, fs_upstream, git, git_upstream, text


def _dumped(tools: Any) -> dict[str, dict[str, Any]]:
    return {t.name: t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools.tools}


async def test_tools_are_re_exposed_exactly_as_the_upstreams_list_them(home: ProxyHome, files: Path) -> None:
    home.configure([git_upstream(), fs_upstream(files)])
    direct: dict[str, dict[str, Any]] = {}
    node = shutil.which("node")
    assert node is not None
    with anyio.fail_after(60):
        for params in (StdioServerParameters(command=str(GIT_SERVER)),
                       StdioServerParameters(command=node, args=[str(FS_SERVER), str(files)])):
            async with Client(params) as upstream:
                direct.update(_dumped(await upstream.list_tools()))
        async with Client(home.proxy_params()) as client:
            proxied = _dumped(await client.list_tools())
    assert {"git_commit", "git_reset", "git_status", "read_text_file", "write_file", "move_file"} <= set(direct)
    assert set(proxied) == set(direct) | {"keyturn_status", "keyturn_cancel"}
    for name, tool in direct.items():
        tool.pop("execution", None)  # task support: keyturn forwards plain calls only
        assert proxied[name] == tool, name  # description, input and output schemas, annotations, title, _meta


async def test_reads_run_at_once_and_writes_wait_for_a_human(home: ProxyHome, repo: Path, files: Path) -> None:
    home.configure([git_upstream(repo), fs_upstream(files)])
    api = ReviewerAPI(home.serve_http())  # the reviewer API: another keyturn process on the same ledger
    results: dict[str, Any] = {}
    with anyio.fail_after(90):
        async with Client(home.proxy_params()) as client:
            status = await client.call_tool("git_status", {"repo_path": str(repo)})
            assert not status.is_error and "notes.txt" in text(status)
            read = await client.call_tool("read_text_file", {"path": str(files / "hello.txt")})
            assert not read.is_error and "hello from disk" in text(read)

            async def agent(tool: str, arguments: dict[str, Any]) -> None:
                results[tool] = await client.call_tool(tool, arguments)

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent, "git_commit", {"repo_path": str(repo), "message": "agent: add notes"})
                req = await api.wait_pending("git_commit")
                assert req["arguments"] == {"repo_path": str(repo), "message": "agent: add notes"}
                assert git(repo, "log", "--format=%s") == "initial commit\n"  # nothing ran while held
                assert (await api.vote(req["id"], "approve", "alice", "looks right")).status_code == 200
            assert not results["git_commit"].is_error, text(results["git_commit"])
            assert git(repo, "log", "--format=%s").splitlines() == ["agent: add notes", "initial commit"]

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent, "write_file", {"path": str(files / "plan.md"), "content": "# the plan\n"})
                held = await api.wait_pending("write_file")
                assert held["risk"] == "high" and not (files / "plan.md").exists()
                assert (await api.vote(held["id"], "approve", "carol", "ok")).status_code == 200
            assert not results["write_file"].is_error, text(results["write_file"])
            assert (files / "plan.md").read_text() == "# the plan\n"
    for request_id in (req["id"], held["id"]):
        events = home.ledger_events(request_id)
        kinds = [e["kind"] for e in events]
        assert kinds.count("execution.started") == 1 and kinds[-1] == "executed"
        assert events[-1]["payload"]["result_digest"]


async def test_denied_calls_never_reach_the_upstream(home: ProxyHome, repo: Path, files: Path) -> None:
    home.configure([git_upstream(repo), fs_upstream(files)])
    api = ReviewerAPI(home.serve_http())
    with anyio.fail_after(90):
        async with Client(home.proxy_params()) as client:
            # the built-in classifiers say `path` is a path: the policy sees a credentials file
            secret = await client.call_tool("write_file", {"path": str(files / ".env"), "content": "TOKEN=x"})
            assert secret.is_error and "credential files are off limits" in text(secret)
            reset = await client.call_tool("git_reset", {"repo_path": str(repo)})
            assert reset.is_error and "Denied by policy" in text(reset)
            results = []

            async def agent() -> None:
                results.append(await client.call_tool("move_file", {
                    "source": str(files / "hello.txt"), "destination": str(files / "gone.txt")}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                req = await api.wait_pending("move_file")
                assert (await api.vote(req["id"], "deny", "alice", "keep it where it is")).status_code == 200
            assert results[0].is_error and "keep it where it is" in text(results[0])
    assert not (files / ".env").exists()
    assert (files / "hello.txt").exists() and not (files / "gone.txt").exists()
    assert "notes.txt" in git(repo, "diff", "--cached", "--name-only")  # still staged: git_reset never ran
    denied = [e for e in home.ledger_events() if e["kind"] == "denied"]
    assert [e["payload"]["by"] for e in denied] == ["policy", "policy", "reviewer"]


async def test_an_upstream_error_comes_back_as_a_tool_error_with_its_message(
        home: ProxyHome, files: Path, tmp_path: Path) -> None:
    home.configure([fs_upstream(files)])
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            result = await client.call_tool("read_text_file", {"path": str(outside)})
            bad = await client.call_tool("read_text_file", {"paths": ["x"]})
    assert result.is_error and "outside allowed directories" in text(result).lower().replace("access denied - ", "")
    assert bad.is_error and "argument 'path' is required" in text(bad)
    terminal = [e for e in home.ledger_events() if e["kind"] in {"executed", "failed", "denied"}]
    assert [e["kind"] for e in terminal] == ["failed", "denied"]  # it ran and failed; invalid: denied by keyturn
    assert terminal[0]["payload"]["result_digest"]  # the upstream's answer, recorded by its digest
    assert terminal[1]["payload"]["code"] == "invalid_arguments" and terminal[1]["payload"]["by"] == "keyturn"
