"""Keyword search as good on PostgreSQL as on SQLite: the same terms (any
language), the same BM25 ranking, exact term statistics when two processes
ingest at once, old databases upgraded, one connection pool per store.

(A rare word that only keyword search finds, on both stores:
``test_rag_store.test_hybrid_finds_what_only_keyword_search_finds``.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lanner.rag.embed import LocalEmbedder
from lanner.rag.library import Library
from lanner.rag.store_sqlite import SqliteDocumentStore
from lanner.rag.terms import chunk_terms, query_terms
from test_rag_store import (  # noqa: F401 - embedder and pg_server are fixtures
    CHUNKING,
    embedder,
    make_library,
    pg_server,
    write_corpus,
)

ITALIAN = """Manutenzione della caldaia

La caldaia va decalcificata ogni sessanta giorni con acido citrico sciolto in acqua tiepida.

Il magazzino del porto si trova nella città vecchia, accanto alla torre dell'orologio.

I pescatori vendono le acciughe al mercato coperto il sabato mattina.
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def library(request: pytest.FixtureRequest, tmp_path: Path,
            embedder: LocalEmbedder) -> Iterator[Library]:  # noqa: F811
    lib = make_library(request, tmp_path, embedder)
    yield lib
    lib.close()


def _pg_url(server: Any) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.psql(f"CREATE DATABASE {name};")
    return str(server.get_uri(name))


def test_terms_are_the_sqlite_index_terms() -> None:
    (chunk,) = chunk_terms([("La città è piena di batterie; Jeremy's batteries ran.",
                             "Guida > Città")])
    assert chunk.tf["citta"] == 1.5  # accent removed; the heading's counts half
    assert chunk.tf["batteri"] == 2.0  # Porter folds the English plural; Italian stays whole
    assert chunk.length == 12
    assert query_terms(["citta", "Città", "dell", "orologio"]) == {
        "citta": 2, "dell": 1, "orologio": 1}


def test_an_italian_query_finds_the_italian_passage(library: Library, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "porto.md").write_text(ITALIAN)
    library.ingest([corpus], "docs", **CHUNKING)
    cases = {"Dove si trova il magazzino del porto?": "magazzino del porto",
             "Quale edificio sta nella citta vecchia?": "città vecchia",  # accent left out
             "Che cosa c'è accanto alla torre dell'orologio?": "torre dell'orologio"}
    for query, target in cases.items():
        top = library.search(query, "docs", k=1, mode="keyword")
        assert top and target in top[0].chunk.text, query
        hybrid = library.search(query, "docs", k=3)
        assert any(target in h.chunk.text for h in hybrid), query
    top = library.search("Quando si vendono le acciughe?", "docs", k=1, mode="keyword")
    assert "acciughe al mercato" in top[0].chunk.text


GUIDE = """# Fine-tuning guide

## Models

A model is fine-tuned when the base model is trained further. Pick a model that fits your \
GPU: a small model trains fast, a large model trains slowly, and every model needs data.

## Tools

Use the tool that your model supports; the tool reads the model config and trains the model.

## Case study

Jeremy used Axolotl to fine-tune the SQL model on a used RTX 3090.
"""


def test_rare_words_outrank_common_ones(library: Library, tmp_path: Path) -> None:
    # The question that PostgreSQL's ts_rank_cd got wrong: its common words
    # ("model", "tool") fill other passages; the rare ones ("Jeremy", "SQL") decide.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(GUIDE)
    library.ingest([tmp_path / "docs"], "docs", **CHUNKING)
    for mode in ("keyword", "hybrid"):
        top = library.search("Which tool did Jeremy use to fine-tune the SQL model?", "docs",
                             k=1, mode=mode)  # type: ignore[arg-type]
        assert "Jeremy used Axolotl" in top[0].chunk.text, mode


