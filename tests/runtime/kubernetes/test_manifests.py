"""The Kubernetes manifest renderers: every object is valid against the official schemas of
Kubernetes 1.29-1.33 and KServe's CRDs, matches its golden file, and every workload it renders
is sized, probed, labelled and locked down.

Golden files live in `golden/`; after an intended change, rewrite them with
`UPDATE_GOLDEN=1 pytest tests/runtime/kubernetes/test_manifests.py` and review the diff.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from kubernetes_validate.utils import all_versions, major_minor

from converge.runtime.base import DeploymentSpec, ReplicaTemplate, Resources, ServerKind
from converge.runtime.kubernetes import pods
from converge.runtime.kubernetes.labels import MAX_WORKLOAD_NAME
from converge.runtime.kubernetes.manifests import (
    build_job_name,
    namespace_name,
    render_build,
    render_priority_classes,
    render_project,
    render_workload,
    workload_name,
)
from converge.runtime.kubernetes.specs import (
    Artifact,
    ArtifactCache,
    Autoscaling,
    BuildJob,
    ClusterProfile,
    EgressRule,
    GpuPlacement,
    GpuSharing,
    InferenceWorkload,
    PodPeer,
    PriorityTier,
    ProjectQuota,
    ProjectRef,
    RuntimeImages,
    ServingRuntimeKind,
)
from converge.storage.artifacts import ArtifactStore

REPO = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).resolve().parent / "golden"
KSERVE_SCHEMAS = REPO.parent / "shared" / "schemas" / "kserve"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"
WANTED_VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")
# The ones the installed kubernetes-validate ships (it works offline): all of 1.29-1.33 today.
K8S_VERSIONS = tuple(v for v in WANTED_VERSIONS if v in {major_minor(s) for s in all_versions()})

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti)?$")
STORE = "s3://converge-artifacts/library"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LLAMA_SHA256 = "6f1d5c3e0e7a4b9f8c2d1e0f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b"
QWEN_SHA256 = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
MINILM_SHA256 = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00"
ONNX_SHA256 = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e"
GIB = 1 << 30

PROJECT = ProjectRef(project_id=uuid.UUID("019ab1c2-0000-7000-8000-00000000a001"), name="research")
IMAGES = RuntimeImages(
    converge="registry.example.com/converge/converge:0.1.0",
    llama_cpp="registry.example.com/converge/converge-llama-cpp:0.1.0",
    embeddings="registry.example.com/converge/converge-embeddings:0.1.0",
    v2="registry.example.com/converge/converge-v2:0.1.0",
    vllm="docker.io/vllm/vllm-openai:v0.10.2",
)
CLUSTER = ClusterProfile(images=IMAGES)
KSERVE = dataclasses.replace(CLUSTER, kserve=True)

# --- scenarios ---------------------------------------------------------------------------------


def _workload(
    *,
    number: int,
    name: str,
    server: ServerKind,
    model_name: str,
    sha256: str,
    fmt: str,
    resources: Resources,
    replicas: int = 1,
    zones: tuple[str, ...] = ("local",),
    **extra: Any,
) -> InferenceWorkload:
    spec = DeploymentSpec(
        deployment_id=uuid.UUID(f"019ab1c2-0000-7000-8000-00000000b{number:03d}"),
        name=name,
        revision=3,
        template=ReplicaTemplate(
            server=server, model_name=model_name, artifact_path="/unused", resources=resources
        ),
        replicas=replicas,
        zones=zones,
    )
    artifact = Artifact.in_store(base_uri=STORE, sha256=sha256, format=fmt)
    return InferenceWorkload(project=PROJECT, deployment=spec, artifact=artifact, **extra)


def cpu_llama() -> InferenceWorkload:
    return _workload(
        number=1,
        name="smollm2-chat",
        server=ServerKind.LLAMA_CPP,
        model_name="smollm2-135m-instruct",
        sha256=SMOLLM2_SHA256,
        fmt="gguf",
        resources=Resources(cpu=2, memory_bytes=2 * GIB),
    )


def h100_vllm() -> InferenceWorkload:
    return _workload(
        number=2,
        name="llama-8b",
        server=ServerKind.VLLM,  # a deployment whose server is vllm gets the vLLM runtime
        model_name="llama-3.1-8b-instruct",
        sha256=LLAMA_SHA256,
        fmt="safetensors",
        resources=Resources(cpu=8, memory_bytes=64 * GIB, gpus=1, gpu_type="NVIDIA H100 80GB HBM3"),
        autoscaling=Autoscaling(min_replicas=1, max_replicas=2),
        gpu=GpuPlacement(min_memory_mib=80_000),
    )


def mig_slice() -> InferenceWorkload:
    return _workload(
        number=3,
        name="qwen-small",
        server=ServerKind.LLAMA_CPP,
        model_name="qwen2.5-1.5b-instruct",
        sha256=QWEN_SHA256,
        fmt="safetensors",
        resources=Resources(cpu=4, memory_bytes=16 * GIB, gpus=1, mig_profile="1g.10gb"),
        runtime=ServingRuntimeKind.VLLM,
        tier=PriorityTier.DEVELOPMENT,
    )


def three_zones() -> InferenceWorkload:
    return _workload(
        number=4,
        name="smollm2-ha",
        server=ServerKind.LLAMA_CPP,
        model_name="smollm2-135m-instruct",
        sha256=SMOLLM2_SHA256,
        fmt="gguf",
        resources=Resources(cpu=2, memory_bytes=2 * GIB),
        replicas=3,
        zones=("eu-west-1a", "eu-west-1b", "eu-west-1c"),
        autoscaling=Autoscaling(min_replicas=3, max_replicas=6, scale_up_after_s=10, cooldown_s=120),
    )


def embeddings() -> InferenceWorkload:
    return _workload(
        number=5,
        name="minilm",
        server=ServerKind.EMBEDDINGS,
        model_name="all-minilm-l6-v2",
        sha256=MINILM_SHA256,
        fmt="sentence-transformers",
        resources=Resources(cpu=1, memory_bytes=GIB),
        replicas=2,
    )


def v2_onnx() -> InferenceWorkload:
    return _workload(
        number=6,
        name="7-iris",  # starts with a digit: a valid deployment name, not a valid Service name
        server=ServerKind.V2,
        model_name="iris",
        sha256=ONNX_SHA256,
        fmt="onnx",
        resources=Resources(cpu=0.5, memory_bytes=512 << 20, gpus=1),
        gpu=GpuPlacement(sharing=GpuSharing.TIME_SLICED),
    )


def build() -> BuildJob:
    return BuildJob(
        build_id=uuid.UUID("019ab1c2-0000-7000-8000-00000000c001"),
        project=PROJECT,
        model_name="smollm2-135m-instruct",
        version="q4_1",
        server=ServerKind.LLAMA_CPP,
        profile="cpu",
        artifact=Artifact.in_store(base_uri=STORE, sha256=SMOLLM2_SHA256, format="gguf"),
        resources=Resources(cpu=1, memory_bytes=2 * GIB),
    )


QUOTA = ProjectQuota(cpu=32, memory_bytes=128 * GIB, gpus=4, mig={"1g.10gb": 7, "3g.40gb": 2})
WORKLOADS = {
    "cpu-llama-cpp": cpu_llama,
    "h100-vllm": h100_vllm,
    "mig-1g-10gb": mig_slice,
    "three-zones": three_zones,
    "embeddings": embeddings,
    "v2-time-sliced": v2_onnx,
}
# Golden scenario -> what it renders; the KServe flag as a real cluster would have it.
GOLDENS = {
    "cpu-llama-cpp": lambda: render_workload(cpu_llama(), cluster=CLUSTER),
    "h100-vllm": lambda: render_workload(h100_vllm(), cluster=KSERVE),
    "mig-1g-10gb": lambda: render_workload(mig_slice(), cluster=CLUSTER),
    "three-zones": lambda: render_workload(three_zones(), cluster=CLUSTER),
    "namespace-bundle": lambda: render_project(PROJECT, quota=QUOTA, cluster=KSERVE),
    "priority-classes": render_priority_classes,
    "build-job": lambda: [render_build(build(), cluster=CLUSTER)],
}


def every_manifest() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object the renderers produce in these scenarios, under both cluster kinds and
    both cache kinds."""
    claim = ArtifactCache(storage_class="cephfs")
    for label, cluster in (
        ("deployments", CLUSTER),
        ("kserve", KSERVE),
        ("deployments+claim", dataclasses.replace(CLUSTER, cache=claim)),
    ):
        for name, make in WORKLOADS.items():
            for obj in render_workload(make(), cluster=cluster):
                yield f"{label}/{name}/{obj['kind']}", obj
        for obj in render_project(PROJECT, quota=QUOTA, cluster=cluster):
            yield f"{label}/project/{obj['kind']}/{obj['metadata']['name']}", obj
        yield f"{label}/build", render_build(build(), cluster=cluster)
    for obj in render_priority_classes():
        yield f"priority/{obj['metadata']['name']}", obj


