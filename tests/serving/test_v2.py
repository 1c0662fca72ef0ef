"""The V2 (Open Inference Protocol) replica: request checks in-process, then real replicas.

scikit-learn and MLflow models are served by MLServer from its own environment
(`make mlserver-venv`); those tests skip when it is missing. The models are trained and saved
by MLServer's own Python, so they unpickle with the very library versions that serve them.
ONNX models are served by onnxruntime in this environment and need no MLServer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from support import free_port

from converge.control.builds.benchmark import benchmark_v2
from converge.serving.v2 import V2Error, check_inputs, find_mlserver_venv, parse_infer_request

pytestmark = pytest.mark.xdist_group("v2-replicas")  # one worker: the replicas are shared fixtures


def mlserver_venv() -> Path | None:
    try:
        return find_mlserver_venv()
    except FileNotFoundError:
        return None


MLSERVER = mlserver_venv()
needs_mlserver = pytest.mark.skipif(
    MLSERVER is None, reason="MLServer's environment (.venv-mlserver) is missing: run `make mlserver-venv`"
)

# ---------------------------------------------------------------------------------------------
# Request checks, in-process


def tensor(**overrides: Any) -> dict[str, Any]:
    return {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]], **overrides}


def body(*tensors: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(tensors)}).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (body(), "non-empty list"),
        (body(tensor(shape=[2, 2])), "needs 4 elements, 'data' holds 6"),
        (body(tensor(shape=[2, -3])), "non-negative integers"),
        (body(tensor(datatype="FLOAT")), "'datatype' must be one of"),
        (body(tensor(data=["a", "b", "c", "d", "e", "f"])), "not FP32"),
        (body(tensor(datatype="INT64", data=[1.5, 2, 3, 4, 5, 6])), "not INT64"),
        (body(tensor(), tensor()), "more than once"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(V2Error, match=message) as caught:
        parse_infer_request(raw)
    assert caught.value.status_code == 400


def test_inputs_are_checked_against_what_the_model_declares() -> None:
    declared = [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    good = parse_infer_request(body(tensor()))["inputs"]
    assert check_inputs(good, declared, by_name=True, exact_datatype=True)[0][1]["name"] == "x"
    with pytest.raises(V2Error, match=r"shape \[2, 3\]; the model takes 'x' FP32 \[\?, 4\]"):
        check_inputs(good, [{**declared[0], "shape": [-1, 4]}], by_name=True, exact_datatype=True)
    with pytest.raises(V2Error, match="is FP32; the model expects FP64"):
        check_inputs(good, [{**declared[0], "datatype": "FP64"}], by_name=True, exact_datatype=True)
    # scikit-learn converts numbers itself, and ignores the tensor's name
    assert check_inputs(
        good, [{**declared[0], "name": "input-0", "datatype": "FP64"}], by_name=False, exact_datatype=False
    )
    with pytest.raises(V2Error, match="unknown input 'x'"):
        check_inputs(good, [{**declared[0], "name": "y"}], by_name=True, exact_datatype=True)


# ---------------------------------------------------------------------------------------------
# Real replicas


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                assert self.proc.poll() is None, f"replica exited with {self.proc.returncode}:\n{self.logs()}"
                assert time.monotonic() < deadline, f"not ready within {timeout} s:\n{self.logs()}"
                try:
                    if client.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def launch(model_path: Path, name: str, log: Path, **env: str) -> Replica:
    port = free_port()
    argv = [sys.executable, "-m", "converge.serving", "v2", "--model-path", str(model_path)]
    argv += ["--model-name", name, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    return Replica(proc=proc, url=f"http://127.0.0.1:{port}", log=log)


# Trains a 3-class LogisticRegression on iris-like data and saves it as a joblib file and as an
# MLflow model; writes the rows it will be asked about and its own predictions for them.
TRAIN = """
import json, sys
from pathlib import Path
import joblib, numpy as np
from sklearn.linear_model import LogisticRegression
out = Path(sys.argv[1])
rng = np.random.default_rng(7)
centres = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
X = np.concatenate([c + rng.normal(scale=0.3, size=(50, 4)) for c in centres])
y = np.repeat([0, 1, 2], 50)
model = LogisticRegression(max_iter=1000).fit(X, y)
joblib.dump(model, out / "iris.joblib")
probe = rng.normal(loc=5.0, scale=1.5, size=(12, 4)).round(3)
(out / "probe.json").write_text(json.dumps({"rows": probe.tolist(), "predict": model.predict(probe).tolist()}))
if sys.argv[2] == "mlflow":
    import mlflow.sklearn
    from mlflow.models import infer_signature
    mlflow.sklearn.save_model(
        model, str(out / "iris-mlflow"), signature=infer_signature(X, y), pip_requirements=["scikit-learn"]
    )
