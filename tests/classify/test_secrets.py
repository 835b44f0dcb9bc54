"""Secrets in arguments: found wherever they are, masked before anyone sees them."""

from __future__ import annotations

import pytest

from server.classify import REDACTED, Redaction
from server.classify.secrets import classify_secrets

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n-----END OPENSSH PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (f"export AWS_ACCESS_KEY_ID={AWS_KEY}", "aws_access_key_id"),
        (f"aws_secret_access_key = {AWS_SECRET}", "aws_secret_access_key"),
        (f"curl -H 'Authorization: Bearer {JWT}' https://x", "jwt"),
        (PRIVATE_KEY, "private_key"),
        ("token ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", "github_token"),
        ("xoxb-1234567890-abcdefghij", "slack_token"),
        ("postgres://app:s3cr3t-pw@db:5432/app", "url_password"),
        ("PGPASSWORD=hunter22 psql -h db", "password_assignment"),
        ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345", "anthropic_key"),
    ],
)
def test_secret_looking_values_are_found_anywhere(value: str, kind: str) -> None:
    f = classify_secrets({"command": value}, [])
    assert f["present"] and kind in f["kinds"] and f["fields"] == ["/command"]


def test_nested_values_are_found_with_json_pointers() -> None:
    args = {"requests": [{"headers": {"X-Note": f"key {AWS_KEY}"}}], "a/b": {"~x": JWT}}
    f = classify_secrets(args, [])
    assert f["fields"] == ["/requests/0/headers/X-Note", "/a~1b/~0x"]


def test_values_under_secret_names_are_secret_whatever_they_look_like() -> None:
    f = classify_secrets({"headers": {"Authorization": "Basic abc"}, "password": "x", "max_tokens": "100"}, [])
    assert f["whole"] == ["/headers/Authorization", "/password"]


def test_declared_secret_arguments_are_secret_even_when_not_strings() -> None:
    f = classify_secrets({"pin": 1234, "value": "plain"}, ["pin", "value"])
    assert set(f["whole"]) == {"/pin", "/value"}


def test_ordinary_text_is_not_a_secret() -> None:
    args = {"query": "SELECT password_hash FROM users WHERE id = $1", "note": "token bucket of 5", "sha": "a" * 40}
    assert not classify_secrets(args, [])["present"]


def test_redaction_masks_the_secret_and_keeps_the_context() -> None:
    args = {"command": f"AWS_ACCESS_KEY_ID={AWS_KEY} aws s3 ls", "headers": {"Authorization": f"Bearer {JWT}"}}
    masked = Redaction.of(args, {"secrets": classify_secrets(args, [])}).arguments
    assert masked["command"] == f"AWS_ACCESS_KEY_ID={REDACTED} aws s3 ls"
    assert masked["headers"]["Authorization"] == REDACTED
    assert AWS_KEY in args["command"]  # the original is untouched


def test_redaction_works_even_without_facts() -> None:
    masked = Redaction.of({"k": PRIVATE_KEY, "password": "hunter2"}, {}).arguments
    assert masked == {"k": REDACTED, "password": REDACTED}


def test_redaction_keeps_the_name_of_an_assignment() -> None:
    masked = Redaction.of({"dsn": "postgres://app:s3cr3t-pw@db/app"}, {}).arguments
    assert masked["dsn"] == f"postgres://app:{REDACTED}@db/app"