ALL = list(every_manifest())


def _is_kserve(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].startswith("serving.kserve.io/")


# --- schemas -----------------------------------------------------------------------------------


def test_the_validator_ships_every_kubernetes_version_from_1_29_to_1_33() -> None:
    assert K8S_VERSIONS == WANTED_VERSIONS


@pytest.fixture(scope="module")
def cached_schemas() -> Iterator[None]:
    """kubernetes-validate parses its 1.3 MB of definitions on every call; parse each file once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kv_utils, "schema_contents", functools.lru_cache(maxsize=None)(kv_utils.schema_contents)
        )
        yield


@pytest.mark.usefixtures("cached_schemas")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_object_validates_against_the_official_schema(version: str) -> None:
    failures = []
    seen: set[str] = set()
    for where, obj in ALL:
        if _is_kserve(obj):
            # A custom resource's metadata is still an ObjectMeta: check it as one.
            obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        if (key := json.dumps(obj, sort_keys=True)) in seen:
            continue
        seen.add(key)
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{where}: {list(exc.absolute_path)}: {exc.message}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def kserve_validators() -> dict[str, jsonschema.Draft202012Validator]:
    if not KSERVE_SCHEMAS.is_dir():
        pytest.fail(f"KServe's CRDs are expected in {KSERVE_SCHEMAS} (../shared/schemas/kserve)")
    out = {}
    for kind, file in (
        ("InferenceService", "serving.kserve.io_inferenceservices.yaml"),
        ("ServingRuntime", "serving.kserve.io_servingruntimes.yaml"),
    ):
        crd = yaml.load((KSERVE_SCHEMAS / file).read_text(encoding="utf-8"), Loader=_loader())
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        schema = _closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        out[f"{crd['spec']['group']}/{version['name']}/{kind}"] = jsonschema.Draft202012Validator(schema)
    return out


def _loader() -> type[yaml.SafeLoader]:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 2 MB of CRD: the C loader when built


def _closed(node: Any) -> Any:
    """A field the API server would silently prune from a custom resource fails here instead."""
    if isinstance(node, dict):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


def test_kserve_objects_validate_against_the_kserve_crds(
    kserve_validators: dict[str, jsonschema.Draft202012Validator],
) -> None:
    checked: set[str] = set()
    failures = []
    for where, obj in ALL:
        if not _is_kserve(obj):
            continue
        key = f"{obj['apiVersion']}/{obj['kind']}"
        checked.add(key)
        for error in kserve_validators[key].iter_errors(obj):
            failures.append(f"{where}: {list(error.absolute_path)}: {error.message}")
    assert not failures, "\n".join(failures)
    assert checked == {
        "serving.kserve.io/v1beta1/InferenceService",
        "serving.kserve.io/v1alpha1/ServingRuntime",
    }


def test_the_closed_kserve_schema_catches_a_misspelt_field(
    kserve_validators: dict[str, jsonschema.Draft202012Validator],
) -> None:
    (isvc, _) = render_workload(h100_vllm(), cluster=KSERVE)
    isvc["spec"]["predictor"]["model"]["resource"] = isvc["spec"]["predictor"]["model"].pop("resources")
    assert not kserve_validators["serving.kserve.io/v1beta1/InferenceService"].is_valid(isvc)


def test_the_kubernetes_schema_catches_a_misspelt_field() -> None:
    deployment = render_workload(cpu_llama(), cluster=CLUSTER)[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33", strict=True)


# --- golden files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_rendered_objects_match_their_golden_file(name: str) -> None:
    rendered = GOLDENS[name]()
    path = GOLDEN / f"{name}.yaml"
    if UPDATE_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            f"# Rendered by tests/runtime/kubernetes/test_manifests.py ({name}); "
            "UPDATE_GOLDEN=1 rewrites it.\n" + yaml.safe_dump_all(rendered, sort_keys=False, width=120),
            encoding="utf-8",
        )
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 to write it"
    assert list(yaml.safe_load_all(path.read_text(encoding="utf-8"))) == rendered


def test_rendering_is_deterministic_for_server_side_apply() -> None:
    assert [obj for _, obj in every_manifest()] == [obj for _, obj in ALL]


def test_no_part_of_an_object_is_shared_with_another_part() -> None:
    """Shared dicts would turn into YAML anchors, and a caller's edit of one into an edit of both."""
    seen: dict[int, str] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict | list):
            assert id(node) not in seen, f"{where} is the same object as {seen[id(node)]}"
            seen[id(node)] = where
            for key, value in node.items() if isinstance(node, dict) else enumerate(node):
                walk(value, f"{where}.{key}")

    for where, obj in ALL:
        walk(obj, where)