"""


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    if MLSERVER is None:
        pytest.skip("MLServer's environment (.venv-mlserver) is missing: run `make mlserver-venv`")
    folder = tmp_path_factory.mktemp("iris")
    with_mlflow = (MLSERVER / "bin" / "mlflow").exists()
    subprocess.run(
        [str(MLSERVER / "bin" / "python"), "-c", TRAIN, str(folder), "mlflow" if with_mlflow else "-"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return folder, json.loads((folder / "probe.json").read_text())


@pytest.fixture(scope="module")
def sklearn_replica(
    iris: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    folder, _ = iris
    replica = launch(folder / "iris.joblib", "iris", tmp_path_factory.mktemp("logs") / "sklearn.log")
    try:
        replica.wait_ready()
        yield replica
    finally:
        replica.stop()


def infer_request(rows: list[list[float]], datatype: str = "FP64") -> dict[str, Any]:
    shape = [len(rows), len(rows[0])]
    return {"inputs": [{"name": "features", "shape": shape, "datatype": datatype, "data": rows}]}


@pytest.mark.slow
@needs_mlserver
def test_sklearn_predictions_match_the_model_and_are_counted(
    sklearn_replica: Replica, iris: tuple[Path, dict[str, Any]]
) -> None:
    _, probe = iris
    with httpx.Client(base_url=sklearn_replica.url, timeout=30) as client:
        before = client.get("/converge/stats").json()
        meta = client.get("/v2/models/iris").json()
        assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
        response = client.post("/v2/models/iris/infer", json=infer_request(probe["rows"]))
        assert response.status_code == 200, response.text
        (output,) = response.json()["outputs"]
        assert output["name"] == "predict"
        assert np.asarray(output["data"]).ravel().tolist() == probe["predict"]
        # FP32 feeds a FP64 model too (scikit-learn converts); probabilities on request
        request = {**infer_request(probe["rows"][:2], "FP32"), "outputs": [{"name": "predict_proba"}]}
        proba = client.post("/v2/models/iris/infer", json=request).json()["outputs"][0]
        assert proba["shape"] == [2, 3] and abs(sum(proba["data"][:3]) - 1) < 1e-6
        after = client.get("/converge/stats").json()
    assert after["requests_total"] - before["requests_total"] == 2
    assert after["in_flight"] == 0 and after["kind"] == "v2" and after["model"] == "iris"


@pytest.mark.slow
@needs_mlserver
def test_sklearn_bad_input_is_a_400_with_a_reason(sklearn_replica: Replica) -> None:
    with httpx.Client(base_url=sklearn_replica.url, timeout=30) as client:
        wrong_width = client.post("/v2/models/iris/infer", json=infer_request([[1.0, 2.0, 3.0]]))
        assert wrong_width.status_code == 400
        assert "the model takes 'input-0' FP64 [?, 4]" in wrong_width.json()["error"]
        short = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}
        assert "needs 8 elements" in client.post("/v2/models/iris/infer", json=short).json()["error"]
        text = client.post("/v2/models/iris/infer", json=infer_request([["a", "b", "c", "d"]], "BYTES"))
        assert text.status_code == 400 and "expects FP64" in text.json()["error"]
        not_json = client.post("/v2/models/iris/infer", content=b"rows please")
        assert not_json.status_code == 400
        assert client.get("/v2/models/other/ready").status_code == 404  # MLServer's own answer


@pytest.mark.slow
@needs_mlserver
def test_mlflow_model_serves_and_sigterm_stops_mlserver_too(
    iris: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, probe = iris
    if not (folder / "iris-mlflow").exists():
        pytest.skip("mlflow is not installed in MLServer's environment")
    replica = launch(folder / "iris-mlflow", "iris-flow", tmp_path / "mlflow.log")
    try:
        replica.wait_ready()
        children = psutil.Process(replica.proc.pid).children(recursive=True)
        assert any("mlserver" in " ".join(child.cmdline()) for child in children)
        with httpx.Client(base_url=replica.url, timeout=30) as client:
            meta = client.get("/v2/models/iris-flow").json()
            assert meta["inputs"][0]["shape"] == [-1, 4]  # from the MLflow signature
            response = client.post("/v2/models/iris-flow/infer", json=infer_request(probe["rows"]))
            assert response.status_code == 200, response.text
            assert np.asarray(response.json()["outputs"][0]["data"]).ravel().tolist() == probe["predict"]
            # MLflow enforces its signature's dtype: refused here, not with a 500 from MLServer
            fp32 = client.post("/v2/models/iris-flow/infer", json=infer_request(probe["rows"], "FP32"))
            assert fp32.status_code == 400 and "expects FP64" in fp32.json()["error"]
    finally:
        code = replica.stop()
    assert code == 0, replica.logs()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_a_missing_mlserver_environment_fails_the_load_clearly(tmp_path: Path) -> None:
    model = tmp_path / "model.joblib"
    model.write_bytes(b"\x80\x04not really a model")
    replica = launch(model, "m", tmp_path / "missing.log", CONVERGE_MLSERVER_VENV=str(tmp_path / "nowhere"))
    assert replica.proc.wait(timeout=60) == 1
    assert "MLServer's environment was not found" in replica.logs()
    assert "make mlserver-venv" in replica.logs()


# ---------------------------------------------------------------------------------------------
# ONNX on onnxruntime


@pytest.fixture(scope="module")
def onnx_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from onnx import TensorProto, checker, helper, save

    folder = tmp_path_factory.mktemp("onnx")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "one"], ["y"]),
        ],
        "affine",
        [x],
        [y],
        [
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    checker.check_model(model)
    save(model, str(folder / "affine.onnx"))
    replica = launch(folder / "affine.onnx", "affine", folder / "replica.log")
    try:
        replica.wait_ready()
        yield replica
    finally:
        assert replica.stop() == 0


@pytest.mark.slow
def test_onnx_infers_y_equals_2x_plus_1(onnx_replica: Replica) -> None:
    with httpx.Client(base_url=onnx_replica.url, timeout=30) as client:
        meta = client.get("/v2/models/affine").json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert client.get("/v2/models/affine/ready").status_code == 200
        before = client.get("/converge/stats").json()["requests_total"]
        request = {
            "id": "r1",
            "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [0, 0.5, -1]]}],
        }
        response = client.post("/v2/models/affine/infer", json=request)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "model_name": "affine",
            "id": "r1",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [3, 5, 7, 1, 2, -1]}],
        }
        assert client.get("/converge/stats").json()["requests_total"] == before + 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tensor_", "message"),
    [
        (
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            "the model takes 'x' FP32 [?, 3]",
        ),
        (
            {"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]},
            "is FP64; the model expects FP32",
        ),
        ({"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}, "unknown input 'z'"),
        ({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}, "needs 3 elements"),
    ],
)
def test_onnx_bad_input_is_a_400_with_a_reason(
    onnx_replica: Replica, tensor_: dict[str, Any], message: str
) -> None:
    response = httpx.post(
        f"{onnx_replica.url}/v2/models/affine/infer", json={"inputs": [tensor_]}, timeout=30
    )
    assert response.status_code == 400
    assert message in response.json()["error"]


@pytest.mark.slow
def test_onnx_unknown_model_or_output(onnx_replica: Replica) -> None:
    assert httpx.get(f"{onnx_replica.url}/v2/models/other", timeout=30).status_code == 404
    request = {
        "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
        "outputs": [{"name": "logits"}],
    }
    response = httpx.post(f"{onnx_replica.url}/v2/models/affine/infer", json=request, timeout=30)
    assert response.status_code == 400 and "unknown output 'logits'" in response.json()["error"]


# ---------------------------------------------------------------------------------------------
# The build benchmark


@pytest.mark.slow
async def test_benchmark_v2_on_onnx_derives_its_request_from_the_model(onnx_replica: Replica) -> None:
    figures = await benchmark_v2(onnx_replica.url, "affine", batch=32, rounds=5)
    assert figures["rows_per_s"] > 0 and figures["batch"] == 32
    assert figures["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [32, 3]}]
    print("onnx", figures)


@pytest.mark.slow
@needs_mlserver
async def test_benchmark_v2_on_sklearn(sklearn_replica: Replica) -> None:
    figures = await benchmark_v2(sklearn_replica.url, "iris", batch=64, rounds=5)
    assert figures["rows_per_s"] > 0
    assert figures["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [64, 4]}]
    print("sklearn", figures)
