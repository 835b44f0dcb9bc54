"""README.md's quick tour, run to the letter: the commands are read from the README itself, so a change to the
tour that no longer works fails here.

What the test adds to the README's commands: it runs them in a scratch directory holding a copy of `examples/`,
with this environment's `keyturn` on the PATH (the suite installed it with the README's own `pip install -e .`,
so that half of the first command is not repeated), and it puts the real request ids where the README says
`REQUEST_ID`. The port is the README's own, 8765: the test fails with a clear message when it is taken.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(section: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block in the README section titled `section`."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    part = text[start:end if end != -1 else None]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", part, re.S)]


def commands(body: str) -> list[str]:
    """The shell commands of a block, each without its trailing `# comment`."""
    out = []
    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def serve_command() -> list[str]:
    """The README's first command, the part after the install: `.venv/bin/keyturn serve ...`."""
    first = re.search(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert first, "the README has no command block"
    last = first.group(1).strip().split("&&")[-1].strip()
    words = shlex.split(last)
    assert words[:2] == [".venv/bin/keyturn", "serve"], f"the README's first command changed: {last}"
    return ["keyturn", *words[1:]]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed one's TIME_WAIT is no bar
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def tour_dir(tmp_path: Path) -> Iterator[Path]:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    yield tmp_path


def run(cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def pending_ids(cwd: Path, env: dict[str, str]) -> list[dict[str, object]]:
    out = run("keyturn pending --json", cwd, env)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["requests"])


def held_with(words: str, cwd: Path, env: dict[str, str]):  # type: ignore[no-untyped-def]
    return lambda: [r for r in pending_ids(cwd, env) if words in json.dumps(r["arguments"])]


def wait_for(pred, what: str, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_quick_tour_as_written(tour_dir: Path) -> None:
    serve = serve_command()
    port = int(serve[serve.index("--http") + 1].rsplit(":", 1)[1])
    assert port_is_free(port), f"port {port}, the README's, is taken: the quick tour cannot run here"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for var in ("KEYTURN_URL", "KEYTURN_TOKEN", "KEYTURN_DB", "KEYTURN_CONFIG"):
        env.pop(var, None)

    agent_block, reviewer_block = [body for lang, body in blocks("Quick tour") if lang == "sh"]
    agent_cmds, reviewer_cmds = commands(agent_block), commands(reviewer_block)
    banner_lines = [ln for lang, body in blocks("Quick tour") if lang == "" for ln in body.splitlines()
                    if ln.strip() and ln.strip() != "..."]

    server = subprocess.Popen(serve, cwd=tour_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    agent: subprocess.Popen[str] | None = None
    try:
        banner: list[str] = []
        assert server.stdout is not None
        while len(banner) < len(banner_lines):
            line = server.stdout.readline()
            assert line, "keyturn serve ended before its banner:\n" + "".join(banner)
            banner.append(line.rstrip("\n"))
        assert banner == banner_lines, "the banner differs from the README's"

        # The agent's block: everything before the demo agent runs to its end; the agent itself waits on reviewers.
        *setup, agent_cmd = agent_cmds
        assert agent_cmd.startswith("python examples/demo_agent.py"), agent_cmd
        for cmd in setup:
            done = run(cmd, tour_dir, env)
            assert done.returncode == 0, f"{cmd}: {done.stderr}"
        agent = subprocess.Popen(agent_cmd, shell=True,
                                 cwd=tour_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        # The reviewer's block, in order, once the first held call waits (as a reader would see it in the
        # agent's terminal); REQUEST_ID is the request the line's comment names.
        wait_for(lambda: pending_ids(tour_dir, env), "the first held call")
        results: list[tuple[str, str]] = []
        for cmd, line in zip(reviewer_cmds, [ln for ln in reviewer_block.splitlines() if ln.strip()], strict=True):
            comment = line.split("#", 1)[1] if "#" in line else ""
            if "REQUEST_ID" in cmd:
                statement = re.search(r"the (DROP TABLE|CREATE TABLE)", comment)
                assert statement, f"the README's comment no longer says which request: {line}"
                held = wait_for(held_with(statement.group(1), tour_dir, env), f"the held {statement.group(1)}")
                cmd = cmd.replace("REQUEST_ID", str(held[0]["id"]))
            done = run(cmd, tour_dir, env)
            assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
            results.append((cmd, done.stdout))

        out, _ = agent.communicate(timeout=60)
        assert agent.returncode == 0, out
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        for proc in (server, agent):
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()

    # What the README says happens, happened: the SELECT ran at once, the DROP TABLE was denied with the reviewer's
    # reason, the CREATE TABLE ran once approved.
    calls = out.split("\n\n")
    select = next(c for c in calls if c.startswith("sql_query"))
    drop = next(c for c in calls if "DROP TABLE" in c.splitlines()[0])
    create = next(c for c in calls if "CREATE TABLE" in c.splitlines()[0])
    assert "  ok: " in select and "waiting for human approval" not in select
    assert "waiting for human approval" in drop and "ERROR: Denied by reviewer" in drop and "not today" in drop
    assert "waiting for human approval" in create and "  ok: " in create
    said = {" ".join(c.split()[1:3] if c.split()[1] == "audit" else c.split()[1:2]): text for c, text in results}
    assert set(said) == {"pending", "deny", "approve", "audit tail", "audit verify"}, sorted(said)
    assert "DROP TABLE customers" in said["pending"], said["pending"]
    assert "denied" in said["deny"] and "approved" in said["approve"], (said["deny"], said["approve"])
    for kind in ("decision", "vote", "denied", "approval.granted", "execution.started", "executed"):
        assert kind in said["audit tail"], f"{kind} missing from audit tail:\n{said['audit tail']}"
    assert "chain intact" in said["audit verify"], said["audit verify"]

    # Everything the tour leaves behind in a checkout is ignored by git.
    made = [p.name for p in tour_dir.iterdir() if p.name != "examples"]
    assert made, "the tour created nothing"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(made),
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(made), f"not git-ignored: {sorted(set(made) - set(ignored))}"
