"""The web console in a real browser (Debian's Chromium): every page loads clean, a second
principal approves and deploys, the trust dashboard follows the event stream (and resumes it),
markup in user data stays text, a viewer is offered nothing it may not do, the playground streams.

The browser talks to the session app on a loopback port; the tests arrange data through the API
(`committed_client`: writes commit, names are unique) the way another client would.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

if not Path("/usr/bin/chromium").exists():  # the `browser` fixture says the same; this skips at collection
    pytest.skip("console browser tests need Debian's Chromium at /usr/bin/chromium", allow_module_level=True)
expect = pytest.importorskip("playwright.async_api", reason="the playwright package is missing").expect

from scripted_llm import ScriptedLlm, chat_deployment, routed  # noqa: E402
from sqlalchemy import select  # noqa: E402
from support import ADMIN, BOOTSTRAP, eventually, make_key, make_project  # noqa: E402

from converge.models import Build, Event  # noqa: E402

pytestmark = pytest.mark.xdist_group("console")
Headers = dict[str, str]
MARKUP = "<img src=x onerror=alert(1)>"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _token(headers: Headers) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def _org_key(client: httpx.AsyncClient, role: str) -> Headers:
    resp = await client.post("/keys", json={"name": _unique(role), "role": role}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


async def _pending_version(client: httpx.AsyncClient, submitter: Headers, **model: Any) -> dict[str, Any]:
    made = await client.post("/models", json={"name": _unique("console"), **model}, headers=submitter)
    assert made.status_code == 201, made.text
    resp = await client.post(
        f"/models/{made.json()['id']}/versions/upload",
        params={"version": "v1", "filename": "weights.dat"},
        content=b"only bytes, no model format: " + uuid.uuid4().bytes,
        headers={**submitter, "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 201 and resp.json()["state"] == "pending_approval", resp.text
    return resp.json()


async def _built(app: Any, *, project_id: str, version_id: str) -> None:
    """Record the version's build as done (nothing runs): deploying needs a succeeded build."""
    async with app.state.converge.sessions() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project_id),
                model_version_id=uuid.UUID(version_id),
                profile="cpu",
                server="llama-cpp",
                state="succeeded",
                results={"tokens_per_s": 12.5},
                created_by="console-test",
            )
        )


async def test_every_page_loads_with_no_console_errors_and_no_failed_requests(console, committed_client, app):
    client = committed_client
    project = await make_project(client, _unique("console"))
    version = await _pending_version(
        client, await _org_key(client, "admin"), description="A console test model"
    )
    await _built(app, project_id=project["id"], version_id=version["id"])
    policies = (await client.get("/policies", headers=ADMIN)).json()["items"]
    pages = {
        "overview": ("#/overview", "Overview"),
        "trust": ("#/trust", "Trust dashboard"),
        "library": ("#/library", "Model Library"),
        "model": (f"#/library/{version['model_id']}", None),
        "version": (f"#/library/{version['model_id']}/{version['id']}", None),
        "policies": ("#/policies", "Policies"),
        **({"policy": (f"#/policies/{policies[0]['id']}", policies[0]["name"])} if policies else {}),
        "deployments": ("#/deployments", "Deployments"),
        "builds": ("#/builds", "Builds"),
        "usage": ("#/usage", "Usage and cost"),
        "knowledge": ("#/knowledge", "Knowledge bases"),
        "chat": ("#/chat", "Chat playground"),
        "admin": ("#/admin", "Administration"),
        "project": (f"#/admin/{project['id']}", project["name"]),
    }
    await console.sign_in(BOOTSTRAP)
    for name, (route, heading) in pages.items():
        await console.open(route)
        if heading:
            await expect(console.page.locator("main h1").first).to_have_text(heading)
        await console.screenshot(name)
    # The overview draws the installation: the API's box is healthy, from /readiness.
    await console.open("#/overview")
    await expect(console.page.locator('[data-node="api"]')).to_have_class("node ok")
    console.assert_clean()


