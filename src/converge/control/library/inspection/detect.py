"""Tell model formats apart by their bytes, never by their names.

Uploads are stored by digest, so a name is often lost, and names are easy to get wrong anyway
(a `.bin` may be a torch pickle or raw tensor data). Magic numbers and structural checks
decide, protocol 0/1 pickles (which have no magic) included: see `pickles.looks_like_pickle`.
Only ONNX, whose protobuf has no magic, still takes its `.onnx` name as a hint.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import IO

from converge.control.library.inspection import decompress
from converge.control.library.inspection.containers import Budget, Leaf, ScanLimits, walk
from converge.control.library.inspection.pickles import NPY_MAGIC, is_pickle_magic, looks_like_pickle

HEAD_BYTES = 512
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Field tags that can follow ONNX ModelProto.ir_version (field 1, varint) in serialised order.
_ONNX_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42, 0x52, 0x5A, 0x62, 0x72, 0x7A})
# Looking for a pickle inside an archive to name a file's format is cheaper than a scan.
_DETECT_LIMITS = ScanLimits(max_depth=4, max_members=1_000, max_decompressed_bytes=256 * 1024**2)


def read_head(path: Path, size: int = HEAD_BYTES) -> bytes:
    with path.open("rb") as stream:
        return stream.read(size)


def is_safetensors_head(head: bytes, *, file_size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= MAX_SAFETENSORS_HEADER and header_len + 8 <= file_size and head[8:9] == b"{"


def _looks_like_onnx(head: bytes) -> bool:
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_SECOND_TAGS


def sniff_stream(stream: IO[bytes]) -> str:
    """The container kind of the bytes from the stream's position (which is kept).

    One of gguf, safetensors, zip, tar, hdf5, npy, pickle, compressed, onnx or unknown.
    """
    start = stream.tell()
    head = stream.read(HEAD_BYTES)
    size = stream.seek(0, 2) - start
    stream.seek(start)
    if head.startswith(b"GGUF"):
        return "gguf"
    # Before the pickle check: a safetensors header length such as 0x0280 begins b"\x80\x02".
    if is_safetensors_head(head, file_size=size):
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if is_pickle_magic(head):
        return "pickle"
    codec = decompress.compression_codec(head)
    if decompress.strong_magic(codec):
        return "compressed"
    if looks_like_pickle(stream):
        return "pickle"
    if codec is not None and _inflates(stream, codec=codec):
        return "compressed"
    if _is_tar_header(head):
        return "tar"  # a pre-POSIX tar without the "ustar" magic: its header checksum tells
    if _is_zip_with_prefix(stream):
        return "zip"  # zipfile (Keras, a plain extract) finds the archive at the end of a file
    if _looks_like_onnx(head):
        return "onnx"
    return "unknown"


def _is_tar_header(block: bytes) -> bool:
    if len(block) < 512:
        return False
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"x", 8)
    except ValueError:
        return False
    return stored == 8 * ord(" ") + sum(block[:148]) + sum(block[156:512])


def _is_zip_with_prefix(stream: IO[bytes]) -> bool:
    start = stream.tell()
    try:
        return zipfile.is_zipfile(stream)
    finally:
        stream.seek(start)


def _inflates(stream: IO[bytes], *, codec: str) -> bool:
    try:
        return bool(decompress.peek_decompressed(stream, codec=codec, size=1))
    except Exception:  # a weak magic on bytes that are not compressed at all
        return False


def sniff(path: Path) -> str:
    """`sniff_stream` of a whole file; a `.onnx` name counts when the bytes are silent."""
    with path.open("rb") as stream:
        kind = sniff_stream(stream)
    if kind == "unknown" and path.suffix.lower() == ".onnx":
        return "onnx"
    return kind


def _file_format(path: Path) -> str:
    kind = sniff(path)
    if kind in ("gguf", "safetensors", "onnx", "pickle"):
        return kind
    if kind in ("zip", "tar", "compressed"):
        return "pickle" if first_pickle(path) is not None else "unknown"
    return "unknown"


def first_pickle(path: Path) -> str | None:
    """Where the first pickle inside a container file is (its label), or None."""
    budget = Budget(_DETECT_LIMITS)
    with path.open("rb") as stream:
        for item in walk(stream, label=path.name, name=path.name, sniff=sniff_stream, budget=budget):
            if isinstance(item, Leaf) and item.kind == "pickle":
                return item.label
    return None


def _directory_format(path: Path) -> str:
    if (path / "MLmodel").is_file():
        return "mlflow"
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return "sentence-transformers"
    if any(path.rglob("*.safetensors")):
        return "safetensors"
    if (path / "config.json").is_file():
        return "hf"
    # A folder holding a single-file format (a GGUF repo snapshot, an exported ONNX model).
    for suffix, fmt in ((".gguf", "gguf"), (".onnx", "onnx")):
        if any(_file_format(candidate) == fmt for candidate in path.glob(f"*{suffix}")):
            return fmt
    return "unknown"


def detect_format(path: str | Path) -> str:
    """One of gguf, safetensors, sentence-transformers, onnx, pickle, mlflow, hf, unknown."""
    target = Path(path)
    if target.is_dir():
        return _directory_format(target)
    if not target.is_file():
        raise FileNotFoundError(f"no such model file or folder: {target}")
    return _file_format(target)
