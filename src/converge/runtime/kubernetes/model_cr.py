"""Render an approved library version as a `converge.dev/v1alpha1` `Model` object (pure, no I/O).

The CRD is `deploy/crds/models.converge.dev.yaml`; every object rendered here validates against
its schema. Applying the objects is the Kubernetes backend's job (`client.py`), not this module's.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from converge.core.lifecycle import VersionState

GROUP = "converge.dev"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "Model"
PLURAL = "models"
MANAGED_BY = "converge"

LABEL_MODEL = f"{GROUP}/model"
LABEL_VERSION = f"{GROUP}/version"
LABEL_MODEL_ID = f"{GROUP}/model-id"
LABEL_VERSION_ID = f"{GROUP}/version-id"
ANNOTATION_SHA256 = f"{GROUP}/sha256"
ANNOTATION_MODEL_NAME = f"{GROUP}/model-name"
ANNOTATION_VERSION_NAME = f"{GROUP}/version-name"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_NAME = 63  # a DNS-1123 label, so the name also fits Services and label values derived from it
HASH_CHARS = 8
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The library's own name rules (control/library/schemas.py), repeated in the CRD.
_MODEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
_VERSION_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._+-]*[A-Za-z0-9])?$")
_FORMAT = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
_VISIBILITIES = frozenset({"public", "restricted"})
_INT64_MAX = 2**63 - 1

# Stored inspection key (snake_case, see Inspection.to_dict) -> CRD field, JSON type, and for
# strings the CRD's maxLength.
_INSPECTION_FIELDS: tuple[tuple[str, str, type, int], ...] = (
    ("architecture", "architecture", str, 256),
    ("parameter_count", "parameterCount", int, 0),
    ("quantization", "quantization", str, 64),
    ("context_length", "contextLength", int, 0),
    ("license", "license", str, 4096),
    ("memory_bytes", "memoryBytes", int, 0),
    ("kv_cache_bytes_per_1k_tokens", "kvCacheBytesPer1kTokens", int, 0),
)


@dataclass(frozen=True, kw_only=True)
class VersionApproval:
    """One `approve` verdict that counted towards the version's approval."""

    approver: str
    approved_at: datetime
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class ApprovedVersion:
    """The library facts a `Model` object carries; plain data, filled by the caller from the DB."""

    model_id: uuid.UUID
    model_name: str
    version_id: uuid.UUID
    version: str
    state: str
    format: str
    sha256: str
    size_bytes: int
    approved_at: datetime
    inspection: Mapping[str, Any] = field(default_factory=dict)
    approvals: tuple[VersionApproval, ...] = ()
    visibility: str = "public"
    projects: tuple[uuid.UUID, ...] = ()


def render_model(version: ApprovedVersion, *, namespace: str, artifact_base_uri: str) -> dict[str, Any]:
    """The `Model` object for `version` in `namespace`; ValueError if it is not approved."""
    state = _state(version.state)
    if state is not VersionState.APPROVED:
        raise ValueError(
            f"Version {version.model_name}:{version.version} is '{state}', not 'approved'; "
            "only approved versions are exposed as Model objects"
        )
    _check(namespace, DNS1123_LABEL, "Namespace", max_length=MAX_NAME)
    _check(version.model_name, _MODEL_NAME, "Model name", max_length=128)
    _check(version.version, _VERSION_NAME, "Version name", max_length=128)
    _check(version.format, _FORMAT, "Format", max_length=32)
    if version.visibility not in _VISIBILITIES:
        raise ValueError(f"Visibility {version.visibility!r} is not one of {sorted(_VISIBILITIES)}")
    if not artifact_base_uri.strip():
        raise ValueError("artifact_base_uri is empty; pass where the artifact store lives")
    digest = _digest(version.sha256)
    if not 0 <= version.size_bytes <= _INT64_MAX:
        raise ValueError(f"size_bytes must be between 0 and 2**63-1, got {version.size_bytes}")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": model_object_name(version.model_name, version.version),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_MODEL: label_value(version.model_name),
                LABEL_VERSION: label_value(version.version),
                LABEL_MODEL_ID: str(version.model_id),
                LABEL_VERSION_ID: str(version.version_id),
            },
            "annotations": {
                ANNOTATION_SHA256: digest,
                # Labels may have to shorten or rewrite names; the annotations keep them exactly.
                ANNOTATION_MODEL_NAME: version.model_name,
                ANNOTATION_VERSION_NAME: version.version,
            },
        },
        "spec": _spec(version, digest=digest, artifact_base_uri=artifact_base_uri),
    }


