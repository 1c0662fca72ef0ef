"""A hostile model that got past registration still cannot run code in a V2 replica.

Real replicas (MLServer from its own environment): the scikit-learn path loads through the
restricted joblib unpickler, the MLflow path with restricted pickle functions, so a gadget
fails the load instead of running. Skipped when `.venv-mlserver` is missing.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import free_port

from converge.serving.v2 import find_mlserver_venv

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("v2-replicas")]


def _mlserver() -> Path | None:
    try:
        return find_mlserver_venv()
    except FileNotFoundError:
        return None


needs_mlserver = pytest.mark.skipif(_mlserver() is None, reason="MLServer's environment is missing")


class Plants:
    """Unpickling this would create a file; the tests check that it never appears."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


def _run_replica(model_path: Path, log: Path) -> tuple[int, str]:
    argv = [sys.executable, "-m", "converge.serving", "v2", "--model-path", str(model_path)]
    argv += ["--model-name", "hostile", "--port", str(free_port()), "--ready-timeout", "90"]
    with log.open("wb") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=180, check=False).returncode
    return code, log.read_text(errors="replace")


@needs_mlserver
def test_sklearn_replica_refuses_a_pickle_gadget(tmp_path: Path) -> None:
    target = tmp_path / "planted"
    model = tmp_path / "model.joblib"
    model.write_bytes(pickle.dumps(Plants(target), protocol=0))
    code, log = _run_replica(model, tmp_path / "replica.log")
    assert code == 1, log
    assert "refused to load" in log
    assert not target.exists()


@needs_mlserver
def test_mlflow_replica_refuses_a_pickle_gadget(tmp_path: Path) -> None:
    if not (_mlserver() / "bin" / "mlflow").exists():  # type: ignore[operator]
        pytest.skip("mlflow is not installed in MLServer's environment")
    target = tmp_path / "planted"
    folder = tmp_path / "mlflow-model"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps(Plants(target), protocol=4))
    (folder / "MLmodel").write_text(
        "flavors:\n"
        "  python_function:\n    loader_module: mlflow.sklearn\n    model_path: model.pkl\n"
        "    python_version: 3.11.7\n"
        "  sklearn:\n    pickled_model: model.pkl\n    serialization_format: cloudpickle\n"
        "    sklearn_version: 1.9.1\n"
        "mlflow_version: 3.17.2\n"
    )
    code, log = _run_replica(folder, tmp_path / "replica.log")
    assert code == 1, log
    assert "refused to load posix.system" in log or "refused to load os.system" in log
    assert not target.exists(), log
