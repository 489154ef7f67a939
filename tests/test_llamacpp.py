"""The llama.cpp backend against llama-cpp-python itself, on the bundled GGUFs."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import llama_cpp
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lanner.backends.base import Backend
from lanner.backends.llamacpp import LlamaCppBackend
from lanner.engine.types import Completion, Finish, Request, TextDelta, collect
from lanner.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    LannerError,
    ModelLoadError,
    ModelNotFound,
)

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child.",
    "Translate 'good morning' into Japanese.",
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(smollm2_gguf, n_ctx=2048)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path) -> Iterator[Any]:
    """llama-cpp-python's own Llama; logits_all so its logits can be read back, and
    flash attention on as in LlamaCppBackend (the attention kernel changes rounding)."""
    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=1024, logits_all=True, verbose=False,
                          flash_attn=True, chat_format="chat_template.default")
    yield llm
    llm.close()


def chat_ids(backend: LlamaCppBackend, question: str) -> list[int]:
    """Render the GGUF's template as llama-cpp-python's Jinja2ChatFormatter does."""
    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True,
                                        lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    meta = backend.metadata
    assert meta.chat_template is not None
    text = env.from_string(meta.chat_template).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True,
        bos_token=meta.bos_token, eos_token=meta.eos_token,
    )
    return backend.tokenize(text, add_bos=False, special=True)


def greedy(backend: LlamaCppBackend, prompt: str | list[int], n: int, **kw: Any) -> Completion:
    return collect(backend.stream(Request(prompt, max_tokens=n, temperature=0, **kw)))


def finish_of(out: Completion) -> Finish:
    assert out.finish is not None
    return out.finish


def test_metadata_and_protocol(smol: LlamaCppBackend, tinycoder_gguf: Path) -> None:
    assert isinstance(smol, Backend)
    assert smol.name == "llama.cpp" and smol.version == llama_cpp.__version__
    meta = smol.metadata
    assert (meta.architecture, meta.bos_token, meta.eos_token) == ("llama", "<|im_start|>",
                                                                  "<|im_end|>")
    assert meta.n_ctx_train == 8192 and "im_start" in (meta.chat_template or "")
    with LlamaCppBackend(tinycoder_gguf) as tiny:
        assert tiny.n_ctx == 2048  # min(training context 2048, 8192)
        assert (tiny.metadata.chat_template, tiny.metadata.bos_token) == (None, "<s>")
        assert tiny.metadata.eos_token == "</s>"


def test_tokenize_is_llama_cpp(smol: LlamaCppBackend, reference: Any,
                               tinycoder_gguf: Path) -> None:
    text = "<|im_start|>user\nHello, wörld!<|im_end|>"
    for special in (False, True):
        ours = smol.tokenize(text, add_bos=False, special=special)
        assert ours == reference.tokenize(text.encode(), add_bos=False, special=special)
    assert smol.tokenize(text, special=True)[0] == 1  # the marker parsed as one token
    assert smol.detokenize(smol.tokenize("Hello, wörld!")) == "Hello, wörld!"
    with LlamaCppBackend(tinycoder_gguf) as tiny:  # SentencePiece vocab, adds BOS
        ids = tiny.tokenize("Hello world")
        assert ids[0] == 1 and tiny.tokenize("Hello world", add_bos=False) == ids[1:]
        assert tiny.detokenize(ids[1:]) == "Hello world"
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        smol.detokenize([10**6])


def assert_greedy_chat_identical(backend: LlamaCppBackend, reference: Any) -> None:
    """create_chat_completion's sampled token ids (recorded from its sampler) are
    exactly ours, for the same chat rendered through the GGUF's template."""
    sampled: list[int] = []
    original = reference.sample

    def record(*args: object, **kwargs: object) -> int:
        token: int = original(*args, **kwargs)
        sampled.append(token)
        return token

    reference.sample = record
    try:
        for question in QUESTIONS:
            ours = greedy(backend, chat_ids(backend, question), 48)
            sampled.clear()
            ref = reference.create_chat_completion(
                [{"role": "user", "content": question}], temperature=0, max_tokens=48)
            ids = [t.id for t in ours.tokens]
            assert ids == sampled[: len(ids)], question
            choice = ref["choices"][0]
            assert ours.text == choice["message"]["content"]
            assert finish_of(ours).reason == choice["finish_reason"]
            assert finish_of(ours).usage.prompt_tokens == ref["usage"]["prompt_tokens"]
            if finish_of(ours).reason == "stop":  # it sampled <|im_end|> next
                eos = backend.tokenize(backend.metadata.eos_token or "", add_bos=False,
                                       special=True)
                assert [sampled[len(ids)]] == eos
    finally:
        del reference.sample


