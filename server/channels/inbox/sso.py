"""Reviewers' single sign-on to the web inbox: OpenID Connect, authorization code flow with PKCE.

`GET /login/sso` sends the browser to the provider; `GET /login/sso/callback` takes the code back, exchanges it
(with the PKCE verifier, and the client's secret when it has one), checks the ID token (the provider's key,
`iss`, `aud`, `exp`, and the nonce of this very sign-in), maps its claim to the identity `oidc:<value>`, and
opens the same kind of session a reviewer token opens.

Nothing is kept on the server between the two requests. The browser holds a random secret in a short-lived cookie
(`keyturn_sso`, SameSite=Lax so the provider's redirect carries it back); the `state`, the `nonce` and the PKCE
verifier are derived from it. A callback whose `state` was not derived from this browser's secret (a forged or
stolen callback, a sign-in started by someone else: login CSRF) is refused, and the cookie is used once. So it
works unchanged with several keyturn instances behind a load balancer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import jwt
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from server.canonical import sha256_hex
from server.channels.inbox.sessions import (
    SESSION_COOKIE,
    SESSION_TTL_S,
    harden,
    is_https,
    keyed_mac,
    set_cookie,
)
from server.channels.inbox.site import Site, safe_next
from server.config import SsoConfig, https_or_loopback
from server.errors import ConfigError, LedgerError
from server.serving.oauth import Jwks, get_json, issuer_metadata

log = logging.getLogger(__name__)

SSO_COOKIE = "keyturn_sso"
SSO_TTL_S = 600
SSO_PATH = "/login/sso"
SECRET_CHARS = 43  # secrets.token_urlsafe(32)


def sso_token(identity: str) -> str:
    """What a single-sign-on session's fingerprint is made of: the identity alone (there is no reviewer token). The
    session stays valid while `reviewers:` still lists the identity."""
    return f"keyturn-sso\x00{identity}"


def sso_digests(config: SsoConfig | None, identities: list[str]) -> list[tuple[str, str]]:
    """(digest, identity) of every `oidc:` reviewer, for the sessions' still-valid check."""
    if config is None:
        return []
    return [(sha256_hex(sso_token(i)), i) for i in identities if i.startswith("oidc:")]


