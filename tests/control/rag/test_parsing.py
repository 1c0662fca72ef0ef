"""Parsing: real markdown, HTML, PDF (written object by object, encrypted by pypdf) and JSON
lines into sections; a file that cannot be read is refused with a reason a person can act on."""

from __future__ import annotations

import json

import pytest
from rag_documents import encrypted_pdf, pdf_bytes

from converge.control.rag.parsing import HTML, JSONL, MARKDOWN, PDF, TEXT, ParseError, media_type_for, parse

GUIDE = """Preface before any heading.

# Install guide

Intro paragraph.

## Requirements

```sh
# a comment in a code block is not a heading
pip install converge
```

## Empty heading
### Deep heading
Deep text.

> # a heading in a quote does not start a section

Setext title
============
Under the setext title.
"""


def test_markdown_headings_start_sections_and_keep_their_path():
    doc = parse(GUIDE.encode(), "guide.md")

    assert doc.media_type == MARKDOWN and doc.title == "Install guide"
    paths = [s.heading_path for s in doc.sections]
    assert paths == [
        [],
        ["Install guide"],
        ["Install guide", "Requirements"],
        ["Install guide", "Empty heading", "Deep heading"],  # a bare heading only joins the path
        ["Setext title"],
    ]
    code = doc.sections[2].text
    assert code.startswith("## Requirements") and "# a comment in a code block" in code
    assert "a heading in a quote" in doc.sections[3].text


def test_html_sections_follow_headings_and_drop_scripts_styles_and_navigation():
    page = """<!doctype html><html><head><title>The  Handbook</title><style>p {color: red}</style>
    <script>document.write("<h1>not text</h1>")</script></head><body>
    <nav><a href="/">Home</a> <a href="/about">About</a></nav>
    <h1>Caf&eacute; &amp; tea</h1><p>First
    paragraph.</p><p>Second.</p>
    <section><h2>Brewing</h2><p>Steep<br>for four minutes.</p><ul><li>green</li><li>black</li></ul></section>
    <article><p>An article after the section.</p></article>
    <h3>Code</h3><pre>def brew():
    return "tea"</pre><table><tr><td>a</td><td>b</td></tr></table>
    </body></html>"""
    doc = parse(page.encode(), "handbook.html")

    assert doc.media_type == HTML and doc.title == "The Handbook"
    texts = " ".join(s.text for s in doc.sections)
    assert "not text" not in texts and "Home" not in texts and "color" not in texts
    first, brewing, article, code = doc.sections
    assert first.heading_path == ["Café & tea"] and "First paragraph." in first.text
    assert brewing.heading_path == ["Café & tea", "Brewing"] and "Steep\nfor four minutes." in brewing.text
    assert article.heading_path == ["Café & tea"]  # the section's heading ended with it
    assert code.heading_path == ["Café & tea", "Code"]
    assert 'def brew():\n    return "tea"' in code.text  # preformatted text keeps its indentation
    assert "a b" in code.text


def test_html_title_falls_back_to_the_first_h1():
    doc = parse(b"<body><h1>Only heading</h1><p>text</p></body>", "page.htm")
    assert doc.title == "Only heading"


def test_pdf_has_one_section_per_page_with_its_number():
    doc = parse(pdf_bytes(["Page one (first)\nsecond line", "", "Page three"], title="Report"), "r.pdf")

    assert doc.media_type == PDF and doc.title == "Report" and doc.pages == 3
    assert [(s.page, s.text) for s in doc.sections] == [
        (1, "Page one (first)\nsecond line"),
        (3, "Page three"),  # a blank page holds no section
    ]
    assert doc.metadata == {"author": "Converge tests"}


def test_pdf_encrypted_with_a_password_is_refused_as_password_protected():
    with pytest.raises(ParseError, match="password-protected PDF"):
        parse(encrypted_pdf(["secret text"]), "locked.pdf")


def test_pdf_with_owner_restrictions_only_opens():
    doc = parse(encrypted_pdf(["open text"], user_password=""), "restricted.pdf")
    assert [s.text for s in doc.sections] == ["open text"]


def test_pdf_without_text_is_refused_as_probably_scanned():
    with pytest.raises(ParseError, match=r"no text could be extracted \(scanned PDF\?\)"):
        parse(pdf_bytes(["x", "y"], image_only=True), "scan.pdf")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pdf_bytes(["cut short"])[:150], "unreadable PDF"),
        (b"%PDF-1.7\nnothing else", "unreadable PDF"),
        (b"just text", "not a PDF"),
    ],
)
def test_broken_pdfs_are_refused_with_a_reason(data, message):
    with pytest.raises(ParseError, match=message):
        parse(data, "broken.pdf")


def test_a_name_never_decides_alone():
    with pytest.raises(ParseError, match="the content is a PDF"):
        parse(pdf_bytes(["hello"]), "notes.txt")
    with pytest.raises(ParseError, match="not UTF-8 text"):
        parse(b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "image.md")


def test_json_lines_keep_each_line_and_its_metadata():
    lines = [{"text": "alpha", "metadata": {"lang": "en", "n": 1}}, {"text": "beta"}]
    data = ("\n".join(json.dumps(line) for line in lines) + "\n\n").encode()
    doc = parse(data, "records.jsonl")

    assert doc.media_type == JSONL
    assert [(s.text, s.metadata) for s in doc.sections] == [("alpha", {"lang": "en", "n": 1}), ("beta", {})]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('["a list"]', "line 2: expected an object"),
        ('{"metadata": {}}', "line 2: 'text' must be a non-empty string"),
        ('{"text": "x", "metadata": [1]}', "line 2: 'metadata' must be an object"),
    ],
)
def test_a_bad_json_line_is_named_by_its_number(second, message):
    with pytest.raises(ParseError, match=message):
        parse(f'{{"text": "fine"}}\n{second}\n'.encode(), "bad.jsonl")


@pytest.mark.parametrize("name", ["empty.txt", "empty.md", "empty.html", "empty.jsonl"])
def test_empty_documents_are_refused(name):
    with pytest.raises(ParseError, match="empty document"):
        parse(b"  \n\n ", name)


def test_plain_text_is_one_section_and_unknown_types_are_refused():
    assert parse("\ufeffCafé au lait.\n".encode(), "menu.txt").sections[0].text == "Café au lait."
    assert media_type_for("A.TXT") == TEXT and media_type_for("slides.pptx") is None
    with pytest.raises(ParseError, match=r"unsupported file type '\.docx'"):
        parse(b"PK\x03\x04", "letter.docx")
