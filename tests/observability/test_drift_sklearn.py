"""Input drift end to end: a real scikit-learn model served by MLServer over V2, behind the
gateway. Inputs like its training data make the first window the reference and do not drift; a
shifted feature rises past the threshold on GET /deployments/{id}/drift and in /metrics; a
reference put from training rows replaces it; another project sees nothing. The reference API's
refusals need no replica.

The model is trained by MLServer's own Python (`make mlserver-venv`), like tests/serving/test_v2.py;
the real-replica test skips without it.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from services import stop_process, wait_for_http
from support import ADMIN, eventually, free_port, make_key, make_project

from converge.models import Build
from converge.serving.v2 import find_mlserver_venv

pytestmark = pytest.mark.xdist_group("v2-replicas")  # MLServer processes: one worker at a time

MODEL = f"iris-drift-{uuid.uuid4().hex[:8]}"  # the library model's name is the name replicas serve
CENTRES = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
TRAIN = """
import sys
from pathlib import Path
import joblib, numpy as np
from sklearn.linear_model import LogisticRegression
centres = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
rng = np.random.default_rng(11)
X = np.concatenate([c + rng.normal(scale=0.3, size=(200, 4)) for c in centres])
joblib.dump(LogisticRegression(max_iter=1000).fit(X, np.repeat([0, 1, 2], 200)), Path(sys.argv[1]) / "iris.joblib")
"""


def like_training(rng: np.random.Generator, n: int, *, shift: float = 0.0) -> np.ndarray:
    """Rows drawn as the training data was; `shift` moves feature 2 (petal length, in cm)."""
    rows = CENTRES[rng.integers(0, 3, size=n)] + rng.normal(scale=0.3, size=(n, 4))
    rows[:, 2] += shift
    return rows.round(3)


def mlserver_venv() -> Path | None:
    try:
        return find_mlserver_venv()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    venv = mlserver_venv()
    if venv is None:
        pytest.skip("MLServer's environment (.venv-mlserver) is missing: run `make mlserver-venv`")
    folder = tmp_path_factory.mktemp("drift")
    subprocess.run([str(venv / "bin" / "python"), "-c", TRAIN, str(folder)], check=True, timeout=300)
    port, log = free_port(), folder / "replica.log"
    argv = [sys.executable, "-m", "converge.serving", "v2", "--model-path", str(folder / "iris.joblib")]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--model-name", MODEL, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health/ready", proc, log, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


async def v2_deployment(
    app: Any,
    client: httpx.AsyncClient,
    project: dict[str, Any],
    *,
    model: str,
    server: str = "v2",
    name: str = "iris",
) -> dict[str, Any]:
    """An approved, built version of a new library model, deployed in `project` (the session
    app's fake runtime runs no process: a test points it at a replica with serve_at)."""
    approver = await client.post(
        "/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN
    )
    approver_key = {"Authorization": f"Bearer {approver.json()['token']}"}
    created = (await client.post("/models", json={"name": model}, headers=ADMIN)).json()
    version = await client.post(
        f"/models/{created['id']}/versions/upload",
        params={"version": "v1", "filename": "model.joblib"},
        content=f"converge drift test {uuid.uuid4().hex}\n".encode(),
        headers={**ADMIN, "content-type": "application/octet-stream"},
    )
    approved = await client.post(
        f"/models/{created['id']}/versions/{version.json()['id']}/approve", json={}, headers=approver_key
    )
    assert approved.json()["state"] == "approved", approved.text
    state = app.state.converge
    async with (state.session_factory or state.sessions)() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project["id"]),
                model_version_id=uuid.UUID(version.json()["id"]),
                profile="cpu",
                server=server,
                state="succeeded",
                results={},
                created_by="test",
            )
        )
    body = {
        "name": name,
        "model_version_id": version.json()["id"],
        "server": server,
        "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
        "replicas": {"min": 1, "max": 1},
    }
    resp = await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


def scraped(exposition: str, name: str, deployment: str) -> dict[str, float]:
    """One metric's values by feature, for one deployment."""
    return {
        sample.labels["feature"]: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and sample.labels.get("deployment") == deployment
    }


