"""One decode step of a Llama-family model without transformers' per-layer
machinery, for the batch scheduler's one-token passes.

A 135M model's decode step spends ~20% of its time outside the matrix
products at one thread: module calls, keyword plumbing, config look-ups, mask
and cache bookkeeping, about 400 Python-level calls per token. ``decode_step``
runs the same operations as ``LlamaForCausalLM.forward`` on the slot cache,
in the same order and dtypes (RMSNorm in float32, rotary embedding from the
model's own ``rotary_emb``, SDPA called as transformers calls it for one query
token with grouped KV heads), so its logits equal the model's forward bit for
bit (a test checks). Rows of different lengths need the 4D mask; when every
row sees every column (one stream, always) attention runs mask-free with
``enable_gqa``, as in ``generate``'s steps: in bfloat16 the masked kernel
differs from that in the last bit, enough to flip near-ties (4 of 5 prompts
parted from ``generate`` within 128 greedy tokens on SmolLM2 before this).

Only for model types whose decoder layer is exactly Llama's (``SUPPORTED``,
a look-up by ``config.model_type``); prompt passes keep the model's own
forward. With LoRA adapters loaded (``modules_only``) every product goes
through the modules themselves, which peft wraps, never through
``hf_weights``' stacked or packed copies of the base weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lanner.backends.hf_slots import SlotCache
from lanner.backends.hf_weights import rows_linear, stacked

SUPPORTED = frozenset({"llama"})
"""Model types whose decoder layer is pre-norm RMSNorm, rotary q/k, Llama's
attention (no q/k norms) and a gated MLP, as ``decode_step`` computes it."""


def supports(model: Any) -> bool:
    """Whether ``decode_step`` computes exactly what ``model``'s forward does."""
    config = model.config
    return (config.model_type in SUPPORTED and not getattr(config, "pretraining_tp", 1) > 1
            and config._attn_implementation == "sdpa")


def decode_step(model: Any, ids: torch.Tensor, positions: torch.Tensor, cache: SlotCache,
                mask: torch.Tensor | None, *, modules_only: bool = False) -> torch.Tensor:
    """Float32 logits (B, V) of ``ids`` (B, 1) at ``positions`` (B, 1); the
    cache is bound to the rows already; ``mask`` (B, 1, 1, kv_len) is additive,
    None when every row sees all ``kv_len`` columns (rows of one length: then
    attention runs as in ``generate``'s steps, mask-free, and in bfloat16 its
    outputs equal generate's where the masked kernel's differ in the last bit).
    ``modules_only``: every product through its module's call (adapters loaded)."""
    inner = model.model
    several = ids.shape[0] > 1
    linear = _call if modules_only else rows_linear if several else _forward
    hidden = inner.embed_tokens(ids)  # (B, 1, H)
    cos, sin = inner.rotary_emb(hidden, positions)  # (B, 1, D)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, D): broadcast over heads
    for index, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = _rms_norm(hidden, layer.input_layernorm)
        hidden = hidden + linear(attn.o_proj, _attention(attn, x, cos, sin, cache, mask, index,
                                                          several, linear, modules_only))
        x = _rms_norm(hidden, layer.post_attention_layernorm)
        mlp = layer.mlp
        gate_up_t = None if modules_only else getattr(mlp, "gate_up_t", None)  # hf_weights'
        sizes = (mlp.gate_proj.out_features, mlp.up_proj.out_features)
        both = None if modules_only else stacked(
            mlp, ("gate_up_rows", "gate_up_packed") if several else ("gate_up_packed",), x, sizes)
        if gate_up_t is not None and not several:
            gate, up = (x @ gate_up_t).split(sizes, dim=-1)
        elif both is not None:
            gate, up = both
        else:
            gate, up = linear(mlp.gate_proj, x), linear(mlp.up_proj, x)
        hidden = hidden + linear(mlp.down_proj, mlp.act_fn(gate) * up)
    hidden = _rms_norm(hidden, inner.norm)
    return linear(model.lm_head, hidden[:, -1]).float()


def _forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    return module.forward(x)  # type: ignore[no-any-return]


def _call(module: Any, x: torch.Tensor) -> torch.Tensor:
    return module(x)  # type: ignore[no-any-return]


def _rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """``LlamaRMSNorm.forward``, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)  # type: ignore[no-any-return]


def _attention(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: SlotCache, mask: torch.Tensor | None, index: int,
               several: bool, linear: Any, modules_only: bool) -> torch.Tensor:
    """``LlamaAttention.forward`` for one token per row: (B, 1, H) -> (B, 1, H)."""
    batch, dim = x.shape[0], attn.head_dim
    qkv_t = None if modules_only else getattr(attn, "qkv_t", None)  # hf_weights' fused layouts
    sizes = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    three = None if modules_only else stacked(
        attn, ("qkv_rows", "qkv_packed") if several else ("qkv_packed",), x, sizes)
    if qkv_t is not None and not several:
        q, k, v = (x @ qkv_t).split(sizes, dim=-1)
    elif three is not None:
        q, k, v = three
    else:
        q, k, v = linear(attn.q_proj, x), linear(attn.k_proj, x), linear(attn.v_proj, x)
    q = q.view(batch, 1, -1, dim).transpose(1, 2)  # (B, nh, 1, D)
    k = k.view(batch, 1, -1, dim).transpose(1, 2)  # (B, nkv, 1, D)
    v = v.view(batch, 1, -1, dim).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k, v = cache.update(k, v, index)  # (B, nkv, kv_len, D)
    groups = attn.num_key_value_groups
    if mask is None:  # as transformers runs a cache without padding (generate's steps)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=groups > 1)
        return out.transpose(1, 2).reshape(batch, 1, -1)
    if groups > 1:  # as transformers' sdpa_attention_forward packs one query token
        q = q.reshape(batch, -1, groups, dim)  # (B, nkv, groups, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    out = out.reshape(batch, -1, 1, dim).transpose(1, 2)  # (B, 1, nh, D)
    return out.reshape(batch, 1, -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
