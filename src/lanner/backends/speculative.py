"""Speculative decoding for the llama.cpp backend: cheap drafts, checked in one pass.

A generating sequence proposes a few tokens (a *draft*) and feeds them after its
last real token in the same ``llama_decode``; the target model's logits at every
draft position come back at once. The request's own sampler chain then samples
row after row: while the sampled token equals the draft's, the draft's KV cell is
already right and the next row is valid; at the first difference the sampled
token is kept, the rest of the draft is dropped from the KV cache, and after a
fully accepted draft the last row gives one more token for free.

Drafters (``--speculative``):

- ``ngram`` (prompt lookup): the tokens that followed an earlier occurrence
  of the sequence's last 3 or 2 tokens, in the prompt or the text so far
  (where the latest accepted copy left off, else the first in the prompt,
  else the latest: ``NgramIndex``). Costs nothing to propose; wins when the
  answer quotes its input.
  A match that runs into the text's end is copied on as a repeat (a list's
  recurring pattern, a model stuck in a loop: the next rounds are drafted
  whole; replayed on the benchmark's answers, accepted tokens per open-ended
  draft went from 1.8 to 5.6).
- ``draft:MODEL``: a smaller model with the same vocabulary proposes its greedy
  continuation (``DraftModel``).

Why the output does not change: both drafters are deterministic, so the draft
distribution q is a point mass on the proposed token d. The standard rule
(accept with min(1, p(d)/q(d)) = p(d), else resample from the normalised
residual max(0, p - q), which is p without d) emits d with probability p(d) and
any other x with probability p(x): exactly "sample x from p, accept the draft
when x == d". That is what the chain does, with its penalties, truncation,
temperature and seeded draw, so greedy output is token-identical to plain
decoding and sampled output has the plain sampler's distribution (with the same
seed it draws the same numbers in the same order).
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lanner.errors import InvalidRequest

MODES = ("ngram", "off")
"""Values of ``--speculative`` besides ``draft:MODEL``."""

NGRAM_SIZES = (3, 2)
"""Suffix lengths tried, longest first (prompt lookup)."""
K_MAX = 16
"""Most draft tokens per sequence and step."""
SPEC_BATCH_TOKENS = 24
"""Drafts fill a step's batch up to this many tokens at most; within that, as
many as pay for themselves (``allocate``): none once the batch is full."""
SPEC_MAX_STREAMS = 2
"""No drafts while more sequences than this generate. Measured on the 2-core
VM with smollm2 F16: 8 concurrent streams through `lanner serve` ran at
0.83-0.96x of plain decoding with drafts allocated by step costs (in one
process without the server, 1.06-1.11x), so a full batch decodes plainly."""
MATCH_BUCKETS = (2, 4, 8)
"""How long a draft's n-gram match runs back decides how likely it is right
(prompt lookup on the bundled model, 1,000 drafts: a 2-token match's next
token was right 63% of the time, 3-4 tokens 80%, 5-8 88%, longer 97%): match
lengths up to 2, 3-4, 5-8 and longer are counted apart."""
PRIOR_BY_BUCKET = (0.6, 0.75, 0.85, 0.93)
"""Each bucket's chance before anything is seen (a draft model's drafts all
count in the first)."""
PRIOR_WEIGHT = 4.0
"""Draft tokens the prior counts as; a request's own counts are weighed
against the model's counts so far (``AcceptStats``) with the same weight."""
OFF_AFTER_TRIALS, OFF_BELOW_RATE = 32, 0.2
"""A request stops drafting once this many draft tokens were checked and
fewer than this share were right."""
PRIOR_STEP_SLOPE = 0.1
"""Before a step size is measured, each token past the first is taken to add
this share of a one-token step (``StepCosts.cost``). Measured on the 2-core
VMs, an 8-token step of smollm2 cost 1.4-2.0x a one-token step (packed BF16;
F16 on an AVX2 host 1.55x): 0.06-0.14 a token. Measured costs replace it."""
MATCH_MAX = 16
"""Longest match length measured (all longer ones share the last bucket)."""