@pytest.mark.slow
async def test_a_shifted_feature_drifts_on_the_api_and_in_metrics(
    app: Any, committed_client: httpx.AsyncClient, replica: str
) -> None:
    client, state = committed_client, app.state.converge
    drift = state.gateway.v2.drift
    saved = drift.config
    # Windows close as soon as they hold window_rows (1000) rows, instead of a minute apart.
    drift.config = saved.model_copy(update={"window_min_s": 0.0})
    project = await make_project(client)
    deployment = await v2_deployment(app, client, project, model=MODEL)
    deployment_id = uuid.UUID(deployment["id"])
    try:
        state.runtime.serve_at(deployment_id, [replica])
        key = await make_key(client, project["id"], "developer")
        await eventually(
            lambda: (
                len(getattr(state.gateway.dataplane.snapshot.by_id.get(deployment_id), "endpoints", ())) == 1
            )
        )
        rng = np.random.default_rng(21)

        async def infer(rows: np.ndarray) -> None:
            tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.tolist()}
            resp = await client.post("/v2/models/iris/infer", json={"inputs": [tensor]}, headers=key)
            assert resp.status_code == 200, resp.text

        async def window(shift: float) -> dict[str, Any]:
            for _ in range(2):
                await infer(like_training(rng, 500, shift=shift))
            await drift.once()  # count and write now instead of within flush_s
            resp = await client.get(f"/deployments/{deployment_id}/drift", headers=key)
            assert resp.status_code == 200, resp.text
            return resp.json()

        # A refused request is not counted: the replica answers 400 to the wrong width.
        bad = {"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP64", "data": [1.0, 2.0, 3.0]}]}
        assert (await client.post("/v2/models/iris/infer", json=bad, headers=key)).status_code == 400

        first = await window(0.0)  # the first full window becomes the reference
        assert first["reference"]["source"] == "first_window" and first["reference"]["rows"] == 1000
        assert first["reference"]["revision"] == first["revision"] == 1
        assert first["window"] is None and first["drifting"] is False

        stable = await window(0.0)
        assert stable["window"]["rows"] == 1000 and stable["threshold"] == 0.2
        assert [f["name"] for f in stable["features"]] == ["0", "1", "2", "3"]
        assert all(f["psi"] < 0.1 and f["ks"] < 0.1 and not f["drifting"] for f in stable["features"]), stable

        shifted = await window(2.0)
        by_name = {f["name"]: f for f in shifted["features"]}
        assert shifted["drifting"] is True
        assert by_name["2"]["drifting"] and by_name["2"]["psi"] > 0.2 and by_name["2"]["ks"] > 0.3
        assert by_name["2"]["window_mean"] == pytest.approx(by_name["2"]["reference_mean"] + 2.0, abs=0.3)
        assert not any(by_name[n]["drifting"] for n in ("0", "1", "3"))

        label = f"{project['name']}/iris"
        exposition = (await client.get("/metrics")).text
        psi, ks = (
            scraped(exposition, "converge_drift_psi", label),
            scraped(exposition, "converge_drift_ks", label),
        )
        assert set(psi) == set(ks) == {"0", "1", "2", "3"}
        assert psi["2"] == pytest.approx(by_name["2"]["psi"]) and psi["2"] > 0.2 > psi["0"]
        assert ks["2"] == pytest.approx(by_name["2"]["ks"])

        # Another project's key: the deployment does not exist for it.
        other = await make_project(client)
        stranger = await make_key(client, other["id"], "owner")
        assert (await client.get(f"/deployments/{deployment_id}/drift", headers=stranger)).status_code == 404
        put = await client.put(
            f"/deployments/{deployment_id}/drift/reference",
            json={"rows": [[1, 2, 3, 4]] * 10},
            headers=stranger,
        )
        assert put.status_code == 404

        # A reference from the training data replaces the first window; the gateway adopts it.
        training = like_training(np.random.default_rng(11), 600).tolist()
        put = await client.put(
            f"/deployments/{deployment_id}/drift/reference", json={"rows": training}, headers=key
        )
        assert put.status_code == 200, put.text
        assert put.json()["source"] == "training" and put.json()["rows"] == 600
        await drift.once()
        against_training = await window(2.0)
        assert against_training["reference"]["source"] == "training"
        assert {f["name"] for f in against_training["features"] if f["drifting"]} == {"2"}
    finally:
        drift.config = saved
        await client.delete(f"/deployments/{deployment_id}", headers=ADMIN)


async def test_the_reference_api_refuses_what_it_cannot_use(app: Any, client: httpx.AsyncClient) -> None:
    project = await make_project(client)
    deployment = await v2_deployment(app, client, project, model=f"ref-{uuid.uuid4().hex[:8]}")
    url = f"/deployments/{deployment['id']}/drift/reference"
    refused = {
        "rows": {"rows": [[1.0, 2.0]] * 9 + [[1.0]]},  # ragged
        "features.0": {"features": [{"name": "0", "edges": [0, 2, 1], "counts": [1, 1]}]},
        "": {"rows": [[1.0]] * 10, "features": [{"name": "0", "edges": [0, 1, 2], "counts": [1, 1]}]},
    }
    for field, body in refused.items():
        resp = await client.put(url, json=body, headers=ADMIN)
        assert resp.status_code == 422, resp.text
        assert field in [e["field"] for e in resp.json()["errors"]], resp.json()
    too_wide = await client.put(url, json={"rows": [[0.0] * 65] * 10}, headers=ADMIN)
    assert too_wide.status_code == 422 and too_wide.json()["field"] == "rows", too_wide.text

    viewer = await make_key(client, project["id"], "viewer")
    assert (await client.put(url, json={"rows": [[1.0]] * 10}, headers=viewer)).status_code == 403
    histogram = {"features": [{"name": "age", "edges": [18, 30, 45, 65, 90], "counts": [10, 30, 40, 20]}]}
    put = await client.put(url, json=histogram, headers=ADMIN)
    assert put.status_code == 200, put.text
    (feature,) = put.json()["features"]
    assert feature["edges"] == [30, 45, 65] and feature["counts"] == [10, 30, 40, 20]  # outer bins open
    report = (await client.get(f"/deployments/{deployment['id']}/drift", headers=viewer)).json()
    assert report["reference"]["source"] == "training" and report["window"] is None
    assert (
        report["features"][0] | {"psi": None, "drifting": False, "window_count": 0} == report["features"][0]
    )
    assert (await client.delete(url, headers=ADMIN)).status_code == 204
    assert (await client.delete(url, headers=ADMIN)).status_code == 404
    assert (await client.get(f"/deployments/{deployment['id']}/drift", headers=viewer)).json()[
        "reference"
    ] is None

    chat = await v2_deployment(
        app, client, project, model=f"chat-{uuid.uuid4().hex[:8]}", server="llama-cpp", name="chat"
    )
    other = await client.put(
        f"/deployments/{chat['id']}/drift/reference", json={"rows": [[1.0]] * 10}, headers=ADMIN
    )
    assert other.status_code == 409 and "V2 deployments" in other.json()["detail"]