def test_keyword_ranking_is_the_same_on_both_stores(
        tmp_path: Path, embedder: LocalEmbedder, pg_server: Any) -> None:  # noqa: F811
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "porto.md").write_text(ITALIAN)
    queries = ["supplier reference crate", "boiler overheating code", "oak firewood burns",
               "honey winter colony", "la caldaia e il porto", "chain tyres glass rainy rides"]
    ranked: dict[str, list[list[tuple[str, int, float]]]] = {}
    for name, lib in (("sqlite", Library(SqliteDocumentStore(tmp_path / "logs.db"))),
                      ("postgresql", Library.open(_pg_url(pg_server)))):
        with lib:
            lib.use_embedder(embedder)
            lib.ingest([corpus], "docs", **CHUNKING)
            ranked[name] = [[(Path(h.chunk.path).name, h.chunk.start, h.score)
                             for h in lib.search(q, "docs", k=5, mode="keyword")]
                            for q in queries]
    for query, lite, pg in zip(queries, ranked["sqlite"], ranked["postgresql"], strict=True):
        assert [hit[:2] for hit in pg] == [hit[:2] for hit in lite], query
        # FTS5 counts one more token per chunk (the collection column): scores agree to ~2%
        assert np.allclose([h[2] for h in pg], [h[2] for h in lite], rtol=0.03), query


# -- PostgreSQL at scale -----------------------------------------------------------------

INGEST = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path
    import numpy as np
    from lanner.rag.library import Library

    class HashEmbedder:
        # Deterministic vectors from the text, without a model (fast in two processes).
        spec, dimensions = "hash-test", 16

        def embed(self, texts):
            rows = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(16)
                    for t in texts]
            v = np.array(rows, dtype=np.float32).reshape(len(texts), 16)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    url, folder, collection, go = sys.argv[1:5]
    with Library.open(url) as library:
        while not Path(go).exists():  # both processes start writing together
            time.sleep(0.01)
        report = library.ingest([folder], collection, embedder=HashEmbedder(),
                                max_chars=200, overlap=40, batch_chunks=8)
    print(len(report.added) + len(report.updated), report.chunks)
""")


def _write_many(folder: Path, files: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)] + ["harbour", "crate", "boiler", "ledger"]
    for i in range(files):
        paragraphs = [" ".join(rng.choice(words, 30)) + "." for _ in range(1 + i % 5)]
        (folder / f"f{i:02d}.txt").write_text(f"File {i} part{i}.\n\n" + "\n\n".join(paragraphs))
    return folder


def _ingest_in(url: str, folder: Path, collection: str, go: Path) -> subprocess.Popen[str]:
    env = {"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([sys.executable, "-c", INGEST, url, str(folder), collection, str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_processes_ingesting_one_collection_lose_and_duplicate_nothing(
        tmp_path: Path, pg_server: Any) -> None:  # noqa: F811
    url = _pg_url(pg_server)
    folder = _write_many(tmp_path / "many", 40)
    go = tmp_path / "go"
    go.touch()
    serial = _ingest_in(url, folder, "serial", go)
    assert serial.wait(120) == 0, serial.stderr.read()  # type: ignore[union-attr]
    go.unlink()
    both = [_ingest_in(url, folder, "shared", go) for _ in range(2)]
    time.sleep(1.0)  # both have imported and connected by now
    go.touch()
    written = []
    for process in both:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        written.append(out.split())
    print("files, chunks written by each process:", written)
    with Library.open(url) as library:
        shared, alone = library.store.documents("shared"), library.store.documents("serial")
        assert [(d.path, d.chunks) for d in shared] == [(d.path, d.chunks) for d in alone]
        assert len({d.path for d in shared}) == len(shared) == 40
        counts = {c.name: c.chunks for c in library.store.collections()}
        assert counts["shared"] == counts["serial"] > 40
        # The term statistics are exact too: BM25 scores equal the serial run's.
        for words in (["harbour"], ["crate", "boiler"], ["part7", "ledger", "w3"]):
            a = [s for _, s in library.store.keyword_search("shared", words, 10)]
            b = [s for _, s in library.store.keyword_search("serial", words, 10)]
            assert a and np.allclose(a, b), words


_VERSION_1 = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE lanner_collections (id serial PRIMARY KEY, name text NOT NULL UNIQUE,
    embedder text NOT NULL, dimensions integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE lanner_documents (id serial PRIMARY KEY,
    collection_id integer NOT NULL REFERENCES lanner_collections(id) ON DELETE CASCADE,
    path text NOT NULL, sha256 text NOT NULL, pages integer NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(), UNIQUE (collection_id, path));
CREATE TABLE lanner_chunks (id bigserial PRIMARY KEY,
    document_id integer NOT NULL REFERENCES lanner_documents(id) ON DELETE CASCADE,
    collection_id integer NOT NULL, page integer, start_char integer NOT NULL,
    end_char integer NOT NULL, heading text NOT NULL, text text NOT NULL,
    embedding vector NOT NULL, tsv tsvector GENERATED ALWAYS AS
    (to_tsvector('english', heading || ' ' || text)) STORED);
CREATE INDEX lanner_chunks_tsv ON lanner_chunks USING gin (tsv);
INSERT INTO lanner_collections (name, embedder, dimensions) VALUES ('old', 'hash-test', 3);
INSERT INTO lanner_documents (collection_id, path, sha256, pages) VALUES (1, '/a.txt', 'x', 1);
INSERT INTO lanner_chunks (document_id, collection_id, start_char, end_char, heading, text,
    embedding) VALUES
    (1, 1, 0, 30, '', 'The ledger lists every crate.', '[1,0,0]'),
    (1, 1, 31, 60, 'Porto', 'Il magazzino del porto.', '[0,1,0]');
"""


