"""``lanner models``: what can be loaded by name, with size, format, licence, path."""

from __future__ import annotations

import argparse
import json

from lanner import paths
from lanner.engine.registry import available


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models available here")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    specs = available(paths.home(args.home))
    if args.json:
        print(json.dumps([s.to_json() for s in specs], indent=2))
        return 0
    if not specs:
        print("No models found. Install the bundled ones with `make install`, or give a path.")
        return 0
    rows = [("NAME", "SIZE", "FORMAT", "LICENCE", "WHERE")]
    # A GGUF that llama.cpp re-encodes before running (the bundled smollm2 runs
    # as F16) says so: its size here is the shipped file's.
    rows += [(s.name, _size(s.size_bytes), s.format + (f" -> {s.weights}" if s.weights else ""),
              s.license, str(s.path)) for s in specs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)
