"""The manifests that run Converge itself on a cluster (pure, but for reading the CRD files):
`converge render platform | kubectl apply -f -`, and the Terraform module's input.

In `ClusterProfile.system_namespace`: one Deployment per role (`kit/roles.py`), each with its own
ServiceAccount; Services for the API and the gateway; a PodDisruptionBudget per role; a
default-deny NetworkPolicy that lets clients reach only the API and the gateway; a ConfigMap of
settings. Cluster-wide: Converge's CRDs (`deploy/crds/`) and the RBAC, which is least-privilege:

- the controller gets what the Kubernetes backend (`backend.py`, `client.py`) applies, prunes and
  watches in project namespaces, and nothing else (`CONTROLLER_RULES`);
- the API gets read-only access to what it shows (zones from nodes, replicas from pods and their
  workloads, logs), because it answers those from its own, watching, runtime (`API_RULES`);
- the gateway and the workers get none: their pods mount no service-account token.

The secrets are not rendered: the Deployments read them from a Secret the operator creates
(`SECRET_KEYS`). The gateway's and the controller's pods carry `ClusterProfile.gateway_pods` and
`controller_pods`, the labels the project namespaces' NetworkPolicies admit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from converge import __version__
from converge.kit.roles import Role
from converge.runtime.kubernetes import pods
from converge.runtime.kubernetes.labels import metadata
from converge.runtime.kubernetes.model_cr import label_value
from converge.runtime.kubernetes.pods import Manifest
from converge.runtime.kubernetes.specs import ClusterProfile, ContainerSize

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ROLE_LABEL = "converge.dev/role"
INSTANCE = "converge"
CONTAINER = "converge"
HTTP_PORT = 8000  # CONVERGE_PORT, what every role listens on (health and readiness included)
SERVICE_PORT = 80
DATA_DIR = "/var/lib/converge"  # CONVERGE_DATA_DIR: the gateway's usage spool, build scratch
DATA_VOLUME = "data"
# Migrations run at start-up (one replica at a time, behind an advisory lock): /health answers
# only once the process serves, so the startup probe gives it this long before liveness counts.
STARTUP_BUDGET_S = 300
TERMINATION_GRACE_S = 30

DEFAULT_REPLICAS: Mapping[Role, int] = {Role.API: 2, Role.GATEWAY: 2, Role.CONTROLLER: 2, Role.WORKER: 1}
GIB = 1 << 30
DEFAULT_SIZES: Mapping[Role, ContainerSize] = {
    Role.API: ContainerSize(cpu=1, memory_bytes=1 * GIB),
    Role.GATEWAY: ContainerSize(cpu=2, memory_bytes=1 * GIB),
    Role.CONTROLLER: ContainerSize(cpu=0.5, memory_bytes=1 * GIB),
    # A build smoke-loads and benchmarks the model in the worker's pod.
    Role.WORKER: ContainerSize(cpu=2, memory_bytes=8 * GIB),
}
# emptyDir limits of the data directory: the controller and the workers keep artifacts there.
DEFAULT_DATA_SIZES: Mapping[Role, str] = {
    Role.API: "1Gi",
    Role.GATEWAY: "2Gi",  # the usage spool (gateway.usage_spool_max_bytes) while the database is away
    Role.CONTROLLER: "100Gi",
    Role.WORKER: "100Gi",
}
# The Secret the operator creates: key -> the setting it fills (and whether a pod needs it).
SECRET_KEYS: Mapping[str, tuple[str, bool]] = {
    "database-url": ("CONVERGE_DATABASE_URL", True),
    "auth-secret-key": ("CONVERGE_AUTH__SECRET_KEY", True),
    "bootstrap-token": ("CONVERGE_BOOTSTRAP_TOKEN", False),  # the first admin key, if you choose it
}

# --- RBAC ---------------------------------------------------------------------------------------

READ = ("get", "list", "watch")
# Server-side apply is a PATCH, which creates what does not exist yet; pruning lists and deletes.
APPLIED = ("create", "patch")
APPLIED_PRUNED = ("get", "list", "create", "patch", "delete")
APPLIED_PRUNED_WATCHED = ("get", "list", "watch", "create", "patch", "delete")
KSERVE = "serving.kserve.io"
CONVERGE = "converge.dev"


@dataclass(frozen=True, kw_only=True)
class Rule:
    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str  # what needs it; kept out of the object, for the reader and the release notes

    def manifest(self) -> Manifest:
        return {"apiGroups": [self.group], "resources": list(self.resources), "verbs": list(self.verbs)}


CONTROLLER_RULES: tuple[Rule, ...] = (
    Rule(
        group="",
        resources=("namespaces",),
        verbs=("get", "list", "create", "patch"),
        why="a project's namespace (never deleted); Model objects go to the ones that exist",
    ),
    Rule(group="", resources=("nodes",), verbs=READ, why="zones and their capacity"),
    Rule(group="", resources=("pods",), verbs=READ, why="replicas: phases, readiness, restarts"),
    Rule(group="", resources=("pods/log",), verbs=("get",), why="a replica's logs"),
    Rule(
        group="",
        resources=("services", "resourcequotas", "limitranges", "persistentvolumeclaims"),
        verbs=APPLIED_PRUNED,
        why="a workload's Service; a project's quota, container defaults and artifact-cache claim",
    ),
    Rule(
        group="apps", resources=("deployments",), verbs=APPLIED_PRUNED_WATCHED, why="workloads without KServe"
    ),
    Rule(
        group="autoscaling",
        resources=("horizontalpodautoscalers",),
        verbs=APPLIED_PRUNED,
        why="autoscaled workloads without KServe",
    ),
    Rule(group="policy", resources=("poddisruptionbudgets",), verbs=APPLIED_PRUNED, why="workloads' budgets"),
    Rule(
        group="networking.k8s.io",
        resources=("networkpolicies",),
        verbs=APPLIED_PRUNED,
        why="a project's default-deny and allow rules",
    ),
    Rule(
        group="scheduling.k8s.io",
        resources=("priorityclasses",),
        verbs=APPLIED,
        why="production > builds > development (never deleted)",
    ),
    Rule(group="batch", resources=("jobs",), verbs=APPLIED_PRUNED_WATCHED, why="builds as Jobs"),
    Rule(
        group=KSERVE,
        resources=("inferenceservices",),
        # list also tells whether KServe is installed (a 404 says no), so no CRD access is needed
        verbs=APPLIED_PRUNED_WATCHED,
        why="workloads with KServe",
    ),
    Rule(group=KSERVE, resources=("servingruntimes",), verbs=APPLIED_PRUNED, why="a project's runtimes"),
    Rule(group=CONVERGE, resources=("models",), verbs=APPLIED_PRUNED_WATCHED, why="approved versions"),
    Rule(group=CONVERGE, resources=("ragmodels",), verbs=READ, why="RAG models users apply"),
    Rule(group=CONVERGE, resources=("ragmodels/status",), verbs=("get", "patch"), why="why one was refused"),
)
API_RULES: tuple[Rule, ...] = (
    Rule(group="", resources=("nodes",), verbs=READ, why="GET /deployments/zones, admission's zones"),
    Rule(group="", resources=("pods",), verbs=READ, why="a deployment's replicas"),
    Rule(group="", resources=("pods/log",), verbs=("get",), why="GET /deployments/{id}/logs"),
    Rule(group="apps", resources=("deployments",), verbs=READ, why="a workload's rollout status"),
    Rule(group=KSERVE, resources=("inferenceservices",), verbs=READ, why="a workload's Ready condition"),
)
RULES: Mapping[Role, tuple[Rule, ...]] = {
    Role.API: API_RULES,
    Role.GATEWAY: (),
    Role.CONTROLLER: CONTROLLER_RULES,
    Role.WORKER: (),
}


# --- the spec -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PlatformSpec:
    """What `render_platform` needs; every field has a default that suits a first install."""

    cluster: ClusterProfile = ClusterProfile()  # system_namespace, the pods' user, the labels admitted
    image: str | None = None  # None: the release's image (`cluster.images.converge`)
    replicas: Mapping[Role, int] = field(default_factory=dict)  # a role left out: DEFAULT_REPLICAS
    sizes: Mapping[Role, ContainerSize] = field(default_factory=dict)  # left out: DEFAULT_SIZES
    secret: str = "converge"  # the Secret with SECRET_KEYS, created by the operator
    config: str = "converge"  # the ConfigMap rendered here
    settings: Mapping[str, str] = field(default_factory=dict)  # more CONVERGE_* entries for it

    def __post_init__(self) -> None:
        for role, count in self.replicas.items():
            if count < 0:
                raise ValueError(f"Replicas of {role.value} must not be negative, got {count}")
        for what, name in (
            ("Namespace", self.namespace),
            ("Secret", self.secret),
            ("ConfigMap", self.config),
        ):
            if len(name) > 63 or not _DNS1123_LABEL.fullmatch(name):
                raise ValueError(f"{what} name {name!r} is not a DNS label (a-z, 0-9, '-', 1-63 characters)")
        for key in self.settings:
            if not key.startswith("CONVERGE_"):
                raise ValueError(f"Setting {key!r} is not a Converge setting (CONVERGE_...)")

    @property
    def namespace(self) -> str:
        return self.cluster.system_namespace

    @property
    def converge_image(self) -> str:
        return self.image or self.cluster.images.converge

    def replicas_of(self, role: Role) -> int:
        return self.replicas.get(role, DEFAULT_REPLICAS[role])

    def size_of(self, role: Role) -> ContainerSize:
        return self.sizes.get(role, DEFAULT_SIZES[role])


# --- rendering ----------------------------------------------------------------------------------


def render_platform(spec: PlatformSpec, *, crds: Sequence[Manifest] | None = None) -> list[Manifest]:
    """Everything, in the order `kubectl apply` needs: CRDs and the namespace before what uses them.
    `crds`: None reads Converge's own (`crd_manifests`)."""
    objects: list[Manifest] = [dict(crd) for crd in (crd_manifests() if crds is None else crds)]
    objects.append(_namespace(spec))
    objects.extend(_service_account(spec, role) for role in Role)
    for role in Role:
        if RULES[role]:
            objects.extend(_cluster_rbac(spec, role))
    objects.append(_config_map(spec))
    objects.extend(_service(spec, role) for role in (Role.API, Role.GATEWAY))
    objects.extend(_deployment(spec, role) for role in Role)
    objects.extend(_disruption_budget(spec, role) for role in Role)
    objects.extend(_network_policies(spec))
    return objects


