"""Settings of the Kubernetes runtime backend: how to reach the API, how hard to retry, and the
cluster-wide choices the renderers need (`cluster_profile`)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from converge.runtime.kubernetes.specs import ArtifactCache, ClusterProfile, EgressRule, RuntimeImages


class KServeMode(StrEnum):
    AUTO = "auto"  # InferenceServices where KServe's CRDs are served, else Deployments
    ON = "on"
    OFF = "off"


class ImagesConfig(BaseModel):
    """Images per serving runtime; None keeps the release's default (`specs.RuntimeImages`)."""

    model_config = ConfigDict(frozen=True)

    converge: str | None = None
    llama_cpp: str | None = None
    embeddings: str | None = None
    v2: str | None = None
    vllm: str | None = None

    def resolve(self) -> RuntimeImages:
        defaults = RuntimeImages()
        return RuntimeImages(
            converge=self.converge or defaults.converge,
            llama_cpp=self.llama_cpp or defaults.llama_cpp,
            embeddings=self.embeddings or defaults.embeddings,
            v2=self.v2 or defaults.v2,
            vllm=self.vllm or defaults.vllm,
        )


class KubernetesConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    # -- the API -------------------------------------------------------------------------------
    base_url: str | None = Field(
        default=None,
        description="An API server URL used without credentials (`kubectl proxy`, tests); None: the "
        "in-cluster service account, else $KUBECONFIG or ~/.kube/config",
    )
    kubeconfig: Path | None = Field(
        default=None, description="A kubeconfig file instead of the environment's"
    )
    context: str | None = Field(default=None, description="The kubeconfig context; None: its current one")
    field_manager: str = Field(default="converge", min_length=1, max_length=128)
    request_timeout_s: float = Field(default=10, gt=0)
    request_attempts: int = Field(
        default=3, ge=1, description="Tries of one request on 409, 429, 5xx and lost connections"
    )
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30, gt=0)
    resync_s: float = Field(
        default=300,
        gt=0,
        description="Unchanged objects are applied again this often, which undoes edits made by hand",
    )
    watch_timeout_s: int | None = Field(
        default=None, ge=1, description="The server ends a watch after this long (the client watches again)"
    )

    # -- the cluster ---------------------------------------------------------------------------
    kserve: KServeMode = KServeMode.AUTO
    system_namespace: str = "converge"
    namespace_prefix: str = "converge-"
    images: ImagesConfig = ImagesConfig()
    cache_storage_class: str | None = Field(
        default=None,
        description="A ReadWriteMany class for a per-project cache claim; None: hostPath per node",
    )
    cache_host_path: str = ArtifactCache().host_path
    cache_claim_size: str = ArtifactCache().claim_size
    artifact_store_secret: str | None = Field(
        default=None, description="A Secret in each project namespace with the artifact store's credentials"
    )

    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP collector the model server pods export spans to, e.g. "
        "http://otel-collector.observability:4318 (the platform's own is CONVERGE_OTEL__ENDPOINT); "
        "None: pods trace nothing",
    )
    otel_sample_ratio: float = Field(default=1.0, ge=0, le=1)
    otel_egress_cidr: str = Field(
        default="0.0.0.0/0", description="Where the collector is: pods may reach this CIDR on its port"
    )

    @field_validator("otel_endpoint")
    @classmethod
    def _an_http_url(cls, value: str | None) -> str | None:
        if value is not None and (
            urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname
        ):
            raise ValueError(
                "an http(s) URL of an OTLP/HTTP collector, e.g. http://otel-collector.observability:4318"
            )
        return value.rstrip("/") if value else value

    def otel_egress(self) -> tuple[EgressRule, ...]:
        if not self.otel_endpoint:
            return ()
        url = urlsplit(self.otel_endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        return (EgressRule(cidr=self.otel_egress_cidr, ports=(port,)),)

    def cluster_profile(self, *, kserve: bool) -> ClusterProfile:
        return ClusterProfile(
            kserve=kserve,
            system_namespace=self.system_namespace,
            namespace_prefix=self.namespace_prefix,
            images=self.images.resolve(),
            cache=ArtifactCache(
                host_path=self.cache_host_path,
                storage_class=self.cache_storage_class,
                claim_size=self.cache_claim_size,
            ),
            artifact_store_secret=self.artifact_store_secret,
            otel_endpoint=self.otel_endpoint,
            otel_sample_ratio=self.otel_sample_ratio,
            otel_egress=self.otel_egress(),
        )
