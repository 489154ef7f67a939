"""Collections end to end on a corpus the tests write (txt, md, html, a PDF
and a docx), against both stores: SQLite (the default) and PostgreSQL +
pgvector (a real server from the ``pgserver`` wheel).

Embeddings are real: the bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lanner.rag.embed import LocalEmbedder
from lanner.rag.library import Library
from lanner.rag.loaders import load
from lanner.rag.store_sqlite import SqliteDocumentStore

# -- the corpus ------------------------------------------------------------------

ESPRESSO = """# Orbitron 5 espresso machine

## Cleaning

Descale the boiler every 60 days with citric acid dissolved in warm water. Rinse the drip \
tray and the steam wand after each session; milk left in the wand turns sour within hours.

## Error codes

### Code ZX81Q

The water tank is empty. Refill it and press start.

### Code ZX83C

The boiler is overheating. Let the machine cool for twenty minutes before brewing again.
"""

HOUSE = """Life at the old farmhouse

The feline dozed all afternoon on the woven rug beside the fireplace, waking only when \
the kettle whistled.

The roof over the barn leaks at the north corner, and the gutters were replaced in 2019.

Firewood is stacked under the eaves: oak burns longest, birch lights fastest.
"""

INVENTORY = """Workshop inventory

Crate 1 holds oak dowels, supplier reference BRV1182.

Crate 2 holds brass hinges for the cabinet doors, supplier reference QMX7734.

Crate 3 holds linseed oil and rags, supplier reference TLK5520.