def test_a_database_from_before_bm25_is_upgraded_in_place(pg_server: Any) -> None:  # noqa: F811
    import psycopg

    url = _pg_url(pg_server)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_VERSION_1)
    with Library.open(url) as library:
        hits = library.store.keyword_search("old", ["magazzino", "porto"], 5)
        assert [c.text for c in library.store.get_chunks([i for i, _ in hits])] == [
            "Il magazzino del porto."]
        assert library.store.get_collection("old").chunks == 2  # type: ignore[union-attr]
    with psycopg.connect(url) as conn:
        columns = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'lanner_chunks'")}
    assert "tsv" not in columns and {"length", "term_ids"} <= columns


def test_threads_share_the_stores_connection_pool(pg_server: Any) -> None:  # noqa: F811
    from lanner.rag.store_pg import PgDocumentStore

    url = _pg_url(pg_server)
    store = PgDocumentStore(url, pool_size=2)
    store.create_collection("c", "hash-test", 3)
    seen: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                store.keyword_search("c", ["anything"], 3)
                with store._tx() as conn:
                    seen.append(conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lanner'"
                        " AND datname = current_database()").fetchone()[0])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == [] and len(seen) == 40
    assert max(seen) <= 2


def test_lanner_serve_answers_from_a_postgresql_store_through_one_pool(
        tmp_path: Path, embedder: LocalEmbedder, pg_server: Any) -> None:  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from lanner.backends.fake import FakeBackend
    from lanner.engine.engine import Engine
    from lanner.rag.store_pg import POOL_SIZE
    from lanner.server.app import create_app
    from serverkit import serving, state

    url = _pg_url(pg_server)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "porto.md").write_text(ITALIAN)
    with Library.open(url) as library:
        library.use_embedder(embedder)
        library.ingest([tmp_path / "docs"], "porto", **CHUNKING)
    engine = Engine(tmp_path / "home")
    engine.attach("fake", FakeBackend(["Il magazzino è nella città vecchia [1]."], n_ctx=20000))
    app = create_app(engine, ["fake"], embedder=None, store=url)
    state(app).documents.library().use_embedder(embedder)
    body = {"model": "fake", "collection": "porto", "passages": 2,
            "messages": [{"role": "user", "content": "Dove si trova il magazzino del porto?"}]}
    with serving(app) as live:
        def ask(_: int) -> Any:
            return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).json()

        with ThreadPoolExecutor(12) as threads:
            replies = list(threads.map(ask, range(24)))
        store = state(app).documents.library().store
        with store._tx() as conn:
            connections = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lanner'"
                " AND datname = current_database()").fetchone()[0]
    for reply in replies:
        (first, *_) = reply["citations"]["sources"]
        assert "magazzino del porto" in first["text"]
    assert 1 <= connections <= POOL_SIZE
