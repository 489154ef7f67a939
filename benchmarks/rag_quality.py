"""Retrieval quality on a small self-written corpus: recall@k of vector,
keyword and hybrid search, on the SQLite store and PostgreSQL in one run.

Corpus: benchmarks/data/rag_corpus/ (10 short documents written for this
benchmark). Questions: benchmarks/data/rag_questions.jsonl, each with its gold
passage given as (file, quote); a retrieved chunk is a hit when it comes from
that file and contains the quote, so the gold survives any chunking.

Follow-ups: benchmarks/data/rag_followups.jsonl, each a first question, an
answer to it, and a follow-up that needs them ("How did it start?") with its
gold passage. The rewriter (``--rewriter``, default the bundled smollm2) is
asked once per follow-up, as ``lanner ask``/``chat`` ask it; hybrid recall is
reported for the follow-up as typed, for the rewrite alone (Lanner before
follow-ups were fused: the rewrite, or the previous question joined with the
follow-up when the rewrite was empty or overlong) and for the fused queries
(``Library.queries``: checked rewrite, follow-up, previous question); and,
for what fusion costs when the rewriter is good, with each pair's written
standalone question in place of the model's reply, alone and fused.

Both stores get the same files and the same embedder (loaded once).
PostgreSQL is ``--pg URL`` or, by default, a throw-away server from the
pgserver wheel; ``--stores sqlite`` runs one store; ``--no-followups`` skips
the rewriter (no model is loaded).

Usage: python benchmarks/rag_quality.py [--k 5] [--max-chars 1000] [--stores sqlite postgresql]
                                        [--pg URL] [--rewriter smollm2] [--no-followups]
                                        [--verbose] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from functools import partial
from pathlib import Path

from lanner.rag.embed import LocalEmbedder
from lanner.rag.library import Library
from lanner.rag.rewrite import ask_rewriter, follow_up_queries
from lanner.rag.search import MODES, Hit

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "rag_corpus"
QUESTIONS = DATA / "rag_questions.jsonl"
FOLLOWUPS = DATA / "rag_followups.jsonl"
FOLLOWUP_WAYS = ("as typed", "rewrite only (before)", "fused (after)",
                 "written rewrite only", "written rewrite fused")


def load_questions(path: Path = QUESTIONS) -> list[dict[str, str]]:
    """The questions; fails loudly if a gold quote is not in its file."""
    questions = [json.loads(line) for line in path.read_text().splitlines() if line]
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


def history(pair: dict[str, str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": pair["first"]},
            {"role": "assistant", "content": pair["answer"]}]


def rewriter_replies(name: str, pairs: list[dict[str, str]]) -> tuple[list[str], float]:
    """The rewriter's reply to each follow-up, and the seconds they took."""
    from lanner.engine.engine import Engine

    model = Engine().load(name)
    start = time.perf_counter()
    replies = [ask_rewriter(model, history(p), p["question"]) for p in pairs]
    return replies, time.perf_counter() - start


