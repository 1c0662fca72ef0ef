"""OIDC bearer tokens: signature from the issuer's JWKS, then issuer, audience and expiry."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import structlog

from converge.config import AuthSettings
from converge.errors import Unauthorized

log = structlog.get_logger(__name__)
ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"]


@dataclass
class OidcVerifier:
    settings: AuthSettings
    http: httpx.AsyncClient
    _keys: dict[str, Any] | None = None
    _fetched_at: float = 0.0

    async def _jwks(self, *, force: bool = False) -> dict[str, Any]:
        fresh = time.monotonic() - self._fetched_at < self.settings.oidc_jwks_cache_s
        if self._keys is not None and fresh and not force:
            return self._keys
        assert self.settings.oidc_jwks_url
        try:
            resp = await self.http.get(self.settings.oidc_jwks_url, timeout=5.0)
            resp.raise_for_status()
            jwk_set = jwt.PyJWKSet.from_dict(resp.json())
        except (httpx.HTTPError, jwt.PyJWTError, ValueError) as exc:
            log.warning("jwks_fetch_failed", error=str(exc))
            if self._keys is not None:
                return self._keys
            raise Unauthorized("OIDC token cannot be checked: the JWKS endpoint is unavailable") from exc
        self._keys = {k.key_id: k for k in jwk_set.keys if k.key_id}
        self._fetched_at = time.monotonic()
        return self._keys

    async def verify(self, token: str) -> dict[str, Any]:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Malformed bearer token: {exc}") from exc
        keys = await self._jwks()
        if kid not in keys:  # the issuer may have rotated its keys since we cached them
            keys = await self._jwks(force=True)
        if kid not in keys:
            raise Unauthorized("OIDC token signed with an unknown key id")
        options = {"require": ["exp", "iat", self.settings.oidc_subject_claim]}
        try:
            return jwt.decode(
                token,
                keys[kid].key,
                algorithms=ALGORITHMS,
                audience=self.settings.oidc_audience,
                issuer=self.settings.oidc_issuer,
                # PyJWT types `options` as its Options TypedDict; a plain dict of the same keys.
                options=options,  # type: ignore[arg-type]
                leeway=30,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("OIDC token has expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"OIDC token rejected: {exc}") from exc
