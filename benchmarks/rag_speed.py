"""Document store speed, in one run:

1. ingest: chunks/s through the whole pipeline (read, chunk, embed with the
   bundled all-MiniLM-L6-v2, store), and the same pipeline with a null
   embedder, which shows what everything but the embedding model costs;
2. query latency p50/p95 at 10k and 100k chunks: vector, keyword (FTS5 BM25)
   and hybrid search, plus embedding one question with MiniLM (--no-embed skips it);
3. recall@10 of the store's vector search against exact (numpy) search.

Query-speed collections are synthetic (Zipf-distributed words; clustered unit
vectors, as real embeddings are), so 100k chunks take seconds to build, not
hours. ``--store postgresql://...`` measures PostgreSQL + pgvector instead of
the embedded SQLite store; ``--pgserver`` starts a throw-away PostgreSQL from
the pgserver wheel for that.

``--runtimes torch onnx onnx-int8`` compares the embedding runtimes instead
(lanner.rag.embed): per runtime, ingest chunks/s through the whole pipeline,
``/v1/embeddings`` texts/s through the server app (batches of 32 chunks, in
process), and recall@5 on benchmarks/rag_quality.py's questions with the
corpus embedded by that runtime; throughput rounds alternate between the
runtimes, so background load hits each alike, and the median counts.

Usage: python benchmarks/rag_speed.py [--sizes 10000 100000] [--ingest-files 16]
       python benchmarks/rag_speed.py --runtimes torch onnx onnx-int8 [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lanner.rag.chunking import Chunk
from lanner.rag.embed import LocalEmbedder
from lanner.rag.library import Library
from lanner.rag.search import search
from lanner.rag.store import DocumentRecord, DocumentStore, open_store
from lanner.rag.text import STOPWORDS, keyword_terms

CORPUS = Path(__file__).parent / "data" / "rag_corpus"
DIMS = 384


class NullEmbedder:
    """Random unit vectors, instantly: the pipeline's cost without the model."""

    spec = "null"
    dimensions = DIMS

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rng = np.random.default_rng(len(texts))
        v = rng.standard_normal((len(texts), DIMS)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


class FixedEmbedder(NullEmbedder):
    """Returns the query vector it is given (hybrid search without the model)."""

    def __init__(self) -> None:
        self.vector = np.zeros(DIMS, dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.vector[None, :]


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]


# -- 1. ingest ------------------------------------------------------------------------


def corpus_copies(folder: Path, copies: int) -> Path:
    """``copies`` renamed copies of the benchmark corpus in ``folder``."""
    folder.mkdir()
    for i in range(copies):
        for doc in CORPUS.glob("*.md"):
            # A number per copy makes every file's text (and hash) distinct.
            (folder / f"{i:03d}_{doc.name}").write_text(f"Copy {i}.\n\n{doc.read_text()}")
    return folder


def ingest_speed(store: DocumentStore, copies: int, tmp: Path) -> dict[str, float]:
    """chunks/s for ``copies`` renamed copies of the benchmark corpus."""
    folder = corpus_copies(tmp / "ingest", copies)
    library = Library(store)
    out: dict[str, float] = {}
    for name, embedder in (("null embedder", NullEmbedder()),
                           ("all-MiniLM-L6-v2", LocalEmbedder())):
        collection = "ingest-" + name.split()[0].lower()
        if name != "null embedder":
            embedder.embed(["warm up"])  # model load is not ingest throughput
        report = library.ingest([folder], collection, embedder=embedder)  # type: ignore[arg-type]
        out[name] = report.chunks / report.seconds
        out["chunks"] = report.chunks
        if isinstance(embedder, LocalEmbedder):
            texts = [c.text for c in store.get_chunks(_some_ids(store, collection, 256))]
            start = time.perf_counter()
            embedder.embed(texts)
            out["embedding only"] = len(texts) / (time.perf_counter() - start)
    return out


def _some_ids(store: DocumentStore, collection: str, n: int) -> list[int]:
    probe = np.ones(DIMS, dtype=np.float32) / np.sqrt(DIMS)
    return [cid for cid, _ in store.vector_search(collection, probe, n)]


# -- 2. synthetic collections -----------------------------------------------------------


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """Words by frequency rank: function words first (as in real English,
    where the top ~150 ranks are "the", "of", ...), then the benchmark
    corpus's content words, then made-up words up to ``size``."""
    content = sorted({w.lower().strip(".,:;()") for doc in CORPUS.glob("*.md")
                      for w in doc.read_text().split() if w.isalpha()} - STOPWORDS)
    words = sorted(STOPWORDS) + [str(w) for w in rng.permutation(content)]
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    while len(words) < size:
        words.append("".join(rng.choice(letters, rng.integers(4, 10))))
    return words


class Synthetic:
    """Zipf-distributed text and clustered unit vectors, reproducible."""

    def __init__(self, seed: int = 0, clusters: int = 500) -> None:
        self.rng = np.random.default_rng(seed)
        self.words = np.array(vocabulary(30000, self.rng))
        ranks = np.arange(1, len(self.words) + 1)
        self.p = (1 / ranks) / (1 / ranks).sum()
        c = self.rng.standard_normal((clusters, DIMS)).astype(np.float32)
        self.centroids = c / np.linalg.norm(c, axis=1, keepdims=True)

    def text(self, n_words: int) -> str:
        return " ".join(self.rng.choice(self.words, n_words, p=self.p))

    def vectors(self, n: int, spread: float = 0.08) -> np.ndarray:
        picks = self.centroids[self.rng.integers(0, len(self.centroids), n)]
        v = picks + spread * self.rng.standard_normal((n, DIMS)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def fill(store: DocumentStore, collection: str, n: int, synth: Synthetic,
         per_doc: int = 1000) -> tuple[np.ndarray, list[str]]:
    """Add ``n`` synthetic chunks; return their vectors in insertion order
    and the text of one chunk per document (to draw queries from)."""
    store.create_collection(collection, "synthetic", DIMS)
    all_vectors: list[np.ndarray] = []
    samples: list[str] = []
    with hnsw_built_after(store, collection):
        for d in range(0, n, per_doc):
            m = min(per_doc, n - d)
            chunks = [Chunk(synth.text(int(synth.rng.integers(60, 140))), 0, 1)
                      for _ in range(m)]
            vectors = synth.vectors(m)
            store.put_document(collection, DocumentRecord(f"/synthetic/{d}.txt", "x", 1),
                               chunks, vectors)
            all_vectors.append(vectors)
            samples.extend(c.text for c in chunks[:10])
    return np.concatenate(all_vectors), samples


@contextmanager
def hnsw_built_after(store: DocumentStore, collection: str) -> Iterator[None]:
    """On PostgreSQL, drop the collection's HNSW index while the block loads
    chunks and build it again after (pgvector's advice for bulk loads: one
    insert at a time into the graph loaded 9,000 chunks in 11 minutes on the
    shared 2-core box, on course for over two hours at 100k). Query latency is
    measured on the same index."""
    from lanner.rag.store_pg import PgDocumentStore

    if not isinstance(store, PgDocumentStore):
        yield
        return
    with store._tx() as conn:
        name, definition = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexname = 'lanner_chunks_hnsw_'"
            " || (SELECT id FROM lanner_collections WHERE name = %s)", (collection,)).fetchone()
        conn.execute(f"DROP INDEX {name}")
    yield
    with store._tx() as conn:
        conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
        conn.execute(definition)
    # What autovacuum does after a large load, done now: the visibility map
    # lets BM25 read postings from the index alone (before it, a fresh 100k
    # load answered keyword queries in 76 ms p50, each posting a heap visit).
    with store._pool.connection() as conn:  # VACUUM runs outside a transaction
        conn.execute("VACUUM ANALYZE lanner_postings")
        conn.execute("VACUUM ANALYZE lanner_chunks")


def question_like(samples: list[str], rng: np.random.Generator) -> str:
    """4-8 consecutive words of a stored chunk (with at least one content
    word): a question about something the collection contains."""
    while True:
        words = samples[int(rng.integers(len(samples)))].split()
        start = int(rng.integers(0, len(words) - 8))
        text = " ".join(words[start:start + int(rng.integers(4, 9))])
        if keyword_terms(text):
            return text


def latency(run: Callable[[int], object], n: int) -> tuple[float, float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return percentiles(times)


@dataclass(frozen=True)
class QuerySpeed:
    build_s: float
    cold_ms: float
    """The first search after a write: reads the vectors into memory."""
    vector: tuple[float, float]
    """(p50, p95) in ms; likewise below."""
    keyword: tuple[float, float]
    hybrid: tuple[float, float]
    recall_at_10: float


def query_speed(store: DocumentStore, size: int, queries: int) -> QuerySpeed:
    synth = Synthetic(seed=size)
    collection = f"speed-{size}"
    start = time.perf_counter()
    vectors, samples = fill(store, collection, size, synth)
    build_s = time.perf_counter() - start
    qvec = synth.vectors(queries, spread=0.12)
    qtext = [question_like(samples, synth.rng) for _ in range(queries)]
    start = time.perf_counter()
    store.vector_search(collection, qvec[0], 10)  # first search loads the vectors
    cold_ms = (time.perf_counter() - start) * 1000
    fixed = FixedEmbedder()

    def hybrid(i: int) -> object:
        fixed.vector = qvec[i]
        return search(store, fixed, collection, qtext[i], k=10)

    result = QuerySpeed(
        build_s, cold_ms,
        vector=latency(lambda i: store.vector_search(collection, qvec[i], 10), queries),
        keyword=latency(lambda i: store.keyword_search(
            collection, keyword_terms(qtext[i]), 10), queries),
        hybrid=latency(hybrid, queries),
        recall_at_10=recall_at_10(store, collection, vectors, qvec),
    )
    store.drop_collection(collection)
    return result


def recall_at_10(store: DocumentStore, collection: str, vectors: np.ndarray,
                 queries: np.ndarray) -> float:
    """Share of the exact top 10 (by dot product) that the store returns."""
    ids = np.array(chunk_ids(store, collection))  # in insertion order, as ``vectors``
    assert len(ids) == len(vectors)
    found = 0
    for q in queries:
        exact = set(ids[np.argsort(-(vectors @ q))[:10]].tolist())
        found += len(exact & {cid for cid, _ in store.vector_search(collection, q, 10)})
    return found / (10 * len(queries))


def chunk_ids(store: DocumentStore, collection: str) -> list[int]:
    """Every chunk id of ``collection``, ascending. SQLite's exact vector search
    returns them all; an HNSW index returns at most ef_search, so ask PostgreSQL."""
    from lanner.rag.store_pg import PgDocumentStore

    if isinstance(store, PgDocumentStore):
        with store._tx() as conn:
            return [r[0] for r in conn.execute(
                "SELECT k.id FROM lanner_chunks k JOIN lanner_collections c"
                " ON c.id = k.collection_id WHERE c.name = %s ORDER BY k.id", (collection,))]
    probe = np.ones(DIMS, dtype=np.float32) / np.sqrt(DIMS)
    total = store.get_collection(collection).chunks  # type: ignore[union-attr]
    return sorted(cid for cid, _ in store.vector_search(collection, probe, total))


def embed_latency(queries: int) -> tuple[float, float]:
    """Embedding one benchmark question at a time with MiniLM."""
    embedder = LocalEmbedder()
    embedder.embed(["warm up"])
    lines = (CORPUS.parent / "rag_questions.jsonl").read_text().splitlines()
    texts = [line.split('"')[3] for line in lines if line]
    return latency(lambda i: embedder.embed([texts[i % len(texts)]]), queries)


# -- embedding runtimes ------------------------------------------------------------------


def compare_runtimes(runtimes: Sequence[str], copies: int, rounds: int, tmp: Path) -> None:
    """Ingest chunks/s, /v1/embeddings texts/s and recall@5 per embedding runtime."""
    from fastapi.testclient import TestClient

    from lanner.engine.engine import Engine
    from lanner.server.app import create_app
    from lanner.server.embedder import SentenceTransformerEmbedder

    folder = corpus_copies(tmp / "runtimes", copies)
    embedders = {r: LocalEmbedder(runtime=r) for r in runtimes}
    servers = {r: TestClient(create_app(Engine(tmp / "home"), [], embedder=
                                        SentenceTransformerEmbedder(runtime=r)))
               for r in runtimes}
    for runtime in runtimes:  # load (and export, once) before timing
        embedders[runtime].embed(["warm up"])
        _post_embeddings(servers[runtime], ["warm up"])
    store = open_store(str(tmp / "runtimes.db"))
    library = Library(store)
    ingest: dict[str, list[float]] = {r: [] for r in runtimes}
    served: dict[str, list[float]] = {r: [] for r in runtimes}
    texts: list[str] = []
    for round_ in range(rounds):
        for runtime in runtimes:
            collection = f"ingest-{runtime}-{round_}"
            report = library.ingest([folder], collection, embedder=embedders[runtime])
            ingest[runtime].append(report.chunks / report.seconds)
            texts = texts or [c.text for c in store.get_chunks(chunk_ids(store, collection))]
            start = time.perf_counter()
            for i in range(0, len(texts), 32):
                _post_embeddings(servers[runtime], texts[i:i + 32])
            served[runtime].append(len(texts) / (time.perf_counter() - start))
    recall = {r: _recall_at_5(embedders[r], tmp / f"quality-{r}.db") for r in runtimes}
    store.close()
    base = runtimes[0]
    print(f"\nembedding runtimes ({len(texts)} chunks of up to 1,000 characters, median of "
          f"{rounds}; ratios against {base}):")
    print("| runtime | ingest chunks/s | /v1/embeddings texts/s | recall@5 vector | "
          "recall@5 hybrid |")
    print("| --- | --- | --- | --- | --- |")
    for r in runtimes:
        i, e = statistics.median(ingest[r]), statistics.median(served[r])
        i0, e0 = statistics.median(ingest[base]), statistics.median(served[base])
        print(f"| {r} | {i:.1f} ({i / i0:.2f}x) | {e:.1f} ({e / e0:.2f}x) | "
              f"{recall[r]['vector']:.3f} | {recall[r]['hybrid']:.3f} |", flush=True)


def _post_embeddings(client: object, texts: list[str]) -> None:
    response = client.post("/v1/embeddings",  # type: ignore[attr-defined]
                           json={"model": "all-MiniLM-L6-v2", "input": texts})
    if response.status_code != 200:
        raise SystemExit(f"/v1/embeddings answered {response.status_code}: {response.text}")


def _recall_at_5(embedder: LocalEmbedder, location: Path) -> dict[str, float]:
    """recall@5 per search mode on rag_quality.py's questions (its corpus, chunking)."""
    import rag_quality  # benchmarks/ is this script's folder

    questions = rag_quality.load_questions()
    with Library.open(str(location)) as library:
        library.use_embedder(embedder)
        library.ingest([CORPUS], "bench", embedder=embedder)
        results = rag_quality.evaluate(library, questions, 5)
    return {mode: results[mode]["recall@5"] for mode in ("vector", "hybrid")}


# -- main -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--no-embed", action="store_true",
                        help="skip timing MiniLM on one question")
    parser.add_argument("--ingest-files", type=int, default=16,
                        help="copies of the 10-document corpus to ingest (0: skip)")
    parser.add_argument("--store", help="postgresql:// URL (default: a temporary SQLite file)")
    parser.add_argument("--pgserver", action="store_true",
                        help="run against a throw-away PostgreSQL from the pgserver wheel")
    parser.add_argument("--runtimes", nargs="+", metavar="RUNTIME",
                        help="compare these embedding runtimes (torch, onnx, onnx-int8) and stop")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --runtimes: alternating throughput rounds (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="with --runtimes: 1 round over 4 copies of the corpus")
    args = parser.parse_args()
    if args.runtimes:
        with tempfile.TemporaryDirectory() as tmp:
            copies = 4 if args.quick else args.ingest_files
            compare_runtimes(args.runtimes, copies, 1 if args.quick else args.rounds, Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        location = args.store or str(Path(tmp) / "speed.db")
        server = None
        if args.pgserver:
            import pgserver

            server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
            location = server.get_uri()
        store = open_store(location)
        print(f"store: {store.location}")
        if args.ingest_files:
            rates = ingest_speed(store, args.ingest_files, Path(tmp))
            print(f"\ningest, {rates['chunks']:.0f} chunks:")
            for name in ("null embedder", "all-MiniLM-L6-v2", "embedding only"):
                print(f"  {name:<18} {rates[name]:8.1f} chunks/s")
        if not args.no_embed:
            p50, p95 = embed_latency(min(args.queries, 100))
            print(f"\nembedding one question (MiniLM): p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        print("\n| chunks | build s | first query ms | vector p50/p95 ms | keyword p50/p95 ms"
              " | hybrid p50/p95 ms | recall@10 vs exact |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for size in args.sizes:
            r = query_speed(store, size, args.queries)
            cells = [f"{a:.1f} / {b:.1f}" for a, b in (r.vector, r.keyword, r.hybrid)]
            print(f"| {size:,} | {r.build_s:.0f} | {r.cold_ms:.0f} | {' | '.join(cells)} "
                  f"| {r.recall_at_10:.3f} |", flush=True)
        store.close()
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
