"""How much memory a model needs: weights + KV cache + activations + overhead.

Pure arithmetic on an ``Architecture`` (from the catalog, a GGUF header or a
config.json); no model is loaded. Sizes are bytes; the CLI prints decimal GB,
as the model cards and guides do.

- weights: parameters x bits per weight of the quantisation. bitsandbytes
  (int8, int4/nf4) keeps the embeddings and lm_head in 16 bits; GGUF types
  quantise every tensor.
- KV cache: keys and values of every layer, for every token held:
  ``2 x layers x kv_heads x head_dim x bytes x tokens x batch``. It depends on
  the KV heads, so multi-query (1 head) and grouped-query attention show.
  Sliding-window layers hold at most their window.
- activations: one forward pass over the whole prompt with memory-efficient
  attention (no tokens x tokens scores): the residual stream and the MLP's
  intermediate in 16 bits, plus the last position's logits in fp32.
- overhead: 20% of the weights for the runtime (CUDA context, allocator,
  workspaces): EleutherAI's "Transformer Math 101" rule of thumb.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

OVERHEAD_FRACTION = 0.2


@dataclass(frozen=True, slots=True)
class Architecture:
    """The facts memory depends on, in Hugging Face config.json terms."""

    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    """1: multi-query attention; fewer than attention_heads: grouped-query."""
    head_dim: int
    vocab_size: int
    context_length: int
    intermediate_size: int = 0
    sliding_window: int = 0
    """0: every layer attends over the whole context."""
    sliding_window_layers: int = 0
    """How many layers use the window (0 with a window: all of them)."""
    experts: int = 0
    experts_per_token: int = 0
    mlp: str = "gated"
    """"gated" (SwiGLU/GeGLU: three matrices) or "plain" (two)."""
    tied_embeddings: bool = False

    def estimated_parameters(self) -> int:
        """Parameters from the shapes (norms and biases left out): a check on a
        published count, and the count for a GGUF whose tensors are not read."""
        attn = self.hidden_size * self.head_dim * (self.attention_heads + 2 * self.kv_heads)
        attn += self.attention_heads * self.head_dim * self.hidden_size
        mats = 3 if self.mlp == "gated" else 2
        mlp = self.hidden_size * self.intermediate_size * mats * max(self.experts, 1)
        router = self.hidden_size * self.experts
        embed = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp + router) + embed

    @property
    def embedding_parameters(self) -> int:
        """Input embeddings plus lm_head (once if tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)


@dataclass(frozen=True, slots=True)
class Quant:
    name: str
    bits: float
    """Bits per weight, scales included (an average for GGUF's mixed K-quants)."""
    keeps_embeddings: bool = False
    """bitsandbytes leaves embeddings and lm_head in 16 bits."""
    about: str = ""


# Ordered from most to least precise: the planner suggests the first that fits.
QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("fp32", 32, about="full precision"),
    Quant("bf16", 16, about="the usual checkpoint dtype"),
    Quant("fp16", 16),
    Quant("int8", 8, True, "bitsandbytes LLM.int8 (per-row scales; embeddings in 16 bits)"),
    Quant("fp8", 8, about="8-bit floats (Hopper GPUs, vLLM)"),
    Quant("q8_0", 8.5, about="GGUF: blocks of 32 int8 with a 16-bit scale"),
    Quant("q6_k", 6.5625, about="GGUF K-quant"),
    Quant("q5_k_m", 5.69, about="GGUF K-quant mix (average for a Llama 7B)"),
    Quant("q5_0", 5.5, about="GGUF"),
    Quant("q4_k_m", 4.85, about="GGUF K-quant mix (average for a Llama 7B)"),
    Quant("q4_1", 5.0, about="GGUF"),
    Quant("int4", 4.5, True, "bitsandbytes nf4/fp4, blocks of 64 with an fp32 scale"),
    Quant("q4_0", 4.5, about="GGUF: blocks of 32 4-bit with a 16-bit scale"),
    Quant("gptq-int4", 4.25, about="GPTQ/AWQ, groups of 128"),
    Quant("q3_k_m", 3.91, about="GGUF K-quant mix"),
    Quant("q2_k", 3.35, about="GGUF K-quant mix"),
)}
QUANT_ALIASES = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                 "f16": "fp16", "nf4": "int4", "4bit": "int4", "8bit": "int8", "awq": "gptq-int4",
                 "gptq": "gptq-int4"}
KV_DTYPES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "f16": 2.0, "fp8": 1.0, "q8_0": 34 / 32,
             "q4_0": 18 / 32}


def quant(name: str) -> Quant:
    """A Quant by name or alias; KeyError if unknown."""
    key = name.lower()
    return QUANTS[QUANT_ALIASES.get(key, key)]


@dataclass(frozen=True, slots=True)
class Plan:
    """One model's memory at one setting; every size in bytes."""

    weights: int
    kv_cache: int
    activations: int
    overhead: int
    parameters: int
    quant: str
    context: int
    batch: int
    kv_dtype: str
    kv_bytes_per_token: int
    """For one sequence, all layers (a windowed layer counted in full)."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead


def kv_bytes_per_token(arch: Architecture, kv_dtype: str = "f16") -> int:
    """Bytes one token's keys and values take in every layer."""
    return int(2 * arch.layers * arch.kv_heads * arch.head_dim * KV_DTYPES[kv_dtype])


