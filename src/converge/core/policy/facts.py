"""The FACTS a policy expression sees, and the helper that builds them.

Top-level CEL variables and their keys (defaults in brackets)::

    model       name [null], tags [[]], visibility ("public"|"restricted") [null], projects [[]]
    version     id, version, state, submitted_by, format, created_at (ISO 8601 str) [all null]
    artifact    sha256 [null], size_bytes [null], media_type [null], files [[]]
    inspection  format, architecture, parameter_count, quantization, context_length [null],
                has_chat_template [false], dtypes [[]], license, opset [null], inputs [[]],
                outputs [[]], memory_bytes, kv_cache_bytes_per_1k_tokens [null]
    scan        status ("clean"|"unsafe"|"error"|"not_applicable") [null], scanner [null],
                findings [[]] of {file, global, severity, message}
    benchmarks  free map of benchmark name -> number (tokens_per_s, ttft_ms, ...) [{}]
    source      kind ("upload"|"path"|"s3"|"oci"|"hf"|"builtin"|"sync") [null], uri [null],
                known [false], name [null]
    approvals   count [0], required [0], approvers [[]]
    request     principal, project, action [null]

Every documented key is always present, so expressions compare with ``null`` instead of
tripping over a missing key. Benchmarks are a free map: test ``has(benchmarks.ttft_ms)``
before reading one. ``FACTS_DOC`` carries the same table as data for the API to serve.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

# One table for defaults and descriptions, so the documentation cannot drift from the data.
_FACTS: dict[str, dict[str, tuple[Any, str]]] = {
    "model": {
        "name": (None, "model name"),
        "tags": ([], "list of tag strings"),
        "visibility": (None, '"public" or "restricted"'),
        "projects": ([], "names of the projects the model is shared with"),
    },
    "version": {
        "id": (None, "version id"),
        "version": (None, "version label"),
        "state": (None, 'lifecycle state, e.g. "pending", "approved"'),
        "submitted_by": (None, "principal that registered the version"),
        "format": (None, 'artifact format, e.g. "gguf", "safetensors", "onnx"'),
        "created_at": (None, "ISO 8601 timestamp string"),
    },
    "artifact": {
        "sha256": (None, "hex digest of the artifact"),
        "size_bytes": (None, "artifact size in bytes"),
        "media_type": (None, "media type of the artifact"),
        "files": ([], "file paths inside the artifact"),
    },
    "inspection": {
        "format": (None, "format detected from the file headers"),
        "architecture": (None, 'model architecture, e.g. "llama"'),
        "parameter_count": (None, "number of parameters"),
        "quantization": (None, 'quantization, e.g. "Q4_1"'),
        "context_length": (None, "maximum context length in tokens"),
        "has_chat_template": (False, "whether a chat template is embedded"),
        "dtypes": ([], "tensor dtypes present"),
        "license": (None, "license declared in the metadata"),
        "opset": (None, "ONNX opset version"),
        "inputs": ([], "model inputs (ONNX/V2)"),
        "outputs": ([], "model outputs (ONNX/V2)"),
        "memory_bytes": (None, "estimated memory to load the weights"),
        "kv_cache_bytes_per_1k_tokens": (None, "estimated KV cache per 1,000 tokens"),
    },
    "scan": {
        "status": (None, '"clean", "unsafe", "error" or "not_applicable"'),
        "scanner": (None, "scanner that produced the result"),
        "findings": ([], "list of {file, global, severity, message}"),
    },
    "benchmarks": {},
    "source": {
        "kind": (None, '"upload", "path", "s3", "oci", "hf", "builtin" or "sync"'),
        "uri": (None, "where the artifact came from"),
        "known": (False, "whether the source is a registered source"),
        "name": (None, "registered source name"),
    },
    "approvals": {
        "count": (0, "approvals recorded so far"),
        "required": (0, "approvals required"),
        "approvers": ([], "principals that approved"),
    },
    "request": {
        "principal": (None, "principal making the request"),
        "project": (None, "project the request is made in"),
        "action": (None, "action being decided"),
    },
}

FACTS_DOC: dict[str, dict[str, str]] = {
    section: {key: doc for key, (_, doc) in keys.items()} for section, keys in _FACTS.items()
}
FACTS_DOC["benchmarks"] = {"*": "free map of benchmark name to number, e.g. tokens_per_s, ttft_ms"}

Section = Mapping[str, Any] | None


def build_facts(
    *,
    model: Section = None,
    version: Section = None,
    artifact: Section = None,
    inspection: Section = None,
    scan: Section = None,
    benchmarks: Section = None,
    source: Section = None,
    approvals: Section = None,
    request: Section = None,
) -> dict[str, Any]:
    """Return the full FACTS mapping: documented defaults with the given values merged on top.

    Keys not in the documentation are kept, so new facts can reach policies before they are
    documented here.
    """
    given = {
        "model": model,
        "version": version,
        "artifact": artifact,
        "inspection": inspection,
        "scan": scan,
        "benchmarks": benchmarks,
        "source": source,
        "approvals": approvals,
        "request": request,
    }
    return {section: _merge(section, values) for section, values in given.items()}


def _merge(section: str, values: Section) -> dict[str, Any]:
    # Deep-copied so a caller mutating its facts cannot change the defaults of the next call.
    merged = {key: copy.deepcopy(default) for key, (default, _) in _FACTS[section].items()}
    merged.update(values or {})
    return merged


class ModelLike(Protocol):
    """What the facts read from a library model: plain attributes, whatever holds them."""

    @property
    def name(self) -> str: ...
    @property
    def tags(self) -> Sequence[str]: ...
    @property
    def visibility(self) -> str: ...
    @property
    def projects(self) -> Sequence[uuid.UUID]: ...


class VersionLike(Protocol):
    """What the facts read from a model version."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def version(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def submitted_by(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def created_at(self) -> datetime | None: ...
    @property
    def artifact_sha256(self) -> str: ...
    @property
    def inspection(self) -> Mapping[str, Any]: ...
    @property
    def scan(self) -> Mapping[str, Any]: ...
    @property
    def benchmarks(self) -> Mapping[str, Any]: ...
    @property
    def source(self) -> Mapping[str, Any]: ...


def version_facts(
    model: ModelLike,
    version: VersionLike,
    *,
    approvers: Sequence[str],
    required: int,
    request: Mapping[str, Any] | None = None,
    artifact_size: int | None = None,
) -> dict[str, Any]:
    """The FACTS of one model version: what registration, approval and deployment rules read."""
    return build_facts(
        model={
            "name": model.name,
            "tags": model.tags,
            "visibility": model.visibility,
            "projects": [str(p) for p in model.projects],
        },
        version={
            "id": str(version.id),
            "version": version.version,
            "state": version.state,
            "submitted_by": version.submitted_by,
            "format": version.format,
            "created_at": version.created_at.isoformat() if version.created_at else None,
        },
        artifact={
            "sha256": version.artifact_sha256,
            "size_bytes": artifact_size,
            "files": version.inspection.get("files") or [],
        },
        inspection=version.inspection,
        scan=version.scan,
        benchmarks=version.benchmarks,
        source=version.source,
        approvals={"count": len(approvers), "required": required, "approvers": list(approvers)},
        request=request or {},
    )
