"""Open the containers a model can hide in: zip (torch's format too), tar, and compressed streams.

`walk` yields every leaf (a member that is not itself a container) with a seekable stream of
its bytes, whatever nesting it sits in: a pickle in a tar in a gzip, a zip in a zip. Names are
never trusted to say what a member is; the `sniff` function given by the caller decides from
content. Everything is bounded (see `ScanLimits`): exceeding a limit is an "error" finding, so
a scan fails closed instead of running out of memory or disk on a bomb.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from picklescan.relaxed_zipfile import RelaxedZipFile

from converge.control.library.inspection import decompress
from converge.control.library.inspection.results import Finding

# Inflated content above this size is refused: far above any model we expect, low enough that
# a crafted "zip bomb" cannot fill the disk.
DEFAULT_MAX_DECOMPRESSED_BYTES = 16 * 1024**3
# Inflated members are held in memory up to this size, then spill to a temporary file.
_SPOOL_BYTES = 64 * 1024**2
_COPY_CHUNK = 1 << 20
# torch writes tensor storages as "<archive>/data/<n>"; they are raw bytes, never unpickled.
TORCH_STORAGE_ENTRY = re.compile(r"(^|/)data/\d+$")
_TORCH_PICKLE_ENTRY = re.compile(r"(^|/)data\.pkl$")

Sniffer = Callable[[IO[bytes]], str]


@dataclass(frozen=True, kw_only=True)
class ScanLimits:
    """Bounds on what one scan may open. Every byte the scanner inflates or extracts counts."""

    max_depth: int = 8  # containers inside containers
    max_members: int = 100_000  # archive members over the whole artifact
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
    # Real compressed models stay far below this (gzip cannot pass ~1032:1); bz2/xz bombs and
    # nested archives do not. Checked once a stream has inflated past `ratio_floor_bytes`.
    max_ratio: int = 1000
    ratio_floor_bytes: int = 16 * 1024**2


class LimitExceeded(ValueError):
    pass


class Budget:
    """What a scan has used of its limits so far, across every file and layer."""

    def __init__(self, limits: ScanLimits) -> None:
        self.limits = limits
        self.inflated = 0
        self.members = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise LimitExceeded(f"the artifact holds more than {self.limits.max_members} archive members")

    def charge(self, size: int, *, written: int, compressed: int | None) -> None:
        self.inflated += size
        limits = self.limits
        if self.inflated > limits.max_decompressed_bytes:
            raise LimitExceeded(
                f"decompressed size exceeds the limit of {limits.max_decompressed_bytes} bytes"
            )
        if compressed is not None and written > limits.ratio_floor_bytes:
            if written > limits.max_ratio * max(compressed, 1):
                raise LimitExceeded(
                    f"compression ratio exceeds the limit of {limits.max_ratio}:1 (a decompression bomb?)"
                )


@dataclass
class Leaf:
    label: str  # where it is, e.g. "bundle.tar.gz:models/weights.dat"
    name: str  # its own file name, for the few checks that depend on it (config.json)
    kind: str  # what `sniff` made of its content
    stream: IO[bytes]  # seekable, at offset 0
    path: Path | None = None  # the file on disk, for a top-level file


def walk(
    stream: IO[bytes], *, label: str, name: str, sniff: Sniffer, budget: Budget, path: Path | None = None
) -> Iterator[Leaf | Finding]:
    yield from _walk(stream, label=label, name=name, sniff=sniff, budget=budget, path=path, depth=0)


def _walk(
    stream: IO[bytes],
    *,
    label: str,
    name: str,
    sniff: Sniffer,
    budget: Budget,
    path: Path | None,
    depth: int,
) -> Iterator[Leaf | Finding]:
    kind = sniff(stream)
    if kind not in ("zip", "tar", "compressed"):
        yield Leaf(label=label, name=name, kind=kind, stream=stream, path=path)
        return
    if depth >= budget.limits.max_depth:
        yield _error(label, f"containers are nested deeper than {budget.limits.max_depth} levels")
        return
    walker = {"zip": _walk_zip, "tar": _walk_tar, "compressed": _walk_compressed}[kind]
    try:
        yield from walker(stream, label=label, name=name, sniff=sniff, budget=budget, depth=depth + 1)
    except LimitExceeded as exc:
        yield _error(label, str(exc))


def _walk_zip(
    stream: IO[bytes], *, label: str, name: str, sniff: Sniffer, budget: Budget, depth: int
) -> Iterator[Leaf | Finding]:
    try:
        # picklescan's lenient reader accepts the same slightly malformed archives torch.load does.
        archive = RelaxedZipFile(stream)
    except Exception as exc:  # BadZipFile, OSError, ValueError, ... for bytes that only look like a zip
        yield _error(label, f"is not a readable zip archive: {exc}")
        return
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        torch_layout = any(_TORCH_PICKLE_ENTRY.search(info.filename) for info in members)
        for info in members:
            budget.member()
            member_label = f"{label}:{info.filename}"
            if (escape := _escaping_name(info.filename)) is not None:
                yield _dangerous(member_label, f"member name is {escape}")
            if torch_layout and TORCH_STORAGE_ENTRY.search(info.filename):
                continue  # raw tensor storage: torch never unpickles it
            with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
                try:
                    with archive.open(info) as member:
                        _copy(member, spool, budget=budget, compressed=info.compress_size)
                except LimitExceeded:
                    raise
                except Exception as exc:  # a corrupt member, an unsupported method, a bad CRC
                    yield _error(member_label, f"could not be extracted: {type(exc).__name__}: {exc}")
                    continue
                spool.seek(0)
                yield from _walk(
                    spool,
                    label=member_label,
                    name=PurePosixPath(info.filename).name,
                    sniff=sniff,
                    budget=budget,
                    path=None,
                    depth=depth,
                )


def _walk_tar(
    stream: IO[bytes], *, label: str, name: str, sniff: Sniffer, budget: Budget, depth: int
) -> Iterator[Leaf | Finding]:
    try:
        archive = tarfile.open(fileobj=stream, mode="r:")  # compression is our own layer
    except (tarfile.TarError, OSError) as exc:
        yield _error(label, f"is not a readable tar archive: {exc}")
        return
    with archive:
        try:
            for member in archive:
                budget.member()
                yield from _tar_member(archive, member, label=label, sniff=sniff, budget=budget, depth=depth)
        except tarfile.TarError as exc:
            yield _error(label, f"the tar archive is corrupt: {exc}")


def _tar_member(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    *,
    label: str,
    sniff: Sniffer,
    budget: Budget,
    depth: int,
) -> Iterator[Leaf | Finding]:
    member_label = f"{label}:{member.name}"
    if (escape := _escaping_name(member.name)) is not None:
        yield _dangerous(member_label, f"member name is {escape}")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.name).parent / member.linkname
        if (escape := _escaping_name(member.linkname if member.islnk() else str(target))) is not None:
            yield _dangerous(member_label, f"links out of the archive ({member.linkname}): {escape}")
        return
    if not member.isfile():
        return
    source = archive.extractfile(member)
    if source is None:
        return
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        _copy(source, spool, budget=budget, compressed=None)
        spool.seek(0)
        name = PurePosixPath(member.name).name
        yield from _walk(
            spool, label=member_label, name=name, sniff=sniff, budget=budget, path=None, depth=depth
        )


def _walk_compressed(
    stream: IO[bytes], *, label: str, name: str, sniff: Sniffer, budget: Budget, depth: int
) -> Iterator[Leaf | Finding]:
    start = stream.tell()
    codec = decompress.compression_codec(stream.read(32)) or ""
    compressed = stream.seek(0, 2) - start
    stream.seek(start)
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        failure = None
        try:
            written = 0
            for chunk in decompress.iter_decompressed(stream, codec=codec):
                written += len(chunk)
                budget.charge(len(chunk), written=written, compressed=compressed)
                spool.write(chunk)
        except LimitExceeded:
            raise
        except Exception as exc:  # corrupt or truncated stream, or a codec we lack (lz4)
            failure = f"{codec} content could not be decompressed: {type(exc).__name__}: {exc}"
        if spool.tell() > 0:
            # Even a truncated stream is scanned: a loader acts on what inflated before the error.
            spool.seek(0)
            inner = _strip_suffix(name)
            yield from _walk(
                spool, label=label, name=inner, sniff=sniff, budget=budget, path=None, depth=depth
            )
        if failure is not None:
            yield _error(label, failure)


def _copy(source: IO[bytes], sink: IO[bytes], *, budget: Budget, compressed: int | None) -> None:
    written = 0
    while chunk := source.read(_COPY_CHUNK):
        written += len(chunk)
        budget.charge(len(chunk), written=written, compressed=compressed)
        sink.write(chunk)


def _strip_suffix(name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    compression = {"gz", "tgz", "bz2", "xz", "lzma", "z", "zlib"}
    return stem if dot and suffix.lower() in compression else name


def _escaping_name(name: str) -> str | None:
    """Why an archive path would land outside the folder it is extracted to, or None."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        return "an absolute path: extracting it writes outside the target folder"
    if ".." in posix.parts or ".." in windows.parts:
        return "a path with '..': extracting it writes outside the target folder"
    return None


def _error(label: str, message: str) -> Finding:
    return Finding(file=label, global_name=None, severity="error", message=message)


def _dangerous(label: str, message: str) -> Finding:
    return Finding(file=label, global_name=None, severity="dangerous", message=message)
