"""``lanner rm NAME``: forget a registered model (its files stay unless asked)."""

from __future__ import annotations

import argparse

from lanner import paths


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rm", help="remove a model from the registry",
        description="Remove NAME from LANNER_HOME/models.json. Its files stay on disk, unless "
                    "--delete-files is given and Lanner downloaded them (with `lanner pull`).")
    p.add_argument("name", metavar="NAME", help="the registered short name")
    p.add_argument("--delete-files", action="store_true",
                   help="also delete the files `lanner pull` downloaded into LANNER_HOME/models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.engine import hub

    deleted = hub.remove(paths.home(args.home), args.name, delete_files=args.delete_files)
    print(f"removed {args.name}")
    for path in deleted:
        print(f"deleted {path}")
    return 0
