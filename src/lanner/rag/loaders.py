"""Reading documents into text: txt, md, html, pdf (per page) and docx.

Every loader returns ``Page`` objects whose ``text`` is *the* source text that
chunk spans point into: ``page.text[chunk.start:chunk.end] == chunk.text``.

- txt/md: the file's characters exactly (UTF-8; line endings kept as written).
- html: the visible text, with headings written as Markdown ``#`` lines and
  blocks separated by blank lines, so chunking sees the same structure.
- pdf: one ``Page`` per page (numbered from 1), pypdf's text extraction.
- docx: paragraphs and tables in body order; Heading styles become ``#`` lines.

A file that cannot be read raises ``UnreadableDocument`` with the reason;
``discover`` walks folders and returns the files it knows how to read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from lanner.errors import LannerError

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")


class UnreadableDocument(LannerError):
    """A file that exists but cannot be turned into text (corrupt, encrypted,
    not UTF-8, unsupported type). Ingest reports it and goes on."""


@dataclass(frozen=True, slots=True)
class Page:
    number: int | None
    """1-based page number for paginated formats (pdf); None otherwise."""
    text: str


def discover(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to ingest under ``paths`` (folders recursively, hidden entries
    skipped), resolved and sorted, and (path, reason) for those that are not.

    A file named explicitly with an unknown suffix is reported; such files
    met inside a folder are skipped silently (folders hold all sorts).
    """
    found: dict[Path, None] = {}
    rejected: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path).parts
                if child.is_file() and _supported(child) and not _hidden(rel):
                    found.setdefault(child.resolve(), None)
        elif path.is_file():
            if _supported(path):
                found.setdefault(path.resolve(), None)
            else:
                rejected.append((path, f"unsupported file type {path.suffix or '(none)'!r} "
                                 f"(known: {', '.join(SUFFIXES)})"))
        else:
            rejected.append((path, "no such file or folder"))
    return sorted(found), rejected


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def load(path: Path) -> list[Page]:
    """The pages of ``path``; raises ``UnreadableDocument`` saying why not."""
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise UnreadableDocument(f"{path}: unsupported file type {suffix!r}")
    try:
        return reader(path)
    except UnreadableDocument:
        raise
    except OSError as exc:
        raise UnreadableDocument(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # parsers raise anything at all on a corrupt file
        raise UnreadableDocument(f"{path}: not a readable {suffix[1:]} file: {exc}") from exc


def _text(path: Path) -> list[Page]:
    return [Page(None, decode(path.read_bytes(), path))]


def decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading BOM dropped); binary data is refused, not guessed at."""
    if b"\x00" in data[:8192]:
        raise UnreadableDocument(f"{path}: looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(
            f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc


def _pdf(path: Path) -> list[Page]:
    from pypdf import PdfReader  # only when a PDF is met

    # pypdf logs its repairs of damaged files; the reason we report is enough.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    reader = PdfReader(str(path))
    if reader.is_encrypted and not reader.decrypt(""):
        raise UnreadableDocument(f"{path}: the PDF is encrypted with a password")
    return [Page(i, page.extract_text() or "") for i, page in enumerate(reader.pages, 1)]


def _docx(path: Path) -> list[Page]:
    import docx  # python-docx, only when a .docx is met

    document = docx.Document(str(path))
    blocks = [b for b in _docx_blocks(document) if b.strip()]
    return [Page(None, "\n\n".join(blocks))]


def _docx_blocks(document: Any) -> Iterator[str]:
    from docx.table import Table

    for item in document.iter_inner_content():
        if isinstance(item, Table):
            for row in item.rows:
                yield " | ".join(cell.text.strip() for cell in row.cells)
            continue
        style = (item.style.name if item.style is not None else "") or ""
        level = re.fullmatch(r"Heading (\d)", style)
        if style == "Title":
            yield f"# {item.text.strip()}"
        elif level:
            yield f"{'#' * min(int(level.group(1)), 6)} {item.text.strip()}"
        else:
            yield item.text.strip()


def _html(path: Path) -> list[Page]:
    parser = _HtmlText()
    parser.feed(decode(path.read_bytes(), path))
    parser.close()
    return [Page(None, parser.text())]


class _HtmlText(HTMLParser):
    """Visible text of an HTML page as Markdown-ish blocks."""

    _SKIP = frozenset({"script", "style", "head", "noscript", "template", "svg"})
    _BLOCK = frozenset({"p", "div", "section", "article", "li", "tr", "br", "pre", "table",
                        "blockquote", "ul", "ol", "dd", "dt", "header", "footer", "main"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._blocks: list[str] = []
        self._current: list[str] = []
        self._skipping = 0
        self._heading = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self._heading = int(tag[1])
        elif tag in self._BLOCK:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self._BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._current.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._current).split())
        if text:
            self._blocks.append(f"{'#' * self._heading} {text}" if self._heading else text)
        self._current = []
        self._heading = 0

    def text(self) -> str:
        self._flush()
        return "\n\n".join(self._blocks)


_READERS = {
    ".txt": _text, ".md": _text, ".markdown": _text,
    ".html": _html, ".htm": _html,
    ".pdf": _pdf, ".docx": _docx,
}
