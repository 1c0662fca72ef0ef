"""The `Model` CRD and its renderer: the CRD is valid Kubernetes, every rendered object fits it."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from converge.core.lifecycle import VersionState
from converge.runtime.kubernetes import model_cr
from converge.runtime.kubernetes.model_cr import (
    ApprovedVersion,
    VersionApproval,
    label_value,
    model_object_name,
    render_model,
)
from converge.storage.artifacts import ArtifactStore

CRD_PATH = Path(__file__).resolve().parents[3] / "deploy" / "crds" / "models.converge.dev.yaml"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
BASE_URI = "s3://converge-artifacts/library"
APPROVED_AT = datetime(2026, 11, 23, 10, 30, 15, 123456, tzinfo=UTC)
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# What the library stores for SmolLM2-135M-Instruct.Q4_1.gguf (see tests/control/library/test_inspection.py).
SMOLLM2_INSPECTION: dict[str, Any] = {
    "format": "gguf",
    "architecture": "llama",
    "parameter_count": 134_515_008,
    "quantization": "Q4_1",
    "context_length": 8192,
    "chat_template": "{% for message in messages %}...{% endfor %}",
    "dtypes": ["F32", "Q4_1", "Q6_K"],
    "license": "apache-2.0",
    "opset": None,
    "inputs": None,
    "outputs": None,
    "memory_bytes": 98_362_432,
    "kv_cache_bytes_per_1k_tokens": 2 * 30 * 3 * 64 * 2 * 1000,
    "files": ["SmolLM2-135M-Instruct.Q4_1.gguf"],
    "extra": {"name": "SmolLM2 135M Instruct", "block_count": 30},
    "has_chat_template": True,
}


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """The CRD's schema, closed: a field Kubernetes would silently prune fails here instead."""
    schema = _closed(copy.deepcopy(_version(crd)["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


def _closed(node: Any) -> Any:
    if isinstance(node, dict):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


def _smollm2(**overrides: Any) -> ApprovedVersion:
    values: dict[str, Any] = {
        "model_id": uuid.UUID("019ab1c2-0000-7000-8000-000000000001"),
        "model_name": "smollm2-135m-instruct",
        "version_id": uuid.UUID("019ab1c2-0000-7000-8000-000000000002"),
        "version": "q4_1",
        "state": "approved",
        "format": "gguf",
        "sha256": SMOLLM2_SHA256,
        "size_bytes": 98_362_432,
        "approved_at": APPROVED_AT,
        "inspection": SMOLLM2_INSPECTION,
        "approvals": (VersionApproval(approver="key:reviewer", approved_at=APPROVED_AT, note="scan clean"),),
    }
    return ApprovedVersion(**{**values, **overrides})


def _assert_valid(validator: jsonschema.Draft202012Validator, obj: dict[str, Any]) -> None:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


# --- the CRD ---------------------------------------------------------------------------------


def test_crd_is_a_valid_kubernetes_1_31_object(crd: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(crd, "1.31", strict=True) == "1.31"


def test_crd_declares_the_model_kind_the_renderer_writes(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{model_cr.PLURAL}.{model_cr.GROUP}"
    names = spec["names"]
    assert (spec["group"], names["kind"], names["plural"]) == ("converge.dev", "Model", "models")
    assert spec["scope"] == "Namespaced"
    version = _version(crd)
    assert f"{spec['group']}/{version['name']}" == model_cr.API_VERSION
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_crd_schema_is_structural(crd: dict[str, Any]) -> None:
    """Every schema node states its type, as apiextensions/v1 requires of a structural schema."""
    untyped: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            untyped.append(path or "<root>")
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(_version(crd)["schema"]["openAPIV3Schema"], "")
    assert untyped == []


def test_printer_columns_point_at_fields_of_the_schema(crd: dict[str, Any]) -> None:
    version = _version(crd)
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Format", "Version", "Approved", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    for path in columns.values():
        if path == ".metadata.creationTimestamp":
            continue
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == "string"


def test_status_conditions_follow_the_kubernetes_condition_shape(
    validator: jsonschema.Draft202012Validator,
) -> None:
    obj = render_model(_smollm2(), namespace="converge", artifact_base_uri=BASE_URI)
    condition = {
        "type": "Ready",
        "status": "True",
        "reason": "Published",
        "message": "visible to the cluster",
        "lastTransitionTime": "2026-11-23T10:31:00Z",
        "observedGeneration": 1,
    }
    _assert_valid(validator, {**obj, "status": {"observedGeneration": 1, "conditions": [condition]}})
    wrong = {**condition, "status": "Yes"}
    assert not validator.is_valid({**obj, "status": {"conditions": [wrong]}})


# --- rendering -------------------------------------------------------------------------------


def test_smollm2_renders_as_a_valid_model(validator: jsonschema.Draft202012Validator) -> None:
    obj = render_model(_smollm2(), namespace="converge", artifact_base_uri=BASE_URI + "/")

    _assert_valid(validator, obj)
    assert (obj["apiVersion"], obj["kind"]) == ("converge.dev/v1alpha1", "Model")
    meta = obj["metadata"]
    assert meta["namespace"] == "converge"
    assert meta["name"].startswith("smollm2-135m-instruct-q4-1-")
    assert DNS1123_LABEL.fullmatch(meta["name"])
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "converge",
        "converge.dev/model": "smollm2-135m-instruct",
        "converge.dev/version": "q4_1",
        "converge.dev/model-id": "019ab1c2-0000-7000-8000-000000000001",
        "converge.dev/version-id": "019ab1c2-0000-7000-8000-000000000002",
    }
    assert meta["annotations"]["converge.dev/sha256"] == SMOLLM2_SHA256
    spec = obj["spec"]
    assert spec["inspection"] == {
        "architecture": "llama",
        "parameterCount": 134_515_008,
        "quantization": "Q4_1",
        "contextLength": 8192,
        "license": "apache-2.0",
        "memoryBytes": 98_362_432,
        "kvCacheBytesPer1kTokens": 23_040_000,
    }
    assert spec["artifact"] == {
        "uri": f"{BASE_URI}/sha256/b1/{SMOLLM2_SHA256}",
        "sha256": SMOLLM2_SHA256,
        "sizeBytes": 98_362_432,
    }
    assert spec["approvedAt"] == "2026-11-23T10:30:15Z"
    assert spec["approvals"] == [
        {"approver": "key:reviewer", "approvedAt": "2026-11-23T10:30:15Z", "note": "scan clean"}
    ]
    assert (spec["visibility"], spec["projects"]) == ("public", [])


def test_rendering_is_deterministic_for_server_side_apply() -> None:
    first = render_model(_smollm2(), namespace="converge", artifact_base_uri=BASE_URI)
    again = render_model(_smollm2(), namespace="converge", artifact_base_uri=BASE_URI)
    assert first == again


def test_artifact_uri_uses_the_artifact_store_layout() -> None:
    assert model_cr.artifact_uri("file:///data/artifacts", "sha256:" + SMOLLM2_SHA256) == (
        "file:///data/artifacts/" + ArtifactStore.object_key(SMOLLM2_SHA256)
    )


def test_restricted_model_lists_its_projects_once_in_order(
    validator: jsonschema.Draft202012Validator,
) -> None:
    a, b = uuid.UUID(int=2), uuid.UUID(int=1)
    obj = render_model(
        _smollm2(visibility="restricted", projects=(a, b, a)), namespace="team-a", artifact_base_uri=BASE_URI
    )
    _assert_valid(validator, obj)
    assert obj["spec"]["projects"] == [str(b), str(a)]


def test_mistyped_or_oversized_facts_are_left_out_not_guessed(
    validator: jsonschema.Draft202012Validator,
) -> None:
    facts = {
        "architecture": "",
        "parameter_count": "135M",
        "context_length": True,
        "quantization": None,
        "license": "x" * 5000,
        "memory_bytes": -1,
        "kv_cache_bytes_per_1k_tokens": 1.5,
    }
    obj = render_model(_smollm2(inspection=facts), namespace="converge", artifact_base_uri=BASE_URI)
    _assert_valid(validator, obj)
    assert obj["spec"]["inspection"] == {}


@pytest.mark.parametrize("state", [s.value for s in VersionState if s is not VersionState.APPROVED])
def test_versions_that_are_not_approved_are_refused(state: str) -> None:
    with pytest.raises(ValueError, match="not 'approved'"):
        render_model(_smollm2(state=state), namespace="converge", artifact_base_uri=BASE_URI)


@pytest.mark.parametrize(
    ("overrides", "namespace", "message"),
    [
        ({"state": "ready"}, "converge", "Unknown version state"),
        ({}, "Converge", "Namespace"),
        ({}, "a" * 64, "Namespace"),
        ({"sha256": "abc"}, "converge", "SHA-256"),
        ({"model_name": "Not A Name"}, "converge", "Model name"),
        ({"visibility": "private"}, "converge", "Visibility"),
        ({"size_bytes": -1}, "converge", "size_bytes"),
        ({"approved_at": datetime(2026, 11, 23)}, "converge", "time zone"),
    ],
)
def test_inputs_the_cluster_would_reject_are_refused_here(
    overrides: dict[str, Any], namespace: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_model(_smollm2(**overrides), namespace=namespace, artifact_base_uri=BASE_URI)


def test_renderer_imports_neither_the_control_path_nor_the_gateway() -> None:
    code = (
        "import sys, converge.runtime.kubernetes.model_cr; "
        "print([m for m in sys.modules if m.startswith(('converge.control', 'converge.gateway'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- properties ------------------------------------------------------------------------------

MODEL_NAMES = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?", fullmatch=True)
VERSION_NAMES = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._+-]{0,126}[A-Za-z0-9])?", fullmatch=True)
FACT_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=300)
)
MOMENTS = st.datetimes(
    min_value=datetime(1970, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
)
KEYS = ("architecture", "parameter_count", "quantization", "context_length", "license", "memory_bytes")
APPROVALS = st.builds(
    VersionApproval,
    approver=st.text(min_size=1, max_size=255),
    approved_at=MOMENTS,
    note=st.text(max_size=200),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model_name=MODEL_NAMES,
    version=VERSION_NAMES,
    inspection=st.dictionaries(st.sampled_from(KEYS), FACT_VALUES),
    approvals=st.lists(APPROVALS, max_size=3).map(tuple),
    approved_at=MOMENTS,
    projects=st.lists(st.uuids(), max_size=4).map(tuple),
    size=st.integers(min_value=0, max_value=2**63 - 1),
    fmt=st.sampled_from(["gguf", "onnx", "safetensors", "sentence-transformers", "hf", "mlflow", "unknown"]),
)
def test_every_rendered_model_fits_the_crd_schema(
    validator: jsonschema.Draft202012Validator,
    model_name: str,
    version: str,
    inspection: dict[str, Any],
    approvals: tuple[VersionApproval, ...],
    approved_at: datetime,
    projects: tuple[uuid.UUID, ...],
    size: int,
    fmt: str,
) -> None:
    obj = render_model(
        _smollm2(
            model_name=model_name,
            version=version,
            format=fmt,
            inspection=inspection,
            approvals=approvals,
            approved_at=approved_at,
            projects=projects,
            visibility="restricted" if projects else "public",
            size_bytes=size,
        ),
        namespace="converge",
        artifact_base_uri=BASE_URI,
    )
    _assert_valid(validator, obj)
    meta = obj["metadata"]
    assert DNS1123_LABEL.fullmatch(meta["name"]) and len(meta["name"]) <= 63
    assert all(LABEL_VALUE.fullmatch(v) and len(v) <= 63 for v in meta["labels"].values())
    annotations = meta["annotations"]
    assert annotations["converge.dev/model-name"] == model_name
    assert annotations["converge.dev/version-name"] == version


@settings(max_examples=300, deadline=None)
@given(model_name=st.text(), version=st.text())
def test_names_are_dns1123_labels_for_any_model_and_version(model_name: str, version: str) -> None:
    name = model_object_name(model_name, version)
    assert DNS1123_LABEL.fullmatch(name), name
    assert len(name) <= 63
    assert model_object_name(model_name, version) == name


@settings(max_examples=300, deadline=None)
@given(raw=st.text())
def test_label_values_are_valid_for_any_name(raw: str) -> None:
    value = label_value(raw)
    assert LABEL_VALUE.fullmatch(value) and len(value) <= 63, value


@settings(max_examples=300, deadline=None)
@given(first=st.tuples(MODEL_NAMES, VERSION_NAMES), second=st.tuples(MODEL_NAMES, VERSION_NAMES))
def test_different_versions_get_different_names(first: tuple[str, str], second: tuple[str, str]) -> None:
    assume(first != second)
    assert model_object_name(*first) != model_object_name(*second)


@pytest.mark.parametrize(
    ("first", "second"),
    [(("a-b", "c"), ("a", "b-c")), (("m", "v1.0"), ("m", "v1-0")), (("m", "V1"), ("m", "v1"))],
)
def test_names_whose_slugs_collide_stay_distinct(first: tuple[str, str], second: tuple[str, str]) -> None:
    assert model_object_name(*first) != model_object_name(*second)


def test_long_names_are_shortened_but_stay_readable() -> None:
    name = model_object_name("m" * 128, "v" * 128)
    assert len(name) == 63 and name.startswith("mmmm")
    assert label_value("m" * 128) != label_value("m" * 127)