def model_object_name(model_name: str, version: str) -> str:
    """A DNS-1123 label naming the object for (model, version), readable and collision-free.

    A readable slug alone is ambiguous ("a-b" + "c" and "a" + "b-c"; "v1.0" and "v1-0"), so a
    short hash of the exact pair is always appended.
    """
    suffix = _short_hash(f"{model_name}\x00{version}")
    slug = _slug(f"{model_name}-{version}")[: MAX_NAME - HASH_CHARS - 1].rstrip("-")
    return f"{slug}-{suffix}" if slug else f"model-{suffix}"


def label_value(raw: str) -> str:
    """`raw` when it is a valid label value; otherwise a rewritten one made unique by a hash."""
    if len(raw) <= MAX_NAME and LABEL_VALUE.fullmatch(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)[: MAX_NAME - HASH_CHARS - 1]
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    suffix = _short_hash(raw)
    return f"{cleaned}-{suffix}" if cleaned else suffix


def artifact_uri(artifact_base_uri: str, sha256: str) -> str:
    # Same layout as ArtifactStore.object_key; repeated here to keep the renderer free of obstore.
    digest = _digest(sha256)
    return f"{artifact_base_uri.rstrip('/')}/sha256/{digest[:2]}/{digest}"


def _spec(version: ApprovedVersion, *, digest: str, artifact_base_uri: str) -> dict[str, Any]:
    return {
        "modelName": version.model_name,
        "modelId": str(version.model_id),
        "version": version.version,
        "versionId": str(version.version_id),
        "format": version.format,
        "artifact": {
            "uri": artifact_uri(artifact_base_uri, digest),
            "sha256": digest,
            "sizeBytes": version.size_bytes,
        },
        "inspection": _inspection(version.inspection),
        "approvedAt": _timestamp(version.approved_at),
        "approvals": [
            {
                "approver": approval.approver,
                "approvedAt": _timestamp(approval.approved_at),
                **({"note": approval.note} if approval.note else {}),
            }
            for approval in sorted(version.approvals, key=lambda a: (a.approved_at, a.approver))
        ],
        "visibility": version.visibility,
        "projects": sorted({str(project) for project in version.projects}),
    }


def _inspection(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The CRD's subset of the stored facts.

    A fact that is unknown, mistyped or too long for the CRD (e.g. a full license text where an
    identifier belongs) is left out rather than guessed or cut: absent means "not known".
    """
    out: dict[str, Any] = {}
    for source, target, kind, max_length in _INSPECTION_FIELDS:
        value = stored.get(source)
        if kind is int:
            fits = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _INT64_MAX
        else:
            fits = isinstance(value, str) and 0 < len(value) <= max_length
        if fits:
            out[target] = value
    return out


def _check(value: str, pattern: re.Pattern[str], what: str, *, max_length: int) -> None:
    if len(value) > max_length or not pattern.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} does not match {pattern.pattern} (at most {max_length} characters)"
        )


def _state(raw: str) -> VersionState:
    try:
        return VersionState(raw)
    except ValueError as exc:
        raise ValueError(f"Unknown version state {raw!r}") from exc


def _digest(sha256: str) -> str:
    digest = sha256.removeprefix("sha256:").lower()
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"{sha256!r} is not a hex SHA-256 digest")
    return digest


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"Timestamp {moment.isoformat()} has no time zone; pass an aware datetime")
    # isoformat, not strftime: it always writes a four-digit year, as RFC 3339 requires.
    return moment.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]
