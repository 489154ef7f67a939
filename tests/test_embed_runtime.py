"""The embedding runtimes: torch (exact), ONNX fp32 (the same vectors) and
ONNX int8 (close enough to rank alike), the automatic choice, and the export
cache keyed by content. Real model: the bundled all-MiniLM-L6-v2, exported
once per session into a shared home."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lanner.errors import InvalidRequest
from lanner.rag import embed, embed_onnx
from lanner.rag.embed import LocalEmbedder, bundled_model_dir, choose_runtime
from lanner.server.embedder import SentenceTransformerEmbedder

TEXTS = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue rose by four percent.",
    "",
    "Why did the lighthouse keeper leave the island in the winter of 1850? " * 40,  # > 256
    "Paris is the capital and largest city of France.",
]
QUERIES = ["Where is the cat?", "How did sales do this quarter?", "What is France's capital?"]


@pytest.fixture(scope="session")
def onnx_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose cache holds both exports of the bundled model (made once)."""
    home = tmp_path_factory.mktemp("onnx-home")
    embed_onnx.exported(bundled_model_dir(), home / "converted" / "onnx", quantized=True)
    return home


@pytest.fixture(scope="session")
def exact() -> np.ndarray:
    return LocalEmbedder(runtime="torch").embed(TEXTS + QUERIES)