# --- the walk over every workload --------------------------------------------------------------

REQUIRED_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "converge.dev/project",
    "converge.dev/project-id",
}
HEALTH_ROUTES = {
    ServingRuntimeKind.VLLM.value: {"/health"},
    "converge": {"/health/live", "/health/ready"},
}


def workloads() -> Iterator[
    tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]
]:
    """(where, object, pod metadata, pod-level fields, containers to check) for every pod template.

    An InferenceService's pod is its predictor; its model container is checked as KServe runs
    it, merged with the ServingRuntime's container (image, command, ports)."""
    runtimes = {
        obj["metadata"]["name"]: obj["spec"]["containers"][0]
        for _, obj in ALL
        if obj["kind"] == "ServingRuntime"
        and obj["metadata"]["namespace"] == namespace_name(PROJECT, cluster=KSERVE)
    }
    for where, obj in ALL:
        if obj["kind"] in ("Deployment", "Job"):
            template = obj["spec"]["template"]
            pod = template["spec"]
            yield where, obj, template["metadata"], pod, [*pod["initContainers"], *pod["containers"]]
        elif obj["kind"] == "InferenceService":
            predictor = obj["spec"]["predictor"]
            runtime = runtimes[predictor["model"]["runtime"]]
            merged = {
                **runtime,
                **predictor["model"],
                "args": [*runtime["args"], *predictor["model"]["args"]],
            }
            meta = {"labels": predictor["labels"], "annotations": predictor["annotations"]}
            yield where, obj, meta, predictor, [*predictor["initContainers"], merged]


WORKLOAD_CASES = list(workloads())


def test_the_walk_covers_deployments_inference_services_and_jobs() -> None:
    kinds = {obj["kind"] for _, obj, *_ in WORKLOAD_CASES}
    assert kinds == {"Deployment", "InferenceService", "Job"}
    assert len(WORKLOAD_CASES) == 3 * len(WORKLOADS) + 3


