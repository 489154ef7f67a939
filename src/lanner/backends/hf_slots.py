"""A KV cache with one slot per sequence, for decoding several requests in one
forward pass of a Hugging Face model.

Each layer keeps keys and values as ``(rows, kv_heads, capacity, head_dim)``:
row ``r`` is one sequence, a token at position ``p`` lives in column ``p``. A
forward pass is *bound* first to the rows it runs and their positions
(``bind``); the model's attention layers then call ``update`` as they would on
transformers' own caches, which writes the new keys/values in place and hands
back every row's first ``kv_len`` columns. Positions past a row's own length
are hidden by the 4D mask from ``causal_mask``, so sequences of any lengths
share one pass, and a row's attention reads exactly what it would alone.

Storage grows on demand (rows up to what is bound, columns in ``_STEP``
blocks) and is copied on growth; ``move`` copies a row when a scheduler
compacts its live rows to the front, so a pass over them reads plain views.
"""

from __future__ import annotations

from typing import Any

import torch

_STEP = 256  # columns added at a time: a copy every 256 positions, not every token


class SlotCache:
    """Duck-types the parts of ``transformers.Cache`` a decoder layer calls."""

    is_compileable = False
    is_sliding = False

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # rows allocated
        self.capacity = 0  # columns allocated
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._write_rows = torch.zeros(0, dtype=torch.long)
        self._positions = torch.zeros(0, 0, dtype=torch.long)
        self._kv_len = 0

    def bind(self, rows: list[int], positions: torch.Tensor, kv_len: int) -> None:
        """The next forward runs ``rows`` (B) at ``positions`` (B, T) and reads
        ``kv_len`` columns. A pass of several tokens (T > 1) runs one row."""
        if positions.shape[1] > 1 and len(rows) != 1:
            raise ValueError("a multi-token pass runs one sequence")
        self._grow(max(rows) + 1, kv_len)
        first = rows[0]
        contiguous = rows == list(range(first, first + len(rows)))
        device = positions.device
        self._write_rows = torch.tensor(rows, device=device)
        self._rows = slice(first, first + len(rows)) if contiguous else self._write_rows
        self._positions = positions
        self._kv_len = kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states``/``value_states`` (B, H, T, D) of the bound rows;
        return their keys and values (B, H, kv_len, D)."""
        if layer_idx == len(self.keys):
            self._allocate(key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if key_states.shape[2] == 1:  # one token per row, each at its own position
            columns = self._positions[:, 0]
            keys[self._write_rows, :, columns] = key_states[:, :, 0]
            values[self._write_rows, :, columns] = value_states[:, :, 0]
        else:
            row, start = int(self._write_rows[0]), int(self._positions[0, 0])
            end = start + key_states.shape[2]
            keys[row, :, start:end] = key_states[0]
            values[row, :, start:end] = value_states[0]
        if isinstance(self._rows, slice):
            return keys[self._rows, :, : self._kv_len], values[self._rows, :, : self._kv_len]
        return (keys.index_select(0, self._rows)[:, :, : self._kv_len],
                values.index_select(0, self._rows)[:, :, : self._kv_len])

    def move(self, source: int, target: int) -> None:
        """Copy row ``source`` into row ``target`` (a scheduler compacting rows)."""
        for layer in (*self.keys, *self.values):
            layer[target] = layer[source]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - int(self._positions.shape[1]) if self._positions.numel() else 0

    def get_max_length(self) -> int:
        return -1

    def __len__(self) -> int:
        return len(self.keys)

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.rows, key_states.shape[1], self.capacity)
        self.keys.append(key_states.new_zeros(*shape, key_states.shape[3]))
        self.values.append(value_states.new_zeros(*shape, value_states.shape[3]))

    def _grow(self, rows: int, columns: int) -> None:
        if rows <= self.rows and columns <= self.capacity:
            return
        rows = max(rows, self.rows)
        capacity = max(self.capacity, -(-columns // _STEP) * _STEP)
        for layers in (self.keys, self.values):
            for i, old in enumerate(layers):
                new = old.new_zeros(rows, old.shape[1], capacity, old.shape[3])
                new[: old.shape[0], :, : old.shape[2]] = old
                layers[i] = new
        self.rows, self.capacity = rows, capacity


def causal_mask(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, kv_len): the token at ``positions[b, t]`` sees
    columns 0..positions[b, t] of its row and nothing after."""
    columns = torch.arange(kv_len, device=positions.device)
    allowed = columns[None, None, None, :] <= positions[:, None, :, None]
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def supports_slots(config: Any, n_ctx: int) -> bool:
    """Whether a model's attention is plain causal attention over every past
    token, which one 4D mask describes for all its layers: no sliding window
    that a context of ``n_ctx`` would reach, no per-layer attention types, no
    ALiBi. Other models decode one request at a time on transformers' cache."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        return False
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window < n_ctx and getattr(config, "use_sliding_window", True):
        return False
    return not (getattr(config, "alibi", False) or getattr(config, "is_encoder_decoder", False))
