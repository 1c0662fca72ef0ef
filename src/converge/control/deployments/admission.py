"""Admission: may this spec run? Fields, zones, deployment policies, project quota."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.deployments import repository
from converge.control.deployments.schemas import DeploymentSpecIn
from converge.control.library import repository as library_repo
from converge.control.policies.service import rules_for
from converge.control.projects.principal import Principal
from converge.core.lifecycle import VersionState
from converge.core.policy import evaluate, version_facts
from converge.errors import PolicyDenied, QuotaExceeded, Unprocessable
from converge.kit.observability import count_policy_denials
from converge.models import LibraryModel, ModelVersion, Project
from converge.runtime.base import ServerKind, Zone

SERVER_FOR_FORMAT = {
    "gguf": ServerKind.LLAMA_CPP,
    "sentence-transformers": ServerKind.EMBEDDINGS,
    "pickle": ServerKind.V2,
    "onnx": ServerKind.V2,
    "mlflow": ServerKind.V2,
}


# What each server loads: a deployment or build that names its server gets it for these formats
# (and for one the library could not tell).
FORMATS_FOR_SERVER = {
    ServerKind.LLAMA_CPP: frozenset({"gguf"}),
    ServerKind.EMBEDDINGS: frozenset({"sentence-transformers"}),
    ServerKind.V2: frozenset({"pickle", "onnx", "mlflow"}),
    ServerKind.VLLM: frozenset({"safetensors", "hf", "gguf"}),
}


def server_for(version: ModelVersion, requested: ServerKind | None) -> ServerKind:
    if requested is not None:
        # A format the library could not tell is the caller's call; a known one must fit.
        if version.format != "unknown" and version.format not in FORMATS_FOR_SERVER[requested]:
            loads = ", ".join(sorted(FORMATS_FOR_SERVER[requested]))
            raise Unprocessable(
                f"server: '{requested}' does not load format '{version.format}' (it loads {loads})",
                extra={"field": "server"},
            )
        return requested
    kind = SERVER_FOR_FORMAT.get(version.format)
    if kind is None:
        raise Unprocessable(
            f"No model server serves format '{version.format}'; set `server` explicitly",
            extra={"field": "server"},
        )
    return kind


async def load_version(
    session: AsyncSession, project: Project, spec: DeploymentSpecIn
) -> tuple[LibraryModel, ModelVersion]:
    version = await library_repo.get_version(session, spec.model_version_id)
    model = await library_repo.get_model(session, version.model_id) if version else None
    visible = model is not None and (model.visibility == "public" or project.id in model.projects)
    if version is None or model is None or not visible:
        raise Unprocessable(
            f"model_version_id: no model version {spec.model_version_id} is visible to this project",
            extra={"field": "model_version_id"},
        )
    return model, version


def check_server(server: ServerKind, spec: DeploymentSpecIn) -> None:
    """vLLM runs on GPUs only: a deployment without one would never get Ready."""
    res = spec.resources
    if server is ServerKind.VLLM and res.gpus == 0 and res.mig_profile is None:
        raise Unprocessable(
            "resources.gpus: server 'vllm' runs on GPUs; give each replica at least one "
            "(resources.gpus or resources.mig_profile), or serve a GGUF on 'llama-cpp' on CPUs",
            extra={"field": "resources.gpus"},
        )


def check_zones(spec: DeploymentSpecIn, zones: list[Zone]) -> None:
    known = {z.name: z for z in zones}
    for name in spec.zones:
        zone = known.get(name)
        if zone is None:
            raise Unprocessable(
                f"zones: unknown zone '{name}'; known: {', '.join(known)}", extra={"field": "zones"}
            )
        res = spec.resources
        for field, asked, has in (
            ("cpu", res.cpu, zone.cpu),
            ("memory_bytes", res.memory_bytes, zone.memory_bytes),
            ("gpus", res.gpus, len(zone.gpus)),
        ):
            if asked > has:
                raise Unprocessable(
                    f"resources.{field}: {asked} per replica is more than zone '{name}' has ({has})",
                    extra={"field": f"resources.{field}"},
                )


async def policy_reasons(
    session: AsyncSession,
    principal: Principal | None,
    *,
    project: Project,
    model: LibraryModel,
    version: ModelVersion,
    profile: str,
    replicas_max: int,
    settings: Settings,
) -> tuple[list[str], dict[str, Any]]:
    """Why the `deployment` policies refuse this deployment (empty: admitted), and the decision."""
    request = {
        "principal": principal.subject if principal else "system",
        "project": project.name,
        "action": "deploy",
        "profile": profile,
        "build_succeeded": await repository.build_succeeded(session, version.id, profile=profile),
        "replicas_max": replicas_max,
    }
    facts = version_facts(
        model, version, approvers=[], required=settings.library.approvals_required, request=request
    )
    decision = evaluate(await rules_for(session, "deployment"), facts, scope="deployment")
    reasons = list(decision.reasons)
    if version.state == VersionState.REVOKED:  # whatever the policies say, revoked never serves
        reasons.append("the model version is revoked")
    return reasons, decision.to_dict()


async def check_policies(
    session: AsyncSession,
    principal: Principal | None,
    *,
    project: Project,
    model: LibraryModel,
    version: ModelVersion,
    spec: DeploymentSpecIn,
    settings: Settings,
) -> None:
    reasons, decision = await policy_reasons(
        session,
        principal,
        project=project,
        model=model,
        version=version,
        profile=spec.profile,
        replicas_max=spec.replicas.max,
        settings=settings,
    )
    if reasons:
        denied = [o["rule"] for o in decision["outcomes"] if o["effect"] == "deny" and o["outcome"] != "pass"]
        count_policy_denials(scope="deployment", policies=denied)
        raise PolicyDenied(
            "Deployment refused: " + "; ".join(reasons), extra={"reasons": reasons, "decision": decision}
        )


def _footprint(spec: dict[str, Any]) -> dict[str, float]:
    res, count = spec.get("resources", {}), spec.get("replicas", {}).get("max", 1)
    return {
        "cpu": res.get("cpu", 1.0) * count,
        "memory_bytes": res.get("memory_bytes", 0) * count,
        "gpus": res.get("gpus", 0) * count,
    }


async def check_quota(
    session: AsyncSession, *, project: Project, spec: DeploymentSpecIn, exclude: Any
) -> None:
    """Sum of (replicas.max x resources) over the project's deployments must fit its quota."""
    quotas = {k: v for k, v in (project.quotas or {}).items() if v is not None}
    if not quotas:
        return
    used = {"cpu": 0.0, "memory_bytes": 0.0, "gpus": 0.0}
    for deployment_id, other in await repository.current_specs(session, project.id):
        if deployment_id != exclude:
            for k, v in _footprint(other).items():
                used[k] += v
    asked = _footprint(spec.model_dump(mode="json"))
    over = {
        k: {"quota": quotas[k], "used": used[k], "requested": asked[k]}
        for k in quotas
        if k in asked and used[k] + asked[k] > quotas[k] + 1e-9
    }
    if over:
        text = "; ".join(
            f"{k}: quota {_fmt(v['quota'])}, in use {_fmt(v['used'])}, this deployment {_fmt(v['requested'])}"
            for k, v in over.items()
        )
        raise QuotaExceeded(f"Project '{project.name}' quota exceeded - {text}", extra={"quota": over})


def _fmt(value: float) -> str:
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:.2f}"
