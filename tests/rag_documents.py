"""Real documents for knowledge-base tests: PDFs written object by object (text a PDF reader
extracts, as a word processor's export would hold it), encrypted PDFs, image-only PDFs.

A plain module (import as `from rag_documents import pdf_bytes`), shared by the parsing,
chunking and ingestion tests.
"""

from __future__ import annotations

import io


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _content_stream(lines: list[str]) -> bytes:
    ops = ["BT", "/F1 11 Tf", "14 TL", "72 760 Td"]
    for line in lines:
        ops.append(f"({_escape(line)}) Tj T*")
    ops.append("ET")
    return "\n".join(ops).encode("latin-1")


def pdf_bytes(pages: list[str], *, title: str | None = None, image_only: bool = False) -> bytes:
    """A valid PDF 1.4 whose page n shows `pages[n]` (one text line per line) in Helvetica.

    With `image_only`, the pages draw only a filled rectangle: a "scanned" PDF with no text."""
    objects: list[bytes] = []  # object n+1 is objects[n]
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{n} 0 R" for n in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for i, text in enumerate(pages):
        content = b"0.5 g 72 500 300 200 re f" if image_only else _content_stream(text.splitlines())
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_ids[i] + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    info = None
    if title is not None:
        objects.append(f"<< /Title ({_escape(title)}) /Author (Converge tests) >>".encode("latin-1"))
        info = len(objects)
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    trailer = f"<< /Size {len(objects) + 1} /Root 1 0 R" + (f" /Info {info} 0 R" if info else "") + " >>"
    out.write(b"trailer\n" + trailer.encode() + b"\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def encrypted_pdf(pages: list[str], *, user_password: str = "secret", owner_password: str = "owner") -> bytes:
    """The same PDF encrypted by pypdf (AES-256); an empty `user_password` leaves it openable."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes(pages))))
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