def rewrite_only(reply: str, pair: dict[str, str]) -> str:
    """The query Lanner searched for before follow-ups were fused (rewrite.py
    at 13e36c8): the reply's first line, unlabelled, unquoted; the previous
    question joined with the follow-up if that was empty or overlong."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:standalone question|rewritten question|question)\s*:\s*", "", line,
                  flags=re.I).strip().strip("\"'“”").strip()
    if line and len(line) <= 3 * len(pair["question"]) + 200:
        return line
    return f"{pair['first']} {pair['question']}"


def evaluate_followups(library: Library, pairs: list[dict[str, str]], replies: list[str],
                       k: int) -> dict[str, dict]:
    """Hybrid recall@1, recall@k, MRR@k of each way of searching a follow-up."""
    ranks: dict[str, list[int | None]] = {way: [] for way in FOLLOWUP_WAYS}
    used: list[dict] = []
    known = partial(library.known_words, "bench")
    for pair, reply in zip(pairs, replies, strict=True):
        queries = follow_up_queries(reply, pair["question"], history(pair), known)
        written = follow_up_queries(pair["standalone"], pair["question"], history(pair), known)
        used.append({"question": pair["question"], **queries.to_json(),
                     "written_rejected": written.rejected})
        for way, query in zip(FOLLOWUP_WAYS, (pair["question"], rewrite_only(reply, pair),
                                              queries.used, pair["standalone"], written.used),
                              strict=True):
            hits = library.search(query, "bench", k=k)
            ranks[way].append(next((i for i, h in enumerate(hits, 1) if is_gold(h, pair)), None))
    n = len(pairs)
    results: dict[str, dict] = {way: {
        "recall@1": sum(r == 1 for r in found) / n,
        f"recall@{k}": sum(r is not None for r in found) / n,
        f"mrr@{k}": sum(1 / r for r in found if r) / n,
        "missed": [p["question"] for p, r in zip(pairs, found, strict=True) if r is None],
    } for way, found in ranks.items()}
    results["queries"] = {"rejected": sum(bool(u["rejected"]) for u in used),
                          "written_rejected": sum(bool(u["written_rejected"]) for u in used),
                          "each": used}
    return results


def run_store(location: str, embedder: LocalEmbedder, questions: list[dict[str, str]],
              args: argparse.Namespace, followups: tuple[list[dict[str, str]], list[str]]
              ) -> dict:
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
        pairs, replies = followups
        followed = evaluate_followups(library, pairs, replies, args.k) if pairs else {}
        library.store.drop_collection("bench")
        return {"location": library.store.location, "documents": len(report.added),
                "chunks": report.chunks, "ingest_s": ingest_s, "results": results,
                "followups": followed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-chars", type=int, default=1000)
    parser.add_argument("--overlap", type=int, default=150)
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "postgresql"],
                        default=["sqlite", "postgresql"])
    parser.add_argument("--pg", metavar="URL",
                        help="postgresql:// URL (default: a throw-away server from pgserver)")
    parser.add_argument("--rewriter", default="smollm2",
                        help="model that rewrites follow-ups (default: smollm2)")
    parser.add_argument("--no-followups", action="store_true",
                        help="skip the follow-up questions (loads no model)")
    parser.add_argument("--verbose", action="store_true",
                        help="print each follow-up's queries and rejected rewrites")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    questions = load_questions()
    pairs = [] if args.no_followups else load_questions(FOLLOWUPS)
    replies, rewrite_s = rewriter_replies(args.rewriter, pairs) if pairs else ([], 0.0)
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
                runs[store] = run_store(location, embedder, questions, args, (pairs, replies))
            finally:
                if server is not None:
                    server.cleanup()
    if args.json:
        print(json.dumps({"questions": len(questions), "k": args.k, "followups": len(pairs),
                          "rewriter": args.rewriter if pairs else None,
                          "rewrite_s": rewrite_s, "stores": runs}, indent=2))
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
    if pairs:
        print_followups(runs, len(pairs), args, rewrite_s)


def print_followups(runs: dict[str, dict], n: int, args: argparse.Namespace,
                    rewrite_s: float) -> None:
    print(f"\nFollow-ups: {n}, rewriter {args.rewriter} ({rewrite_s:.1f} s for all rewrites), "
          "hybrid retrieval")
    print(f"\n| store | follow-up searched by | recall@1 | recall@{args.k} | MRR@{args.k} |")
    print("| --- | --- | --- | --- | --- |")
    for store, run in runs.items():
        for way in FOLLOWUP_WAYS:
            r = run["followups"][way]
            print(f"| {store} | {way} | {r['recall@1']:.3f} | {r[f'recall@{args.k}']:.3f} "
                  f"| {r[f'mrr@{args.k}']:.3f} |")
    for store, run in runs.items():
        queries = run["followups"]["queries"]
        print(f"{store}: rewrites rejected {queries['rejected']} of {n} "
              f"(written rewrites: {queries['written_rejected']})")
        for way in FOLLOWUP_WAYS:
            for question in run["followups"][way]["missed"]:
                print(f"{store}, missed by {way}: {question}")
        if args.verbose:
            for used in queries["each"]:
                print(f"  {used['question']!r}: rewrite {used['rewrite']!r}"
                      + (f" rejected ({used['rejected']})" if used["rejected"] else ""))


if __name__ == "__main__":
    main()
