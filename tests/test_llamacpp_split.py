"""The llama.cpp backend's split KV layout: each sequence slot owns its own
``n_ctx`` cells, so concurrent requests neither share a window nor scan each
other's cells (what makes batched decoding as fast as llama.cpp's own)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from lanner.backends.llamacpp import LlamaCppBackend, split_fits
from lanner.backends.llamacpp_jobs import Job
from lanner.backends.llamacpp_native import kv_cell_bytes
from lanner.engine.engine import Engine
from lanner.engine.types import Completion, Request, collect
from lanner.errors import InvalidRequest
from lanner.server.pool import describe

PROMPTS = ["The capital of Italy is", "def fibonacci(n):", "Roses are red,",
           "My favourite food is"]


def greedy(backend: LlamaCppBackend, prompt: str | list[int], n: int | None) -> Completion:
    return collect(backend.stream(Request(prompt, max_tokens=n, temperature=0)))


def together(backend: LlamaCppBackend, prompts: list[Any], n: int | None) -> list[Completion]:
    """Every prompt as its own stream, all started at once."""
    out: list[Completion | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        start.wait()
        out[i] = greedy(backend, prompts[i], n)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def test_split_streams_are_batched_and_match_single_runs(smollm2_gguf: Path) -> None:
    alone = []
    for prompt in PROMPTS:
        with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4, kv="split") as backend:
            alone.append(greedy(backend, prompt, 24).text)
    with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4, kv="split") as backend:
        assert backend.kv_layout == "split" and backend.n_ctx == 512
        assert [c.text for c in together(backend, PROMPTS, 24)] == alone
        assert backend.max_batch_seqs > 1
        assert backend.decode_calls < 4 * 24


def test_each_request_gets_the_whole_window(tinycoder_gguf: Path) -> None:
    # Two requests that each fill the 256-token window: a unified cache of 256
    # cells cannot hold both (one is cut short); a split one holds both whole.
    with LlamaCppBackend(tinycoder_gguf, n_ctx=256, n_seq_max=2, kv="split") as split:
        prompts = [split.tokenize("hello " * 40), split.tokenize("world " * 40)]
        for out in together(split, prompts, None):
            assert out.finish is not None and out.finish.reason == "length"
            assert out.finish.usage.total_tokens == 256
    with LlamaCppBackend(tinycoder_gguf, n_ctx=256, n_seq_max=2) as unified:
        assert unified.kv_layout == "unified"
        totals = [o.finish.usage.total_tokens if o.finish else 0
                  for o in together(unified, prompts, None)]
        assert min(totals) < 256  # they shared 256 cells: one was cut short


def test_auto_splits_only_within_the_budget(smollm2_gguf: Path, tmp_path: Path) -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, F16 keys and values.
    assert split_fits(30 * 3 * (64 + 64) * 2, 512, 4, 45 << 20)
    with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4, kv="auto",
                         kv_budget_mib=45) as roomy:
        assert kv_cell_bytes(roomy._model) == 30 * 3 * (64 + 64) * 2
        assert roomy.kv_layout == "split"  # 4 x 512 cells x 22.5 KiB = 45 MiB
        assert roomy.kv_bytes == 45 << 20
        model = Engine(tmp_path).attach("smol", roomy)
        assert describe(model) == ("llama.cpp, 512 tokens a request, 4 slots, "
                                   "split KV cache of 0.04 GiB")
    with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4, kv="auto",
                         kv_budget_mib=44) as tight:
        assert tight.kv_layout == "unified"
    with pytest.raises(InvalidRequest, match="kv"):
        LlamaCppBackend(smollm2_gguf, kv="paged")
    with pytest.raises(InvalidRequest, match="kv_budget_mib"):
        LlamaCppBackend(smollm2_gguf, kv="auto", kv_budget_mib=-1)


def test_a_new_request_keeps_busy_slots_contiguous(tinycoder_gguf: Path) -> None:
    # llama.cpp decodes consecutive sequence ids of a split cache in one pass;
    # a gap costs another pass over the weights every step.
    with LlamaCppBackend(tinycoder_gguf, n_ctx=1024, n_seq_max=4, kv="split") as backend:
        sched = backend._sched
        s0, s1, s2, s3 = sched.slots
        busy = Job([1], 0)
        s0.job = s2.job = busy
        try:
            long_prefix = list(range(10, 10 + 600))
            s3.tokens = list(long_prefix)
            s1.tokens = []
            # No useful prefix anywhere: the hole between the busy slots.
            assert sched._choose(Job([7, 8, 9], 2), [s1, s3]) is s1
            # A short shared prefix is not worth a new run of busy ids...
            assert sched._choose(Job(long_prefix[:100] + [5], 100), [s1, s3]) is s1
            # ...a long one is.
            assert sched._choose(Job(long_prefix + [5], 600), [s1, s3]) is s3
        finally:
            s0.job = s2.job = None
            s3.tokens = []


def test_every_context_decodes_on_one_thread(smollm2_gguf: Path, tinycoder_gguf: Path) -> None:
    # ggml uses OpenMP here: a second decoding thread would start a second
    # OpenMP team, and with more OpenMP threads than cores every context in
    # the process decodes ~25% slower (docs/benchmarks.md).
    seen: set[int] = set()
    real = llama_cpp.llama_decode

    def spy(ctx: Any, batch: Any) -> int:
        seen.add(threading.get_ident())
        return int(real(ctx, batch))

    llama_cpp.llama_decode = spy
    try:
        with LlamaCppBackend(smollm2_gguf, n_ctx=256) as a, \
                LlamaCppBackend(tinycoder_gguf, n_ctx=256) as b:
            outs = [greedy(a, "Hello", 4), greedy(b, "Hello", 4)]
    finally:
        llama_cpp.llama_decode = real
    assert all(c.finish is not None for c in outs)
    assert len(seen) == 1 and threading.get_ident() not in seen


def test_a_gap_left_by_a_finished_request_is_closed(smollm2_gguf: Path) -> None:
    # Three streams take ids 0, 1 and 2; the middle one ends first. The last
    # moves into its slot (llama.cpp copies its KV), so every step after still
    # decodes one run of ids, and its text is what it says alone.
    requests = [Request(p, max_tokens=n, temperature=0)
                for p, n in zip(PROMPTS[:3], (24, 6, 24), strict=True)]
    with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4, kv="split") as backend:
        alone = [collect(backend.stream(r)).text for r in requests]
    batches: list[list[int]] = []
    real = llama_cpp.llama_decode

    def spy(ctx: Any, batch: Any) -> int:
        batches.append(sorted({batch.seq_id[i][0] for i in range(batch.n_tokens)}))
        return int(real(ctx, batch))

    llama_cpp.llama_decode = spy
    try:
        with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4, kv="split") as backend:
            outs: list[str] = [""] * 3
            started = [threading.Event() for _ in requests]

            def run(i: int) -> None:
                events = backend.stream(requests[i])
                first = next(events)  # admitted: the next stream takes the next id
                started[i].set()
                outs[i] = collect(iter([first, *events])).text

            threads = []
            for i in range(3):
                threads.append(threading.Thread(target=run, args=(i,)))
                threads[-1].start()
                assert started[i].wait(60)
            for t in threads:
                t.join(timeout=120)
            moves = backend._sched.moves
    finally:
        llama_cpp.llama_decode = real
    assert outs == alone
    assert moves == 1, batches
    assert [0, 1, 2] in batches and [0, 1] in batches
    assert all(ids == list(range(ids[0], ids[-1] + 1)) for ids in batches), batches