@pytest.mark.parametrize(
    ("where", "obj", "meta", "pod", "containers"), WORKLOAD_CASES, ids=[c[0] for c in WORKLOAD_CASES]
)
def test_every_workload_is_sized_probed_labelled_and_locked_down(
    where: str,
    obj: dict[str, Any],
    meta: dict[str, Any],
    pod: dict[str, Any],
    containers: list[dict[str, Any]],
) -> None:
    for labels in (obj["metadata"]["labels"], meta["labels"]):
        assert REQUIRED_LABELS <= labels.keys()
        assert labels["app.kubernetes.io/managed-by"] == "converge"
        assert all(LABEL_VALUE.fullmatch(v) and len(v) <= 63 for v in labels.values())

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"].startswith("converge-")
    volumes = {v["name"]: v for v in pod["volumes"]}

    servers = 0
    for container in containers:
        name = f"{where}/{container['name']}"
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), name
        assert resources["requests"] == resources["limits"], name
        assert all(QUANTITY.fullmatch(q) for q in resources["limits"].values()), name
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }, name
        assert container["image"] and not container["image"].endswith(":latest"), name
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, name
        if "livenessProbe" in container or "readinessProbe" in container:
            servers += 1
            _assert_probed(container, name=name)
    assert servers == 1, f"{where}: one model server per pod"


def _assert_probed(container: dict[str, Any], *, name: str) -> None:
    family = "vllm" if "vllm" in " ".join(container["command"]) else "converge"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in HEALTH_ROUTES[family], name
        assert get["port"] in ports, name
    assert str(ports[container["livenessProbe"]["httpGet"]["port"]]) in container["args"], name
    cache = [m for m in container["volumeMounts"] if m["name"] == pods.CACHE_VOLUME]
    assert cache and all(m["readOnly"] and m["subPath"] for m in cache), f"{name}: the cache, read-only"


def test_selectors_match_their_pods() -> None:
    for where, obj, meta, *_ in WORKLOAD_CASES:
        if obj["kind"] == "Deployment":
            assert obj["spec"]["selector"]["matchLabels"].items() <= meta["labels"].items(), where
    pod_labels = {
        (obj["metadata"]["namespace"], obj["metadata"]["name"]): meta["labels"]
        for _, obj, meta, *_ in WORKLOAD_CASES
    }
    for where, obj in ALL:
        if obj["kind"] in ("Service", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            labels = pod_labels[(obj["metadata"]["namespace"], obj["metadata"]["name"])]
            assert selector.items() <= labels.items(), where


def test_object_names_are_what_the_api_server_accepts() -> None:
    for where, obj in ALL:
        name = obj["metadata"]["name"]
        pattern = DNS1035_LABEL if obj["kind"] in ("Service", "InferenceService") else DNS1123_LABEL
        assert pattern.fullmatch(name) and len(name) <= 63, where


# --- behaviour ---------------------------------------------------------------------------------


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in objects}


def _pod(workload: InferenceWorkload, cluster: ClusterProfile = CLUSTER) -> dict[str, Any]:
    spec: dict[str, Any] = _by_kind(render_workload(workload, cluster=cluster))["Deployment"]["spec"]
    return spec["template"]["spec"]


def test_health_routes_are_the_ones_the_servers_answer() -> None:
    from converge.serving import common

    assert (pods.LIVE_PATH, pods.READY_PATH) == (common.LIVE_PATH, common.READY_PATH)


def test_artifacts_come_from_the_library_store_into_a_digest_keyed_cache_once_per_node() -> None:
    workload = cpu_llama()
    pod = _pod(workload)
    (fetch,) = pod["initContainers"]
    assert fetch["args"] == [
        "fetch",
        *("--uri", f"{STORE}/{ArtifactStore.object_key(SMOLLM2_SHA256)}"),
        *("--sha256", SMOLLM2_SHA256, "--cache-dir", pods.CACHE_DIR),
    ]
    assert {"name": pods.CACHE_VOLUME, "mountPath": pods.CACHE_DIR} in fetch["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[pods.CACHE_VOLUME]["hostPath"] == {
        "path": "/var/lib/converge/artifacts",
        "type": "Directory",
    }
    (server,) = pod["containers"]
    mount = next(m for m in server["volumeMounts"] if m["name"] == pods.CACHE_VOLUME)
    assert mount == {
        "name": pods.CACHE_VOLUME,
        "mountPath": f"/models/{SMOLLM2_SHA256}",
        "subPath": SMOLLM2_SHA256,
        "readOnly": True,
    }
    assert server["args"][server["args"].index("--model-path") + 1] == mount["mountPath"]


