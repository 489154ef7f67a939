"""The llama-cpp-python Lanner runs: built by `make install` with patches/."""

from __future__ import annotations

import ctypes
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


def whole_and_split(llm: llama_cpp.Llama, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The logits of tokens 40-59 of ``ids`` at the end of one 60-token step,
    and decoded as steps of 3 and 17 tokens after the first 40."""
    llm.eval(ids[:60])
    whole = np.array(llm.scores[40:60])
    llm.reset()
    llm.eval(ids[:40])
    llm.eval(ids[40:43])
    llm.eval(ids[43:60])
    split = np.array(llm.scores[40:60])
    assert whole.shape == split.shape == (20, llm.n_vocab())
    return whole, split


def test_small_batches_give_the_logits_of_a_large_batch(smollm2_half_gguf: Path) -> None:
    """Steps of 3 and 17 tokens (the patched kernels: one-row tiles, and on
    AVX2 the activations widened once, tiles of 8 and 6 columns; attention
    for a few rows) against the same tokens at the end of one 60-token step
    (the original tiles): the same logits, bit for bit, so the patches change
    how fast a draft is checked, not what it decodes to. Where the weights are
    BF16 (AVX512_BF16 CPUs) they are packed and multiplied the same way for
    any number of tokens, so decoding one token at a time gives the same bits
    too."""
    from lanner.engine.registry import half_type

    llm = llama_cpp.Llama(str(smollm2_half_gguf), n_ctx=256, n_batch=256, n_threads=2,
                          logits_all=True, flash_attn=True, verbose=False)
    ids = llm.tokenize(b"The Thames is a river that flows through southern England, "
                       b"including London. At 346 kilometres, it is the longest river "
                       b"entirely in England and the second-longest in the United Kingdom.")
    ids = (ids * 2)[:60]
    whole, split = whole_and_split(llm, ids)
    assert np.array_equal(whole, split)
    llm.reset()
    llm.eval(ids[:40])
    for token in ids[40:60]:
        llm.eval([token])
    one_by_one = np.array(llm.scores[40:60])
    if half_type() == "bf16":
        assert np.array_equal(whole, one_by_one)
    else:  # F16 weights: one token takes ggml's dot product, a batch tinyBLAS
        assert np.abs(whole - one_by_one).max() < 1.0
    del llm


def test_integer_tiles_give_a_token_the_same_logits_in_any_small_batch(
        smollm2_half_gguf: Path, tmp_path: Path) -> None:
    """The shipped model quantised to Q8_0 goes through tinyBLAS's integer
    tiles (4 weight rows by 1-4 columns; the patch prefetches the next tile's
    rows for 2 or more): steps of 3 and 17 tokens against the same tokens at
    the end of one 60-token step give the same logits, bit for bit."""
    q8 = tmp_path / "smollm2.q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(smollm2_half_gguf).encode(), str(q8).encode(),
                                          ctypes.byref(params)) == 0
    llm = llama_cpp.Llama(str(q8), n_ctx=256, n_batch=256, n_threads=2,
                          logits_all=True, flash_attn=True, verbose=False)
    ids = llm.tokenize(b"def average_score(scores):\n    if not scores:\n        return 0\n"
                       b"    total = 0\n    for score in scores:\n        total += score\n")
    whole, split = whole_and_split(llm, (ids * 3)[:60])
    assert np.isfinite(whole).all() and whole.std() > 0
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


# ggml's own flash attention, called through ctypes on the libraries the
# wheel ships, against float64: the patched path for a few query rows.
GGML_F32, GGML_F16 = 0, 1


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]


def _ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    base.ggml_init.argtypes, base.ggml_init.restype = [_InitParams], p
    base.ggml_free.argtypes = [p]
    base.ggml_new_tensor_2d.argtypes = [p, ctypes.c_int, i64, i64]
    base.ggml_new_tensor_2d.restype = p
    base.ggml_new_tensor_3d.argtypes = [p, ctypes.c_int, i64, i64, i64]
    base.ggml_new_tensor_3d.restype = p
    f32 = ctypes.c_float
    base.ggml_flash_attn_ext.argtypes = [p, p, p, p, p, f32, f32, f32]
    base.ggml_flash_attn_ext.restype = p
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [p], p
    base.ggml_build_forward_expand.argtypes = [p, p]
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [p], p
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    return base, cpu


def ggml_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """q [rows, heads, dim] float32; k, v [cells, kv heads, dim] float16;
    mask [rows, cells] float16."""
    base, cpu = _ggml()
    rows, heads, dim = q.shape
    cells, kv_heads, _ = k.shape
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    assert ctx
    try:
        def tensor(a: np.ndarray, kind: int) -> int:
            if a.ndim == 3:
                t = base.ggml_new_tensor_3d(ctx, kind, a.shape[2], a.shape[0], a.shape[1])
            else:
                t = base.ggml_new_tensor_2d(ctx, kind, a.shape[1], a.shape[0])
            data = np.ascontiguousarray(a.transpose(1, 0, 2) if a.ndim == 3 else a)
            ctypes.memmove(base.ggml_get_data(t), data.ctypes.data, data.nbytes)
            return t
        out = base.ggml_flash_attn_ext(ctx, tensor(q, GGML_F32), tensor(k, GGML_F16),
                                       tensor(v, GGML_F16), tensor(mask, GGML_F16),
                                       1 / np.sqrt(dim), 0.0, 0.0)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
        result = np.empty((rows, heads, dim), np.float32)
        ctypes.memmove(result.ctypes.data, base.ggml_get_data(out), result.nbytes)
        return result
    finally:
        base.ggml_free(ctx)


def float64_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                      mask: np.ndarray) -> np.ndarray:
    group = q.shape[1] // k.shape[1]
    keys = np.repeat(k.astype(np.float64), group, axis=1)
    values = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("rhd,chd->rhc", q.astype(np.float64), keys) / np.sqrt(q.shape[2])
    scores += mask.astype(np.float64)[:, None, :]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("rhc,chd->rhd", weights, values)


def test_flash_attention_for_a_few_rows_is_float32_exact_the_same_in_any_batch_and_any_layout(
) -> None:
    """SmolLM2's shapes (9 heads sharing 3 KV heads, 64 dims), 300 cells, a
    causal mask with holes (other sequences' cells). The patched path sums in
    F32 (llama.cpp's own one summed V in F16: errors near 1e-3); a row gives
    the same bits alone, in 3 rows, in 17 or in 80; and where its cells lie in the
    cache changes nothing (a sequence decoded beside others, whose cells
    interleave with its own, gets what it gets alone)."""
    rng = np.random.default_rng(7)
    cells, rows = 300, 17
    k = rng.standard_normal((cells, 3, 64)).astype(np.float16)
    v = rng.standard_normal((cells, 3, 64)).astype(np.float16)
    q = rng.standard_normal((rows, 9, 64)).astype(np.float32)
    mask = np.zeros((rows, cells), np.float16)
    for r in range(rows):
        mask[r, cells - rows + r + 1:] = -np.inf
    mask[::2, 5::7] = -np.inf
    got = {n: ggml_attention(q[:n], k, v, mask[:n]) for n in (1, 3, rows)}
    want = float64_attention(q, k, v, mask)
    assert np.abs(got[rows] - want).max() < 1e-5
    # a prompt's worth of rows (llama.cpp's tiled path summed tiles of 64 cells)
    many = rng.standard_normal((80, 9, 64)).astype(np.float32)
    many[:rows] = q
    causal = np.zeros((80, cells), np.float16)
    for r in range(80):
        causal[r, cells - 80 + r + 1:] = -np.inf
    causal[:rows] = mask
    assert np.array_equal(ggml_attention(many, k, v, causal)[:rows], got[rows])
    assert np.array_equal(got[rows][:3], got[3])
    assert np.array_equal(got[rows][:1], got[1])
    # the same cells spread among 211 others that these rows do not see
    total = cells + 211
    where = np.sort(rng.choice(total, cells, replace=False))
    k2 = rng.standard_normal((total, 3, 64)).astype(np.float16)
    v2 = rng.standard_normal((total, 3, 64)).astype(np.float16)
    k2[where], v2[where] = k, v
    mask2 = np.full((rows, total), -np.inf, np.float16)
    mask2[:, where] = mask
    assert np.array_equal(ggml_attention(q, k2, v2, mask2), got[rows])
