"""The conversion cache (``<Lanner home>/converted``): what a model file becomes,
keyed by the content of the file it came from.

Two kinds of entries, both named by the first 16 hex digits of the source's
sha256: ``<key>/`` (a GGUF dequantised to a safetensors folder, ``gguf_convert``)
and ``<key>.<ftype>.gguf`` (a GGUF re-encoded for llama.cpp, ``gguf_reencode``).
A reinstalled, copied or renamed source with the same bytes finds its entry.

Hashing a large file on every load would cost seconds, so ``.hashes.json``
remembers each source's hash by (resolved path, size, mtime_ns); a changed
size or mtime means reading the file again. The same records say which entries
are still used: after each new conversion, ``prune`` removes every entry whose
key no existing source has now (a source updated in place, a deleted model, a
re-encoding named by an older Lanner), so copies do not pile up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lanner.store.hashing import sha256_of_file

KEY_HEX = 16
INDEX = ".hashes.json"
LOCK = ".lock"
MANIFEST = "lanner-conversion.json"
"""What marks a folder as a finished ``gguf_convert`` entry."""


def source_sha256(path: Path, root: Path) -> str:
    """sha256 of ``path``, read once per (resolved path, size, mtime_ns) and
    remembered in ``root``'s index."""
    key, before = str(path.resolve()), path.stat()
    record = _read_index(root).get(key)
    if isinstance(record, dict) and _same(record, before):
        return str(record["sha256"])
    sha = sha256_of_file(path)
    after = path.stat()
    if _same({"size": before.st_size, "mtime_ns": before.st_mtime_ns}, after):
        # A file rewritten while it was read has a hash of neither version: not kept.
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            index = _read_index(root)
            index[key] = {"size": after.st_size, "mtime_ns": after.st_mtime_ns, "sha256": sha}
            _write_index(root, index)
    return sha


def prune(root: Path) -> list[Path]:
    """Remove the entries that no source uses any more; returns them.

    The sources are the recorded ones that still exist (one whose size or mtime
    changed, say a reinstall, is hashed again here) and, for a dequantised
    folder, the file its manifest names (entries written before the index).
    Temporary and unknown files are left alone.
    """
    removed = []
    with _locked(root):
        index = _read_index(root)
        live: dict[str, dict[str, object]] = {}
        for path, record in index.items():
            now = _current(path, record)
            if now is not None:
                live[path] = now
        keep = {str(r["sha256"])[:KEY_HEX] for r in live.values()}
        for entry in sorted(root.iterdir()):
            key = _entry_key(entry)
            if key is None or key in keep:
                continue
            source = _manifest_source(entry)
            if source is not None and str(source) not in live:
                record = _record(source)
                live[str(source)] = record
                if str(record["sha256"])[:KEY_HEX] == key:
                    keep.add(key)
                    continue
            _remove(entry)
            removed.append(entry)
        if live != index:
            _write_index(root, dict(live))
    return removed


def _entry_key(entry: Path) -> str | None:
    """The source key of a cache entry; None for anything that is not one."""
    name = entry.name
    if name.startswith(".") or "partial" in name:
        return None  # the index, the lock, conversions still being written
    if entry.is_dir() and (entry / MANIFEST).is_file():
        return name
    if entry.is_file() and name.endswith(".gguf"):
        return name.split(".", 1)[0]
    return None


def _remove(entry: Path) -> None:
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry, ignore_errors=True)


def _same(record: dict[str, object], stat: os.stat_result) -> bool:
    return record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns


def _record(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of_file(path)}


def _current(path: str, record: object) -> dict[str, object] | None:
    """The record of a source as it is now: unchanged, hashed again, or None if gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if isinstance(record, dict) and _same(record, stat):
        return record
    try:
        return _record(Path(path))
    except OSError:
        return None


def _manifest_source(entry: Path) -> Path | None:
    """The existing source file a dequantised folder's manifest names, if any."""
    if not entry.is_dir():
        return None
    try:
        data = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    source = Path(str(data.get("source", ""))) if isinstance(data, dict) else None
    return source if source is not None and source.is_file() else None


def _read_index(root: Path) -> dict[str, object]:
    try:
        data = json.loads((root / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: hashes are computed again
    return data if isinstance(data, dict) else {}


def _write_index(root: Path, index: dict[str, object]) -> None:
    tmp = root / f"{INDEX}.{os.getpid()}.partial"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(root / INDEX)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One process at a time updates the index or prunes (POSIX file lock)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a lost index update costs a re-hash
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
