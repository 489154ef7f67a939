"""``lanner ingest PATH...``: add files and folders to a document collection.

Unchanged files are skipped by content hash, changed ones replace their old
chunks, unreadable ones are reported and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from lanner.cli.rag_options import (
    CHUNK_CHARS,
    CHUNK_OVERLAP,
    EMBED_BATCH,
    add_collection_flags,
    open_library,
)

if TYPE_CHECKING:
    from lanner.rag.ingest import IngestReport, Progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="add documents to a collection",
                       description="Load txt, md, html, pdf and docx files (folders "
                       "recursively), chunk, embed and store them for `lanner ask`.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    add_collection_flags(p)
    p.add_argument("--embedder", metavar="SPEC",
                   help="for a new collection: a sentence-transformers folder, or "
                   "URL#MODEL of an OpenAI-compatible /v1/embeddings (default: the bundled "
                   "all-MiniLM-L6-v2)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_CHARS, metavar="CHARS",
                   help=f"most characters per chunk (default {CHUNK_CHARS})")
    p.add_argument("--overlap", type=int, default=CHUNK_OVERLAP, metavar="CHARS",
                   help=f"characters shared by neighbouring chunks (default {CHUNK_OVERLAP})")
    p.add_argument("--batch-size", type=int, default=EMBED_BATCH,
                   help=f"texts per embedding batch (default {EMBED_BATCH})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.rag.embed import open_embedder

    library = open_library(args)
    try:
        embedder = open_embedder(args.embedder, batch_size=args.batch_size,
                                 runtime=args.embed_runtime) if args.embedder else None
        show = _progress if sys.stderr.isatty() and not args.json else None
        report = library.ingest(args.paths, args.collection, embedder=embedder,
                                progress=show, max_chars=args.chunk_size,
                                overlap=args.overlap)
    finally:
        library.close()
    if show:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(report), ensure_ascii=False))
    else:
        _summary(report, library.store.location)
    wrote = report.added or report.updated or report.unchanged
    return 1 if report.skipped and not wrote else 0


def _progress(p: Progress) -> None:
    width = 30
    filled = width * p.done // max(p.total, 1)
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {p.done}/{p.total} files, {p.chunks} chunks")
    sys.stderr.flush()


def _summary(report: IngestReport, where: str) -> None:
    rate = report.chunks / report.seconds if report.seconds and report.chunks else 0.0
    print(f"Collection {report.collection!r} ({where}): {len(report.added)} added, "
          f"{len(report.updated)} updated, {len(report.unchanged)} unchanged, "
          f"{len(report.skipped)} skipped; {report.chunks} chunks in {report.seconds:.1f} s"
          + (f" ({rate:.3g} chunks/s)" if rate else ""))
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
