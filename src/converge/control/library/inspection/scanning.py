"""`scan_artifact`: find code-execution risks in the pickles a model artifact carries.

What each status means (the policy engine decides what to do with it):

- "unsafe": some pickle imports a global picklescan rates dangerous (os/posix.system,
  subprocess.*, builtins.eval/exec, ...). Unpickling it can run arbitrary code.
- "error": a pickle-bearing file could not be read to its end: corrupt, truncated, an
  unsupported or oversized compression, or bytes after a pickle that the parser cannot
  follow. We fail closed because a scan that stopped early cannot vouch for the rest.
  Uncompressed joblib files that inline numpy array bytes land here today: joblib writes raw
  array data between pickle opcodes, so no pickle parser (picklescan included) can see past
  the first array.
- "clean": every pickle was read end to end and nothing dangerous was found. Globals that
  picklescan calls "suspicious" (anything outside its small allow-list, such as
  sklearn.linear_model.LogisticRegression) are kept as findings with severity "suspicious"
  but do not change the status: every real sklearn pickle references its own estimator
  classes, so failing on them would reject every sklearn model, while the dangerous list is
  the actual code-execution surface. A stricter policy can still act on those findings.
- "not_applicable": nothing in the artifact carries pickles (GGUF, safetensors, ONNX).
"""

from __future__ import annotations

import importlib.metadata
import pickletools
import tempfile
from pathlib import Path
from typing import IO

from picklescan import scanner as picklescan
from picklescan.relaxed_zipfile import RelaxedZipFile

from converge.control.library.inspection import decompress
from converge.control.library.inspection.detect import (
    TORCH_SUFFIXES,
    has_pickle_suffix,
    is_pickle_magic,
    read_head,
    sniff,
    zip_pickle_entries,
)
from converge.control.library.inspection.results import Finding, ScanResult, ScanStatus

# Inflated content above this size is refused: far above any sklearn/joblib model we expect,
# low enough that a crafted "zip bomb" cannot fill the disk.
DEFAULT_MAX_DECOMPRESSED_BYTES = 16 * 1024**3
# Inflated pickles are held in memory up to this size, then spill to a temporary file.
_SPOOL_BYTES = 64 * 1024**2
# torch's legacy (pre-1.6) format: five pickles (magic number, protocol, sys info, the object,
# storage keys) followed by raw storage bytes that torch reads without unpickling.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PICKLES = 5
_SEVERITY_ORDER = {"dangerous": 0, "suspicious": 1, "error": 2}


def scan_artifact(
    path: str | Path, *, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
) -> ScanResult:
    """Scan every pickle-bearing file under `path` (a file or a folder)."""
    target = Path(path)
    version = _scanner_version()
    if not target.exists():
        missing = Finding(file=str(target), global_name=None, severity="error", message="path does not exist")
        return ScanResult(status="error", findings=[missing], scanner_version=version)
    root = target if target.is_dir() else target.parent
    files = [target] if target.is_file() else sorted(item for item in target.rglob("*") if item.is_file())
    findings: list[Finding] = []
    scanned: list[str] = []
    for file in files:
        label = file.relative_to(root).as_posix()
        outcome = _scan_file(file, label=label, max_bytes=max_decompressed_bytes)
        if outcome is not None:
            scanned.append(label)
            findings.extend(outcome)
    return ScanResult(
        status=_status(findings, scanned=bool(scanned)),
        findings=findings,
        scanner_version=version,
        scanned_files=scanned,
    )


def _scanner_version() -> str | None:
    try:
        return importlib.metadata.version("picklescan")
    except importlib.metadata.PackageNotFoundError:
        return None


def _status(findings: list[Finding], *, scanned: bool) -> ScanStatus:
    severities = {finding.severity for finding in findings}
    if "dangerous" in severities:
        return "unsafe"  # a confirmed threat outranks an incomplete read elsewhere
    if "error" in severities:
        return "error"
    return "clean" if scanned else "not_applicable"


def _error(label: str, message: str) -> Finding:
    return Finding(file=label, global_name=None, severity="error", message=message)


