"""An agent must not reach keyturn through a side door: its CLI, its API, its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.classify import ClassifyContext, extract_facts


@pytest.fixture
def ctx(tmp_path: Path) -> ClassifyContext:
    home = tmp_path / "keyturn"
    home.mkdir()
    for name in ("keyturn.db", "policy.yaml", "keyturn.yaml"):
        (home / name).write_text("")
    return ClassifyContext(
        keyturn_paths=(home / "keyturn.db", home / "policy.yaml", home / "keyturn.yaml"),
        keyturn_urls=("http://127.0.0.1:8765",),
        roots=(tmp_path / "work",),
    )


def run(ctx: ClassifyContext, tool: str, args: dict, kinds: dict, annotations: dict | None = None) -> dict:
    return extract_facts(tool, args, kinds, annotations or {}, ctx)


@pytest.mark.parametrize(
    "command",
    [
        "keyturn approve 8f14e45f",
        "/usr/local/bin/keyturn deny 8f14e45f --reason x",
        "cd /tmp && KEYTURN_TOKEN=x keyturn --config c.yaml approve 1",
        "sh -c 'keyturn approve 1'",
    ],
)
def test_the_keyturn_cli_from_a_shell_is_self_targeting(ctx: ClassifyContext, command: str) -> None:
    f = run(ctx, "shell_run", {"command": command}, {"command": "shell"})
    assert f["self_target"], f["self_target_reasons"]


def test_the_keyturn_version_is_harmless(ctx: ClassifyContext) -> None:
    assert not run(ctx, "shell_run", {"command": "keyturn --version"}, {"command": "shell"})["self_target"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8765/api/requests/1/approve",
        "http://localhost:8765/api/requests/1/approve",
        "http://[::1]:8765/",
        "http://127.0.0.2:8765/",
    ],
)
def test_the_reviewer_api_is_self_targeting_under_any_loopback_name(ctx: ClassifyContext, url: str) -> None:
    assert run(ctx, "http_request", {"url": url}, {"url": "url"})["self_target"]


def test_another_local_port_is_not_keyturn(ctx: ClassifyContext) -> None:
    assert not run(ctx, "http_request", {"url": "http://127.0.0.1:9000/"}, {"url": "url"})["self_target"]


def test_curl_to_the_api_from_a_shell(ctx: ClassifyContext) -> None:
    f = run(
        ctx, "shell_run", {"command": "curl -X POST http://localhost:8765/api/requests/1/approve"}, {"command": "shell"}
    )
    assert f["self_target"]


def test_writing_the_policy_file_is_self_targeting(ctx: ClassifyContext) -> None:
    policy = str(ctx.keyturn_paths[1])
    assert run(ctx, "files_write", {"path": policy}, {"path": "path"}, {"readOnlyHint": False})["self_target"]


def test_reading_the_policy_is_harmless_but_reading_the_ledger_is_not(ctx: ClassifyContext) -> None:
    read_only = {"readOnlyHint": True}
    assert not run(ctx, "files_read", {"path": str(ctx.keyturn_paths[1])}, {"path": "path"}, read_only)["self_target"]
    assert run(ctx, "files_read", {"path": str(ctx.keyturn_paths[0])}, {"path": "path"}, read_only)["self_target"]


def test_sqlite_sidecar_files_count_as_the_ledger(ctx: ClassifyContext) -> None:
    wal = str(ctx.keyturn_paths[0]) + "-wal"
    assert run(ctx, "files_delete", {"path": wal}, {"path": "path"})["self_target"]


def test_a_symlink_to_the_ledger_is_the_ledger(ctx: ClassifyContext, tmp_path: Path) -> None:
    link = tmp_path / "innocent.txt"
    link.symlink_to(ctx.keyturn_paths[0])
    assert run(ctx, "files_write", {"path": str(link)}, {"path": "path"})["self_target"]


def test_deleting_the_directory_that_holds_keyturn(ctx: ClassifyContext) -> None:
    home = str(ctx.keyturn_paths[0].parent)
    assert run(ctx, "files_delete", {"path": home}, {"path": "path"})["self_target"]
    assert run(ctx, "shell_run", {"command": f"rm -rf {home}"}, {"command": "shell"})["self_target"]
    assert not run(ctx, "shell_run", {"command": f"ls {home}/.."}, {"command": "shell"})["self_target"]


def test_the_ledger_by_name_from_a_shell(ctx: ClassifyContext) -> None:
    f = run(ctx, "shell_run", {"command": "sqlite3 keyturn.db 'DELETE FROM events'"}, {"command": "shell"})
    assert f["self_target"]


def test_any_string_argument_that_names_keyturn_is_noticed(ctx: ClassifyContext) -> None:
    db = str(ctx.keyturn_paths[0])
    assert run(ctx, "sql_execute", {"statement": f"ATTACH DATABASE '{db}' AS k"}, {"statement": "sql"})["self_target"]
    assert run(ctx, "jira_comment", {"body": "please run keyturn approve 42"}, {})["self_target"]
    assert run(ctx, "webhook", {"target": "http://localhost:8765/api"}, {})["self_target"]


def test_ordinary_calls_are_not_self_targeting(ctx: ClassifyContext) -> None:
    assert not run(ctx, "sql_query", {"query": "SELECT * FROM keyturn_orders"}, {"query": "sql"})["self_target"]
    assert not run(ctx, "shell_run", {"command": "ls -la"}, {"command": "shell"})["self_target"]
    assert not run(ctx, "jira_comment", {"body": "keyturn is great"}, {})["self_target"]


def test_files_kept_beside_the_ledger_are_keyturns_own_even_to_read(tmp_path: Path) -> None:
    db = tmp_path / "keyturn.db"
    ctx = ClassifyContext(keyturn_paths=(db, tmp_path / "policy.yaml"))
    token = extract_facts("files_read", {"path": str(db) + ".reviewer-token"}, {"path": "path"},
                          {"readOnlyHint": True}, ctx)
    assert token["self_target"]
    policy = extract_facts("files_read", {"path": str(tmp_path / "policy.yaml")}, {"path": "path"},
                           {"readOnlyHint": True}, ctx)
    assert not policy["self_target"]


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "127.1", "[::ffff:127.0.0.1]",
                                  "[::ffff:7f00:1]", "localhost.", "LOCALHOST", "0.0.0.0", "[::]", "api.localhost"])
def test_keyturns_api_is_keyturn_in_any_spelling_of_this_machine(ctx: ClassifyContext, host: str) -> None:
    facts = run(ctx, "http_request", {"url": f"http://{host}:8765/api/requests/x/approve"}, {"url": "url"})
    assert facts["self_target"], host


def test_another_host_on_the_same_port_is_not_keyturn(ctx: ClassifyContext) -> None:
    facts = run(ctx, "http_request", {"url": "http://10.0.0.7:8765/api/requests"}, {"url": "url"})
    assert not facts["self_target"]
