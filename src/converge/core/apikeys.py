"""API key material: `cvg_<prefix>_<secret>`, stored as HMAC-SHA256(pepper, secret)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "cvg_"


@dataclass(frozen=True)
class NewKey:
    prefix: str
    secret_hash: str
    token: str  # shown once, never stored


def hash_secret(secret: str, *, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def generate(*, pepper: str) -> NewKey:
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewKey(
        prefix=prefix, secret_hash=hash_secret(secret, pepper=pepper), token=f"{KEY_PREFIX}{prefix}_{secret}"
    )


def split(token: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    if not token.startswith(KEY_PREFIX):
        return None
    prefix, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or len(prefix) != 12 or not secret:
        return None
    return prefix, secret


def matches(secret: str, stored_hash: str, *, pepper: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, pepper=pepper), stored_hash)
