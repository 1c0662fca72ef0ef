"""The embedding model's own tokenizer, read from its model version's artifacts.

Chunks are measured with the tokenizer the embedding server runs (`tokenizer.json`, through the
`tokenizers` package), so a chunk never exceeds what the model reads: a text over the limit
would be truncated by the server and its tail would never be searchable. The limit is the
sentence-transformers `max_seq_length` (256 for MiniLM, though its position table holds 512:
the server truncates at 256), else the tokenizer's `model_max_length`.

The artifact is read once per model version and process (a directory artifact is a tar in the
store; it is streamed and checked against its digest like every read), then cached.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncSession
from tokenizers import Tokenizer

from converge.errors import Unprocessable
from converge.models import Deployment, ModelVersion
from converge.storage.artifacts import ArtifactError, ArtifactStore

DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_CAP = 8192  # tokenizers configs say 1e30 for "no limit"
WANTED = ("tokenizer.json", "sentence_bert_config.json", "tokenizer_config.json")
_MAX_CONFIG_BYTES = 64 << 20  # a tokenizer.json of a large vocabulary is tens of MB

_cache: dict[uuid.UUID, ModelTokenizer] = {}
_loading: dict[uuid.UUID, asyncio.Lock] = {}


@dataclass(frozen=True, slots=True)
class ModelTokenizer:
    tokenizer: Tokenizer
    max_tokens: int  # what the model reads, special tokens included

    def count(self, text: str) -> int:
        """Tokens the model reads for `text`, special tokens ([CLS], [SEP]) included."""
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        """The (start, end) character offsets of each token of `text`, no special tokens."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return [(start, end) for start, end in encoding.offsets]

    def count_many(self, texts: list[str]) -> list[int]:
        """`count` of each text, in one call (the tokenizer's threads, without the GIL)."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def offsets_many(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """`encode_offsets` of each text, in one call."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [[(start, end) for start, end in e.offsets] for e in encodings]

    @property
    def special_tokens(self) -> int:
        """How many tokens the model adds around a text (2 for BERT's [CLS] ... [SEP])."""
        return self.tokenizer.num_special_tokens_to_add(is_pair=False)

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> ModelTokenizer:
        """From the contents of `tokenizer.json` and, optionally, the two configs."""
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        # The file's own truncation and padding (MiniLM's pad everything to 128) are for
        # training batches; counting must see the whole text.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(tokenizer=tokenizer, max_tokens=max_tokens(files))


def max_tokens(files: dict[str, bytes]) -> int:
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        value = _json(files.get(name)).get(key)
        if isinstance(value, int | float) and value > 0:
            return min(int(value), MAX_TOKENS_CAP)
    return DEFAULT_MAX_TOKENS


def _json(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        found = json.loads(raw)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


async def model_tokenizer(
    session: AsyncSession, store: ArtifactStore, *, deployment_id: uuid.UUID
) -> ModelTokenizer:
    """The tokenizer of the model the deployment serves. Raises a 422 naming the deployment
    when that model ships no `tokenizer.json` (or the deployment does not exist)."""
    deployment = await session.get(Deployment, deployment_id)
    if deployment is None:
        raise Unprocessable(
            f"embedding_deployment: no deployment {deployment_id}",
            extra={"field": "embedding_deployment"},
        )
    version_id = deployment.model_version_id
    if (found := _cache.get(version_id)) is not None:
        return found
    version = await session.get(ModelVersion, version_id)
    assert version is not None  # a foreign key
    lock = _loading.setdefault(version_id, asyncio.Lock())
    async with lock:
        if (found := _cache.get(version_id)) is None:
            files = await _read_files(store, version.artifact_sha256)
            if "tokenizer.json" not in files:
                raise Unprocessable(
                    f"embedding_deployment: deployment '{deployment.name}' serves a model without a "
                    "tokenizer.json, so chunks cannot be measured in its tokens; bind a deployment of a "
                    "sentence-transformers or Hugging Face embedding model",
                    extra={"field": "embedding_deployment"},
                )
            try:
                found = await asyncio.to_thread(ModelTokenizer.from_files, files)
            except Exception as exc:  # a malformed file: the tokenizers error says what
                raise Unprocessable(
                    f"embedding_deployment: the tokenizer.json of deployment '{deployment.name}' "
                    f"cannot be loaded: {exc}",
                    extra={"field": "embedding_deployment"},
                ) from None
            _cache[version_id] = found
    return found


async def _read_files(store: ArtifactStore, sha256: str) -> dict[str, bytes]:
    """The wanted files of a directory artifact (the shallowest of each name); {} for a file."""
    try:
        if not await store.is_directory(sha256):
            return {}
        with tempfile.TemporaryFile() as spool:
            async for chunk in store.open_stream(sha256, verify=True):
                await asyncio.to_thread(spool.write, chunk)
            return await asyncio.to_thread(_extract, spool)
    except ArtifactError as exc:
        raise Unprocessable(
            f"embedding_deployment: the model's artifact {sha256} cannot be read: {exc}",
            extra={"field": "embedding_deployment"},
        ) from exc


def _extract(spool: IO[bytes]) -> dict[str, bytes]:
    spool.seek(0)
    found: dict[str, tuple[int, bytes]] = {}
    with tarfile.open(fileobj=spool, mode="r:") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if not member.isreg() or path.name not in WANTED or member.size > _MAX_CONFIG_BYTES:
                continue
            depth = len(path.parts)
            if path.name in found and found[path.name][0] <= depth:
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                found[path.name] = (depth, handle.read())
    return {name: data for name, (_, data) in found.items()}