def embedder(runtime: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> LocalEmbedder:
    monkeypatch.setenv("LANNER_HOME", str(home))
    return LocalEmbedder(runtime=runtime)


def test_onnx_fp32_gives_the_torch_vectors(onnx_home: Path, exact: np.ndarray,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = embedder("onnx", onnx_home, monkeypatch).embed(TEXTS + QUERIES)
    assert vectors.dtype == np.float32 and vectors.shape == exact.shape
    np.testing.assert_allclose(vectors, exact, atol=2e-5)


def test_onnx_int8_is_close_and_ranks_alike(onnx_home: Path, exact: np.ndarray,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = embedder("onnx-int8", onnx_home, monkeypatch).embed(TEXTS + QUERIES)
    cosine = (vectors * exact).sum(axis=1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.98, cosine
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    docs, queries = slice(0, len(TEXTS)), slice(len(TEXTS), None)
    best = (vectors[queries] @ vectors[docs].T).argmax(axis=1)
    assert list(best) == list((exact[queries] @ exact[docs].T).argmax(axis=1)) == [0, 2, 5]


def test_a_query_alone_and_in_a_batch_get_the_same_vector(
        onnx_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = embedder("onnx", onnx_home, monkeypatch)
    alone = model.embed([QUERIES[0]])  # one thread, no padding
    batched = model.embed([TEXTS[4], QUERIES[0]])  # padded to the long text
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)
    assert model.embed([]).shape == (0, 384)


def test_token_counts_match_sentence_transformers(onnx_home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("LANNER_HOME", str(onnx_home))
    model = embed.sentence_model(bundled_model_dir(), "onnx-int8")
    reference = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    assert model.tokenizer(TEXTS)["input_ids"] == [reference(t)["input_ids"] for t in TEXTS]
    assert model.max_seq_length == 256


def test_server_embedder_on_onnx(onnx_home: Path, exact: np.ndarray,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANNER_HOME", str(onnx_home))
    server = SentenceTransformerEmbedder(runtime="onnx")
    vectors, tokens = server.embed(TEXTS[:3])
    np.testing.assert_allclose(np.array(vectors), exact[:3], atol=2e-5)
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    assert tokens == sum(len(reference(t)["input_ids"]) for t in TEXTS[:3])  # as torch counts
    with pytest.raises(InvalidRequest, match="input\\[1\\]"):
        server.embed(["ok", TEXTS[4]])


def test_export_cache_is_keyed_by_content(onnx_home: Path, tmp_path: Path) -> None:
    source = bundled_model_dir()
    cache = onnx_home / "converted" / "onnx"
    path = embed_onnx.exported(source, cache, quantized=True)
    before = path.stat().st_mtime_ns
    copy = tmp_path / "copy"  # the same files somewhere else: the same export
    copy.mkdir()
    for item in source.iterdir():
        (copy / item.name).symlink_to(item)
    assert embed_onnx.exported(copy, cache, quantized=True) == path
    assert path.stat().st_mtime_ns == before  # reused, not written again
    (copy / "config.json").unlink()
    config = (source / "config.json").read_text().replace("}", ', "note": "changed"}', 1)
    (copy / "config.json").write_text(config)
    assert embed_onnx.content_key(copy) != embed_onnx.content_key(source)


def test_runtime_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(embed.RUNTIME_ENV, raising=False)
    assert choose_runtime("torch") == "torch"
    monkeypatch.setattr(embed, "has_onnxruntime", lambda: True)
    monkeypatch.setattr(embed, "cpu_has_vnni", lambda: True)
    assert choose_runtime() == "onnx-int8"
    monkeypatch.setattr(embed, "cpu_has_vnni", lambda: False)
    assert choose_runtime() == "onnx"
    monkeypatch.setattr(embed, "has_onnxruntime", lambda: False)
    assert choose_runtime() == "torch"
    monkeypatch.setenv(embed.RUNTIME_ENV, "onnx")
    assert choose_runtime() == "onnx"
    assert choose_runtime("torch") == "torch"  # the argument wins
    with pytest.raises(InvalidRequest, match="embed_runtime.*one of: auto, torch"):
        choose_runtime("onnx-fp16")
    monkeypatch.setenv(embed.RUNTIME_ENV, "fast")
    with pytest.raises(InvalidRequest, match="LANNER_EMBED_RUNTIME"):
        LocalEmbedder()


def test_cpu_features_are_read_from_cpuinfo() -> None:
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo on this platform")
    flags = Path("/proc/cpuinfo").read_text()
    assert embed.cpu_has_vnni() == ("avx512_vnni" in flags or "avx_vnni" in flags)


def test_unsupported_modules_are_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "dense"
    shutil.copytree(bundled_model_dir(), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    modules = (folder / "modules.json").read_text().replace(
        "sentence_transformers.models.Normalize", "sentence_transformers.models.Dense")
    (folder / "modules.json").write_text(modules)
    from lanner.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="Dense.*--embed-runtime torch"):
        embed_onnx.OnnxSentenceModel(folder, tmp_path / "cache", quantized=False)


def test_ingest_flag_picks_the_runtime(onnx_home: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    doc = tmp_path / "note.md"
    doc.write_text("# Lighthouses\n\nThe keeper trimmed the wick every evening at dusk.\n")
    env = {**os.environ, "LANNER_HOME": str(onnx_home), "LANNER_EMBED_RUNTIME": "torch"}
    run = [sys.executable, "-m", "lanner", "ingest", str(doc), "-c", "flag", "--json",
           "--store", str(tmp_path / "docs.db")]
    result = subprocess.run([*run, "--embed-runtime", "onnx-fast"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "onnx-int8" in result.stderr
    code = ("import sys; from lanner.cli import main; import lanner.rag.embed as e; "
            "seen = []; real = e.sentence_model; "
            "e.sentence_model = lambda f, r, *a: seen.append(r) or real(f, r, *a); "
            "code = main(sys.argv[1:]); print(seen, file=sys.stderr); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *run[3:], "--embed-runtime",
                             "onnx-int8"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chunks"] == 1
    assert result.stderr.strip().splitlines()[-1] == "['onnx-int8']"


def test_onnx_exports_go_to_the_home_given_not_the_environments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library opened with a home, and the server's embeddings model given the
    engine's home, export into that home's cache, not into $LANNER_HOME's (nor
    the user's data folder when that is unset)."""
    from lanner.rag.library import Library

    elsewhere, home = tmp_path / "env-home", tmp_path / "home"
    monkeypatch.setenv("LANNER_HOME", str(elsewhere))
    monkeypatch.setenv(embed.RUNTIME_ENV, "onnx")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "lighthouse.txt").write_text("The lighthouse was built in 1871.\n")
    with Library.open(home=home) as library:
        library.ingest([docs], "harbour")
    assert list((home / "converted" / "onnx").rglob("model.onnx"))
    vectors, _ = SentenceTransformerEmbedder(home=home).embed(["a lighthouse"])
    assert len(vectors[0]) == 384
    assert not (elsewhere / "converted").exists()