def test_kserve_never_downloads_the_model_itself() -> None:
    (isvc, _) = render_workload(h100_vllm(), cluster=KSERVE)
    predictor = isvc["spec"]["predictor"]
    # No storageUri(s): KServe's storage initializer (one download per pod) is never injected.
    assert "storageUri" not in predictor["model"] and "storageUris" not in predictor
    assert [c["name"] for c in predictor["initContainers"]] == ["fetch"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert predictor["model"]["runtime"] == "converge-vllm"
    assert predictor["model"]["modelFormat"] == {"name": "safetensors"}


def test_a_cache_claim_keeps_pod_security_restricted() -> None:
    cluster = dataclasses.replace(CLUSTER, cache=ArtifactCache(storage_class="cephfs", claim_size="1Ti"))
    bundle = _by_kind(render_project(PROJECT, quota=QUOTA, cluster=cluster))
    claim = bundle["PersistentVolumeClaim"]["spec"]
    assert claim == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "cephfs",
        "resources": {"requests": {"storage": "1Ti"}},
    }
    labels = bundle["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    volumes = {v["name"]: v for v in _pod(cpu_llama(), cluster)["volumes"]}
    assert volumes[pods.CACHE_VOLUME] == {
        "name": pods.CACHE_VOLUME,
        "persistentVolumeClaim": {"claimName": "converge-artifact-cache"},
    }
    hostpath = _by_kind(render_project(PROJECT, quota=QUOTA, cluster=CLUSTER))
    assert "PersistentVolumeClaim" not in hostpath
    assert hostpath["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_quota_covers_cpu_memory_gpus_and_mig_slices() -> None:
    quota = _by_kind(render_project(PROJECT, quota=QUOTA, cluster=CLUSTER))["ResourceQuota"]
    assert quota["spec"]["hard"] == {
        "requests.cpu": "32",
        "limits.cpu": "32",
        "requests.memory": "128Gi",
        "limits.memory": "128Gi",
        "requests.nvidia.com/gpu": "4",
        "requests.nvidia.com/gpu.shared": "4",
        "requests.nvidia.com/mig-1g.10gb": "7",
        "requests.nvidia.com/mig-3g.40gb": "2",
    }


def test_quota_reads_the_stored_project_quota_and_leaves_unlimited_ones_out() -> None:
    quota = ProjectQuota.from_stored({"cpu": 0.5, "memory_bytes": None, "gpus": 0})
    hard = _by_kind(render_project(PROJECT, quota=quota, cluster=CLUSTER))["ResourceQuota"]["spec"]["hard"]
    assert hard == {
        "requests.cpu": "500m",
        "limits.cpu": "500m",
        "requests.nvidia.com/gpu": "0",
        "requests.nvidia.com/gpu.shared": "0",
    }
    assert _by_kind(render_project(PROJECT, quota=ProjectQuota(), cluster=CLUSTER))["ResourceQuota"][
        "spec"
    ] == {"hard": {}}


def test_network_policies_deny_by_default_and_let_only_the_platform_in() -> None:
    policies = {
        p["metadata"]["name"]: p["spec"]
        for p in render_project(PROJECT, quota=QUOTA, cluster=CLUSTER)
        if p["kind"] == "NetworkPolicy"
    }
    assert policies["converge-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # The data path (the gateway, and the api and worker roles' in-process gateways), and the controller.
    for policy, roles in (("gateway", ("gateway", "api", "worker")), ("controller", ("controller",))):
        spec = policies[f"converge-allow-{policy}"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "inference-server"
        (rule,) = spec["ingress"]
        assert rule["from"] == [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "converge"}},
                "podSelector": {
                    "matchLabels": {"app.kubernetes.io/name": "converge", "app.kubernetes.io/component": role}
                },
            }
            for role in roles
        ]
        assert rule["ports"] == [{"protocol": "TCP", "port": pods.HTTP_PORT}]
    assert policies["converge-allow-artifact-store"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    ]


def test_an_in_cluster_artifact_store_is_reached_by_its_pods() -> None:
    minio = EgressRule(pods=PodPeer(namespace="minio", pod_labels={"app": "minio"}), ports=(9000,))
    cluster = dataclasses.replace(CLUSTER, artifact_store_egress=(minio,))
    (policy,) = [
        p
        for p in render_project(PROJECT, quota=QUOTA, cluster=cluster)
        if p["metadata"]["name"].endswith("artifact-store")
    ]
    assert policy["spec"]["egress"] == [
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}},
                    "podSelector": {"matchLabels": {"app": "minio"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": 9000}],
        }
    ]


def test_priority_classes_put_production_over_builds_over_development() -> None:
    classes = {c["metadata"]["name"]: c for c in render_priority_classes()}
    production, builds, development = (
        classes[f"converge-{t}"]["value"] for t in ("production", "build", "development")
    )
    assert production > builds > development > 0
    assert classes["converge-development"]["preemptionPolicy"] == "Never"
    assert not any(c["globalDefault"] for c in classes.values())
    assert _pod(mig_slice())["priorityClassName"] == "converge-development"
    assert _pod(cpu_llama())["priorityClassName"] == "converge-production"


