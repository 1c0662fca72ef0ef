"""Tell model formats apart by their bytes first and by their names only when bytes are silent.

Names are easy to get wrong (a `.bin` may be a torch pickle or raw tensor data), so magic
numbers and structural checks decide; extensions only break ties for formats that have no
magic (protocol 0/1 pickles, ONNX protobufs).
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

from converge.control.library.inspection import decompress

HEAD_BYTES = 32
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib"})
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
# `.bin` is left out: many raw-tensor files use it, so only its content can make it a pickle.
_PICKLE_BY_NAME = PICKLE_SUFFIXES | {".pt", ".pth", ".ckpt"}
# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# Field tags that can follow ONNX ModelProto.ir_version (field 1, varint) in serialised order.
_ONNX_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42, 0x52, 0x5A, 0x62, 0x72, 0x7A})
# torch writes tensor storages as "<archive>/data/<n>"; they are raw bytes, never unpickled.
TORCH_STORAGE_ENTRY = re.compile(r"(^|/)data/\d+$")


def read_head(path: Path, size: int = HEAD_BYTES) -> bytes:
    with path.open("rb") as stream:
        return stream.read(size)


def is_pickle_magic(head: bytes) -> bool:
    # Protocol 2+ pickles open with PROTO <version>; protocols 0 and 1 have no marker at all.
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= 5


def is_safetensors_head(head: bytes, *, file_size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= MAX_SAFETENSORS_HEADER and header_len + 8 <= file_size and head[8:9] == b"{"


def _looks_like_onnx(head: bytes) -> bool:
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_SECOND_TAGS


def has_pickle_suffix(path: Path) -> bool:
    # Covers joblib's compressed names too, e.g. "model.pkl.gz" or "model.joblib.xz".
    return any(suffix.lower() in _PICKLE_BY_NAME for suffix in path.suffixes)


def sniff(path: Path) -> str:
    """Low-level container kind of one file: gguf, safetensors, zip, pickle, compressed, onnx or unknown."""
    head = read_head(path)
    if head.startswith(b"GGUF"):
        return "gguf"
    # Before the pickle check: a safetensors header length such as 0x0280 begins b"\x80\x02".
    if is_safetensors_head(head, file_size=path.stat().st_size):
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if is_pickle_magic(head):
        return "pickle"
    if decompress.compression_codec(head) is not None:
        return "compressed"
    if _looks_like_onnx(head) or path.suffix.lower() == ".onnx":
        return "onnx"
    if has_pickle_suffix(path):
        return "pickle"
    return "unknown"


def zip_pickle_entries(source: zipfile.ZipFile) -> list[str]:
    """Entries of an archive that a loader would unpickle (torch's data.pkl, constants.pkl, ...)."""
    names = []
    for name in source.namelist():
        if TORCH_STORAGE_ENTRY.search(name) or name.endswith("/"):
            continue
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            names.append(name)
            continue
        with source.open(name) as entry:
            if is_pickle_magic(entry.read(2)):
                names.append(name)
    return names


def _file_format(path: Path) -> str:
    kind = sniff(path)
    if kind in ("gguf", "safetensors", "onnx", "pickle"):
        return kind
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                return "pickle" if zip_pickle_entries(archive) else "unknown"
        except (zipfile.BadZipFile, OSError):
            return "pickle" if has_pickle_suffix(path) or path.suffix.lower() in TORCH_SUFFIXES else "unknown"
    if kind == "compressed":
        codec = decompress.compression_codec(read_head(path))
        try:
            inner = decompress.peek_decompressed(path, codec=codec or "")
        except Exception:  # a corrupt or unsupported stream: only the name can still speak
            inner = b""
        return "pickle" if is_pickle_magic(inner) or has_pickle_suffix(path) else "unknown"
    return "unknown"


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