def kv_cache_bytes(arch: Architecture, tokens: int, batch: int = 1,
                   kv_dtype: str = "f16") -> int:
    """The KV cache for ``batch`` sequences of ``tokens`` each; a windowed
    layer holds at most its window."""
    per_layer_token = 2 * arch.kv_heads * arch.head_dim * KV_DTYPES[kv_dtype]
    windowed = 0
    if arch.sliding_window and arch.sliding_window < tokens:
        windowed = arch.sliding_window_layers or arch.layers
    held = (arch.layers - windowed) * tokens + windowed * arch.sliding_window
    return int(per_layer_token * held * batch)


def weights_bytes(arch: Architecture, parameters: int, q: Quant) -> int:
    kept = min(arch.embedding_parameters, parameters) if q.keeps_embeddings else 0
    return int((parameters - kept) * q.bits / 8 + kept * 2)


def activation_bytes(arch: Architecture, tokens: int, logit_rows: int = 1) -> int:
    """One forward pass over ``tokens``, with ``logit_rows`` rows of fp32 logits
    (transformers' generate keeps the last position's; llama.cpp reserves one
    per token of its batch)."""
    mlp_width = arch.intermediate_size * (2 if arch.mlp == "gated" else 1)
    mlp_width *= max(arch.experts_per_token, 1)
    per_token = (4 * arch.hidden_size + mlp_width) * 2
    return tokens * per_token + logit_rows * arch.vocab_size * 4


def plan(arch: Architecture, parameters: int, *, quant_name: str = "bf16",
         context: int | None = None, batch: int = 1, kv_dtype: str = "f16",
         weights: int | None = None, prefill_tokens: int | None = None,
         logit_rows: int | None = None) -> Plan:
    """The memory to run a model at ``context`` tokens per sequence (default:
    its context length) for ``batch`` sequences at once. ``weights``: the
    weights' real size in bytes when known (a local file), else computed.
    ``prefill_tokens``: most tokens one forward pass takes (llama.cpp: its
    batch size); default all of them (``context`` x ``batch``). ``logit_rows``:
    rows of logits held (default one a sequence)."""
    tokens = context or arch.context_length
    q = quant(quant_name)
    w = weights if weights is not None else weights_bytes(arch, parameters, q)
    prefill = prefill_tokens or tokens * batch
    return Plan(
        weights=w,
        kv_cache=kv_cache_bytes(arch, tokens, batch, kv_dtype),
        activations=activation_bytes(arch, prefill, logit_rows or batch),
        overhead=int(w * OVERHEAD_FRACTION),
        parameters=parameters, quant=q.name, context=tokens, batch=batch,
        kv_dtype=kv_dtype, kv_bytes_per_token=kv_bytes_per_token(arch, kv_dtype),
    )


# -- will it fit ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """Memory to run on: GPU memory (all GPUs together) and CPU RAM, in bytes."""

    gpu: int = 0
    ram: int = 0
    gpu_label: str = ""
    ram_label: str = ""


FITS, OFFLOAD, NO_FIT = "fits", "fits with CPU offload", "won't fit"


def verdict(p: Plan, budget: Budget) -> str:
    """fits / fits with CPU offload (GPU given, the rest in RAM) / won't fit."""
    if budget.gpu:
        if p.total <= budget.gpu:
            return FITS
        return OFFLOAD if p.total <= budget.gpu + budget.ram else NO_FIT
    return FITS if p.total <= budget.ram else NO_FIT


def fits_alone(p: Plan, budget: Budget) -> bool:
    """Fits on the GPU if one is given, else in RAM (no offload)."""
    return p.total <= (budget.gpu or budget.ram)


def largest_context(arch: Architecture, parameters: int, budget: Budget, *,
                    quant_name: str = "bf16", batch: int = 1, kv_dtype: str = "f16",
                    weights: int | None = None) -> int:
    """The longest context (a multiple of 256, up to the model's) that fits
    without offload; 0 if not even 256 tokens do."""
    lo, hi = 0, arch.context_length // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = plan(arch, parameters, quant_name=quant_name, context=mid * 256, batch=batch,
                 kv_dtype=kv_dtype, weights=weights)
        lo, hi = (mid, hi) if fits_alone(p, budget) else (lo, mid - 1)
    return lo * 256


def best_quant_that_fits(arch: Architecture, parameters: int, budget: Budget,
                         ladder: tuple[str, ...], *, context: int | None = None,
                         batch: int = 1, kv_dtype: str = "f16") -> Plan | None:
    """The most precise quantisation in ``ladder`` that fits without offload."""
    for name in ladder:
        p = plan(arch, parameters, quant_name=name, context=context, batch=batch,
                 kv_dtype=kv_dtype)
        if fits_alone(p, budget):
            return p
    return None


# What the planner suggests: transformers/vLLM quantisations, or GGUF types.
GPU_LADDER = ("bf16", "int8", "int4")
GGUF_LADDER = ("fp16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")


# -- sizes ---------------------------------------------------------------------

_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """"80GB", "24 GiB", "512MB", "8x80GB" (eight GPUs) -> bytes. A bare
    number is GB. ValueError if it is not a size."""
    s = text.strip().lower().replace(" ", "")
    count = 1
    if "x" in s:
        n, _, s = s.partition("x")
        count = int(n)
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    if unit not in _UNITS or not number or count < 1:
        raise ValueError(text)
    value = float(number) * _UNITS[unit] * count
    if value <= 0:
        raise ValueError(text)
    return int(value)


def gb(n: int | float) -> str:
    """Bytes as decimal GB with one decimal ("48.3 GB"); small sizes in MB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def machine_ram() -> int:
    """This machine's physical memory in bytes (8 GiB if it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8 << 30