def crd_manifests() -> list[Manifest]:
    """Converge's CRDs: the YAML files in this package's crds/ (package data, so a wheel has them;
    `deploy/crds` in the repository links there)."""
    files = sorted((Path(__file__).resolve().parent / "crds").glob("*.yaml"))
    if not files:
        raise FileNotFoundError("Converge's CRDs are missing from the package (reinstall converge)")
    return [
        doc
        for file in files
        for doc in yaml.safe_load_all(file.read_text(encoding="utf-8"))
        if doc is not None
    ]


def base_labels() -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "converge",
        "app.kubernetes.io/instance": INSTANCE,
        "app.kubernetes.io/part-of": "converge",
        "app.kubernetes.io/version": label_value(__version__),
    }


def selector(role: Role) -> dict[str, str]:
    # Never changes across releases: a Deployment's selector is immutable.
    return {"app.kubernetes.io/instance": INSTANCE, ROLE_LABEL: role.value}


def pod_labels(spec: PlatformSpec, role: Role) -> dict[str, str]:
    """A role's labels, including what project namespaces admit (`ClusterProfile.*_pods`)."""
    admitted: Mapping[str, str] = {
        Role.GATEWAY: spec.cluster.gateway_pods,
        Role.CONTROLLER: spec.cluster.controller_pods,
        Role.API: spec.cluster.api_pods,
        Role.WORKER: spec.cluster.worker_pods,
    }.get(role, {})
    labels = {**base_labels(), "app.kubernetes.io/component": role.value, **admitted, **selector(role)}
    clash = {k for k, v in admitted.items() if labels[k] != v}
    if clash:
        raise ValueError(f"The {role.value} pods' admitted labels {sorted(clash)} clash with its selector")
    return labels


