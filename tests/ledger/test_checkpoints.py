"""Signed checkpoints and `keyturn audit verify`: every way of changing the ledger file behind keyturn's back is
detected and named (exit 1), an untouched ledger verifies (exit 0), checkpoints reach a file and an HTTP witness,
and an exported bundle verifies offline with only the public key, and fails once edited.

SQLite only: the attacks copy, swap and truncate the ledger file itself (on PostgreSQL, the edits to rows are in
test_ledger.py and approvals/test_proof.py, and `audit verify` on a postgresql:// ledger in test_postgres.py)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from server.cli import main
from server.config import Settings, load_settings
from server.ledger import GENESIS, Ledger, event_hash
from server.ledger.checkpoints import Checkpoint, parse_public_key, read_checkpoint_file, sign
from server.ledger.witnesses import Checkpointer, HttpWitness
from server.models import ApproverGroup, ReviewSpec, Verdict
from server.runtime import running
from tests.helpers import witness_endpoint

SPEC = ReviewSpec(groups=(ApproverGroup(name="dba", quorum=2),))


@dataclass
class Site:
    dir: Path
    config: Path
    db: Path
    witness: Path
    ids: dict[str, str]

    def settings(self) -> Settings:
        return load_settings(self.config)

    def sql(self, *statements: str, params: tuple[Any, ...] = ()) -> None:
        with closing(sqlite3.connect(self.db)) as conn, conn:
            for statement in statements:
                conn.execute(statement, params)

    def events(self) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.db)) as conn:
            return list(conn.execute("SELECT seq, ts, kind, call_id, payload, prev_hash, hash FROM events ORDER BY seq"))


async def _held(kt: Any, call_id: str, args_hash: str) -> None:
    expires = time.time() + 900
    await kt.ledger.open_call(
        call_id=call_id, tool="sql_execute", principal="agent-ci", on_behalf_of=None, model=None, args_hash=args_hash,
        redacted_arguments={"query": "DELETE FROM orders"}, state="pending", holder=kt.broker.instance_id,
        review=SPEC, policy_digest="digest-1", expires=expires,
        events=[("call.received", {"tool": "sql_execute", "principal": "agent-ci", "on_behalf_of": None,
                                   "args_hash": args_hash, "arguments": {"query": "DELETE FROM orders"}}),
                ("decision", {"outcome": "review", "policy_digest": "digest-1"}),
                ("approval.requested", {"review": SPEC.model_dump(), "expires": expires})])


async def _populate(settings: Settings, ids: dict[str, str]) -> None:
    async with running(settings) as kt:
        vote = kt.broker.decide
        await _held(kt, ids["ran"], "a" * 64)
        await vote(Verdict(request_id=ids["ran"], reviewer="api:alice", verdict="approve", reason="ok"))
        await vote(Verdict(request_id=ids["ran"], reviewer="api:carol", verdict="approve"))
        await kt.ledger.transition(ids["ran"], ("approved",), "running", "execution.started", {"args_hash": "a" * 64})
        await kt.ledger.finish(ids["ran"], "executed", {"result_digest": "r"})
        assert kt.checkpointer is not None
        assert await kt.checkpointer.make() is not None  # a checkpoint in the middle of the story
        await _held(kt, ids["denied"], "b" * 64)
        await vote(Verdict(request_id=ids["denied"], reviewer="api:carol", verdict="deny", reason="no"))
        await _held(kt, ids["pending"], "c" * 64)
        await vote(Verdict(request_id=ids["pending"], reviewer="api:alice", verdict="approve", reason="fine"))
        for i in range(5):
            await kt.ledger.append("policy.loaded", None, {"i": i})
    # leaving `running` made the shutdown checkpoint of the head


def make_site(root: Path) -> Site:
    root.mkdir(parents=True, exist_ok=True)
    config, db, witness = root / "keyturn.yaml", root / "k.db", root / "witness" / "checkpoints.jsonl"
    reviewers = [{"identity": f"api:{p}", "person": p, "token_sha256": "0" * 64} for p in ("alice", "carol")]
    config.write_text(yaml.safe_dump({
        "db": str(db), "tools": [], "people": {"alice": {}, "carol": {}}, "reviewers": reviewers,
        "checkpoints": {"witness_file": str(witness)}}), encoding="utf-8")
    site = Site(root, config, db, witness, {"ran": "1" * 32, "denied": "2" * 32, "pending": "3" * 32})
    anyio.run(_populate, site.settings(), site.ids)
    return site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


def verify(site: Site, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["audit", "verify", "--config", str(site.config), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def rechain(site: Site, start: int, edit: dict[int, str]) -> None:
    """What an attacker with the file does: change payloads and recompute every hash after them, head row too."""
    events = site.events()
    prev = GENESIS if start == 1 else events[start - 2][6]
    with closing(sqlite3.connect(site.db)) as conn, conn:
        for seq, ts, kind, call_id, payload, _, _ in events[start - 1:]:
            payload = edit.get(seq, payload)
            h = event_hash(prev, seq, ts, kind, call_id, payload)
            conn.execute("UPDATE events SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?", (payload, prev, h, seq))
            prev = h
        conn.execute("UPDATE chain_head SET hash = ?", (prev,))
        conn.execute("DELETE FROM checkpoints")


# -- the untouched ledger ---------------------------------------------------------------------------------

def test_an_untouched_ledger_verifies_against_its_witness(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    lines = read_checkpoint_file(site.witness)
    assert len(lines) >= 2 and lines[-1].seq == len(site.events())  # the middle one and the one at shutdown
    code, out = verify(site, capsys, "--checkpoint", str(site.witness))
    assert code == 0, out
    assert "chain intact" in out and "calls and votes agree with the chain" in out and "checkpoint" in out


def test_the_key_command_prints_the_key_that_verifies(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "key", "--config", str(site.config), "--pem"]) == 0
    out = capsys.readouterr().out
    public = out.split("public key (base64): ")[1].split()[0]
    assert "BEGIN PUBLIC KEY" in out and parse_public_key(public) is not None
    assert oct(Path(f"{site.db}.checkpoint-key").stat().st_mode & 0o777) == "0o600"
    code, text = verify(site, capsys, "--checkpoint", str(site.witness), "--public-key", public)
    assert code == 0, text


# -- edits of the chain -----------------------------------------------------------------------------------

def test_a_payload_edit_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sql("UPDATE events SET payload = '{\"outcome\":\"allow\"}' WHERE kind = 'decision' AND call_id = ?",
             params=(site.ids["pending"],))
    code, out = verify(site, capsys)
    assert code == 1 and "BROKEN" in out and "content does not match its hash: edited" in out


def test_a_deletion_in_the_middle_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sql("DELETE FROM events WHERE seq = 5")
    code, out = verify(site, capsys)
    assert code == 1 and "event 5 is missing" in out and "deleted" in out


@pytest.mark.parametrize("head_row", ["rewritten", "deleted"])
def test_tail_truncation_is_named_with_or_without_the_head_row(site: Site, capsys: pytest.CaptureFixture[str],
                                                                head_row: str) -> None:
    events = site.events()
    last = events[-4]
    site.sql("DELETE FROM events WHERE seq > ?", params=(last[0],))
    site.sql("DELETE FROM checkpoints WHERE seq > ?", params=(last[0],))  # the ledger's own copies go too
    if head_row == "rewritten":
        site.sql("UPDATE chain_head SET seq = ?, hash = ?", params=(last[0], last[6]))
    else:
        site.sql("DELETE FROM chain_head")
    code, out = verify(site, capsys, "--checkpoint", str(site.witness))
    assert code == 1 and "tail truncated" in out, out
    assert f"events {last[0] + 1}..{len(events)} were deleted" in out
    assert ("head row was deleted" in out) == (head_row == "deleted")


def test_a_full_rechain_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    seq = next(e[0] for e in site.events() if e[2] == "vote")
    rechain(site, seq, {seq: json.dumps({"verdict": "approve", "person": "mallory"})})
    code, out = verify(site, capsys, "--checkpoint", str(site.witness))
    assert code == 1 and "re-chained" in out, out  # every link holds; the signed checkpoint says otherwise


def test_a_rechain_from_the_first_event_or_a_swapped_file_is_named(site: Site, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    other = make_site(tmp_path / "other")
    for suffix in ("-wal", "-shm"):
        Path(f"{site.db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(other.db, site.db)  # another keyturn ledger in its place (the key file stays)
    code, out = verify(site, capsys, "--checkpoint", str(site.witness))
    assert code == 1 and "swapped ledger" in out, out


def test_a_forged_checkpoint_line_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    lines = site.witness.read_text().splitlines()
    forged = json.loads(lines[-1]) | {"seq": 1000}
    site.witness.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    code, out = verify(site, capsys)
    assert code == 1 and "signature is not valid" in out


def test_checkpoints_of_another_key_are_refused(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = make_site(tmp_path / "other")
    assert main(["audit", "key", "--config", str(other.config)]) == 0
    public = capsys.readouterr().out.split("public key (base64): ")[1].split()[0]
    code, out = verify(site, capsys, "--checkpoint", str(site.witness), "--public-key", public)
    assert code == 1 and "not by the given key" in out


# -- the derived tables -----------------------------------------------------------------------------------

def test_a_forged_vote_row_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sql("INSERT INTO votes(call_id, person, reviewer, verdict, reason, groups, ts) "
             "VALUES (?, 'carol', 'api:carol', 'approve', NULL, '[\"dba\"]', 1.0)", params=(site.ids["pending"],))
    code, out = verify(site, capsys)
    assert code == 1 and "forged vote" in out and site.ids["pending"] in out


def test_a_state_flip_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sql("UPDATE calls SET state = 'approved' WHERE id = ?", params=(site.ids["pending"],))
    code, out = verify(site, capsys)
    assert code == 1 and "says state 'approved'" in out and "the chain says 'pending'" in out


def test_a_deleted_vote_row_is_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sql("DELETE FROM votes WHERE call_id = ? AND person = 'alice'", params=(site.ids["ran"],))
    code, out = verify(site, capsys)
    assert code == 1 and "votes row was deleted" in out and "alice" in out


def test_a_changed_vote_and_a_deleted_call_row_are_named(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sql("UPDATE votes SET verdict = 'approve' WHERE call_id = ?", params=(site.ids["denied"],))
    code, out = verify(site, capsys)
    assert code == 1 and "differs from its vote event" in out
    site.sql("UPDATE votes SET verdict = 'deny' WHERE call_id = ?", params=(site.ids["denied"],))
    site.sql("DELETE FROM calls WHERE id = ?", params=(site.ids["denied"],))
    code, out = verify(site, capsys)
    assert code == 1 and "calls row was deleted" in out


# -- the checkpointer ----------------------------------------------------------------------------------------

def test_the_checkpointer_never_signs_over_a_change(site: Site) -> None:
    seq = next(e[0] for e in site.events() if e[2] == "vote")
    rechain(site, seq, {seq: json.dumps({"verdict": "approve"})})

    async def attempt() -> None:
        async with Ledger(site.db) as ledger:
            ledger_key = _key(site)
            checkpointer = Checkpointer(ledger, ledger_key, anchors=[site.witness])
            await ledger.append("policy.loaded", None, {})
            with pytest.raises(Exception, match="does not extend its last checkpoint"):
                await checkpointer.make()

    anyio.run(attempt)


def _key(site: Site) -> Any:
    from server.ledger.checkpoints import signing_key

    return signing_key(site.settings(), {}, create=False)


def test_checkpoints_every_n_events_in_the_running_process(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "k.db", tools=(), checkpoints={"every_events": 5, "every_s": 3600,
                                                                     "witness_file": tmp_path / "w.jsonl"})

    async def story() -> None:
        async with running(settings) as kt:
            assert kt.checkpointer is not None
            made = anyio.Event()
            seen: list[Checkpoint] = []

            class Recorder:
                name = "recorder"

                async def witness(self, checkpoint: Checkpoint) -> None:
                    seen.append(checkpoint)
                    made.set()

            kt.checkpointer.witnesses.append(Recorder())
            for i in range(5):
                await kt.ledger.append("policy.loaded", None, {"i": i})
            with anyio.fail_after(10):
                await made.wait()
            assert seen[0].seq >= 5 and seen[0].signed_by(_pub(kt))

    anyio.run(story)
    assert read_checkpoint_file(tmp_path / "w.jsonl")


def _pub(kt: Any) -> Any:
    return kt.checkpointer.key.public_key()


# -- the HTTP witness ----------------------------------------------------------------------------------------

@pytest.fixture
def http_witness() -> Iterator[tuple[str, list[dict[str, Any]], list[int]]]:
    with witness_endpoint() as endpoint:
        yield endpoint


def test_checkpoints_reach_an_http_witness_after_a_retry(site: Site, http_witness: Any) -> None:
    url, received, fail_first = http_witness
    fail_first.append(1)  # the witness answers 503 once

    async def post() -> Checkpoint:
        async with Ledger(site.db) as ledger:
            checkpointer = Checkpointer(ledger, _key(site), [HttpWitness(url, timeout_s=5, retries=3)])
            await ledger.append("policy.loaded", None, {})
            with anyio.fail_after(30):
                made = await checkpointer.make()
            assert made is not None
            return made

    checkpoint = anyio.run(post)
    assert len(received) == 1 and Checkpoint.from_dict(received[0]) == checkpoint
    assert checkpoint.signed_by(_key(site).public_key())


def test_an_unreachable_http_witness_does_not_stop_the_others(site: Site, tmp_path: Path) -> None:
    from server.ledger.witnesses import FileWitness

    async def post() -> list[str]:
        async with Ledger(site.db) as ledger:
            dead = HttpWitness("http://127.0.0.1:9/", timeout_s=1, retries=2)
            checkpointer = Checkpointer(ledger, _key(site), [dead, FileWitness(tmp_path / "w.jsonl")])
            await ledger.append("policy.loaded", None, {})
            made = await checkpointer.make()
            assert made is not None
            return await checkpointer.deliver(made)

    failures = anyio.run(post)
    assert failures and failures[0].startswith("http:")
    assert len(read_checkpoint_file(tmp_path / "w.jsonl")) == 2  # from make(), and from deliver()


# -- bundles ---------------------------------------------------------------------------------------------

def test_a_bundle_verifies_offline_and_fails_when_edited(site: Site, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "key", "--config", str(site.config)]) == 0
    public = capsys.readouterr().out.split("public key (base64): ")[1].split()[0]
    bundle = tmp_path / "bundle.json"
    assert main(["audit", "export", "--config", str(site.config), "--from", "3", "--to", "9", str(bundle)]) == 0
    capsys.readouterr()
    site.db.unlink()  # offline: no ledger at all
    assert main(["audit", "verify", "--bundle", str(bundle), "--public-key", public]) == 0
    assert "bundle of events 3.." in capsys.readouterr().out

    data = json.loads(bundle.read_text())
    data["events"][2]["payload"] = data["events"][2]["payload"].replace("approve", "deny")
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    assert main(["audit", "verify", "--bundle", str(edited), "--public-key", public]) == 1
    assert "edited" in capsys.readouterr().out

    data = json.loads(bundle.read_text())
    data["events"] = data["events"][:-1]  # the covering checkpoint no longer matches the last event
    edited.write_text(json.dumps(data))
    assert main(["audit", "verify", "--bundle", str(edited), "--public-key", public]) == 1
    assert "no checkpoint signed by key" in capsys.readouterr().out


def test_a_bundle_signed_by_another_key_fails(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.ledger.checkpoints import public_key_text

    bundle = tmp_path / "bundle.json"
    assert main(["audit", "export", "--config", str(site.config), "--from", "1", "--to", "4", str(bundle)]) == 0
    stranger = Ed25519PrivateKey.generate()
    assert sign(stranger, 1, "x", "y").signed_by(stranger.public_key())
    assert main(["audit", "verify", "--bundle", str(bundle), "--public-key",
                 public_key_text(stranger.public_key())]) == 1
    assert "not the given key" in capsys.readouterr().out
