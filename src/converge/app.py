"""create_app(): the FastAPI application and its lifespan (the typed State)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import structlog
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Receive, Scope, Send

import converge
from converge import __version__
from converge.config import Settings
from converge.console.api import mount as mount_console
from converge.control.builds.api import router as builds_router
from converge.control.chat.agents.api import mcp_router
from converge.control.chat.agents.api import router as agents_router
from converge.control.chat.ragmodels.api import router as rag_models_router
from converge.control.chat.rulesets.api import router as rulesets_router
from converge.control.chat.runtime import ChatRuntime
from converge.control.chat.sessions.api import router as chat_router
from converge.control.cost.api import router as cost_router
from converge.control.cost.service import seed as seed_prices
from converge.control.deployments.api import router as deployments_router
from converge.control.drift.api import router as drift_router
from converge.control.events.api import router as events_router
from converge.control.events.broadcaster import Broadcaster
from converge.control.experiments.api import router as experiments_router
from converge.control.library.acquire import artifact_store
from converge.control.library.api import UPLOAD_PATH_SUFFIX
from converge.control.library.api import router as library_router
from converge.control.ops.api import router as ops_router
from converge.control.policies.api import router as policies_router
from converge.control.projects.api import router as projects_router
from converge.control.projects.auth import PrincipalDep
from converge.control.projects.bootstrap import ensure_admin_key
from converge.control.projects.oidc import OidcVerifier
from converge.control.rag.api import INGEST_PATH_SUFFIX
from converge.control.rag.api import router as rag_router
from converge.control.sources.api import router as sources_router
from converge.control.usage.api import router as usage_router
from converge.errors import PROBLEM_SCHEMA, install_error_handlers
from converge.gateway.api import Gateway
from converge.gateway.drift import InputDrift
from converge.kit.middleware import RequestContextMiddleware
from converge.kit.observability import (
    Metrics,
    log_path,
    log_to_file,
    stop_logging_to,
)
from converge.kit.roles import Role
from converge.kit.schemas import storable_parameters
from converge.observability import tracing
from converge.observability.gpu import GpuCollector
from converge.runtime.base import RuntimeBackend
from converge.runtime.local.sandbox import Sandbox
from converge.runtime.local.sandbox import prepare as prepare_sandbox
from converge.state import State
from converge.storage.db import (
    Database,
    check_database,
    make_engine,
    make_sessionmaker,
    migrate_and_bootstrap,
    start_database,
    transaction,
)
from converge.storage.embedded import EmbeddedSupervisor, check_version
from converge.workers.builds import BuildRunner
from converge.workers.controller import Controller
from converge.workers.defaults import DefaultDeployer
from converge.workers.ingestion import IngestionRunner
from converge.workers.registry_sync import CatalogueSeeder, RegistrySync
from converge.workers.replica_meter import CostMeter

log = structlog.get_logger(__name__)
DESCRIPTION = (
    "Converge: a self-hosted AI factory. "
    "Every route but /health, /readiness and /metrics needs a bearer credential."
)


class ConvergeApp(FastAPI):
    """The API, with the data path (/v1, /v2) handed to the gateway before any of the API's
    middleware, routing or telemetry runs: a gateway request costs no more than it must."""

    gateway: Gateway | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if self.gateway is not None and scope["type"] == "http" and scope["path"][:4] in ("/v1/", "/v2/"):
            await self.gateway(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _print_first_key(token: str) -> None:
    # stdout, not the log: the key is shown once to the person starting Converge and never logged.
    print(
        f"\nFirst start: an organisation admin key was created. It is shown only now:\n\n  {token}\n",
        file=sys.stdout,
        flush=True,
    )


def _runtime(settings: Settings, *, sandbox: Sandbox, sessions: Callable[[], AsyncSession]) -> RuntimeBackend:
    """The backend `settings.runtime.backend` names: processes here, or pods on a cluster."""
    if settings.runtime.backend == "kubernetes":
        from converge.runtime.kubernetes.backend import KubernetesBackend
        from converge.workers.placement import DatabasePlacements

        placements = DatabasePlacements(sessions=sessions, settings=settings)
        return KubernetesBackend(settings.runtime.kubernetes, placements=placements)

    from converge.runtime.local import LocalBackend, LocalConfig

    config = LocalConfig(
        state_dir=settings.data_dir / "runtime",
        keep_replicas_on_stop=settings.keep_replicas_on_stop,
        otel_endpoint=settings.otel.endpoint,  # replicas export their spans there too
        otel_sample_ratio=settings.otel.sample_ratio,
    )
    return LocalBackend(config, sandbox=sandbox)


def _sandbox(settings: Settings) -> Sandbox:
    """The user builds and replicas run as, and the paths it must be able to read."""
    from converge.serving.v2 import find_mlserver_venv

    readable = [Path(converge.__file__).resolve().parent]  # an editable install's sources
    with contextlib.suppress(FileNotFoundError):  # no MLServer environment: V2 builds fail on their own
        readable.append(find_mlserver_venv())
    return prepare_sandbox(
        data_dir=settings.data_dir,
        user=settings.sandbox.user,
        enabled=settings.sandbox.enabled,
        readable=readable,
    )


def preflight(settings: Settings) -> None:
    """What can be checked before serving, with a message a person can act on: an embedded
    data directory another PostgreSQL made (read, never changed), or an external server
    lacking an extension. Raises RuntimeError."""
    if settings.database_url:
        check_database(Database(url=settings.database_url))
    else:
        check_version(settings.pg_dir)


def create_app(
    settings: Settings,
    *,
    on_first_key: Callable[[str], None] | None = _print_first_key,
    runtime: RuntimeBackend | None = None,
) -> FastAPI:
    """The application. `runtime` replaces the local process supervisor (tests pass a fake)."""
    metrics = Metrics()
    metrics.registry.register(GpuCollector())  # no series at all where there is no GPU
    gateway = Gateway(settings, registry=metrics.registry) if _embeds_gateway(settings) else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log_file = log_to_file(log_path(settings.data_dir))  # what GET /ops/logs reads
        otel = settings.otel
        traced = tracing.configure(
            endpoint=otel.endpoint,
            service_name=otel.service_name,
            sample_ratio=otel.sample_ratio,
            attributes={"service.version": __version__, "converge.roles": ",".join(sorted(settings.roles))},
        )
        database = await asyncio.to_thread(start_database, settings)
        head = await asyncio.to_thread(migrate_and_bootstrap, database)
        runs_code = settings.runs(Role.CONTROLLER) or settings.runs(Role.WORKER)  # replicas, builds
        sandbox = await asyncio.to_thread(_sandbox, settings) if runs_code else Sandbox()
        engine = make_engine(database, settings)
        sessions = make_sessionmaker(engine)
        metrics.watch_pool(lambda: _pool_stats(engine))
        http = httpx.AsyncClient(timeout=10.0)
        conninfo = database.url.replace("postgresql+psycopg://", "postgresql://")
        broadcaster = Broadcaster(conninfo=conninfo, sessions=sessions)
        oidc = OidcVerifier(settings=settings.auth, http=http) if settings.auth.oidc_jwks_url else None
        state = State(
            settings=settings,
            database=database,
            engine=engine,
            sessions=sessions,
            http=http,
            broadcaster=broadcaster,
            oidc=oidc,
            head_revision=head,
            runtime=runtime or _runtime(settings, sandbox=sandbox, sessions=sessions),
            artifacts=artifact_store(settings),
            metrics=metrics,
            gateway=gateway,
            services=[broadcaster],
        )
        app.state.converge = state
        metrics.watch_leaders(lambda: state.services)
        if settings.runs(Role.API):  # the first key is shown by the process people talk to
            async with transaction(sessions) as session:
                token = await ensure_admin_key(session, settings)
                await seed_prices(session)  # version 1 of the price catalogue, once
            if token and on_first_key:
                on_first_key(token)
        if database.embedded is not None:  # first in, last out: the others need it
            supervisor = EmbeddedSupervisor(database.embedded)
            await supervisor.start()
            state.services.insert(0, supervisor)
        await broadcaster.start()
        if gateway is not None:  # the data path runs whether or not this process runs the workers
            await gateway.start(sessions=sessions, conninfo=conninfo)
            gateway.metrics.watch_meter(lambda: gateway.meter)
            state.services.append(gateway)
            # RAG models and agents answer /v1 in-process (the gateway cannot import them).
            gateway.virtual_handler = ChatRuntime(state, gateway).virtual_handler
            if settings.runs(Role.GATEWAY) and settings.gateway.drift.enabled:  # V2 input drift
                drift = InputDrift(
                    settings.gateway.drift,
                    conninfo=conninfo,
                    gateway_id=gateway.limiter.gateway_id,
                    routes=lambda: gateway.dataplane.snapshot.by_id if gateway.dataplane else {},
                    registry=metrics.registry,
                )
                await drift.start()
                gateway.v2.drift = drift
                state.services.append(drift)
        # The controller drives the runtime. The API reads it (zones, observed replicas, logs),
        # which only a runtime that observes from any process can answer: the Kubernetes one
        # watches the API server; the local one knows only the processes it supervises itself.
        runtime_started = settings.runs(Role.CONTROLLER) or (
            settings.runs(Role.API) and state.runtime.type == "kubernetes"
        )
        # Local replicas are supervised by the leading controller only: a standby on the same
        # machine starts the runtime (adopting the replicas) when it takes over.
        leader_runs_runtime = settings.runs(Role.CONTROLLER) and state.runtime.type == "local"
        if runtime_started and not leader_runs_runtime:
            await state.runtime.start()
        store = state.artifacts
        workers: list[Any] = []
        if settings.runs(Role.CONTROLLER):
            cost_meter = CostMeter(
                sessions=sessions,
                flush_s=settings.cost.meter_flush_s,
                rollup_s=settings.cost.rollup_s,
                metrics=metrics,
            )
            workers += [
                cost_meter,  # started before the controller, stopped after it: the last sums are written
                RegistrySync(sessions=sessions, settings=settings, store=store),
                Controller(
                    sessions=sessions,
                    settings=settings,
                    store=store,
                    runtime=state.runtime,
                    conninfo=conninfo,
                    metrics=metrics,
                    meter=cost_meter.meter,
                    owns_runtime=leader_runs_runtime,
                ),
            ]
            workers += _cluster_workers(
                settings, state.runtime, sessions=sessions, conninfo=conninfo, metrics=metrics
            )
        if settings.runs(Role.WORKER):
            if state.runtime.type != "kubernetes":  # on a cluster, builds are Jobs (the controller's)
                workers.append(
                    BuildRunner(
                        sessions=sessions,
                        settings=settings,
                        store=store,
                        concurrency=settings.build_concurrency,
                        sandbox=sandbox,
                        metrics=metrics,
                    )
                )
            workers.append(
                IngestionRunner(
                    sessions=sessions, settings=settings, store=store, gateway=gateway, metrics=metrics
                )
            )
        for service in workers:
            await service.start()
            state.services.append(service)
        if settings.runs(Role.CONTROLLER) and settings.library.seed_catalogue:
            seeder = CatalogueSeeder(sessions=sessions, settings=settings, store=store)
            await seeder.start()
            state.services.append(seeder)
            if settings.deploy_defaults:
                deployer = DefaultDeployer(
                    sessions=sessions, settings=settings, runtime=state.runtime, after=seeder.task
                )
                await deployer.start()
                state.services.append(deployer)
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise stall the data path for milliseconds every few seconds.
        gc.freeze()
        log.info("converge_started", url=settings.base_url, embedded_db=database.embedded is not None)
        try:
            yield
        finally:
            for service in reversed(state.services):
                await service.stop()
            if runtime_started:
                await state.runtime.stop()
            await http.aclose()
            await engine.dispose()
            log.info("converge_stopped")
            if traced:
                await asyncio.to_thread(tracing.shutdown)  # the spans still queued are sent
            stop_logging_to(log_file)

    app = ConvergeApp(
        title="Converge",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if settings.server.public_docs else None,
        docs_url="/docs" if settings.server.public_docs else None,
        redoc_url=None,
        # Query and path parameters follow the text rule request bodies get from `Input`.
        dependencies=[Depends(storable_parameters)],
    )
    install_error_handlers(app)
    app.include_router(ops_router)  # health, readiness and metrics: every role answers them
    for router in (
        projects_router,
        events_router,
        library_router,
        policies_router,
        sources_router,
        deployments_router,
        drift_router,
        builds_router,
        rag_router,
        rag_models_router,
        rulesets_router,
        chat_router,
        usage_router,
        agents_router,
        mcp_router,
        cost_router,
        experiments_router,
    ):
        if settings.runs(Role.API):
            app.include_router(router)
    if settings.runs(Role.API):
        mount_console(app, settings.auth)  # static files at /console; every data call carries the user's key
    _complete_openapi(app)
    if not settings.server.public_docs and settings.runs(Role.API):
        _protected_openapi(app)
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.server.max_body_bytes,
        unlimited_suffixes=(UPLOAD_PATH_SUFFIX, INGEST_PATH_SUFFIX),
    )
    app.gateway = gateway if settings.runs(Role.GATEWAY) else None  # /v1 and /v2 only with the role
    return app


def _cluster_workers(
    settings: Settings, runtime: RuntimeBackend, *, sessions: Any, conninfo: str, metrics: Metrics
) -> list[Any]:
    """What the controller role also runs on Kubernetes, through the runtime's client (the one
    identity the platform's RBAC lets write to the cluster): builds as Jobs, a `Model` object per
    approved version in every project namespace that may use it, and the RAG models of the
    `RAGModel` objects people apply."""
    from converge.runtime.kubernetes.backend import KubernetesBackend

    if not isinstance(runtime, KubernetesBackend):
        return []
    from converge.workers.kube_builds import KubeBuildRunner
    from converge.workers.model_objects import ModelObjects
    from converge.workers.placement import artifact_base_uri
    from converge.workers.ragmodel_objects import RagModelObjects

    base_uri = artifact_base_uri(settings)  # the same URI the deployments' placement uses
    return [
        KubeBuildRunner(
            sessions=sessions,
            settings=settings,
            client=runtime.client,
            config=runtime.config,
            artifact_base_uri=base_uri,
            concurrency=settings.build_concurrency,
            metrics=metrics,
        ),
        ModelObjects(
            sessions=sessions,
            kube=runtime.client,
            cluster=runtime.config.cluster_profile(kserve=False),  # only its namespace naming is read
            conninfo=conninfo,
            artifact_base_uri=base_uri,
        ),
        RagModelObjects(
            sessions=sessions,
            kube=runtime.client,
            cluster=runtime.config.cluster_profile(kserve=False),  # only its namespace naming is read
            conninfo=conninfo,
        ),
    ]


def _embeds_gateway(settings: Settings) -> bool:
    """The gateway serves the data path, and the API (knowledge-base queries) and the workers
    (ingestion) embed through one in their own process."""
    return settings.gateway.enabled and any(
        settings.runs(role) for role in (Role.API, Role.GATEWAY, Role.WORKER)
    )


def _complete_openapi(app: FastAPI) -> None:
    """Add the shared Problem schema that every route's error responses reference."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def _protected_openapi(app: FastAPI) -> None:
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_: PrincipalDep) -> dict[str, Any]:
        return app.openapi()


def _pool_stats(engine: Any) -> dict[str, int]:
    pool = engine.pool
    return {
        "size": pool.size(),
        "checked_out": pool.checkedout(),
        "overflow": pool.overflow(),
        "checked_in": pool.checkedin(),
    }
