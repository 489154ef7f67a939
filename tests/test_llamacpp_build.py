"""The llama-cpp-python Lanner runs: built by `make install` with patches/."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import llama_cpp
import numpy as np

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
    """A 3-token step (the patched one-row tiles) against the same three tokens
    at the end of one 43-token step (the original tiles): the same logits, bit
    for bit, so the patch changes how fast a draft is checked, not what it
    decodes to."""
    llm = llama_cpp.Llama(str(smollm2_half_gguf), n_ctx=256, n_batch=256, n_threads=2,
                          logits_all=True, flash_attn=True, verbose=False)
    ids = llm.tokenize(b"The Thames is a river that flows through southern England, "
                       b"including London. At 346 kilometres, it is the longest river "
                       b"entirely in England and the second-longest in the United Kingdom.")
    ids = (ids * 2)[:43]
    llm.eval(ids)
    whole = np.array(llm.scores[40:43])
    llm.reset()
    llm.eval(ids[:40])
    llm.eval(ids[40:])
    split = np.array(llm.scores[40:43])
    assert whole.shape == split.shape == (3, llm.n_vocab())
    assert np.array_equal(whole, split)
    del llm
