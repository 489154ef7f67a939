"""Cutting a page of text into chunks by its structure, with overlap.

Structure first: Markdown ``#`` headings start a new section (HTML and docx
loaders write their headings that way too), paragraphs (runs of non-blank
lines) are packed whole into chunks of at most ``max_chars`` characters; a
paragraph too long for one chunk is cut at sentence ends, then at spaces.
Consecutive chunks of one section overlap by up to ``overlap`` characters,
starting at a sentence (or word) boundary; chunks never overlap across a
heading.

The contract every chunk keeps: ``page_text[chunk.start:chunk.end] ==
chunk.text``, and the text has no leading or trailing whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from lanner.errors import InvalidRequest
from lanner.rag.loaders import Page

MAX_CHARS = 1000
"""About 200 word pieces of English: inside all-MiniLM-L6-v2's 256-piece window."""
OVERLAP = 150

_BLOCK = re.compile(r"(?:[^\n]*\S[^\n]*(?:\n|$))+")
_HEADING = re.compile(r"^(#{1,6})[ \t]+\S.*$", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+|\s*\n\s*")


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    start: int
    """Character offset in the page text where the chunk begins."""
    end: int
    """Offset one past the chunk's last character."""
    page: int | None = None
    heading: str = ""
    """The headings above the chunk, outermost first, joined by " > "."""


@dataclass(frozen=True, slots=True)
class _Unit:
    start: int
    end: int
    level: int = 0
    """Heading level 1-6, or 0 for body text."""


def chunk_pages(pages: Iterable[Page], *, max_chars: int = MAX_CHARS,
                overlap: int = OVERLAP) -> list[Chunk]:
    """Chunks of every page in order; headings carry over from page to page."""
    chunks: list[Chunk] = []
    headings: list[tuple[int, str]] = []
    for page in pages:
        chunks.extend(chunk_text(page.text, page=page.number, max_chars=max_chars,
                                 overlap=overlap, headings=headings))
    return chunks


def chunk_text(text: str, *, page: int | None = None, max_chars: int = MAX_CHARS,
               overlap: int = OVERLAP, headings: list[tuple[int, str]] | None = None,
               ) -> list[Chunk]:
    """Chunks of one page of text. ``headings`` (level, title) is the heading
    stack in force where the page begins; it is updated in place."""
    if max_chars < 50:
        raise InvalidRequest("max_chars", f"must be at least 50, got {max_chars}")
    if not 0 <= overlap < max_chars // 2:
        raise InvalidRequest("overlap", f"must be in [0, max_chars/2), got {overlap}")
    stack = headings if headings is not None else []
    chunks: list[Chunk] = []
    for start, units in _sections(text, stack):
        title = " > ".join(t for _, t in stack)
        for a, b in _pack(text, units, start, max_chars, overlap):
            chunks.append(Chunk(text[a:b], a, b, page, title))
    return chunks


def _sections(text: str, stack: list[tuple[int, str]]) -> Iterator[tuple[int, list[_Unit]]]:
    """(where the section's chunks may start, its body units), per section.

    The heading stack is updated before each section is yielded. A heading
    with no body before the next heading is kept: the next section's first
    chunk starts at it (so "# Book / ## Chapter 1" stay together).
    """
    start: int | None = None
    body: list[_Unit] = []
    for unit in _units(text):
        if unit.level:
            if body and start is not None:
                yield start, body
                start, body = None, []
            title = text[unit.start:unit.end].lstrip("#").strip()
            while stack and stack[-1][0] >= unit.level:
                stack.pop()
            stack.append((unit.level, title))
            start = unit.start if start is None else start
        else:
            start = unit.start if start is None else start
            body.append(unit)
    if start is not None:
        yield start, body or [_Unit(start, len(text.rstrip()))]


def _units(text: str) -> Iterator[_Unit]:
    """Headings and paragraphs (stripped spans), in order."""
    for block in _BLOCK.finditer(text):
        pos = block.start()
        for heading in _HEADING.finditer(text, block.start(), block.end()):
            yield from _stripped(text, pos, heading.start())
            yield _Unit(heading.start(), heading.end(), len(heading.group(1)))
            pos = heading.end()
        yield from _stripped(text, pos, block.end())


def _stripped(text: str, start: int, end: int) -> Iterator[_Unit]:
    piece = text[start:end]
    if piece.strip():
        lead = len(piece) - len(piece.lstrip())
        yield _Unit(start + lead, start + len(piece.rstrip()))


def _pack(text: str, units: list[_Unit], start: int, max_chars: int,
          overlap: int) -> Iterator[tuple[int, int]]:
    """Spans of the chunks of one section: units packed greedily from
    ``start``, each new chunk reaching back up to ``overlap`` characters."""
    pieces = [p for u in units for p in _fit(text, u, max_chars)]
    a, b = start, None
    for piece in pieces:
        if b is None or piece.end - a <= max_chars:
            # The section's heading counts too: a chunk that would be too long
            # with it starts at the body instead.
            a = piece.start if b is None and piece.end - a > max_chars else a
            b = piece.end
            continue
        yield a, b
        back = _overlap_start(text, a, b, overlap)
        a = piece.start if back is None or piece.end - back > max_chars else back
        b = piece.end
    if b is not None:
        yield a, b


def _fit(text: str, unit: _Unit, max_chars: int) -> Iterator[_Unit]:
    """``unit`` cut into pieces of at most ``max_chars``: at sentence ends,
    then at whitespace, then anywhere."""
    if unit.end - unit.start <= max_chars:
        yield unit
        return
    cuts = [m.end() for m in _SENTENCE_END.finditer(text, unit.start, unit.end)]
    pos = unit.start
    for cut in [*cuts, unit.end]:
        if cut > pos:  # one sentence per piece; _pack joins them again up to max_chars
            yield from _words(text, pos, cut, max_chars)
            pos = cut


def _words(text: str, start: int, end: int, max_chars: int) -> Iterator[_Unit]:
    """Stripped pieces of text[start:end], each at most ``max_chars``, cut at
    the last space that fits (or hard, for one enormous word)."""
    pos = start
    while pos < end:
        stop = min(end, pos + max_chars)
        if stop < end:
            space = text.rfind(" ", pos + 1, stop + 1)
            stop = space if space > pos else stop
        yield from _stripped(text, pos, stop)
        pos = stop


def _overlap_start(text: str, a: int, b: int, overlap: int) -> int | None:
    """Where the next chunk starts, inside the chunk text[a:b]: the first
    sentence start in its last ``overlap`` characters, else the first word
    start there; None (no overlap) when neither exists."""
    if overlap == 0:
        return None
    low = max(a + 1, b - overlap)
    for match in _SENTENCE_END.finditer(text, low, b):
        if match.end() < b:
            return match.end()
    space = text.find(" ", low, b)
    if space < 0:
        return None
    while space < b and text[space].isspace():
        space += 1
    return space if space < b else None
