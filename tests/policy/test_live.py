"""Hot reload: a good edit takes effect, a bad edit is announced and the last good policy stays."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.errors import PolicyError
from server.policy import LivePolicy

V1 = "version: 1\ndefault: review\nrules:\n  - {id: reads, tool: sql_query, outcome: allow, risk: low}\n"
V2 = V1 + "  - {id: no-shell, tool: shell_run, outcome: deny, risk: high}\n"
BROKEN = V1 + "  - {id: broken, tool: x, when: 'facts.sql.kinds.all(', outcome: deny}\n"


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.arrived = anyio.Event()

    async def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        self.items.append((kind, payload))
        self.arrived.set()
        self.arrived = anyio.Event()

    def kinds(self) -> list[str]:
        return [k for k, _ in self.items]


def write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a visible change even on coarse clocks


def delete(path: Path) -> None:
    path.unlink()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(V1)
    return path


async def test_a_good_edit_is_loaded_and_announced(policy_file: Path) -> None:
    events = Events()
    live = LivePolicy(policy_file, on_event=events)
    first = live.load()
    write(policy_file, V2)
    await live.check_reload()
    assert live.current is not first and [r.id for r in live.current.rules] == ["reads", "no-shell"]
    [(kind, payload)] = events.items
    assert kind == "policy.loaded"
    assert payload["digest"] == live.current.digest and payload["path"] == str(policy_file) and payload["rules"] == 2
    # What changed, so an auditor can tell an edit from a swap: the digest before, and each rule by id.
    assert payload["previous_digest"] == first.digest != payload["digest"]
    assert payload["rules_added"] == ["no-shell"] and payload["rules_removed"] == [] == payload["rules_changed"]
    st = os.stat(policy_file)
    assert payload["file_uid"] == st.st_uid and payload["file_mode"] == f"{st.st_mode & 0o7777:04o}"


async def test_a_reload_names_the_rules_it_changed_and_removed(policy_file: Path) -> None:
    events = Events()
    live = LivePolicy(policy_file, on_event=events)
    first = live.load()
    write(policy_file, V2)
    await live.check_reload()
    # `reads` now allows a second tool (changed), `no-shell` is gone (removed), and the default outcome moved.
    loosened = "version: 1\ndefault: allow\nrules:\n  - {id: reads, tool: [sql_query, sql_execute], outcome: allow, risk: low}\n"
    write(policy_file, loosened)
    await live.check_reload()
    payload = events.items[-1][1]
    assert payload["previous_digest"] == events.items[0][1]["digest"] != first.digest
    assert payload["rules_changed"] == ["reads"] and payload["rules_removed"] == ["no-shell"]
    assert payload["rules_added"] == [] and payload["defaults_changed"] == ["default_outcome"]


async def test_a_bad_edit_keeps_the_last_good_policy_and_is_announced_once(
        policy_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.policy.live")
    events = Events()
    live = LivePolicy(policy_file, on_event=events)
    good = live.load()
    write(policy_file, BROKEN)
    await live.check_reload()
    await live.check_reload()
    assert live.current is good
    assert events.kinds() == ["policy.rejected"]
    payload = events.items[0][1]
    assert payload["path"] == str(policy_file)
    assert "rule 'broken'" in payload["error"] and "field 'when'" in payload["error"] and "line 5" in payload["error"]
    # The console says so too, once, and that the last good policy stays in force.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "was not reloaded" in errors[0].getMessage()
    assert "last good policy stays in force" in errors[0].getMessage() and "line 5" in errors[0].getMessage()
    write(policy_file, V2)
    await live.check_reload()
    assert events.kinds() == ["policy.rejected", "policy.loaded"] and len(live.current.rules) == 2
    [fixed] = [r for r in caplog.records if "reloaded: 2 rules" in r.getMessage()]
    assert fixed.levelno == logging.WARNING  # after a rejection, the fix is shown on the console as well


async def test_touching_the_file_without_changing_it_announces_nothing(policy_file: Path) -> None:
    events = Events()
    live = LivePolicy(policy_file, on_event=events)
    good = live.load()
    write(policy_file, V1)
    await live.check_reload()
    assert live.current is good and events.items == []


async def test_a_deleted_file_keeps_the_last_good_policy(policy_file: Path) -> None:
    events = Events()
    live = LivePolicy(policy_file, on_event=events)
    good = live.load()
    delete(policy_file)
    await live.check_reload()
    await live.check_reload()
    assert live.current is good and events.kinds() == ["policy.rejected"]
    assert "cannot read" in events.items[0][1]["error"]


async def test_an_unknown_group_in_an_edit_is_rejected(policy_file: Path) -> None:
    events = Events()
    live = LivePolicy(policy_file, groups={"dba": {"alice"}}, people={"alice"}, on_event=events)
    live.load()
    write(policy_file, V1 + "  - {id: drop, tool: x, outcome: review, review: {approvers: [{group: dbas}]}}\n")
    await live.check_reload()
    assert events.kinds() == ["policy.rejected"] and "unknown approver group 'dbas'" in events.items[0][1]["error"]


def test_an_invalid_policy_at_start_refuses_to_start(policy_file: Path) -> None:
    policy_file.write_text(BROKEN)
    live = LivePolicy(policy_file)
    with pytest.raises(PolicyError) as info:
        live.load()
    assert info.value.rule == "broken"
    with pytest.raises(PolicyError):
        _ = live.current


async def test_watch_picks_up_an_edit(policy_file: Path) -> None:
    events = Events()
    live = LivePolicy(policy_file, on_event=events, poll_interval_s=0.01)
    live.load()
    async with anyio.create_task_group() as tg:
        tg.start_soon(live.watch)
        waiter = events.arrived
        write(policy_file, V2)
        with anyio.fail_after(5):
            await waiter.wait()
        tg.cancel_scope.cancel()
    assert events.kinds() == ["policy.loaded"] and len(live.current.rules) == 2
