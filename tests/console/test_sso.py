"""Single sign-on in the console: OAuth 2.0 authorization code with PKCE (S256) in a real browser,
against an identity provider on loopback. A real provider (Keycloak, Dex) cannot run here, so
this one is a stand-in at the HTTP boundary that speaks the same protocol and checks what a
provider checks: the discovery document, /authorize (client, redirect URI, S256 challenge),
/token (one-time code, same redirect URI, the verifier hashing to the challenge) and its JWKS.
The app is Converge's own, on a database of its own, configured for the provider as an
operator would; the API verifies the access token the console then sends.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from support import LiveServer, free_port, make_settings, own_database

from converge.app import create_app
from converge.runtime.fake import FakeBackend

if not Path("/usr/bin/chromium").exists():
    pytest.skip("console browser tests need Debian's Chromium at /usr/bin/chromium", allow_module_level=True)
expect = pytest.importorskip("playwright.async_api", reason="the playwright package is missing").expect

pytestmark = pytest.mark.xdist_group("console")
CLIENT_ID = "converge-console"
AUDIENCE = "converge"
CORS = {"Access-Control-Allow-Origin": "*"}  # what a provider answers a browser app's fetches with


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


@dataclass
class Provider:
    url: str = ""
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    refuse: bool = False  # the person declines at the provider
    authorized: list[dict[str, str]] = field(default_factory=list)
    exchanges: list[tuple[int, str]] = field(default_factory=list)  # (status, error) per /token call

    def app(self) -> Starlette:
        async def discovery(_: Request) -> Response:
            return JSONResponse(
                {
                    "issuer": self.url,
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                    "jwks_uri": f"{self.url}/jwks",
                    "code_challenge_methods_supported": ["S256"],
                },
                headers=CORS,
            )

        async def authorize(request: Request) -> Response:
            q = dict(request.query_params)
            self.authorized.append(q)
            if q.get("client_id") != CLIENT_ID or q.get("response_type") != "code":
                return JSONResponse({"error": "unauthorized_client"}, status_code=400)
            if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
                return JSONResponse(
                    {"error": "invalid_request", "error_description": "PKCE S256 required"}, 400
                )
            back = q["redirect_uri"]
            if self.refuse:
                answer = {
                    "error": "access_denied",
                    "error_description": "The user declined",
                    "state": q["state"],
                }
                return RedirectResponse(f"{back}?{urlencode(answer)}", status_code=302)
            code = secrets.token_urlsafe(16)
            self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": back}
            return RedirectResponse(
                f"{back}?{urlencode({'code': code, 'state': q['state']})}", status_code=302
            )

        async def token(request: Request) -> Response:
            form = await request.form()
            issued = self.codes.pop(str(form.get("code")), None)  # one use only
            error = ""
            if form.get("grant_type") != "authorization_code" or form.get("client_id") != CLIENT_ID:
                error = "unauthorized_client"
            elif issued is None or issued["redirect_uri"] != form.get("redirect_uri"):
                error = "invalid_grant"
            elif _s256(str(form.get("code_verifier"))) != issued["challenge"]:
                error = "invalid_grant"  # the verifier does not hash to the challenge
            if error:
                self.exchanges.append((400, error))
                return JSONResponse({"error": error}, status_code=400, headers=CORS)
            now = int(time.time())
            claims = {"sub": "ada", "iss": self.url, "aud": AUDIENCE, "iat": now, "exp": now + 600}
            access = jwt.encode(
                {**claims, "converge_roles": ["admin"]}, self.key, "RS256", headers={"kid": "k1"}
            )
            self.exchanges.append((200, ""))
            return JSONResponse(
                {"access_token": access, "token_type": "Bearer", "expires_in": 600}, headers=CORS
            )

        async def jwks(_: Request) -> Response:
            public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
            return JSONResponse({"keys": [{**public, "kid": "k1", "alg": "RS256", "use": "sig"}]})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/authorize", authorize),
                Route("/token", token, methods=["POST"]),
                Route("/jwks", jwks),
            ]
        )


@pytest.fixture
async def sso(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Provider, str]]:
    provider = Provider()
    port = free_port()
    provider.url = f"http://127.0.0.1:{port}"
    auth = {
        "oidc_issuer": provider.url,
        "oidc_jwks_url": f"{provider.url}/jwks",
        "oidc_audience": AUDIENCE,
        "oidc_console_client_id": CLIENT_ID,
    }
    with own_database(pg_url, "sso") as url:
        app = create_app(make_settings(url, tmp_path, auth=auth), on_first_key=None, runtime=FakeBackend())
        async with (
            LiveServer(provider.app(), port),
            app.router.lifespan_context(app),
            LiveServer(app, free_port()) as server,
        ):
            yield provider, server.url


@pytest.fixture
def tab(console: Any, sso: tuple[Provider, str]) -> Any:
    """A fresh browser tab (the `console` fixture's) on the single-sign-on app instead."""
    console.url = sso[1]
    return console


async def test_single_sign_on_with_pkce_signs_in_and_the_api_accepts_the_providers_token(
    sso: tuple[Provider, str], tab: Any
) -> None:
    provider, url = sso
    await tab.page.goto(f"{url}/console/#/library")
    await tab.page.click("#sso")
    await tab.rendered("#/library")  # back from the provider, on the page the sign-in started from
    await expect(tab.page.locator("#who .subject")).to_contain_text("ada")

    (asked,) = provider.authorized
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    assert asked["redirect_uri"] == f"{url}/console/" and asked["client_id"] == CLIENT_ID
    assert provider.exchanges == [(200, "")]  # the verifier the console kept hashed to its challenge
    assert "code=" not in tab.page.url and "state=" not in tab.page.url  # the code left the address bar
    token = await tab.page.evaluate("sessionStorage.getItem('converge.key')")
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == "ada"
    csp = (await tab.page.request.get(f"{url}/console/")).headers["content-security-policy"]
    assert f"connect-src 'self' {provider.url}" in csp  # only the provider besides this origin
    tab.assert_clean()


async def test_a_refusal_at_the_provider_and_a_forged_return_leave_the_console_signed_out(
    sso: tuple[Provider, str], tab: Any
) -> None:
    provider, url = sso
    provider.refuse = True
    await tab.page.goto(f"{url}/console/")
    await tab.page.click("#sso")
    await expect(tab.page.locator("#signin .problem")).to_contain_text("The user declined")
    assert await tab.page.evaluate("sessionStorage.getItem('converge.key')") is None

    # A code this tab never asked for (another tab's, or an attacker's link): not exchanged.
    await tab.page.goto(f"{url}/console/?code=stolen&state=guess#/overview")
    await expect(tab.page.locator("#signin .problem")).to_contain_text("does not belong to a sign-in started")
    assert (
        provider.exchanges == [] and await tab.page.evaluate("sessionStorage.getItem('converge.key')") is None
    )
    tab.assert_clean()


async def test_without_a_console_client_id_no_single_sign_on_is_offered(console: Any) -> None:
    await console.page.goto(f"{console.url}/console/")
    await console.page.wait_for_selector("#signin")
    sso = await (await console.page.request.get(f"{console.url}/console/sso.json")).json()
    assert sso == {"enabled": False}
    await expect(console.page.locator("#sso")).to_have_count(0)
