"""The catalog's data files, read and validated once: ``models/*.toml`` (one
file per family, a ``[defaults]`` table merged into each ``[[models]]`` entry)
and ``licences.toml``.

A malformed file is a ``CatalogError`` naming file, entry and field; unknown
fields are refused, so a typo never silently drops a fact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from lanner.catalog.planner import Architecture
from lanner.errors import CatalogError

OPENNESS_LEVELS = ("open", "described", "closed")
OPENNESS_PARTS = ("weights", "inference_code", "training_code", "data")
KINDS = ("base", "instruct", "chat", "base+instruct")


@dataclass(frozen=True, slots=True)
class Licence:
    id: str
    name: str
    summary: str
    url: str
    osi: bool
    commercial: str
    """"allowed", "threshold" (below ``user_threshold`` monthly users) or "no"."""
    hosting: str
    """"allowed" or "restricted" (serving it to others needs another licence)."""
    outputs: str
    """"free" or "restricted" (e.g. not to train other models)."""
    acceptance: bool
    """The Hub asks for the terms to be accepted before download."""
    aliases: tuple[str, ...] = ()
    user_threshold: int = 0

    @property
    def warns(self) -> bool:
        """Whether serve/run/pull warn before using a model under it."""
        return (self.hosting != "allowed" or self.acceptance or self.commercial != "allowed"
                or self.outputs != "free")

    def restrictions(self) -> list[str]:
        """The restrictions in short words, for tables and warnings."""
        out = []
        if self.commercial == "no":
            out.append("no commercial use")
        elif self.commercial == "threshold":
            out.append(f"separate licence above {self.user_threshold / 1e6:,.0f}M monthly users")
        if self.hosting != "allowed":
            out.append("hosting restricted")
        if self.outputs != "free":
            out.append("use of outputs restricted")
        if self.acceptance:
            out.append("terms must be accepted")
        return out


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    family: str
    kind: str
    hub: tuple[str, ...]
    parameters: int
    arch: Architecture
    licence: str
    openness: dict[str, str]
    chat_format: str | None
    """Built-in ChatFormat for checkpoints that ship no template."""
    sources: tuple[str, ...]
    notes: str
    file: str

    @property
    def config_urls(self) -> list[str]:
        """Where the architecture numbers come from: each repo's config.json."""
        return [f"https://huggingface.co/{h}/blob/main/config.json" for h in self.hub]

    @property
    def is_open(self) -> bool:
        """Weights, code and data all open (Pythia, OLMo, SmolLM2)."""
        return all(v == "open" for v in self.openness.values())


_ARCH_FIELDS = {f.name: f.type for f in fields(Architecture)}
_REQUIRED = ("name", "family", "kind", "hub", "parameters", "layers", "hidden_size",
             "intermediate_size", "attention_heads", "kv_heads", "head_dim", "vocab_size",
             "context_length", "mlp", "tied_embeddings", "licence", "openness", "sources")
_OPTIONAL = ("sliding_window", "sliding_window_layers", "experts", "experts_per_token",
             "chat_format", "notes")


@functools.cache
def licences() -> dict[str, Licence]:
    """Every licence the catalog knows, by id."""
    data = _read_toml("licences.toml")
    out = {}
    for lid, raw in data.items():
        try:
            out[lid] = Licence(id=lid, **{**raw, "aliases": tuple(raw.get("aliases", ()))})
        except TypeError as exc:
            raise CatalogError(f"licences.toml: [{lid}]: {exc}") from exc
    return out


@functools.cache
def catalog() -> tuple[CatalogEntry, ...]:
    """Every entry of every ``models/*.toml``, validated, in file order."""
    folder = resources.files("lanner.catalog").joinpath("models")
    entries: list[CatalogEntry] = []
    for item in sorted(folder.iterdir(), key=lambda t: t.name):
        if not item.name.endswith(".toml"):
            continue
        data = _read_toml(f"models/{item.name}")
        defaults = data.pop("defaults", {})
        unknown = set(data) - {"models"}
        if unknown:
            raise CatalogError(f"models/{item.name}: unknown table(s) {sorted(unknown)}")
        for i, raw in enumerate(data.get("models", [])):
            entries.append(_entry({**defaults, **raw}, f"models/{item.name}", i))
    seen: set[str] = set()
    for e in entries:
        for key in (e.name, *[h.lower() for h in e.hub]):
            if key in seen:
                raise CatalogError(f"{e.file}: {e.name}: {key!r} appears twice in the catalog")
            seen.add(key)
    return tuple(entries)


