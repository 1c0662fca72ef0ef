"""The one interface between the control plane and whatever runs model servers.

The controller hands a backend the *desired* state of a deployment (`apply`), reads back what
is *observed* (`observe`), and never cares whether replicas are local processes or Kubernetes
pods. Backends converge like a Kubernetes Deployment: a new revision is rolled out one replica
at a time (surge 1, unavailable 0), and an old replica is drained before it stops.
"""

from __future__ import annotations

import builtins
import math
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class ServerKind(StrEnum):
    LLAMA_CPP = "llama-cpp"  # GGUF chat and completions (OpenAI-compatible)
    EMBEDDINGS = "embeddings"  # sentence-transformers, OpenAI /v1/embeddings
    V2 = "v2"  # Open Inference Protocol (MLServer: sklearn, ONNX, MLflow)
    VLLM = "vllm"  # vLLM's OpenAI-compatible server: chat models on GPUs (safetensors folders, GGUF)


class Resources(BaseModel):
    model_config = ConfigDict(frozen=True)

    cpu: float = Field(default=1.0, gt=0, description="CPU cores per replica")
    memory_bytes: int = Field(default=1 << 30, gt=0, description="Memory per replica (a hard limit locally)")
    gpus: int = Field(default=0, ge=0)
    gpu_type: str | None = None
    mig_profile: str | None = Field(default=None, description="e.g. 1g.10gb")

    @property
    def threads(self) -> int:
        """The threads a replica's server runs: its CPU grant, rounded up (servers read it as
        OMP_NUM_THREADS; more threads than granted only wait for each other)."""
        return max(1, math.ceil(self.cpu))


class ReplicaTemplate(BaseModel):
    """What every replica of one revision runs."""

    model_config = ConfigDict(frozen=True)

    server: ServerKind
    model_name: str = Field(description="The name the server answers to (OpenAI `model`)")
    artifact_path: str = Field(
        description="The verified artifact as a replica sees it: a local copy, or where a pod mounts it"
    )
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Resources()


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    deployment_id: uuid.UUID
    name: str
    revision: int
    template: ReplicaTemplate
    replicas: int = Field(ge=0)
    zones: tuple[str, ...] = ("local",)
    restart_generation: int = Field(default=0, description="Bumped by redeploy: replace every replica")
    canary_replicas: int | None = Field(
        default=None,
        ge=0,
        description=(
            "While replicas of an older revision exist, run at most this many of this revision and"
            " keep the old ones serving (until promoted); None = an ordinary rolling update"
        ),
    )


class ReplicaPhase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    BACKOFF = "backoff"  # crashed; waiting before the next restart
    FAILED = "failed"


class EngineStats(BaseModel):
    """What an inference engine says of itself on `/converge/stats`, where it says it (llama.cpp's
    server: its slots and KV cache); None where the engine reports nothing of the kind."""

    slots_busy: int | None = None
    slots_total: int | None = None
    kv_cache_usage_ratio: float | None = None
    # Counters since the engine started (a restarted replica starts again from 0)
    tokens_generated_total: int | None = None
    prompt_tokens_total: int | None = None
    prompt_tokens_cached_total: int | None = None  # prompt tokens served from the KV cache

    @classmethod
    def of(cls, stats: Mapping[str, Any]) -> EngineStats | None:
        values: dict[str, Any] = {}
        fields = (
            ("slots_busy", int),
            ("slots_total", int),
            ("kv_cache_usage_ratio", float),
            ("tokens_generated_total", int),
            ("prompt_tokens_total", int),
            ("prompt_tokens_cached_total", int),
        )
        for name, kind in fields:
            value = stats.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                values[name] = kind(value)
        return cls(**values) if values else None


class Replica(BaseModel):
    id: str
    deployment_id: uuid.UUID
    revision: int
    generation: int = 0
    phase: ReplicaPhase
    zone: str
    endpoint: str | None = None
    pid: int | None = None
    restarts: int = 0
    in_flight: int = 0
    queue_depth: int = 0
    engine: EngineStats | None = None  # its engine's slots and KV cache, where it reports them
    started_at: datetime | None = None
    last_exit: str | None = None


class Condition(BaseModel):
    type: str  # Ready | Progressing | Degraded
    status: bool
    reason: str
    message: str = ""


class Observation(BaseModel):
    deployment_id: uuid.UUID
    replicas: list[Replica] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)

    @property
    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.phase == ReplicaPhase.READY]

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class Gpu(BaseModel):
    index: int
    name: str
    memory_bytes: int
    mig_profiles: list[str] = Field(default_factory=list)


class Zone(BaseModel):
    name: str
    cpu: float
    memory_bytes: int
    gpus: list[Gpu] = Field(default_factory=list)


class RuntimeBackend(ABC):
    type: ClassVar[str]
    # builtins.type: in this class body `type` is the attribute above.
    config_model: ClassVar[builtins.type[BaseModel]]
    # True: the backend calls its watchers whenever what `observe` answers for a deployment
    # changes (a replica started, became ready, died, drained, its load moved), so the
    # controller looks at a deployment at rest only when told. False: it polls each one.
    reports_changes: ClassVar[bool] = False

    def watch(self, listener: Callable[[uuid.UUID], None]) -> None:
        """Call `listener(deployment_id)` (on the event loop, never awaited) at every such change."""
        vars(self).setdefault("_watchers", []).append(listener)

    def changed(self, deployment_id: uuid.UUID) -> None:
        """Tell the watchers that this deployment's observation changed."""
        for listener in vars(self).get("_watchers", ()):
            listener(deployment_id)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Adopt or clean up what a previous process left running."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release resources held by this process (not the replicas themselves)."""

    def artifact_path(self, *, sha256: str) -> str | None:
        """Where replicas find the artifact when the backend brings it to them itself (pods fetch
        it by digest); None, the default: the controller fetches a verified copy to this
        machine's cache and puts its path in `ReplicaTemplate.artifact_path`."""
        return None

    @abstractmethod
    async def apply(self, *, spec: DeploymentSpec) -> None: ...

    @abstractmethod
    async def observe(self, *, deployment_id: uuid.UUID) -> Observation: ...

    @abstractmethod
    async def delete(self, *, deployment_id: uuid.UUID) -> None: ...

    @abstractmethod
    def logs(self, *, replica_id: str, tail: int = 100, follow: bool = False) -> AsyncIterator[str]: ...

    @abstractmethod
    async def zones(self) -> list[Zone]: ...
