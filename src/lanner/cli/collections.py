"""``lanner collections [NAME]``: list document collections, or the documents
of one with their status (ok, changed since ingest, or missing)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from lanner.cli.rag_options import open_library


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collections", help="list document collections and their files")
    p.add_argument("name", nargs="?", help="show this collection's documents")
    p.add_argument("--store", metavar="URL", default=None,
                   help="a postgresql:// URL or SQLite file (default: logs.db in the home)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_library(args) as library:
        if args.name:
            docs = library.store.documents(args.name)
            rows = [{**asdict(d), "status": status(d.path, d.sha256)} for d in docs]
            _print_documents(args.name, rows, args.json)
        else:
            found = [asdict(c) for c in library.store.collections()]
            _print_collections(found, library.store.location, args.json)
    return 0


def status(path: str, sha256: str) -> str:
    """"ok", "changed" (re-ingest to update) or "missing" (forget to remove)."""
    from lanner.store.hashing import sha256_of_file

    file = Path(path)
    if not file.is_file():
        return "missing"
    try:
        return "ok" if sha256_of_file(file) == sha256 else "changed"
    except OSError:
        return "unreadable"


def _print_collections(found: list[dict[str, object]], where: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(found))
        return
    if not found:
        print(f"No collections in {where}; create one with `lanner ingest PATH`.")
        return
    print(f"{'NAME':<20} {'DOCS':>6} {'CHUNKS':>8}  EMBEDDER")
    for c in found:
        print(f"{c['name']!s:<20} {c['documents']:>6} {c['chunks']:>8}  {c['embedder']}")


def _print_documents(name: str, rows: list[dict[str, object]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        print(f"Collection {name!r} has no documents.")
        return
    print(f"{'STATUS':<8} {'PAGES':>5} {'CHUNKS':>6}  PATH")
    for r in rows:
        print(f"{r['status']!s:<8} {r['pages']:>5} {r['chunks']:>6}  {r['path']}")
    stale = sum(r["status"] != "ok" for r in rows)
    if stale:
        print(f"\n{stale} document(s) changed or missing: `lanner ingest` updates changed "
              f"files, `lanner forget --missing -c {name}` removes missing ones.")
