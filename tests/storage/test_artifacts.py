from __future__ import annotations

import hashlib
import os
import shutil
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import obstore
import pytest

from converge.storage.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    ArtifactTooLarge,
    DigestMismatch,
    InvalidDigest,
)

MiB = 1024 * 1024


@dataclass
class Backend:
    artifacts: ArtifactStore
    staging: Path  # where put_stream stages bytes; must be empty after every put

    async def keys(self) -> list[str]:
        return sorted(meta["path"] for meta in await obstore.list(self.artifacts.store).collect_async())

    def staged_files(self) -> list[Path]:
        return list(self.staging.glob("*")) if self.staging.exists() else []


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        root = tmp_path / "artifacts"
        return Backend(ArtifactStore.local(root), staging=root / ".staging")
    s3_server: dict[str, str] = request.getfixturevalue("s3_server")
    staging = tmp_path / "staging"
    # A prefix per test keeps the shared bucket's listing to this test's objects.
    store = ArtifactStore.s3(**s3_server, prefix=f"t-{uuid.uuid4().hex}", staging_dir=staging)
    return Backend(store, staging=staging)


async def chunked(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def read_all(store: ArtifactStore, sha256: str) -> bytes:
    return b"".join([chunk async for chunk in store.open_stream(sha256)])


async def test_put_then_read_returns_same_bytes_at_content_address(backend: Backend) -> None:
    data = b"weights" * 1000
    digest = hashlib.sha256(data).hexdigest()

    blob = await backend.artifacts.put_stream(chunked([data[:10], data[10:]]), expected_sha256=digest)

    assert (blob.sha256, blob.size_bytes, blob.created) == (digest, len(data), True)
    assert await backend.keys() == [f"sha256/{digest[:2]}/{digest}"]
    assert await backend.artifacts.exists(digest)
    assert await backend.artifacts.size(digest) == len(data)
    assert await read_all(backend.artifacts, digest) == data
    assert backend.staged_files() == []


async def test_same_bytes_are_stored_once(backend: Backend) -> None:
    first = await backend.artifacts.put_stream(chunked([b"same bytes"]))
    second = await backend.artifacts.put_stream(chunked([b"same ", b"bytes"]))

    assert first.created and not second.created
    assert first.sha256 == second.sha256
    assert len(await backend.keys()) == 1
    assert backend.staged_files() == []


async def test_wrong_expected_digest_is_rejected_and_leaves_nothing(backend: Backend) -> None:
    expected = hashlib.sha256(b"what the caller promised").hexdigest()

    with pytest.raises(DigestMismatch) as raised:
        await backend.artifacts.put_stream(chunked([b"what arrived"]), expected_sha256=expected)

    assert raised.value.expected == expected
    assert raised.value.actual == hashlib.sha256(b"what arrived").hexdigest()
    assert await backend.keys() == []
    assert backend.staged_files() == []


async def test_stream_over_max_bytes_is_rejected_and_leaves_nothing(backend: Backend) -> None:
    with pytest.raises(ArtifactTooLarge) as raised:
        await backend.artifacts.put_stream(chunked([b"x" * 600, b"x" * 600]), max_bytes=1000)

    assert raised.value.limit == 1000
    assert await backend.keys() == []
    assert backend.staged_files() == []
    # The limit is inclusive.
    assert (await backend.artifacts.put_stream(chunked([b"x" * 1000]), max_bytes=1000)).size_bytes == 1000


async def test_corrupted_object_is_detected_when_read(backend: Backend, tmp_path: Path) -> None:
    blob = await backend.artifacts.put_stream(chunked([b"original model bytes"]))
    await obstore.put_async(backend.artifacts.store, ArtifactStore.object_key(blob.sha256), b"tampered")

    with pytest.raises(DigestMismatch):
        await read_all(backend.artifacts, blob.sha256)
    cache = tmp_path / "cache"
    with pytest.raises(DigestMismatch):
        await backend.artifacts.fetch_to(blob.sha256, cache)
    assert list(cache.iterdir()) == []
    # Reading without verification is an explicit opt-out.
    chunks = [c async for c in backend.artifacts.open_stream(blob.sha256, verify=False)]
    assert b"".join(chunks) == b"tampered"


async def test_file_fetch_is_verified_reused_and_repaired(backend: Backend, tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + os.urandom(3 * MiB))
    blob = await backend.artifacts.put_file(source)
    cache = tmp_path / "cache"

    fetched = await backend.artifacts.fetch_to(blob.sha256, cache)
    assert fetched == cache / blob.sha256
    assert fetched.read_bytes() == source.read_bytes()
    inode = fetched.stat().st_ino
    assert await backend.artifacts.fetch_to(blob.sha256, cache) == fetched
    assert fetched.stat().st_ino == inode  # a verified cached copy is reused, not fetched again

    fetched.write_bytes(b"bit rot")
    await backend.artifacts.fetch_to(blob.sha256, cache)
    assert fetched.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [blob.sha256]


def make_model_dir(root: Path, order: list[str]) -> Path:
    files = {"config.json": b"{}", "weights/part-1.bin": b"1" * 5000, "weights/part-2.bin": b"2" * 700}
    for name in order:  # creation order differs between copies; the archive must not
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(files[name])
    (root / "empty").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o775)
    return root


