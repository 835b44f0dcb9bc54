"""tools.http against a real HTTP server on 127.0.0.1, started by the test.

The server is on loopback, which the pack refuses unless `allow_addresses` covers it: ordinary stories use
`local_tool()`, which allows 127.0.0.1; the address stories show that no spelling of loopback reaches the server
without it, and that the server then sees no connection at all.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import tools.http
from server.errors import ConfigError, InvalidArguments, ToolError
from server.guarded import GuardedTool, ToolRegistry, load_pack
from tools.http import send


class Handler(BaseHTTPRequestHandler):
    server: Listener

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host", ""))
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


class Listener(ThreadingHTTPServer):
    """Counts every connection it accepts and keeps the Host header of every GET."""

    def __init__(self, address: tuple[str, int], ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(address, Handler)
        self.connections = 0
        self.hosts: list[str] = []
        self.ssl_context = ssl_context

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        self.connections += 1
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that refuses our certificate is one of the stories


@dataclass
class Served:
    listener: Listener
    port: int
    base: str
    sni: list[str | None] = field(default_factory=list)


def serve(listener: Listener) -> Iterator[Served]:
    thread = threading.Thread(target=listener.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        port = listener.server_address[1]
        yield Served(listener, port, f"http://127.0.0.1:{port}")
    finally:
        listener.shutdown()
        listener.server_close()
        thread.join(5)


@pytest.fixture
def served() -> Iterator[Served]:
    yield from serve(Listener(("127.0.0.1", 0)))


@pytest.fixture
def server(served: Served) -> str:
    return served.base


def http_tool(**options: Any) -> GuardedTool:
    reg = ToolRegistry()
    load_pack("tools.http", reg, options)
    tool = reg.get("http_request")
    assert tool is not None
    return tool


def local_tool(**options: Any) -> GuardedTool:
    """The pack with the test server's loopback address allowed."""
    return http_tool(allow_addresses=["127.0.0.1/32"], **options)


def test_declarations() -> None:
    tool = http_tool()
    assert tool.classifiers == {"url": "url", "headers": "secret", "body": "size"}
    assert tool.annotations["openWorldHint"] is True
    assert "DELETE" in tool.input_schema["properties"]["method"]["enum"]


async def test_get(server: str) -> None:
    data = (await local_tool().run({"method": "GET", "url": server + "/hello"})).structured_content
    assert data["status"] == 200 and data["body"] == "hello"
    assert data["headers"]["x-served-by"] == "test"
    assert data["bytes"] == 5 and data["truncated"] is False


async def test_post_sends_body_and_headers(server: str) -> None:
    args = {"method": "POST", "url": server + "/items", "headers": {"Authorization": "Bearer t0k"}, "body": "{}"}
    data = (await local_tool().run(args)).structured_content
    assert data["status"] == 201
    assert json.loads(data["body"]) == {"method": "POST", "body": "{}", "auth": "Bearer t0k"}


async def test_response_is_capped(server: str) -> None:
    data = (await local_tool(max_bytes=1000).run({"method": "GET", "url": server + "/big"})).structured_content
    assert data["body"] == "z" * 1000 and data["truncated"] is True
    assert data["bytes"] > 1000


async def test_redirects_are_returned_not_followed(server: str) -> None:
    data = (await local_tool().run({"method": "GET", "url": server + "/redirect"})).structured_content
    assert data["status"] == 302 and data["headers"]["location"] == "http://example.invalid/"


