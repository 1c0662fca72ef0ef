from support import ADMIN


async def test_health_and_readiness_answer_without_credentials(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/readiness")
    assert ready.status_code == 200
    assert ready.json()["checks"]["migrations"]["ok"] is True


async def test_create_and_list_project(client):
    resp = await client.post("/projects", json={"name": "alpha"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    names: list[str] = []
    params: dict[str, str] = {}
    while True:  # other tests' committed projects may come first: read every page
        page = (await client.get("/projects", params=params, headers=ADMIN)).json()
        names += [p["name"] for p in page["items"]]
        if not page["next_cursor"]:
            break
        params = {"cursor": page["next_cursor"]}
    assert "alpha" in names