def test_a_deployment_without_kserve_is_a_deployment_service_autoscaler_and_budget() -> None:
    objects = _by_kind(render_workload(three_zones(), cluster=CLUSTER))
    assert list(objects) == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 6)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "smollm2-ha"}
    assert hpa["behavior"] == {
        "scaleUp": {"stabilizationWindowSeconds": 10},
        "scaleDown": {"stabilizationWindowSeconds": 120},
    }
    # The HPA owns the replica count: server-side apply must not set it back on every pass.
    assert "replicas" not in objects["Deployment"]["spec"]
    assert objects["Deployment"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_a_fixed_size_deployment_has_no_autoscaler() -> None:
    objects = _by_kind(render_workload(embeddings(), cluster=CLUSTER))
    assert "HorizontalPodAutoscaler" not in objects
    assert objects["Deployment"]["spec"]["replicas"] == 2


def test_kserve_replicas_and_autoscaling_go_on_the_predictor() -> None:
    (isvc, pdb) = render_workload(three_zones(), cluster=KSERVE)
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"]) == (3, 6, "cpu")
    assert pdb["kind"] == "PodDisruptionBudget"
    fixed = render_workload(embeddings(), cluster=KSERVE)[0]["spec"]["predictor"]
    assert (fixed["minReplicas"], fixed["maxReplicas"]) == (2, 2)


def test_replicas_spread_over_the_zones_they_are_given() -> None:
    pod = _pod(three_zones())
    zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": zones}]}
    ]
    by_key = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    zone = by_key["topology.kubernetes.io/zone"]
    assert (zone["maxSkew"], zone["minDomains"], zone["whenUnsatisfiable"]) == (1, 3, "DoNotSchedule")
    assert zone["labelSelector"] == {
        "matchLabels": {"converge.dev/deployment-id": str(three_zones().deployment.deployment_id)}
    }
    assert by_key["kubernetes.io/hostname"]["whenUnsatisfiable"] == "ScheduleAnyway"


def test_one_local_replica_gets_no_placement_rules() -> None:
    pod = _pod(cpu_llama())
    assert not {"affinity", "tolerations", "topologySpreadConstraints"} & pod.keys()


def test_one_named_zone_is_required_but_not_spread() -> None:
    workload = dataclasses.replace(
        cpu_llama(), deployment=cpu_llama().deployment.model_copy(update={"zones": ("eu-west-1b",)})
    )
    pod = _pod(workload)
    assert "topologySpreadConstraints" not in pod
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"][0]["values"] == ["eu-west-1b"]


