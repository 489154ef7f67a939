"""Speculative decoding in the llama.cpp backend: the output never changes.

Greedy output with drafts is token-identical to plain decoding; sampled output
keeps the plain sampler's distribution (a two-sample chi-square test on a small
model, with a check that the same test tells a different sampler apart); a
draft model with another vocabulary is refused.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from scipy import stats

from lanner.backends import speculative
from lanner.backends.llamacpp import LlamaCppBackend
from lanner.engine.engine import Engine
from lanner.engine.types import Completion, Request, collect
from lanner.errors import InvalidRequest

PASSAGE = ("The Thames flows 346 kilometres from the Cotswolds to the North Sea, passing "
           "Oxford, Reading, Windsor and London on its way.")
CODE = "def area(width, height):\n    total = width * height\n    return total\n"
PROMPTS = [
    f"Quote the passage exactly.\nPassage: {PASSAGE}\nQuote:",
    f"Rename `total` to `result` in this function.\n{CODE}\nAnswer:\n",
    "List: apples, pears, plums, cherries, figs.\nThe list again: apples,",
    f"{PASSAGE}\nIn one sentence, where does the Thames flow?",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Count from one to twenty in words: one, two, three,",
    "def fibonacci(n):",
    "Explain gravity to a child.",
    f"Copy this sentence word for word: {PASSAGE}\nCopy:",
]


def greedy(backend: LlamaCppBackend, prompt: str, n: int = 24) -> Completion:
    return collect(backend.stream(Request(prompt, max_tokens=n, temperature=0)))


@pytest.fixture(scope="module")
def plain(smollm2_gguf: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(smollm2_gguf, n_ctx=1024, speculative="off")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ngram(smollm2_gguf: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(smollm2_gguf, n_ctx=1024, speculative="ngram")
    yield backend
    backend.close()


@pytest.mark.timeout(1800)  # 20 answers: seconds alone, ten minutes on a loaded shared box
def test_greedy_ngram_is_token_identical_to_plain_decoding(
    plain: LlamaCppBackend, ngram: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every n-gram draft in full, whatever steps cost on this machine.
    monkeypatch.setattr(speculative.StepCosts, "allocate",
                        lambda self, chances, n_gen: [len(c) for c in chances])
    for prompt in PROMPTS:
        want, got = greedy(plain, prompt), greedy(ngram, prompt)
        assert [t.id for t in got.tokens] == [t.id for t in want.tokens], prompt
        assert got.text == want.text
        assert got.finish is not None and want.finish is not None
        assert got.finish.reason == want.finish.reason
    # The drafts were used, and enough were right to save steps.
    assert ngram.drafted_tokens > 100
    assert ngram.accepted_tokens >= 20
    assert plain.drafted_tokens == 0
    assert ngram.decode_calls <= plain.decode_calls - ngram.accepted_tokens // 2


def test_quoting_decodes_in_fewer_steps_and_counts_its_drafts(ngram: LlamaCppBackend) -> None:
    calls = ngram.decode_calls
    out = greedy(ngram, PROMPTS[0], 32)
    assert out.finish is not None
    usage = out.finish.usage
    assert usage.drafted_tokens >= usage.accepted_tokens > 0
    assert ngram.decode_calls - calls < usage.completion_tokens
    stats_ = ngram.stats()
    assert stats_["spec_drafted_tokens"] == ngram.drafted_tokens
    assert 0 < stats_["spec_acceptance_rate"] <= 1
    # What steps of each size cost, as drafts are sized by it: one-token steps
    # and the drafted sizes (a size's first step is left out, so ask twice).
    greedy(ngram, PROMPTS[0], 32)
    seen = ngram.step_seconds
    assert 1 in seen and any(n > 1 for n in seen)
    assert all(seconds > 0 for seconds in seen.values())


def test_logprobs_and_stop_strings_are_unchanged(
    plain: LlamaCppBackend, ngram: LlamaCppBackend
) -> None:
    req = Request(PROMPTS[2], max_tokens=24, temperature=0, top_logprobs=3, stop=("figs",))
    want, got = collect(plain.stream(req)), collect(ngram.stream(req))
    assert got.text == want.text
    assert [t.id for t in got.tokens] == [t.id for t in want.tokens]
    assert [t.logprob for t in got.tokens] == pytest.approx(
        [t.logprob for t in want.tokens], abs=1e-2)
    assert [[a.token_id for a in t.top] for t in got.tokens] == \
        [[a.token_id for a in t.top] for t in want.tokens]


NEAR_TIE = 0.1
"""Logprob gap under which two greedy candidates may swap between a one-token
step and a row of a batch: llama.cpp's batched rows round differently from a
token decoded alone (measured up to 0.013 on smollm2 F16, 0.055 on BF16,
0.148 on a Q4_K_M file; docs/architecture.md), by machine and kernel. A bug
(a sampled row taken from the wrong logits) parts to a token outside the top
five: tried."""


def test_concurrent_greedy_streams_with_drafts_part_from_each_alone_only_at_near_ties(
    plain: LlamaCppBackend, ngram: LlamaCppBackend
) -> None:
    """Streams decoded together against each decoded alone: six at once (rows
    of shared batches; no drafts while more than ``SPEC_MAX_STREAMS``
    generate), then in pairs (shared batches with drafts). Together, their
    tokens go through rows of batches; alone, through one-token steps, which
    round differently. So a stream may part from its answer alone only where
    the two candidates were a near tie there (within ``NEAR_TIE`` in the alone
    run's logprobs); any other parting is a bug (a row reading another
    sequence's cells, a wrong position, a draft token kept that the sampler
    did not pick)."""
    prompts = PROMPTS[:6]
    want = {p: collect(plain.stream(Request(p, max_tokens=24, temperature=0, top_logprobs=5)))
            for p in prompts}

    def together(group: list[str]) -> dict[str, list[int]]:
        got: dict[str, list[int]] = {}

        def run(p: str) -> None:
            got[p] = [t.id for t in greedy(ngram, p, 24).tokens]

        threads = [threading.Thread(target=run, args=(p,)) for p in group]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    ngram._sched.max_batch_seqs = 0
    at_once = together(prompts)
    assert ngram.max_batch_seqs > 1  # they shared steps
    drafted = ngram.drafted_tokens
    in_pairs = {p: ids for pair in (prompts[0:2], prompts[2:4], prompts[4:6])
                for p, ids in together(pair).items()}
    assert ngram.drafted_tokens > drafted  # pairs draft
    for got in (at_once, in_pairs):
        for p, alone in want.items():
            ids = [t.id for t in alone.tokens]
            i = next((i for i, (a, b) in enumerate(zip(ids, got[p], strict=False)) if a != b),
                     None)
            if i is None:
                assert len(got[p]) == len(ids), p
                continue
            there = {a.token_id: a.logprob for a in alone.tokens[i].top}
            assert got[p][i] in there, f"{p!r} parts at {i} to a token outside the top 5"
            gap = there[ids[i]] - there[got[p][i]]
            assert gap <= NEAR_TIE, f"{p!r} parts at {i}: logprob gap {gap:.3f}"


def test_draft_model_is_token_identical(plain: LlamaCppBackend, smollm2_gguf: Path) -> None:
    with LlamaCppBackend(smollm2_gguf, n_ctx=1024,
                         speculative=f"draft:{smollm2_gguf}") as drafted:
        for prompt in PROMPTS[:4]:
            assert [t.id for t in greedy(drafted, prompt).tokens] == \
                [t.id for t in greedy(plain, prompt).tokens]
        # Its own weights as the draft: nearly every draft token is right.
        assert drafted.drafted_tokens > 50
        assert drafted.accepted_tokens > 0.9 * drafted.drafted_tokens


def test_draft_model_with_another_vocabulary_is_refused(
    smollm2_gguf: Path, tinycoder_gguf: Path
) -> None:
    with pytest.raises(InvalidRequest, match="vocabulary differs") as info:
        LlamaCppBackend(smollm2_gguf, n_ctx=256, speculative=f"draft:{tinycoder_gguf}")
    assert info.value.param == "speculative"
    assert "tiny.gguf" in str(info.value)
    # By name through the engine, as --speculative draft:tinycoder gives it.
    with pytest.raises(InvalidRequest, match="vocabulary differs"):
        Engine().load("smollm2-q4_1", speculative="draft:tinycoder", n_ctx=256)


def test_bad_values_are_refused(smollm2_gguf: Path) -> None:
    for value in ("fast", "draft:", "ngrams"):
        with pytest.raises(InvalidRequest, match="speculative"):
            LlamaCppBackend(smollm2_gguf, n_ctx=256, speculative=value)
    with pytest.raises(InvalidRequest, match="only the llama.cpp backend"):
        Engine().load("smollm2-q4_1", backend="transformers", speculative="ngram")


# -- sampled output keeps its distribution ------------------------------------

N_SAMPLES = 300


def _joint(backend: LlamaCppBackend, prompt: list[int], seeds: range,
           top_k: int = 3) -> Counter[tuple[int, ...]]:
    """The first three sampled tokens, over many seeds."""
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in seeds:
        out = collect(backend.stream(Request(prompt, max_tokens=3, temperature=1.0,
                                             top_k=top_k, top_p=1.0, min_p=0.0, seed=seed)))
        counts[tuple(t.id for t in out.tokens)] += 1
    return counts


def _same_distribution(a: Counter[tuple[int, ...]], b: Counter[tuple[int, ...]]) -> float:
    """p-value of a two-sample chi-square test (rare outcomes pooled)."""
    keys = sorted(set(a) | set(b))
    common = [k for k in keys if a[k] + b[k] >= 10]
    rare = [k for k in keys if a[k] + b[k] < 10]
    table = [[a[k] for k in common] + [sum(a[k] for k in rare)],
             [b[k] for k in common] + [sum(b[k] for k in rare)]]
    if not rare:
        table = [row[:-1] for row in table]
    return float(stats.chi2_contingency(table)[1])


@pytest.mark.timeout(1800)  # 900 short requests: ~30 s alone, far longer on a shared box
def test_sampled_speculative_output_keeps_the_plain_distribution(
    tinycoder_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Draft at every step, whatever steps cost on this machine: the rule is under test.
    monkeypatch.setattr(speculative.StepCosts, "allocate",
                        lambda self, chances, n_gen: [len(c) for c in chances])
    with LlamaCppBackend(tinycoder_gguf, n_ctx=512, speculative="off") as plain_tiny, \
            LlamaCppBackend(tinycoder_gguf, n_ctx=512,
                            speculative=f"draft:{tinycoder_gguf}") as drafted:
        prompt = plain_tiny.tokenize("def add(a, b):\n    return")
        plain_counts = _joint(plain_tiny, prompt, range(N_SAMPLES))
        spec_counts = _joint(drafted, prompt, range(10**6, 10**6 + N_SAMPLES))
        # Drafts were checked at every step, and rejected often enough for the
        # residual draw to matter.
        assert drafted.drafted_tokens >= 0.8 * N_SAMPLES
        assert 0.05 < drafted.accepted_tokens / drafted.drafted_tokens < 0.95
        assert len(plain_counts) > 5
        assert _same_distribution(plain_counts, spec_counts) > 1e-3
        # The same test tells a slightly different sampler apart (it can fail):
        # one that never draws the third candidate.
        narrower = _joint(plain_tiny, prompt, range(2 * 10**6, 2 * 10**6 + N_SAMPLES), 2)
        assert _same_distribution(plain_counts, narrower) < 1e-3


# -- the pieces ------------------------------------------------------------------


def test_ngram_lookup_proposes_what_followed_a_match() -> None:
    index = speculative.NgramIndex([1, 2, 3, 4, 5, 9, 2, 3])
    assert index.propose(3) == ([4, 5, 9], 2)  # "2 3" came before, then 4 5 9
    index = speculative.NgramIndex([1, 2, 3, 4, 0, 2, 3, 5, 1, 2, 3])
    assert index.propose(2) == ([4, 0], 3)  # the longest suffix seen ("1 2 3") wins
    index = speculative.NgramIndex([5, 1, 2, 3, 4, 1, 2])
    assert index.propose(2) == ([3, 4], 2)  # "1 2" occurred at 1-2, followed by 3 4
    index.append(6)
    assert index.propose(2) == ([], 0)
    index = speculative.NgramIndex([7])
    assert index.propose(4) == ([], 0)
    # A match that runs into the end repeats: "1 2" two tokens back drafts a loop.
    index = speculative.NgramIndex([7, 1, 2, 1, 2])
    assert index.propose(5) == ([1, 2, 1, 2, 1], 2)
    index = speculative.NgramIndex([4, 5, 6, 4, 5, 6, 4])
    assert index.propose(7) == ([5, 6, 4, 5, 6, 4, 5], 4)  # "6 4" 3 back, 4 tokens agree
    # The match length runs back past the n-gram: 5 tokens agree before "8 9".
    index = speculative.NgramIndex([0, 4, 5, 6, 7, 1, 2, 8, 9, 3, 5, 6, 7, 1, 2])
    assert index.propose(2) == ([8, 9], 5)


def test_ngram_lookup_goes_on_where_the_copy_left_off() -> None:
    """A list in the prompt, each item after the separator "8 9": an answer
    that rewrites it item by item is drafted from the first item on, then from
    the item after the one it copied last, not from the latest "8 9"."""
    prompt = [8, 9, 1, 2, 3, 8, 9, 4, 5, 8, 9, 6, 7]
    index = speculative.NgramIndex(list(prompt))
    for token in (0, 8, 9):
        index.append(token)
    assert index.propose(3) == ([1, 2, 3], 2)  # no copy yet: the first occurrence in the prompt
    index.accepted(3)  # the model wrote 1 2 3, then its own 10 instead of the separator
    for token in (1, 2, 3, 10, 8, 9):
        index.append(token)
    assert index.propose(2) == ([4, 5], 2)  # the next item, though "8 9" occurred since
    index.accepted(0)  # a miss moves nothing
    assert index.propose(2) == ([4, 5], 2)
    # Without any copy and no occurrence in the prompt, the latest is taken.
    tail = speculative.NgramIndex([0])
    for token in (1, 2, 3, 1, 2, 4, 1, 2):
        tail.append(token)
    assert tail.propose(1) == ([4], 2)


def test_longer_matches_are_trusted_more() -> None:
    state = speculative.SpecState("ngram", [0, 4, 5, 6, 7, 1, 2, 8, 9, 3, 5, 6, 7, 1, 2])
    short = speculative.SpecState("ngram", [1, 2, 3, 9, 1, 2])
    assert state.propose(2) == [8, 9] and state.match == 5
    assert short.propose(1) == [3] and short.match == 2
    assert state.chances(1)[0] > short.chances(1)[0]
    # Further into a match, a token has more agreement behind it.
    assert short.chances(12) == sorted(short.chances(12))
    assert short.chances(12)[-1] > short.chances(12)[0]
    # Misses after 2-token matches lower that bucket for the request and for the
    # model's later requests; long matches keep their chance.
    before_long = short.chances(12)[-1]
    for _ in range(10):
        short.settle(3, 0)
    assert short.chances(1)[0] < 0.3
    later = speculative.SpecState("ngram", [1, 2, 3, 9, 1, 2], short.stats)
    fresh = speculative.SpecState("ngram", [1, 2, 3, 9, 1, 2])
    later.propose(1)
    fresh.propose(1)
    assert later.chances(1)[0] < fresh.chances(1)[0]
    assert short.chances(12)[-1] == pytest.approx(before_long)


def test_requests_with_low_acceptance_stop_drafting() -> None:
    state = speculative.SpecState("ngram", [1, 2, 3])
    while state.enabled and state.drafted < 1000:
        state.settle(4, 0)
    assert not state.enabled
    assert state.trials == speculative.OFF_AFTER_TRIALS  # one miss checked per round
    assert state.accept_rate < 0.1
    good = speculative.SpecState("ngram", [1])
    for _ in range(50):
        good.settle(4, 3)
    assert good.enabled
    assert good.accept_rate == pytest.approx(0.75, abs=0.02)


def test_drafts_are_sized_by_what_a_step_costs() -> None:
    flat = speculative.StepCosts(16)
    for n in range(1, 17):
        flat.record(n, 0.050)  # a shape's first step also builds its graph: not counted
        flat.record(n, 0.010)  # a step costs the same up to 16 tokens
    assert flat.allocate([[0.9] * 12], 1) == [12]
    assert flat.allocate([[0.9] * 12, [0.9] * 12], 2) == [7, 7]  # the batch's 16 tokens
    assert flat.allocate([[]], 1) == [0]
    steep = speculative.StepCosts(16)
    for n in range(1, 17):
        steep.record(n, 0.0)
        steep.record(n, 0.010 * n)  # compute-bound: every token costs a step
    assert steep.allocate([[0.9] * 12], 1) == [0]
    knee = speculative.StepCosts(16)
    for n in range(1, 17):
        for _ in range(2):
            knee.record(n, 0.010 if n <= 4 else 0.010 * n / 4)
    assert knee.allocate([[0.95] * 12], 1) == [3]  # drafts up to the knee pay
    assert knee.allocate([[0.95] * 12] * 4, 4) == [0, 0, 0, 0]  # a full batch: none
    # Nothing measured yet (a fresh model's first steps): the prior, 0.1 of a
    # one-token step per extra token, sizes the drafts.
    fresh = speculative.StepCosts(16)
    assert fresh.cost(1) == 1.0 and fresh.cost(9) == pytest.approx(1.8)
    assert fresh.allocate([[0.9] * 4], 1) == [4]
    assert fresh.allocate([[0.3] * 12], 1) == [1]  # a long unlikely draft does not pay
    # Likely tokens first: the sure sequence drafts all 12, the coin toss what is left.
    assert flat.allocate([[0.5] * 12, [0.99] * 12], 2) == [2, 12]
    noisy = speculative.StepCosts(16)
    # A shape's first step, then steps of which one was slowed by another process:
    for seconds in (0.5, 0.010, 0.011, 0.200, 0.009):
        noisy.record(1, seconds)
    assert noisy.cost(1) == pytest.approx(0.0105)
    slow_two = speculative.StepCosts(16)
    for n, seconds in ((1, 0.010), (2, 0.025), (3, 0.012), (8, 0.015)):
        for _ in range(3):
            slow_two.record(n, seconds)
    # Two tokens cannot cost more than three: the measured 3 caps the noisy 2.
    # An untried size costs the nearest smaller measured one's, scaled by the
    # prior (5: 0.012 * 1.4 / 1.2), capped by a larger measured one (7 by 8).
    assert slow_two.cost(2) == pytest.approx(0.012)
    assert slow_two.cost(5) == pytest.approx(0.014)
    assert slow_two.cost(7) == pytest.approx(0.015)
    assert slow_two.cost(8) == pytest.approx(0.015)
    assert slow_two.cost(12) == pytest.approx(0.015 * 2.1 / 1.7)
    assert slow_two.allocate([[0.9]], 1) == [1]  # at 0.025 for 2 tokens it would not pay


def test_no_drafts_while_a_prompt_is_being_decoded(
        tinycoder_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream that generates while another request's prompt is still being
    decoded (in 16-token chunks here) drafts nothing until that prompt is in:
    the prompt takes the step's room. Alone again, it drafts."""
    from lanner.backends import llamacpp_jobs

    drafted_during_prefill: list[int] = []
    drafted: list[int] = []
    original = llamacpp_jobs.GenJob.set_draft
    with LlamaCppBackend(tinycoder_gguf, n_ctx=1024, n_batch=16, n_ubatch=16,
                         speculative="ngram") as backend:
        sched = backend._sched

        def set_draft(job: llamacpp_jobs.GenJob, draft: list[int]) -> None:
            prefilling = [j for j in sched.active if len(j.feed) > 1 and j is not job]
            (drafted_during_prefill if prefilling else drafted).append(len(draft))
            original(job, draft)

        monkeypatch.setattr(llamacpp_jobs.GenJob, "set_draft", set_draft)
        loop = [5, 6, 7, 8] * 12  # a repeating prompt: n-gram drafts always match
        collect(backend.stream(Request(loop, max_tokens=60, temperature=0)))  # costs learnt
        assert drafted and not drafted_during_prefill  # alone, it drafts
        drafted.clear()
        first = backend.stream(Request(loop, max_tokens=400, temperature=0))
        next(first)  # generating
        long_prompt = list(range(100, 400))  # about 19 chunks of 16
        second = collect(backend.stream(Request(long_prompt, max_tokens=4, temperature=0)))
        rest = list(first)
    assert second.finish is not None and rest
    assert drafted_during_prefill == []
    assert drafted  # it did draft, when nothing else was decoding


def test_only_generating_steps_teach_the_step_costs(tinycoder_gguf: Path) -> None:
    """Prompt chunks (one unsampled output row) would make drafts of their size
    look cheap: the step costs hold only the sizes that generating steps took."""
    with LlamaCppBackend(tinycoder_gguf, n_ctx=1024, n_batch=16, n_ubatch=16,
                         speculative="off") as backend:
        for first in (100, 200, 300):  # prompts of 16 + 16 + 7 tokens, then 1-token steps
            out = collect(backend.stream(Request(list(range(first, first + 39)), max_tokens=6,
                                                 temperature=0)))
            assert out.finish is not None
        assert backend.decode_calls > 3 * 3  # the prompts' chunks, and generating steps
        assert set(backend.step_seconds) == {1}


def test_parse() -> None:
    assert speculative.parse("ngram") == ("ngram", None)
    assert speculative.parse("draft:smollm2-q4_1") == ("draft", "smollm2-q4_1")
    with pytest.raises(InvalidRequest, match="speculative"):
        speculative.parse("on")
