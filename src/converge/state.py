"""The typed application state built once in the lifespan and shared by every request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from converge.config import Settings

if TYPE_CHECKING:
    from converge.control.events.broadcaster import Broadcaster
    from converge.control.projects.oidc import OidcVerifier
    from converge.runtime.base import RuntimeBackend
    from converge.storage.db import Database


@dataclass
class State:
    settings: Settings
    database: Database
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    http: httpx.AsyncClient
    broadcaster: Broadcaster
    oidc: OidcVerifier | None
    head_revision: str
    runtime: RuntimeBackend
    services: list[Any] = field(default_factory=list)  # background services with .healthy
    extras: dict[str, Any] = field(default_factory=dict)
