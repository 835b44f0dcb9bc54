"""tools.files: real files under temporary roots; escapes are refused before anything runs."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from server.classify import empty_facts
from server.classify.impact import describe_impact, with_measured
from server.config import Settings, ToolPack
from server.errors import ConfigError, InvalidArguments, ToolError
from server.execution import PackContext
from server.gate import Identity
from server.guarded import GuardedTool, ToolRegistry, load_pack
from server.runtime import pack_context, running


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("top secret")
    return tmp_path / "root"


@pytest.fixture
def files(root: Path) -> dict[str, GuardedTool]:
    reg = ToolRegistry()
    load_pack("tools.files", reg, {"roots": [str(root)], "max_read_bytes": 100})
    return {t.name: t for t in reg.list()}


def test_declarations(files: dict[str, GuardedTool], root: Path) -> None:
    assert all(t.roots == (root,) for t in files.values())
    assert sorted(files) == ["files_delete", "files_move", "files_read", "files_write"]
    assert files["files_read"].classifiers == {"path": "path"}
    assert files["files_write"].classifiers == {"path": "path", "content": "size"}
    assert files["files_move"].classifiers == {"source": "path", "destination": "path"}
    assert files["files_read"].annotations["readOnlyHint"] is True
    assert files["files_delete"].annotations["destructiveHint"] is True


async def test_write_read_move_delete(files: dict[str, GuardedTool], root: Path) -> None:
    written = (await files["files_write"].run({"path": "notes/a.txt", "content": "héllo"})).structured_content
    assert written == {"path": str(root / "notes" / "a.txt"), "bytes": 6, "replaced": False}
    read = (await files["files_read"].run({"path": "notes/a.txt"})).structured_content
    assert read == {"path": str(root / "notes" / "a.txt"), "content": "héllo", "size": 6, "truncated": False}

    moved = (await files["files_move"].run({"source": "notes/a.txt", "destination": "b.txt"})).structured_content
    assert moved == {"source": str(root / "notes" / "a.txt"), "destination": str(root / "b.txt")}
    assert (root / "b.txt").read_text() == "héllo" and not (root / "notes" / "a.txt").exists()

    assert (await files["files_delete"].run({"path": "b.txt"})).structured_content == {
        "path": str(root / "b.txt"),
        "was_directory": False,
    }
    assert (await files["files_delete"].run({"path": "notes"})).structured_content["was_directory"] is True
    assert os.listdir(root) == []


async def test_overwrite_only_when_asked(files: dict[str, GuardedTool], root: Path) -> None:
    (root / "a.txt").write_text("old")
    with pytest.raises(ToolError, match="File exists"):
        await files["files_write"].run({"path": "a.txt", "content": "new"})
    assert (root / "a.txt").read_text() == "old"
    result = await files["files_write"].run({"path": "a.txt", "content": "new", "overwrite": True})
    assert result.structured_content["replaced"] is True
    assert (root / "a.txt").read_text() == "new"
    assert os.listdir(root) == ["a.txt"]  # no temporary file left behind


async def test_read_is_capped_with_its_true_size(files: dict[str, GuardedTool], root: Path) -> None:
    (root / "big.txt").write_text("y" * 5000)
    data = (await files["files_read"].run({"path": "big.txt"})).structured_content
    assert data["content"] == "y" * 100 and data["size"] == 5000 and data["truncated"] is True


async def test_move_never_overwrites_and_delete_keeps_full_directories(
    files: dict[str, GuardedTool], root: Path
) -> None:
    (root / "a").write_text("a")
    (root / "b").write_text("b")
    with pytest.raises(ToolError, match="already exists"):
        await files["files_move"].run({"source": "a", "destination": "b"})
    (root / "d").mkdir()
    (root / "d" / "f").write_text("f")
    with pytest.raises(ToolError, match="OSError"):
        await files["files_delete"].run({"path": "d"})
    assert (root / "b").read_text() == "b" and (root / "d" / "f").exists()


def escape_cases(tmp: Path) -> list[tuple[str, dict[str, Any], str]]:
    outside = str(tmp / "outside" / "secret.txt")
    return [
        ("files_read", {"path": "../outside/secret.txt"}, "path"),
        ("files_read", {"path": outside}, "path"),
        ("files_read", {"path": "link-to-secret"}, "path"),
        ("files_read", {"path": "link-to-outside/secret.txt"}, "path"),
        ("files_read", {"path": "a/../../outside/secret.txt"}, "path"),
        ("files_write", {"path": "link-to-outside/new.txt", "content": "x"}, "path"),
        ("files_write", {"path": "dangling", "content": "x"}, "path"),
        ("files_write", {"path": "/etc/cron.d/evil", "content": "x"}, "path"),
        ("files_move", {"source": "inside.txt", "destination": "../outside/moved.txt"}, "destination"),
        ("files_move", {"source": outside, "destination": "stolen.txt"}, "source"),
        ("files_delete", {"path": "link-to-secret"}, "path"),
        ("files_delete", {"path": "."}, "path"),
        ("files_write", {"path": "", "content": "x"}, "path"),
        ("files_write", {"path": "a\x00b", "content": "x"}, "path"),
    ]


@pytest.mark.parametrize("case", range(14))
async def test_escapes_are_refused_in_validate(
    files: dict[str, GuardedTool], root: Path, tmp_path: Path, case: int
) -> None:
    os.symlink(tmp_path / "outside" / "secret.txt", root / "link-to-secret")
    os.symlink(tmp_path / "outside", root / "link-to-outside")
    os.symlink(tmp_path / "outside" / "not-yet", root / "dangling")
    (root / "inside.txt").write_text("inside")
    tool, arguments, field = escape_cases(tmp_path)[case]
    with pytest.raises(InvalidArguments) as info:
        files[tool].validate(arguments)
    assert info.value.field == field
    with pytest.raises(InvalidArguments):
        await files[tool].run(arguments)
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret.txt"]
    assert (tmp_path / "outside" / "secret.txt").read_text() == "top secret"
    assert (root / "inside.txt").exists()


async def test_links_that_stay_inside_are_followed(files: dict[str, GuardedTool], root: Path) -> None:
    (root / "real.txt").write_text("real")
    os.symlink(root / "real.txt", root / "alias.txt")
    assert files["files_read"].validate({"path": "alias.txt"}) == {"path": str(root / "real.txt")}
    assert (await files["files_read"].run({"path": "alias.txt"})).structured_content["content"] == "real"


def test_facts_hints(files: dict[str, GuardedTool], root: Path) -> None:
    (root / "a.txt").write_text("12345")
    read = files["files_read"]
    assert read.facts_hint(read.validate({"path": "a.txt"})) == {"file": {"exists": True, "size": 5}}
    write = files["files_write"]
    facts = write.facts_hint(write.validate({"path": "b.txt", "content": "é"}))
    assert facts == {"file": {"exists": False, "write_bytes": 2}}


def test_moves_and_deletes_say_what_they_would_take_and_the_card_line_says_it(
    files: dict[str, GuardedTool], root: Path
) -> None:
    (root / "tree" / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (root / "tree" / name).write_text("xy")
    os.symlink(root / "outside-nothing", root / "tree" / "dangling")  # counted as one file, never followed
    move, delete = files["files_move"], files["files_delete"]
    moved = move.facts_hint(move.validate({"source": "tree", "destination": "elsewhere"}))
    assert moved == {"file": {"exists": True, "size": 6 + os.lstat(root / "tree" / "dangling").st_size, "files": 4,
                              "files_capped": False}}
    gone = delete.facts_hint(delete.validate({"path": "tree/a"}))
    assert gone == {"file": {"exists": True, "size": 2, "files": 1}}
    assert delete.facts_hint(delete.validate({"path": "nothing.txt"})) == {"file": {"exists": False, "files": 0}}
    facts = with_measured(empty_facts(), {"hints": moved})
    assert describe_impact(facts) == f"the target exists ({moved['file']['size']:,} bytes), 4 files"
    write = files["files_write"]
    replace = write.facts_hint(write.validate({"path": "tree/a", "content": "hello", "overwrite": True}))
    assert describe_impact(with_measured(empty_facts(), {"hints": replace})) == (
        "the target exists (2 bytes), writes 5 bytes")


def test_several_roots(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reg = ToolRegistry()
    load_pack("tools.files", reg, {"roots": [str(tmp_path / "a"), str(tmp_path / "b")]})
    tool = reg.get("files_write")
    assert tool is not None
    assert tool.validate({"path": str(tmp_path / "b" / "x"), "content": ""})["path"] == str(tmp_path / "b" / "x")
    assert tool.validate({"path": "x", "content": ""})["path"] == str(tmp_path / "a" / "x")


@pytest.mark.parametrize(
    ("options", "needle"),
    [({}, "roots"), ({"roots": []}, "roots"), ({"roots": ["/no/such/dir/kt"]}, "not a directory")],
)
def test_roots_are_required(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_pack("tools.files", ToolRegistry(), options)


# -- keyturn's own state is out of reach: a root that holds any of it is refused at load ------------------------

REPO = Path(__file__).resolve().parents[2]  # keyturn's checkout: it holds the shipped default policy


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A ledger in <tmp>/var/keyturn/keyturn.db with its journal and a secret beside it; returns the ledger."""
    db = tmp_path / "var" / "keyturn" / "keyturn.db"
    db.parent.mkdir(parents=True)
    for name in ("keyturn.db", "keyturn.db-wal", "keyturn.db.reviewer-token"):
        (db.parent / name).write_text("keyturn's own")
    return db


