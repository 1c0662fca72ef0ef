"""Value types returned by inspection and scanning: plain data, serialisable with `to_dict()`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["dangerous", "suspicious", "error"]
ScanStatus = Literal["clean", "unsafe", "error", "not_applicable"]


class InspectionError(ValueError):
    """A file claims a format (by magic or name) but its contents cannot be read as that format."""


@dataclass
class Inspection:
    """Facts read from a model artifact's own bytes; `None` means "not known", never "zero"."""

    format: str
    architecture: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    chat_template: str | None = None
    dtypes: list[str] | None = None
    license: str | None = None
    opset: int | None = None
    inputs: list[dict[str, Any]] | None = None
    outputs: list[dict[str, Any]] | None = None
    memory_bytes: int | None = None
    kv_cache_bytes_per_1k_tokens: int | None = None
    files: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Derived, but stored alongside so policies (CEL) can test it without string handling.
        data["has_chat_template"] = self.has_chat_template
        return data


@dataclass(frozen=True)
class Finding:
    file: str
    global_name: str | None
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, Any]:
        # "global" is a keyword in Python, hence the different attribute name.
        return {
            "file": self.file,
            "global": self.global_name,
            "severity": self.severity,
            "message": self.message,
        }


@dataclass
class ScanResult:
    status: ScanStatus
    findings: list[Finding] = field(default_factory=list)
    scanner: str = "converge-allowlist"
    scanner_version: str | None = None
    scanned_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "scanner": self.scanner,
            "scanner_version": self.scanner_version,
            "scanned_files": list(self.scanned_files),
            "findings": [finding.to_dict() for finding in self.findings],
        }
