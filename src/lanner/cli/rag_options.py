"""Flags shared by the document verbs (ingest, ask, collections, forget).

The rag package's defaults are repeated here so that registering these verbs
(every ``lanner`` start, ``--help`` included) imports no rag module: they load
numpy. tests/test_startup.py pins the copies to the originals.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lanner.rag.library import Library

DEFAULT_COLLECTION = "default"  # lanner.rag.store.DEFAULT_COLLECTION
MODES = ("hybrid", "vector", "keyword")  # lanner.rag.search.MODES
CHUNK_CHARS = 1000  # lanner.rag.chunking.MAX_CHARS
CHUNK_OVERLAP = 150  # lanner.rag.chunking.OVERLAP
EMBED_BATCH = 64  # lanner.rag.embed.BATCH_SIZE
EMBED_RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")  # lanner.rag.embed.RUNTIMES


def add_collection_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("documents")
    g.add_argument("-c", "--collection", default=DEFAULT_COLLECTION,
                   help=f"collection name (default: {DEFAULT_COLLECTION})")
    g.add_argument("--store", metavar="URL", default=None,
                   help="where collections live: a postgresql:// URL (pgvector) or a SQLite "
                   "file (default: logs.db in the Lanner home)")
    g.add_argument("--embed-runtime", choices=EMBED_RUNTIMES,
                   help="how a local embedding model runs: 'torch' (sentence-transformers, "
                   "the exact fp32 vectors), 'onnx' (ONNX Runtime, the same vectors, faster), "
                   "'onnx-int8' (int8 weights, fastest, vectors within ~0.01 cosine) or 'auto' "
                   "(onnx-int8 on a CPU with VNNI, else onnx). Default: $LANNER_EMBED_RUNTIME "
                   "or auto")


def open_library(args: argparse.Namespace) -> Library:
    from functools import partial

    from lanner.rag.embed import open_embedder
    from lanner.rag.library import Library
    from lanner.rag.store import open_store

    runtime = getattr(args, "embed_runtime", None)
    return Library(open_store(args.store, home=args.home),
                   partial(open_embedder, runtime=runtime))