def object_name(role: Role) -> str:
    return f"converge-{role.value}"


def cluster_object_name(spec: PlatformSpec, role: Role) -> str:
    # Cluster-wide names carry the namespace: two installations do not share a ClusterRole.
    return f"{spec.namespace}-{role.value}"


def _meta(spec: PlatformSpec, name: str, *, role: Role | None = None, namespaced: bool = True) -> Manifest:
    labels = base_labels() if role is None else pod_labels(spec, role)
    return metadata(name, namespace=spec.namespace if namespaced else None, labels=labels)


def _namespace(spec: PlatformSpec) -> Manifest:
    security = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/audit": "restricted",
    }
    meta = metadata(spec.namespace, namespace=None, labels={**base_labels(), **security})
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def _service_account(spec: PlatformSpec, role: Role) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(spec, object_name(role), role=role),
        # Only a role with rules gets a token; the pod spec says the same (`_pod`).
        "automountServiceAccountToken": bool(RULES[role]),
    }


def _cluster_rbac(spec: PlatformSpec, role: Role) -> list[Manifest]:
    """A ClusterRole and its binding: project namespaces come and go, so a Role per namespace
    could not be granted ahead of them."""
    name = cluster_object_name(spec, role)
    cluster_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(spec, name, role=role, namespaced=False),
        "rules": [rule.manifest() for rule in RULES[role]],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(spec, name, role=role, namespaced=False),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": object_name(role), "namespace": spec.namespace}],
    }
    return [cluster_role, binding]


