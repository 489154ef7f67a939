"""The llama-cpp-python Lanner runs: built by `make install` with patches/."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "llama_cpp_wheel.py"


def wheel_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("llama_cpp_wheel", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_build_carries_the_patches() -> None:
    script = wheel_script()
    assert script.PATCHES, "patches/ holds the patches the wheel is built with"
    assert importlib.metadata.version("llama-cpp-python") == f"{script.VERSION}+{script.LOCAL}"


def test_small_batches_give_the_logits_of_a_large_batch(smollm2_half_gguf: Path) -> None:
    """Steps of 3 and 17 tokens (the patched kernels: one-row tiles, and on
    AVX2 the activations widened once, tiles of 8 and 6 columns) against the
    same tokens at the end of one 60-token step (the original tiles): the same
    logits, bit for bit, so the patches change how fast a draft is checked,
    not what it decodes to. (From 64 tokens a step takes another attention
    path, patched or not, so the big step stays under that.)"""
    llm = llama_cpp.Llama(str(smollm2_half_gguf), n_ctx=256, n_batch=256, n_threads=2,
                          logits_all=True, flash_attn=True, verbose=False)
    ids = llm.tokenize(b"The Thames is a river that flows through southern England, "
                       b"including London. At 346 kilometres, it is the longest river "
                       b"entirely in England and the second-longest in the United Kingdom.")
    ids = (ids * 2)[:60]
    llm.eval(ids)
    whole = np.array(llm.scores[40:60])
    llm.reset()
    llm.eval(ids[:40])
    llm.eval(ids[40:43])
    llm.eval(ids[43:60])
    split = np.array(llm.scores[40:60])
    assert whole.shape == split.shape == (20, llm.n_vocab())
    assert np.array_equal(whole, split)
    del llm


PATCH = """--- a/pkg/code.c
+++ b/pkg/code.c
@@ -1,2 +1,2 @@
 int a = 1;
-int b = 2;
+int b = 3;
"""


def tree(root: Path, b: int) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "code.c").write_text(f"int a = 1;\nint b = {b};\n")
    return root


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch command")
def test_patches_apply_or_the_build_stops_naming_the_patch(tmp_path: Path) -> None:
    script = wheel_script()
    patch = tmp_path / "fix.patch"
    patch.write_text(PATCH)
    src = tree(tmp_path / "good", 2)
    script.apply_patches(src, [patch])
    assert (src / "pkg" / "code.c").read_text() == "int a = 1;\nint b = 3;\n"
    other = tree(tmp_path / "other", 5)  # not the source the patch was written for
    with pytest.raises(SystemExit) as e:
        script.apply_patches(other, [patch])
    assert "fix.patch does not apply" in str(e.value)


def test_the_version_gets_the_local_label_or_the_build_stops(tmp_path: Path) -> None:
    script = wheel_script()
    init = tmp_path / "llama_cpp" / "__init__.py"
    init.parent.mkdir()
    init.write_text(f'from .llama import *\n\n__version__ = "{script.VERSION}"\n')
    script.label(tmp_path)
    assert f'__version__ = "{script.VERSION}+{script.LOCAL}"' in init.read_text()
    with pytest.raises(SystemExit, match="no __version__"):
        script.label(tmp_path)  # already labelled: not the release's file


def test_a_cached_wheel_is_reused_and_changed_patches_change_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = wheel_script()
    cache = tmp_path / "wheels"
    wheel = cache / script.key() / f"llama_cpp_python-{script.VERSION}+{script.LOCAL}-x.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"built before")
    got = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(cache)],
                         capture_output=True, text=True, check=True)
    assert got.stdout.strip() == str(wheel)  # nothing downloaded or built
    patch = tmp_path / "edited.patch"
    patch.write_text(PATCH)
    monkeypatch.setattr(script, "PATCHES", [*script.PATCHES, patch])
    assert script.key() != wheel.parent.name


def test_the_key_names_the_cpu_and_cmake_args(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The build is -march=native: a wheel cached on an AVX512 CPU must not be
    reused on an AVX2 one (it would stop with an illegal instruction)."""
    script = wheel_script()
    avx512, avx2 = tmp_path / "avx512", tmp_path / "avx2"
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    assert "avx512_bf16" in script.target(str(avx512))
    assert script.key(str(avx512)) != script.key(str(avx2))
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    cuda = script.key(str(avx2))
    monkeypatch.delenv("CMAKE_ARGS")
    assert script.key(str(avx2)) != cuda


def test_a_new_wheel_removes_the_earlier_ones(tmp_path: Path) -> None:
    script = wheel_script()
    keep, old = tmp_path / "new", tmp_path / "old"
    for d in (keep, old):
        d.mkdir()
        (d / "llama_cpp_python.whl").write_bytes(b"w")
    script.prune(tmp_path, keep)
    assert [p.name for p in tmp_path.iterdir()] == ["new"]
