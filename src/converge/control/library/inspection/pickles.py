"""Pickle streams: recognise them by content, and scan every pickle one holds.

Protocol 2+ pickles open with PROTO; protocols 0 and 1 have no marker at all, so a file is
taken for a pickle when a bounded trial parse says pickle.load would act on it: the parse
reaches STOP, or runs through its whole window, or imports or calls something before it
breaks. Bytes that break before anything active (text, JSON, raw tensors) can only make
pickle.load fail, never run code, so they are not pickles.
"""

from __future__ import annotations

import ast
import struct
from typing import IO, Any

from picklescan import scanner as picklescan

from converge.control.library.inspection.pickle_stream import ShadowBudget, StreamReader
from converge.control.library.inspection.pickle_vm import PickleMachine, PickleReport
from converge.control.library.inspection.results import Finding

# The trial parse that decides "is this a pickle" reads at most this many opcodes.
TRIAL_OPCODES = 4096
# picklescan buffers whole arguments; it only gives its second opinion on streams up to this.
PICKLESCAN_MAX_BYTES = 512 << 20
# torch's legacy (pre-1.6) format: five pickles (magic number, protocol, sys info, the object,
# storage keys) followed by raw storage bytes that torch reads without unpickling.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PICKLES = 5


def is_pickle_magic(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= 5


def looks_like_pickle(stream: IO[bytes]) -> bool:
    """Whether pickle.load would act on the bytes at the stream's position (position kept)."""
    start = stream.tell()
    try:
        head = stream.read(2)
        if is_pickle_magic(head):
            return True
        if not head:
            return False
        stream.seek(start)
        machine = PickleMachine(StreamReader(stream), label="")
        report = machine.run(max_opcodes=TRIAL_OPCODES)
    finally:
        stream.seek(start)
    return report.error is None or report.active


def scan_pickle_stream(stream: IO[bytes], *, label: str) -> list[Finding]:
    """Findings for a stream of back-to-back pickles, read from its position to its end."""
    start = stream.tell()
    findings = _own_findings(stream, label=label)
    stream.seek(0, 2)
    size = stream.tell() - start
    stream.seek(start)
    if size <= PICKLESCAN_MAX_BYTES:
        findings.extend(_second_opinion(stream, label=label, known=findings))
    return findings


def _own_findings(stream: IO[bytes], *, label: str) -> list[Finding]:
    reader = StreamReader(stream)
    budget = ShadowBudget()
    findings: list[Finding] = []
    count = 0
    legacy_torch = False
    while True:
        offset = reader.tell()
        report: PickleReport = PickleMachine(reader, label=label, budget=budget).run()
        findings.extend(report.findings)
        if report.error is not None:
            where = "the pickle stream" if count == 0 else f"the bytes after pickle {count}"
            findings.append(_error(label, f"cannot parse {where} at offset {offset}: {report.error}"))
            return findings
        if count == 0 and report.value == TORCH_LEGACY_MAGIC:
            legacy_torch = True
        count += 1
        if legacy_torch and count >= TORCH_LEGACY_PICKLES:
            return findings  # what follows is raw tensor storage
        if reader.tell() >= reader.size:
            return findings


NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 64 * 1024


def npy_findings(stream: IO[bytes], *, label: str) -> tuple[list[Finding], bool]:
    """A .npy file: (findings, holds a pickle). Object arrays are a pickle after the header,
    which `numpy.load(allow_pickle=True)` runs; the header itself is a Python literal."""
    stream.seek(0)
    head = stream.read(8)
    if len(head) < 8 or not head.startswith(NPY_MAGIC):
        return [_error(label, "is not a readable .npy file")], False
    width = 2 if head[6] == 1 else 4
    raw_length = stream.read(width)
    (length,) = struct.unpack("<H" if width == 2 else "<I", raw_length.ljust(width, b"\0"))
    if length > _NPY_MAX_HEADER:
        return [_error(label, f"its .npy header is over {_NPY_MAX_HEADER} bytes")], False
    try:
        header = ast.literal_eval(stream.read(length).decode("latin-1"))
        descr = header["descr"]
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as exc:
        return [_error(label, f"its .npy header cannot be read: {exc}")], False
    if not _holds_objects(descr):
        return [], False
    return scan_pickle_stream(stream, label=label), True


def _holds_objects(descr: Any) -> bool:
    if isinstance(descr, str):
        return descr.lstrip("<>|=").startswith("O")
    if isinstance(descr, list | tuple):
        return any(_holds_objects(part) for part in descr)
    return False


def _second_opinion(stream: IO[bytes], *, label: str, known: list[Finding]) -> list[Finding]:
    """picklescan's dangerous globals that our own parse did not already report."""
    report = picklescan.scan_pickle_bytes(stream, label)
    reported = {finding.global_name for finding in known}
    extra = []
    for item in report.globals:
        name = f"{item.module}.{item.name}"
        if item.safety is picklescan.SafetyLevel.Dangerous and name not in reported:
            message = f"{name} is on picklescan's list of dangerous globals"
            extra.append(Finding(file=label, global_name=name, severity="dangerous", message=message))
            reported.add(name)
    return extra


def _error(label: str, message: str) -> Finding:
    return Finding(file=label, global_name=None, severity="error", message=message)
