"""Flags shared by the document verbs (ingest, ask, collections, forget)."""

from __future__ import annotations

import argparse

from lanner.rag.library import Library
from lanner.rag.store import DEFAULT_COLLECTION


def add_collection_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("documents")
    g.add_argument("-c", "--collection", default=DEFAULT_COLLECTION,
                   help=f"collection name (default: {DEFAULT_COLLECTION})")
    g.add_argument("--store", metavar="URL", default=None,
                   help="where collections live: a postgresql:// URL (pgvector) or a SQLite "
                   "file (default: logs.db in the Lanner home)")


def open_library(args: argparse.Namespace) -> Library:
    return Library.open(args.store, home=args.home)
