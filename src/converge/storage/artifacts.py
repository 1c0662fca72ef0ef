"""Content-addressed artifact storage over obstore: a local folder or an S3 bucket.

A blob lives at ``sha256/<first two hex digits>/<full hex digest>``. Every write is staged to a
local file while it is hashed, so an object reaches its address only once its digest is known
and checked: readers never see a partial or unverified blob, and memory stays constant
whatever the artifact size.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, ObjectStore, S3Store

CHUNK_SIZE = 1024 * 1024
# obstore holds at most part size x concurrency bytes in flight during an S3 multipart upload.
_PART_SIZE = 8 * 1024 * 1024
_PART_CONCURRENCY = 4
# A directory artifact is a tar blob plus this empty sidecar, so fetch_to knows to unpack it
# (a tar-magic check would also unpack a user's own .tar file artifact).
_DIR_MARKER = ".dir"
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# LocalStore and S3Store report a missing object as FileNotFoundError; keep obstore's own too.
_MISSING = (FileNotFoundError, NotFoundError)


class ArtifactError(Exception):
    """Base class for artifact storage failures."""


class DigestMismatch(ArtifactError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch: expected {expected}, got {actual}")
        self.expected, self.actual = expected, actual


class ArtifactTooLarge(ArtifactError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"artifact exceeds the limit of {limit} bytes")
        self.limit = limit


class ArtifactNotFound(ArtifactError):
    def __init__(self, sha256: str) -> None:
        super().__init__(f"no artifact with sha256 {sha256}")
        self.sha256 = sha256


class InvalidDigest(ArtifactError, ValueError):
    """Not 64 hex characters; rejected because the digest becomes part of an object path."""


class UnsafePath(ArtifactError):
    """A server path that is not a regular file or a plain directory tree (a device, a FIFO,
    a socket, a linked directory, something unreadable): nothing was copied."""


@dataclass(frozen=True, slots=True)
class PathSurvey:
    is_directory: bool
    size_bytes: int  # a file's size, or the sum of a directory's files
    files: int


def survey(path: Path, *, max_bytes: int | None = None) -> PathSurvey:
    """Check a server path before a byte of it is read: a regular file, or a directory of only
    regular files and directories, within `max_bytes` in all. Blocking (it walks the tree).

    A file symlink is followed (a Hugging Face snapshot links its files into a blob store); a
    linked directory is refused, as in an archive it would be either dropped or a way out."""
    try:
        if path.is_symlink() and path.is_dir():
            raise UnsafePath(f"{path} is a symlink to a directory: register the directory it points to")
        st = path.stat()
    except OSError as exc:
        raise UnsafePath(f"cannot read {path}: {exc.strerror or exc}") from exc
    if stat.S_ISREG(st.st_mode):
        result = PathSurvey(is_directory=False, size_bytes=st.st_size, files=1)
    elif stat.S_ISDIR(st.st_mode):
        entries = _tar_entries(path)
        size = sum(entry.stat().st_size for _, entry in entries if not entry.is_dir())
        result = PathSurvey(is_directory=True, size_bytes=size, files=len(entries))
    else:
        raise UnsafePath(f"{path} is not a regular file or a directory ({_kind(st.st_mode)})")
    if max_bytes is not None and result.size_bytes > max_bytes:
        raise ArtifactTooLarge(max_bytes)
    return result


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "an unsupported file type"


@dataclass(frozen=True, slots=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    created: bool  # False when identical bytes were already stored (deduplicated)


def normalize_digest(sha256: str) -> str:
    digest = sha256.removeprefix("sha256:").lower()
    if not _HEX_DIGEST.match(digest):
        raise InvalidDigest(f"not a sha256 hex digest: {sha256!r}")
    return digest


class ArtifactStore:
    def __init__(self, store: ObjectStore, *, staging_dir: Path, local_root: Path | None = None) -> None:
        self._store = store
        self._staging_dir = staging_dir
        # Set for local stores: staging lives inside the root so publishing is one hard link.
        self._local_root = local_root

    @classmethod
    def local(cls, root: str | Path) -> ArtifactStore:
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(LocalStore(root), staging_dir=root / ".staging", local_root=root)

    @classmethod
    def s3(
        cls,
        *,
        bucket: str,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        prefix: str | None = None,
        staging_dir: str | Path | None = None,
    ) -> ArtifactStore:
        config: dict[str, str] = {"region": region}
        if endpoint:
            config["endpoint"] = endpoint
        # Without explicit keys obstore falls back to the environment / instance metadata.
        if access_key_id and secret_access_key:
            config |= {"access_key_id": access_key_id, "secret_access_key": secret_access_key}
        client_options = {"allow_http": True} if endpoint and endpoint.startswith("http://") else None
        # obstore types config/client_options as TypedDicts; these dicts hold exactly their keys.
        store = S3Store(bucket, prefix=prefix, config=config, client_options=client_options)  # type: ignore[arg-type]
        staging = Path(staging_dir) if staging_dir else Path(tempfile.gettempdir()) / "converge-staging"
        return cls(store, staging_dir=staging)

    @property
    def store(self) -> ObjectStore:
        return self._store

    @staticmethod
    def object_key(sha256: str) -> str:
        digest = normalize_digest(sha256)
        return f"sha256/{digest[:2]}/{digest}"

    async def put_stream(
        self,
        chunks: AsyncIterator[bytes],
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> StoredBlob:
        expected = normalize_digest(expected_sha256) if expected_sha256 else None
        staged, digest, size = await self._stage(chunks, max_bytes=max_bytes)
        try:
            if expected is not None and digest != expected:
                raise DigestMismatch(expected, digest)
            created = await self._publish(staged, digest)
        finally:
            await asyncio.to_thread(staged.unlink, missing_ok=True)
        return StoredBlob(sha256=digest, size_bytes=size, created=created)

    async def put_file(
        self, path: str | Path, *, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> StoredBlob:
        path = Path(path)
        found = await asyncio.to_thread(survey, path, max_bytes=max_bytes)
        if found.is_directory:
            raise UnsafePath(f"{path} is a directory, not a file")
        return await self.put_stream(_read_chunks(path), expected_sha256=expected_sha256, max_bytes=max_bytes)

    async def put_directory(
        self, path: str | Path, *, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> StoredBlob:
        path = Path(path)
        found = await asyncio.to_thread(survey, path, max_bytes=max_bytes)
        if not found.is_directory:
            raise UnsafePath(f"{path} is not a directory")
        # The limit is on the files' bytes; the archive adds headers, so it is not applied again.
        blob = await self.put_stream(_tar_stream(path), expected_sha256=expected_sha256)
        await obstore.put_async(self._store, self.object_key(blob.sha256) + _DIR_MARKER, b"")
        return blob

    async def exists(self, sha256: str) -> bool:
        return await self._has(self.object_key(sha256))

    async def is_directory(self, sha256: str) -> bool:
        return await self._has(self.object_key(sha256) + _DIR_MARKER)

    async def size(self, sha256: str) -> int:
        try:
            meta = await obstore.head_async(self._store, self.object_key(sha256))
        except _MISSING:
            raise ArtifactNotFound(normalize_digest(sha256)) from None
        return meta["size"]

    async def open_stream(self, sha256: str, *, verify: bool = True) -> AsyncIterator[bytes]:
        digest = normalize_digest(sha256)
        try:
            result = await obstore.get_async(self._store, self.object_key(digest))
        except _MISSING:
            raise ArtifactNotFound(digest) from None
        hasher = hashlib.sha256()
        async for chunk in result.stream(min_chunk_size=CHUNK_SIZE):
            if verify:
                # hashlib releases the GIL on large buffers; hashing off-loop keeps the loop free.
                await asyncio.to_thread(hasher.update, chunk)
            yield chunk
        # Stored bytes can rot or be replaced behind our back: check again on every read.
        if verify and hasher.hexdigest() != digest:
            raise DigestMismatch(digest, hasher.hexdigest())

    async def fetch_to(self, sha256: str, dest_dir: str | Path) -> Path:
        digest = normalize_digest(sha256)
        dest = Path(dest_dir) / digest
        unpack = await self.is_directory(digest)
        if await asyncio.to_thread(os.path.lexists, dest):
            if await _cached_copy_matches(dest, digest, is_directory=unpack):
                return dest
            await asyncio.to_thread(_remove, dest)
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        part = dest.parent / f".{digest}.{uuid.uuid4().hex}.part"
        unpacked = part.with_suffix(".d")
        try:
            # open_stream raises before anything is renamed into place if the bytes are wrong.
            await _write_chunks(part, self.open_stream(digest, verify=True))
            if unpack:
                await asyncio.to_thread(_extract_tar, part, unpacked)
            await asyncio.to_thread(_install, unpacked if unpack else part, dest)
        finally:
            await asyncio.to_thread(_remove, part)
            await asyncio.to_thread(_remove, unpacked)
        return dest

    async def delete(self, sha256: str) -> None:
        key = self.object_key(sha256)
        # Idempotent so garbage collection can simply be retried after a partial failure.
        for path in (key, key + _DIR_MARKER):
            try:
                await obstore.delete_async(self._store, path)
            except _MISSING:
                pass

    async def _has(self, key: str) -> bool:
        try:
            await obstore.head_async(self._store, key)
        except _MISSING:
            return False
        return True

    async def _stage(self, chunks: AsyncIterator[bytes], *, max_bytes: int | None) -> tuple[Path, str, int]:
        await asyncio.to_thread(self._staging_dir.mkdir, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._staging_dir, suffix=".part")
        hasher, size = hashlib.sha256(), 0
        # Coalesce small chunks (e.g. 8 KiB HTTP reads) so each thread hop moves ~1 MiB.
        pending = bytearray()
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ArtifactTooLarge(max_bytes)
                    pending += chunk
                    if len(pending) >= CHUNK_SIZE:
                        await asyncio.to_thread(_hash_and_write, hasher, out, bytes(pending))
                        pending.clear()
                await asyncio.to_thread(_hash_and_write, hasher, out, bytes(pending))
        except BaseException:
            os.unlink(name)
            raise
        return Path(name), hasher.hexdigest(), size

    async def _publish(self, staged: Path, digest: str) -> bool:
        key = self.object_key(digest)
        if self._local_root is not None:
            return await asyncio.to_thread(_link_into_place, staged, self._local_root / key)
        if await self.exists(digest):
            return False
        # Two writers racing on one digest both upload identical bytes, which is harmless.
        await obstore.put_async(
            self._store, key, staged, chunk_size=_PART_SIZE, max_concurrency=_PART_CONCURRENCY
        )
        return True


def _hash_and_write(hasher: hashlib._Hash, out: BinaryIO, data: bytes) -> None:
    hasher.update(data)
    out.write(data)


def _link_into_place(staged: Path, final: Path) -> bool:
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        # A hard link fails if the address is taken: an atomic create-if-absent for dedup.
        os.link(staged, final)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: rename instead
        if final.exists():
            return False
        os.replace(staged, final)
    return True


def _install(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError:
        # A concurrent fetch already installed the same verified directory; keep theirs.
        if not dest.is_dir():
            raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _open_regular(path: Path) -> BinaryIO:
    # O_NONBLOCK: opening a named pipe put where a file was would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    with await asyncio.to_thread(_open_regular, path) as src:
        while chunk := await asyncio.to_thread(src.read, CHUNK_SIZE):
            yield chunk


async def _write_chunks(path: Path, chunks: AsyncIterator[bytes]) -> None:
    with await asyncio.to_thread(path.open, "wb") as out:
        async for chunk in chunks:
            await asyncio.to_thread(out.write, chunk)


def _tar_entries(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        raise ArtifactError(f"not a directory: {root}")
    entries: list[tuple[str, Path]] = []

    def unreadable(exc: OSError) -> None:  # os.walk would skip an unreadable directory silently
        raise UnsafePath(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            # os.walk does not descend into linked directories; refuse rather than drop them.
            if path.is_symlink() and path.is_dir():
                raise UnsafePath(f"directory symlinks cannot be archived: {path}")
            try:
                mode = path.stat().st_mode  # follows file symlinks; a dangling one fails here
            except OSError as exc:
                raise UnsafePath(f"cannot read {path}: {exc.strerror or exc}") from exc
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafePath(f"only files and directories can be archived: {path} is {_kind(mode)}")
            entries.append((path.relative_to(root).as_posix(), path))
    # Sorted names make the archive, and so the digest, independent of directory order.
    return sorted(entries)


def _tar_header(name: str, path: Path) -> tarfile.TarInfo:
    # stat() follows file symlinks (e.g. a Hugging Face snapshot): the content is archived.
    st = path.stat()
    info = tarfile.TarInfo(name)  # mtime, uid and gid default to 0, owner names to ""
    if stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISREG(st.st_mode):
        # Only the owner's exec bit is kept, so the archive does not depend on the umask.
        info.size, info.mode = st.st_size, 0o755 if st.st_mode & 0o100 else 0o644
    else:
        raise ArtifactError(f"only files and directories can be archived: {path}")
    return info


async def _tar_stream(root: Path) -> AsyncIterator[bytes]:
    """A deterministic, uncompressed tar of `root`, produced chunk by chunk."""
    for name, path in await asyncio.to_thread(_tar_entries, root):
        info = await asyncio.to_thread(_tar_header, name, path)
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        if not info.isreg():
            continue
        written = 0
        async for chunk in _read_chunks(path):
            written += len(chunk)
            if written > info.size:
                break
            yield chunk
        if written != info.size:
            raise ArtifactError(f"file changed while being archived: {path}")
        if info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)


def _extract_tar(archive: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode="r:") as tar:
        # The "data" filter refuses absolute paths, escapes via "..", links out and devices.
        tar.extractall(target, filter="data")


async def digest_of(path: Path) -> str:
    """The sha256 the store gives what is at `path`: a file's bytes, or a directory's
    deterministic tar (so a faithful copy of a directory artifact reproduces its digest).
    Raises UnsafePath or OSError when the path cannot be read as an artifact."""
    is_directory = await asyncio.to_thread(lambda: path.is_dir() and not path.is_symlink())
    chunks = _tar_stream(path) if is_directory else _read_chunks(path)
    hasher = hashlib.sha256()
    async for chunk in chunks:
        await asyncio.to_thread(hasher.update, chunk)
    return hasher.hexdigest()


async def _cached_copy_matches(dest: Path, digest: str, *, is_directory: bool) -> bool:
    if is_directory != await asyncio.to_thread(lambda: dest.is_dir() and not dest.is_symlink()):
        return False
    # A directory is checked by archiving it again: the tar is deterministic, so a faithful
    # copy reproduces the stored digest exactly (anything else is simply fetched again).
    try:
        return await digest_of(dest) == digest
    except (ArtifactError, OSError):
        return False
