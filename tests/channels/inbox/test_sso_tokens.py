"""The ID tokens a real provider would never send, from a provider that misbehaves: a local fake of an OpenID
provider's web endpoints on 127.0.0.1 (metadata, keys, authorize, token) against a real `keyturn serve --http`.
Each bad token is refused and opens no session; the good one opens one. (The real provider's stories, in Chromium,
are in test_browser_sso.py.)"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import Home, free_port
from tests.helpers import LocalHTTP, send_json

CLIENT_ID = "keyturn-inbox"


class FakeProvider:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.mode = "good"
        self.nonce = ""
        self.verifier_seen: str | None = None
        p = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/.well-known/openid-configuration":
                    send_json(self, {"issuer": p.url, "authorization_endpoint": p.url + "/authorize",
                                "token_endpoint": p.url + "/token", "jwks_uri": p.url + "/jwks"})
                elif url.path == "/jwks":
                    key = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(p.key.public_key()))
                    send_json(self, {"keys": [{**key, "kid": "k1", "use": "sig"}]})
                elif url.path == "/authorize":
                    assert q["code_challenge_method"] == "S256" and q["client_id"] == CLIENT_ID
                    p.nonce = q["nonce"]
                    back = q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": "c0de", "state": q["state"]})
                    self.send_response(302)
                    self.send_header("Location", back)
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.end_headers()

            def do_POST(self) -> None:
                form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
                p.verifier_seen = form.get("code_verifier")
                send_json(self, {"id_token": p.id_token(), "token_type": "Bearer"})

            def log_message(self, *args: Any) -> None:
                pass

        self.http = LocalHTTP(Handler)
        self.url = self.http.url

    def id_token(self) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.url, "sub": "u-1", "aud": CLIENT_ID, "iat": now, "exp": now + 300,
                                  "nonce": self.nonce, "email": "alice@example.com", "email_verified": True}
        key: Any = self.key
        alg = "RS256"
        match self.mode:
            case "another audience":
                claims["aud"] = "another-client"
            case "two audiences, azp another":
                claims.update(aud=[CLIENT_ID, "another-client"], azp="another-client")
            case "another nonce":
                claims["nonce"] = "a-nonce-from-another-sign-in"
            case "expired":
                claims.update(iat=now - 900, exp=now - 600)
            case "another issuer":
                claims["iss"] = "http://127.0.0.1:1"
            case "another key":
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            case "alg none":
                return jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"})
            case "email not verified":
                claims["email_verified"] = False
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": "k1"})


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    f = FakeProvider()
    yield f
    f.http.close()


async def sign_in(base: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=30, follow_redirects=False) as http:
        start = await http.get(base + "/login/sso")
        assert start.status_code == 303
        at_provider = await http.get(start.headers["location"])
        assert at_provider.status_code == 302
        return await http.get(at_provider.headers["location"])


async def test_id_tokens_a_provider_should_never_send_are_refused(home: Home, fake: FakeProvider) -> None:
    port = free_port()
    home.write_config(
        people={"alice": {"groups": ["dba"]}, "carol": {"groups": ["dba"]}},
        reviewers=[{"identity": "oidc:alice@example.com", "person": "alice"}],
        sso={"issuer": fake.url, "client_id": CLIENT_ID, "redirect_url": f"http://127.0.0.1:{port}/login/sso/callback"})
    base = home.serve_http(port)
    for mode in ("another audience", "two audiences, azp another", "another nonce", "expired", "another issuer",
                 "another key", "alg none", "email not verified"):
        fake.mode = mode
        r = await sign_in(base)
        assert r.status_code == 401, f"{mode}: {r.status_code}"
        assert "keyturn_session" not in r.headers.get("set-cookie", ""), mode
    fake.mode = "good"
    r = await sign_in(base)
    assert r.status_code == 200 and "keyturn_session=" in r.headers["set-cookie"]
    assert fake.verifier_seen is not None and len(fake.verifier_seen) >= 43  # PKCE's verifier went to the provider