Crate 4 holds spare saw blades, supplier reference PZD9043.
"""

BIKES = """<html><head><title>Bicycle care</title><style>p {color: red}</style></head>
<body><h1>Bicycle care</h1>
<h2>Chains</h2><p>Clean the chain every 300 kilometres with a degreaser, then oil it
lightly. A dry chain squeaks and wears the cassette.</p>
<h2>Tyres</h2><p>Pump road tyres to 6 bar and check them for glass splinters after rainy
rides.</p><script>console.log("not text")</script></body></html>
"""

PDF_PAGES = [
    ["Annual budget 2024", "The library spent 41,500 euros on new books.",
     "Heating cost 12,300 euros, more than the year before."],
    ["Harbour history", "The harbour warehouse was built in 1921 by the Oskarsson family.",
     "It stored salted herring until the fishery closed."],
]


def write_pdf(path: Path, pages: list[list[str]]) -> None:
    """A minimal valid PDF: one text line per string, one page per list."""
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        ops = " ".join(f"({esc(line)}) Tj T*" for line in lines)
        stream = f"BT /F1 12 Tf 72 720 Td 16 TL {ops} ET".encode("latin-1")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
                       f"<< /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def write_docx(path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_heading("Beekeeping notes", level=1)
    document.add_paragraph("A strong colony needs about twenty kilograms of honey to "
                           "survive the winter.")
    document.add_heading("Swarming", level=2)
    document.add_paragraph("Colonies prepare to swarm in late spring, when the hive runs "
                           "out of space.")
    table = document.add_table(rows=2, cols=2)
    for (row, col), text in {(0, 0): "Hive", (0, 1): "Frames", (1, 0): "Linden",
                             (1, 1): "11"}.items():
        table.cell(row, col).text = text
    document.save(str(path))


def write_corpus(root: Path) -> Path:
    (root / "web").mkdir(parents=True)
    (root / "espresso.md").write_text(ESPRESSO)
    (root / "house.txt").write_text(HOUSE)
    (root / "inventory.txt").write_text(INVENTORY)
    (root / "web" / "bikes.html").write_text(BIKES)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never ingested")
    write_pdf(root / "report.pdf", PDF_PAGES)
    write_docx(root / "bees.docx")
    return root


CORPUS_FILES = {"espresso.md", "house.txt", "inventory.txt", "bikes.html", "report.pdf",
                "bees.docx"}
# Small chunks: most paragraphs become passages of their own, as in a big corpus.
CHUNKING: dict[str, Any] = {"max_chars": 160, "overlap": 60}

# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> LocalEmbedder:
    # Session-wide, so not in the first test's home (gone once that test passes),
    # and the exact runtime, as conftest gives every test.
    return LocalEmbedder(runtime="torch", home=tmp_path_factory.mktemp("embedder-home"))


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import pgserver  # the dev extra's: a missing wheel is a failure, not a skip

    try:
        server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data",
                                     cleanup_mode="delete")
    except Exception as exc:  # pgserver raises its own and OS errors; 13 tests need it
        pytest.fail(f"pgserver could not start PostgreSQL here: {exc}")
    # A throw-away server: no need to wait for disks (shutdown took 15 s with fsync).
    server.psql("ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;")
    server.psql("SELECT pg_reload_conf();")
    yield server
    server.cleanup()


def make_library(request: pytest.FixtureRequest, tmp_path: Path,
                 embedder: LocalEmbedder) -> Library:
    """A library on the store ``request.param`` names: "sqlite" (a file in
    ``tmp_path``) or "postgresql" (a fresh database on the session's server)."""
    if request.param == "sqlite":
        lib = Library(SqliteDocumentStore(tmp_path / "logs.db"))
    else:
        server = request.getfixturevalue("pg_server")
        name = f"t_{uuid.uuid4().hex[:12]}"
        server.psql(f"CREATE DATABASE {name};")
        lib = Library.open(server.get_uri(name))
    lib.use_embedder(embedder)
    return lib


@pytest.fixture(params=["sqlite", "postgresql"])
def library(request: pytest.FixtureRequest, tmp_path: Path,
            embedder: LocalEmbedder) -> Iterator[Library]:
    lib = make_library(request, tmp_path, embedder)
    yield lib
    lib.close()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def names(paths: list[str]) -> set[str]:
    return {Path(p).name for p in paths}


# -- ingest -----------------------------------------------------------------------


def test_every_chunk_span_cut_from_its_source_is_the_chunk(library: Library,
                                                           corpus: Path) -> None:
    report = library.ingest([corpus], "docs", **CHUNKING)
    assert names(report.added) == CORPUS_FILES  # .hidden/ skipped, subfolder found
    ids = _all_chunk_ids(library, "docs")
    chunks = library.store.get_chunks(ids)
    assert len(chunks) == report.chunks > len(CORPUS_FILES)
    for chunk in chunks:
        pages = {page.number: page.text for page in load(Path(chunk.path))}
        assert pages[chunk.page][chunk.start:chunk.end] == chunk.text
    pdf_pages = {c.page for c in chunks if c.path.endswith("report.pdf")}
    assert pdf_pages == {1, 2}
    herring = next(c for c in chunks if "herring" in c.text)
    assert herring.page == 2
    codes = next(c for c in chunks if "tank is empty" in c.text)
    assert codes.heading == "Orbitron 5 espresso machine > Error codes > Code ZX81Q"


def _all_chunk_ids(library: Library, collection: str) -> list[int]:
    # Every chunk matches a vector search with k = the number of chunks.
    total = library.store.get_collection(collection).chunks  # type: ignore[union-attr]
    probe = np.ones(384, dtype=np.float32) / np.sqrt(384)
    return [cid for cid, _ in library.store.vector_search(collection, probe, total)]


def test_reingesting_unchanged_files_changes_nothing(library: Library, corpus: Path) -> None:
    first = library.ingest([corpus], "docs", **CHUNKING)
    ids = sorted(_all_chunk_ids(library, "docs"))
    again = library.ingest([corpus], "docs", **CHUNKING)
    assert again.added == [] and again.updated == [] and again.chunks == 0
    assert names(again.unchanged) == CORPUS_FILES
    assert sorted(_all_chunk_ids(library, "docs")) == ids
    assert library.store.get_collection("docs").chunks == first.chunks  # type: ignore[union-attr]


def test_a_changed_file_replaces_its_old_chunks(library: Library, corpus: Path) -> None:
    library.ingest([corpus], "docs", **CHUNKING)
    assert library.search("gutters", "docs", k=1, mode="keyword")
    house = corpus / "house.txt"
    house.write_text("The farmhouse was sold in 2023 to a beekeeper called Marguerite.\n")
    report = library.ingest([corpus], "docs", **CHUNKING)
    assert names(report.updated) == {"house.txt"} and report.added == []
    assert library.search("gutters", "docs", k=5, mode="keyword") == []
    hits = library.search("Marguerite", "docs", k=1, mode="keyword")
    assert hits and hits[0].chunk.text.startswith("The farmhouse was sold")
    doc = next(d for d in library.store.documents("docs") if d.path == str(house.resolve()))
    assert doc.chunks == 1


def test_a_deleted_file_can_be_forgotten(library: Library, corpus: Path) -> None:
    library.ingest([corpus], "docs", **CHUNKING)
    (corpus / "inventory.txt").unlink()
    assert "inventory.txt" in names([d.path for d in library.store.documents("docs")])
    assert names(library.forget_missing("docs")) == {"inventory.txt"}
    assert "inventory.txt" not in names([d.path for d in library.store.documents("docs")])
    assert library.search("QMX7734", "docs", k=5, mode="keyword") == []


def test_an_unreadable_file_is_skipped_with_a_reason(library: Library, corpus: Path) -> None:
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    report = library.ingest([corpus, corpus / "nowhere.md"], "docs", **CHUNKING)
    skipped = {Path(p).name: why for p, why in report.skipped}
    assert set(skipped) == {"broken.pdf", "latin1.txt", "nowhere.md"}
    assert "pdf" in skipped["broken.pdf"]
    assert "UTF-8" in skipped["latin1.txt"]
    assert "no such file" in skipped["nowhere.md"]
    assert names(report.added) == CORPUS_FILES  # the rest of the run went on


def test_a_collection_keeps_its_embedder(library: Library, corpus: Path) -> None:
    from lanner.errors import InvalidRequest

    library.ingest([corpus / "house.txt"], "docs", **CHUNKING)
    with pytest.raises(InvalidRequest, match="was built with embedder"):
        library.store.create_collection("docs", "/some/other/model", 384)
    assert [c.name for c in library.store.collections()] == ["docs"]
    library.store.drop_collection("docs")
    assert library.store.collections() == []


# -- retrieval --------------------------------------------------------------------


def test_hybrid_finds_what_only_keyword_search_finds(library: Library, corpus: Path) -> None:
    library.ingest([corpus], "docs", **CHUNKING)
    query = "QMX7734"  # a part number: meaningless to the embedding model
    target = "supplier reference QMX7734"
    assert not _found(library.search(query, "docs", k=3, mode="vector"), target)
    assert _found(library.search(query, "docs", k=3, mode="keyword"), target)
    hybrid = library.search(query, "docs", k=3, mode="hybrid")
    assert target in hybrid[0].chunk.text
    assert hybrid[0].keyword_rank == 1 and (hybrid[0].vector_rank or 99) > 3


def test_hybrid_finds_what_only_vector_search_finds(library: Library, corpus: Path) -> None:
    library.ingest([corpus], "docs", **CHUNKING)
    query = "Where did the cat sleep?"  # no word in common with the passage
    target = "The feline dozed"
    assert library.search(query, "docs", k=3, mode="keyword") == []
    assert _found(library.search(query, "docs", k=3, mode="vector"), target)
    hybrid = library.search(query, "docs", k=3, mode="hybrid")
    assert target in hybrid[0].chunk.text and hybrid[0].keyword_rank is None


def test_passages_from_every_format_are_retrievable(library: Library, corpus: Path) -> None:
    library.ingest([corpus], "docs", **CHUNKING)
    cases = {
        "Who built the harbour warehouse?": ("report.pdf", "Oskarsson"),
        "How much honey does a colony need for the winter?": ("bees.docx", "kilograms"),
        "How often should I clean my bicycle chain?": ("bikes.html", "300 kilometres"),
        "How often must the boiler be descaled?": ("espresso.md", "60 days"),
    }
    for question, (file, words) in cases.items():
        top = library.search(question, "docs", k=1)[0].chunk
        assert Path(top.path).name == file and words in top.text, question


def _found(hits: list[Any], words: str) -> bool:
    return any(words in hit.chunk.text for hit in hits)