def _derived(secret: str) -> tuple[str, str, str]:
    """The sign-in's state, nonce and PKCE verifier (43 characters), from the browser's secret."""
    return keyed_mac(secret, "sso-state"), keyed_mac(secret, "sso-nonce"), keyed_mac(secret, "sso-pkce")


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class SingleSignOn:
    def __init__(self, site: Site, config: SsoConfig, login_page: Callable[..., Response],
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.site, self.config, self.login_page = site, config, login_page
        self.client_secret: str | None = None
        if config.client_secret_env:
            self.client_secret = env.get(config.client_secret_env) or None
            if self.client_secret is None:
                raise ConfigError(f"sso.client_secret_env names {config.client_secret_env}, which is not set")
        self.jwks = Jwks(config.issuer, None, min_refresh_s=30.0, max_age_s=3600.0)
        self._meta: dict[str, Any] | None = None

    async def _metadata(self) -> dict[str, Any]:
        if self._meta is None:
            meta = await issuer_metadata(self.config.issuer)
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(meta.get(key), str):
                    raise ValueError(f"the provider's metadata has no {key}")
                https_or_loopback(meta[key])
            self.jwks.uri = meta["jwks_uri"]
            self._meta = meta
        return self._meta

    def _refuse(self, request: Request, status: int, error: str) -> Response:
        response = self.login_page(request, status=status, error=error)  # the sign-in page, with why
        self._clear(response, request)
        return response

    def _clear(self, response: Response, request: Request) -> None:
        response.delete_cookie(SSO_COOKIE, path=SSO_PATH, secure=is_https(request), httponly=True, samesite="lax")

    # -- GET /login/sso ------------------------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        try:
            meta = await self._metadata()
        except Exception as e:
            log.error("single sign-on: the provider %s cannot be used: %s", self.config.issuer, e)
            return self._refuse(request, 503, "The sign-in provider cannot be reached; try again, or use a token.")
        secret = secrets.token_urlsafe(32)
        state, nonce, verifier = _derived(secret)
        query = urlencode({
            "response_type": "code", "client_id": self.config.client_id, "redirect_uri": self.config.redirect_url,
            "scope": " ".join(self.config.scopes), "state": state, "nonce": nonce,
            "code_challenge": _challenge(verifier), "code_challenge_method": "S256",
        })
        endpoint = meta["authorization_endpoint"]
        response = RedirectResponse(f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", status_code=303)
        next_url = safe_next(request.query_params.get("next"))
        packed = base64.urlsafe_b64encode(next_url.encode()).decode().rstrip("=")
        # Lax, not Strict: the provider's redirect back is a cross-site navigation, and must carry it.
        response.set_cookie(SSO_COOKIE, f"{secret}.{packed}", max_age=SSO_TTL_S, path=SSO_PATH,
                            secure=is_https(request), httponly=True, samesite="lax")
        return harden(response)

    # -- POST /logout (after keyturn's own session has ended) ----------------------------------------

    async def logout_url(self) -> str | None:
        """Where to send a browser whose single-sign-on session keyturn just ended, so that the provider's session
        ends too (OpenID Connect RP-Initiated Logout): otherwise the next "Sign in with ..." on a shared computer
        signs the same person in again without a password. None when the provider offers no logout, or cannot be
        reached now (keyturn's session is over either way)."""
        if not self.config.provider_logout:
            return None
        try:
            endpoint = (await self._metadata()).get("end_session_endpoint")
            if not isinstance(endpoint, str):
                return None
            https_or_loopback(endpoint)
        except Exception as e:
            log.warning("single sign-on: could not sign out at the provider %s: %s", self.config.issuer, e)
            return None
        query = urlencode({"client_id": self.config.client_id,
                           "post_logout_redirect_uri": self.config.after_logout_url})
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    # -- GET /login/sso/callback ---------------------------------------------------------------------

    async def callback(self, request: Request) -> Response:
        cookie = request.cookies.get(SSO_COOKIE, "")
        secret, _, packed = cookie.partition(".")
        if len(secret) != SECRET_CHARS or len(packed) > 2048:
            return self._refuse(request, 403, "This sign-in was not started here, or took too long. Please try again.")
        state, nonce, verifier = _derived(secret)
        given_state = request.query_params.get("state", "")
        if not hmac.compare_digest(given_state.encode(), state.encode()):
            log.warning("single sign-on: a callback with a state this browser did not start was refused")
            return self._refuse(request, 403, "This sign-in was not started here, or took too long. Please try again.")
        if "error" in request.query_params:
            return self._refuse(request, 401, "The sign-in provider did not sign you in.")
        code = request.query_params.get("code", "")
        if not code or len(code) > 2048:
            return self._refuse(request, 400, "The sign-in provider sent no code.")
        try:
            next_url = safe_next(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)).decode())
        except (ValueError, UnicodeDecodeError):
            next_url = "/inbox"
        try:
            identity = await self._identity(code, nonce, verifier)
        except _Refused as e:
            log.warning("single sign-on refused: %s", e)
            return self._refuse(request, 401, str(e))
        if identity not in {r.identity for r in self.site.kt.settings.reviewers}:
            log.warning("single sign-on: %s signed in but is not a reviewer", identity)
            return self._refuse(request, 403, f"You signed in as {identity.removeprefix('oidc:')}, who is not a "
                                              "keyturn reviewer.")
        try:
            _, sid = await self.site.sessions.open(identity, sso_token(identity))
        except LedgerError as e:
            log.error("single sign-on: no session could be opened for %s: %s", identity, e)
            return harden(Response(f"keyturn {e.public}; try again shortly.", status_code=503,
                                   media_type="text/plain"))
        # A page of our own that moves on, rather than a redirect: the session cookie is SameSite=Strict, and the
        # redirect chain began at the provider, so the browser would not send it to the next page yet.
        response = self.site.page(request, "continue.html", None, title="Signed in", next_url=next_url)
        set_cookie(response, request, SESSION_COOKIE, sid, int(SESSION_TTL_S))
        self._clear(response, request)
        return response

    async def _userinfo(self, url: str, access_token: str) -> dict[str, Any]:
        try:
            info = await get_json(url, bearer=access_token)
        except Exception as e:
            raise _Refused(f"The provider's account details could not be read ({type(e).__name__}).") from None
        if not isinstance(info, dict):
            raise _Refused("The provider's account details are not an object.")
        return info

    async def _identity(self, code: str, nonce: str, verifier: str) -> str:
        meta = await self._metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.config.redirect_url,
                "code_verifier": verifier, "client_id": self.config.client_id}
        auth = (self.config.client_id, self.client_secret) if self.client_secret else None
        try:
            tokens = await get_json(meta["token_endpoint"], data=form, auth=auth)
        except Exception as e:
            raise _Refused(f"The sign-in provider refused the sign-in ({type(e).__name__}).") from None
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str):
            raise _Refused("The sign-in provider sent no ID token.")
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise _Refused("The ID token is not a JWT.") from None
        if header.get("alg") not in self.config.algorithms:
            raise _Refused("The ID token is signed with an algorithm keyturn does not accept.")
        key = await self.jwks.key(str(header.get("kid", "")))
        if key is None:
            raise _Refused("The ID token is signed with a key the provider does not publish.")
        try:
            claims = jwt.decode(id_token, key=key, algorithms=list(self.config.algorithms),
                                audience=self.config.client_id, issuer=self.config.issuer,
                                leeway=self.config.leeway_s,
                                options={"require": ["exp", "iat", "iss", "aud", "sub", "nonce"]})
        except jwt.PyJWTError as e:
            raise _Refused(f"The ID token was refused ({type(e).__name__}).") from None
        if not hmac.compare_digest(str(claims.get("nonce")).encode(), nonce.encode()):
            raise _Refused("The ID token was issued for another sign-in.")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.config.client_id:
            raise _Refused("The ID token was issued to another client.")
        if self.config.claim not in claims and isinstance(tokens.get("access_token"), str) \
                and isinstance(meta.get("userinfo_endpoint"), str):
            # Many providers put scope claims (email) in the UserInfo answer only: ask it, for this very subject.
            info = await self._userinfo(meta["userinfo_endpoint"], tokens["access_token"])
            if info.get("sub") != claims["sub"]:
                raise _Refused("The provider's account details are for another subject.")
            claims = {**{k: info[k] for k in ("email", "email_verified") if k in info}, **claims}
        value = claims.get(self.config.claim)
        if self.config.claim == "email" and claims.get("email_verified") is not True:
            raise _Refused("The provider has not verified this account's email address.")
        if not isinstance(value, str) or not value or len(value) > 320:
            raise _Refused(f"The ID token carries no {self.config.claim}.")
        return f"oidc:{value}"


class _Refused(Exception):
    """A sign-in refused, with the text the person sees."""