def test_greedy_chat_is_token_identical_to_llama_cpp_python(
    smol: LlamaCppBackend, reference: Any
) -> None:
    assert_greedy_chat_identical(smol, reference)


def test_greedy_rows_skip_the_sampler_chain(smol: LlamaCppBackend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy request without penalties takes the first highest logit itself
    (the chain would copy every logit first); with a penalty the chain samples.
    The same tokens either way: the reference test above checks them."""
    calls = [0]
    sample = llama_cpp.llama_sampler_sample

    def counting(*args: Any) -> int:
        calls[0] += 1
        return int(sample(*args))

    monkeypatch.setattr(llama_cpp, "llama_sampler_sample", counting)
    ids = chat_ids(smol, QUESTIONS[0])
    greedy = collect(smol.stream(Request(ids, max_tokens=8, temperature=0)))
    assert greedy.tokens and calls[0] == 0
    penalised = collect(smol.stream(Request(ids, max_tokens=8, temperature=0,
                                            repetition_penalty=1.3)))
    assert calls[0] == len(penalised.tokens) + (penalised.finish.reason == "stop")


def test_without_flash_attention_matches_a_default_llama(smollm2_gguf: Path) -> None:
    """llama-cpp-python's Llama defaults to the other attention kernel; with
    flash_attn=False we match a default-constructed Llama token for token."""
    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=1024, verbose=False,
                          chat_format="chat_template.default")
    try:
        with LlamaCppBackend(smollm2_gguf, n_ctx=1024, flash_attn=False) as backend:
            assert_greedy_chat_identical(backend, llm)
    finally:
        llm.close()


def test_utf8_characters_are_never_split(smol: LlamaCppBackend) -> None:
    out = collect(smol.stream(Request(chat_ids(smol, QUESTIONS[-1]), max_tokens=48,
                                      temperature=0)))
    assert any(ord(ch) > 0x3000 for ch in out.text)  # Japanese came out
    assert "\ufffd" not in out.text
    # Some token carried only part of a character: its text is empty, the rest
    # of the character came with a later token.
    assert any(t.text == "" for t in out.tokens)
    assert "".join(t.text for t in out.tokens) == out.text


def test_same_seed_same_text_other_seed_other_text(smol: LlamaCppBackend,
                                                   smollm2_gguf: Path) -> None:
    def sample(seed: int) -> str:
        req = Request("Once upon a time", max_tokens=24, temperature=0.8, seed=seed)
        return collect(smol.stream(req)).text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first
    code = (
        "from pathlib import Path; from lanner.backends.llamacpp import LlamaCppBackend; "
        "from lanner.engine.types import Request, collect; "
        f"b = LlamaCppBackend(Path({str(smollm2_gguf)!r}), n_ctx=2048); "
        "print(collect(b.stream(Request('Once upon a time', max_tokens=24, temperature=0.8,"
        " seed=1234))).text, end='')"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=120)
    assert other.stdout == first


def test_stop_string_cuts_exactly_and_never_leaks(smol: LlamaCppBackend) -> None:
    full = greedy(smol, "The three primary colours are", 40)
    tokens = full.tokens
    # A stop string that starts inside one token and ends inside the next.
    j = next(i for i in range(3, len(tokens) - 1)
             if len(tokens[i].text) >= 3 and len(tokens[i + 1].text) >= 3)
    stop = tokens[j].text[-2:] + tokens[j + 1].text[:2]
    expected = full.text[: full.text.index(stop)]
    deltas = list(smol.stream(Request("The three primary colours are", max_tokens=40,
                                      temperature=0, stop=(stop,))))
    text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert text == expected
    finish = deltas[-1]
    assert isinstance(finish, Finish) and finish.reason == "stop"
    assert finish.usage.completion_tokens == j + 2  # the token completing the stop counts


def test_max_tokens_and_usage(smol: LlamaCppBackend) -> None:
    prompt = "Count with me: one, two, three,"
    out = collect(smol.stream(Request(prompt, max_tokens=7, temperature=0)))
    assert out.finish is not None and out.finish.reason == "length"
    assert out.finish.usage.completion_tokens == 7 == len(out.tokens)
    assert out.finish.usage.prompt_tokens == len(smol.tokenize(prompt))
    assert 0 < out.finish.timings.ttft_s <= out.finish.timings.total_s
    with pytest.raises(ContextLengthExceeded):
        smol.stream(Request(list(range(5, 2100))))


def test_full_context_ends_with_length(tinycoder_gguf: Path) -> None:
    with LlamaCppBackend(tinycoder_gguf, n_ctx=256) as tiny:
        prompt = tiny.tokenize("hello " * 40)
        out = collect(tiny.stream(Request(prompt, max_tokens=None, temperature=1.0,
                                          top_k=0, top_p=1.0, min_p=0.0, seed=1)))
        assert out.finish is not None and out.finish.reason == "length"
        assert out.finish.usage.total_tokens == tiny.n_ctx == 256


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = np.asarray(row, dtype=np.float64)
    return row - row.max() - math.log(np.exp(row - row.max()).sum())


def test_logprobs_match_llama_cpp_python_logits(smol: LlamaCppBackend,
                                                reference: Any) -> None:
    prompt = chat_ids(smol, QUESTIONS[1])
    out = greedy(smol, prompt, 8, logprobs=True, top_logprobs=5)
    ids = [t.id for t in out.tokens]
    # Evaluate as llama-cpp-python generates: the prompt in one batch, then one
    # token at a time (a batched evaluation rounds differently, by up to ~0.1).
    reference.reset()
    reference.eval(prompt)
    for token_id in ids[:-1]:
        reference.eval([token_id])
    logits = reference.scores
    for k, token in enumerate(out.tokens):
        expected = log_softmax(logits[len(prompt) + k - 1])
        assert token.logprob == pytest.approx(expected[token.id], abs=1e-3)
        assert len(token.top) == 5 and token.top[0].token_id == token.id
        values = [alt.logprob for alt in token.top]
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(expected.max(), abs=1e-3)
        for alt in token.top:
            assert alt.logprob == pytest.approx(expected[alt.token_id], abs=1e-3)


def test_concurrent_streams_are_batched_and_match_single_runs(smollm2_gguf: Path) -> None:
    prompts = ["The capital of Italy is", "def fibonacci(n):", "Roses are red,",
               "My favourite food is"]
    # Each alone on a fresh cache.
    alone = []
    for prompt in prompts:
        with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4) as backend:
            alone.append(greedy(backend, prompt, 24).text)
            assert backend.max_batch_seqs == 1
    with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=4) as backend:
        together: list[str | None] = [None] * 4
        start = threading.Barrier(4)

        def run(i: int) -> None:
            start.wait()
            together[i] = greedy(backend, prompts[i], 24).text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert together == alone
        assert backend.max_batch_seqs > 1  # steps really decoded several sequences
        assert backend.decode_calls < 4 * 24
        assert backend.active_sequences == 0 and backend.queue_depth == 0


def test_closing_a_stream_frees_its_slot(smol: LlamaCppBackend) -> None:
    events = smol.stream(Request("Once upon a time", max_tokens=200, temperature=0))
    next(events)
    next(events)
    assert smol.active_sequences == 1
    events.close()
    assert smol.active_sequences == 0
    assert finish_of(greedy(smol, "Hello", 4)).usage.completion_tokens == 4


def test_requests_beyond_n_seq_max_wait_in_the_queue(smollm2_gguf: Path) -> None:
    with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=1) as backend:
        first = backend.stream(Request("One", max_tokens=100, temperature=0))
        next(first)
        result: list[Completion] = []
        waiter = threading.Thread(target=lambda: result.append(greedy(backend, "Two", 3)))
        waiter.start()
        deadline = time.monotonic() + 10
        while backend.queue_depth == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.queue_depth == 1 and backend.active_sequences == 1
        first.close()
        waiter.join(timeout=60)
        assert result and finish_of(result[0]).usage.completion_tokens == 3
        assert backend.queue_depth == 0


def test_a_cached_prefix_is_reused(smol: LlamaCppBackend) -> None:
    turn = chat_ids(smol, "Name a colour.")
    first = greedy(smol, turn, 6)
    follow = turn + [t.id for t in first.tokens] + smol.tokenize(
        "<|im_end|>\n<|im_start|>user\nAnother one.<|im_end|>\n<|im_start|>assistant\n",
        add_bos=False, special=True)
    before = smol.reused_tokens
    cached = greedy(smol, follow, 6)
    assert smol.reused_tokens - before >= len(turn)
    with LlamaCppBackend(smol.path, n_ctx=512) as fresh:
        assert greedy(fresh, follow, 6).text == cached.text


def test_a_cached_prefix_gives_the_same_first_logits_and_seeded_answer(
        smollm2_half_gguf: Path) -> None:
    """A repeated prompt reuses its cached prefix but still decodes its last two
    tokens in one batch: a row decoded alone rounds differently from a batch's
    (a logit up to 0.27 apart on BF16), so the first logprobs and the seeded
    answer come out exactly as on the fresh prompt."""
    with LlamaCppBackend(smollm2_half_gguf, n_ctx=512) as backend:
        ids = chat_ids(backend, "Write a short poem about the sea.")

        def ask() -> Completion:
            return collect(backend.stream(Request(ids, max_tokens=12, temperature=1.0,
                                                  seed=1234, logprobs=True, top_logprobs=5)))

        fresh = ask()
        before = backend.reused_tokens
        cached = ask()
        assert backend.reused_tokens - before == len(ids) - 2  # all but the last two
        first_fresh, first_cached = fresh.tokens[0], cached.tokens[0]
        assert first_cached.logprob == first_fresh.logprob  # bit for bit
        assert [(t.token_id, t.logprob) for t in first_cached.top] == \
            [(t.token_id, t.logprob) for t in first_fresh.top]
        assert cached.text == fresh.text


def test_corrupt_files_raise_model_load_error(tmp_path: Path, tinycoder_gguf: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="junk.gguf") as err:
        LlamaCppBackend(junk)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tinycoder_gguf.read_bytes()[:1_500_000])
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        LlamaCppBackend(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF\x03\x00\x00\x00" + np.random.default_rng(1).bytes(64))
    with pytest.raises(ModelLoadError, match="header.gguf"):
        LlamaCppBackend(header_only)
    with pytest.raises(ModelNotFound):
        LlamaCppBackend(tmp_path / "missing.gguf")


def test_loglikelihood(smollm2_gguf: Path, reference: Any) -> None:
    context = "The capital of France is"
    reference.reset()
    continuation = reference.create_completion(
        context, max_tokens=3, temperature=0)["choices"][0]["text"]
    with LlamaCppBackend(smollm2_gguf, n_ctx=512) as backend:
        value, is_greedy = backend.loglikelihood(context, continuation)
        assert is_greedy
        whole = backend.tokenize(context + continuation)
        n_context = len(backend.tokenize(context))
        reference.reset()
        reference.eval(whole)
        logits = reference.scores
        expected = sum(log_softmax(logits[i - 1])[whole[i]] for i in range(n_context, len(whole)))
        assert value == pytest.approx(expected, abs=1e-3)
        worse, worse_greedy = backend.loglikelihood(context, " a banana")
        assert not worse_greedy and worse < value - 1
        # lm-eval moves the context's trailing space to the continuation. (This
        # call reuses the cached context, so it is evaluated in a smaller batch.)
        moved, moved_greedy = backend.loglikelihood(context + " ", continuation.lstrip())
        assert moved_greedy and moved == pytest.approx(value, abs=0.05)
        with pytest.raises(InvalidRequest, match="continuation"):
            backend.loglikelihood(context, "")


def test_bad_options_name_the_field(smollm2_gguf: Path) -> None:
    with pytest.raises(InvalidRequest, match="n_seq_max"):
        LlamaCppBackend(smollm2_gguf, n_seq_max=0)
    with pytest.raises(InvalidRequest, match="n_gpu"):
        LlamaCppBackend(smollm2_gguf, n_gpu=3)


def test_close_ends_streams_in_flight_and_later_calls(smollm2_gguf: Path) -> None:
    backend = LlamaCppBackend(smollm2_gguf, n_ctx=2048)
    # Up to ~2000 tokens: seconds of work, so the close below comes mid-stream.
    events = backend.stream(Request("Once upon a time", max_tokens=None, temperature=0.8,
                                    seed=3))
    next(events)
    backend.close()
    with pytest.raises(LannerError, match="closed"):
        list(events)
    assert backend.active_sequences == 0
    backend.close()  # idempotent
    with pytest.raises(LannerError, match="closed"):
        backend.tokenize("hello")
    with pytest.raises(LannerError, match="closed"):
        backend.stream(Request("hello"))


def test_prompt_logprobs_match_llama_cpp_python_logits(smol: LlamaCppBackend,
                                                       reference: Any) -> None:
    text = "Le café est très bon, 日本語も少し。"
    ids = smol.tokenize(text)
    scored = smol.prompt_logprobs(ids, top=3)
    assert [t.id for t in scored] == ids
    # Whole characters only: the texts join up to the prompt exactly.
    assert "".join(t.text for t in scored) == text
    assert scored[0].logprob is None and scored[0].top == ()
    reference.reset()
    reference.eval(ids)  # one batch, as prompt_logprobs decodes it
    for k in range(1, len(ids)):
        expected = log_softmax(reference.scores[k - 1])
        token = scored[k]
        assert token.logprob == pytest.approx(expected[ids[k]], abs=1e-3)
        assert [a.token_id for a in token.top] == list(np.argsort(-expected, kind="stable")[:3])
    with pytest.raises(InvalidRequest, match="prompt"):
        smol.prompt_logprobs([])
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        smol.prompt_logprobs(ids, top=21)
    with pytest.raises(ContextLengthExceeded):
        smol.prompt_logprobs([ids[0]] * (smol.n_ctx + 1))
    assert smol.prompt_logprobs(ids[:1], top=2)[0].logprob is None


def test_stream_to_delivers_the_events_of_stream_and_stops_at_once(
        smol: LlamaCppBackend) -> None:
    import queue

    def drain(items: queue.SimpleQueue[object]) -> list[object]:
        out = []
        while (item := items.get(timeout=30)) is not None:  # None: the job has left
            out.append(item)
        return out

    items: queue.SimpleQueue[object] = queue.SimpleQueue()
    smol.stream_to(Request("Once upon a time", max_tokens=12, temperature=0), items.put)
    got = drain(items)
    assert isinstance(got[-1], Finish)
    assert "".join(e.text for e in got if isinstance(e, TextDelta)) == \
        greedy(smol, "Once upon a time", 12).text
    stop = smol.stream_to(Request("Once upon a time", max_tokens=1000, temperature=0.8,
                                  seed=1), items.put)
    assert isinstance(items.get(timeout=30), TextDelta)
    stop()  # returns at once; the job leaves at the next step
    assert len(drain(items)) < 20
    assert smol.active_sequences == 0
    with pytest.raises(ContextLengthExceeded):
        smol.stream_to(Request([1] * 3000), items.put)


def test_stopping_a_queued_stream_to_leaves_the_queue_at_once(smollm2_gguf: Path) -> None:
    import queue

    with LlamaCppBackend(smollm2_gguf, n_ctx=512, n_seq_max=1) as backend:
        first: queue.SimpleQueue[object] = queue.SimpleQueue()
        stop_first = backend.stream_to(Request("One", max_tokens=400, temperature=0), first.put)
        assert isinstance(first.get(timeout=30), TextDelta)
        second: queue.SimpleQueue[object] = queue.SimpleQueue()
        stop_second = backend.stream_to(Request("Two", max_tokens=4, temperature=0), second.put)
        assert backend.queue_depth == 1
        stop_second()  # a client gone while queued: out of the queue, no slot ever taken
        assert backend.queue_depth == 0
        assert second.get(timeout=1) is None
        stop_first()
        while first.get(timeout=30) is not None:
            pass
        assert backend.active_sequences == 0