def load_with_state(db: Path, roots: list[str]) -> ToolRegistry:
    """Load the pack the way `keyturn serve` does: with the context `server.runtime` builds from the settings."""
    settings = Settings(db=db, tools=(ToolPack(module="tools.files", options={"roots": roots}),))
    reg = ToolRegistry()
    load_pack("tools.files", reg, {"roots": roots}, pack_context(settings))
    return reg


def state_roots(db: Path) -> dict[str, tuple[str, list[str]]]:
    """Roots that reach keyturn's state -> (the root as configured, what the error must say)."""
    link = db.parent.parent.parent / "link-to-state"
    link.symlink_to(db.parent, target_is_directory=True)
    return {
        "the ledger's directory": (str(db.parent), [str(db), "(the ledger)", "--db", "reviewer-token"]),
        "a parent of the ledger's directory": (str(db.parent.parent), [str(db), "--db"]),
        "a symlink to the ledger's directory": (str(link), [f"resolves to {db.parent}", str(db), "--db"]),
        "the filesystem root": ("/", ["/proc (keyturn's process", str(db), "--db", "so never `/`"]),
        "/proc": ("/proc", ["/proc (keyturn's process", "lies inside /proc"]),
        "keyturn's process in /proc": ("/proc/self", ["/proc (keyturn's process", "lies inside /proc"]),
        "keyturn's checkout": (str(REPO), ["shipped default policy", "policies/", "`policy:`"]),
    }