async def test_a_second_principal_approves_a_pending_version_then_deploys_it_and_watches_it_get_ready(
    console, committed_client, app
):
    client = committed_client
    project = await make_project(client, _unique("console"))
    submitter = await _org_key(client, "admin")  # an approver too: only separation of duties stops it
    version = await _pending_version(client, submitter)
    route = f"#/library/{version['model_id']}/{version['id']}"

    await console.sign_in(_token(submitter), route)
    await expect(console.page.locator("#action-approve")).to_have_count(0)
    await expect(console.page.locator(".why-not")).to_contain_text("Separation of duties")
    await console.sign_out()

    await console.sign_in(BOOTSTRAP, route)
    await console.page.fill("#verdict-note", "checked in the console")
    await console.page.click("#action-approve")
    await expect(console.page.locator("#version-state")).to_contain_text("approved")
    approved = await client.get(f"/models/{version['model_id']}/versions/{version['id']}", headers=ADMIN)
    assert approved.json()["state"] == "approved"
    assert [a["approver"] for a in approved.json()["approvals"]] == ["bootstrap"]

    await _built(app, project_id=project["id"], version_id=version["id"])
    name = _unique("web")
    await console.page.select_option("#deploy-project", project["id"])
    await console.page.fill("#deploy-name", name)
    await console.page.select_option("#deploy-server", "llama-cpp")
    await console.page.fill("#deploy-cpu", "0.1")
    await console.page.click("#deploy-form button[type=submit]")
    await console.page.wait_for_url(re.compile(r"/console/#/deployments/[0-9a-f-]{36}$"))
    await expect(console.page.locator("#deployment-phase")).to_have_text("Ready", timeout=20_000)
    await expect(console.page.locator("#deployment-live")).to_contain_text("1 of 1 replicas ready")
    await console.screenshot("deployment")
    deployment_id = console.page.url.rsplit("/", 1)[1]
    assert (await client.get(f"/deployments/{deployment_id}", headers=ADMIN)).json()["name"] == name

    # The overview draws it with its replica's health, and the box leads to its page.
    await console.open("#/overview")
    node = console.page.locator(f'[data-deployment="{name}"]')
    await expect(node).to_have_class("node deployment Ready")
    await expect(node.locator("circle.replica.ready")).to_have_count(1)
    await console.screenshot("overview-with-deployment")
    await node.click()
    await console.rendered(f"#/deployments/{deployment_id}")

    # Its logs, followed live: a line the replica writes now appears without a reload.
    (replica,) = (await client.get(f"/deployments/{deployment_id}", headers=ADMIN)).json()["status"][
        "replicas"
    ]
    await console.page.click("#follow-logs")
    await expect(console.page.locator("#deployment-logs")).to_have_attribute("data-following", "true")
    await expect(console.page.locator("#deployment-logs")).to_contain_text(
        "ready"
    )  # the tail came: it streams
    line = f"served request {uuid.uuid4().hex[:8]}"
    app.state.converge.runtime.write_log(replica["id"], line)  # what a served request logs
    await expect(console.page.locator("#deployment-logs")).to_contain_text(line)
    await console.page.click("#stop-logs")
    await expect(console.page.locator("#deployment-logs")).not_to_have_attribute("data-following", "true")
    console.assert_clean()
    await client.delete(f"/deployments/{deployment_id}", headers=ADMIN)


async def _newest_event_id(app: Any) -> int:
    async with app.state.converge.sessions() as session:
        newest = await session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1))
    return int(newest or 0)


async def test_an_event_from_another_client_appears_on_the_trust_dashboard_after_a_resumed_stream(
    console, committed_client, app
):
    """The first stream the page opens ends after one event (the server went away, say); the page
    reconnects with Last-Event-ID and is given what it missed: the key another client made."""
    client = committed_client
    project = await make_project(client, _unique("console"))
    before = await _newest_event_id(app)
    streams: list[dict[str, str]] = []

    async def sse(route: Any) -> None:
        streams.append(route.request.headers)
        if len(streams) > 1:
            await route.continue_()
            return
        fake = {"id": before, "at": "2026-01-01T00:00:00+00:00", "kind": "key.created", "project_id": None}
        body = f"id: {before}\nevent: key.created\ndata: {json.dumps({**fake, 'object_id': 'x', 'data': {}})}\n\n"
        await route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    await console.page.route("**/sse/stream*", sse)
    await console.sign_in(BOOTSTRAP, "#/trust")
    created = await client.post(
        f"/projects/{project['id']}/keys", json={"name": "from-another-client"}, headers=ADMIN
    )
    assert created.status_code == 201
    events = await client.get(
        "/events", params={"kind": "key.created", "project": project["id"]}, headers=ADMIN
    )
    event = next(e for e in events.json()["items"] if e["object_id"] == created.json()["id"])
    row = console.page.locator(f'#trust-events tr[data-event-id="{event["id"]}"]')
    await expect(row).to_be_visible(timeout=10_000)
    await expect(row).to_have_attribute("data-kind", "key.created")
    await expect(console.page.locator("#trust-state")).to_have_text("live")
    assert len(streams) >= 2 and streams[1].get("last-event-id") == str(before)
    counter = console.page.locator('#trust-counters .counter[data-kind="key.created"] strong')
    assert int(await counter.text_content() or 0) >= 1
    await console.screenshot("trust-live")
    console.assert_clean()


async def test_markup_in_user_data_renders_as_text_and_runs_nothing(console, committed_client):
    """Model names are lowercase identifiers (the API refuses markup there), so the markup goes
    where people may type anything: a model's description and tag, a key's name."""
    client = committed_client
    refused = await client.post("/models", json={"name": MARKUP}, headers=ADMIN)
    assert refused.status_code == 422
    name = _unique("xss")
    made = await client.post(
        "/models", json={"name": name, "description": MARKUP, "tags": [MARKUP]}, headers=ADMIN
    )
    assert made.status_code == 201, made.text
    project = await make_project(client, _unique("console"))
    key = await client.post(f"/projects/{project['id']}/keys", json={"name": MARKUP}, headers=ADMIN)
    assert key.status_code == 201

    await console.sign_in(BOOTSTRAP, "#/library")
    await console.page.fill("#lib-name", name)
    await console.page.click("#page-library form button[type=submit]")
    row = console.page.locator("#lib-models tbody tr", has_text=name)
    await expect(row).to_contain_text(MARKUP)  # the characters themselves, shown
    await console.open(f"#/library/{made.json()['id']}")
    await expect(console.page.locator("main")).to_contain_text(MARKUP)
    await console.open(f"#/admin/{project['id']}")
    await expect(console.page.locator("#project-keys")).to_contain_text(MARKUP)
    assert await console.page.locator("main img").count() == 0
    assert console.dialogs == []
    console.assert_clean()


