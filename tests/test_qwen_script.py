"""scripts/qwen.py: the optional model is joined from its parts only when the
hash matches, and registered; a mismatch leaves nothing behind."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "qwen.py"


@pytest.fixture
def qwen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("qwen_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parts = []
    for n in range(1, module.PARTS + 1):
        part = tmp_path / f"part0{n}.bin"
        part.write_bytes(bytes([n]) * 1000)
        parts.append(part)
    monkeypatch.setattr(module, "part_path", lambda n: parts[n - 1])
    monkeypatch.setattr(module, "SHA256", hashlib.sha256(
        b"".join(p.read_bytes() for p in parts)).hexdigest())
    return module


def test_parts_are_joined_checked_and_registered(qwen: ModuleType, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setattr("sys.argv", ["qwen.py", "--home", str(home)])
    qwen.main()
    target = home / "models" / qwen.FILE
    assert target.read_bytes()[:1000] == bytes([1]) * 1000 and target.stat().st_size == 6000
    entry = json.loads((home / "models.json").read_text())[qwen.NAME]
    assert entry["path"] == str(target) and entry["license"] == "Apache-2.0"


def test_a_hash_mismatch_keeps_nothing(qwen: ModuleType, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qwen, "SHA256", "0" * 64)
    target = tmp_path / "models" / qwen.FILE
    with pytest.raises(SystemExit, match="not used"):
        qwen.assemble(target)
    assert not target.exists() and not list(target.parent.iterdir())