@pytest.mark.parametrize("case", [
    "the ledger's directory", "a parent of the ledger's directory", "a symlink to the ledger's directory",
    "the filesystem root", "/proc", "keyturn's process in /proc", "keyturn's checkout"])
def test_a_root_that_holds_keyturns_state_is_refused_at_load(state: Path, case: str) -> None:
    spelled, needles = state_roots(state)[case]
    with pytest.raises(ConfigError) as info:
        load_with_state(state, [spelled])
    message = str(info.value)
    assert "tools.files" in message and repr(spelled) in message and "keyturn's own state" in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_root_inside_keyturns_state_directory_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "inner").mkdir(parents=True)
    context = PackContext.for_state([tmp_path / "ledger" / "k.db", store], ledger=tmp_path / "ledger" / "k.db")
    with pytest.raises(ConfigError, match=r"inner.*keyturn's own state"):
        load_pack("tools.files", ToolRegistry(), {"roots": [str(store / "inner")]}, context)


def test_a_root_beside_the_ledger_loads(state: Path) -> None:
    beside = state.parent.parent / "work"
    beside.mkdir()
    reg = load_with_state(state, [str(beside)])
    assert reg.get("files_read") is not None


ALLOW_ALL = "version: 1\ndefault: allow\ndefault_risk: low\nrules: []\n"


async def test_an_agent_cannot_reach_the_ledgers_secrets_from_a_root_beside_it(tmp_path: Path) -> None:
    """Through a real gate with a policy that allows everything: only the roots stand in the way."""
    db = tmp_path / "keyturn.db"
    token = tmp_path / "keyturn.db.reviewer-token"
    token.write_text("REVIEWER-TOKEN")
    token.chmod(0o600)
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.txt").write_text("inside")
    (root / "token-link").symlink_to(tmp_path / "keyturn.db.reviewer-token")
    (tmp_path / "policy.yaml").write_text(ALLOW_ALL)
    settings = Settings(db=db, policy=tmp_path / "policy.yaml",
                        tools=(ToolPack(module="tools.files", options={"roots": [str(root)]}),))
    attempts = ["../keyturn.db.reviewer-token", str(tmp_path / "keyturn.db.reviewer-token"), "token-link",
                "/proc/self/environ", f"/proc/{os.getpid()}/root{tmp_path}/keyturn.db.reviewer-token",
                str(db), "../keyturn.db-wal"]
    async with running(settings) as kt:
        tool = kt.find_tool("files_read")
        assert tool is not None
        ok = await kt.gate.call(tool, {"path": "ok.txt"}, Identity(principal="agent"))
        assert not ok.is_error and (ok.structured_content or {})["content"] == "inside"
        for path in attempts:
            result = await kt.gate.call(tool, {"path": path}, Identity(principal="agent"))
            shown = " ".join(getattr(c, "text", "") for c in result.content)
            assert result.is_error and "outside the allowed roots" in shown, (path, shown)
            assert path not in shown and "resolves to" not in shown  # the field is named, the value is not echoed
            assert token.read_text() not in shown and "KEYTURN_" not in shown
    executed = [e for e in ledger_kinds(db) if e == "executed"]
    assert len(executed) == 1


def ledger_kinds(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [k for (k,) in conn.execute("SELECT kind FROM events ORDER BY seq")]


async def test_a_hard_link_to_keyturns_state_inside_a_root_is_not_read(state: Path, tmp_path: Path) -> None:
    root = tmp_path / "root2"
    root.mkdir()
    reg = load_with_state(state, [str(root)])
    os.link(state.parent / "keyturn.db.reviewer-token", root / "innocent.txt")
    tool = reg.get("files_read")
    assert tool is not None
    with pytest.raises(ToolError, match="keyturn's own state files under another name"):
        await tool.run({"path": "innocent.txt"})
