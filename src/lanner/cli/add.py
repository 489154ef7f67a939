"""``lanner add NAME PATH``: register a local .gguf file or model folder by name."""

from __future__ import annotations

import argparse
from pathlib import Path

from lanner import paths
from lanner.cli.models import _size
from lanner.engine.registry import add_entry, spec_for_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "add", help="register a local model under a short name",
        description="Register a .gguf file or a Hugging Face model folder (with config.json) "
                    "under a short name in LANNER_HOME/models.json. Files stay where they are.")
    p.add_argument("name", metavar="NAME", help="the short name to run it by")
    p.add_argument("path", metavar="PATH", help=".gguf file or model folder")
    p.add_argument("--license", metavar="L", default="unknown",
                   help="the model's licence, shown by `lanner models` (default: unknown)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    home = paths.home(args.home)
    spec = spec_for_path(Path(args.path), args.name)  # ModelNotFound if unusable
    add_entry(home, args.name, {"path": str(spec.path), "license": args.license,
                                "source": "local path (lanner add)"})
    print(f"{args.name}: {spec.path} ({spec.format}, {_size(spec.size_bytes)}, "
          f"licence {args.license})")
    return 0