def _scan_file(path: Path, *, label: str, max_bytes: int) -> list[Finding] | None:
    """Findings for one file, or None when the file carries no pickles at all."""
    try:
        kind = sniff(path)
        if kind == "pickle":
            with path.open("rb") as stream:
                return _scan_pickle(stream, label=label, torch_layout=path.suffix.lower() in TORCH_SUFFIXES)
        if kind == "zip":
            with path.open("rb") as stream:
                return _scan_zip(stream, label=label)
        if kind == "compressed":
            return _scan_compressed(path, label=label, max_bytes=max_bytes)
        return None
    except Exception as exc:  # fail closed: whatever stopped the scan, the file is not vouched for
        return [_error(label, f"could not be scanned: {type(exc).__name__}: {exc}")]


def _scan_zip(stream: IO[bytes], *, label: str) -> list[Finding] | None:
    # picklescan's lenient reader accepts the same slightly malformed archives torch.load does.
    with RelaxedZipFile(stream) as archive:
        entries = zip_pickle_entries(archive)
        if not entries:
            return None
        findings: list[Finding] = []
        for name in entries:
            with archive.open(name) as entry:
                findings.extend(_scan_pickle(entry, label=f"{label}:{name}", torch_layout=False))
        return findings


def _scan_compressed(path: Path, *, label: str, max_bytes: int) -> list[Finding] | None:
    codec = decompress.compression_codec(read_head(path)) or ""
    named_pickle = has_pickle_suffix(path)
    try:
        head = decompress.peek_decompressed(path, codec=codec)
    except Exception as exc:  # corrupt stream or a codec we lack (lz4)
        return [_error(label, f"{codec} content could not be decompressed: {exc}")] if named_pickle else None
    if not (named_pickle or is_pickle_magic(head)):
        return None  # e.g. a gzipped tokenizer or tarball: no pickles to worry about
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as inflated:
        try:
            decompress.decompress_into(path, codec=codec, sink=inflated, max_bytes=max_bytes)
        except Exception as exc:
            return [_error(label, f"{codec} content could not be decompressed: {exc}")]
        inflated.seek(0)
        return _scan_pickle(inflated, label=label, torch_layout=False)


def _scan_pickle(stream: IO[bytes], *, label: str, torch_layout: bool) -> list[Finding]:
    start = stream.tell()
    problem = _unreadable_part(stream, torch_layout=torch_layout)
    stream.seek(start)
    if torch_layout:
        # scan_bytes knows torch's legacy multi-pickle layout and falls back to a plain scan.
        report = picklescan.scan_bytes(stream, label, file_ext=".pt")
    else:
        report = picklescan.scan_pickle_bytes(stream, label)
    innocuous = picklescan.SafetyLevel.Innocuous
    findings = [_global_finding(label, item) for item in report.globals if item.safety is not innocuous]
    findings.sort(key=lambda finding: (_SEVERITY_ORDER[finding.severity], finding.global_name or ""))
    # picklescan returns "no globals, no error" for bytes that are not a pickle at all, so our
    # own end-to-end parse is what tells a clean pickle from garbage.
    if problem is not None:
        findings.append(_error(label, problem))
    elif report.scan_err:
        findings.append(_error(label, "picklescan could not parse the whole pickle stream"))
    return findings


def _global_finding(label: str, item: picklescan.Global) -> Finding:
    name = f"{item.module}.{item.name}"
    if item.safety is picklescan.SafetyLevel.Dangerous:
        message = f"{name} can execute code or touch the system when unpickled"
        return Finding(file=label, global_name=name, severity="dangerous", message=message)
    message = f"{name} is outside picklescan's allow-list; unpickling runs its code"
    return Finding(file=label, global_name=name, severity="suspicious", message=message)


def _unreadable_part(stream: IO[bytes], *, torch_layout: bool) -> str | None:
    """Why the stream cannot be parsed as back-to-back pickles up to its end, or None if it can.

    pickletools only disassembles; nothing here is unpickled or executed.
    """
    count = 0
    legacy_torch = False
    while True:
        offset = stream.tell()
        try:
            for opcode, arg, _position in pickletools.genops(stream):
                if count == 0 and torch_layout and arg == _TORCH_LEGACY_MAGIC and "LONG" in opcode.name:
                    legacy_torch = True
        except Exception as exc:  # genops raises ValueError and friends on foreign bytes
            where = "the pickle stream" if count == 0 else f"the bytes after pickle {count}"
            return f"cannot parse {where} at offset {offset}: {exc}"
        count += 1
        if legacy_torch and count >= _TORCH_LEGACY_PICKLES:
            return None  # what follows is raw tensor storage
        if not stream.read(1):
            return None
        stream.seek(-1, 1)
