from support import ADMIN


async def test_health_and_readiness_answer_without_credentials(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/readiness")
    assert ready.status_code == 200
    assert ready.json()["checks"]["migrations"]["ok"] is True


async def test_create_and_list_project(client):
    resp = await client.post("/projects", json={"name": "alpha"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    names = [p["name"] for p in (await client.get("/projects", headers=ADMIN)).json()["items"]]
    assert "alpha" in names
