"""`scan_artifact`: find the code paths a model artifact carries, and refuse the unknown ones.

Pickles are judged against an allow-list (`converge.core.pickle_allowlist`): a pickle is clean
only when every global it imports is one real model formats need; anything else is a
"dangerous" finding. Pickles are found by content, whatever their name or protocol, inside
zip/tar archives and compressed streams at any depth (`containers`). Other formats' code
paths are checked too: chat templates (`templates`), Keras configs, ONNX external data and
safetensors headers (`formats`).

What each status means (the policy engine decides what to do with it):

- "unsafe": some finding is dangerous: a pickle imports a global outside the allow-list (or
  one that cannot be resolved without running it), a chat template reaches for private
  attributes or unknown globals, a Keras model holds a Lambda layer or a foreign module, an
  ONNX tensor reads data outside the artifact, a safetensors header points out of bounds, or
  an archive member would extract outside its folder.
- "error": something could not be read to its end, or a limit was exceeded (nesting depth,
  member count, decompressed bytes, compression ratio): corrupt, truncated, an unsupported
  or oversized compression, bytes after a pickle the parser cannot follow. We fail closed
  because a scan that stopped early cannot vouch for the rest.
- "clean": the artifact holds pickles, each was read end to end, and nothing is dangerous.
- "not_applicable": the artifact holds no pickles at all (GGUF, safetensors, ONNX), and its
  other code paths passed.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from converge.control.library.inspection import formats, templates
from converge.control.library.inspection.containers import (
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    Budget,
    Leaf,
    ScanLimits,
    walk,
)
from converge.control.library.inspection.detect import sniff_stream
from converge.control.library.inspection.pickles import npy_findings, scan_pickle_stream
from converge.control.library.inspection.results import Finding, ScanResult, ScanStatus
from converge.core.pickle_allowlist import ALLOWLIST_VERSION

SCANNER = "converge-allowlist"
PICKLE_NAMES = frozenset({".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt"})
_SEVERITY_ORDER = {"dangerous": 0, "suspicious": 1, "error": 2}

__all__ = ["DEFAULT_MAX_DECOMPRESSED_BYTES", "SCANNER", "ScanLimits", "scan_artifact"]


def scan_artifact(
    path: str | Path,
    *,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
    limits: ScanLimits | None = None,
) -> ScanResult:
    """Scan every file under `path` (a file or a folder). `limits` overrides `max_decompressed_bytes`."""
    target = Path(path)
    version = scanner_version()
    if not target.exists():
        missing = Finding(file=str(target), global_name=None, severity="error", message="path does not exist")
        return ScanResult(status="error", findings=[missing], scanner=SCANNER, scanner_version=version)
    root = target if target.is_dir() else target.parent
    files = [target] if target.is_file() else sorted(item for item in target.rglob("*") if item.is_file())
    budget = Budget(limits or ScanLimits(max_decompressed_bytes=max_decompressed_bytes))
    findings: list[Finding] = _link_findings(target) if target.is_dir() else []
    scanned: list[str] = []
    saw_pickle = False
    for file in files:
        label = file.relative_to(root).as_posix()
        for item in _walk_file(file, label=label, budget=budget):
            if isinstance(item, Finding):
                findings.append(item)
                continue
            outcome = _check_leaf(item, root=root)
            if outcome is not None:
                found, carries_pickle = outcome
                scanned.append(item.label)
                findings.extend(found)
                saw_pickle = saw_pickle or carries_pickle
    findings.sort(key=lambda finding: _SEVERITY_ORDER[finding.severity])  # stable: file order kept
    return ScanResult(
        status=_status(findings, saw_pickle=saw_pickle),
        findings=findings,
        scanner=SCANNER,
        scanner_version=version,
        scanned_files=scanned,
    )


def scanner_version() -> str:
    """Our allow-list's version, and picklescan's (the second opinion), e.g. "1+picklescan-1.0.5"."""
    try:
        return f"{ALLOWLIST_VERSION}+picklescan-{importlib.metadata.version('picklescan')}"
    except importlib.metadata.PackageNotFoundError:
        return ALLOWLIST_VERSION


def _status(findings: list[Finding], *, saw_pickle: bool) -> ScanStatus:
    severities = {finding.severity for finding in findings}
    if "dangerous" in severities:
        return "unsafe"  # a confirmed threat outranks an incomplete read elsewhere
    if "error" in severities:
        return "error"
    return "clean" if saw_pickle else "not_applicable"


def _walk_file(file: Path, *, label: str, budget: Budget) -> Iterator[Leaf | Finding]:
    try:
        with file.open("rb") as stream:
            yield from walk(stream, label=label, name=file.name, sniff=sniff_stream, budget=budget, path=file)
    except Exception as exc:  # fail closed: whatever stopped the scan, the file is not vouched for
        yield _error(label, f"could not be scanned: {type(exc).__name__}: {exc}")


def _check_leaf(leaf: Leaf, *, root: Path) -> tuple[list[Finding], bool] | None:
    """(findings, whether it holds a pickle) for one leaf; None when it carries no code path we know."""
    try:
        if leaf.kind == "pickle":
            return scan_pickle_stream(leaf.stream, label=leaf.label), True
        if leaf.kind == "npy":
            return npy_findings(leaf.stream, label=leaf.label)
        found = _check_other(leaf, root=root)
        return None if found is None else (found, False)
    except Exception as exc:  # fail closed: a check that broke cannot vouch for the file
        return [_error(leaf.label, f"could not be scanned: {type(exc).__name__}: {exc}")], False


def _check_other(leaf: Leaf, *, root: Path) -> list[Finding] | None:
    label, stream = leaf.label, leaf.stream
    if leaf.kind == "gguf":
        return templates.gguf_findings(stream, label=label)
    if leaf.kind == "safetensors":
        return formats.safetensors_findings(stream, label=label)
    if leaf.kind == "hdf5":
        return formats.hdf5_findings(stream, label=label)
    if leaf.kind == "onnx" or leaf.name.lower().endswith(".onnx"):
        return formats.onnx_findings(stream, label=label, path=leaf.path, root=root)
    if leaf.name == "config.json":
        return formats.keras_config_findings(stream, label=label)
    if leaf.name in templates.TEMPLATE_FILES:
        return templates.json_template_findings(stream, label=label)
    if leaf.name.endswith(".jinja"):
        source = stream.read(templates.MAX_TEMPLATE_CHARS * 4).decode("utf-8", errors="replace")
        return templates.template_findings(source, label=label)
    if leaf.kind == "unknown" and PurePosixPath(leaf.name).suffix.lower() in PICKLE_NAMES:
        # Content decides, but a name that promises a pickle and bytes that are none is not
        # something to vouch for either.
        return [_error(label, "is named like a pickle but its bytes cannot be parsed as one")]
    return None


def _link_findings(folder: Path) -> list[Finding]:
    """Symlinks (to files or folders) that point out of the artifact hand a loader someone else's files."""
    root = folder.resolve()
    found = []
    for entry in sorted(folder.rglob("*")):
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            label = entry.relative_to(folder).as_posix()
            message = "is a symlink to a path outside the artifact"
            found.append(Finding(file=label, global_name=None, severity="dangerous", message=message))
    return found


def _error(label: str, message: str) -> Finding:
    return Finding(file=label, global_name=None, severity="error", message=message)
