"""MLflow for the tests: a real tracking server on loopback (its own SQLite store and artifact
folder), one per run, with a real scikit-learn model logged and registered there by MLflow's
own client. Fixtures are registered by the conftest of the directories that use them.

MLflow's server and its full client live in MLServer's environment (`.venv-mlserver`), so the
server runs from there and the logging runs there in a subprocess; Converge talks to it with the
`mlflow` client of its own environment, as in production.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from services import free_port, wait_for_http

from converge.config import MlflowSettings, Settings
from converge.serving.v2 import find_mlserver_venv


def _mlserver_venv() -> Path | None:
    try:
        return find_mlserver_venv()
    except FileNotFoundError:
        return None


VENV = _mlserver_venv()
MLFLOW = VENV / "bin" / "mlflow" if VENV is not None else None
NO_MLFLOW = "MLflow's server is not installed (.venv-mlserver/bin/mlflow): run `make mlserver-venv`"

# Trains a 3-class LogisticRegression and registers it three times under one name: version 1
# as a cloudpickle (the pickle allow-list judges it), version 2 as skops (MLflow's default), and
# version 3 as a folder whose model.pkl runs a shell command when unpickled. A run with a short
# metric history is logged beside them. Prints what the tests compare against.
LOG_AND_REGISTER = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np
import mlflow, mlflow.sklearn
from mlflow import MlflowClient
from mlflow.models import infer_signature
from sklearn.linear_model import LogisticRegression

uri, out, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
mlflow.set_tracking_uri(uri)
rng = np.random.default_rng(7)
centres = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
X = np.concatenate([c + rng.normal(scale=0.3, size=(50, 4)) for c in centres])
y = np.repeat([0, 1, 2], 50)
model = LogisticRegression(max_iter=1000).fit(X, y)
signature = infer_signature(X, y)
experiment = mlflow.set_experiment("converge-tests/iris")
with mlflow.start_run(run_name="train") as run:
    mlflow.log_param("max_iter", 1000)
    for step, loss in enumerate([0.9, 0.5, 0.25]):
        mlflow.log_metric("loss", loss, step=step)
    mlflow.sklearn.log_model(
        model, name="pickled", registered_model_name=name, signature=signature,
        serialization_format="cloudpickle", pip_requirements=["scikit-learn"],
    )
    mlflow.sklearn.log_model(
        model, name="skops", registered_model_name=name, signature=signature, pip_requirements=["scikit-learn"],
    )
with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "hostile"
    mlflow.sklearn.save_model(model, str(folder), serialization_format="pickle", pip_requirements=["scikit-learn"])
    marker = out / "pwned"
    (folder / "model.pkl").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with mlflow.start_run(run_name="hostile") as bad:
        mlflow.log_artifacts(str(folder), "model")
    MlflowClient().create_model_version(name, source=f"{bad.info.artifact_uri}/model", run_id=bad.info.run_id)
probe = rng.normal(loc=5.0, scale=1.5, size=(12, 4)).round(3)
print(json.dumps({
    "experiment_id": experiment.experiment_id,
    "run_id": run.info.run_id,
    "hostile_run_id": bad.info.run_id,
    "marker": str(marker),
    "rows": probe.tolist(),
    "predict": model.predict(probe).tolist(),
}))
"""


@dataclass(frozen=True)
class Tracking:
    uri: str
    model_name: str  # the registered model: versions 1 (cloudpickle), 2 (skops), 3 (hostile)
    logged: dict[str, Any]  # what LOG_AND_REGISTER printed


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """The server and the workers it started (its own session, so its group is its pid)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if MLFLOW is None or not MLFLOW.is_file():
        pytest.skip(NO_MLFLOW)
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    argv = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    argv += ["--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
    # No job runner (huey consumers: more processes importing MLflow), which nothing here uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, env=env
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, log, timeout=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_group(proc)


@pytest.fixture(scope="session")
def tracking(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Tracking:
    assert VENV is not None
    out = tmp_path_factory.mktemp("mlflow-logged")
    name = "converge-tests-iris"
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", LOG_AND_REGISTER, mlflow_server, str(out), name],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Tracking(
        uri=mlflow_server, model_name=name, logged=json.loads(proc.stdout.strip().splitlines()[-1])
    )


def with_mlflow(settings: Settings, uri: str | None, **fields: Any) -> Settings:
    return settings.model_copy(update={"mlflow": MlflowSettings(tracking_uri=uri, **fields)})


@pytest.fixture
def configured(app: Any, tracking: Tracking, monkeypatch: pytest.MonkeyPatch) -> Tracking:
    """The session app's API reads the test server (its workers keep their own settings)."""
    state = app.state.converge
    monkeypatch.setattr(state, "settings", with_mlflow(state.settings, tracking.uri))
    return tracking
