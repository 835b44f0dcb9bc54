"""Agents with OAuth access tokens, as the MCP authorization spec has them, against a real `keyturn serve --http`
and a real local issuer (its metadata and JWKS served over HTTP on 127.0.0.1, its tokens signed with its keys).

The attacker's tokens: signed by another key under the issuer's key id, expired, for another audience, from
another issuer, `alg: none`, HS256 keyed with the issuer's public key, without the required scope, naming a static
agent as their principal, and a flood of made-up key ids. Each is refused before any call is recorded."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.canonical import sha256_hex
from tests.conftest import Home, agent_client, free_port
from tests.helpers import LocalHTTP, send_json

SCOPE = "keyturn:call"


class Issuer:
    """An OAuth authorization server's public side: metadata, JWKS (its keys can rotate), and token minting."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/oauth-authorization-server":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    body = {"keys": [issuer.jwk(kid) for kid in issuer.keys]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                send_json(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = LocalHTTP(Handler)
        self.url = self.http.url

    def jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
        return {**json.loads(algo.to_jwk(key.public_key())), "kid": kid, "use": "sig"}

    def token(self, resource: str, *, kid: str = "k1", key: Any = None, alg: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "sub": "build-agent", "aud": resource, "iat": now, "exp": now + 300,
                "scope": SCOPE, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        signing = key if key is not None else self.keys[kid]
        algorithm = alg or ("RS256" if isinstance(signing, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(body, signing, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    i = Issuer()
    yield i
    i.http.close()


STATIC = "static-agent-token-4c1d"


def configure(home: Home, issuer: Issuer, port: int) -> str:
    resource = f"http://127.0.0.1:{port}/mcp"
    home.write_config(
        oauth={"issuer": issuer.url, "resource": resource, "scopes": [SCOPE], "on_behalf_of_claim": "act.sub",
               "jwks_min_refresh_s": 0},
        agents=[{"name": "ci-bot", "token_sha256": sha256_hex(STATIC)}])
    return resource


async def call_as(base: str, token: str | None) -> Any:
    async with agent_client(base, token) as client:
        return await client.call_tool("sql_query", {"query": "SELECT 1"})


async def refused(base: str, token: str | None) -> httpx2.Response:
    """What a client without a good token gets: the HTTP answer to its first message."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(base + "/mcp", json=body, headers=headers)


async def test_access_tokens_are_verified_and_mapped_to_principals(home: Home, issuer: Issuer) -> None:
    port = free_port()
    resource = configure(home, issuer, port)
    base = home.serve_http(port)

    # The protected resource metadata names the issuer; a request without a token is told where to look.
    async with httpx2.AsyncClient(timeout=30) as http:
        meta = (await http.get(base + "/.well-known/oauth-protected-resource/mcp")).json()
    assert meta["resource"] == resource
    assert [u.rstrip("/") for u in meta["authorization_servers"]] == [issuer.url]
    r = await refused(base, None)
    assert r.status_code == 401
    assert "resource_metadata=" in r.headers["www-authenticate"] and r.headers["www-authenticate"].startswith("Bearer")

    with anyio.fail_after(60):
        good = await call_as(base, issuer.token(resource, act={"sub": "sam"}))
        static = await call_as(base, STATIC)
    assert not good.is_error and not static.is_error
    received = [e["payload"] for e in home.ledger_events() if e["kind"] == "call.received"]
    assert [(p["principal"], p["on_behalf_of"]) for p in received] == [("build-agent", "sam"), ("ci-bot", None)]

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = issuer.keys["k1"].public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    attacks = {
        "forged (another key, the issuer's kid)": issuer.token(resource, key=other),
        "expired": issuer.token(resource, exp=now - 600, iat=now - 900),
        "another audience": issuer.token(resource, aud="http://127.0.0.1:1/mcp"),
        "another issuer": issuer.token(resource, iss="http://127.0.0.1:2"),
        "no audience": issuer.token(resource, aud=None),
        "no expiry": issuer.token(resource, exp=None),
        "without the scope": issuer.token(resource, scope="something:else"),
        "a static agent's name": issuer.token(resource, sub="ci-bot"),
        "unknown kid": issuer.token(resource, kid="nope", key=other),
        "alg none": jwt.encode({"iss": issuer.url, "sub": "x", "aud": resource, "exp": now + 300, "scope": SCOPE},
                               None, algorithm="none", headers={"kid": "k1"}),
        "HS256 keyed with the public key": _hs256_with(public_pem, issuer.url, resource, now),
        "garbage": "not.a.jwt",
    }
    assert (await refused(base, issuer.token(resource))).status_code == 200  # (the same request, a good token)
    for name, token in attacks.items():
        r = await refused(base, token)
        assert r.status_code in (401, 403), f"{name}: {r.status_code} {r.text[:200]}"
        if name == "without the scope":
            assert r.status_code == 403 and "insufficient_scope" in r.headers["www-authenticate"]
    assert len([e for e in home.ledger_events() if e["kind"] == "call.received"]) == 2  # nothing else recorded


def _hs256_with(secret: bytes, iss: str, aud: str, now: int) -> str:
    """The algorithm-confusion attack: HMAC keyed with the issuer's public key. PyJWT refuses to sign with a PEM
    public key as an HMAC secret, so the token is built by hand."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps({"iss": iss, "sub": "x", "aud": aud, "exp": now + 300, "scope": SCOPE}).encode())
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


async def test_keys_rotate_without_a_restart_and_made_up_key_ids_do_not_hammer_the_issuer(
        home: Home, issuer: Issuer) -> None:
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    home.write_config(oauth={"issuer": issuer.url, "resource": resource, "scopes": [SCOPE],
                             "jwks_min_refresh_s": 3600})
    base = home.serve_http(port)
    with anyio.fail_after(60):
        assert not (await call_as(base, issuer.token(resource))).is_error
    fetched = issuer.jwks_fetches
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for i in range(20):  # made-up key ids: at most one fetch per jwks_min_refresh_s
        assert (await refused(base, issuer.token(resource, kid=f"made-up-{i}", key=other))).status_code == 401
    assert issuer.jwks_fetches - fetched <= 1


async def test_a_rotated_key_is_fetched_when_a_token_names_it(home: Home, issuer: Issuer) -> None:
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    home.write_config(oauth={"issuer": issuer.url, "resource": resource, "jwks_min_refresh_s": 0})
    base = home.serve_http(port)
    with anyio.fail_after(60):
        assert not (await call_as(base, issuer.token(resource))).is_error
        issuer.keys["k2"] = ec.generate_private_key(ec.SECP256R1())  # the issuer rotates to an EC key
        assert not (await call_as(base, issuer.token(resource, kid="k2"))).is_error
        del issuer.keys["k1"]  # and retires the old one: a token under it stays good until keyturn re-reads the set
    principals = {e["payload"]["principal"] for e in home.ledger_events() if e["kind"] == "call.received"}
    assert principals == {"build-agent"}


def test_the_oauth_config_refuses_plain_http_off_loopback_and_symmetric_algorithms() -> None:
    from server.config import load_settings
    from server.errors import ConfigError

    with pytest.raises(ConfigError, match="must be an https:// URL"):
        load_settings(None, oauth={"issuer": "http://idp.example.com", "resource": "https://k.example.com/mcp"})
    with pytest.raises(ConfigError, match="public-key ones"):
        load_settings(None, oauth={"issuer": "https://idp.example.com", "resource": "https://k.example.com/mcp",
                                   "algorithms": ["HS256"]})
