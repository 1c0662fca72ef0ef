"""The fake Kubernetes API's object store (`fake_api.py` serves it over HTTP): objects by
(group, resource, namespace, name), one growing resourceVersion, an event history for watches,
and the write semantics (create, server-side apply with managed fields, merge patch, replace,
delete with finalizers and cascading) that a real API server has."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fake_objects import (
    ApiFailure,
    FieldPath,
    Key,
    Kind,
    ManagerKey,
    Obj,
    content,
    field_selector,
    fields_v1,
    get_path,
    label_selector,
    leaf_paths,
    merge_patch,
    now,
    overlaps,
    remove_path,
    set_path,
    spec_part,
)


@dataclass
class Stored:
    kind: Kind
    obj: Obj
    managers: dict[ManagerKey, set[FieldPath]] = field(default_factory=dict)


@dataclass
class Event:
    rv: int
    type: str
    kind: Kind
    obj: Obj
    old: Obj | None


class Store:
    def __init__(self, kinds: dict[tuple[str, str, str], Kind], *, history: int) -> None:
        self.kinds = kinds
        self.objects: dict[Key, Stored] = {}
        self.rv = 1
        self.history: deque[Event] = deque(maxlen=history)
        self.compacted = 1  # a watch from an older resourceVersion is answered 410
        self.listeners: list[Callable[[Event], None]] = []

    # -- reads -----------------------------------------------------------------------------

    def stored(self, kind: Kind, namespace: str | None, name: str) -> Stored:
        stored = self.objects.get((kind.group, kind.plural, namespace or "", name))
        if stored is None:
            qualified = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
            raise ApiFailure(
                404,
                "NotFound",
                f'{qualified} "{name}" not found',
                details={"name": name, "group": kind.group, "kind": kind.plural},
            )
        return stored

    def matching(self, kind: Kind, namespace: str | None, query: Any) -> list[Obj]:
        labels = label_selector(query.get("labelSelector"))
        fields = field_selector(query.get("fieldSelector"))
        return [
            s.obj
            for key, s in sorted(self.objects.items())
            if s.kind == kind
            and (namespace is None or key[2] == namespace)
            and labels(s.obj["metadata"].get("labels") or {})
            and fields(s.obj)
        ]

    def collection(self, kind: Kind, namespace: str | None, query: Any) -> Obj:
        items = self.matching(kind, namespace, query)
        rv, start = self.rv, 0
        if token := query.get("continue"):
            state = json.loads(base64.urlsafe_b64decode(token))
            rv, start = state["rv"], state["start"]
            if rv < self.compacted:
                raise ApiFailure(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                )
        meta: Obj = {"resourceVersion": str(rv)}
        if limit := int(query.get("limit") or 0):
            page = items[start : start + limit]
            if start + limit < len(items):
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"rv": rv, "start": start + limit}).encode()
                ).decode()
            items = page
        else:
            items = items[start:]
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            "items": [self._as_item(kind, obj) for obj in items],
        }

    @staticmethod
    def _as_item(kind: Kind, obj: Obj) -> Obj:
        if kind.custom:
            return obj
        return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}

    # -- writes ----------------------------------------------------------------------------

    def _check_namespace(self, kind: Kind, namespace: str | None) -> None:
        if kind.namespaced and ("", "namespaces", "", namespace or "") not in self.objects:
            raise ApiFailure(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )

    def _check_identity(self, kind: Kind, namespace: str | None, name: str | None, body: Obj) -> None:
        if body.get("apiVersion") != kind.api_version or body.get("kind") != kind.kind:
            raise ApiFailure(
                400,
                "BadRequest",
                f"the object's apiVersion/kind ({body.get('apiVersion')}/{body.get('kind')}) do not match "
                f"the request's ({kind.api_version}/{kind.kind})",
            )
        meta = body.get("metadata") or {}
        if name is not None and meta.get("name") not in (None, name):
            raise ApiFailure(400, "BadRequest", "the name of the object does not match the name on the URL")
        if kind.namespaced and meta.get("namespace") not in (None, namespace):
            raise ApiFailure(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )

    def _new_object(self, kind: Kind, namespace: str | None, name: str) -> Obj:
        meta: Obj = {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": now(), "generation": 1}
        if kind.namespaced:
            meta["namespace"] = namespace
        return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta}

    def create(self, kind: Kind, namespace: str | None, body: Obj, *, manager: str) -> Obj:
        self._check_identity(kind, namespace, None, body)
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise ApiFailure(
                422, "Invalid", "metadata.name: Required value: name or generateName is required"
            )
        self._check_namespace(kind, namespace)
        key = (kind.group, kind.plural, namespace or "", name)
        if key in self.objects:
            raise ApiFailure(
                409, "AlreadyExists", f'{kind.plural} "{name}" already exists', details={"name": name}
            )
        obj = merge_patch(self._new_object(kind, namespace, name), content(kind, body, subresource=""))
        if kind.status and "status" in body:  # a create may set status; later writes go to /status
            obj["status"] = copy.deepcopy(body["status"])
        managers = {(manager, "Update", ""): leaf_paths(content(kind, body, subresource=""))}
        return self._commit(kind, key, old=None, new=obj, managers=managers)

    def apply(
        self, kind: Kind, namespace: str | None, name: str, body: Obj, *, manager: str, force: bool, sub: str
    ) -> tuple[int, Obj]:
        if not body.get("apiVersion") or not body.get("kind"):
            raise ApiFailure(400, "BadRequest", "apiVersion and kind must be set in an apply configuration")
        self._check_identity(kind, namespace, name, body)
        key = (kind.group, kind.plural, namespace or "", name)
        applied = content(kind, body, subresource=sub)
        wanted = leaf_paths(applied)
        me = (manager, "Apply", sub)
        stored = self.objects.get(key)
        if stored is None:
            if sub:
                self.stored(kind, namespace, name)  # 404
            self._check_namespace(kind, namespace)
            obj = merge_patch(self._new_object(kind, namespace, name), applied)
            return 201, self._commit(kind, key, old=None, new=obj, managers={me: wanted})
        obj, managers = copy.deepcopy(stored.obj), copy.deepcopy(stored.managers)
        conflicts = [
            (other, owned_path)
            for other, owned in managers.items()
            if other != me
            for owned_path in owned
            for path in wanted
            if overlaps(path, owned_path)
            and get_path(obj, min(path, owned_path, key=len))
            != get_path(applied, min(path, owned_path, key=len))
        ]
        if conflicts and not force:
            causes = [
                {
                    "type": "FieldManagerConflict",
                    "message": f'conflict with "{other[0]}"',
                    "field": "." + ".".join(path),
                }
                for other, path in conflicts
            ]
            raise ApiFailure(
                409,
                "Conflict",
                f"Apply failed with {len(conflicts)} conflict(s): "
                + "; ".join(f"{c['message']}: {c['field']}" for c in causes),
                details={"name": name, "kind": kind.plural, "causes": causes},
            )
        for other, owned_path in conflicts:  # forced: the fields change hands
            managers[other].discard(owned_path)
        for path in managers.get(me, set()) - wanted:
            if not any(path in owned for other, owned in managers.items() if other != me):
                remove_path(obj, path)
        for path in wanted:
            set_path(obj, path, get_path(applied, path))
        managers[me] = wanted
        return 200, self._update(kind, key, stored, obj, managers)

    def merge(
        self, kind: Kind, namespace: str | None, name: str, patch: Obj, *, manager: str, sub: str
    ) -> Obj:
        stored = self.stored(kind, namespace, name)
        changes = content(kind, patch, subresource=sub)
        obj = merge_patch(stored.obj, changes)
        return self._updated_by(kind, stored, obj, manager=manager, sub=sub, changed=leaf_paths(changes))

    def replace(
        self, kind: Kind, namespace: str | None, name: str, body: Obj, *, manager: str, sub: str
    ) -> Obj:
        self._check_identity(kind, namespace, name, body)
        stored = self.stored(kind, namespace, name)
        expected = (body.get("metadata") or {}).get("resourceVersion")
        if expected and expected != stored.obj["metadata"]["resourceVersion"]:
            raise ApiFailure(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.plural} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        new = content(kind, body, subresource=sub)
        obj = copy.deepcopy(stored.obj)
        if sub == "status":
            obj["status"] = new["status"]
        else:
            meta = obj["metadata"]
            obj = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], **new, "metadata": meta}
            if "status" in stored.obj and kind.status:
                obj["status"] = stored.obj["status"]
            for k in ("labels", "annotations", "finalizers", "ownerReferences"):
                meta.pop(k, None)
            meta.update(new.get("metadata", {}))
        return self._updated_by(kind, stored, obj, manager=manager, sub=sub, changed=leaf_paths(new))

    def _updated_by(
        self, kind: Kind, stored: Stored, obj: Obj, *, manager: str, sub: str, changed: set[FieldPath]
    ) -> Obj:
        """An Update operation owns the fields it set; other managers lose the ones it changed."""
        managers = copy.deepcopy(stored.managers)
        moved = {p for p in changed if get_path(obj, p) != get_path(stored.obj, p)}
        for owned in managers.values():
            owned -= {q for q in owned for p in moved if overlaps(p, q)}
        managers.setdefault((manager, "Update", sub), set()).update(changed)
        key = self._key_of(kind, stored.obj)
        return self._update(kind, key, stored, obj, managers)

    @staticmethod
    def _key_of(kind: Kind, obj: Obj) -> Key:
        meta = obj["metadata"]
        return (kind.group, kind.plural, meta.get("namespace") or "", meta["name"])

    def _update(
        self, kind: Kind, key: Key, stored: Stored, obj: Obj, managers: dict[ManagerKey, set[FieldPath]]
    ) -> Obj:
        managers = {m: owned for m, owned in managers.items() if owned}
        if obj == stored.obj and managers == stored.managers:
            return copy.deepcopy(stored.obj)  # nothing changed: no write, same resourceVersion
        if spec_part(obj) != spec_part(stored.obj):
            obj["metadata"]["generation"] = stored.obj["metadata"].get("generation", 1) + 1
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            gone = self._commit(kind, key, old=stored.obj, new=None, managers={})  # the last finalizer went
            self._cascade(stored)
            return gone
        return self._commit(kind, key, old=stored.obj, new=obj, managers=managers)

    def delete(self, kind: Kind, namespace: str | None, name: str) -> Obj:
        stored = self.stored(kind, namespace, name)
        key = (kind.group, kind.plural, namespace or "", name)
        meta = stored.obj["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return copy.deepcopy(stored.obj)
            obj = copy.deepcopy(stored.obj)
            obj["metadata"]["deletionTimestamp"] = now()
            return self._commit(kind, key, old=stored.obj, new=obj, managers=stored.managers)
        gone = self._commit(kind, key, old=stored.obj, new=None, managers={})
        self._cascade(stored)
        return gone

    def _cascade(self, owner: Stored) -> None:
        """Background propagation: what the owner owned goes, and a namespace takes its contents."""
        uid = owner.obj["metadata"]["uid"]
        is_namespace = owner.kind.kind == "Namespace"
        for key, stored in list(self.objects.items()):
            if key not in self.objects:
                continue
            refs = stored.obj["metadata"].get("ownerReferences") or []
            inside = is_namespace and stored.kind.namespaced and key[2] == owner.obj["metadata"]["name"]
            if inside or any(ref.get("uid") == uid for ref in refs):
                self.delete(stored.kind, key[2] or None, key[3])

    def _commit(
        self,
        kind: Kind,
        key: Key,
        *,
        old: Obj | None,
        new: Obj | None,
        managers: dict[ManagerKey, set[FieldPath]],
    ) -> Obj:
        self.rv += 1
        if new is None:
            assert old is not None
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            del self.objects[key]
            self._publish(Event(self.rv, "DELETED", kind, gone, old))
            return gone
        previous = self.objects.get(key)
        new["metadata"]["resourceVersion"] = str(self.rv)
        new["metadata"]["managedFields"] = self._managed_fields(kind, managers, previous)
        self.objects[key] = Stored(kind, new, managers)
        self._publish(Event(self.rv, "ADDED" if old is None else "MODIFIED", kind, copy.deepcopy(new), old))
        return copy.deepcopy(new)

    @staticmethod
    def _managed_fields(
        kind: Kind, managers: dict[ManagerKey, set[FieldPath]], previous: Stored | None
    ) -> list[Obj]:
        times = {
            (e["manager"], e["operation"], e.get("subresource", "")): e["time"]
            for e in (previous.obj["metadata"].get("managedFields", []) if previous else [])
        }
        entries = []
        for (manager, operation, sub), owned in sorted(managers.items()):
            unchanged = previous is not None and previous.managers.get((manager, operation, sub)) == owned
            entry: Obj = {
                "manager": manager,
                "operation": operation,
                "apiVersion": kind.api_version,
                "time": times.get((manager, operation, sub), now()) if unchanged else now(),
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(owned),
            }
            if sub:
                entry["subresource"] = sub
            entries.append(entry)
        return entries

    def _publish(self, event: Event) -> None:
        if len(self.history) == self.history.maxlen:
            self.compacted = self.history[0].rv
        self.history.append(event)
        for listener in self.listeners:
            listener(event)
