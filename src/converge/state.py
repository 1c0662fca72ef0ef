"""The typed application state built once in the lifespan and shared by every request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from converge.config import Settings

if TYPE_CHECKING:
    from converge.control.events.broadcaster import Broadcaster
    from converge.control.projects.oidc import OidcVerifier
    from converge.gateway.api import Gateway
    from converge.kit.observability import Metrics
    from converge.runtime.base import RuntimeBackend
    from converge.storage.artifacts import ArtifactStore
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
    artifacts: ArtifactStore
    metrics: Metrics
    gateway: Gateway | None = None  # None when this process does not run the data path
    services: list[Any] = field(default_factory=list)  # background services with .healthy
    # Tests bind request sessions to an outer transaction they roll back; None: `sessions`.
    session_factory: Callable[[], AsyncSession] | None = None
