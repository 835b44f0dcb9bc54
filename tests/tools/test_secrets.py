"""tools.secrets: a real encrypted store in a temporary directory, opened with a master key set by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.errors import ConfigError, InvalidArguments, ToolError
from server.guarded import SECRET_RESULT_META, GuardedTool, ToolRegistry, load_pack
from tools.secrets import SecretStore, SecretStoreError

MASTER = "correct horse battery staple"
FAST = 2**10  # scrypt cost for tests only


def test_round_trip(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "s.json", MASTER, scrypt_n=FAST)
    meta = store.put("db/password", "pa55-w0rd")
    assert meta["version"] == 1 and meta["created"] == meta["rotated"]
    assert meta["fingerprint"].startswith("hmac-sha256:")
    assert store.get("db/password") == "pa55-w0rd"
    assert store.metadata("db/password") == meta
    assert store.names() == ["db/password"]
    # A second handle on the same file (another process) reads the same secrets.
    assert SecretStore(tmp_path / "s.json", MASTER).get("db/password") == "pa55-w0rd"


def test_the_file_holds_no_plaintext(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "s.json", MASTER, scrypt_n=FAST)
    store.put("api", "plain-text-value-123")
    raw = (tmp_path / "s.json").read_text()
    assert "plain-text-value-123" not in raw and MASTER not in raw


def test_rotate_makes_a_new_version(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "s.json", MASTER, scrypt_n=FAST)
    first = store.put("api", "old-value")
    second = store.rotate("api", length=40)
    assert second["version"] == 2 and second["created"] == first["created"]
    assert second["fingerprint"] != first["fingerprint"]
    value = store.get("api")
    assert len(value) == 40 and value.isalnum() and value != "old-value"


def test_a_wrong_master_key_does_not_open_the_store(tmp_path: Path) -> None:
    SecretStore(tmp_path / "s.json", MASTER, scrypt_n=FAST).put("x", "y")
    with pytest.raises(SecretStoreError, match="does not open"):
        SecretStore(tmp_path / "s.json", "a different master key!")


def test_entries_cannot_be_swapped(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "s.json", MASTER, scrypt_n=FAST)
    store.put("low", "harmless")
    store.put("high", "crown-jewels")
    data = json.loads((tmp_path / "s.json").read_text())
    data["secrets"]["low"]["sealed"] = data["secrets"]["high"]["sealed"]
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(SecretStoreError, match="tampered"):
        store.get("low")


def test_bad_names_and_missing_secrets(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "s.json", MASTER, scrypt_n=FAST)
    with pytest.raises(InvalidArguments):
        store.put("../etc", "x")
    with pytest.raises(SecretStoreError, match="no secret named"):
        store.get("nope")
    with pytest.raises(SecretStoreError, match="at least 16"):
        SecretStore(tmp_path / "t.json", "short")


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, GuardedTool]:
    monkeypatch.setenv("KT_TEST_MASTER", MASTER)
    SecretStore(tmp_path / "vault.json", MASTER, scrypt_n=FAST).put("prod/db", "s3cr3t-value")
    reg = ToolRegistry()
    load_pack("tools.secrets", reg, {"store": str(tmp_path / "vault.json"), "master_key_env": "KT_TEST_MASTER"})
    return {t.name: t for t in reg.list()}


def test_declarations(tools: dict[str, GuardedTool]) -> None:
    assert sorted(tools) == ["secrets_metadata", "secrets_read", "secrets_rotate"]
    assert tools["secrets_read"].secret_result is True
    assert not tools["secrets_metadata"].secret_result and not tools["secrets_rotate"].secret_result
    assert tools["secrets_rotate"].annotations["destructiveHint"] is True


async def test_metadata_and_rotate_never_return_the_value(tools: dict[str, GuardedTool]) -> None:
    meta = (await tools["secrets_metadata"].run({"name": "prod/db"})).structured_content
    assert meta["version"] == 1 and "value" not in meta
    rotated = await tools["secrets_rotate"].run({"name": "prod/db", "length": 24})
    assert rotated.structured_content["version"] == 2
    assert "s3cr3t" not in rotated.model_dump_json() and "value" not in rotated.structured_content


async def test_read_returns_the_value_marked_secret(tools: dict[str, GuardedTool]) -> None:
    result = await tools["secrets_read"].run({"name": "prod/db"})
    assert result.structured_content == {"name": "prod/db", "version": 1, "value": "s3cr3t-value"}
    assert result.meta == {SECRET_RESULT_META: True}


async def test_tool_refusals(tools: dict[str, GuardedTool]) -> None:
    with pytest.raises(InvalidArguments, match="secrets_read: argument 'name'"):
        tools["secrets_read"].validate({"name": "bad name"})
    with pytest.raises(InvalidArguments) as info:
        tools["secrets_rotate"].validate({"name": "x", "length": 4})
    assert info.value.field == "length"
    with pytest.raises(ToolError, match="no secret named"):
        await tools["secrets_read"].run({"name": "prod/missing"})


def test_register_needs_the_master_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYTURN_SECRETS_MASTER_KEY", raising=False)
    with pytest.raises(ConfigError, match="KEYTURN_SECRETS_MASTER_KEY"):
        load_pack("tools.secrets", ToolRegistry(), {"store": str(tmp_path / "v.json")})
    SecretStore(tmp_path / "v.json", MASTER, scrypt_n=FAST)
    monkeypatch.setenv("KEYTURN_SECRETS_MASTER_KEY", "not the right key at all")
    with pytest.raises(ConfigError, match="does not open"):
        load_pack("tools.secrets", ToolRegistry(), {"store": str(tmp_path / "v.json")})
