"""Input the database cannot store, or the server must not read, is a 4xx problem, never a 500.

Text with NUL or lone surrogates, non-finite numbers and integers past BIGINT are refused by
the `Input` base (bodies) and one app-wide dependency (query and path parameters); cursors are
checked before they are decoded; server paths are surveyed before a byte is copied.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from support import ADMIN

PROBLEM = "application/problem+json"


def _name() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


async def _post_raw(client: httpx.AsyncClient, url: str, text: str, method: str = "POST") -> httpx.Response:
    """JSON the client library would refuse to write (lone surrogates, Infinity) sent as is."""
    headers = {**ADMIN, "Content-Type": "application/json"}
    return await client.request(method, url, content=text.encode("utf-8", "surrogatepass"), headers=headers)


def _fields(resp: httpx.Response) -> list[str]:
    assert resp.headers["content-type"].startswith(PROBLEM), resp.text
    return [e["field"] for e in resp.json().get("errors", [])]


# --- request bodies ----------------------------------------------------------------------------


async def test_a_nul_character_in_a_body_field_is_a_422_naming_the_field(client):
    resp = await client.post("/projects", json={"name": _name(), "description": "a\x00b"}, headers=ADMIN)

    assert resp.status_code == 422
    assert _fields(resp) == ["description"]
    assert "NUL" in resp.json()["detail"]


async def test_a_lone_surrogate_in_a_body_field_is_a_422(client):
    body = json.dumps({"name": _name(), "description": "broken \ud800 text"})  # escaped: \\ud800

    resp = await _post_raw(client, "/projects", body)

    assert resp.status_code == 422
    assert _fields(resp) == ["description"]


async def test_nul_inside_lists_and_mapping_keys_is_refused_on_create_and_update(client):
    tags = await client.post("/models", json={"name": _name(), "tags": ["ok", "bad\x00"]}, headers=ADMIN)
    env = await client.patch(f"/deployments/{uuid.uuid4()}", json={"env": {"A": "1\x00"}}, headers=ADMIN)
    args = await client.patch(f"/deployments/{uuid.uuid4()}", json={"args": ["--x", "\x00"]}, headers=ADMIN)

    assert (tags.status_code, _fields(tags)) == (422, ["tags"])
    assert (env.status_code, _fields(env)) == (422, ["env"])
    assert (args.status_code, _fields(args)) == (422, ["args"])


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
async def test_a_number_that_is_not_finite_is_a_422(client, literal):
    body = json.dumps({"name": _name(), "quotas": {"cpu": "CPU"}}).replace('"CPU"', literal)

    resp = await _post_raw(client, "/projects", body)

    assert resp.status_code == 422
    assert _fields(resp) == ["quotas.cpu"]


async def test_integers_must_fit_a_bigint_and_come_back_as_integers(client):
    too_big = await client.post(
        "/projects", json={"name": _name(), "quotas": {"memory_bytes": 2**63}}, headers=ADMIN
    )
    largest = await client.post(
        "/projects", json={"name": _name(), "quotas": {"memory_bytes": 2**63 - 1}}, headers=ADMIN
    )

    assert too_big.status_code == 422
    assert _fields(too_big) == ["quotas.memory_bytes"]
    assert largest.status_code == 201, largest.text
    assert json.loads(largest.text)["quotas"]["memory_bytes"] == 2**63 - 1


async def test_a_revision_must_fit_the_integer_column(client):
    resp = await client.post(f"/deployments/{uuid.uuid4()}/rollback", json={"revision": 2**31}, headers=ADMIN)

    assert resp.status_code == 422
    assert _fields(resp) == ["revision"]


async def test_an_update_holds_the_same_list_limits_as_a_create(client):
    url = f"/deployments/{uuid.uuid4()}"
    no_zones = await client.patch(url, json={"zones": []}, headers=ADMIN)
    many_args = await client.patch(url, json={"args": ["x"] * 65}, headers=ADMIN)
    bad_env = await client.patch(url, json={"env": {"A=B": "1"}}, headers=ADMIN)

    assert (no_zones.status_code, _fields(no_zones)) == (422, ["zones"])
    assert (many_args.status_code, _fields(many_args)) == (422, ["args"])
    assert bad_env.status_code == 422


# --- query and path parameters -------------------------------------------------------------------


async def test_a_nul_in_a_query_parameter_is_a_422_naming_it(client):
    resp = await client.get("/audit", params={"action": "project\x00created"}, headers=ADMIN)

    assert resp.status_code == 422
    assert _fields(resp) == ["query.action"]


async def test_a_nul_in_a_path_parameter_is_a_422_naming_it(client):
    resp = await client.get("/ai-converge/builds/run%00ning", headers=ADMIN)

    assert resp.status_code == 422
    assert _fields(resp) == ["path.build_status_or_id"]


@pytest.mark.parametrize(
    "cursor",
    ["é", "%C3%A9", "!!!!", "__8", "AAAA", "x" * 500, "MTIz\u0661"],
    ids=["non-ascii", "percent-signs", "not-base64", "not-utf8", "nul-inside", "too-long", "arabic-digit"],
)
@pytest.mark.parametrize("path", ["/projects", "/models", "/events", "/audit", "/ai-converge/builds"])
async def test_a_garbage_cursor_is_a_400_problem_on_every_list(client, path, cursor):
    resp = await client.get(path, params={"cursor": cursor}, headers=ADMIN)

    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert "cursor" in resp.json()["detail"].lower()


# --- body size -------------------------------------------------------------------------------------


async def test_a_chunked_body_over_the_limit_is_a_413(client, settings):
    limit = settings.server.max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "x", "description": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    resp = await client.post(
        "/projects", content=chunks(), headers={**ADMIN, "Content-Type": "application/json"}
    )

    assert resp.status_code == 413
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert str(limit) in resp.json()["detail"]


# --- server paths ----------------------------------------------------------------------------------


@pytest.fixture
async def model(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:10]}"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _register(client: httpx.AsyncClient, model: dict[str, Any], uri: str) -> httpx.Response:
    return await client.post(
        f"/models/{model['id']}/versions", json={"version": "v1", "uri": uri}, headers=ADMIN
    )


@pytest.mark.parametrize(
    "uri",
    ["/", "//", "file:///", "/etc", "/etc/passwd", "/proc/self/environ", "/dev/zero", "/usr/bin", "/var"],
)
async def test_the_root_and_system_directories_cannot_be_registered(client, model, uri):
    resp = await _register(client, model, uri)

    assert resp.status_code == 403, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)


async def test_a_link_into_a_system_directory_is_judged_by_its_target(client, model, tmp_path):
    (tmp_path / "etc").symlink_to("/etc")

    resp = await _register(client, model, str(tmp_path / "etc" / "hostname"))

    assert resp.status_code == 403


async def test_the_data_directory_and_its_parents_cannot_be_registered(client, model, settings):
    inside = await _register(client, model, str(settings.data_dir / "artifacts"))
    above = await _register(client, model, str(settings.data_dir.parent))

    assert inside.status_code == above.status_code == 403


@pytest.mark.parametrize(
    ("uri", "status"),
    [("file://elsewhere/srv/model.gguf", 400), ("relative/model.gguf", 400), ("/srv/../etc", 400)],
)
async def test_server_paths_must_be_local_absolute_and_plain(client, model, uri, status):
    assert (await _register(client, model, uri)).status_code == status


async def test_a_named_pipe_is_refused_without_waiting_for_a_writer(client, model, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)

    resp = await _register(client, model, str(fifo))

    assert resp.status_code == 422
    assert "named pipe" in resp.json()["detail"]


async def test_a_directory_symlink_is_refused_at_the_top_and_inside(client, model, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "weights.bin").write_bytes(b"w" * 10)
    (tmp_path / "link").symlink_to(real)
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "config.json").write_text("{}")
    (holder / "sub").symlink_to(real)

    top = await _register(client, model, str(tmp_path / "link"))
    inside = await _register(client, model, str(holder))

    assert top.status_code == inside.status_code == 422
    assert "symlink" in top.json()["detail"] and "symlink" in inside.json()["detail"]


async def test_a_directory_holding_a_device_file_is_refused(client, model, tmp_path):
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "zero").symlink_to("/dev/zero")  # a file link is followed: to a device

    resp = await _register(client, model, str(holder))

    assert resp.status_code == 422
    assert "character device" in resp.json()["detail"]


async def test_a_path_over_the_size_limit_is_refused_before_it_is_copied(
    client, model, tmp_path, settings, monkeypatch
):
    monkeypatch.setattr(settings.library, "max_upload_bytes", 100)
    big = tmp_path / "big"
    big.mkdir()
    (big / "a.bin").write_bytes(b"a" * 60)
    (big / "b.bin").write_bytes(b"b" * 60)

    as_dir = await _register(client, model, str(big))
    as_file = await _register(client, model, str(big / "a.bin"))

    assert as_dir.status_code == 422
    assert "100 bytes" in as_dir.json()["detail"]
    assert as_file.status_code == 201, as_file.text  # 60 bytes fit


async def test_a_regular_file_and_a_plain_directory_are_still_registered(client, model, tmp_path):
    weights = tmp_path / "tree"
    (weights / "sub").mkdir(parents=True)
    (weights / "sub" / "w.bin").write_bytes(b"x" * 32)
    target = tmp_path / "blob.bin"
    target.write_bytes(b"y" * 16)
    (weights / "linked.bin").symlink_to(target)  # a file link, as in a Hugging Face snapshot

    resp = await _register(client, model, f"file://{weights}")

    assert resp.status_code == 201, resp.text
