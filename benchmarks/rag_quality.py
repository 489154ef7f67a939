"""Retrieval quality on a small self-written corpus: recall@k of vector,
keyword and hybrid search.

Corpus: benchmarks/data/rag_corpus/ (10 short documents written for this
benchmark). Questions: benchmarks/data/rag_questions.jsonl, each with its gold
passage given as (file, quote); a retrieved chunk is a hit when it comes from
that file and contains the quote, so the gold survives any chunking.

Usage: python benchmarks/rag_quality.py [--k 5] [--max-chars 1000] [--store URL | --pgserver]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-chars", type=int, default=1000)
    parser.add_argument("--overlap", type=int, default=150)
    parser.add_argument("--store", help="postgresql:// URL (default: a temporary SQLite file)")
    parser.add_argument("--pgserver", action="store_true",
                        help="use a throw-away PostgreSQL from the pgserver wheel")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    questions = load_questions()
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.pgserver:
            import pgserver

            server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        library = Library.open(server.get_uri() if server else args.store or Path(tmp) / "b.db")
        if library.store.get_collection("bench"):
            library.store.drop_collection("bench")
        start = time.perf_counter()
        report = library.ingest([CORPUS], "bench", max_chars=args.max_chars,
                                overlap=args.overlap)
        ingest_s = time.perf_counter() - start
        results = evaluate(library, questions, args.k)
        library.close()
        if server is not None:
            server.cleanup()
    if args.json:
        print(json.dumps({"chunks": report.chunks, "questions": len(questions),
                          "results": results}, indent=2))
        return
    print(f"{library.store.location}: {len(questions)} questions, {len(report.added)} "
          f"documents, {report.chunks} chunks (max {args.max_chars} chars, overlap "
          f"{args.overlap}); ingest {ingest_s:.1f} s\n")
    print(f"| retrieval | recall@1 | recall@{args.k} | MRR@{args.k} |")
    print("| --- | --- | --- | --- |")
    for mode, r in results.items():
        print(f"| {mode} | {r['recall@1']:.3f} | {r[f'recall@{args.k}']:.3f} "
              f"| {r[f'mrr@{args.k}']:.3f} |")
    for mode, r in results.items():
        for question in r["missed"]:
            print(f"missed by {mode}: {question}")


if __name__ == "__main__":
    main()
