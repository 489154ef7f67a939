"""Choosing the next token from logits, as small composable functions (after mlx-lm).

Two kinds of step, applied in this order:

- *logits processors* ``(logits (V,), tokens (T,)) -> logits`` see the token
  history: repetition penalty (Hugging Face semantics, over prompt and
  completion) and presence/frequency penalties (OpenAI semantics, over the
  completion only);
- a *sampler* ``logits (V,) -> token id (0-d tensor)``: greedy argmax at
  temperature 0, else temperature, then top-k, top-p and min-p masks (the order
  Hugging Face's ``generate`` uses), then a draw from the given generator.
  The draw runs over the tokens the masks keep, not the whole vocabulary:
  ``torch.multinomial`` over SmolLM2's 49152 logits took 1.3 ms and the top-p
  sort 0.8 ms on the 2-core VM, 5.5 ms a token with the defaults (top-k 40),
  which at 8 streams was a third of a batched step. With top-k set the masks
  run on the k best only (same kept set and probabilities, unless logits tie at
  the k-th, which takes the full path).

All functions take and return float32 tensors on the model's device and never
modify their input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lanner.engine.types import Request

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[torch.Tensor], torch.Tensor]


def apply_repetition_penalty(
    logits: torch.Tensor, tokens: torch.Tensor, penalty: float
) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor``: every token already seen has its
    logit divided by ``penalty`` if positive, multiplied by it if negative."""
    if penalty == 1.0 or tokens.numel() == 0:
        return logits
    seen = torch.gather(logits, 0, tokens)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(0, tokens, seen)


def apply_presence_frequency(
    logits: torch.Tensor, tokens: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI penalties: ``logit -= frequency * count + presence * (count > 0)``."""
    if (presence == 0.0 and frequency == 0.0) or tokens.numel() == 0:
        return logits
    counts = torch.bincount(tokens, minlength=logits.shape[-1]).to(logits.dtype)  # (V,)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits (ties with the k-th kept too); 0 = off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability
    sums to at least ``p`` (always at least one token); 1.0 = off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of better tokens
    drop_sorted = mass_before >= p
    drop_sorted[0] = False
    drop = drop_sorted.scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``p`` times the top token's; 0 = off."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


def make_logits_processors(request: Request, prompt_len: int) -> list[LogitsProcessor]:
    """The history-dependent steps a request asks for (often none).

    ``tokens`` passed to each processor is the whole sequence so far, prompt
    first; ``prompt_len`` tells where the completion starts.
    """
    processors: list[LogitsProcessor] = []
    if request.repetition_penalty != 1.0:
        penalty = request.repetition_penalty
        processors.append(lambda logits, tokens: apply_repetition_penalty(logits, tokens, penalty))
    if request.presence_penalty or request.frequency_penalty:
        presence, frequency = request.presence_penalty, request.frequency_penalty
        processors.append(
            lambda logits, tokens: apply_presence_frequency(
                logits, tokens[prompt_len:], presence, frequency
            )
        )
    return processors


def make_sampler(
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Sampler:
    """A function from logits (V,) to the chosen token id (0-d int64 tensor).

    Temperature 0 is greedy (argmax; the masks cannot change it). Otherwise the
    draw uses ``generator``, so a seeded generator gives reproducible tokens.
    """
    if temperature == 0.0:
        return lambda logits: torch.argmax(logits, dim=-1)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        if 0 < top_k < logits.shape[-1]:
            values, ids = torch.topk(logits, top_k + 1)  # sorted, best first
            if values[top_k] < values[top_k - 1]:  # no tie at the k-th: the k best are the set
                kept = min_p_mask(top_p_mask(values[:top_k] / temperature, top_p), min_p)
                return ids[_draw(kept, generator)]
        scaled = logits / temperature
        masked = min_p_mask(top_p_mask(top_k_mask(scaled, top_k), top_p), min_p)
        support = torch.nonzero(masked > float("-inf"))[:, 0]
        return support[_draw(masked[support], generator)]

    return sample


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """An index drawn with probability softmax(``logits``) (-inf: never)."""
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]


def sampler_for(request: Request, generator: torch.Generator | None) -> Sampler:
    """``make_sampler`` with a request's settings."""
    return make_sampler(
        request.temperature, request.top_p, request.top_k, request.min_p, generator
    )


def apply_processors(
    logits: torch.Tensor, tokens: torch.Tensor, processors: Sequence[LogitsProcessor]
) -> torch.Tensor:
    """Run ``processors`` in order."""
    for process in processors:
        logits = process(logits, tokens)
    return logits
