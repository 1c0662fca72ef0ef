"""Token-aware chunking with the embedding model's own tokenizer.

Each section (a heading's text, a PDF page, a JSON line) is chunked on its own, so a heading
always starts a chunk and a chunk cites one place. Inside a section a chunk holds up to
`tokens` tokens, never more than the model reads (`max_tokens`, its [CLS]/[SEP] included,
measured on the chunk's own text with `count`), and ends at the strongest boundary in the back
half of its window: a paragraph, else a sentence, else a line, else a space between words.
The next chunk starts up to `overlap` tokens earlier, at the strongest boundary there, so a
sentence cut by one chunk is whole in the next. Same input, same chunks.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from converge.control.rag.parsing import Section

BLOCK_CHARS = 32_768  # a section is tokenized in blocks cut at whitespace: bounded memory
# Break strengths between two tokens.
NONE, WORD, LINE, SENTENCE, PARAGRAPH = 0, 1, 2, 3, 4
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


class Tokenizer(Protocol):
    @property
    def max_tokens(self) -> int: ...

    def count(self, text: str) -> int: ...

    def count_many(self, texts: list[str]) -> list[int]: ...

    def offsets_many(self, texts: list[str]) -> list[list[tuple[int, int]]]: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    tokens: int  # what the model reads: special tokens included
    heading_path: list[str] = field(default_factory=list)
    page: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Limits:
    limit: int  # tokens in a chunk, special tokens included
    budget: int  # the text's own tokens in a chunk
    overlap: int


def chunk(sections: Iterable[Section], tokenizer: Tokenizer, *, tokens: int, overlap: int) -> list[Chunk]:
    """The chunks of a document's sections, in order."""
    limit = max(1, min(tokens, tokenizer.max_tokens))
    budget = max(1, limit - tokenizer.count(""))  # less [CLS] [SEP]: what the model adds to every text
    limits = _Limits(limit=limit, budget=budget, overlap=max(0, min(overlap, budget // 2)))
    sections = [s for s in sections if s.text.strip()]
    # Most sections fit in one chunk: one batched count settles them all. (No token is 64
    # characters long, so a longer text cannot fit.)
    short = [i for i, s in enumerate(sections) if len(s.text.strip()) <= limit * 64]
    counts = dict(zip(short, tokenizer.count_many([sections[i].text.strip() for i in short]), strict=True))
    out: list[Chunk] = []
    for i, section in enumerate(sections):
        if counts.get(i, limit + 1) <= limit:
            pieces = [(section.text.strip(), counts[i])]
        else:
            pieces = _split(section.text, tokenizer, limits=limits)
        out += [
            Chunk(
                text=text,
                tokens=count,
                heading_path=list(section.heading_path),
                page=section.page,
                metadata=dict(section.metadata),
            )
            for text, count in pieces
        ]
    return out


def _split(text: str, tokenizer: Tokenizer, *, limits: _Limits) -> list[tuple[str, int]]:
    """Plan the cuts on the text's tokens, count every planned chunk in one batch, and re-plan
    from the first one that the model's own count of its text puts over the limit (rare: a cut
    inside a word can count differently on its own than inside the whole)."""
    starts, ends = _offsets(text, tokenizer)
    levels = _levels(text, starts=starts, ends=ends)
    tokens = _Tokens(text=text, starts=starts, ends=ends, levels=levels)
    out: list[tuple[str, int]] = []
    s = 0
    while s < len(starts):
        cuts = _plan(tokens, s=s, limits=limits)
        pieces = [tokens.text_of(a, b) for a, b in cuts]
        counts = tokenizer.count_many(pieces)
        bad = next((k for k, count in enumerate(counts) if count > limits.limit), None)
        if bad is None:
            return out + list(zip(pieces, counts, strict=True))
        out += list(zip(pieces[:bad], counts[:bad], strict=True))
        a, b = cuts[bad]
        piece, count, b = _fit(tokenizer, tokens, s=a, b=b, limit=limits.limit)
        out.append((piece, count))
        s = _next_start(tokens, s=a, b=b, limits=limits) if b < len(starts) else len(starts)
    return out


@dataclass(frozen=True, slots=True)
class _Tokens:
    text: str
    starts: array[int]
    ends: array[int]
    levels: bytearray

    def text_of(self, s: int, b: int) -> str:
        return self.text[self.starts[s] : self.ends[b - 1]]


def _plan(tokens: _Tokens, *, s: int, limits: _Limits) -> list[tuple[int, int]]:
    n, cuts = len(tokens.starts), []
    while s < n:
        if s + limits.budget >= n:
            b = n
        else:
            b = _best(tokens.levels, lo=s + max(1, limits.budget // 2), hi=s + limits.budget)
        cuts.append((s, b))
        if b >= n:
            break
        s = _next_start(tokens, s=s, b=b, limits=limits)
    return cuts


def _next_start(tokens: _Tokens, *, s: int, b: int, limits: _Limits) -> int:
    if not limits.overlap:
        return b
    lo = b - limits.overlap
    return max(s + 1, _best(tokens.levels, lo=lo, hi=b - 1, earliest=True, default=lo))


def _offsets(text: str, tokenizer: Tokenizer) -> tuple[array[int], array[int]]:
    starts, ends = array("q"), array("q")
    blocks = list(_blocks(text))
    for (base, _), offsets in zip(blocks, tokenizer.offsets_many([b for _, b in blocks]), strict=True):
        starts.extend(base + start for start, _ in offsets)
        ends.extend(base + end for _, end in offsets)
    return starts, ends


def _blocks(text: str) -> Iterable[tuple[int, str]]:
    """Pieces of at most BLOCK_CHARS, cut at a paragraph, a line or a space where there is one."""
    pos = 0
    while pos < len(text):
        end = min(pos + BLOCK_CHARS, len(text))
        if end < len(text):
            for sep in ("\n\n", "\n", " "):
                cut = text.rfind(sep, pos + BLOCK_CHARS // 2, end)
                if cut > pos:
                    end = cut + len(sep)
                    break
        yield pos, text[pos:end]
        pos = end


def _levels(text: str, *, starts: array[int], ends: array[int]) -> bytearray:
    """levels[i]: how good a place to cut just before token i is."""
    levels = bytearray(len(starts))
    for i in range(1, len(starts)):
        gap = text[ends[i - 1] : starts[i]]
        if not gap or not gap.isspace():
            continue  # inside a word, or punctuation glued to it
        if gap.count("\n") >= 2:
            levels[i] = PARAGRAPH
        elif _SENTENCE_END.search(text[starts[i - 1] : ends[i - 1]]):
            levels[i] = SENTENCE
        elif "\n" in gap:
            levels[i] = LINE
        else:
            levels[i] = WORD
    return levels


def _best(levels: bytearray, *, lo: int, hi: int, earliest: bool = False, default: int | None = None) -> int:
    """The cut with the strongest boundary in [lo, hi]: the latest one (to fill a chunk) or,
    for an overlap, the earliest (to repeat as much as allowed); `default` (else `hi`) when
    there is none."""
    lo, hi = max(lo, 1), min(hi, len(levels))
    best, where = NONE, hi if default is None else default
    span = range(lo, hi + 1) if earliest else range(hi, lo - 1, -1)
    for i in span:
        level = levels[i] if i < len(levels) else PARAGRAPH
        if level > best:
            best, where = level, i
    return where


def _fit(tokenizer: Tokenizer, tokens: _Tokens, *, s: int, b: int, limit: int) -> tuple[str, int, int]:
    """Tokens [s, b) as text, moved back to earlier boundaries until its own count fits."""
    while True:
        piece = tokens.text_of(s, b)
        count = tokenizer.count(piece)
        if count <= limit or b - s <= 1:
            return piece, count, b
        over = count - limit
        b = _best(tokens.levels, lo=b - over - 8, hi=b - over) if b - over > s + 1 else s + 1
