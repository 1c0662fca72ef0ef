"""Files uploaded for ingestion: a multipart body parsed while it streams, each file checked
(type, size, count) as it arrives and written to the artifact store in constant memory.

Starlette's form parser would spool the whole body to disk before the route sees any of it, so
an oversized or unsupported file would only be refused after all of it had arrived. Here the
type is refused from the part's headers, before its bytes are read, and the size the moment a
file passes the limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from converge.errors import AppError, BadRequest, PayloadTooLarge, Unprocessable
from converge.kit.schemas import text_problem
from converge.storage.artifacts import ArtifactStore, ArtifactTooLarge

FIELD = "files"
MAX_NAME = 1024  # a document's source, as stored

Event = tuple[str, Any]


class UnsupportedMediaType(AppError):
    status_code, type, title = 415, "unsupported-media-type", "Unsupported file type"


@dataclass(frozen=True, slots=True)
class Uploaded:
    name: str
    key: str  # the artifact store's key of the bytes
    bytes: int
    sha256: str
    created: bool  # False: identical bytes were already stored (so never remove them on failure)

    def source(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Limits:
    max_file_bytes: int
    max_files: int
    suffixes: list[str]  # the file types ingestion reads, e.g. ".md"


def boundary_of(content_type: str) -> bytes | None:
    kind, options = parse_options_header(content_type)
    return options.get(b"boundary") if kind == b"multipart/form-data" else None


async def receive(
    request: Request,
    store: ArtifactStore,
    *,
    boundary: bytes,
    limits: Limits,
    stored: Callable[[Uploaded], None],
) -> list[Uploaded]:
    """Every file of the `files` field, stored. `stored` hears of each file as soon as it is in
    the store, so a caller can remove them if a later one is refused."""
    events = _events(request, boundary)
    files: list[Uploaded] = []
    async for kind, value in events:
        if kind != "headers":
            continue
        name = _file_name(value, limits=limits, seen={f.name for f in files})
        if len(files) >= limits.max_files:
            raise PayloadTooLarge(
                f"files: at most {limits.max_files} files per ingestion (rag.max_files); "
                f"'{name}' is file {len(files) + 1}",
                extra={"field": "files", "limit": limits.max_files},
            )
        try:
            blob = await store.put_stream(_part(events), max_bytes=limits.max_file_bytes)
        except ArtifactTooLarge as exc:
            raise PayloadTooLarge(
                f"files: '{name}' exceeds the limit of {exc.limit} bytes per file (rag.max_file_bytes); "
                "nothing was ingested",
                extra={"field": "files", "file": name, "limit": exc.limit},
            ) from exc
        upload = Uploaded(
            name=name,
            key=store.object_key(blob.sha256),
            bytes=blob.size_bytes,
            sha256=blob.sha256,
            created=blob.created,
        )
        stored(upload)
        files.append(upload)
    if not files:
        raise Unprocessable(
            "files: no file in the upload; send one or more files in the multipart field 'files'",
            extra={"field": "files"},
        )
    return files


def _file_name(headers: dict[bytes, bytes], *, limits: Limits, seen: set[str]) -> str:
    kind, options = parse_options_header(headers.get(b"content-disposition", b""))
    field = options.get(b"name", b"").decode("latin-1")
    if kind != b"form-data" or field != FIELD:
        raise Unprocessable(
            f"{field or '(unnamed part)'}: unknown field; send the files in the multipart field 'files'",
            extra={"field": field},
        )
    try:
        name = options.get(b"filename", b"").decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or len(name) > MAX_NAME or text_problem(name):
        raise Unprocessable(
            f"files: every file needs a file name of 1 to {MAX_NAME} characters (valid Unicode, no NUL)",
            extra={"field": "files"},
        )
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in limits.suffixes:
        allowed = ", ".join(limits.suffixes)
        raise UnsupportedMediaType(
            f"files: '{name}' is not a supported type ({suffix or 'no extension'}); allowed: {allowed}",
            extra={"field": "files", "file": name, "allowed": limits.suffixes},
        )
    if name in seen:
        raise Unprocessable(
            f"files: '{name}' is in the upload twice; a name is one document",
            extra={"field": "files", "file": name},
        )
    return name


async def _part(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """The current part's bytes, pulled from the same event stream as the parts."""
    async for kind, value in events:
        if kind == "data":
            yield value
        elif kind == "end":
            return


async def _events(request: Request, boundary: bytes) -> AsyncIterator[Event]:
    """("headers", {name: value}), ("data", bytes) and ("end", None) per part, as the body
    arrives: python-multipart's push parser, turned into a stream."""
    pending: deque[Event] = deque()
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()

    def header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def headers_done() -> None:
        pending.append(("headers", dict(headers)))
        headers.clear()

    callbacks: Any = {
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_headers_finished": headers_done,
        "on_part_data": lambda data, start, end: pending.append(("data", bytes(data[start:end]))),
        "on_part_end": lambda: pending.append(("end", None)),
    }
    parser = MultipartParser(boundary, callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            parser.write(chunk)
            while pending:
                yield pending.popleft()
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"Malformed multipart body: {exc}; nothing was ingested") from exc
    except ClientDisconnect as exc:
        raise BadRequest(f"Upload interrupted after {received} bytes; nothing was ingested") from exc
    if parser.state != MultipartState.END:
        # The body stopped before the closing boundary: the last file is incomplete.
        raise BadRequest(f"Truncated multipart body after {received} bytes; nothing was ingested")
    while pending:
        yield pending.popleft()