async def test_the_environment_proxy_is_ignored(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    data = (await local_tool().run({"method": "DELETE", "url": server + "/x"})).structured_content
    assert data["status"] == 204


async def test_allow_and_deny_lists(server: str) -> None:
    allowed = local_tool(allow_hosts=["127.0.0.1", "*.example.com"], deny_hosts=["admin.example.com"])
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
            await local_tool(timeout=2).run({"method": "GET", "url": url})


@pytest.mark.parametrize(
    ("options", "needle"),
    [({"allow_host": ["x"]}, "allow_host"), ({"allow_addresses": ["10.0.0.1/8"]}, "allow_addresses"),
     ({"allow_addresses": ["not-a-network"]}, "allow_addresses")],
)
def test_bad_options(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_pack("tools.http", ToolRegistry(), options)


# -- where a request goes is judged by address, not by spelling ------------------------------------------------

LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:{port}/", "http://2130706433:{port}/", "http://0x7f.1:{port}/", "http://017700000001:{port}/",
    "http://0x7f000001:{port}/", "http://127.1:{port}/", "http://127.0.0.1.:{port}/", "http://0.0.0.0:{port}/",
    "http://0:{port}/", "http://[::1]:{port}/", "http://[0:0:0:0:0:0:0:1]:{port}/", "http://[::]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/", "http://[::ffff:7f00:1]:{port}/", "http://[::127.0.0.1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/", "http://[2002:7f00:1::]:{port}/", "http://[::ffff:0:7f00:1]:{port}/",
    "http://localhost:{port}/", "http://localhost.:{port}/", "http://LOCALHOST:{port}/",
    "http://api.localhost:{port}/", "http://user@127.0.0.1:{port}/", "https://127.0.0.1:{port}/",
]
INTERNAL = [
    "http://10.0.0.1/", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://169.254.1.1/",
    "http://224.0.0.1/", "http://255.255.255.255/", "http://240.0.0.1/", "http://[fc00::1]/", "http://[fd12::1]/",
    "http://[fe80::1]/", "http://[ff02::1]/", "http://[::ffff:10.0.0.1]/", "http://169.254.169.254/latest/",
    "http://[::ffff:169.254.169.254]/", "http://[fd00:ec2::254]/", "http://100.100.100.200/", "http://0xa9fea9fe/",
]


async def through_the_listener(served: Served) -> int:
    """How many connections the listener accepted before one allowed request made now. It accepts connections
    in order, so once it has answered this request it has accepted every connection attempted before it."""
    data = (await local_tool().run({"method": "GET", "url": served.base + "/"})).structured_content
    assert data["status"] == 200
    return served.listener.connections - 1


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
async def test_no_spelling_of_loopback_reaches_the_listener(served: Served, spelling: str) -> None:
    url = spelling.format(port=served.port)
    tool = http_tool()
    with pytest.raises(InvalidArguments) as info:
        tool.validate({"method": "GET", "url": url})
    assert info.value.field == "url"
    assert "loopback" in str(info.value) or "unspecified" in str(info.value) or "write it as" in str(info.value)
    with pytest.raises(InvalidArguments):
        await tool.run({"method": "GET", "url": url})
    # The wall behind `validate`: the pack's own sender judges the address again when it runs.
    with pytest.raises(OSError):  # PermissionError, or for `localhost.` no such name here
        await send("GET", url, {}, None, max_bytes=100, time_limit=5)
    assert await through_the_listener(served) == 0


@pytest.mark.parametrize("url", INTERNAL)
async def test_internal_and_metadata_addresses_are_refused(url: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        http_tool(allow_addresses=["10.0.0.0/8", "169.254.0.0/16"] if "169.254.169" in url else []).validate(
            {"method": "GET", "url": url})
    assert "address" in str(info.value)
    with pytest.raises(PermissionError, match="address; requests may not go there"):
        await send("GET", url, {}, None, max_bytes=100, time_limit=5)


def test_metadata_endpoints_need_their_exact_address() -> None:
    url = "http://169.254.169.254/latest/"
    with pytest.raises(InvalidArguments, match="only by listing this exact address"):
        http_tool(allow_addresses=["169.254.0.0/16"]).validate({"method": "GET", "url": url})
    http_tool(allow_addresses=["169.254.169.254"]).validate({"method": "GET", "url": url})


def test_an_odd_spelling_of_a_public_address_is_refused_with_its_plain_form() -> None:
    with pytest.raises(InvalidArguments, match=r"write it as 8\.8\.8\.8"):
        http_tool().validate({"method": "GET", "url": "http://134744072/"})
    with pytest.raises(InvalidArguments, match="not a valid"):
        http_tool().validate({"method": "GET", "url": "http://127.0.0.08/"})
    http_tool().validate({"method": "GET", "url": "http://8.8.8.8/"})
    http_tool().validate({"method": "GET", "url": "http://[2606:4700::1111]/"})


async def test_a_name_is_judged_by_what_it_resolves_to(served: Served) -> None:
    # `validate` lets `localhost` through when loopback is allowed at all; here only ::1 is, and localhost is
    # 127.0.0.1 on this machine: the run-time check, not validate, refuses it.
    tool = http_tool(allow_addresses=["::1/128"])
    args = {"method": "GET", "url": f"http://localhost:{served.port}/"}
    tool.validate(args)
    with pytest.raises(ToolError, match=r"'localhost' resolves to 127\.0\.0\.1, a loopback address"):
        await tool.run(args)
    assert await through_the_listener(served) == 0


async def test_an_allowed_address_is_reached_with_the_urls_host_header(served: Served) -> None:
    tool = http_tool(allow_addresses=["127.0.0.1/32", "::1/128"])  # ::1 too: localhost may resolve to both
    data = (await tool.run({"method": "GET", "url": f"http://localhost:{served.port}/hello"})).structured_content
    assert data["status"] == 200 and data["body"] == "hello"
    assert served.listener.hosts == [f"localhost:{served.port}"]


def test_a_host_header_from_the_agent_is_refused() -> None:
    with pytest.raises(InvalidArguments, match="Host header") as info:
        http_tool().validate({"method": "GET", "url": "https://example.com/", "headers": {"host": "10.0.0.1"}})
    assert info.value.field == "headers"


# DNS rebinding needs a DNS server that answers differently each time; there is none here (loopback only), so
# these stories replace the pack's own resolver function, `tools.http.resolve`, and nothing else.

class Rebinding:
    def __init__(self, *answers: list[str]) -> None:
        self.answers = [[ipaddress.ip_address(a) for a in answer] for answer in answers]
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[Any]:
        self.asked.append(host)
        return self.answers[min(len(self.asked), len(self.answers)) - 1]


async def test_the_checked_address_is_the_one_connected_to(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = Rebinding(["127.0.0.1"], ["127.0.0.2"])  # a second lookup would give an address not allowed
    monkeypatch.setattr(tools.http, "resolve", resolver)
    url = f"http://rebind.test:{served.port}/hello"  # no resolver on this machine knows this name
    data = (await local_tool().run({"method": "GET", "url": url})).structured_content
    assert data["status"] == 200 and data["body"] == "hello"
    assert resolver.asked == ["rebind.test"]  # asked once; the request went to that answer
    assert served.listener.hosts == [f"rebind.test:{served.port}"]


async def test_a_name_with_one_internal_address_is_refused_whole(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools.http, "resolve", Rebinding(["93.184.216.34", "127.0.0.1"]))
    with pytest.raises(ToolError, match=r"resolves to 127\.0\.0\.1, a loopback address"):
        await http_tool().run({"method": "GET", "url": f"http://mixed.test:{served.port}/"})
    assert await through_the_listener(served) == 0


# -- https: the certificate is verified for the URL's host name, not for the address connected to -------------

def certificate(names: list[x509.GeneralName]) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, leaf certificate, leaf key) as PEM; the leaf is valid for `names`."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyturn test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), leaf.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture
def tls_world(tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[tuple[Served, ssl.SSLContext]]:
    names: list[x509.GeneralName] = request.param
    ca, leaf, key = certificate(names)
    (tmp_path / "leaf.pem").write_bytes(leaf + key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "leaf.pem")
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value]
    client_ctx = ssl.create_default_context(cadata=ca.decode())
    for served in serve(Listener(("127.0.0.1", 0), server_ctx)):
        served.sni = sni
        yield served, client_ctx


@pytest.mark.parametrize("tls_world", [[x509.DNSName("keyturn.test")]], indirect=True)
async def test_https_sends_the_name_as_sni_and_verifies_the_certificate_for_it(
    tls_world: tuple[Served, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, trust = tls_world
    monkeypatch.setattr(tools.http, "resolve", Rebinding(["127.0.0.1"]))
    data = await send("GET", f"https://keyturn.test:{served.port}/hello", {}, None, max_bytes=100, time_limit=10,
                      allow_addresses=[ipaddress.ip_network("127.0.0.1/32")], verify=trust)
    assert data["status"] == 200 and data["body"] == "hello"
    assert served.sni == ["keyturn.test"] and served.listener.hosts == [f"keyturn.test:{served.port}"]


@pytest.mark.parametrize(
    "tls_world", [[x509.DNSName("other.test")], [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]], indirect=True
)
async def test_https_refuses_a_certificate_for_another_name_or_for_the_address(
    tls_world: tuple[Served, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, trust = tls_world
    monkeypatch.setattr(tools.http, "resolve", Rebinding(["127.0.0.1"]))
    with pytest.raises(httpx2.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await send("GET", f"https://keyturn.test:{served.port}/hello", {}, None, max_bytes=100, time_limit=10,
                   allow_addresses=[ipaddress.ip_network("127.0.0.1/32")], verify=trust)
    assert served.listener.hosts == []