def find(name: str) -> CatalogEntry | None:
    """The entry with this name or hub id (case-insensitive), else None."""
    key = name.strip().lower()
    for e in catalog():
        if key == e.name or key in (h.lower() for h in e.hub):
            return e
    return None


def get(name: str) -> CatalogEntry:
    """Like ``find``, but an unknown name is a CatalogError with close matches."""
    entry = find(name)
    if entry is None:
        import difflib

        close = difflib.get_close_matches(name.lower(), [e.name for e in catalog()], n=4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CatalogError(f"no catalog entry {name!r}{hint}; "
                           "see `lanner models --catalog`")
    return entry


def licence_for(text: str | None) -> Licence | None:
    """The licence a model card or GGUF names ("apache-2.0", "llama2", "Gemma
    terms (not OSI)"), matched by id or alias, case-insensitively."""
    if not text:
        return None
    key = text.strip().lower()
    for lic in licences().values():
        if key == lic.id or key in (a.lower() for a in lic.aliases):
            return lic
    return None


def _read_toml(name: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    text = resources.files("lanner.catalog").joinpath(name).read_text(encoding="utf-8")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{name}: {exc}") from exc


def _entry(raw: dict[str, Any], file: str, index: int) -> CatalogEntry:
    where = f"{file}: {raw.get('name', f'entry {index + 1}')}"
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CatalogError(f"{where}: missing {', '.join(missing)}")
    unknown = set(raw) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    arch_values = {k: raw[k] for k in _ARCH_FIELDS if k in raw}
    for key, value in arch_values.items():
        want = bool if key == "tied_embeddings" else str if key == "mlp" else int
        if type(value) is not want or (isinstance(value, int) and value < 0):
            raise CatalogError(f"{where}: {key} must be a non-negative {want.__name__}, "
                               f"got {value!r}")
    _check(where, raw)
    return CatalogEntry(
        name=raw["name"], family=raw["family"], kind=raw["kind"], hub=tuple(raw["hub"]),
        parameters=int(raw["parameters"]), arch=Architecture(**arch_values),
        licence=raw["licence"], openness=dict(raw["openness"]),
        chat_format=raw.get("chat_format"), sources=tuple(raw["sources"]),
        notes=raw.get("notes", ""), file=file,
    )


def _check(where: str, raw: dict[str, Any]) -> None:
    """The checks a type cannot express; each names the field."""
    problems = []
    if raw["name"] != raw["name"].lower() or "/" in raw["name"]:
        problems.append(f"name {raw['name']!r} must be lower case without '/'")
    if raw["kind"] not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)}")
    if not raw["hub"] or not all(isinstance(h, str) and h.count("/") == 1 for h in raw["hub"]):
        problems.append("hub must list ORG/NAME repo ids")
    if not isinstance(raw["parameters"], int | float) or raw["parameters"] <= 0:
        problems.append("parameters must be a positive number")
    if raw["mlp"] not in ("gated", "plain"):
        problems.append("mlp must be 'gated' or 'plain'")
    if raw["kv_heads"] < 1 or raw["attention_heads"] % raw["kv_heads"]:
        problems.append("kv_heads must divide attention_heads")
    if raw["licence"] not in licences():
        problems.append(f"licence {raw['licence']!r} is not in licences.toml")
    openness = raw["openness"]
    if not isinstance(openness, dict) or set(openness) != set(OPENNESS_PARTS) or any(
            v not in OPENNESS_LEVELS for v in openness.values()):
        problems.append(f"openness must give each of {', '.join(OPENNESS_PARTS)} as "
                        f"{'/'.join(OPENNESS_LEVELS)}")
    fmt = raw.get("chat_format")
    if fmt is not None and not resources.files("lanner.engine").joinpath(
            f"chat_templates/{fmt}.jinja").is_file():
        problems.append(f"chat_format {fmt!r} is not a built-in format")
    if not raw["sources"]:
        problems.append("sources must not be empty")
    if problems:
        raise CatalogError(f"{where}: {'; '.join(problems)}")
