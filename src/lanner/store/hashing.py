"""sha256 of model files, cached in the store so a large file is read once.

A folder (a safetensors checkpoint) hashes to the sha256 of its manifest: one
line ``<sha256>  <relative/path>\\n`` per file in sorted path order, the same
text ``sha256sum`` prints, so a user can check it by hand. Hidden files and
folders (``.cache/``, ``.git/``) are skipped: downloaders write changing
metadata there that is not part of the model.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

from lanner.errors import ModelLoadError, ModelNotFound
from lanner.store.turn import utc_now

_CHUNK = 1 << 20


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of the bytes of ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every non-hidden file under ``root``, sorted."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), path))
    return sorted(found)


def cached_sha256(conn: sqlite3.Connection, path: Path, lock: threading.RLock) -> str:
    """sha256 of a file or folder, reusing cached per-file hashes.

    A cached hash is used while the file's resolved path, size and
    ``mtime_ns`` are unchanged. ``lock`` guards ``conn`` and is held only for
    the cache look-up and write, not while a file is read. Raises
    ``ModelNotFound`` if ``path`` does not exist or is a folder without files,
    ``ModelLoadError`` if it cannot be read.
    """
    path = Path(path).expanduser()
    try:
        return _path_hash(conn, path, lock)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from exc


def _path_hash(conn: sqlite3.Connection, path: Path, lock: threading.RLock) -> str:
    if path.is_file():
        return _file_hash(conn, path, lock)
    if not path.is_dir():
        raise ModelNotFound(f"{path}: no such file or folder")
    entries = folder_files(path)
    if not entries:
        raise ModelNotFound(f"{path}: folder has no model files")
    manifest = "".join(f"{_file_hash(conn, p, lock)}  {rel}\n" for rel, p in entries)
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def _file_hash(conn: sqlite3.Connection, path: Path, lock: threading.RLock) -> str:
    key = str(path.resolve())
    before = path.stat()
    with lock:
        row = conn.execute(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
            (key, before.st_size, before.st_mtime_ns),
        ).fetchone()
    if row is not None:
        return str(row[0])
    sha = sha256_of_file(path)
    if not _unchanged(before, path.stat()):
        # A file rewritten while we read it gets a hash of neither version: not cached.
        return sha
    with lock:
        conn.execute(
            "INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, sha256, hashed_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (key, before.st_size, before.st_mtime_ns, sha, utc_now()),
        )
    return sha


def _unchanged(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ino) == (b.st_size, b.st_mtime_ns, b.st_ino)