def match_bucket(length: int) -> int:
    """The bucket of a match ``length`` tokens long."""
    for i, most in enumerate(MATCH_BUCKETS):
        if length <= most:
            return i
    return len(MATCH_BUCKETS)


def parse(value: str) -> tuple[str, str | None]:
    """``"ngram"`` -> ("ngram", None); ``"draft:NAME"`` -> ("draft", "NAME")."""
    if value.startswith("draft:"):
        name = value.removeprefix("draft:")
        if not name:
            raise InvalidRequest("speculative", "draft: needs a model, e.g. draft:smollm2-q4_1")
        return "draft", name
    if value not in MODES:
        raise InvalidRequest("speculative",
                             f"must be ngram, draft:MODEL or off, got {value!r}")
    return value, None


class NgramIndex:
    """Where each short n-gram of a growing token list occurred, and where the
    latest accepted copy left off in its source.

    ``ends[ngram]`` lists the positions just after its occurrences that have a
    token after them, in order, so a lookup of the list's own suffix finds
    earlier places. Of several, the draft comes from the first one at or after
    ``source`` (a copy goes on where it left off: a quoted passage, a list
    rewritten item by item, a function returned with one line changed), else
    from the first one in the prompt (a copy starts at its beginning), else
    from the latest. Replayed on the benchmark's grounded answers (an oracle
    that knows each draft's outcome): taking the latest occurrence reached
    1.70x, this 1.81x, the best occurrence at every step 1.89x.
    """

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.n_prompt = len(tokens)
        """Tokens there at the start: the prompt."""
        self.source: int | None = None
        """Where the latest accepted copy's next source token is (None: no copy yet)."""
        self._ends: dict[tuple[int, ...], list[int]] = {}
        self._done = 0
        self._last_end: int | None = None
        self._update()

    def append(self, token: int) -> None:
        self.tokens.append(token)

    def propose(self, k: int) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed the longest suffix seen before
        (repeating where they reach the list's end), and how many tokens
        before them match the list's end (up to ``MATCH_MAX``)."""
        self._update()
        t = self.tokens
        self._last_end = None
        for n in NGRAM_SIZES:
            if len(t) < n:
                continue
            ends = self._ends.get(tuple(t[-n:]))
            if ends:
                end = self._choose(ends)
                length = n
                while (length < MATCH_MAX and end - 1 - length >= 0
                       and t[end - 1 - length] == t[-1 - length]):
                    length += 1
                draft = t[end:end + k]
                period = len(t) - end  # how far back the match is
                while len(draft) < k:  # it runs into the end: the text repeats every `period`
                    draft.append(draft[len(draft) - period])
                self._last_end = end
                return draft, length
        return [], 0

    def accepted(self, n: int) -> None:
        """The latest draft's first ``n`` tokens were right: its copy goes on there."""
        if n > 0 and self._last_end is not None:
            self.source = self._last_end + n

    def _choose(self, ends: list[int]) -> int:
        if self.source is not None:
            at = bisect.bisect_left(ends, self.source)
            if at < len(ends):
                return ends[at]
        return ends[0] if ends[0] < self.n_prompt else ends[-1]

    def _update(self) -> None:
        t = self.tokens
        for end in range(max(self._done, 1), len(t)):  # n-grams ending before t[end]
            for n in NGRAM_SIZES:
                if end >= n:
                    self._ends.setdefault(tuple(t[end - n:end]), []).append(end)
        self._done = max(self._done, len(t))


class AcceptStats:
    """A model's draft tokens checked and kept, per match-length bucket, over
    all requests so far: the prior for each new request's own counts."""

    def __init__(self) -> None:
        self.kept = [p * PRIOR_WEIGHT for p in PRIOR_BY_BUCKET]
        self.checked = [PRIOR_WEIGHT] * len(PRIOR_BY_BUCKET)

    def rate(self, bucket: int) -> float:
        return self.kept[bucket] / self.checked[bucket]


class SpecState:
    """One request's speculation: its counters, acceptance estimate and off switch."""

    def __init__(self, mode: str, history: list[int], stats: AcceptStats | None = None) -> None:
        self.mode = mode
        self.history = history
        """Prompt and emitted tokens (what the sequence's KV holds, drafts aside)."""
        self.ngrams = NgramIndex(history) if mode == "ngram" else None
        self.stats = stats if stats is not None else AcceptStats()
        self.k = K_MAX
        self.enabled = True
        self.drafted = 0
        self.accepted = 0
        self.trials = 0
        """Draft tokens actually checked: the accepted ones and each first miss."""
        self.match = 0
        """Match length behind the latest draft (0: a draft model's)."""
        self._kept = [0] * len(PRIOR_BY_BUCKET)
        self._checked = [0] * len(PRIOR_BY_BUCKET)

    @property
    def accept_rate(self) -> float:
        """How often this request's checked draft tokens were right so far."""
        return self.accepted / self.trials if self.trials else 0.0

    def chances(self, k: int) -> list[float]:
        """For each of ``k`` draft tokens from the latest match: the chance it
        is right if the ones before it were. A token further into a match has
        a longer match behind it; each bucket's chance is this request's own
        record weighed against the model's."""
        out = []
        for j in range(k):
            b = match_bucket(self.match + j) if self.match else 0
            out.append((self._kept[b] + PRIOR_WEIGHT * self.stats.rate(b))
                       / (self._checked[b] + PRIOR_WEIGHT))
        return out

    def append(self, token: int) -> None:
        self.history.append(token)

    def propose(self, k: int) -> list[int]:
        assert self.ngrams is not None
        draft, self.match = self.ngrams.propose(k)
        return draft

    def settle(self, drafted: int, accepted: int) -> None:
        """A round's outcome; switch off when acceptance stays low."""
        for j in range(min(drafted, accepted + 1)):  # the tokens checked
            b = match_bucket(self.match + j) if self.match else 0
            kept = j < accepted
            self._kept[b] += kept
            self._checked[b] += 1
            self.stats.kept[b] += kept
            self.stats.checked[b] += 1
        if self.ngrams is not None:
            self.ngrams.accepted(accepted)
        self.drafted += drafted
        self.accepted += accepted
        self.trials += accepted + (accepted < drafted)
        if self.trials >= OFF_AFTER_TRIALS and self.accepted < OFF_BELOW_RATE * self.trials:
            self.enabled = False


class StepCosts:
    """Seconds one ``llama_decode`` of n tokens takes here, learnt from every
    step: what decides how many draft tokens pay.

    Per n, the median of the last ``SAMPLES`` steps (a step slowed by another
    process does not count for long); the first step of each size is left out,
    as it also builds that batch shape's compute graph (measured here: 67 ms
    for a first 13-token step of smollm2 F16, about 38 ms after)."""

    SAMPLES = 5

    def __init__(self, most: int) -> None:
        self.seconds: list[float | None] = [None] * (most + 1)
        self._recent: list[deque[float]] = [deque(maxlen=self.SAMPLES)
                                             for _ in range(most + 1)]
        self._seen = [0] * (most + 1)

    def record(self, n: int, seconds: float) -> None:
        if 0 < n < len(self.seconds):
            self._seen[n] += 1
            if self._seen[n] == 1:
                return  # the shape's first step: graph building included
            self._recent[n].append(seconds)
            self.seconds[n] = statistics.median(self._recent[n])

    def cost(self, n: int) -> float:
        """What a step of n tokens costs: its measured median, else the nearest
        measured size's scaled by ``PRIOR_STEP_SLOPE`` (the nearest smaller
        one's if any); capped by any measured cost of a larger step (a step of
        more tokens does not cost less: a size whose few samples ran slow, say
        while another process ran, is not shunned for it). Before any step
        is measured, the prior alone, in units of a one-token step
        (``allocate`` only compares costs).

        The prior matters for a fresh model's first request, which is all a
        one-shot ``lanner run`` has: an untried size used to cost what the
        nearest smaller one did, so the first drafts ran to the longest size,
        and the sizes were learnt from the top down one wasteful step at a time.
        The benchmark's quote prompt as a fresh model's first request (smollm2
        BF16 on a trial build with huge-page buffers, two runs each, one-off):
        139 and 141 tok/s with that rule, 162 and 171 with the prior; the third
        request read 179-185 either way."""
        top = len(self.seconds) - 1
        n = max(1, min(n, top))

        def prior(m: int) -> float:
            return 1.0 + PRIOR_STEP_SLOPE * (m - 1)

        known = [(m, s) for m, s in enumerate(self.seconds) if s is not None]
        if not known:
            return prior(n)
        if (own := self.seconds[n]) is not None:
            estimate = own
        else:
            below = [(m, s) for m, s in known if m < n]
            m, s = below[-1] if below else known[0]
            estimate = s * prior(n) / prior(m)
        above = [s for m, s in known if m > n]
        return min(estimate, *above) if above else estimate

    def allocate(self, chances: list[list[float]], n_gen: int) -> list[int]:
        """Draft tokens per sequence that maximise expected tokens per second.

        ``n_gen`` sequences generate this step; ``chances[i][j]`` is the chance
        that sequence i's draft token j is right if the ones before it were
        (its length: the most it can draft). Draft tokens are added
        most-likely-first; the best prefix of that order wins."""
        base = self.cost(n_gen)
        ks = [0] * len(chances)
        nxt = {i: c[0] for i, c in enumerate(chances) if c}  # P(its next one is kept)
        order: list[tuple[float, int]] = []
        while nxt and len(order) < len(self.seconds) - 1 - n_gen:
            i = max(nxt, key=lambda j: nxt[j])
            order.append((nxt[i], i))
            ks[i] += 1
            if ks[i] < len(chances[i]):
                nxt[i] *= chances[i][ks[i]]
            else:
                del nxt[i]
        best, best_len, gain = n_gen / base, 0, 0.0
        for length, (prob, _) in enumerate(order, 1):
            gain += prob
            cost = self.cost(n_gen + length)
            if (n_gen + gain) / cost > best:
                best, best_len = (n_gen + gain) / cost, length
        ks = [0] * len(chances)
        for _, i in order[:best_len]:
            ks[i] += 1
        return ks


@dataclass
class _DraftSeq:
    tokens: list[int]
    last_used: int = 0


class DraftModel:
    """A smaller GGUF with the target's vocabulary, proposing greedy drafts.

    It keeps a KV sequence per target slot (same ids), synced to the slot's
    history before each round; all drafting sequences decode together, one
    token per step. Owned and called by the scheduler thread only.
    """

    def __init__(self, path: Path, target_vocab: Any, *, n_ctx: int, n_seq_max: int,
                 n_threads: int, n_batch: int) -> None:
        from .llamacpp_native import ContextConfig, Vocab, create_context, load_model
        from .llamacpp_sched import _Batch

        self.path = path
        self.model = load_model(path)
        self.ctx: Any = None
        self.batch: Any = None
        try:
            self.vocab = Vocab(self.model)
            check_vocab(target_vocab, self.vocab, path)
            cfg = ContextConfig(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                n_seq_max=n_seq_max, n_threads=n_threads, flash_attn=True)
            self.ctx = create_context(self.model, cfg, path)
            self.batch = _Batch(n_batch)
        except BaseException:
            self.close()
            raise
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.limit = min(self.vocab.n_vocab, target_vocab.n_vocab)
        self._seqs: dict[int, _DraftSeq] = {}
        self._clock = 0

    def propose(self, items: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """Greedy drafts: ``items`` are (sequence id, history, tokens wanted)."""
        import numpy as np

        from .llamacpp_jobs import logits_row

        drafts: list[list[int]] = [[] for _ in items]
        if not items:
            return drafts
        try:
            rows = self._sync(items)
        except _NoRoom:
            self._drop_all()
            return drafts
        live = list(range(len(items)))
        for _ in range(max(k for _, _, k in items)):
            for i in live:
                token = int(np.argmax(logits_row(self.ctx, rows[i], self.vocab.n_vocab)))
                if token >= self.limit or self.vocab.is_eog(token):
                    items[i] = (items[i][0], items[i][1], 0)
                else:
                    drafts[i].append(token)
            live = [i for i in live if len(drafts[i]) < items[i][2]]
            if not live:
                break
            self.batch.n = 0
            for j, i in enumerate(live):
                seq = self._seqs[items[i][0]]
                self.batch.add(drafts[i][-1], len(seq.tokens), items[i][0], True)
                seq.tokens.append(drafts[i][-1])
                rows[i] = j
            if not self._decode():
                self._drop_all()
                break
        return drafts

    def _sync(self, items: list[tuple[int, list[int], int]]) -> list[int]:
        """Bring each sequence's cache to its history; returns each one's output row."""
        import llama_cpp

        mem = llama_cpp.llama_get_memory(self.ctx)
        self._clock += 1
        todo: list[tuple[int, list[int]]] = []
        for seq_id, history, _ in items:
            seq = self._seqs.setdefault(seq_id, _DraftSeq([]))
            seq.last_used = self._clock
            keep = 0
            for a, b in zip(seq.tokens, history[:-1], strict=False):
                if a != b:
                    break
                keep += 1
            if keep < len(seq.tokens):
                llama_cpp.llama_memory_seq_rm(mem, seq_id, keep, -1)
                del seq.tokens[keep:]
            todo.append((seq_id, history[keep:]))
        self._make_room(sum(len(feed) for _, feed in todo), {s for s, _, _ in items})
        rows = [0] * len(items)
        pending = [(i, s, f) for i, (s, f) in enumerate(todo)]
        while pending:  # chunks of at most n_batch tokens; the last of each feed outputs
            self.batch.n = 0
            left: list[tuple[int, int, list[int]]] = []
            for i, seq_id, feed in pending:
                room = self.n_batch - self.batch.n
                take = feed[:room]
                seq = self._seqs[seq_id]
                for t, token in enumerate(take):
                    last = t == len(feed) - 1
                    if last:
                        rows[i] = self.batch.n
                    self.batch.add(token, len(seq.tokens), seq_id, last)
                    seq.tokens.append(token)
                if len(take) < len(feed):
                    left.append((i, seq_id, feed[len(take):]))
            if not self._decode():
                raise _NoRoom
            pending = left
        return rows

    def _make_room(self, want: int, busy: set[int]) -> None:
        import llama_cpp

        used = sum(len(s.tokens) for s in self._seqs.values())
        for seq_id, seq in sorted(self._seqs.items(), key=lambda kv: kv[1].last_used):
            if used + want <= self.n_ctx:
                return
            if seq_id not in busy and seq.tokens:
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq_id, -1, -1)
                used -= len(seq.tokens)
                seq.tokens = []
        if used + want > self.n_ctx:
            raise _NoRoom

    def _decode(self) -> bool:
        from .llamacpp_native import decode

        self.batch.raw.n_tokens = self.batch.n
        return decode(self.ctx, self.batch.raw) == 0

    def _drop_all(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self._seqs.clear()

    def close(self) -> None:
        import llama_cpp

        if self.batch is not None:
            self.batch.free()
            self.batch = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None


class _NoRoom(Exception):
    """The draft cache cannot hold the histories: skip this round's drafts."""


MAX_VOCAB_DIFFERENCE = 128
"""Extra tokens one vocabulary may have (added special tokens), as llama.cpp's
speculative example allows; every shared id must be the same text."""


def check_vocab(target: Any, draft: Any, path: Path) -> None:
    """Refuse a draft model whose tokens are not the target's (an ``InvalidRequest``
    naming the first difference)."""
    import llama_cpp

    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest("speculative", f"the draft model {path.name} cannot draft for "
                              f"this model: its vocabulary differs ({why})")

    kinds = (llama_cpp.llama_vocab_type(target.ptr), llama_cpp.llama_vocab_type(draft.ptr))
    if kinds[0] != kinds[1]:
        raise refuse(f"tokenizer type {kinds[1]} vs {kinds[0]}")
    if abs(target.n_vocab - draft.n_vocab) > MAX_VOCAB_DIFFERENCE:
        raise refuse(f"{draft.n_vocab} tokens vs {target.n_vocab}")
    for token in range(min(target.n_vocab, draft.n_vocab)):
        if target.text_of(token) != draft.text_of(token):
            raise refuse(f"token {token} is {draft.text_of(token)!r}, "
                         f"not {target.text_of(token)!r}")