async def test_directory_archive_is_deterministic_and_round_trips(backend: Backend, tmp_path: Path) -> None:
    a = make_model_dir(tmp_path / "a", ["config.json", "weights/part-1.bin", "weights/part-2.bin"])
    b = make_model_dir(tmp_path / "b", ["weights/part-2.bin", "config.json", "weights/part-1.bin"])
    os.utime(b / "config.json", (1, 1))

    first = await backend.artifacts.put_directory(a)
    second = await backend.artifacts.put_directory(b)

    assert first.sha256 == second.sha256 and not second.created
    assert await backend.artifacts.is_directory(first.sha256)
    fetched = await backend.artifacts.fetch_to(first.sha256, tmp_path / "cache")
    assert fetched.is_dir()
    for original in a.rglob("*"):
        copy = fetched / original.relative_to(a)
        assert copy.is_dir() == original.is_dir()
        if original.is_file():
            assert copy.read_bytes() == original.read_bytes()
    assert os.access(fetched / "run.sh", os.X_OK)
    marker = fetched / "weights" / "part-1.bin"
    inode = marker.stat().st_ino
    # Re-archiving the unpacked copy reproduces the digest, so the cache is trusted as is.
    assert await backend.artifacts.fetch_to(first.sha256, tmp_path / "cache") == fetched
    assert marker.stat().st_ino == inode
    shutil.rmtree(fetched / "weights")
    await backend.artifacts.fetch_to(first.sha256, tmp_path / "cache")
    assert (fetched / "weights" / "part-1.bin").read_bytes() == b"1" * 5000


async def test_fifty_megabyte_stream_keeps_memory_flat(backend: Backend) -> None:
    async def generated() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield os.urandom(MiB)

    tracemalloc.start()
    try:
        blob = await backend.artifacts.put_stream(generated())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert blob.size_bytes == 50 * MiB
    assert peak < 16 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    assert await backend.artifacts.size(blob.sha256) == 50 * MiB


async def test_delete_removes_blob_and_is_idempotent(backend: Backend, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"f")
    blob = await backend.artifacts.put_directory(tmp_path / "d")

    await backend.artifacts.delete(blob.sha256)
    await backend.artifacts.delete(blob.sha256)

    assert not await backend.artifacts.exists(blob.sha256)
    assert await backend.keys() == []


async def test_missing_and_malformed_digests_are_reported(backend: Backend) -> None:
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not await backend.artifacts.exists(missing)
    with pytest.raises(ArtifactNotFound):
        await backend.artifacts.size(missing)
    with pytest.raises(ArtifactNotFound):
        await read_all(backend.artifacts, missing)
    with pytest.raises(InvalidDigest):
        await backend.artifacts.exists("../../etc/passwd")
