"""Files to text sections: txt, markdown, HTML, PDF and JSON lines.

A document is a list of sections, each a run of text under one heading path (or one PDF page,
or one JSON line) that chunking never merges with its neighbours, so a chunk cites one place.
The type comes from the file name and is then checked against the content (a PDF must start
like one, text must be text): a name alone never decides how bytes are read. Every refusal is a
`ParseError` whose reason is shown to the user for that document; the job's others go on.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePosixPath
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

TEXT, MARKDOWN, HTML, PDF, JSONL = (
    "text/plain",
    "text/markdown",
    "text/html",
    "application/pdf",
    "application/jsonl",
)
MEDIA_TYPES = {
    ".txt": TEXT,
    ".text": TEXT,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".html": HTML,
    ".htm": HTML,
    ".pdf": PDF,
    ".jsonl": JSONL,
    ".ndjson": JSONL,
}
_PDF_MAGIC = b"%PDF-"
_WS = re.compile(r"[ \t\r\f\v]+")


class ParseError(Exception):
    """This document cannot be ingested; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class Section:
    text: str
    heading_path: list[str] = field(default_factory=list)
    page: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Document:
    title: str
    media_type: str
    sections: list[Section]
    pages: int | None = None  # PDFs only
    metadata: dict[str, Any] = field(default_factory=dict)  # about the whole file (a PDF's author)


def media_type_for(filename: str) -> str | None:
    """The media type a file name claims, or None when the type is not supported."""
    return MEDIA_TYPES.get(PurePosixPath(filename).suffix.lower())


def supported_extensions() -> list[str]:
    return sorted(MEDIA_TYPES)


