"""The rules the fake Kubernetes API (`fake_api.py`) applies to objects, as pure functions: the
kinds it serves, `Status` errors, label and field selectors, and the field paths, merge patch and
managed-fields rendering behind its server-side apply."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

Obj = dict[str, Any]
FieldPath = tuple[str, ...]
Key = tuple[str, str, str, str]  # (group, plural, namespace or "", name)
ManagerKey = tuple[str, str, str]  # (manager, "Apply" | "Update", subresource or "")

JSON = "application/json"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
BYPASS = "X-Fake-Bypass"  # requests from `Actor` (tests playing other parties) skip the faults
READ_ONLY_META = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
    "selfLink",
)


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True
    status: bool = True  # has a status subresource
    custom: bool = False  # served from a CRD

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if sub is not None:
            parts.append(sub)
        return "/".join(parts)


BUILTIN = (
    Kind("", "v1", "Namespace", "namespaces", namespaced=False),
    Kind("", "v1", "Node", "nodes", namespaced=False),
    Kind("", "v1", "Pod", "pods"),
    Kind("", "v1", "Service", "services"),
    Kind("", "v1", "ResourceQuota", "resourcequotas"),
    Kind("", "v1", "LimitRange", "limitranges", status=False),
    Kind("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    Kind("", "v1", "ConfigMap", "configmaps", status=False),
    Kind("apps", "v1", "Deployment", "deployments"),
    Kind("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    Kind("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", status=False),
    Kind("scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", namespaced=False, status=False),
    Kind("batch", "v1", "Job", "jobs"),
)
KSERVE = (
    Kind("serving.kserve.io", "v1beta1", "InferenceService", "inferenceservices", custom=True),
    Kind("serving.kserve.io", "v1alpha1", "ServingRuntime", "servingruntimes", custom=True),
)
CONVERGE = (
    Kind("converge.dev", "v1alpha1", "Model", "models", custom=True),
    Kind("converge.dev", "v1alpha1", "RAGModel", "ragmodels", custom=True),
)


class ApiFailure(Exception):
    """Answered as a `Status` object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: Obj | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details, self.headers = details, headers or {}

    def status(self) -> Obj:
        return status_object(self.code, self.reason, self.message, details=self.details)

    def response(self) -> web.Response:
        return json_response(self.code, self.status(), headers=self.headers)


def status_object(code: int, reason: str, message: str, *, details: Obj | None = None) -> Obj:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def json_response(code: int, body: Obj, *, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json", as an API server sends it (no charset parameter).
    return web.Response(
        status=code, body=json.dumps(body).encode(), headers={"Content-Type": JSON, **(headers or {})}
    )


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- selectors ------------------------------------------------------------------------------------

_SET_REQUIREMENT = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQUALITY = re.compile(r"^\s*([^\s!=(),]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


def _split_requirements(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def label_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for a label selector string (equality-, set-based and exists)."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_requirements(text or ""):
        if not part.strip():
            continue
        if m := _SET_REQUIREMENT.match(part):
            key, op, raw = m.groups()
            values = {v.strip() for v in raw.split(",")}
            if op == "in":
                checks.append(lambda labels, k=key, v=values: labels.get(k) in v)
            else:
                checks.append(lambda labels, k=key, v=values: labels.get(k) not in v)
        elif m := _EQUALITY.match(part):
            key, op, value = m.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := _EXISTS.match(part):
            negated, key = m.groups()
            if negated:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise ApiFailure(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return lambda labels: all(check(labels) for check in checks)


def field_selector(text: str | None) -> Callable[[Obj], bool]:
    checks: list[Callable[[Obj], bool]] = []
    for part in _split_requirements(text or ""):
        if not part.strip():
            continue
        m = _EQUALITY.match(part)
        if m is None or m.group(1) not in ("metadata.name", "metadata.namespace"):
            raise ApiFailure(400, "BadRequest", f'field label not supported: "{part}"')
        path, op, value = m.groups()
        attr = path.split(".")[1]
        if op == "!=":
            checks.append(lambda obj, a=attr, v=value: obj["metadata"].get(a) != v)
        else:
            checks.append(lambda obj, a=attr, v=value: obj["metadata"].get(a) == v)
    return lambda obj: all(check(obj) for check in checks)


# --- field paths (server-side apply) ----------------------------------------------------------


def leaf_paths(obj: Obj, prefix: FieldPath = ()) -> set[FieldPath]:
    """Every field `obj` sets; maps recurse, anything else (lists included) is one field."""
    out: set[FieldPath] = set()
    for key, value in obj.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            out |= leaf_paths(value, path)
        else:
            out.add(path)
    return out


_MISSING = object()


def get_path(obj: Any, path: FieldPath) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def set_path(obj: Obj, path: FieldPath, value: Any) -> None:
    for key in path[:-1]:
        child = obj.get(key)
        if not isinstance(child, dict):
            child = obj[key] = {}
        obj = child
    obj[path[-1]] = copy.deepcopy(value)


def remove_path(obj: Obj, path: FieldPath) -> None:
    parents: list[tuple[Obj, str]] = []
    node: Any = obj
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, key in reversed(parents):  # maps left empty go too (metadata stays)
        if parent[key] == {} and key != "metadata":
            del parent[key]


def overlaps(a: FieldPath, b: FieldPath) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def fields_v1(paths: Iterable[FieldPath]) -> Obj:
    tree: Obj = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def content(kind: Kind, body: Obj, *, subresource: str) -> Obj:
    """The fields a write to the main resource (or to /status) may change."""
    if subresource == "status":
        return {"status": copy.deepcopy(body.get("status", {}))}
    out = {k: copy.deepcopy(v) for k, v in body.items() if k not in ("apiVersion", "kind")}
    if kind.status:
        out.pop("status", None)
    meta = out.get("metadata")
    if isinstance(meta, dict):
        for key in (*READ_ONLY_META, "name", "namespace"):
            meta.pop(key, None)
        if not meta:
            out.pop("metadata")
    return out


def spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
