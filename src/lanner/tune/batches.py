"""Which rows each optimizer step trains on, and rows -> tensors.

A micro-batch whose rows begin with the same untrained prompt (a system prompt,
a schema, instructions) is laid out as one sequence: that prompt once, then
each row's rest, attending to the prompt and to itself (a 4D mask, positions
continuing after the prompt). The model computes the prompt once instead of
once a row; the loss and the gradients are those of the padded rows.

The order is a function of the seed and the step alone (a seeded permutation
per epoch), so a resumed run, and a run split over several processes, trains
on exactly the rows an uninterrupted single-process run would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lanner.errors import InvalidRequest
from lanner.tune.dataset import IGNORE, Example


@dataclass(frozen=True)
class Plan:
    """Optimizer step -> the rows of its global batch, and of each micro-batch.

    A global batch is ``batch_size x accumulation x processes`` rows; an epoch
    is as many whole global batches as the rows fill (the few rows left over
    are left out of that epoch; the next epoch's order differs).
    """

    n_rows: int
    batch_size: int
    accumulation: int
    processes: int
    seed: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise InvalidRequest("batch_size", f"the training data has {self.n_rows} rows "
                                 f"(packed rows with packing), fewer than one optimizer step's "
                                 f"{self.global_batch} (batch_size x gradient_accumulation_steps"
                                 " x processes)")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.processes

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.global_batch

    def rows(self, step: int) -> list[int]:
        """The rows of optimizer step ``step`` (0-based), all processes'."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        return order[k * self.global_batch : (k + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Process ``rank``'s micro-batches of step ``step``: micro-batch ``m`` of
        rank ``r`` is the global batch's slice number ``m x processes + r``, so a
        single process with more accumulation sees the very same slices."""
        rows, size = self.rows(step), self.batch_size
        slices = [rows[i * size : (i + 1) * size] for i in range(len(rows) // size)]
        return slices[rank :: self.processes]

    def _order(self, epoch: int) -> list[int]:
        return _epoch_order(self.n_rows, self.seed, epoch)


@functools.lru_cache(maxsize=2)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):  # one permutation per epoch, drawn in turn
        torch.randperm(n_rows, generator=generator)
    return torch.randperm(n_rows, generator=generator).tolist()


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T): the next token where it is trained, else IGNORE
    allowed: torch.Tensor | None = None
    """(B, 1, T, T) bool, which tokens each attends to; None: causal per row
    (or per packed example, from the positions)."""

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.position_ids.to(device),
                     self.targets.to(device),
                     None if self.allowed is None else self.allowed.to(device))


def collate(rows: list[Example], pad_id: int, *, share_prefix: bool = True) -> Batch:
    """The rows as tensors: sharing their common untrained prompt where it
    makes at least half of a row on average (``shared_prefix``), otherwise
    right-padded to the longest."""
    prefix = shared_prefix(rows) if share_prefix else 0
    return collate_shared(rows, prefix) if prefix else _collate_padded(rows, pad_id)


def shared_prefix(rows: list[Example]) -> int:
    """How many leading tokens the rows can share: the same ids in every row,
    none of them (nor the token after them) trained, and each row longer.
    0 for one row, for packed rows, or when the prompt is under half of the
    mean row length (then one long sequence's attention costs more than the
    prompt saves)."""
    if len(rows) < 2 or any(row.position_ids is not None for row in rows):
        return 0
    first = rows[0].input_ids
    common = min(len(row.input_ids) for row in rows) - 1
    for row in rows[1:]:
        n = 0
        while n < common and row.input_ids[n] == first[n]:
            n += 1
        common = n
    for row in rows:  # labels[1..L] must be untrained: position t's target is label t + 1
        trained = next((t for t, label in enumerate(row.labels) if t and label != IGNORE),
                       len(row.labels))
        common = min(common, trained - 1)
    mean = sum(len(row.input_ids) for row in rows) / len(rows)
    return common if common >= 1 and 2 * common >= mean else 0


def collate_shared(rows: list[Example], prefix: int) -> Batch:
    """One sequence: the rows' first ``prefix`` tokens (the same in each, none
    trained), then each row's rest (a 4D mask)."""
    tails = [row.input_ids[prefix:] for row in rows]
    width = prefix + sum(len(t) for t in tails)
    allowed = torch.zeros(width, width, dtype=torch.bool)
    allowed[:prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool).tril()
    ids, positions = list(rows[0].input_ids[:prefix]), list(range(prefix))
    targets = [IGNORE] * prefix  # untrained by construction
    start = prefix
    for row, tail in zip(rows, tails, strict=True):
        end = start + len(tail)
        allowed[start:end, :prefix] = True
        allowed[start:end, start:end] = torch.ones(end - start, end - start,
                                                   dtype=torch.bool).tril()
        ids += tail
        positions += range(prefix, len(row.input_ids))
        targets += [*row.labels[prefix + 1 :], IGNORE]
        start = end
    return Batch(torch.tensor([ids]), torch.tensor([positions]), torch.tensor([targets]),
                 allowed[None, None])


def _collate_padded(rows: list[Example], pad_id: int) -> Batch:
    """Rows right-padded to the longest. A pad's position continues its row's
    count, so an unpacked batch stays one sequence per row (plain causal
    attention) and a real token never attends to a pad, which comes after it."""
    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.empty((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        own = row.position_ids if row.position_ids is not None else range(n)
        positions[i, :n] = torch.tensor(list(own))
        last = int(positions[i, n - 1])
        positions[i, n:] = torch.arange(last + 1, last + 1 + width - n)
        targets[i, : n - 1] = torch.tensor(next_token_targets(row.labels, list(own)))
    return Batch(ids, positions, targets)


def next_token_targets(labels: list[int], positions: list[int]) -> list[int]:
    """Position t's target is label t+1, except where the next token starts a
    new packed example (its position is 0): nothing is predicted across."""
    return [IGNORE if positions[t + 1] == 0 else labels[t + 1] for t in range(len(labels) - 1)]


def trained_count(row: Example) -> int:
    """The targets a row trains (its labels but the first of each example)."""
    positions = row.position_ids if row.position_ids is not None else range(len(row.labels))
    return sum(label != IGNORE and pos != 0 for label, pos in zip(row.labels, positions,
                                                                  strict=True))
