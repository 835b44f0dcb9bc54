"""A user's mistakes at the command line: one clear line, exit code 2, no traceback, nothing recorded that did not
happen. Each story runs the real `keyturn` command in a fresh folder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

KEYTURN = [sys.executable, "-m", "server.cli"]


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KEYTURN, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def _one_clear_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("keyturn: "), lines
    return lines[0]


def test_a_missing_policy_file_is_one_line_and_no_ledger_is_made(tmp_path: Path) -> None:
    p = _run(["serve", "--policy", "nonexist.yaml", "--db", str(tmp_path / "k.db")], tmp_path)
    line = _one_clear_line(p)
    assert "nonexist.yaml" in line and "No such file" in line
    assert not (tmp_path / "k.db").exists()  # nothing was opened, nothing recorded


def test_a_busy_port_is_one_line_before_anything_starts_or_is_recorded(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = _run(["serve", "--http", f"127.0.0.1:{port}", "--db", str(tmp_path / "k.db")], tmp_path)
    line = _one_clear_line(p)
    assert f"127.0.0.1:{port}" in line and "in use" in line and "--http" in line
    assert "keyturn is running" not in p.stderr
    assert not (tmp_path / "k.db").exists()  # no `process.started` for a process that never served


def test_a_ledger_where_a_file_stands_in_the_way_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    p = _run(["serve", "--db", str(tmp_path / "afile" / "k.db")], tmp_path)
    line = _one_clear_line(p)
    assert "afile" in line and "not a folder" in line


def test_a_ledger_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "k.db").write_text("this is not a database\n" * 100)
    p = _run(["serve", "--db", str(tmp_path / "k.db")], tmp_path)
    line = _one_clear_line(p)
    assert "k.db" in line
    assert "Event loop is closed" not in p.stderr


def test_stdio_serving_with_stdin_from_dev_null_ends_at_its_end(tmp_path: Path) -> None:
    """`keyturn serve < /dev/null` (no client): the input ends at once, and so does keyturn."""
    p = _run(["serve", "--db", str(tmp_path / "k.db")], tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "Operation not permitted" not in p.stderr, p.stderr


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`keyturn audit tail | head -1`: the reader went away; keyturn stops without a BrokenPipeError traceback."""
    db = tmp_path / "k.db"
    assert _run(["serve", "--db", str(db)], tmp_path, timeout=300).returncode == 0  # a ledger with events
    reader, writer = socket.socketpair()
    reader.close()  # the reader is gone before keyturn writes a byte
    with writer:
        p = subprocess.run([*KEYTURN, "audit", "tail", "--db", str(db)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                           stdout=writer.fileno(), stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    p = _run(["--version"], tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == f"keyturn {version('keyturn')}", (p.stdout, p.stderr)


def test_the_banner_prints_the_exact_reviewer_commands_and_they_work(tmp_path: Path) -> None:
    """A server on another port and ledger: the banner's `keyturn pending ...` is the command that reaches it, run
    from another folder; with the wrong ledger's token the 401 says which token it used."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db = tmp_path / "elsewhere" / "team.db"
    server = subprocess.Popen([*KEYTURN, "serve", "--http", f"127.0.0.1:{port}", "--db", str(db)], cwd=tmp_path,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        banner: list[str] = []
        for text_line in server.stderr:
            banner.append(text_line)
            if "keyturn pending" in text_line:
                break
        pending = next(line for line in banner if "keyturn pending" in line).split()
        assert pending == ["keyturn", "pending", "--url", f"http://127.0.0.1:{port}", "--db", str(db.resolve())]
        other = tmp_path / "other"
        other.mkdir()
        ok = _run([*pending[1:], "--json"], other)
        assert ok.returncode == 0 and json.loads(ok.stdout) == {"requests": []}, (ok.stdout, ok.stderr)
        # The token beside another ledger: refused, saying which token was used and how to pick the right one.
        (other / "keyturn.db.reviewer-token").write_text("kt_not-this-servers-token\n")
        refused = _run(["pending", "--url", f"http://127.0.0.1:{port}"], other)
        line = _one_clear_line(refused)
        assert "HTTP 401" in line and "keyturn.db.reviewer-token" in line and "--db" in line, line
        # No token anywhere: say where it looked and what to pass.
        missing = _one_clear_line(_run(["pending", "--url", f"http://127.0.0.1:{port}", "--db", "none.db"], other))
        assert "none.db.reviewer-token does not exist" in missing and "KEYTURN_TOKEN" in missing, missing
        # With --json, programs get the error as JSON too.
        as_json = _run(["pending", "--url", f"http://127.0.0.1:{port}", "--db", "none.db", "--json"], other)
        assert as_json.returncode == 2 and "does not exist" in json.loads(as_json.stdout)["error"], as_json.stdout
    finally:
        server.terminate()
        server.wait(60)
        if server.stderr is not None:
            server.stderr.close()


def test_a_reviewer_command_loads_neither_the_mcp_sdk_nor_the_ledger(tmp_path: Path) -> None:
    """`keyturn pending|show|approve|deny` make one HTTP call: they import only what that needs, so they start in a
    fraction of a second (the figure is in docs/performance.md; here, what is loaded, not how long it takes)."""
    probe = ("import sys\nfrom server.cli.main import main\n"
             "code = main(['pending', '--url', 'http://127.0.0.1:1', '--token', 'x'])\n"
             "heavy = [m for m in ('mcp', 'server.ledger', 'server.config', 'server.runtime', 'cryptography', "
             "'starlette', 'server.guarded') if m in sys.modules]\n"
             "print(code, heavy)\n")
    p = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "2 []", (p.stdout, p.stderr)
    assert "cannot reach the reviewer API" in p.stderr
