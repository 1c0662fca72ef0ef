"""The live event stream (/sse/stream), the event history (/events) and the audit log (/audit).

Streams are read from real uvicorn servers: httpx's ASGITransport buffers whole responses, so
it cannot read an endless SSE body. Mutations go through `committed_client` because NOTIFY is
only delivered on commit. The history and audit tests use the rolled-back `client`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from support import ADMIN, make_key, make_project, make_settings

from converge.app import create_app
from converge.control.events.broadcaster import Published
from converge.control.events.service import record

# The delivery bound for a committed mutation to reach a connected stream.
DELIVERY_S = 1.0
# How long to wait for anything else before the test fails instead of hanging.
WAIT_S = 10.0


# --- a small, spec-following SSE reader --------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    id: int | None
    event: str | None
    data: str

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.data)  # type: ignore[no-any-return]


@dataclass
class SseStream:
    """Parses a text/event-stream body: `field: value` lines, a blank line ends a frame, lines
    starting with ':' are comments (heartbeats, the server's `live` marker)."""

    response: httpx.Response
    replayed: list[Frame] = field(default_factory=list)  # frames before the `live` marker
    comments: list[str] = field(default_factory=list)
    _pending: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lines = self.response.aiter_lines()

    async def _next_item(self) -> Frame | str:
        """The next complete event frame, or the text of the next comment line."""
        async for line in self._lines:
            if line == "":
                if self._pending:
                    fields, self._pending = self._pending, {}
                    ident = fields.get("id", [None])[-1]
                    return Frame(
                        id=int(ident) if ident else None,
                        event=fields.get("event", [None])[-1],
                        data="\n".join(fields.get("data", [])),
                    )
                continue
            if line.startswith(":"):
                comment = line[1:].removeprefix(" ")
                self.comments.append(comment)
                return comment
            name, _, value = line.partition(":")
            self._pending.setdefault(name, []).append(value.removeprefix(" "))
        raise AssertionError("the server ended the stream")

    async def next_comment(self, *, within: float = WAIT_S) -> str:
        async with asyncio.timeout(within):
            item = await self._next_item()
        assert isinstance(item, str), f"expected a comment, got event {item}"
        return item

    async def until_live(self, *, within: float = WAIT_S) -> list[Frame]:
        """Frames replayed before the server's `: live` marker."""
        frames: list[Frame] = []
        async with asyncio.timeout(within):
            while (item := await self._next_item()) != "live":
                if isinstance(item, Frame):
                    frames.append(item)
        return frames

    async def events_until(self, stop: Callable[[Frame], bool], *, within: float = WAIT_S) -> list[Frame]:
        """Every event frame up to and including the first one for which `stop` is true."""
        frames: list[Frame] = []
        async with asyncio.timeout(within):
            while True:
                item = await self._next_item()
                if isinstance(item, Frame):
                    frames.append(item)
                    if stop(item):
                        return frames


@contextlib.asynccontextmanager
async def open_stream(
    base_url: str,
    headers: dict[str, str],
    *,
    params: Any = None,
    last_event_id: int | None = None,
) -> AsyncIterator[SseStream]:
    """Connect and read up to the `live` marker: from then on the subscription is in place."""
    if last_event_id is not None:
        headers = {**headers, "Last-Event-ID": str(last_event_id)}
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(WAIT_S, read=None)) as http,
        http.stream("GET", "/sse/stream", headers=headers, params=params) as resp,
    ):
        assert resp.status_code == 200, (await resp.aread()).decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        stream = SseStream(resp)
        stream.replayed = await stream.until_live()
        yield stream


def about(object_id: str, kind: str | None = None) -> Callable[[Frame], bool]:
    return lambda f: f.payload["object_id"] == object_id and (kind is None or f.event == kind)


def summary(frames: list[Frame]) -> list[tuple[str | None, str | None, str]]:
    return [(f.event, f.payload["project_id"], f.payload["object_id"]) for f in frames]


