"""The fake Kubernetes API keeps the conventions a real API server has (the backend will run
against one): watch semantics (synthetic ADDED, selector exits, bookmarks, 410 Expired),
server-side apply ownership, status subresources, finalizers, list shapes and errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fake_api import APPLY, JSON, Actor, FakeKubeApi

Obj = dict[str, Any]
NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "p"}}


def config_map(name: str, **fields: Any) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "p"}, **fields}


@pytest.fixture
async def http(fake_api: FakeKubeApi) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=fake_api.url) as session:
        yield session


@pytest.fixture
async def person(fake_api: FakeKubeApi) -> AsyncIterator[Actor]:
    async with Actor(fake_api, "kubectl") as actor:
        await actor.create(NS)
        yield actor


async def watch_lines(http: aiohttp.ClientSession, count: int, **params: str) -> list[Obj]:
    lines: list[Obj] = []
    async with http.get("/api/v1/namespaces/p/configmaps", params={"watch": "true", **params}) as resp:
        assert resp.headers["Content-Type"] == JSON
        async for raw in resp.content:
            lines.append(json.loads(raw))
            if len(lines) == count or lines[-1]["type"] == "ERROR":
                break
    return lines


async def test_a_watch_from_a_compacted_version_is_410_expired(
    fake_api: FakeKubeApi, http: aiohttp.ClientSession, person: Actor
) -> None:
    first = await person.create(config_map("a"))
    await person.merge(first, {"data": {"k": "v"}})
    fake_api.compact()

    (event,) = await watch_lines(http, 1, resourceVersion=first["metadata"]["resourceVersion"])

    assert event["type"] == "ERROR"
    assert (event["object"]["kind"], event["object"]["code"], event["object"]["reason"]) == (
        "Status",
        410,
        "Expired",
    )


async def test_a_watch_starts_with_what_exists_and_sees_objects_leave_its_selector(
    http: aiohttp.ClientSession, person: Actor
) -> None:
    labelled = await person.create(
        config_map("a", metadata={"name": "a", "namespace": "p", "labels": {"x": "1"}})
    )
    await person.create(config_map("b"))

    async with http.get(
        "/api/v1/namespaces/p/configmaps",
        params={"watch": "true", "labelSelector": "x=1", "allowWatchBookmarks": "true"},
    ) as resp:
        stream = resp.content
        added = json.loads(await stream.readline())
        assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "a")
        await person.merge(labelled, {"metadata": {"labels": {"x": "2"}}})
        left = json.loads(await stream.readline())
        assert (left["type"], left["object"]["metadata"]["labels"]) == ("DELETED", {"x": "2"})
        bookmark = json.loads(await stream.readline())
        assert bookmark["type"] == "BOOKMARK"
        assert set(bookmark["object"]["metadata"]) == {"resourceVersion"}


async def test_apply_removes_fields_a_manager_stops_applying_and_needs_a_field_manager(
    http: aiohttp.ClientSession, person: Actor
) -> None:
    code, obj = await person.apply(config_map("a", data={"one": "1", "two": "2"}))
    assert code == 201
    code, obj = await person.apply(config_map("a", data={"one": "1"}))
    assert (code, obj["data"]) == (200, {"one": "1"})

    async with http.patch(
        "/api/v1/namespaces/p/configmaps/a", data=json.dumps(config_map("a")), headers={"Content-Type": APPLY}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["kind"] == "Status"


async def test_apply_into_a_missing_namespace_is_404(person: Actor) -> None:
    code, status = await person.apply({**config_map("a"), "metadata": {"name": "a", "namespace": "nope"}})
    assert (code, status["reason"]) == (404, "NotFound")
    assert status["details"] == {"name": "nope", "kind": "namespaces"}


async def test_status_is_only_written_through_the_status_subresource(person: Actor) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "p"},
        "spec": {"replicas": 1},
        "status": {"readyReplicas": 5},
    }
    code, applied = await person.apply(deployment)
    assert code == 201 and "status" not in applied

    updated = await person.set_status(applied, {"readyReplicas": 1})
    assert updated["status"] == {"readyReplicas": 1}
    assert updated["metadata"]["generation"] == 1  # status is not spec
    code, reapplied = await person.apply({**deployment, "spec": {"replicas": 2}})
    assert reapplied["status"] == {"readyReplicas": 1}
    assert reapplied["metadata"]["generation"] == 2


async def test_a_finalizer_holds_a_deleted_object_until_it_is_removed(
    fake_api: FakeKubeApi, person: Actor
) -> None:
    held = await person.create(
        config_map("a", metadata={"name": "a", "namespace": "p", "finalizers": ["x/y"]})
    )

    terminating = await person.delete(held)
    assert terminating["metadata"]["deletionTimestamp"]
    assert fake_api.get("v1", "ConfigMap", "a", "p") is not None

    await person.merge(terminating, {"metadata": {"finalizers": None}})
    assert fake_api.get("v1", "ConfigMap", "a", "p") is None


async def test_lists_page_and_leave_kind_out_of_built_in_items(
    http: aiohttp.ClientSession, person: Actor
) -> None:
    for name in ("a", "b", "c"):
        await person.create(config_map(name))

    async with http.get("/api/v1/configmaps", params={"limit": "2"}) as resp:
        page = await resp.json()
    async with http.get(
        "/api/v1/configmaps", params={"limit": "2", "continue": page["metadata"]["continue"]}
    ) as resp:
        rest = await resp.json()

    assert page["kind"] == "ConfigMapList"
    assert [i["metadata"]["name"] for i in page["items"] + rest["items"]] == ["a", "b", "c"]
    assert "continue" not in rest["metadata"]
    assert all("kind" not in item and "apiVersion" not in item for item in page["items"])


async def test_logs_of_a_pod_with_several_containers_name_one(
    http: aiohttp.ClientSession, person: Actor
) -> None:
    containers = [{"name": "server", "image": "i"}, {"name": "sidecar", "image": "i"}]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x", "namespace": "p"},
        "spec": {"containers": containers},
    }
    await person.create(pod)

    async with http.get("/api/v1/namespaces/p/pods/x/log") as resp:
        assert resp.status == 400
        assert "a container name must be specified" in (await resp.json())["message"]


async def test_an_unknown_resource_is_404_with_a_status(http: aiohttp.ClientSession) -> None:
    async with http.get("/apis/example.com/v1/widgets") as resp:
        assert resp.status == 404
        assert (await resp.json())["reason"] == "NotFound"
