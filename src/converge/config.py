"""Typed configuration: one Settings object, read from CONVERGE_* environment variables.

Top-level names (CONVERGE_DATA_DIR, CONVERGE_HOST, CONVERGE_PORT, CONVERGE_DATABASE_URL,
CONVERGE_BOOTSTRAP_TOKEN) are fixed because operators and scripts rely on them; everything
else is nested per subsystem, e.g. CONVERGE_AUTH__OIDC_JWKS_URL.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from converge.kit.roles import ALL_ROLES, Role, parse_roles
from converge.runtime.kubernetes.config import KubernetesConfig

DEV_SECRET = "converge-dev-secret-change-me"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "converge"


class DatabaseSettings(BaseModel):
    pool_size: int = 10
    max_overflow: int = 20
    pool_timeout_s: float = 10.0
    echo: bool = False


class AuthSettings(BaseModel):
    # Pepper for API-key hashes: a leaked database alone cannot be used to test key guesses.
    secret_key: SecretStr = SecretStr(DEV_SECRET)
    key_last_used_resolution_s: int = 60
    oidc_jwks_url: str | None = None
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_roles_claim: str = "converge_roles"
    oidc_subject_claim: str = "sub"
    oidc_admin_value: str = "admin"
    oidc_jwks_cache_s: int = 300
    # The console's sign-in with the identity provider (authorization code + PKCE): its public
    # client id there (no secret: the console is a browser app). Needs oidc_issuer; the provider
    # must allow the redirect URI <origin>/console/ and issue access tokens the API accepts
    # (audience oidc_audience).
    oidc_console_client_id: str | None = None
    oidc_console_scope: str = "openid profile"


class ServerSettings(BaseModel):
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = 1 << 20
    public_docs: bool = False
    log_level: str = "INFO"
    sse_heartbeat_s: float = 15.0
    metrics_token: SecretStr | None = Field(
        default=None, description="When set, GET /metrics needs `Authorization: Bearer <token>`"
    )


class LibrarySettings(BaseModel):
    approvals_required: int = 1
    max_upload_bytes: int = 50 << 30
    sync_interval_s: float = 30.0
    seed_catalogue: bool = True
    artifact_store_url: str | None = None  # None = <data_dir>/artifacts; s3://bucket/prefix for S3
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None


class DriftSettings(BaseModel):
    """Input drift of V2 deployments (gateway/drift.py): per-feature histograms over windows of
    inference inputs, compared with a reference (PSI and KS per feature)."""

    enabled: bool = True
    bins: int = Field(default=10, ge=2, le=100, description="Quantile bins of a reference taken from data")
    # A window closes once it holds window_rows rows and is window_min_s old (a busy deployment
    # writes a summary a minute, not one a second), or after window_max_s with min_rows rows.
    window_rows: int = Field(default=1000, ge=10, le=1_000_000)
    window_min_s: float = Field(default=60.0, ge=0)
    window_max_s: float = Field(default=3600.0, gt=0)
    min_rows: int = Field(default=100, ge=1)
    max_features: int = Field(default=64, ge=1, le=256, description="Features tracked per deployment")
    max_deployments: int = Field(default=128, ge=1, description="Deployments one gateway tracks")
    max_pending_bytes: int = Field(
        default=32 << 20, ge=0, description="Request bodies waiting; dropped beyond"
    )
    flush_s: float = Field(default=5.0, gt=0, description="How often bodies are counted and windows written")
    retention_days: int = Field(default=7, ge=1, description="Window summaries older than this are deleted")
    psi_threshold: float = Field(default=0.2, gt=0, description="A feature drifts when its PSI is above this")


class GatewaySettings(BaseModel):
    """The data path (/v1, /v2): limits, routing, timeouts, metering. See gateway/."""

    enabled: bool = True
    project_header: str = Field(
        default="openai-project",
        description="Header naming the project for organisation keys (the OpenAI SDK's `project=`)",
    )
    default_project: str = "default"
    max_body_bytes: int = 16 << 20
    default_max_tokens: int = Field(default=512, ge=1, description="Reserved when a request sets none")
    limits_sync_s: float = Field(default=0.5, gt=0, description="How often replicas share limit counters")
    meter_flush_s: float = Field(default=1.0, gt=0)
    usage_retention_days: int = Field(
        default=90, ge=0, description="Usage records older than this are deleted, hourly (0: kept for ever)"
    )
    usage_spool_max_bytes: int = Field(
        default=256 << 20, ge=0, description="Usage rows kept on disk while the database is away"
    )
    snapshot_refresh_s: float = Field(default=10.0, gt=0, description="Full reload besides NOTIFY")
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 300.0  # a CPU replica may take minutes on a long completion
    idle_stream_timeout_s: float = 60.0
    retries: int = Field(default=2, ge=0, description="Further attempts on other replicas")
    retry_backoff_s: float = 0.05
    breaker_failures: int = Field(default=3, ge=1, description="Consecutive failures that open it")
    breaker_open_s: float = Field(default=5.0, gt=0, description="Open this long, then one probe")
    max_in_flight_per_replica: int = Field(default=64, ge=1)
    queue_size: int = Field(default=512, ge=0, description="Waiting requests per deployment; 503 beyond")
    queue_timeout_s: float = 60.0
    wake_timeout_s: float = 180.0
    drift: DriftSettings = DriftSettings()


class RuntimeSettings(BaseModel):
    """Where model servers run: local processes on this machine, or pods on a Kubernetes cluster
    (CONVERGE_RUNTIME__BACKEND=kubernetes, then CONVERGE_RUNTIME__KUBERNETES__KSERVE=on and so on)."""

    backend: Literal["local", "kubernetes"] = Field(
        default="local",
        description="local: processes on this machine; kubernetes: pods in project namespaces",
    )
    kubernetes: KubernetesConfig = KubernetesConfig()


class SandboxSettings(BaseModel):
    """Who runs model code on one machine (see runtime/local/sandbox.py)."""

    enabled: bool = Field(default=True, description="Run builds and replicas as an unprivileged user")
    user: str = Field(default="converge-sandbox", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")


class RagSettings(BaseModel):
    """Knowledge bases: what ingestion accepts, how it embeds, when a base gets an index. See control/rag/."""

    max_file_bytes: int = Field(default=50 << 20, gt=0)  # one uploaded file or object
    max_files: int = Field(default=1000, gt=0)  # files or objects in one ingestion
    embed_batch: int = Field(default=64, gt=0, le=2048)  # texts per embeddings request
    embed_concurrency: int = Field(default=4, gt=0, le=64)  # requests in flight per job
    embed_retries: int = Field(default=5, ge=0)  # per batch, on 429/5xx, with backoff
    # Below this many chunks a base is searched exactly (a scan of its partition is cheap and
    # recall is 1.0); at or above it, an HNSW index is built on the partition.
    index_threshold: int = Field(default=5000, gt=0)
    recall_target: float = Field(default=0.99, gt=0, le=1)  # the probe raises ef_search to meet it
    job_heartbeat_s: float = Field(default=10.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)


class ChatSettings(BaseModel):
    """RAG models, chat sessions and agents. See control/chat/."""

    # What an agent's tool call hands back to the model (and records) is cut to this many characters.
    tool_result_max_chars: int = Field(default=4000, gt=0)
    tool_timeout_s: float = Field(default=30.0, gt=0)  # one tool call (an MCP server's own may be lower)
    mcp_start_timeout_s: float = Field(default=20.0, gt=0)  # start an MCP server and list its tools
    http_fetch_max_bytes: int = Field(default=1 << 20, gt=0)  # the http_fetch tool reads no more
    http_fetch_timeout_s: float = Field(default=10.0, gt=0)


class CostSettings(BaseModel):
    """Measured cost (see workers/replica_meter.py): how often replica time is written (a crash
    loses at most this much) and how often usage roll-ups and budgets are recomputed."""

    meter_flush_s: float = Field(default=10.0, gt=0, le=3600)
    rollup_s: float = Field(default=300.0, gt=0, le=86400)


class MlflowSettings(BaseModel):
    """The MLflow tracking server experiments are read from and builds log to (see control/experiments/)."""

    tracking_uri: str | None = Field(
        default=None, description="e.g. http://127.0.0.1:5000; unset: no experiments, builds log nothing"
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="Bound on each call to the server")
    download_timeout_s: float = Field(default=600.0, gt=0, description="Bound on a model version's download")


class OtelSettings(BaseModel):
    """Traces (see observability/tracing.py): off unless an OTLP/HTTP endpoint is set."""

    endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (spans go to <endpoint>/v1/traces); "
        "unset: tracing is off and costs nothing",
    )
    service_name: str = Field(default="converge", min_length=1)
    sample_ratio: float = Field(default=1.0, ge=0, le=1, description="Share of new traces recorded")


class ControllerSettings(BaseModel):
    """The deployment controller (see workers/controller.py): what wakes a reconcile, and how a
    standby takes over (CONVERGE_CONTROLLER__RESYNC_S and so on)."""

    resync_s: float = Field(
        default=300.0, gt=0, description="Every deployment is reconciled this often, changed or not"
    )
    requeue_s: float = Field(
        default=1.0, gt=0, description="A deployment in motion (rollout, drain) is looked at again this soon"
    )
    workers: int = Field(default=4, ge=1, le=64, description="Deployments reconciled at once")
    retry_base_s: float = Field(default=0.5, gt=0, description="First retry of a failed reconcile; doubles")
    retry_max_s: float = Field(default=60.0, gt=0)
    standby_poll_s: float = Field(
        default=1.0, gt=0, description="How often a standby tries the leader lock (bounds a takeover)"
    )


class RetentionSettings(BaseModel):
    """How long the audit log and the event outbox keep records; the leading controller prunes
    them every `prune_interval_s`. 0 keeps them for ever."""

    audit_days: float = Field(default=365.0, ge=0)
    events_days: float = Field(
        default=7.0, ge=0, description="The SSE replay window (Last-Event-ID resumes within it)"
    )
    prune_interval_s: float = Field(default=3600.0, gt=0)
    prune_batch: int = Field(default=10_000, ge=1, description="Rows deleted per statement (short locks)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONVERGE_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    env: Literal["dev", "production"] = "dev"
    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None
    bootstrap_token: SecretStr | None = None
    # What this process runs (see kit/roles.py): CONVERGE_ROLES=api,gateway or `converge serve
    # api gateway`; all four by default, as `converge up` runs them.
    roles: Annotated[frozenset[Role], NoDecode] = ALL_ROLES
    run_workers: bool = True  # False: no controller or worker, whatever `roles` says
    deploy_defaults: bool = True  # build and deploy the built-in models on first start
    # Stopping `converge up` stops its replicas; True keeps them for the next start to adopt.
    keep_replicas_on_stop: bool = False
    build_concurrency: int = Field(default=1, ge=1, le=16)  # builds benchmark: more at once skews figures

    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    server: ServerSettings = ServerSettings()
    library: LibrarySettings = LibrarySettings()
    gateway: GatewaySettings = GatewaySettings()
    rag: RagSettings = RagSettings()
    chat: ChatSettings = ChatSettings()
    cost: CostSettings = CostSettings()
    mlflow: MlflowSettings = MlflowSettings()
    sandbox: SandboxSettings = SandboxSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    controller: ControllerSettings = ControllerSettings()
    retention: RetentionSettings = RetentionSettings()
    otel: OtelSettings = OtelSettings()

    @field_validator("roles", mode="before")
    @classmethod
    def _parse_roles(cls, value: object) -> frozenset[Role]:
        return parse_roles(value)

    def runs(self, role: Role) -> bool:
        """Whether this process runs `role`: it is in `roles` and not switched off by
        `run_workers` (controller, worker) or `gateway.enabled` (gateway)."""
        if role in (Role.CONTROLLER, Role.WORKER) and not self.run_workers:
            return False
        if role == Role.GATEWAY and not self.gateway.enabled:
            return False
        return role in self.roles

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.env != "dev" and self.auth.secret_key.get_secret_value() == DEV_SECRET:
            raise ValueError(
                "CONVERGE_AUTH__SECRET_KEY still has its development default; "
                "set a random secret (e.g. `openssl rand -hex 32`) or run with CONVERGE_ENV=dev"
            )
        if self.bootstrap_token is not None and len(self.bootstrap_token.get_secret_value()) < 16:
            raise ValueError("CONVERGE_BOOTSTRAP_TOKEN must be at least 16 characters")
        return self

    @cached_property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"