def test_an_h100_replica_asks_for_the_gpu_by_product_and_memory_and_tolerates_its_taint() -> None:
    (isvc, _) = render_workload(h100_vllm(), cluster=KSERVE)
    predictor = isvc["spec"]["predictor"]
    terms = predictor["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]},
                {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["79999"]},
            ]
        }
    ]
    assert predictor["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    limits = predictor["model"]["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert predictor["model"]["startupProbe"]["httpGet"]["path"] == "/health"


def test_a_mig_slice_asks_for_the_mig_resource_not_a_whole_gpu() -> None:
    (server,) = _pod(mig_slice())["containers"]
    assert server["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/mig-1g.10gb": "1"}
    assert "--tensor-parallel-size" not in server["args"]
    assert _pod(mig_slice())["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_time_sliced_gpu_asks_for_one_shared_gpu() -> None:
    (server,) = _pod(v2_onnx())["containers"]
    assert server["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi", "nvidia.com/gpu.shared": "1"}


def test_several_gpus_run_vllm_tensor_parallel() -> None:
    base = h100_vllm()
    resources = base.deployment.template.resources.model_copy(update={"gpus": 4})
    template = base.deployment.template.model_copy(update={"resources": resources})
    workload = dataclasses.replace(base, deployment=base.deployment.model_copy(update={"template": template}))
    (server,) = _pod(workload)["containers"]
    assert server["args"][server["args"].index("--tensor-parallel-size") + 1] == "4"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_llama_cpp_gets_the_threads_it_was_granted() -> None:
    (server,) = _pod(cpu_llama())["containers"]
    assert server["command"] == ["python", "-m", "converge.serving"]
    assert server["args"][:1] == ["llama-cpp"]
    assert server["args"][server["args"].index("--n-threads") + 1] == "2"
    assert ("--host", "0.0.0.0") == tuple(
        server["args"][server["args"].index("--host") : server["args"].index("--host") + 2]
    )


def test_llama_cpp_offloads_every_layer_when_the_pod_has_a_gpu() -> None:
    def server_args(resources_update: dict[str, object], args: tuple[str, ...] = ()) -> list[str]:
        base = cpu_llama()
        resources = base.deployment.template.resources.model_copy(update=resources_update)
        template = base.deployment.template.model_copy(update={"resources": resources, "args": args})
        workload = dataclasses.replace(
            base, deployment=base.deployment.model_copy(update={"template": template})
        )
        (server,) = _pod(workload)["containers"]
        return list(server["args"])

    assert "--n-gpu-layers" not in server_args({})
    for gpu in ({"gpus": 1}, {"mig_profile": "1g.10gb"}):
        args = server_args(gpu)
        assert args[args.index("--n-gpu-layers") + 1] == "-1"
    # The deployment's own choice wins (e.g. a partial offload).
    assert server_args({"gpus": 1}, ("--n-gpu-layers", "20")).count("--n-gpu-layers") == 1


def test_the_deployments_own_args_and_environment_are_kept() -> None:
    base = cpu_llama()
    template = base.deployment.template.model_copy(
        update={
            "args": ("--n-ctx", "4096", "--n-threads", "1"),
            "env": {"LOG_LEVEL": "debug", "HOME": "/tmp/h"},
        }
    )
    workload = dataclasses.replace(base, deployment=base.deployment.model_copy(update={"template": template}))
    (server,) = _pod(workload)["containers"]
    assert server["args"][-4:] == ["--n-ctx", "4096", "--n-threads", "1"]
    assert server["args"].count("--n-threads") == 1
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env == {"HOME": "/tmp/h", "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "debug", "OMP_NUM_THREADS": "2"}


@pytest.mark.usefixtures("cached_schemas")
def test_a_cluster_with_a_collector_gives_model_servers_its_address_and_a_way_out() -> None:
    from converge.runtime.kubernetes.config import KubernetesConfig

    config = KubernetesConfig(
        otel_endpoint="http://otel-collector.observability:4318/", otel_egress_cidr="10.0.0.0/8"
    )
    cluster = config.cluster_profile(kserve=False)
    workload = cpu_llama()
    (server,) = _pod(workload, cluster)["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["CONVERGE_OTEL__ENDPOINT"] == "http://otel-collector.observability:4318"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://otel-collector.observability:4318/v1/traces"
    assert env["OTEL_SERVICE_NAME"] == f"converge-replica-{workload.deployment.name}"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == f"converge.deployment.id={workload.deployment.deployment_id}"
    bundle = render_project(PROJECT, quota=QUOTA, cluster=cluster)
    (policy,) = [p for p in bundle if p["metadata"]["name"] == "converge-allow-otel-collector"]
    assert policy["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 4318}]}
    ]
    for obj in [policy, *render_workload(workload, cluster=cluster)]:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)

    # No collector: no tracing environment and no way out for it.
    (plain,) = _pod(workload)["containers"]
    assert not [e for e in plain["env"] if "OTEL" in e["name"]]
    names = {p["metadata"]["name"] for p in render_project(PROJECT, quota=QUOTA, cluster=CLUSTER)}
    assert "converge-allow-otel-collector" not in names
    with pytest.raises(ValueError, match="OTLP/HTTP collector"):
        KubernetesConfig(otel_endpoint="otel-collector:4318")


def test_a_redeploy_changes_the_pod_template() -> None:
    base = cpu_llama()
    again = dataclasses.replace(base, deployment=base.deployment.model_copy(update={"restart_generation": 1}))
    first, second = (_by_kind(render_workload(w, cluster=CLUSTER))["Deployment"] for w in (base, again))
    assert first["spec"]["template"] != second["spec"]["template"]
    assert first["spec"]["selector"] == second["spec"]["selector"]


def test_labels_say_who_owns_what() -> None:
    deployment = _by_kind(render_workload(cpu_llama(), cluster=CLUSTER))["Deployment"]
    labels = deployment["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/managed-by": "converge",
        "app.kubernetes.io/part-of": "converge",
        "converge.dev/project": "research",
        "converge.dev/project-id": str(PROJECT.project_id),
        "app.kubernetes.io/name": "llama-cpp",
        "app.kubernetes.io/instance": "smollm2-chat",
        "app.kubernetes.io/component": "inference-server",
        "converge.dev/deployment": "smollm2-chat",
        "converge.dev/deployment-id": str(cpu_llama().deployment.deployment_id),
        "converge.dev/revision": "3",
        "converge.dev/tier": "production",
    }
    assert deployment["metadata"]["namespace"] == "converge-research"


def test_names_fit_what_kubernetes_and_kserve_accept() -> None:
    assert workload_name("7-iris") == "d-7-iris"
    long = workload_name("a" * 63)
    assert len(long) == MAX_WORKLOAD_NAME and DNS1035_LABEL.fullmatch(long)
    assert workload_name("a" * 63) != workload_name("a" * 62)
    project = ProjectRef(project_id=uuid.uuid4(), name="p" * 63)
    name = namespace_name(project, cluster=CLUSTER)
    assert len(name) == 63 and DNS1123_LABEL.fullmatch(name) and name.startswith("converge-ppp")
    assert build_job_name(build().build_id) == f"build-{build().build_id}"


def test_a_build_is_a_job_of_its_steps_in_order() -> None:
    job = render_build(build(), cluster=CLUSTER)
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (0, 3600)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["priorityClassName"] == "converge-build"
    steps = [c["name"] for c in pod["initContainers"]] + [c["name"] for c in pod["containers"]]
    assert steps == ["fetch", "verify", "scan", "smoke-load", "benchmark"]
    smoke = pod["initContainers"][3]
    assert smoke["restartPolicy"] == "Always"  # a native sidecar: it runs beside the benchmark
    startup = smoke["startupProbe"]
    assert startup["httpGet"]["path"] == "/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] == 300
    (benchmark,) = pod["containers"]
    assert "http://127.0.0.1:8080" in benchmark["args"]
    assert benchmark["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert job["metadata"]["labels"]["converge.dev/build-id"] == str(build().build_id)


def test_a_gpu_build_smoke_loads_on_the_gpu_it_targets() -> None:
    gpu_build = dataclasses.replace(
        build(),
        server=ServerKind.LLAMA_CPP,
        runtime=ServingRuntimeKind.VLLM,
        artifact=Artifact.in_store(base_uri=STORE, sha256=LLAMA_SHA256, format="safetensors"),
        resources=Resources(cpu=8, memory_bytes=64 * GIB, gpus=1, gpu_type="NVIDIA H100 80GB HBM3"),
    )
    pod = render_build(gpu_build, cluster=CLUSTER)["spec"]["template"]["spec"]
    smoke = pod["initContainers"][3]
    assert smoke["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert smoke["image"] == IMAGES.vllm


EXCLUSIVE, SHARED = GpuSharing.EXCLUSIVE, GpuSharing.TIME_SLICED


@pytest.mark.parametrize(
    ("resources", "sharing", "runtime", "fmt", "zones", "message"),
    [
        (Resources(), EXCLUSIVE, ServingRuntimeKind.VLLM, "safetensors", ("local",), "vLLM runs on GPUs"),
        (Resources(), EXCLUSIVE, None, "onnx", ("local",), "serves gguf, not 'onnx'"),
        (Resources(gpus=2), SHARED, None, "gguf", ("local",), "one share of a time-sliced GPU"),
        (Resources(), SHARED, None, "gguf", ("local",), "needs gpus: 1"),
        (Resources(gpus=1, mig_profile="1g.10gb"), SHARED, None, "gguf", ("local",), "not time-sliced"),
        (Resources(mig_profile="big"), EXCLUSIVE, None, "gguf", ("local",), "MIG profile"),
        (Resources(gpus=1, gpu_type="NVIDIA H100 / 80GB"), EXCLUSIVE, None, "gguf", ("local",), "GPU type"),
        (Resources(), EXCLUSIVE, None, "gguf", ("local", "eu-west-1a"), "local backend"),
    ],
)
def test_workloads_a_cluster_cannot_run_are_refused_with_a_reason(
    resources: Resources,
    sharing: GpuSharing,
    runtime: ServingRuntimeKind | None,
    fmt: str,
    zones: tuple[str, ...],
    message: str,
) -> None:
    base = cpu_llama()
    template = base.deployment.template.model_copy(update={"resources": resources})
    deployment = base.deployment.model_copy(update={"template": template, "zones": zones})
    workload = dataclasses.replace(
        base,
        deployment=deployment,
        artifact=dataclasses.replace(base.artifact, format=fmt),
        runtime=runtime,
        gpu=GpuPlacement(sharing=sharing),
    )
    with pytest.raises(ValueError, match=message):
        render_workload(workload, cluster=CLUSTER)


def test_a_build_for_a_runtime_that_cannot_load_the_artifact_is_refused() -> None:
    with pytest.raises(ValueError, match="vLLM runs on GPUs"):
        render_build(
            dataclasses.replace(
                build(),
                runtime=ServingRuntimeKind.VLLM,
                artifact=Artifact.in_store(base_uri=STORE, sha256=LLAMA_SHA256, format="safetensors"),
            ),
            cluster=CLUSTER,
        )
    with pytest.raises(ValueError, match="serves gguf"):
        render_build(
            dataclasses.replace(build(), artifact=dataclasses.replace(build().artifact, format="onnx")),
            cluster=CLUSTER,
        )


def test_kserve_cannot_hold_an_inference_service_at_zero() -> None:
    base = cpu_llama()
    stopped = dataclasses.replace(base, deployment=base.deployment.model_copy(update={"replicas": 0}))
    with pytest.raises(ValueError, match="zero replicas"):
        render_workload(stopped, cluster=KSERVE)
    assert _by_kind(render_workload(stopped, cluster=CLUSTER))["Deployment"]["spec"]["replicas"] == 0


def test_inputs_are_checked_where_they_are_made() -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        Artifact(sha256="abc", uri="s3://x", format="gguf")
    assert (
        Artifact(sha256="sha256:" + SMOLLM2_SHA256.upper(), uri="s3://x", format="gguf").sha256
        == SMOLLM2_SHA256
    )
    with pytest.raises(ValueError, match="min_replicas"):
        Autoscaling(min_replicas=0, max_replicas=2)
    with pytest.raises(ValueError, match="cooldown_s"):
        Autoscaling(min_replicas=1, max_replicas=2, cooldown_s=7200)
    with pytest.raises(ValueError, match="DNS label"):
        ProjectRef(project_id=uuid.uuid4(), name="Research")
    with pytest.raises(ValueError, match="exactly one"):
        EgressRule(ports=(443,))
    with pytest.raises(ValueError, match="non-root"):
        ClusterProfile(run_as_user=0)
    with pytest.raises(ValueError, match="MIG profile"):
        ProjectQuota(mig={"huge": 1})


def test_default_images_are_pinned_releases() -> None:
    images = RuntimeImages()
    for kind in ServingRuntimeKind:
        image = images.for_runtime(kind)
        assert re.fullmatch(r"[a-z0-9./-]+/[a-z0-9-]+:v?[0-9]+\.[0-9]+\.[0-9]+", image), image


def test_renderers_import_neither_the_control_path_nor_the_gateway() -> None:
    code = (
        "import sys, converge.runtime.kubernetes.manifests; "
        "print([m for m in sys.modules if m.startswith(('converge.control', 'converge.gateway', 'lightkube'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