async def test_a_viewer_is_offered_no_approval_and_is_refused_when_it_forces_one(console, committed_client):
    client = committed_client
    project = await make_project(client, _unique("console"))
    viewer = await make_key(client, project["id"], "viewer")
    version = await _pending_version(client, await _org_key(client, "admin"))
    path = f"/models/{version['model_id']}/versions/{version['id']}/approve"

    await console.sign_in(_token(viewer), f"#/library/{version['model_id']}/{version['id']}")
    await expect(console.page.locator("#version-state")).to_contain_text("pending_approval")
    await expect(console.page.locator("#version-actions button")).to_have_count(0)
    await expect(console.page.locator(".why-not")).to_contain_text("library:approve")
    status = await console.page.evaluate(
        """async (path) => {
            const key = sessionStorage.getItem("converge.key");
            const resp = await fetch(path, {method: "POST", headers: {Authorization: `Bearer ${key}`,
                "Content-Type": "application/json"}, body: "{}"});
            return [resp.status, (await resp.json()).detail];
        }""",
        path,
    )
    assert status[0] == 403 and "library:approve" in status[1]
    still = await client.get(f"/models/{version['model_id']}/versions/{version['id']}", headers=ADMIN)
    assert still.json()["state"] == "pending_approval"
    assert console.errors == [] or all("403" in e for e in console.errors)  # the forced call, only


async def test_a_chat_in_the_playground_streams_the_answer(console, committed_client, app):
    """The upstream is the scripted OpenAI-compatible server the gateway tests use, behind a real
    deployment and the gateway's /v1/chat/completions."""
    client = committed_client
    project = await make_project(client, _unique("console"))
    developer = await make_key(client, project["id"], "developer")
    words = ["Streaming ", "works ", "in ", "the ", "console."]
    async with ScriptedLlm() as llm:
        deployment = await chat_deployment(
            app, client, project_id=project["id"], llm=llm, name=_unique("chat")
        )
        await routed(app, deployment, llm)
        llm.reply("".join(words), chunks=words)
        await console.sign_in(_token(developer), "#/chat")
        await expect(console.page.locator("#chat-model option")).to_have_count(1)
        await console.page.fill("#chat-input", "Does streaming work?")
        await console.page.click("#chat-send")
        answer = console.page.locator('.msg.assistant[data-streaming="false"]')
        await expect(answer.locator(".answer")).to_have_text("".join(words), timeout=10_000)
        assert await answer.get_attribute("data-chunks") == str(len(words))
        await console.screenshot("chat")
        sent = llm.requests[-1]
        assert sent["stream"] is True and sent["messages"][-1]["content"] == "Does streaming work?"

        # The same turn recorded as a session (POST /chat) shows up in the session history.
        llm.reply("Recorded.", chunks=["Recorded", "."])
        await console.page.check("#chat-record")
        await console.page.fill("#chat-input", "Keep this one")
        await console.page.click("#chat-send")
        await expect(answer.nth(1).locator(".answer")).to_have_text("Recorded.", timeout=10_000)
        await expect(console.page.locator("#chat-sessions li")).to_have_count(1)

        # Its history, then a replay of the recorded turn against the model as it answers now.
        await console.page.locator("#chat-sessions li a").click()
        await expect(console.page.locator("#chat-sessions .msg.user").last).to_contain_text("Keep this one")
        llm.reply("Replayed differently.", chunks=["Replayed ", "differently."])
        await console.page.get_by_role("button", name="Replay").last.click()  # the recorded answer's turn
        compared = console.page.locator("#chat-sessions .grid2")
        await expect(compared).to_contain_text("recorded")
        await expect(compared).to_contain_text("Recorded.")
        await expect(compared).to_contain_text("Replayed differently.")
        assert llm.requests[-1]["messages"][-1]["content"] == "Keep this one"  # the same turn, sent again

    # What the gateway metered for the two turns is drawn on the usage page.
    async def metered() -> int:
        resp = await client.get("/usage", params={"project": project["id"]}, headers=developer)
        return int(resp.json()["totals"]["requests"] >= 2 and resp.json()["totals"]["requests"])

    requests = await eventually(metered)
    await console.open("#/usage")
    counter = console.page.locator("#usage-charts .counter", has_text="requests").locator("strong")
    await expect(counter).to_have_text(str(requests))
    today = console.page.locator("#usage-charts figure", has_text="Requests per day").locator("rect.bar").last
    await expect(today).to_be_visible()  # today's bar has a height: the requests are drawn
    await console.screenshot("usage-with-traffic")
    console.assert_clean()
    await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)
