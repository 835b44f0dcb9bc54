"""Every shipped pack's validation errors name the field, never the value: the value may be a secret, or the agent's
probe of the network or the disk, and the error goes to the agent and into the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.errors import InvalidArguments
from server.guarded import GuardedTool, ToolRegistry, load_pack
from tools.secrets import SecretStore

CANARY = "kt-canary-7f3a"
MASTER = "correct horse battery staple"


def pack(module: str, options: dict[str, Any]) -> dict[str, GuardedTool]:
    reg = ToolRegistry()
    load_pack(module, reg, options)
    return {t.name: t for t in reg.list()}


def refused(tool: GuardedTool, arguments: dict[str, Any], *hidden: str) -> InvalidArguments:
    with pytest.raises(InvalidArguments) as info:
        tool.validate(arguments)
    message = str(info.value)
    for value in (CANARY, *hidden):
        assert value not in message, message
    assert info.value.field, message
    return info.value


HTTP_CASES = {
    "a loopback name": ({"url": f"http://{CANARY}.localhost/"}, ()),
    "a private address": ({"url": "http://10.77.66.55/"}, ("10.77.66.55",)),
    "a loopback address spelled in hex": ({"url": "http://0x7f.0.0.1/"}, ("0x7f", "127.0.0.1")),
    "a metadata address": ({"url": "http://169.254.169.254/"}, ("169.254.169.254",)),
    "a numeric host that is no address": ({"url": "http://999.77.66.55/"}, ("999.77.66.55",)),
    "a host the allow list does not hold": ({"url": f"https://{CANARY}.example.org/"}, ()),
    "a bad port": ({"url": f"http://example.com:{CANARY}/"}, ()),
    "a bad header name": ({"url": "https://example.com/", "headers": {f"X {CANARY}": "v"}}, ()),
    "a header value with a newline": ({"url": "https://example.com/", "headers": {"X-A": f"{CANARY}\r\nX-B: 1"}}, ()),
}


@pytest.mark.parametrize("case", sorted(HTTP_CASES))
def test_http_refusals_name_the_field_not_the_host(case: str) -> None:
    tool = pack("tools.http", {"allow_hosts": ["example.com"]})["http_request"]
    arguments, hidden = HTTP_CASES[case]
    refused(tool, {"method": "GET", **arguments}, *hidden)


def test_sql_export_refuses_a_table_name_without_echoing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tools = pack("tools.sql", {"database": "shop.db"})
    error = refused(tools["sql_export"], {"path": "out.csv", "table": f"{CANARY}; DROP TABLE x"})
    assert error.field == "table"


def test_shell_refuses_a_cwd_that_is_a_file_without_echoing_it(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / CANARY).write_text("a file, not a directory")
    tool = pack("tools.shell", {"cwd_roots": [str(tmp_path / "work")]})["shell_run"]
    error = refused(tool, {"argv": ["true"], "cwd": CANARY}, str(tmp_path))
    assert error.field == "cwd"


def test_secrets_refuse_a_bad_name_without_echoing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_TEST_MASTER", MASTER)
    SecretStore(tmp_path / "vault.json", MASTER, scrypt_n=2**10).put("prod/db", "s3cr3t-value")
    tools = pack("tools.secrets", {"store": str(tmp_path / "vault.json"), "master_key_env": "KT_TEST_MASTER"})
    for tool in tools.values():
        if "name" in tool.input_schema.get("properties", {}):
            arguments = {"name": f"{CANARY} !"} | ({"value": "v"} if "value" in tool.input_schema["properties"] else {})
            assert refused(tool, arguments).field == "name"


def test_files_refuse_a_path_outside_the_roots_without_echoing_it(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    tools = pack("tools.files", {"roots": [str(tmp_path / "root")]})
    for name, tool in tools.items():
        props = tool.input_schema.get("properties", {})
        arguments: dict[str, Any] = {k: f"/etc/{CANARY}" for k in ("path", "source", "destination") if k in props}
        arguments |= {"content": "x"} if "content" in props else {}
        assert refused(tool, arguments, "/etc/").field in ("path", "source", "destination"), name
