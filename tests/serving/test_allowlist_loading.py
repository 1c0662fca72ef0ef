"""Restricted loading in model servers: the same allow-list the scanner uses, enforced by find_class.

The unpickler must load every real model the scanner lets through and refuse every gadget,
and must work as a standalone file in MLServer's environment, which has no converge installed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import zlib
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from converge.core import pickle_allowlist
from converge.core.pickle_allowlist import find_allowed, restricted_loads
from converge.serving.v2 import find_mlserver_venv
from converge.serving.v2 import restricted as v2_restricted


class Plants:
    """Unpickling this would create a file; the tests check that it never appears."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


def _model() -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    features = rng.normal(size=(60, 3))
    labels = (features[:, 0] > 0).astype(int)
    return make_pipeline(StandardScaler(), HistGradientBoostingClassifier(max_iter=3)).fit(features, labels)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "getattr"),
        ("builtins", "eval"),
        ("__builtin__", "exec"),
        ("code", "InteractiveInterpreter"),
        ("functools", "partial"),
        ("operator", "attrgetter"),
        ("importlib", "import_module"),
        ("subprocess", "Popen"),
        ("numpy", "load"),
        ("numpy", "memmap"),
        ("numpy._core", "_ufunc_reconstruct"),  # imports any module by name
        ("joblib.numpy_pickle_compat", "NDArrayWrapper"),  # opens side files named by the pickle
        ("sklearn.utils.parallel", "delayed"),  # a function: the package rule is for classes
        ("sklearn.tests.test_base", "MyEstimator"),  # test modules are never imported
        ("sklearn.linear_model", "LogisticRegression.fit"),  # dotted: a method, not data
        ("sklearn.callback._progressbar", "Thread"),  # threading.Thread, re-exported
        ("numpy", "ndarray.tofile"),
    ],
)
def test_find_allowed_refuses_what_is_not_on_the_list(module: str, name: str) -> None:
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        find_allowed(module, name)


def test_python_2_names_map_to_the_python_3_objects_they_load() -> None:
    assert find_allowed("__builtin__", "set") is set
    assert find_allowed("copy_reg", "_reconstructor") is __import__("copyreg")._reconstructor


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy < 1.8 module paths, kept on purpose
def test_every_exact_entry_names_something_that_exists_here() -> None:
    # Catches typos in the list; every package named in it is installed in this environment.
    for full in sorted(pickle_allowlist.EXACT_GLOBALS):
        module, _, name = full.rpartition(".")
        find_allowed(module, name)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_loads_real_models_and_refuses_gadgets(protocol: int, tmp_path: Path) -> None:
    model = _model()
    loaded = restricted_loads(pickle.dumps(model, protocol=protocol))
    sample = np.zeros((2, 3))
    assert (loaded.predict(sample) == model.predict(sample)).all()
    target = tmp_path / "planted"
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load (posix|os)\.system"):
        restricted_loads(pickle.dumps(Plants(target), protocol=protocol))
    assert not target.exists()


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("xz", 3), ("bz2", 3)])
def test_restricted_joblib_load_reads_joblib_files(compress: Any, tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "model.joblib"
    joblib.dump({"model": model, "objects": np.array(["a", None], dtype=object)}, path, compress=compress)
    loaded = v2_restricted.restricted_joblib_load(path)
    assert (loaded["model"].predict(np.ones((1, 3))) == model.predict(np.ones((1, 3)))).all()
    assert loaded["objects"].tolist() == ["a", None]


def test_restricted_joblib_load_refuses_gadgets_in_object_arrays_too(tmp_path: Path) -> None:
    target = tmp_path / "planted"
    path = tmp_path / "model.joblib"
    joblib.dump(np.array([Plants(target)], dtype=object), path)  # a nested pickle inside joblib's
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        v2_restricted.restricted_joblib_load(path)
    joblib.dump(Plants(target), path, compress=3)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        v2_restricted.restricted_joblib_load(path)
    assert not target.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_restricted_joblib_load_refuses_the_pre_0_10_side_file_format(tmp_path: Path) -> None:
    payload = pickle.dumps([1, 2])
    path = tmp_path / "old.pkl"
    path.write_bytes(b"ZF" + f"{len(payload):#x}".ljust(19).encode() + zlib.compress(payload))
    with pytest.raises(pickle.UnpicklingError, match="side files"):
        v2_restricted.restricted_joblib_load(path)


def test_pickle_functions_are_restricted_only_while_a_model_loads(tmp_path: Path) -> None:
    original = pickle.load
    gadget = pickle.dumps(Plants(tmp_path / "planted"))
    with v2_restricted.restricted_pickle_functions():
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(gadget)
        with pytest.raises(pickle.UnpicklingError):
            pickle.load(io.BytesIO(gadget))
        assert pickle.loads(pickle.dumps({"a": 1})) == {"a": 1}
    assert pickle.load is original
    assert not (tmp_path / "planted").exists()


def test_install_copies_a_standalone_runtime_and_allow_list(tmp_path: Path) -> None:
    folder = v2_restricted.install(tmp_path / "support")
    runtime = (folder / "converge_v2_restricted.py").read_text()
    allowlist = (folder / "converge_pickle_allowlist.py").read_text()
    assert "import converge_pickle_allowlist" in runtime
    assert "from converge" not in allowlist and "import converge" not in allowlist


def _mlserver_python() -> Path:
    try:
        return find_mlserver_venv() / "bin" / "python"
    except FileNotFoundError:
        pytest.skip("MLServer's environment (.venv-mlserver) is missing: run `make mlserver-venv`")


def test_the_probe_in_mlservers_environment_loads_models_and_refuses_gadgets(tmp_path: Path) -> None:
    python = _mlserver_python()
    support = v2_restricted.install(tmp_path / "support")
    train = (
        "import sys, joblib, numpy as np\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "X = np.random.default_rng(0).normal(size=(30, 3)); y = (X[:, 0] > 0).astype(int)\n"
        "joblib.dump(LogisticRegression().fit(X, y), sys.argv[1])\n"
    )
    model = tmp_path / "model.joblib"
    subprocess.run([str(python), "-I", "-c", train, str(model)], check=True, timeout=120)
    probe = [str(python), "-I", "-c", v2_restricted.PROBE]
    ok = subprocess.run([*probe, str(model), str(support)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    facts = json.loads(ok.stdout.strip().splitlines()[-1])
    assert facts["type"] == "sklearn.linear_model._logistic.LogisticRegression" and facts["n_features"] == 3

    target = tmp_path / "planted"
    evil = tmp_path / "evil.joblib"
    evil.write_bytes(pickle.dumps(Plants(target), protocol=0))
    refused = subprocess.run([*probe, str(evil), str(support)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "refused to load" in refused.stderr
    assert not target.exists()


def test_onnx_replica_refuses_external_data_outside_its_folder(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from converge.serving.v2.onnx import external_data_escapes

    def model_with(location: str) -> Path:
        weight = helper.make_tensor("W", TensorProto.FLOAT, [2, 2], [1.0] * 4)
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            weight.external_data.add(key=key, value=value)
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])
        graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [x], [y], [weight])
        path = tmp_path / "model.onnx"
        path.write_bytes(helper.make_model(graph).SerializeToString())
        return path

    assert external_data_escapes(model_with("../../etc/passwd")) == ["../../etc/passwd"]
    assert external_data_escapes(model_with("/etc/passwd")) == ["/etc/passwd"]
    (tmp_path / "w.bin").write_bytes(b"\x00" * 16)
    assert external_data_escapes(model_with("w.bin")) == []
