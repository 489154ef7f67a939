"""Retrieval quality on a small self-written corpus: recall@k of vector,
keyword and hybrid search, on the SQLite store and PostgreSQL in one run.

Corpus: benchmarks/data/rag_corpus/ (10 short documents written for this
benchmark). Questions: benchmarks/data/rag_questions.jsonl, each with its gold
passage given as (file, quote); a retrieved chunk is a hit when it comes from
that file and contains the quote, so the gold survives any chunking.

Both stores get the same files and the same embedder (loaded once).
PostgreSQL is ``--pg URL`` or, by default, a throw-away server from the
pgserver wheel; ``--stores sqlite`` runs one store.

Usage: python benchmarks/rag_quality.py [--k 5] [--max-chars 1000] [--stores sqlite postgresql]
                                        [--pg URL] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lanner.rag.embed import LocalEmbedder
from lanner.rag.library import Library
from lanner.rag.search import MODES, Hit

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "rag_corpus"
QUESTIONS = DATA / "rag_questions.jsonl"


def load_questions() -> list[dict[str, str]]:
    """The questions; fails loudly if a gold quote is not in its file."""
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line]
    for q in questions:
        if q["quote"] not in (CORPUS / q["file"]).read_text():
            raise SystemExit(f"gold quote not in {q['file']}: {q['quote']!r}")
    return questions


def is_gold(hit: Hit, question: dict[str, str]) -> bool:
    return Path(hit.chunk.path).name == question["file"] and question["quote"] in hit.chunk.text


def evaluate(library: Library, questions: list[dict[str, str]], k: int) -> dict[str, dict]:
    """Per mode: recall@1, recall@k, MRR@k and the questions missed at k."""
    results: dict[str, dict] = {}
    for mode in MODES:
        ranks: list[int | None] = []
        for q in questions:
            hits = library.search(q["question"], "bench", k=k, mode=mode)
            ranks.append(next((i for i, h in enumerate(hits, 1) if is_gold(h, q)), None))
        n = len(questions)
        results[mode] = {
            "recall@1": sum(r == 1 for r in ranks) / n,
            f"recall@{k}": sum(r is not None for r in ranks) / n,
            f"mrr@{k}": sum(1 / r for r in ranks if r) / n,
            "missed": [q["question"] for q, r in zip(questions, ranks, strict=True) if r is None],
        }
    return results


def run_store(location: str, embedder: LocalEmbedder, questions: list[dict[str, str]],
              args: argparse.Namespace) -> dict:
    """Ingest the corpus into a fresh collection at ``location`` and evaluate it."""
    with Library.open(location) as library:
        library.use_embedder(embedder)
        if library.store.get_collection("bench"):
            library.store.drop_collection("bench")
        start = time.perf_counter()
        report = library.ingest([CORPUS], "bench", embedder=embedder,
                                max_chars=args.max_chars, overlap=args.overlap)
        ingest_s = time.perf_counter() - start
        results = evaluate(library, questions, args.k)
        library.store.drop_collection("bench")
        return {"location": library.store.location, "documents": len(report.added),
                "chunks": report.chunks, "ingest_s": ingest_s, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-chars", type=int, default=1000)
    parser.add_argument("--overlap", type=int, default=150)
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "postgresql"],
                        default=["sqlite", "postgresql"])
    parser.add_argument("--pg", metavar="URL",
                        help="postgresql:// URL (default: a throw-away server from pgserver)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    questions = load_questions()
    embedder = LocalEmbedder()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.stores:
            server = None
            if store == "sqlite":
                location = str(Path(tmp) / "bench.db")
            elif args.pg:
                location = args.pg
            else:
                import pgserver

                server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
                location = server.get_uri()
            try:
                runs[store] = run_store(location, embedder, questions, args)
            finally:
                if server is not None:
                    server.cleanup()
    if args.json:
        print(json.dumps({"questions": len(questions), "k": args.k, "stores": runs}, indent=2))
        return
    for store, run in runs.items():
        print(f"{store} ({run['location']}): {len(questions)} questions, {run['documents']} "
              f"documents, {run['chunks']} chunks (max {args.max_chars} chars, overlap "
              f"{args.overlap}); ingest {run['ingest_s']:.1f} s")
    print(f"\n| store | retrieval | recall@1 | recall@{args.k} | MRR@{args.k} |")
    print("| --- | --- | --- | --- | --- |")
    for store, run in runs.items():
        for mode, r in run["results"].items():
            print(f"| {store} | {mode} | {r['recall@1']:.3f} | {r[f'recall@{args.k}']:.3f} "
                  f"| {r[f'mrr@{args.k}']:.3f} |")
    if len(runs) == 2:
        print()
        for mode in MODES:
            a, b = (runs[s]["results"][mode][f"recall@{args.k}"] for s in runs)
            print(f"{mode}: recall@{args.k} postgresql - sqlite = {b - a:+.3f}")
    for store, run in runs.items():
        for mode, r in run["results"].items():
            for question in r["missed"]:
                print(f"{store}, missed by {mode}: {question}")


if __name__ == "__main__":
    main()
