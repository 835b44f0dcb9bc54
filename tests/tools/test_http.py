"""tools.http against a real HTTP server on 127.0.0.1, started by the test."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from server.errors import ConfigError, InvalidArguments, ToolError
from server.registry import GuardedTool, ToolRegistry, load_pack


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/big":
            self._send(200, b"z" * 100_000)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(200, b"hello", extra={"X-Served-By": "test"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        echo = {"method": "POST", "body": body.decode(), "auth": self.headers.get("Authorization")}
        self._send(201, json.dumps(echo).encode())

    def do_DELETE(self) -> None:
        self._send(204, b"")

    def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def http_tool(**options: Any) -> GuardedTool:
    reg = ToolRegistry()
    load_pack("tools.http", reg, options)
    tool = reg.get("http_request")
    assert tool is not None
    return tool


def test_declarations() -> None:
    tool = http_tool()
    assert tool.classifiers == {"url": "url", "headers": "secret", "body": "size"}
    assert tool.annotations["openWorldHint"] is True
    assert "DELETE" in tool.input_schema["properties"]["method"]["enum"]


async def test_get(server: str) -> None:
    data = (await http_tool().run({"method": "GET", "url": server + "/hello"})).structured_content
    assert data["status"] == 200 and data["body"] == "hello"
    assert data["headers"]["x-served-by"] == "test"
    assert data["bytes"] == 5 and data["truncated"] is False


async def test_post_sends_body_and_headers(server: str) -> None:
    args = {"method": "POST", "url": server + "/items", "headers": {"Authorization": "Bearer t0k"}, "body": "{}"}
    data = (await http_tool().run(args)).structured_content
    assert data["status"] == 201
    assert json.loads(data["body"]) == {"method": "POST", "body": "{}", "auth": "Bearer t0k"}


async def test_response_is_capped(server: str) -> None:
    data = (await http_tool(max_bytes=1000).run({"method": "GET", "url": server + "/big"})).structured_content
    assert data["body"] == "z" * 1000 and data["truncated"] is True
    assert data["bytes"] > 1000


async def test_redirects_are_returned_not_followed(server: str) -> None:
    data = (await http_tool().run({"method": "GET", "url": server + "/redirect"})).structured_content
    assert data["status"] == 302 and data["headers"]["location"] == "http://example.invalid/"


async def test_the_environment_proxy_is_ignored(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    data = (await http_tool().run({"method": "DELETE", "url": server + "/x"})).structured_content
    assert data["status"] == 204


async def test_allow_and_deny_lists(server: str) -> None:
    allowed = http_tool(allow_hosts=["127.0.0.1", "*.example.com"], deny_hosts=["admin.example.com"])
    assert (await allowed.run({"method": "GET", "url": server})).structured_content["status"] == 200
    allowed.validate({"method": "GET", "url": "https://api.example.com/v1"})
    for url in ["https://admin.example.com/", "https://example.org/", "http://a.example.com@evil.test/"]:
        with pytest.raises(InvalidArguments, match="not allowed") as info:
            allowed.validate({"method": "GET", "url": url})
        assert info.value.field == "url"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"method": "GET", "url": "file:///etc/passwd"}, "url"),
        ({"method": "GET", "url": "/relative"}, "url"),
        ({"method": "GET", "url": "http://host/\r\nX-Injected: 1"}, "url"),
        ({"method": "GET", "url": "http://h/", "headers": {"X-A": "v\r\nX-Injected: 1"}}, "headers"),
        ({"method": "GET", "url": "http://h/", "headers": {"Bad Header": "v"}}, "headers"),
        ({"method": "TRACE", "url": "http://h/"}, "method"),
        ({"method": "GET", "url": "http://h/", "headers": {"X": 1}}, "headers"),
    ],
)
def test_refusals_happen_in_validate(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        http_tool().validate(arguments)
    assert info.value.field == field


async def test_a_connection_failure_is_a_tool_error() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
        with pytest.raises(ToolError, match="http_request failed: ConnectError"):
            await http_tool(timeout=2).run({"method": "GET", "url": url})


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="allow_host"):
        load_pack("tools.http", ToolRegistry(), {"allow_host": ["x"]})
