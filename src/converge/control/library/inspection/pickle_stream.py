"""The byte stream the symbolic pickle machine reads, and the opcodes in it.

Opcodes come from pickletools' own table and argument readers, except where those parse
differently from CPython's unpickler, the one that actually loads the file: pickletools reads
INT and LONG in base 10 and GLOBAL names as ASCII with escapes, where `pickle.load` reads
numbers in base 0 (`I0x10` is 16) and names as UTF-8. A stream pickletools rejects but
pickle.load runs would otherwise pass the content sniff as "not a pickle".
"""

from __future__ import annotations

import pickletools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

# Arguments longer than this (array bytes, big strings) are skipped, not held in memory.
SKIP_BYTES = 1 << 20
# Protocol 0 arguments are lines; pickle.load reads them whole, we stop at this length.
LINE_BYTES = 64 << 20


class StreamReader:
    """The stream as genops reads it, but skipping (not buffering) oversized arguments."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        start = raw.tell()
        self.size = raw.seek(0, 2)
        raw.seek(start)
        self.skipped = False

    def read(self, n: int) -> bytes:
        if n <= SKIP_BYTES:
            return self.raw.read(n)
        position = self.raw.tell()
        if position + n > self.size:
            return self.raw.read(self.size - position)  # short: genops reports the truncation
        self.raw.seek(n, 1)
        self.skipped = True
        return _Skipped(n)

    def readline(self) -> bytes:
        return self.raw.readline(LINE_BYTES)

    def tell(self) -> int:
        return self.raw.tell()


class _Skipped(bytes):
    """Stands in for n skipped bytes: genops only checks the length."""

    length: int

    def __new__(cls, length: int) -> _Skipped:
        made = super().__new__(cls)
        made.length = length
        return made

    def __len__(self) -> int:
        return int(self.length)


@dataclass
class ShadowBudget:
    """Opcodes left for shadow parses (see `follow_joblib_array`), shared by a whole file."""

    shadow_opcodes: int = 1_000_000


# pickletools.code2op, which typeshed leaves out as undocumented.
_OPCODES = {op.code: op for op in pickletools.opcodes}


def iter_opcodes(stream: StreamReader) -> Iterator[tuple[pickletools.OpcodeInfo, Any]]:
    """(opcode, argument) pairs up to and including STOP; ValueError on bytes that are no opcode."""
    while True:
        code = stream.read(1)
        opcode = _OPCODES.get(code.decode("latin-1"))
        if opcode is None:
            raise ValueError(
                "pickle exhausted before seeing STOP" if not code else f"opcode {code!r} unknown"
            )
        reader = _READERS.get(opcode.name)
        if reader is None:
            # typeshed says IO[bytes]; pickletools' readers only call read() and readline().
            arg = None if opcode.arg is None else opcode.arg.reader(cast("IO[bytes]", stream))
        else:
            arg = reader(stream)
        yield opcode, arg
        if opcode.name == "STOP":
            return


def _line(stream: StreamReader) -> bytes:
    data = stream.readline()
    if not data.endswith(b"\n"):
        raise ValueError("no newline found")
    return data[:-1]


_OCTAL = re.compile(rb"\s*[+-]?0[0-7]+\s*")


def _c_int(text: bytes) -> int:
    """What CPython's unpickler accepts: strtol(base 0), then int(text, 0)."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    if _OCTAL.fullmatch(text):  # strtol reads "010" as octal; int(..., 0) refuses it
        return int(text, 8)
    return int(text, 10)  # raises with the reason when nothing parses


def _read_int(stream: StreamReader) -> int | bool:
    text = _line(stream)
    if text in (b"00", b"01"):
        return text == b"01"
    return _c_int(text)


def _read_long(stream: StreamReader) -> int:
    text = _line(stream)
    return _c_int(text[:-1] if text.endswith(b"L") else text)


def _read_name_pair(stream: StreamReader) -> tuple[str, str]:
    # Two lines, UTF-8, no escapes: undecodable bytes survive as surrogates, which no allowed
    # name contains.
    module = _line(stream).decode("utf-8", errors="surrogateescape")
    name = _line(stream).decode("utf-8", errors="surrogateescape")
    return module, name


_READERS: dict[str, Any] = {
    "INT": _read_int,
    "LONG": _read_long,
    "GLOBAL": _read_name_pair,
    "INST": _read_name_pair,
}