async def create_key(client: httpx.AsyncClient, project_id: str, name: str, role: str = "viewer") -> str:
    resp = await client.post(f"/projects/{project_id}/keys", json={"name": name, "role": role}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def touch_project(client: httpx.AsyncClient, project_id: str, description: str) -> None:
    resp = await client.patch(f"/projects/{project_id}", json={"description": description}, headers=ADMIN)
    assert resp.status_code == 200, resp.text


# --- live delivery -----------------------------------------------------------------------------


async def test_a_committed_mutation_reaches_another_clients_stream_within_one_second(
    committed_client, live_server
):
    async with live_server() as srv, open_stream(srv.url, ADMIN) as stream:
        project = await make_project(committed_client)
        async with asyncio.timeout(DELIVERY_S):
            created = (await stream.events_until(about(project["id"], "project.created")))[-1]
        key_id = await create_key(committed_client, project["id"], "ci")
        async with asyncio.timeout(DELIVERY_S):
            key = (await stream.events_until(about(key_id, "key.created")))[-1]

    assert created.id == created.payload["id"]
    assert created.payload["kind"] == "project.created"
    assert created.payload["project_id"] == project["id"]
    assert created.payload["data"]["name"] == project["name"]
    assert created.payload["data"]["actor"] == "bootstrap"
    assert key.payload["project_id"] == project["id"]
    assert key.payload["data"]["name"] == "ci"
    assert "token" not in key.payload["data"] and "secret_hash" not in key.payload["data"]
    assert key.id is not None and created.id is not None and key.id > created.id


async def test_project_filter_streams_only_that_projects_events(committed_client, live_server):
    a = (await make_project(committed_client))["id"]
    b = (await make_project(committed_client))["id"]
    async with live_server() as srv, open_stream(srv.url, ADMIN, params={"project": a}) as stream:
        await create_key(committed_client, b, "in-b")
        await touch_project(committed_client, b, "b changed")
        key_a = await create_key(committed_client, a, "in-a")
        await touch_project(committed_client, a, "a changed")
        frames = await stream.events_until(lambda f: f.event == "project.updated")

    assert summary(frames) == [("key.created", a, key_a), ("project.updated", a, a)]


async def test_exact_kind_filter_matches_only_that_kind(committed_client, live_server):
    async with (
        live_server() as srv,
        open_stream(srv.url, ADMIN, params={"kind": "key.created"}) as stream,
    ):
        project = (await make_project(committed_client))["id"]
        first = await create_key(committed_client, project, "first")
        revoked = await committed_client.delete(f"/projects/{project}/keys/{first}", headers=ADMIN)
        assert revoked.status_code == 200, revoked.text
        second = await create_key(committed_client, project, "second")
        frames = await stream.events_until(about(second))

    assert summary(frames) == [("key.created", project, first), ("key.created", project, second)]


async def test_kind_prefix_matches_the_whole_family_and_nothing_else(committed_client, live_server):
    async with (
        live_server() as srv,
        open_stream(srv.url, ADMIN, params={"kind": "project"}) as projects,
        open_stream(srv.url, ADMIN, params={"kind": "key"}) as keys,
    ):
        project = (await make_project(committed_client))["id"]
        key = await create_key(committed_client, project, "k")
        revoked = await committed_client.delete(f"/projects/{project}/keys/{key}", headers=ADMIN)
        assert revoked.status_code == 200, revoked.text
        await touch_project(committed_client, project, "changed")
        project_frames = await projects.events_until(lambda f: f.event == "project.updated")
        key_frames = await keys.events_until(lambda f: f.event == "key.revoked")

    assert summary(project_frames) == [
        ("project.created", project, project),
        ("project.updated", project, project),
    ]
    assert summary(key_frames) == [("key.created", project, key), ("key.revoked", project, key)]


async def test_a_project_key_never_receives_another_projects_events(committed_client, live_server):
    a = (await make_project(committed_client))["id"]
    b = (await make_project(committed_client))["id"]
    viewer_a = await make_key(committed_client, a, "viewer")
    async with live_server() as srv, open_stream(srv.url, viewer_a) as stream:
        await create_key(committed_client, b, "secret-b")
        await touch_project(committed_client, b, "b changed")
        await create_key(committed_client, b, "secret-b-2")
        sentinel = await create_key(committed_client, a, "visible-a")
        frames = await stream.events_until(about(sentinel))

    assert [f.payload["project_id"] for f in frames] == [a]
    assert all("secret-b" not in f.data for f in frames)


async def test_a_project_key_asking_for_another_project_gets_404(committed_client):
    a = (await make_project(committed_client))["id"]
    b = (await make_project(committed_client))["id"]
    viewer_a = await make_key(committed_client, a, "viewer")

    resp = await committed_client.get("/sse/stream", params={"project": b}, headers=viewer_a)

    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert b in resp.json()["detail"]


# --- resume ------------------------------------------------------------------------------------


async def test_last_event_id_replays_missed_events_exactly_once_then_continues_live(
    app, committed_client, live_server
):
    project = (await make_project(committed_client))["id"]
    only_project = {"project": project}
    async with live_server() as srv:
        async with open_stream(srv.url, ADMIN, params=only_project) as stream:
            assert stream.replayed == []  # no Last-Event-ID: nothing is replayed
            k1 = await create_key(committed_client, project, "k1")
            k2 = await create_key(committed_client, project, "k2")
            seen = await stream.events_until(about(k2))
        assert [f.payload["object_id"] for f in seen] == [k1, k2]
        last_seen = seen[-1].id
        assert last_seen is not None

        k3 = await create_key(committed_client, project, "k3")  # while disconnected
        k4 = await create_key(committed_client, project, "k4")

        async with open_stream(srv.url, ADMIN, params=only_project, last_event_id=last_seen) as stream:
            replayed = stream.replayed
            assert [f.payload["object_id"] for f in replayed] == [k3, k4]
            assert last_seen < replayed[0].id < replayed[1].id  # type: ignore[operator]

            # A NOTIFY for an event that was also replayed (committed between subscribe and
            # replay) or already seen before the disconnect must not be delivered again.
            broadcaster = app.state.converge.broadcaster
            for frame in (seen[-1], *replayed):
                assert frame.id is not None and frame.event is not None
                broadcaster.publish(
                    Published(
                        id=frame.id,
                        kind=frame.event,
                        project_id=uuid.UUID(project),
                        restricted=False,
                        json=frame.data,
                    )
                )
            k5 = await create_key(committed_client, project, "k5")
            live = await stream.events_until(about(k5))

    assert [f.payload["object_id"] for f in live] == [k5]
    assert live[0].id is not None and live[0].id > replayed[-1].id  # type: ignore[operator]


async def test_an_event_committed_after_a_later_started_one_is_numbered_after_it_and_replayed(
    app, committed_client, live_server
):
    """Ids follow commit order: a slow transaction's event is numbered when it commits, so a
    client that already saw a faster transaction's event still gets it, live and on resume."""
    project = (await make_project(committed_client))["id"]
    only_project = {"project": project}
    async with live_server() as srv, app.state.converge.sessions() as slow:
        async with open_stream(srv.url, ADMIN, params=only_project) as stream:
            await record(
                slow,
                None,
                action="project.updated",
                project_id=uuid.UUID(project),
                object_type="project",
                object_id=project,
                changes={"description": "slow writer"},
            )
            await slow.flush()
            fast = await create_key(committed_client, project, "fast")
            seen = await stream.events_until(about(fast))
            await slow.commit()
            late = await stream.events_until(lambda f: f.event == "project.updated")
        assert [f.payload["object_id"] for f in seen] == [fast]
        assert late[-1].id is not None and seen[-1].id is not None and late[-1].id > seen[-1].id

        async with open_stream(srv.url, ADMIN, params=only_project, last_event_id=seen[-1].id) as stream:
            replayed = stream.replayed

    assert [f.id for f in replayed] == [late[-1].id]


async def test_a_malformed_last_event_id_is_a_400(committed_client):
    resp = await committed_client.get("/sse/stream", headers={**ADMIN, "Last-Event-ID": "yesterday"})

    assert resp.status_code == 400
    assert "Last-Event-ID" in resp.json()["detail"]


# --- heartbeats --------------------------------------------------------------------------------


async def test_an_idle_stream_receives_heartbeat_comments(settings, live_server):
    assert settings.server.sse_heartbeat_s == 1.0
    quiet = {"kind": "no-such-kind"}
    async with live_server() as srv, open_stream(srv.url, ADMIN, params=quiet) as stream:
        comment = await stream.next_comment(within=settings.server.sse_heartbeat_s * 5)

    assert comment.startswith("ping")


# --- two app instances, one database -----------------------------------------------------------


async def test_events_cross_between_two_app_instances_on_one_database(
    pg_url: str, tmp_path: Path, app, committed_client, live_server
):
    app2 = create_app(make_settings(pg_url, tmp_path), on_first_key=None)
    async with app2.router.lifespan_context(app2):
        assert app2.state.converge.broadcaster is not app.state.converge.broadcaster
        transport2 = httpx.ASGITransport(app=app2)
        async with (
            httpx.AsyncClient(transport=transport2, base_url="http://second") as client2,
            live_server() as srv1,
            live_server(app2) as srv2,
            open_stream(srv1.url, ADMIN) as stream1,
            open_stream(srv2.url, ADMIN) as stream2,
        ):
            via_first = await make_project(committed_client)
            on_second = await stream2.events_until(about(via_first["id"], "project.created"))
            via_second = await make_project(client2)
            on_first = await stream1.events_until(about(via_second["id"], "project.created"))

    assert on_second[-1].payload["data"]["name"] == via_first["name"]
    assert on_first[-1].payload["data"]["name"] == via_second["name"]


# --- /events -----------------------------------------------------------------------------------


async def walk(client: httpx.AsyncClient, path: str, headers: dict[str, str], **params: Any) -> list[dict]:
    """Every item of a paginated list, following next_cursor."""
    items: list[dict] = []
    cursor = None
    for _ in range(1000):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = await client.get(path, params=query, headers=headers)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page["items"]) <= params.get("limit", 50)
        items += page["items"]
        if (cursor := page["next_cursor"]) is None:
            return items
    raise AssertionError("pagination did not end")


