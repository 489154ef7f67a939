"""Re-encoding a GGUF's weights to another llama.cpp type (F16, BF16, Q8_0), once.

Why: the bundled SmolLM2 ships as Q4_1. llama.cpp multiplies Q4 weights with
activations it quantises to 8 bits, and for a 135M model that loses real answers
(greedy "What is the capital of France?" rambles instead of saying Paris, while
the same weights dequantised in transformers answer it). Re-encoding the shipped
weights as F16 keeps their values (Q4_1 blocks dequantise exactly into F16's
range) and makes llama.cpp compute in F16; it also batches better. Measured in
docs/benchmarks.md (perplexity and speed of both).

BF16 keeps 8 bits of mantissa instead of 11 (perplexity 55.68 against F16's
55.65 on the same text, 99% the same top-1 tokens) and, on a CPU with
AVX512_BF16, multiplies natively: steps of several tokens (prompts, batched
streams, speculative checks) ran 7-15% faster there, one token at the same
speed (``registry.half_type`` picks it per CPU). Its batched rows differ more
from one-token steps (greedy logprobs up to 0.055-0.072 apart, against
0.013 for F16).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from lanner.backends.conversion_cache import KEY_HEX, prune, source_sha256
from lanner.errors import InvalidRequest, ModelLoadError

FTYPES = ("f16", "bf16", "q8_0")


def reencoded(path: Path, ftype: str, cache_root: Path) -> Path:
    """The GGUF at ``path`` with its weights in ``ftype``, cached under ``cache_root``.

    The cache key is the source's content (``conversion_cache``): a reinstalled
    file with the same bytes reuses its re-encoding, an updated one is
    re-encoded, and a new re-encoding removes the entries no source uses any
    more. Writing goes through a temp file and a rename.
    """
    import llama_cpp

    from lanner.backends.llamacpp_native import init_llama

    if ftype not in FTYPES:
        raise InvalidRequest("weights", f"unknown type {ftype!r} (one of: {', '.join(FTYPES)})")
    sha = source_sha256(path, cache_root)
    dest = cache_root / f"{sha[:KEY_HEX]}.{ftype}.gguf"
    if dest.exists():
        return dest
    init_llama()  # silences llama.cpp's per-tensor progress lines
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".partial-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
                    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
                    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[ftype]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(path).encode(), str(tmp).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"cannot re-encode {path} as {ftype} (llama.cpp error {rc})")
    tmp.replace(dest)
    prune(cache_root)
    return dest
