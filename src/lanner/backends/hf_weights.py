"""Weight layouts that make a CPU decode step faster, set once at load.

A decode step multiplies one token's activations by every weight matrix (a
matrix-vector product per linear layer), so its time is the time to stream
the weights from memory. PyTorch's ``F.linear`` on the (out, in) row-major
weights does that well below one core's read bandwidth (~20 GB/s on the 2-core
VM): ~10-11 GB/s in float32, ~5-6 in bfloat16. Measured there on SmolLM2's
shapes, one thread:

- float32: the same values stored column-major (``weight.t().contiguous().t()``,
  so ``F.linear`` runs ``x @ W^T`` on a row-major ``W^T``) stream at ~12-15
  GB/s, the 49152-row output layer ~1.8x faster. The weight keeps its shape
  and its memory size; the sums run in another order (greedy tokens still
  equal HF ``generate``'s on the benchmark's prompts: checked there). The
  query/key/value weights of a layer sit side by side in one matrix (and
  gate/up), so ``hf_decode`` runs one product for them: ~1.18x on the layers'
  products, bit-identical outputs.
- float32 steps of several rows (a batch of streams): the column-major
  products cost ~3x one row's at 8 rows on two cores (arithmetic-bound);
  oneDNN's product on a copy packed for 8 rows (``packed_rows``, made only
  while it takes at most half of the memory available) ran 8 rows of SmolLM2
  at 2x the tokens per second (41 -> 81), the same greedy tokens; one row
  stays on the column-major weights, which read faster alone. The copies of
  q/k/v and of gate/up are stacked, one product each (``stacked``).
- bfloat16: oneDNN with the weight reordered into its blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU freezing
  uses) runs ~1.3-1.9x faster with bit-identical outputs (both accumulate in
  float32 and round once). The module gets a ``forward`` that reads that
  packed copy: one more copy of the linear weights in memory, so it is made
  only while the copy takes at most half the memory the system has available
  (a 7B model's 13 GB would not be doubled on a 24 GB machine); otherwise the
  weights stay as loaded. Where twice that fits, q/k/v and gate/up also get
  one stacked packed copy each (``qkv_packed``, ``gate_up_packed``), which
  ``hf_decode`` multiplies once (the modules keep their own copies for
  prompt passes and adapters).
- bfloat16 where oneDNN has no bfloat16 path (AVX2 CPUs): each module gets a
  ``forward`` through ``hf_kernels.bf16_linear``, PyTorch's own sums bit for
  bit, faster (one token's products ~1.6x, a prompt's ~6x); no extra memory.

Prompt passes (many tokens at once) run at the same speed either way, except
on the bfloat16 kernel, which is faster for them too. Modules
keep their ``weight``: peft adapters wrap a module and call it, so LoRA still
applies; nothing in Lanner changes base weights after loading.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lanner.backends import hf_kernels


def available_memory() -> int | None:
    """Bytes of memory the system has available now (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def prepare(model: Any) -> str | None:
    """Lay out every plain ``nn.Linear`` of a CPU model for fast decode steps;
    the layout used ("column-major", "column-major+onednn-rows",
    "onednn-packed", "bf16-kernel") or None (left as loaded: another device or
    dtype, no room for the packed copy, or no bfloat16 path but PyTorch's)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type != "cpu":
        return None
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    copy = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    room = available_memory()
    if weight.dtype == torch.float32:
        rows_copy = (torch.backends.mkldnn.is_available() and room is not None
                     and copy <= room // 2)
        if rows_copy:  # before the views below
            fused: set[Any] = set()
            for module in model.modules():
                fused |= _pack_group(module, "qkv_rows", QKV, ROWS_HINT)
                fused |= _pack_group(module, "gate_up_rows", GATE_UP, ROWS_HINT)
            for module in linears:
                if module not in fused:
                    module.packed_rows = _reorder(module.weight.detach(), ROWS_HINT)
        for module in model.modules():  # fused groups first: one copy each
            _fuse(module, "qkv_t", QKV)
            _fuse(module, "gate_up_t", GATE_UP)
        for module in linears:
            if module.weight.stride(0) != 1:  # not laid out yet (a tied weight may be)
                module.weight.data = module.weight.data.t().contiguous().t()
        return "column-major+onednn-rows" if rows_copy else "column-major"
    if (weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and room is not None and copy <= room // 2):
        if 2 * copy <= room // 2:  # room for the stacked copies too
            for module in model.modules():
                _pack_group(module, "qkv_packed", QKV, 1)
                _pack_group(module, "gate_up_packed", GATE_UP, 1)
        for module in linears:
            module.packed_weight = _reorder(module.weight.detach(), 1)
            module.forward = _packed_forward.__get__(module)  # type: ignore[method-assign]
        return "onednn-packed"
    if weight.dtype == torch.bfloat16 and hf_kernels.bf16_linear() is not None:
        covered = [m for m in linears if m.bias is None and m.in_features % 16 == 0
                   and m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous()]
        for module in covered:
            module.forward = _kernel_forward.__get__(module)  # type: ignore[method-assign]
        return "bf16-kernel" if covered else None
    return None


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _group(parent: Any, children: tuple[str, ...]) -> list[Any] | None:
    """``parent``'s children named ``children``, when all are plain bias-free
    linears (not subclasses: adapters wrap them), else None."""
    found: list[Any] = [getattr(parent, child, None) for child in children]
    linears = [m for m in found if type(m) is torch.nn.Linear and m.bias is None]
    return linears if len(linears) == len(children) else None


def _reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A oneDNN copy of ``weight`` packed for products of ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)


def _pack_group(parent: Any, name: str, children: tuple[str, ...], rows: int) -> set[Any]:
    """One oneDNN copy, packed for ``rows`` rows, of ``parent``'s bias-free
    linear ``children`` stacked (``parent.<name>``): one product for all of
    them in a decode step (fewer, larger calls; ~150 fewer a step on
    SmolLM2). The children it covers."""
    linears = _group(parent, children)
    if linears is None:
        return set()
    setattr(parent, name, _reorder(torch.cat([m.weight.detach() for m in linears]), rows))
    return set(linears)


def _fuse(parent: Any, name: str, children: tuple[str, ...]) -> None:
    """Store the column-major weights of ``parent``'s bias-free linear
    ``children`` side by side as one row-major (in, sum of outs) matrix,
    ``parent.<name>``, each child's ``weight`` a view of its columns: one
    product for all of them in ``hf_decode`` (fewer, larger reads; the same
    outputs bit for bit, as measured), no extra memory."""
    linears = _group(parent, children)
    if linears is None:
        return
    fused = torch.cat([m.weight.data.t() for m in linears], dim=1)  # (in, sum of outs)
    start = 0
    for module in linears:
        module.weight.data = fused[:, start : start + module.out_features].t()
        start += module.out_features
    setattr(parent, name, fused)


ROWS_HINT = 8
"""Rows the float32 oneDNN copy is packed for (``packed_rows``)."""


def rows_linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a step of several rows: through the float32 copy
    packed for oneDNN where there is one (8 rows of SmolLM2 ran at 2x the
    tokens per second of the column-major weights), else the module."""
    packed = getattr(module, "packed_rows", None)
    if packed is None:
        return module.forward(x)  # type: ignore[no-any-return]
    bias = None if module.bias is None else module.bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def stacked(parent: Any, names: tuple[str, ...], x: torch.Tensor, sizes: tuple[int, ...]
            ) -> tuple[torch.Tensor, ...] | None:
    """The outputs of the linears stacked in the first of ``parent``'s copies
    ``names`` it has (``_pack_group``), split by ``sizes``; None where it has none."""
    for name in names:
        packed = getattr(parent, name, None)
        if packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            return tuple(out.split(sizes, dim=-1))
    return None


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return torch.nn.functional.linear(x, self.weight, self.bias)  # oneDNN's op has no backward
    bias = None if self.bias is None else self.bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")


def _kernel_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    linear = hf_kernels.bf16_linear()
    if (linear is None or x.dtype != torch.bfloat16 or not self.weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        return torch.nn.functional.linear(x, self.weight, self.bias)  # the kernel has no backward
    return linear(x, self.weight)