def platform_settings(spec: PlatformSpec) -> dict[str, str]:
    """The ConfigMap's entries: what every role shares (the secrets are in the Secret)."""
    values = {
        "CONVERGE_ENV": "production",
        "CONVERGE_HOST": "0.0.0.0",
        "CONVERGE_PORT": str(HTTP_PORT),
        "CONVERGE_DATA_DIR": DATA_DIR,
        "CONVERGE_RUNTIME__BACKEND": "kubernetes",
        "CONVERGE_RUNTIME__KUBERNETES__SYSTEM_NAMESPACE": spec.namespace,
        "CONVERGE_RUNTIME__KUBERNETES__NAMESPACE_PREFIX": spec.cluster.namespace_prefix,
        # The pod is the sandbox (non-root, no capabilities): it cannot switch to another user.
        "CONVERGE_SANDBOX__ENABLED": "false",
        **spec.settings,
    }
    return dict(sorted(values.items()))


def _config_map(spec: PlatformSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec, spec.config),
        "data": platform_settings(spec),
    }


def _service(spec: PlatformSpec, role: Role) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec, object_name(role), role=role),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(role),
            "ports": [
                {
                    "name": pods.PORT_NAME,
                    "port": SERVICE_PORT,
                    "targetPort": pods.PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _deployment(spec: PlatformSpec, role: Role) -> Manifest:
    replicas = spec.replicas_of(role)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec, object_name(role), role=role),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector(role)},
            # A new replica is ready before an old one goes (a controller's new replica stands by).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": pod_labels(spec, role),
                    "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER},
                },
                "spec": _pod(spec, role, replicas=replicas),
            },
        },
    }


def _pod(spec: PlatformSpec, role: Role, *, replicas: int) -> Manifest:
    pod: Manifest = {
        "serviceAccountName": object_name(role),
        "automountServiceAccountToken": bool(RULES[role]),
        "securityContext": pods.pod_security(spec.cluster),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "containers": [_container(spec, role)],
        "volumes": [
            {"name": pods.TMP_VOLUME, "emptyDir": {"sizeLimit": pods.TMP_SIZE}},
            {"name": DATA_VOLUME, "emptyDir": {"sizeLimit": DEFAULT_DATA_SIZES[role]}},
        ],
    }
    if replicas > 1:  # over zones and nodes where it can: one zone's outage leaves the others
        pod["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector(role)},
                "matchLabelKeys": ["pod-template-hash"],
            }
            for key in (pods.ZONE_LABEL, pods.HOSTNAME_LABEL)
        ]
    return pod


def _container(spec: PlatformSpec, role: Role) -> Manifest:
    secrets = [
        {
            "name": setting,
            "valueFrom": {"secretKeyRef": {"name": spec.secret, "key": key, "optional": not required}},
        }
        for key, (setting, required) in SECRET_KEYS.items()
    ]
    return {
        "name": CONTAINER,
        "image": spec.converge_image,
        "command": ["converge"],
        "args": ["serve", role.value],
        "ports": [{"name": pods.PORT_NAME, "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": spec.config}}],
        "env": [{"name": "HOME", "value": pods.TMP_DIR}, *secrets],
        "resources": pods.sized(spec.size_of(role)),
        "startupProbe": _probe("/health", period_s=5, timeout_s=3, failures=STARTUP_BUDGET_S // 5),
        "livenessProbe": _probe("/health", period_s=10, timeout_s=5, failures=3),
        # /readiness: the database answers, migrations are at head, the role's services run.
        "readinessProbe": _probe("/readiness", period_s=5, timeout_s=3, failures=3),
        "securityContext": pods.container_security(),
        "volumeMounts": [
            {"name": pods.TMP_VOLUME, "mountPath": pods.TMP_DIR},
            {"name": DATA_VOLUME, "mountPath": DATA_DIR},
        ],
    }


def _probe(path: str, *, period_s: int, timeout_s: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": pods.PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failures,
    }


def _disruption_budget(spec: PlatformSpec, role: Role) -> Manifest:
    # One replica at a time, at any size (also once scaled up by hand); a replica that never got
    # ready may always be evicted, so a crash-looping one does not block a node's drain.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(spec, object_name(role), role=role),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(role)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _network_policies(spec: PlatformSpec) -> list[Manifest]:
    """Ingress only: nothing reaches a Converge pod but clients of the API and the gateway (from
    anywhere: they authenticate every request). Egress stays open: the database, the object
    store and the Kubernetes API are wherever the operator has them."""

    def policy(name: str, policy_spec: Manifest) -> Manifest:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(spec, name),
            "spec": policy_spec,
        }

    out = [policy("converge-default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    for role in (Role.API, Role.GATEWAY):
        out.append(
            policy(
                f"converge-allow-{role.value}",
                {
                    "podSelector": {"matchLabels": selector(role)},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"ports": [{"protocol": "TCP", "port": HTTP_PORT}]}],
                },
            )
        )
    return out
