"""The manifests that run Converge itself (`platform.py`): valid Kubernetes 1.29-1.33, CRDs
included; every workload sized, probed, labelled and locked down; RBAC that grants the controller
what the backend touches and nothing more, the API only reads, the gateway and workers nothing;
pods labelled as the project namespaces' NetworkPolicies admit them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_manifests import K8S_VERSIONS, LABEL_VALUE, QUANTITY, cached_schemas  # noqa: F401 - a fixture

from converge.config import Settings
from converge.kit.roles import Role
from converge.runtime.kubernetes import platform, pods
from converge.runtime.kubernetes.backend import BUNDLE_KINDS, WORKLOAD_KINDS
from converge.runtime.kubernetes.client import KINDS
from converge.runtime.kubernetes.namespaces import render_network_policies
from converge.runtime.kubernetes.platform import PlatformSpec, render_platform
from converge.runtime.kubernetes.specs import ClusterProfile, ContainerSize

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[3]
CUSTOM_SPEC = PlatformSpec(
    cluster=ClusterProfile(system_namespace="ai-prod", namespace_prefix="ai-"),
    image="registry.example.com/converge/converge:1.2.3",
    replicas={Role.WORKER: 3, Role.CONTROLLER: 1},
    sizes={Role.GATEWAY: ContainerSize(cpu=4, memory_bytes=2 << 30)},
    secret="converge-secrets",
    settings={"CONVERGE_LIBRARY__ARTIFACT_STORE_URL": "s3://converge-artifacts/library"},
)
DEFAULT = render_platform(PlatformSpec())
CUSTOM = render_platform(CUSTOM_SPEC)
CASES = [("default", PlatformSpec(), DEFAULT), ("custom", CUSTOM_SPEC, CUSTOM)]

REQUIRED_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
    "converge.dev/role",
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


def _of(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in _of(objects, kind) if o["metadata"]["name"] == name]
    return found


def _deployment(objects: list[Obj], role: Role) -> Obj:
    return _named(objects, "Deployment", f"converge-{role.value}")


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("cached_schemas")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_official_schema(version: str) -> None:
    failures, seen = [], set()
    for label, _, objects in CASES:
        for obj in objects:
            if (key := json.dumps(obj, sort_keys=True)) in seen:
                continue
            seen.add(key)
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = f"{label}/{obj['kind']}/{obj['metadata']['name']}"
                failures.append(f"{where}: {list(exc.absolute_path)}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_the_crds_are_the_checkouts_and_come_first() -> None:
    files = sorted((REPO / "deploy" / "crds").glob("*.yaml"))
    expected = [d for f in files for d in yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]
    crds = _of(DEFAULT, "CustomResourceDefinition")
    assert crds == expected and len(crds) >= 2  # Model and RAGModel
    assert DEFAULT[: len(crds)] == crds
    assert DEFAULT[len(crds)]["kind"] == "Namespace"  # then the namespace, before what lives in it


def test_an_installed_wheel_reads_the_crds_shipped_in_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "site-packages" / "converge" / "runtime" / "kubernetes" / "platform.py"
    (module.parent / "crds").mkdir(parents=True)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "x"},
    }
    (module.parent / "crds" / "x.yaml").write_text("# a comment\n" + yaml.safe_dump(crd), encoding="utf-8")
    monkeypatch.setattr(platform, "__file__", str(module))
    assert platform.crd_manifests() == [crd]


def test_missing_crds_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "__file__", str(tmp_path / "a" / "b" / "c" / "d" / "platform.py"))
    with pytest.raises(FileNotFoundError, match="CRDs are missing"):
        platform.crd_manifests()


def test_everything_namespaced_is_in_the_system_namespace() -> None:
    for _, spec, objects in CASES:
        cluster_wide = {"CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding"}
        for obj in objects:
            if obj["kind"] not in cluster_wide:
                assert obj["metadata"]["namespace"] == spec.namespace, obj["metadata"]["name"]
        (namespace,) = _of(objects, "Namespace")
        assert namespace["metadata"]["name"] == spec.namespace
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_rendering_is_deterministic_and_needs_no_yaml_anchors() -> None:
    assert render_platform(CUSTOM_SPEC) == CUSTOM
    text = yaml.safe_dump_all(CUSTOM, sort_keys=False)
    assert "&id" not in text and "*id" not in text  # no object shared between two places


# --- the walk over every workload --------------------------------------------------------------

WORKLOADS = [
    (f"{label}/{role.value}", spec, objects, role) for label, spec, objects in CASES for role in Role
]


@pytest.mark.parametrize(("where", "spec", "objects", "role"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_every_workload_is_sized_probed_labelled_and_locked_down(
    where: str, spec: PlatformSpec, objects: list[Obj], role: Role
) -> None:
    deployment = _deployment(objects, role)
    template = deployment["spec"]["template"]
    for labels in (deployment["metadata"]["labels"], template["metadata"]["labels"]):
        assert REQUIRED_LABELS <= labels.keys(), where
        assert labels["converge.dev/role"] == role.value
        assert all(LABEL_VALUE.fullmatch(v) and len(v) <= 63 for v in labels.values()), where
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert deployment["spec"]["replicas"] == spec.replicas_of(role)

    pod = template["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0 and security["runAsGroup"] > 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == f"converge-{role.value}"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("emptyDir" in v for v in volumes.values()), "no host paths, no shared claims"

    (container,) = pod["containers"]
    assert container["command"] == ["converge"] and container["args"] == ["serve", role.value]
    assert container["image"] == spec.converge_image and not container["image"].endswith(":latest")
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert resources["requests"] == resources["limits"]
    assert all(QUANTITY.fullmatch(q) for q in resources["limits"].values())
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/readiness"}
    assert all(container[p]["httpGet"]["port"] in ports for p in paths)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= volumes.keys()
    # A read-only root filesystem: what Converge writes goes to these two.
    assert {pods.TMP_DIR, platform.DATA_DIR} <= mounts.keys()


@pytest.mark.parametrize(("label", "spec", "objects"), CASES, ids=[c[0] for c in CASES])
def test_settings_come_from_the_config_map_and_the_secret(
    label: str, spec: PlatformSpec, objects: list[Obj]
) -> None:
    config_map = _named(objects, "ConfigMap", spec.config)
    for role in Role:
        (container,) = _deployment(objects, role)["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": spec.config}}]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert {ref["name"] for ref in refs.values()} == {spec.secret}
        assert {n for n, ref in refs.items() if not ref["optional"]} == {
            "CONVERGE_DATABASE_URL",
            "CONVERGE_AUTH__SECRET_KEY",
        }
        assert not set(refs) & config_map["data"].keys(), "no secret in the ConfigMap"
    assert config_map["data"].items() >= spec.settings.items()


def test_the_config_map_configures_the_kubernetes_runtime_as_the_settings_read_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ConfigMap's names are the settings' own: a renamed setting fails here, not on a cluster."""
    config_map = _named(CUSTOM, "ConfigMap", CUSTOM_SPEC.config)
    for name, value in {
        **config_map["data"],
        "CONVERGE_DATABASE_URL": "postgresql://converge@db:5432/converge",
        "CONVERGE_AUTH__SECRET_KEY": "0123456789abcdef0123456789abcdef",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.env == "production" and settings.port == platform.HTTP_PORT
    assert settings.runtime.backend == "kubernetes"
    assert settings.runtime.kubernetes.system_namespace == "ai-prod"
    assert settings.runtime.kubernetes.namespace_prefix == "ai-"
    assert settings.sandbox.enabled is False
    assert str(settings.data_dir) == platform.DATA_DIR
    assert settings.library.artifact_store_url == "s3://converge-artifacts/library"


def test_services_and_budgets_select_their_role() -> None:
    for role in Role:
        selector = _deployment(DEFAULT, role)["spec"]["selector"]["matchLabels"]
        budget = _named(DEFAULT, "PodDisruptionBudget", f"converge-{role.value}")["spec"]
        assert budget["selector"]["matchLabels"] == selector and budget["maxUnavailable"] == 1
    services = {s["metadata"]["name"]: s["spec"] for s in _of(DEFAULT, "Service")}
    assert set(services) == {"converge-api", "converge-gateway"}
    for role in (Role.API, Role.GATEWAY):
        service = services[f"converge-{role.value}"]
        assert service["selector"] == _deployment(DEFAULT, role)["spec"]["selector"]["matchLabels"]
        (container,) = _deployment(DEFAULT, role)["spec"]["template"]["spec"]["containers"]
        assert service["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


def test_a_spec_refuses_what_the_cluster_would_not_take() -> None:
    with pytest.raises(ValueError, match="DNS label"):
        PlatformSpec(cluster=ClusterProfile(system_namespace="Converge_Prod"))
    with pytest.raises(ValueError, match="negative"):
        PlatformSpec(replicas={Role.API: -1})
    with pytest.raises(ValueError, match="CONVERGE_"):
        PlatformSpec(settings={"DATABASE_URL": "x"})


# --- RBAC --------------------------------------------------------------------------------------

CONTROLLER_RBAC = {
    ("", "namespaces"): {"get", "list", "create", "patch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "services"): {"get", "list", "create", "patch", "delete"},
    ("", "resourcequotas"): {"get", "list", "create", "patch", "delete"},
    ("", "limitranges"): {"get", "list", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "create", "patch", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "list", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "create", "patch", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "create", "patch", "delete"},
    ("scheduling.k8s.io", "priorityclasses"): {"create", "patch"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("serving.kserve.io", "inferenceservices"): {"get", "list", "watch", "create", "patch", "delete"},
    ("serving.kserve.io", "servingruntimes"): {"get", "list", "create", "patch", "delete"},
    ("converge.dev", "models"): {"get", "list", "watch", "create", "patch", "delete"},
    ("converge.dev", "ragmodels"): {"get", "list", "watch"},
    ("converge.dev", "ragmodels/status"): {"get", "patch"},
}
API_RBAC = {
    ("", "nodes"): {"get", "list", "watch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("apps", "deployments"): {"get", "list", "watch"},
    ("serving.kserve.io", "inferenceservices"): {"get", "list", "watch"},
}


def _grants(objects: list[Obj], role: Role, namespace: str = "converge") -> dict[tuple[str, str], set[str]]:
    (cluster_role,) = [
        o for o in _of(objects, "ClusterRole") if o["metadata"]["name"] == f"{namespace}-{role.value}"
    ]
    out: dict[tuple[str, str], set[str]] = {}
    for rule in cluster_role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_has_no_wildcards_and_only_plain_verbs() -> None:
    for _, _, objects in CASES:
        for cluster_role in _of(objects, "ClusterRole"):
            for rule in cluster_role["rules"]:
                assert rule.keys() == {"apiGroups", "resources", "verbs"}  # no resourceNames/URLs
                for value in (*rule["apiGroups"], *rule["resources"], *rule["verbs"]):
                    assert "*" not in value
                assert set(rule["verbs"]) <= VERBS  # never update, escalate, bind or impersonate
                assert "secrets" not in rule["resources"] and "configmaps" not in rule["resources"]
        assert not _of(objects, "Role") and not _of(objects, "RoleBinding")


def test_the_controller_gets_exactly_its_rules_and_the_api_only_reads() -> None:
    assert _grants(DEFAULT, Role.CONTROLLER) == CONTROLLER_RBAC
    assert _grants(DEFAULT, Role.API) == API_RBAC
    assert _grants(CUSTOM, Role.CONTROLLER, namespace="ai-prod") == CONTROLLER_RBAC


def test_the_controller_may_do_what_the_kubernetes_backend_does() -> None:
    """Derived from the backend: it applies (PATCH) and prunes (list, delete) every workload and
    bundle kind, applies namespaces and priority classes, and watches what its informers watch."""
    grants = _grants(DEFAULT, Role.CONTROLLER)

    def key(api_version: str, kind: str) -> tuple[str, str]:
        group = api_version.rpartition("/")[0]
        return group, KINDS[(api_version, kind)][0]

    for api_version, kind in (*WORKLOAD_KINDS, *BUNDLE_KINDS):
        assert {"create", "patch", "list", "delete"} <= grants[key(api_version, kind)], kind
    for api_version, kind in (("v1", "Namespace"), ("scheduling.k8s.io/v1", "PriorityClass")):
        assert {"create", "patch"} <= grants[key(api_version, kind)], kind
    watched = (
        ("v1", "Pod"),
        ("v1", "Node"),
        ("apps/v1", "Deployment"),
        ("serving.kserve.io/v1beta1", "InferenceService"),
    )
    for api_version, kind in watched:
        assert {"list", "watch"} <= grants[key(api_version, kind)], kind
    assert "get" in grants[("", "pods/log")]
    plurals = {key(av, k) for av, k in KINDS} | {
        ("", "pods/log"),
        ("converge.dev", "ragmodels"),
        ("converge.dev", "ragmodels/status"),
    }
    assert set(grants) <= plurals, "a grant for something the client never touches"


def test_the_gateway_and_the_workers_get_no_token_and_no_rules() -> None:
    bound = {s["name"] for b in _of(DEFAULT, "ClusterRoleBinding") for s in b["subjects"]}
    assert bound == {"converge-api", "converge-controller"}
    for role in Role:
        account = _named(DEFAULT, "ServiceAccount", f"converge-{role.value}")
        pod = _deployment(DEFAULT, role)["spec"]["template"]["spec"]
        mounts = role in (Role.API, Role.CONTROLLER)
        assert account["automountServiceAccountToken"] is mounts
        assert pod["automountServiceAccountToken"] is mounts
    for binding in _of(DEFAULT, "ClusterRoleBinding"):
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == "converge"


# --- network policies --------------------------------------------------------------------------


def _admits(policy: Obj, *, namespace: Obj, pod_labels: dict[str, str]) -> bool:
    # The API server labels every namespace with its name (kubernetes.io/metadata.name).
    ns_labels = {
        **namespace["metadata"]["labels"],
        "kubernetes.io/metadata.name": namespace["metadata"]["name"],
    }
    for rule in policy["spec"].get("ingress", []):
        for peer in rule["from"]:
            ns_ok = peer["namespaceSelector"]["matchLabels"].items() <= ns_labels.items()
            if ns_ok and peer["podSelector"]["matchLabels"].items() <= pod_labels.items():
                return True
    return False


@pytest.mark.parametrize(
    "cluster",
    [
        ClusterProfile(),
        ClusterProfile(system_namespace="ai-prod"),
        ClusterProfile(gateway_pods={"example.com/edge": "true"}, controller_pods={"example.com/ctl": "yes"}),
    ],
    ids=["default", "other-namespace", "custom-labels"],
)
def test_project_namespaces_admit_the_gateway_and_the_controller_pods(cluster: ClusterProfile) -> None:
    objects = render_platform(PlatformSpec(cluster=cluster))
    (namespace,) = _of(objects, "Namespace")
    project = {
        p["metadata"]["name"]: p
        for p in render_network_policies("converge-team-a", labels={"x": "y"}, cluster=cluster)
    }
    labels = {role: _deployment(objects, role)["spec"]["template"]["metadata"]["labels"] for role in Role}
    assert labels[Role.GATEWAY].items() >= cluster.gateway_pods.items()
    assert labels[Role.CONTROLLER].items() >= cluster.controller_pods.items()
    assert _admits(project["converge-allow-gateway"], namespace=namespace, pod_labels=labels[Role.GATEWAY])
    assert _admits(
        project["converge-allow-controller"], namespace=namespace, pod_labels=labels[Role.CONTROLLER]
    )
    for role in (Role.API, Role.WORKER):  # knowledge-base search and ingestion embed in-process
        assert _admits(project["converge-allow-gateway"], namespace=namespace, pod_labels=labels[role])
        assert not _admits(project["converge-allow-controller"], namespace=namespace, pod_labels=labels[role])
    assert not _admits(
        project["converge-allow-controller"], namespace=namespace, pod_labels=labels[Role.GATEWAY]
    )


def test_admitted_labels_that_clash_with_a_selector_are_refused() -> None:
    cluster = ClusterProfile(gateway_pods={"converge.dev/role": "edge"})
    with pytest.raises(ValueError, match="clash"):
        render_platform(PlatformSpec(cluster=cluster), crds=[])


def test_only_the_api_and_the_gateway_take_connections() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in _of(DEFAULT, "NetworkPolicy")}
    assert policies["converge-default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    allowed = {}
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            assert rule["ports"] == [{"protocol": "TCP", "port": platform.HTTP_PORT}], name
            allowed[name] = spec["podSelector"]["matchLabels"]
    assert sorted(allowed.values(), key=str) == sorted(
        (_deployment(DEFAULT, r)["spec"]["selector"]["matchLabels"] for r in (Role.API, Role.GATEWAY)),
        key=str,
    )


def test_replicas_spread_over_zones_and_nodes_when_there_are_several() -> None:
    spread = _deployment(CUSTOM, Role.WORKER)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {pods.ZONE_LABEL, pods.HOSTNAME_LABEL}
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)  # never blocks a start
    assert "topologySpreadConstraints" not in _deployment(CUSTOM, Role.CONTROLLER)["spec"]["template"]["spec"]


def test_spec_defaults_fill_every_role() -> None:
    spec = dataclasses.replace(CUSTOM_SPEC, replicas={})
    assert {role: spec.replicas_of(role) for role in Role} == dict(platform.DEFAULT_REPLICAS)
    assert CUSTOM_SPEC.size_of(Role.GATEWAY) == ContainerSize(cpu=4, memory_bytes=2 << 30)
