"""Path classification against real directories and symlinks in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.classify.paths import classify_paths


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "notes").mkdir(parents=True)
    (r / "notes" / "todo.md").write_text("x")
    return r


def test_a_file_inside_the_root_is_inside(root: Path) -> None:
    f = classify_paths([("path", str(root / "notes" / "todo.md"))], (root,))
    assert f["inside_roots"] and not f["outside_roots"] and not f["traversal"]


def test_a_relative_path_is_resolved_against_the_first_root(root: Path) -> None:
    f = classify_paths([("path", "notes/todo.md")], (root,))
    assert f["all"] == [os.path.realpath(root / "notes" / "todo.md")]
    assert f["inside_roots"]


def test_dot_dot_climbs_out_of_the_root(root: Path) -> None:
    f = classify_paths([("path", "../../../../../../etc/passwd")], (root,))
    assert f["traversal"] and f["outside_roots"] and not f["inside_roots"]
    assert f["all"] == ["/etc/passwd"]
    assert f["sensitive"] and f["system"]


def test_dot_dot_that_stays_inside_is_still_inside(root: Path) -> None:
    f = classify_paths([("path", "notes/../notes/todo.md")], (root,))
    assert f["traversal"] and f["inside_roots"]


def test_a_symlink_that_escapes_the_root_is_caught(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    (root / "link").symlink_to(outside)
    f = classify_paths([("path", str(root / "link" / "secret.txt"))], (root,))
    assert f["symlink_escape"] and f["outside_roots"] and not f["inside_roots"]
    assert f["all"] == [os.path.realpath(outside / "secret.txt")]


def test_a_symlinked_root_is_not_an_escape(tmp_path: Path, root: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    f = classify_paths([("path", str(alias / "notes" / "todo.md"))], (alias,))
    assert f["inside_roots"] and not f["symlink_escape"]


def test_a_sibling_with_the_root_as_prefix_is_outside(tmp_path: Path, root: Path) -> None:
    sibling = tmp_path / "root-evil"
    sibling.mkdir()
    f = classify_paths([("path", str(sibling / "x"))], (root,))
    assert f["outside_roots"]


def test_one_path_outside_makes_the_call_outside(root: Path) -> None:
    f = classify_paths([("source", str(root / "a")), ("destination", "/tmp/a")], (root,))
    assert f["outside_roots"] and not f["inside_roots"]
    assert set(f["by_arg"]) == {"source", "destination"}


def test_no_roots_configured_means_neither_inside_nor_outside() -> None:
    f = classify_paths([("path", "/srv/x")], ())
    assert not f["roots_configured"] and not f["inside_roots"] and not f["outside_roots"]


@pytest.mark.parametrize("value", ["a\x00b", "", 42, None, ["ok", 3]])
def test_things_that_are_not_paths_are_unparseable(value: object, root: Path) -> None:
    f = classify_paths([("path", value)], (root,))
    assert f["unparseable"] and not f["inside_roots"]


@pytest.mark.parametrize(
    "path",
    ["~/.ssh/id_rsa", "/home/a/.aws/credentials", "/srv/app/.env", "/etc/shadow", "/x/server.pem", "/root/.netrc"],
)
def test_credential_files_are_sensitive(path: str) -> None:
    assert classify_paths([("path", path)], ())["sensitive"]


def test_ordinary_files_are_not_sensitive() -> None:
    f = classify_paths([("path", "/srv/app/environment.md")], ())
    assert not f["sensitive"] and not f["system"]
