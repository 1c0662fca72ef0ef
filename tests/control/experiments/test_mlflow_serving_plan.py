"""How a V2 replica serves an MLflow folder, decided from its MLmodel before anything loads:
the scikit-learn flavour by the restricted scikit-learn loader (its file, its signature), other
flavours by MLflow's runtime unless the folder would make MLflow import code of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converge.serving.v2.formats import mlflow_code_problem, mlflow_sklearn

SIGNATURE = json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 4]}}])


def _folder(tmp_path: Path, mlmodel: str, *files: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    (folder / "MLmodel").write_text(mlmodel)
    for name in files:
        (folder / name).write_bytes(b"\x80\x04N.")
    return folder


def test_the_sklearn_flavour_names_its_file_serialization_and_signature(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        "flavors:\n  sklearn:\n    pickled_model: model.skops\n    serialization_format: skops\n"
        f"signature:\n  inputs: '{SIGNATURE}'\n",
        "model.skops",
    )
    plan = mlflow_sklearn(folder)
    assert plan is not None
    assert plan.model_file == (folder / "model.skops").resolve() and plan.serialization == "skops"
    assert plan.inputs == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]


def test_columns_leave_the_inputs_undeclared_and_other_flavours_have_no_sklearn_plan(tmp_path: Path) -> None:
    columns = json.dumps([{"type": "double", "name": "a"}, {"type": "double", "name": "b"}])
    folder = _folder(
        tmp_path,
        f"flavors:\n  sklearn:\n    pickled_model: model.pkl\nsignature:\n  inputs: '{columns}'\n",
        "model.pkl",
    )
    plan = mlflow_sklearn(folder)
    assert plan is not None and plan.inputs == [] and plan.serialization == "cloudpickle"
    onnx = _folder(tmp_path / "o", "flavors:\n  onnx:\n    data: model.onnx\n")
    assert mlflow_sklearn(onnx) is None


@pytest.mark.parametrize(
    ("flavour", "message"),
    [
        ("    pickled_model: ../outside.pkl\n", "names no model file inside"),
        ("    pickled_model: missing.pkl\n", "names no model file inside"),
        ("    pickled_model: model.pkl\n    serialization_format: dill\n", "'dill' is not one we load"),
    ],
)
def test_a_sklearn_flavour_we_cannot_load_restricted_is_refused(
    tmp_path: Path, flavour: str, message: str
) -> None:
    (tmp_path / "outside.pkl").write_bytes(b"\x80\x04N.")
    folder = _folder(tmp_path, f"flavors:\n  sklearn:\n{flavour}", "model.pkl")
    with pytest.raises(ValueError, match=message):
        mlflow_sklearn(folder)


def test_a_folder_that_would_make_mlflow_import_its_own_code_is_refused(tmp_path: Path) -> None:
    shipped = _folder(
        tmp_path / "a",
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n    code: code\n",
    )
    assert "ships code" in (mlflow_code_problem(shipped) or "")
    foreign = _folder(tmp_path / "b", "flavors:\n  python_function:\n    loader_module: my_loader\n")
    assert "'my_loader', a module outside MLflow" in (mlflow_code_problem(foreign) or "")
    plain = _folder(
        tmp_path / "c", "flavors:\n  python_function:\n    loader_module: mlflow.onnx\n    code: null\n"
    )
    assert mlflow_code_problem(plain) is None
