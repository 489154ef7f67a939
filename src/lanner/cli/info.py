"""``lanner info MODEL``: a catalog entry (published config, licence terms,
openness, sources) or a local model's real config."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from lanner import paths

if TYPE_CHECKING:
    from lanner.catalog.entries import CatalogEntry, Licence
    from lanner.catalog.local import LocalModel
    from lanner.catalog.planner import Architecture


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="a model's architecture, licence terms and openness",
        description="Show a local model's real config (GGUF header or config.json), or a "
        "catalog entry: hub ids, architecture, licence terms, openness and sources.")
    p.add_argument("model", help="a local model's name or path, or a catalog name / Hub id")
    p.add_argument("--json", action="store_true", help="print JSON (local: the raw config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.catalog import fit

    s = fit.subject(args.model, paths.home(args.home))
    if s.local is not None:
        lines = _local(s.local)
        if args.json:
            print(json.dumps({"name": s.name, "path": str(s.local.spec.path),
                              "parameters": s.parameters, "config": s.local.config},
                             indent=2, default=str))
            return 0
    else:
        assert s.entry is not None  # subject() gives one or the other
        if args.json:
            print(json.dumps(_entry_json(s.entry), indent=2))
            return 0
        lines = _entry(s.entry)
    print("\n".join(lines))
    return 0


def _arch(a: Architecture, parameters: int) -> list[str]:
    attention = ("multi-query" if a.kv_heads == 1 else "grouped-query"
                 if a.kv_heads < a.attention_heads else "multi-head")
    rows = [
        ("parameters", f"{parameters / 1e9:.2f}B"),
        ("layers", a.layers), ("hidden size", a.hidden_size),
        ("attention heads", a.attention_heads),
        ("KV heads", f"{a.kv_heads} ({attention} attention)"),
        ("head dim", a.head_dim), ("vocabulary", a.vocab_size),
        ("trained context", f"{a.context_length} tokens (--rope-scaling stretches it)"),
        ("sliding window", a.sliding_window or "none"),
    ]
    if a.experts:
        rows.append(("experts", f"{a.experts} ({a.experts_per_token} per token)"))
    return [f"  {k + ':':17} {v}" for k, v in rows]


def _licence(lic: Licence | None, text: str = "") -> list[str]:
    if lic is None:
        return [f"licence: {text or 'unknown'} (not in the catalog's licence list)"]
    lines = [f"licence: {lic.name} [{lic.id}]{' (OSI-approved)' if lic.osi else ''}",
             f"  {lic.summary}"]
    if lic.restrictions():
        lines.append(f"  restrictions: {'; '.join(lic.restrictions())}")
    return [*lines, f"  terms: {lic.url}"]


def _entry(e: CatalogEntry) -> list[str]:
    from lanner.catalog.entries import licences

    lines = [f"{e.name} ({e.family}, {e.kind}) - catalog entry",
             f"hub: {', '.join(e.hub)}", "architecture (the Hub's config.json):",
             *_arch(e.arch, e.parameters), *_licence(licences()[e.licence]),
             "openness: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                      for k, v in e.openness.items())]
    if e.chat_format:
        lines.append(f"chat format (when the checkpoint has no template): {e.chat_format}")
    if e.notes:
        lines.append(f"notes: {e.notes}")
    return [*lines, "sources:", *[f"  {u}" for u in (*e.config_urls, *e.sources)]]


def _entry_json(e: CatalogEntry) -> dict[str, object]:
    from dataclasses import asdict

    from lanner.catalog.entries import licences

    return {**asdict(e), "licence_terms": asdict(licences()[e.licence]),
            "config_urls": e.config_urls}


_SOURCE = {"gguf": "GGUF header"}


def _local(m: LocalModel) -> list[str]:
    from lanner.catalog.planner import gb

    spec = m.spec
    lines = [f"{spec.name} - local {spec.format} model", f"path: {spec.path}",
             f"weights: {gb(m.weights)} as {m.runs_as}",
             f"architecture (from its {_SOURCE.get(spec.format, 'config.json')}):",
             *_arch(m.arch, m.parameters), *_licence(m.licence, spec.license)]
    if m.entry is not None:
        lines.append(f"catalog entry: {m.entry.name} (`lanner info {m.entry.name}`)")
    return [*lines, "raw config: `lanner info --json " + spec.name + "`"]
