"""Model versions in an MLflow model registry: `mlflow://models/NAME[/VERSION]` URIs, the versions
a registered model holds, and a version's artifacts downloaded into a local folder.

The library imports what is downloaded like any other folder (`acquire.from_mlflow`): stored
under its sha256, inspected, scanned (the pickle allow-list applies to `model.pkl`), and then
governed by the same policies and approvals as an upload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converge.control.experiments import tracking
from converge.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SCHEME = "mlflow"
_URI = re.compile(r"^mlflow://models/(?P<name>[^\s]+?)(?:/(?P<version>[0-9]+))?/?$")
URI_HELP = "mlflow://models/NAME/VERSION (a version of a model registered in MLflow)"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        found = _URI.match(uri)
        if found is None:
            raise BadRequest(f"An MLflow URI looks like {URI_HELP}, got {uri}")
        return cls(name=found["name"], version=found["version"])

    @property
    def uri(self) -> str:
        return f"mlflow://models/{self.name}" + (f"/{self.version}" if self.version else "")

    @property
    def model_uri(self) -> str:
        """MLflow's own URI for the version (what `mlflow.pyfunc.load_model` takes)."""
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    source: str | None  # where MLflow keeps its artifacts
    created_ms: int

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)

    @property
    def digest(self) -> str:
        """A version's artifacts never change in MLflow: the number and its creation time name them."""
        return f"v{self.version}@{self.created_ms}"

    def provenance(self, tracking_uri: str) -> dict[str, Any]:
        return {
            "tracking_uri": tracking_uri,
            "model_uri": self.ref.model_uri,
            "registered_model": self.name,
            "registered_version": self.version,
            "run_id": self.run_id,
            "artifact_source": self.source,
        }


def _version(mv: Any) -> RegisteredVersion:
    return RegisteredVersion(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id or None,
        source=mv.source or None,
        created_ms=int(mv.creation_timestamp or 0),
    )


async def list_versions(tracking_uri: str, name: str, *, timeout_s: float) -> list[RegisteredVersion]:
    """The registered model's versions that MLflow says are ready, oldest first."""

    def search(c: MlflowClient) -> list[Any]:
        escaped = name.replace("'", "\\'")
        return list(c.search_model_versions(f"name = '{escaped}'", max_results=1000))

    found = await tracking.call(tracking_uri, search, timeout_s=timeout_s)
    ready = [_version(mv) for mv in found if getattr(mv, "status", "READY") == "READY"]
    return sorted(ready, key=lambda v: int(v.version))


async def download(
    tracking_uri: str, ref: ModelRef, *, dest: Path, timeout_s: float, request_timeout_s: float
) -> tuple[Path, RegisteredVersion]:
    """The version's artifacts (the MLflow model folder: MLmodel, model.pkl, ...) under `dest`."""
    if ref.version is None:
        raise BadRequest(f"Name the version to import: {URI_HELP}")

    def fetch(c: MlflowClient) -> tuple[Path, RegisteredVersion]:
        from mlflow.artifacts import download_artifacts

        registered = _version(c.get_model_version(ref.name, ref.version or ""))
        # Where the server keeps the version's files (mlflow-artifacts:/..., s3://...), read with
        # this server as the tracking URI. Not `models:/NAME/VERSION`: MLflow resolves a logged
        # model's URI through the process's default tracking store (a local SQLite file).
        location = c.get_model_version_download_uri(ref.name, ref.version or "")
        local = download_artifacts(artifact_uri=location, dst_path=str(dest), tracking_uri=tracking_uri)
        return Path(local), registered

    try:
        return await tracking.call(
            tracking_uri,
            fetch,
            timeout_s=timeout_s,
            request_timeout_s=request_timeout_s,
            absent=f"No model version {ref.name} {ref.version} in the registry at {tracking_uri}",
        )
    except NotFound as exc:  # the URI in a request names nothing: a bad request, not a missing route
        raise BadRequest(exc.detail) from exc