async def test_events_pages_walk_every_event_in_id_order_with_filters(client):
    project = (await make_project(client))["id"]
    other = (await make_project(client))["id"]
    keys = [await create_key(client, project, f"k{i}") for i in range(3)]
    await create_key(client, other, "elsewhere")
    await touch_project(client, project, "changed")

    paged = await walk(client, "/events", ADMIN, project=project, limit=2)
    whole = (await client.get("/events", params={"project": project, "limit": 500}, headers=ADMIN)).json()

    assert [(e["kind"], e["object_id"]) for e in paged] == [
        ("project.created", project),
        *[("key.created", k) for k in keys],
        ("project.updated", project),
    ]
    ids = [e["id"] for e in paged]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert whole["items"] == paged and whole["next_cursor"] is None

    by_family = await walk(client, "/events", ADMIN, project=project, kind="key", limit=1)
    assert [e["object_id"] for e in by_family] == keys
    by_kinds = await walk(client, "/events", ADMIN, project=project, kind=["key.created", "project.updated"])
    assert [e["kind"] for e in by_kinds] == ["key.created"] * 3 + ["project.updated"]
    # A kind prefix matches whole dotted segments, not any string prefix.
    assert await walk(client, "/events", ADMIN, project=project, kind="proj") == []
    # LIKE wildcards in a kind are literal characters.
    assert await walk(client, "/events", ADMIN, project=project, kind="%") == []
    assert await walk(client, "/events", ADMIN, project=project, kind="k_y") == []

    everything = await walk(client, "/events", ADMIN, limit=500)
    all_ids = [e["id"] for e in everything]
    assert all_ids == sorted(all_ids)
    assert set(ids) <= set(all_ids)
    assert any(e["project_id"] == other for e in everything)


