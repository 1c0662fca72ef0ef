"""Recognise and stream-decompress the codecs joblib (and hand-rolled pickle dumps) use.

picklescan reads compressed joblib files as if they were raw pickles, finds no opcodes and
reports them clean, so the scanner must inflate them itself. Output is produced in bounded
chunks and counted, so a small "zip bomb" cannot exhaust memory or disk.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

CHUNK_BYTES = 1 << 20
# joblib < 0.10 wrote b"ZF" followed by the payload length as a hex string padded to the
# width of hex(2**64), then a zlib stream.
_JOBLIB_ZF_HEADER_BYTES = 2 + len(f"{2**64:#x}")


class UnsupportedCompression(ValueError):
    pass


class DecompressionLimitExceeded(ValueError):
    pass


def compression_codec(head: bytes) -> str | None:
    """Name the codec from a file's first bytes, or None when it is not compressed."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x5d\x00"):
        return "lzma"  # the legacy ".lzma" (alone) container; joblib checks the same prefix
    if head.startswith(b"\x04\x22\x4d\x18"):
        return "lz4"
    if head.startswith(b"ZF"):
        return "joblib-zlib"
    if len(head) >= 2 and _is_zlib_header(head[0], head[1]):
        return "zlib"
    return None


def _is_zlib_header(cmf: int, flg: int) -> bool:
    # RFC 1950: deflate method (8), window <= 32K, header checksum, and no preset dictionary
    # (joblib never uses one). The dictionary check keeps text such as "x " from matching.
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0 and not flg & 0x20


Source = Path | IO[bytes]


def strong_magic(codec: str | None) -> bool:
    """Codecs whose magic is long enough that a match means the file really is compressed.

    zlib's two-byte header, legacy lzma's and joblib's "ZF" also open ordinary binary files
    (and some protocol 0 pickles), so those only count when their content inflates.
    """
    return codec in ("gzip", "bz2", "xz", "lz4")


def iter_decompressed(source: Source, *, codec: str) -> Iterator[bytes]:
    """Yield the decompressed content in chunks of at most CHUNK_BYTES.

    `source` is a path or a binary stream read from its current position.
    """
    with _as_stream(source) as raw:
        if codec in ("zlib", "joblib-zlib"):
            yield from _iter_zlib(raw, skip=_JOBLIB_ZF_HEADER_BYTES if codec == "joblib-zlib" else 0)
            return
        with _open_stream(raw, codec=codec) as stream:
            # read1, not read: on a truncated stream read() drops what it inflated before the
            # error, and that prefix is exactly what a loader would already have acted on.
            while chunk := stream.read1(CHUNK_BYTES):
                yield chunk


@contextlib.contextmanager
def _as_stream(source: Source) -> Iterator[IO[bytes]]:
    if isinstance(source, Path):
        with source.open("rb") as stream:
            yield stream
    else:
        yield source


def _open_stream(raw: IO[bytes], *, codec: str) -> gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile:
    # These readers inflate lazily: each read() returns at most the size asked for.
    if codec == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if codec == "bz2":
        return bz2.BZ2File(raw, "rb")
    if codec in ("xz", "lzma"):
        return lzma.LZMAFile(raw, "rb")  # detects .xz and the legacy .lzma container alike
    raise UnsupportedCompression(f"{codec} compression cannot be decompressed here")


def _iter_zlib(source: IO[bytes], *, skip: int) -> Iterator[bytes]:
    inflater = zlib.decompressobj()
    source.read(skip)
    while compressed := source.read(CHUNK_BYTES):
        # max_length bounds each output piece; the remainder waits in unconsumed_tail.
        yield inflater.decompress(compressed, CHUNK_BYTES)
        while inflater.unconsumed_tail:
            yield inflater.decompress(inflater.unconsumed_tail, CHUNK_BYTES)
        if inflater.eof:
            break
    if not inflater.eof:
        raise zlib.error("the zlib stream is truncated")
    yield inflater.flush()


def peek_decompressed(source: Source, *, codec: str, size: int = 8) -> bytes:
    """The first `size` decompressed bytes, without inflating the rest (stream position kept)."""
    start = None if isinstance(source, Path) else source.tell()
    head = b""
    try:
        for chunk in iter_decompressed(source, codec=codec):
            head += chunk
            if len(head) >= size:
                break
    finally:
        if start is not None and not isinstance(source, Path):
            source.seek(start)
    return head[:size]


def decompress_into(source: Source, *, codec: str, sink: IO[bytes], max_bytes: int) -> int:
    """Write the decompressed content to `sink`; refuse to go past `max_bytes`."""
    total = 0
    for chunk in iter_decompressed(source, codec=codec):
        total += len(chunk)
        if total > max_bytes:
            raise DecompressionLimitExceeded(f"decompressed size exceeds the limit of {max_bytes} bytes")
        sink.write(chunk)
    return total
