"""The conversion cache: entries keyed by the source's content, hashes cached by
(path, size, mtime), entries no source uses removed on the next conversion, and
conversions written into the engine's own home."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lanner.backends import conversion_cache, gguf_convert
from lanner.backends.gguf_reencode import reencoded
from lanner.engine.engine import Engine
from lanner.store.hashing import sha256_of_file


def entries(root: Path) -> list[str]:
    """The cache's entries and files, hidden bookkeeping (index, lock) aside."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def touch_later(path: Path) -> None:
    """What a reinstall does to an unchanged file: same bytes, a new mtime."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def test_a_hash_is_read_once_per_size_and_mtime(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source, root = tmp_path / "m.gguf", tmp_path / "converted"
    source.write_bytes(b"weights one")
    reads: list[Path] = []

    def counting(path: Path) -> str:
        reads.append(path)
        return sha256_of_file(path)

    monkeypatch.setattr(conversion_cache, "sha256_of_file", counting)
    first = conversion_cache.source_sha256(source, root)
    assert first == sha256_of_file(source)
    assert conversion_cache.source_sha256(source, root) == first and len(reads) == 1
    touch_later(source)  # a reinstall: read again, same hash
    assert conversion_cache.source_sha256(source, root) == first and len(reads) == 2
    source.write_bytes(b"weights two")  # an update: a new hash
    assert conversion_cache.source_sha256(source, root) == sha256_of_file(source) != first


def test_prune_removes_entries_whose_source_is_gone_or_changed(tmp_path: Path) -> None:
    root = tmp_path / "converted"
    kept, gone, changed = (tmp_path / n for n in ("kept.gguf", "gone.gguf", "changed.gguf"))
    for i, path in enumerate((kept, gone, changed)):
        path.write_bytes(f"weights {i}".encode())
    keys = {p: conversion_cache.source_sha256(p, root)[:16] for p in (kept, gone, changed)}
    for key in keys.values():
        (root / f"{key}.f16.gguf").write_bytes(b"re-encoded")
        (root / key).mkdir()
        (root / key / gguf_convert.MANIFEST).write_text("{}")
    old_style = root / "kept.0123456789ab.f16.gguf"  # named by an older Lanner
    old_style.write_bytes(b"re-encoded")
    in_progress = root / f"{keys[kept]}.f16.partial-123"
    in_progress.write_bytes(b"half")
    unknown = root / "notes.txt"
    unknown.write_text("not a conversion")
    gone.unlink()
    changed.write_bytes(b"other weights")

    removed = conversion_cache.prune(root)

    k = keys[kept]
    assert entries(root) == sorted([k, f"{k}.f16.gguf", in_progress.name, unknown.name])
    assert {p.name for p in removed} == {keys[gone], f"{keys[gone]}.f16.gguf", keys[changed],
                                         f"{keys[changed]}.f16.gguf", old_style.name}


def test_prune_keeps_what_a_reinstalled_source_or_an_older_manifest_still_uses(
        tmp_path: Path) -> None:
    root = tmp_path / "converted"
    reinstalled, older = tmp_path / "reinstalled.gguf", tmp_path / "older.gguf"
    reinstalled.write_bytes(b"weights one")
    older.write_bytes(b"weights two")
    key = conversion_cache.source_sha256(reinstalled, root)[:16]
    (root / f"{key}.f16.gguf").write_bytes(b"re-encoded")
    touch_later(reinstalled)  # same bytes, new mtime, not opened since
    # A dequantised folder from before the index: only its manifest names the source.
    legacy = root / sha256_of_file(older)[:16]
    legacy.mkdir()
    (legacy / gguf_convert.MANIFEST).write_text(json.dumps({"source": str(older)}))

    assert conversion_cache.prune(root) == []
    assert entries(root) == sorted([f"{key}.f16.gguf", legacy.name])


def test_a_reinstalled_source_reuses_its_reencoding_and_an_unused_one_is_removed(
        tinycoder_gguf: Path, tmp_path: Path) -> None:
    root = tmp_path / "converted"
    first = tmp_path / "first.gguf"
    shutil.copyfile(tinycoder_gguf, first)
    f16 = reencoded(first, "f16", root)
    assert f16.name == f"{sha256_of_file(first)[:16]}.f16.gguf"
    touch_later(first)
    assert reencoded(first, "f16", root) == f16
    assert entries(root) == [f16.name]  # no second copy

    # The first source goes away (an uninstalled model); the next conversion removes
    # what only it used.
    second = tmp_path / "second.gguf"
    shutil.copyfile(f16, second)
    first.unlink()
    q8 = reencoded(second, "q8_0", root)
    assert entries(root) == [q8.name]


@pytest.mark.slow
def test_the_engine_converts_into_its_own_home(tinycoder_gguf: Path, tmp_path: Path,
                                               lanner_home: Path) -> None:
    home = tmp_path / "engine-home"
    engine = Engine(home)
    try:
        model = engine.load(str(tinycoder_gguf), backend="transformers")
        key = sha256_of_file(tinycoder_gguf)[:16]
        assert model.backend.folder == home / "converted" / key  # type: ignore[attr-defined]
    finally:
        engine.close()
    assert not (lanner_home / "converted").exists()