def parse(data: bytes, filename: str) -> Document:
    media_type = media_type_for(filename)
    if media_type is None:
        raise ParseError(
            f"unsupported file type '{PurePosixPath(filename).suffix or filename}' "
            f"(supported: {', '.join(supported_extensions())})"
        )
    stem = PurePosixPath(filename).stem
    is_pdf = data[:1024].lstrip().startswith(_PDF_MAGIC)
    if media_type == PDF:
        if not is_pdf:
            raise ParseError("not a PDF: the file does not start with a %PDF- header")
        document = _pdf(data, stem)
    else:
        if is_pdf:
            raise ParseError(f"the content is a PDF, not {media_type}: name the file .pdf")
        text = _decode(data)
        if media_type == MARKDOWN:
            document = _markdown(text, stem)
        elif media_type == HTML:
            document = _html(text, stem)
        elif media_type == JSONL:
            document = _jsonl(text, stem)
        else:
            document = Document(title=stem, media_type=TEXT, sections=[Section(text=text.strip())])
    sections = [s for s in document.sections if s.text.strip()]
    if not sections:
        raise ParseError("empty document: no text to ingest")
    return Document(
        title=document.title or stem,
        media_type=document.media_type,
        sections=sections,
        pages=document.pages,
        metadata=document.metadata,
    )


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ParseError(f"not valid UTF-16 text (byte {exc.start})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParseError(f"not UTF-8 text: invalid byte at offset {exc.start} (binary file?)") from None
    if "\x00" in text:
        raise ParseError("not text: the file holds NUL bytes (binary file?)")
    return text


# --- markdown ---------------------------------------------------------------------------------


def _markdown(text: str, stem: str) -> Document:
    """Top-level headings start sections (a `#` in a code block or a quote does not); a
    section's text is its source lines, heading included, so code and tables stay intact."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    lines = text.splitlines()
    starts: list[tuple[int, int, int, str]] = []  # (first line, line after the heading, level, text)
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.level == 0 and token.map:
            starts.append((token.map[0], token.map[1], int(token.tag[1]), _inline_text(tokens[i + 1])))
    title = next((heading for _, _, level, heading in starts if level == 1), "")
    sections = [Section(text="\n".join(lines[: starts[0][0] if starts else len(lines)]).strip())]
    path: list[tuple[int, str]] = []
    for n, (line, after, level, heading) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, heading))
        # A heading with nothing under it (straight into a subheading) is only carried in
        # the path of what follows, not a chunk of its own.
        if any(body.strip() for body in lines[after:end]):
            sections.append(
                Section(text="\n".join(lines[line:end]).strip(), heading_path=[h for _, h in path])
            )
    return Document(title=title, media_type=MARKDOWN, sections=sections)


def _inline_text(token: Token) -> str:
    if not token.children:
        return token.content.strip()
    parts = [
        " " if child.type in ("softbreak", "hardbreak") else child.content
        for child in token.children
        if child.type in ("text", "code_inline", "softbreak", "hardbreak", "html_inline")
    ]
    return " ".join("".join(parts).split())


# --- HTML -------------------------------------------------------------------------------------

_SKIP = frozenset({"script", "style", "nav", "noscript", "template", "svg", "iframe", "head"})
_BLOCK = frozenset(
    {
        "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre", "blockquote",
        "header", "footer", "main", "aside", "figure", "figcaption", "hr", "form", "fieldset",
        "address", "details", "summary", "caption",
    }
)  # fmt: skip
_BOUNDARY = frozenset({"section", "article"})
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_VOID = frozenset(
    {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr"}
)


class _HtmlSections(HTMLParser):
    """Headings start sections and extend the heading path; <section> and <article> are
    boundaries too, and the path inside one is restored when it closes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.title = ""
        self.first_h1 = ""
        self._path: list[tuple[int, str]] = []
        self._outer_paths: list[list[tuple[int, str]]] = []  # at each open <section>/<article>
        self._text = ""
        self._skip = 0
        self._pre = 0
        self._in_title = False
        self._heading: tuple[int, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP and tag not in _VOID:
            self._skip += 1
        elif self._skip:
            return
        elif tag in _HEADINGS:
            self._flush()
            self._heading = (_HEADINGS[tag], [])
        elif tag in _BOUNDARY:
            self._flush()
            self._outer_paths.append(list(self._path))
        elif tag == "pre":
            self._pre += 1
            self._newline()
        elif tag in _BLOCK:
            self._newline()
        elif tag in ("td", "th") and self._text and not self._text.endswith("\n"):
            self._text += " "

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif self._skip:
            return
        elif tag in _HEADINGS and self._heading is not None:
            level, parts = self._heading
            text = " ".join("".join(parts).split())
            self._heading = None
            while self._path and self._path[-1][0] >= level:
                self._path.pop()
            self._path.append((level, text))
            if level == 1 and not self.first_h1:
                self.first_h1 = text
            self._text += text
            self._newline()
        elif tag in _BOUNDARY:
            self._flush()
            if self._outer_paths:
                self._path = self._outer_paths.pop()
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
            self._newline()
        elif tag in _BLOCK:
            self._newline()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif self._skip:
            return
        elif self._heading is not None:
            self._heading[1].append(data)
        elif self._pre:
            self._text += data  # preformatted: kept as written
        else:
            data = _WS.sub(" ", data.replace("\n", " "))
            self._text += data.lstrip() if self._text.endswith("\n") or not self._text else data

    def close(self) -> None:
        super().close()
        self._flush()

    def _newline(self) -> None:
        self._text = self._text.rstrip(" ") + "\n"

    def _flush(self) -> None:
        text = "\n".join(line.rstrip() for line in self._text.split("\n"))
        text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
        self._text = ""
        if text.strip():
            self.sections.append(Section(text=text, heading_path=[h for _, h in self._path]))


def _html(text: str, stem: str) -> Document:
    parser = _HtmlSections()
    parser.feed(text)
    parser.close()
    title = " ".join(parser.title.split()) or parser.first_h1
    return Document(title=title, media_type=HTML, sections=parser.sections)


# --- PDF --------------------------------------------------------------------------------------


def _pdf(data: bytes, stem: str) -> Document:
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns on every recoverable flaw
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _decrypts(reader):
            raise ParseError("password-protected PDF: remove the password and upload it again")
        sections = []
        for number, page in enumerate(reader.pages, start=1):
            text = _tidy(page.extract_text() or "")
            if text:
                sections.append(Section(text=text, page=number))
        pages = len(reader.pages)
        info = reader.metadata
    except ParseError:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf on untrusted bytes fails in many ways; each is this file's
        raise ParseError(f"unreadable PDF: {str(exc) or type(exc).__name__}") from None
    if not sections:
        raise ParseError("no text could be extracted (scanned PDF?): an image-only PDF needs OCR first")
    meta = {
        key: str(getattr(info, key)) for key in ("author", "subject") if info and getattr(info, key, None)
    }
    title = str(info.title).strip() if info and info.title else ""
    return Document(title=title, media_type=PDF, sections=sections, pages=pages, metadata=meta)


def _decrypts(reader: Any) -> bool:
    """A PDF encrypted with an empty user password (owner restrictions only) opens anyway."""
    from pypdf import PasswordType
    from pypdf.errors import DependencyError

    try:
        return reader.decrypt("") != PasswordType.NOT_DECRYPTED
    except DependencyError as exc:
        raise ParseError(f"encrypted PDF that cannot be decrypted here: {exc}") from None
    except (ValueError, KeyError, NotImplementedError):
        return False


def _tidy(text: str) -> str:
    lines = [_WS.sub(" ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# --- JSON lines -------------------------------------------------------------------------------


def _jsonl(text: str, stem: str) -> Document:
    sections = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ParseError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ParseError(f'line {number}: expected an object {{"text": ..., "metadata": {{...}}}}')
        body, metadata = record.get("text"), record.get("metadata", {})
        if not isinstance(body, str) or not body.strip():
            raise ParseError(f"line {number}: 'text' must be a non-empty string")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise ParseError(f"line {number}: 'metadata' must be an object")
        sections.append(Section(text=body.strip(), metadata=metadata))
    return Document(title=stem, media_type=JSONL, sections=sections)
