"""Chunking by structure with exact character spans, and the loaders' text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lanner.errors import InvalidRequest
from lanner.rag.chunking import chunk_pages, chunk_text
from lanner.rag.loaders import Page, UnreadableDocument, discover, load

DOC = """# Guide

Intro paragraph about the guide.

## Setup

First, unpack the box. Then plug it in.

Second paragraph of setup.

## Use
### Daily

Press the big button.
"""


def check_spans(text: str, chunks: list) -> None:
    for chunk in chunks:
        assert text[chunk.start:chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip() and chunk.text


def test_headings_start_chunks_and_name_them() -> None:
    chunks = chunk_text(DOC)
    check_spans(DOC, chunks)
    assert [c.heading for c in chunks] == ["Guide", "Guide > Setup", "Guide > Use > Daily"]
    assert chunks[1].text.startswith("## Setup") and "Second paragraph" in chunks[1].text
    # A heading with nothing under it stays with the next one.
    assert chunks[2].text.startswith("## Use\n### Daily")


def test_long_sections_are_cut_at_paragraphs_and_sentences_with_overlap() -> None:
    sentences = [f"Sentence number {i} says something about topic {i % 7}." for i in range(60)]
    text = "# Long\n\n" + " ".join(sentences[:30]) + "\n\n" + " ".join(sentences[30:])
    chunks = chunk_text(text, max_chars=300, overlap=80)
    check_spans(text, chunks)
    assert all(len(c.text) <= 300 for c in chunks)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end, "neighbours overlap"
        assert a.end - b.start <= 80
        assert b.text.startswith("Sentence"), "the overlap starts at a sentence"


def test_no_overlap_across_headings() -> None:
    text = "# A\n\n" + "word " * 100 + "\n\n# B\n\nshort body"
    chunks = chunk_text(text, max_chars=200, overlap=50)
    check_spans(text, chunks)
    first_b = next(c for c in chunks if c.heading == "B")
    assert first_b.start == text.index("# B")


@pytest.mark.parametrize("seed", range(20))
def test_spans_hold_for_any_text(seed: int) -> None:
    rng = random.Random(seed)
    words = ["alpha", "beta.", "gamma!", "delta?", "#", "## Title", "x" * 400, "\n", "\n\n",
             "\r\n", "\t", "  ", "é", "日本語", "end.", "\n### Sub\n"]
    text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(0, 600)))
    for max_chars, overlap in ((1000, 150), (120, 40), (50, 0)):
        chunks = chunk_text(text, max_chars=max_chars, overlap=overlap)
        check_spans(text, chunks)
        assert all(len(c.text) <= max_chars for c in chunks)
        covered: set[int] = set()
        for c in chunks:
            covered.update(range(c.start, c.end))
        body = {i for i, ch in enumerate(text) if not ch.isspace()}
        # Every character is in a chunk, except a heading line that a too-long
        # first paragraph pushed out (the chunk's ``heading`` still names it).
        assert not {i for i in body - covered if not _in_heading_line(text, i)}


def _in_heading_line(text: str, i: int) -> bool:
    start = text.rfind("\n", 0, i) + 1
    return text[start:].startswith("#")


def test_pages_keep_their_numbers_and_headings_carry_over() -> None:
    pages = [Page(1, "# Report\n\nPage one text."), Page(2, "Page two text.")]
    chunks = chunk_pages(pages)
    assert [(c.page, c.heading, c.text) for c in chunks] == [
        (1, "Report", "# Report\n\nPage one text."), (2, "Report", "Page two text.")]


def test_bad_chunking_options_name_the_field() -> None:
    with pytest.raises(InvalidRequest, match="max_chars"):
        chunk_text("x", max_chars=10)
    with pytest.raises(InvalidRequest, match="overlap"):
        chunk_text("x", max_chars=100, overlap=60)


# -- loaders ----------------------------------------------------------------------


def test_text_files_are_read_exactly(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"line one\r\n\r\nline two\r\n")
    assert load(path) == [Page(None, "line one\r\n\r\nline two\r\n")]


def test_html_keeps_headings_and_drops_scripts(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text("<html><head><title>T</title><script>var x = 1;</script></head><body>"
                    "<h2>Title &amp; more</h2><p>One <b>bold</b> word.</p><ul><li>a</li>"
                    "<li>b</li></ul></body></html>")
    assert load(path)[0].text == "## Title & more\n\nOne bold word.\n\na\n\nb"


def test_unreadable_files_raise_with_the_reason(tmp_path: Path) -> None:
    cases = {"bin.txt": b"\x00\x01\x02", "bad.pdf": b"not a pdf", "bad.docx": b"PK no zip"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableDocument, match=name):
            load(tmp_path / name)


def test_discover_walks_folders_and_reports_what_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "a" / ".git").mkdir(parents=True)
    (tmp_path / "a" / "x.md").write_text("x")
    (tmp_path / "a" / "y.png").write_bytes(b"png")
    (tmp_path / "a" / ".git" / "z.txt").write_text("z")
    (tmp_path / "photo.jpg").write_bytes(b"jpg")
    files, rejected = discover([tmp_path / "a", tmp_path / "photo.jpg", tmp_path / "gone.txt"])
    assert [f.name for f in files] == ["x.md"]
    reasons = {p.name: why for p, why in rejected}
    assert "unsupported file type '.jpg'" in reasons["photo.jpg"]
    assert reasons["gone.txt"] == "no such file or folder"
