"""The only module that talks to the Kubernetes API (lightkube's async client).

- `KubeClient.apply`: server-side apply of a rendered object as field manager "converge",
  forced (Converge owns what it renders; a person's `kubectl edit` of those fields is undone).
- `KubeClient.prune`: deletes objects Converge applied that are no longer desired, chosen by
  Converge's labels, and only those that carry the labels, were applied by Converge's field
  manager and are controlled by no other object (KServe copies labels onto what it creates).
- `Informer`: list, then watch from the list's resourceVersion with bookmarks; a 410 Gone
  (history compacted) or any lost watch lists again, so deletions in the gap are not missed.
- Every request is retried with backoff on 409, 429 (honouring Retry-After), 5xx and lost
  connections; what still fails is raised as `TransientApiError` for the caller to show as a
  condition and retry later, or as `ApiRejected` when retrying the same request cannot help.

Configuration: an explicit base URL (no credentials), a kubeconfig file, or the environment
(in-cluster service account first, then $KUBECONFIG, then ~/.kube/config).
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2
import structlog
from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig, SingleConfig
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.models import Cluster, User
from lightkube.core.client import LabelValue
from lightkube.core.resource import ApiInfo, NamespacedResource
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericGlobalStatus,
    GenericNamespacedResource,
    GenericNamespacedStatus,
    create_api_info,
)
from lightkube.operators import Operator, not_exists
from lightkube.types import CascadeType, PatchType

from converge.runtime.kubernetes.config import KubernetesConfig
from converge.runtime.kubernetes.model_cr import MANAGED_BY

log = structlog.get_logger(__name__)

Manifest = dict[str, Any]
LabelSelector = Mapping[str, str | Operator[Any] | None]  # None: the label exists
T = TypeVar("T")

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"

# The kinds Converge reads and writes: (apiVersion, kind) -> (plural, namespaced). Every one is
# a lightkube generic resource (a dict): lightkube's typed models refuse objects a real server
# sends, such as a watch's BOOKMARK, whose object holds only metadata (and `spec: {containers:
# null}` for a Pod), and this client deals in the plain dicts the renderers produce anyway. They
# are not put in lightkube's global registry, which other users of lightkube may share.
KINDS: Mapping[tuple[str, str], tuple[str, bool]] = {
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Node"): ("nodes", False),
    ("v1", "Pod"): ("pods", True),
    ("v1", "Service"): ("services", True),
    ("v1", "ResourceQuota"): ("resourcequotas", True),
    ("v1", "LimitRange"): ("limitranges", True),
    ("v1", "PersistentVolumeClaim"): ("persistentvolumeclaims", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", True),
    ("scheduling.k8s.io/v1", "PriorityClass"): ("priorityclasses", False),
    ("batch/v1", "Job"): ("jobs", True),
    ("serving.kserve.io/v1beta1", "InferenceService"): ("inferenceservices", True),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): ("servingruntimes", True),
    ("converge.dev/v1alpha1", "Model"): ("models", True),
    ("converge.dev/v1alpha1", "RAGModel"): ("ragmodels", True),
}


# --- errors -------------------------------------------------------------------------------------


class KubeError(Exception):
    """A request the API did not carry out; `reason` names why in a condition's words."""

    def __init__(
        self, message: str, *, reason: str, code: int | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.message, self.reason, self.code, self.retry_after = message, reason, code, retry_after


class TransientApiError(KubeError):
    """Unreachable, overloaded, throttled or conflicting: the same request may succeed later."""


class ApiRejected(KubeError):
    """A 4xx such as 403 Forbidden or 422 Invalid: sending the same again will not help."""


def classify(exc: Exception, *, what: str) -> KubeError:
    if isinstance(exc, KubeError):
        return exc
    code: int | None = None
    reason, detail, retry_after = "", str(exc) or type(exc).__name__, None
    if isinstance(exc, ApiError):
        status = exc.status
        code, reason, detail = status.code, status.reason or "", status.message or detail
        if status.details is not None and status.details.retryAfterSeconds:
            retry_after = float(status.details.retryAfterSeconds)
    response: httpx2.Response | None = exc.response if isinstance(exc, httpx2.HTTPStatusError) else None
    if response is not None:  # an ApiError from a watch's ERROR event has none
        code = code or response.status_code
        header = response.headers.get("Retry-After")
        if retry_after is None and header and header.isdigit():
            retry_after = float(header)
        if detail == str(exc) and not isinstance(exc, ApiError):
            detail = f"HTTP {code}"
    if code is None:  # no answer: refused, reset, timed out, cut mid-stream
        return TransientApiError(f"{what}: Kubernetes API unreachable ({detail})", reason="ApiUnavailable")
    message = f"{what}: {code} {reason} {detail}".replace("  ", " ")
    if code == 409:
        return TransientApiError(message, reason="ApiConflict", code=code)
    if code == 429:
        return TransientApiError(message, reason="ApiThrottled", code=code, retry_after=retry_after)
    if code == 410:
        return TransientApiError(message, reason="Expired", code=code)
    if code >= 500:
        return TransientApiError(message, reason="ApiUnavailable", code=code, retry_after=retry_after)
    return ApiRejected(message, reason="ApiRejected", code=code)


@dataclass(frozen=True, kw_only=True)
class Backoff:
    initial_s: float
    max_s: float

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float:
        """Exponential with jitter, at least what the server asked for (Retry-After)."""
        base = min(self.max_s, self.initial_s * 2.0 ** max(0, attempt - 1))
        delay = base * random.uniform(0.5, 1.0)
        return max(delay, min(retry_after or 0.0, self.max_s))


# --- objects ----------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, kw_only=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str | None
    name: str

    @classmethod
    def of(
        cls, obj: Mapping[str, Any], *, api_version: str | None = None, kind: str | None = None
    ) -> ObjectRef:
        meta = obj["metadata"]
        return cls(
            api_version=api_version or obj["apiVersion"],
            kind=kind or obj["kind"],
            namespace=meta.get("namespace"),
            name=meta["name"],
        )

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


@functools.cache
def resource(api_version: str, kind: str) -> Any:
    """The lightkube resource class for a kind in `KINDS`."""
    known = KINDS.get((api_version, kind))
    if known is None:
        raise ApiRejected(
            f"{kind} ({api_version}) is not one of the kinds Converge manages", reason="UnknownKind"
        )
    plural, namespaced = known
    group, _, version = api_version.rpartition("/")
    base = GenericNamespacedResource if namespaced else GenericGlobalResource
    return type(kind, (base,), {"_api_info": create_api_info(group, version, kind, plural)})


@functools.cache
def status_resource(api_version: str, kind: str) -> Any:
    """The lightkube class for the status subresource (`.../{name}/status`) of a kind in `KINDS`."""
    main = resource(api_version, kind)
    info: ApiInfo = main._api_info
    base = GenericNamespacedStatus if _namespaced(main) else GenericGlobalStatus
    sub = ApiInfo(
        resource=info.resource,
        parent=info.resource,
        plural=info.plural,
        verbs=["get", "patch", "put"],
        action="status",
    )
    return type(f"{kind}Status", (base,), {"_api_info": sub})


def _namespaced(res: Any) -> bool:
    return isinstance(res, type) and issubclass(res, NamespacedResource)


def _dict(obj: Any) -> Manifest:
    out: Manifest = obj.to_dict()
    return out


# --- connection -----------------------------------------------------------------------------


class _WatchBookmarks(httpx2.AsyncBaseTransport):
    """Asks every watch for BOOKMARK events (lightkube's `watch` has no parameter for it): they
    carry the resourceVersion forward while nothing changes, so a re-watch is rarely too old."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        params = request.url.params
        if params.get("watch") in ("true", "1") and "allowWatchBookmarks" not in params:
            request.url = request.url.copy_add_param("allowWatchBookmarks", "true")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def load_config(config: KubernetesConfig) -> SingleConfig:
    if config.base_url is not None:
        kube = KubeConfig.from_one(cluster=Cluster(server=config.base_url), user=User())
    elif config.kubeconfig is not None:
        kube = KubeConfig.from_file(config.kubeconfig)
    else:
        kube = KubeConfig.from_env()
    single = kube.get(config.context)
    assert single is not None  # get() raises rather than return None without a default
    return single


def connect(config: KubernetesConfig) -> AsyncClient:
    single = load_config(config)
    # The transport must carry the cluster's TLS settings itself: httpx ignores `verify` once
    # a transport is given. verify_cluster is what lightkube would have used.
    tls = verify_cluster(single.cluster, single.user or User(), single.abs_file)
    transport = _WatchBookmarks(httpx2.AsyncHTTPTransport(verify=tls))
    return AsyncClient(
        single,
        timeout=httpx2.Timeout(config.request_timeout_s),
        field_manager=config.field_manager,
        transport=transport,
    )


# --- the client -------------------------------------------------------------------------------


class KubeClient:
    def __init__(self, config: KubernetesConfig, *, api: AsyncClient | None = None) -> None:
        self.config = config
        self.field_manager = config.field_manager
        self.backoff = Backoff(initial_s=config.backoff_initial_s, max_s=config.backoff_max_s)
        self._api = api or connect(config)

    async def close(self) -> None:
        await self._api.close()

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except (httpx2.HTTPError, KubeError) as exc:
                error = classify(exc, what=what)
                if not isinstance(error, TransientApiError) or attempt >= self.config.request_attempts:
                    raise error from exc
                delay = self.backoff.delay(attempt, retry_after=error.retry_after)
                log.info("kubernetes_retry", what=what, reason=error.reason, attempt=attempt, delay_s=delay)
                await asyncio.sleep(delay)

    # -- writes ----------------------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> Manifest:
        """Server-side apply, forced, as the field manager: the object as the server has it."""
        ref = ObjectRef.of(manifest)
        res = resource(ref.api_version, ref.kind)

        async def call() -> Manifest:
            # The rendered dict is the body as it is (no round trip through lightkube's models).
            if _namespaced(res):
                applied = await self._api.patch(
                    res,
                    ref.name,
                    manifest,
                    namespace=ref.namespace,
                    patch_type=PatchType.APPLY,
                    field_manager=self.field_manager,
                    force=True,
                )
            else:
                applied = await self._api.patch(
                    res,
                    ref.name,
                    manifest,
                    patch_type=PatchType.APPLY,
                    field_manager=self.field_manager,
                    force=True,
                )
            return _dict(applied)

        return await self._retrying(f"apply {ref}", call)

    async def apply_status(self, manifest: Manifest) -> Manifest:
        """Server-side apply of `manifest["status"]` on the status subresource, forced, as the
        field manager: a server ignores `status` in an apply to the main resource of a kind that
        has the subresource, and `spec` in one to `/status`. Only the fields given are claimed
        (a list-map such as `conditions` keeps the entries other managers own)."""
        ref = ObjectRef.of(manifest)
        res = status_resource(ref.api_version, ref.kind)
        meta = {"name": ref.name, **({"namespace": ref.namespace} if ref.namespace else {})}
        body = {
            "apiVersion": ref.api_version,
            "kind": ref.kind,
            "metadata": meta,
            "status": manifest.get("status", {}),
        }

        async def call() -> Manifest:
            applied = await self._api.patch(
                res,
                ref.name,
                body,
                namespace=ref.namespace,
                patch_type=PatchType.APPLY,
                field_manager=self.field_manager,
                force=True,
            )
            return _dict(applied)

        return await self._retrying(f"apply status of {ref}", call)

    async def apply_all(self, manifests: Sequence[Manifest]) -> list[Manifest]:
        """In order: a namespace before what lives in it, a ServingRuntime before its users."""
        return [await self.apply(m) for m in manifests]

    async def delete(self, ref: ObjectRef) -> bool:
        """Delete with background propagation (what it owns goes too); False if already gone."""
        res = resource(ref.api_version, ref.kind)

        async def call() -> bool:
            try:
                if _namespaced(res):
                    await self._api.delete(
                        res, ref.name, namespace=ref.namespace, cascade=CascadeType.BACKGROUND
                    )
                else:
                    await self._api.delete(res, ref.name, cascade=CascadeType.BACKGROUND)
            except ApiError as exc:
                if exc.status.code == 404:
                    return False
                raise
            return True

        return await self._retrying(f"delete {ref}", call)

    # -- reads -----------------------------------------------------------------------------

    async def list_objects(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        labels: LabelSelector | None = None,
    ) -> tuple[list[Manifest], str]:
        """Objects of a kind (in every namespace unless `namespace`), and the list's resourceVersion."""
        res = resource(api_version, kind)
        selector: dict[str, LabelValue] | None = dict(labels) if labels else None

        async def call() -> tuple[list[Manifest], str]:
            if _namespaced(res):
                listed = self._api.list(res, namespace=namespace or ALL_NS, labels=selector)
            else:
                listed = self._api.list(res, labels=selector)
            items = [self._complete(_dict(obj), api_version=api_version, kind=kind) async for obj in listed]
            return items, listed.resourceVersion

        return await self._retrying(f"list {kind}", call)

    @staticmethod
    def _complete(obj: Manifest, *, api_version: str, kind: str) -> Manifest:
        # A list's items carry no apiVersion and kind of their own.
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        return obj

    async def served(self, api_version: str, kind: str) -> bool:
        """Whether the API serves the kind (KServe installed or not): a 404 for its list says no."""
        res = resource(api_version, kind)

        async def call() -> bool:
            try:
                async for _ in self._api.list(res, namespace=ALL_NS, chunk_size=1):
                    break
            except ApiError as exc:
                if exc.status.code == 404:
                    return False
                raise
            return True

        return await self._retrying(f"discover {kind}", call)

    async def watch(
        self,
        api_version: str,
        kind: str,
        *,
        labels: LabelSelector | None,
        resource_version: str,
    ) -> AsyncIterator[tuple[str, Manifest]]:
        """Events from `resource_version` on, in every namespace; BOOKMARKs included. Raises
        (classified) when the watch ends in an error; lightkube watches again after a clean end."""
        res = resource(api_version, kind)
        selector: dict[str, LabelValue] | None = dict(labels) if labels else None
        timeout = self.config.watch_timeout_s
        if _namespaced(res):
            events = self._api.watch(
                res,
                namespace=ALL_NS,
                labels=selector,
                resource_version=resource_version,
                server_timeout=timeout,
            )
        else:
            events = self._api.watch(
                res, labels=selector, resource_version=resource_version, server_timeout=timeout
            )
        try:
            async for event_type, obj in events:
                yield event_type, self._complete(_dict(obj), api_version=api_version, kind=kind)
        except (httpx2.HTTPError, KubeError) as exc:
            raise classify(exc, what=f"watch {kind}") from exc

    async def logs(
        self, *, namespace: str, pod: str, container: str, tail: int, follow: bool
    ) -> AsyncIterator[str]:
        try:
            lines = self._api.log(
                pod, namespace=namespace, container=container, tail_lines=tail, follow=follow, newlines=False
            )
            async for line in lines:
                yield line
        except httpx2.HTTPError as exc:
            raise classify(exc, what=f"logs of pod {namespace}/{pod}") from exc

    # -- pruning ---------------------------------------------------------------------------

    def owns(self, obj: Manifest, *, labels: Mapping[str, str]) -> bool:
        """Converge's to delete: it carries Converge's labels (`labels` exactly), Converge's
        field manager applied it, and no other object controls it."""
        meta = obj.get("metadata", {})
        have = meta.get("labels") or {}
        if have.get(MANAGED_BY_LABEL) != MANAGED_BY or any(have.get(k) != v for k, v in labels.items()):
            return False
        applied = any(
            f.get("manager") == self.field_manager and f.get("operation") == "Apply"
            for f in meta.get("managedFields") or []
        )
        controlled = any(ref.get("controller") for ref in meta.get("ownerReferences") or [])
        return applied and not controlled

    async def prune(
        self,
        *,
        kinds: Sequence[tuple[str, str]],
        labels: Mapping[str, str],
        keep: Collection[ObjectRef],
        namespace: str | None = None,
        absent: Sequence[str] = (),
    ) -> list[ObjectRef]:
        """Delete the objects of `kinds` that Converge owns with `labels` and that are not in
        `keep` (`absent`: labels the objects must not have). Kinds the API does not serve are
        skipped. Returns what was deleted."""
        selector: dict[str, str | Operator[Any] | None] = {MANAGED_BY_LABEL: MANAGED_BY, **labels}
        for label in absent:
            selector[label] = not_exists()
        pruned: list[ObjectRef] = []
        for api_version, kind in kinds:
            try:
                items, _ = await self.list_objects(api_version, kind, namespace=namespace, labels=selector)
            except ApiRejected as exc:
                if exc.code == 404:
                    continue  # not served here (e.g. KServe is not installed)
                raise
            for obj in items:
                ref = ObjectRef.of(obj, api_version=api_version, kind=kind)
                carries_absent = any(a in (obj["metadata"].get("labels") or {}) for a in absent)
                if ref in keep or carries_absent or not self.owns(obj, labels=labels):
                    continue
                if await self.delete(ref):
                    log.info("kubernetes_pruned", object=str(ref))
                    pruned.append(ref)
        return pruned


# --- informers ------------------------------------------------------------------------------


class Informer:
    """A local copy of the objects of one kind that match a selector, kept by list + watch.

    `items` maps (namespace, name) to the object; `synced` is set after the first list;
    `error` holds why the copy may be stale (None while the watch is healthy).
    """

    def __init__(
        self,
        client: KubeClient,
        *,
        api_version: str,
        kind: str,
        labels: LabelSelector | None = None,
    ) -> None:
        self.client, self.api_version, self.kind, self.labels = client, api_version, kind, labels
        self.items: dict[tuple[str, str], Manifest] = {}
        self.synced = asyncio.Event()
        self.error: KubeError | None = None
        self.lists = 0  # how often it listed (1 + re-lists)
        self.resource_version: str | None = None
        self._changed = asyncio.Event()

    @staticmethod
    def key(obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj["metadata"]
        return meta.get("namespace") or "", meta["name"]

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._list()
                attempt = 0
                await self._watch()
            except KubeError as exc:
                if exc.reason == "Expired":  # 410: the history is gone, list again at once
                    log.info("kubernetes_watch_expired", kind=self.kind)
                    continue
                attempt += 1
                self.error = exc
                log.warning("kubernetes_watch_failed", kind=self.kind, reason=exc.reason, error=exc.message)
            except Exception as exc:  # an object that does not decode, a bug: keep watching
                attempt += 1
                self.error = KubeError(
                    f"watch {self.kind}: {type(exc).__name__}: {exc}", reason="WatchFailed"
                )
                log.exception("kubernetes_watch_crashed", kind=self.kind)
            retry_after = self.error.retry_after if self.error is not None else None
            await asyncio.sleep(self.client.backoff.delay(max(attempt, 1), retry_after=retry_after))

    async def _list(self) -> None:
        items, rv = await self.client.list_objects(self.api_version, self.kind, labels=self.labels)
        self.items = {self.key(obj): obj for obj in items}
        self.resource_version, self.error = rv, None
        self.lists += 1
        self.synced.set()
        self._notify()

    async def _watch(self) -> None:
        assert self.resource_version is not None
        events = self.client.watch(
            self.api_version, self.kind, labels=self.labels, resource_version=self.resource_version
        )
        async for event_type, obj in events:
            self.error = None
            self.resource_version = obj.get("metadata", {}).get("resourceVersion") or self.resource_version
            if event_type == "BOOKMARK":
                continue
            if event_type == "DELETED":
                self.items.pop(self.key(obj), None)
            elif event_type in ("ADDED", "MODIFIED"):
                self.items[self.key(obj)] = obj
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Returns after the next change to `items`."""
        await self._changed.wait()