async def test_events_history_hides_other_projects_from_a_project_key(client):
    a = (await make_project(client))["id"]
    b = (await make_project(client))["id"]
    viewer_a = await make_key(client, a, "viewer")
    await create_key(client, b, "in-b")

    seen = await walk(client, "/events", viewer_a, limit=500)

    assert {e["project_id"] for e in seen} <= {a, None}
    assert any(e["project_id"] == a for e in seen)
    assert (await client.get("/events", params={"project": b}, headers=viewer_a)).status_code == 404


async def test_events_reject_a_cursor_that_is_not_an_event_id(client):
    not_an_id = base64.urlsafe_b64encode(b"abc").decode()
    resp = await client.get("/events", params={"cursor": not_an_id}, headers=ADMIN)

    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/problem+json")


# --- /audit ------------------------------------------------------------------------------------


async def test_admin_sees_audit_records_with_actor_action_and_request_id(client):
    request_id = f"req-{uuid.uuid4().hex}"
    resp = await client.post(
        "/projects",
        json={"name": f"p-{uuid.uuid4().hex[:10]}"},
        headers={**ADMIN, "X-Request-ID": request_id},
    )
    assert resp.status_code == 201, resp.text
    assert resp.headers["x-request-id"] == request_id
    project = resp.json()
    owner = await make_key(client, project["id"], "owner")
    key_request = f"req-{uuid.uuid4().hex}"
    made = await client.post(
        f"/projects/{project['id']}/keys",
        json={"name": "by-owner", "role": "developer"},
        headers={**owner, "X-Request-ID": key_request},
    )
    assert made.status_code == 201, made.text

    records = await walk(client, "/audit", ADMIN, project=project["id"], limit=1)

    assert [r["action"] for r in records] == ["key.created", "key.created", "project.created"]
    assert [r["id"] for r in records] == sorted((r["id"] for r in records), reverse=True)  # newest first
    by_owner, by_admin, created = records
    assert created["actor"] == "bootstrap" and created["actor_kind"] == "bootstrap"
    assert created["request_id"] == request_id
    assert created["object_type"] == "project" and created["object_id"] == project["id"]
    assert created["changes"]["name"] == project["name"]
    assert by_admin["actor"] == "bootstrap" and by_admin["changes"]["role"] == "owner"
    # The owner key's own record names it by the prefix shown when the admin created it.
    assert by_owner["actor"] == f"key:{by_admin['changes']['prefix']}" and by_owner["actor_kind"] == "key"
    assert by_owner["request_id"] == key_request
    assert by_owner["object_id"] == made.json()["id"]
    assert made.json()["token"] not in json.dumps(records)


async def test_an_owner_key_sees_only_its_projects_audit_records(client):
    mine = (await make_project(client))["id"]
    theirs = (await make_project(client))["id"]
    await create_key(client, theirs, "theirs")
    owner = await make_key(client, mine, "owner")

    records = await walk(client, "/audit", owner, limit=500)

    assert records, "the owner's own project has audit records"
    assert {r["project_id"] for r in records} == {mine}
    assert {"project.created", "key.created"} <= {r["action"] for r in records}
    other = await client.get("/audit", params={"project": theirs}, headers=owner)
    assert other.status_code == 404
    everything = await walk(client, "/audit", ADMIN, limit=500)
    assert any(r["project_id"] == theirs for r in everything)


async def test_developer_and_viewer_keys_cannot_read_the_audit_log(client):
    project = (await make_project(client))["id"]
    for role in ("developer", "viewer"):
        key = await make_key(client, project, role)
        resp = await client.get("/audit", headers=key)
        assert resp.status_code == 403, (role, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")
        scoped = await client.get("/audit", params={"project": project}, headers=key)
        assert scoped.status_code == 403, (role, scoped.text)
