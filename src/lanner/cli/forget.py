"""``lanner forget``: remove documents from a collection, those whose files
are gone, or the whole collection."""

from __future__ import annotations

import argparse
import sys

from lanner.cli.rag_options import add_collection_flags, open_library
from lanner.errors import InvalidRequest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="remove documents or a collection",
                       description="Remove the named files' documents from a collection; "
                       "--missing removes those whose files no longer exist; --drop "
                       "deletes the collection.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="files to remove")
    add_collection_flags(p)
    p.add_argument("--missing", action="store_true",
                   help="remove every document whose file no longer exists")
    p.add_argument("--drop", action="store_true", help="delete the whole collection")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if sum([bool(args.paths), args.missing, args.drop]) != 1:
        raise InvalidRequest("forget", "give files to remove, or --missing, or --drop")
    with open_library(args) as library:
        if args.drop:
            library.store.drop_collection(args.collection)
            print(f"Deleted collection {args.collection!r}.")
            return 0
        if args.missing:
            removed = library.forget_missing(args.collection)
        else:
            removed = library.forget(args.collection, args.paths)
    for path in removed:
        print(f"forgot {path}")
    unknown = len(args.paths) - len(removed) if args.paths else 0
    if unknown:
        print(f"{unknown} of the files named were not in {args.collection!r}", file=sys.stderr)
    if not removed:
        print(f"Nothing to forget in {args.collection!r}.")
    return 1 if unknown else 0
