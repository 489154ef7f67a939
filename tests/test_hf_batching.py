"""Continuous batching in the transformers backend (``hf_slots``, ``hf_batching``).

Several requests decoded together must give each one the tokens it gets alone:
checked on tiny random Llama and Falcon (multi-query, parallel attention)
models, on the bundled SmolLM2 converted to safetensors, and with LoRA adapters
sharing one batch. Requests join while others run and leave when done.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

from lanner.backends import hf_decode
from lanner.backends.hf_slots import SlotCache, causal_mask
from lanner.backends.transformers import TransformersBackend
from lanner.engine.types import Event, Finish, Request, collect
from tunekit import chat_ids, greedy, make_tiny_llama, train_adapter

QUESTIONS = ["name a colour?", "say a fruit", "count to three", "what is the sky?",
             "pick a number", "say hello"]


class Collected:
    """A ``stream_to`` sink: the events, then ``done`` once the request left."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()

    def __call__(self, item: object) -> None:
        if item is None:
            self.done.set()
        elif isinstance(item, BaseException):
            self.errors.append(item)
        else:
            self.events.append(item)  # type: ignore[arg-type]

    def ids(self) -> list[int]:
        assert self.done.wait(120), "the request never left the batch"
        assert not self.errors, self.errors
        return [t.id for e in self.events if hasattr(e, "tokens") for t in e.tokens]

    @property
    def finish(self) -> Finish:
        last = self.events[-1]
        assert isinstance(last, Finish)
        return last


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def falcon_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Falcon-7B-shaped model (multi-query, parallel attention), the
    tiny Llama's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    torch.manual_seed(1)
    config = FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, vocab_size=len(tokenizer),
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
    )
    folder = tmp_path_factory.mktemp("falcon")
    model = FalconForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(llama_dir: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(llama_dir)
    yield backend
    backend.close()


def batched(backend: TransformersBackend, requests: list[Request],
            gap_s: float = 0.0) -> list[Collected]:
    """Every request through ``stream_to``, ``gap_s`` apart (so later ones join
    a running batch); waits for all."""
    sinks = []
    for request in requests:
        sink = Collected()
        assert backend.stream_to is not None
        backend.stream_to(request, sink)
        sinks.append(sink)
        time.sleep(gap_s)
    for sink in sinks:
        sink.ids()
    return sinks


def alone(backend: TransformersBackend, request: Request) -> list[int]:
    return [t.id for t in collect(backend.stream(request)).tokens]


# -- the slot cache against transformers' own ------------------------------------


def test_rows_of_different_lengths_in_one_pass_equal_each_alone(llama_dir: Path) -> None:
    """Logits of three sequences of different lengths, decoded in one pass on
    the slot cache, equal each sequence's logits from a plain forward pass."""
    backend = TransformersBackend(llama_dir)
    model = backend.model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    cache = SlotCache()
    for row, ids in enumerate(prompts):  # prefill each row but its last token
        backend._forward_rows(None, cache, [row], torch.tensor([ids[:-1]]),
                              torch.arange(len(ids) - 1)[None], len(ids) - 1)
    last = torch.tensor([[ids[-1]] for ids in prompts])  # (3, 1)
    positions = torch.tensor([[len(ids) - 1] for ids in prompts])
    logits = backend._forward_rows(None, cache, [0, 1, 2], last, positions, 7)
    with torch.inference_mode():
        for row, ids in enumerate(prompts):
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decode_step_equals_the_model_s_forward_bit_for_bit(llama_dir: Path,
                                                                dtype: str) -> None:
    """``hf_decode.decode_step`` (the one-token passes of a Llama) gives the
    logits the model's own forward gives on the same slot cache, for rows of
    different lengths in one pass: exactly in bfloat16 and for one row, to
    float tolerance for several float32 rows (oneDNN's products); Falcon
    keeps the model's forward."""
    backend = TransformersBackend(llama_dir, dtype=dtype)
    assert backend._lean_decode
    model = backend.model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    cache = SlotCache()
    for row, ids in enumerate(prompts):
        backend._forward_rows(None, cache, [row], torch.tensor([ids[:-1]]),
                              torch.arange(len(ids) - 1)[None], len(ids) - 1)
    last = torch.tensor([[ids[-1]] for ids in prompts])  # (3, 1)
    positions = torch.tensor([[len(ids) - 1] for ids in prompts])
    mask = causal_mask(positions, 7, model.dtype)
    with torch.inference_mode():
        cache.bind([0, 1, 2], positions, 7)
        lean = hf_decode.decode_step(model, last, positions, cache, mask)
        cache.bind([0, 1, 2], positions, 7)  # the same keys/values written again
        own = model(input_ids=last, position_ids=positions, attention_mask=mask,
                    **{backend._cache_kwarg: cache}, use_cache=True).logits[:, -1].float()
        # One row that sees every column: no mask, attention as in generate's
        # steps on transformers' own cache.
        cache.bind([1], positions[1:2], 2)
        lean_one = hf_decode.decode_step(model, last[1:2], positions[1:2], cache, None)
        dynamic = backend._new_cache()
        backend._forward(torch.tensor([prompts[1][:1]]), 0, dynamic)
        own_one = backend._forward(last[1:2], 1, dynamic).float()
    assert lean.dtype == torch.float32 and lean.shape == own.shape
    if dtype == "float32":
        # Several rows multiply through the oneDNN copy packed for rows
        # (hf_weights.rows_linear): the same products, summed in another order.
        assert backend.weight_layout == "column-major+onednn-rows"
        torch.testing.assert_close(lean, own, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(lean, own)
    assert torch.equal(lean_one, own_one)
    backend.close()


@pytest.mark.slow
def test_lean_decode_runs_adapters_through_their_modules(
        llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a LoRA adapter loaded, one-token passes still take
    ``hf_decode.decode_step``: through the modules peft wraps (not the
    stacked copies of the base weights), so its logits are the model's own
    forward's with the adapter on, bit for bit, and the base's with it off."""
    adapter = train_adapter(tmp_path / "blue", llama_dir, max_steps=15)
    backend = TransformersBackend(llama_dir, adapter=adapter)
    assert backend._lean_decode and backend._adapter == "adapter"
    model = backend.model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    last = torch.tensor([[ids[-1]] for ids in prompts])  # (3, 1)
    positions = torch.tensor([[len(ids) - 1] for ids in prompts])
    mask = causal_mask(positions, 7, model.dtype)
    results = {}
    for name in ("adapter", None):
        cache = SlotCache()
        for row, ids in enumerate(prompts):
            backend._forward_rows(name, cache, [row], torch.tensor([ids[:-1]]),
                                  torch.arange(len(ids) - 1)[None], len(ids) - 1)
        with torch.inference_mode(), backend._adapters.use(name):
            cache.bind([0, 1, 2], positions, 7)
            lean = hf_decode.decode_step(model, last, positions, cache, mask, modules_only=True)
            cache.bind([0, 1, 2], positions, 7)
            own = model(input_ids=last, position_ids=positions, attention_mask=mask,
                        **{backend._cache_kwarg: cache}, use_cache=True).logits[:, -1].float()
        assert torch.equal(lean, own), name
        results[name] = lean
    assert not torch.allclose(results["adapter"], results[None], atol=1e-3)  # it does something
    steps: list[bool] = []
    real = hf_decode.decode_step

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        steps.append(bool(kwargs.get("modules_only")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hf_decode, "decode_step", spy)
    ids = chat_ids(backend, QUESTIONS[0])
    greedy(backend, ids)
    assert steps and all(steps)  # every one-token pass of the adapter's request
    backend.close()


def test_lean_decode_only_for_llama_layers(falcon_dir: Path) -> None:
    backend = TransformersBackend(falcon_dir)
    assert not backend._lean_decode and not hf_decode.supports(backend.model)
    backend.close()


def test_causal_mask_hides_columns_past_each_position() -> None:
    mask = causal_mask(torch.tensor([[2], [0]]), 4, torch.float32)  # (2, 1, 1, 4)
    assert mask.shape == (2, 1, 1, 4)
    assert (mask[0, 0, 0] == 0).tolist() == [True, True, True, False]
    assert (mask[1, 0, 0] == 0).tolist() == [True, False, False, False]


def test_slot_cache_grows_and_keeps_what_it_holds() -> None:
    cache = SlotCache()
    cache.bind([0], torch.tensor([[0, 1]]), 2)
    key = torch.randn(1, 2, 2, 8)
    cache.update(key, key, 0)
    cache.bind([0, 1, 2], torch.tensor([[300], [0], [5]]), 301)  # past the first block
    new = torch.randn(3, 2, 1, 8)
    keys, _ = cache.update(new, new, 0)
    assert keys.shape == (3, 2, 301, 8) and cache.capacity == 512
    torch.testing.assert_close(keys[0, :, :2], key[0])
    torch.testing.assert_close(keys[:, :, [300, 0, 5]].diagonal(dim1=0, dim2=2).permute(2, 0, 1),
                               new[:, :, 0])
    cache.move(2, 1)
    cache.bind([1], torch.tensor([[6]]), 7)
    moved, _ = cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 0)
    torch.testing.assert_close(moved[0, :, 5], new[2, :, 0])


# -- the scheduler ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_concurrent_greedy_requests_equal_each_alone(arch: str,
                                                     request: pytest.FixtureRequest) -> None:
    backend = TransformersBackend(request.getfixturevalue(f"{arch}_dir"))
    requests = [Request(chat_ids(backend, q), temperature=0.0, max_tokens=8 + 3 * i)
                for i, q in enumerate(QUESTIONS)]
    expected = [alone(backend, r) for r in requests]
    assert backend.stats()["max_batch_seqs"] == 1
    sinks = batched(backend, requests)
    assert [s.ids() for s in sinks] == expected
    assert backend.stats()["max_batch_seqs"] >= 3  # they did share passes
    for sink, request_ in zip(sinks, requests, strict=True):
        assert sink.finish.usage.completion_tokens == len(sink.ids())
        assert sink.finish.usage.prompt_tokens == len(request_.prompt)
    backend.close()


def test_requests_join_and_leave_a_running_batch(llama: TransformersBackend) -> None:
    long = Request(chat_ids(llama, "count to three"), temperature=0.0, max_tokens=60)
    short = [Request(chat_ids(llama, q), temperature=0.0, max_tokens=5) for q in QUESTIONS[:3]]
    expected = [alone(llama, r) for r in [long, *short]]
    first = Collected()
    assert llama.stream_to is not None
    llama.stream_to(long, first)
    while len(first.events) < 3:  # the long one is decoding when the others arrive
        time.sleep(0.001)
    later = batched(llama, short, gap_s=0.01)
    assert not first.done.is_set()  # the short ones finished and left while it ran
    assert [first.ids(), *(s.ids() for s in later)] == expected


def test_stop_leaves_the_batch_and_the_others_go_on(llama: TransformersBackend) -> None:
    requests = [Request(chat_ids(llama, q), temperature=0.0, max_tokens=40)
                for q in QUESTIONS[:3]]
    expected = alone(llama, requests[1])
    sinks = [Collected() for _ in requests]
    assert llama.stream_to is not None
    stops = [llama.stream_to(r, s) for r, s in zip(requests, sinks, strict=True)]
    while not sinks[0].events:
        time.sleep(0.001)
    stops[0]()
    assert sinks[0].done.wait(30)
    assert not any(isinstance(e, Finish) for e in sinks[0].events)  # cut, not finished
    assert sinks[1].ids() == expected
    sinks[2].ids()


def test_a_failed_pass_ends_its_requests_and_the_batch_goes_on(
    llama: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = llama._scheduler
    assert scheduler is not None
    forward = scheduler.forward

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(scheduler, "forward", broken)
    sink = Collected()
    assert llama.stream_to is not None
    llama.stream_to(Request("hello", max_tokens=4), sink)
    assert sink.done.wait(30)
    assert [str(e) for e in sink.errors] == ["out of memory"]
    monkeypatch.setattr(scheduler, "forward", forward)
    assert len(alone(llama, Request("hello", temperature=0.0, max_tokens=4))) == 4


def test_one_request_failing_leaves_the_others_in_its_pass(llama: TransformersBackend) -> None:
    from lanner.backends.hf_batching import Job

    scheduler = llama._scheduler
    assert scheduler is not None and llama.stream_to is not None
    good = Request(chat_ids(llama, QUESTIONS[1]), temperature=0.0, max_tokens=12)
    expected = alone(llama, good)
    run = llama._run(Request(chat_ids(llama, QUESTIONS[0]), temperature=0.0, max_tokens=12))
    advance, calls = run.advance, []

    def fails_third(logits: torch.Tensor) -> tuple[list[Event], int | None]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("grammar broke")
        return advance(logits)

    run.advance = fails_third  # type: ignore[method-assign]
    bad, ok = Collected(), Collected()
    scheduler.submit(Job(run, bad))
    llama.stream_to(good, ok)
    assert ok.ids() == expected
    assert bad.done.wait(30) and [str(e) for e in bad.errors] == ["grammar broke"]


def test_more_requests_than_slots_wait_their_turn(llama_dir: Path) -> None:
    backend = TransformersBackend(llama_dir, n_seq_max=2)
    requests = [Request(chat_ids(backend, q), temperature=0.0, max_tokens=6) for q in QUESTIONS]
    expected = [alone(backend, r) for r in requests]
    assert [s.ids() for s in batched(backend, requests)] == expected
    assert backend.stats()["max_batch_seqs"] == 2
    backend.close()


def test_sampled_requests_with_seeds_equal_each_alone(llama: TransformersBackend) -> None:
    requests = [Request(chat_ids(llama, q), temperature=1.0, top_p=0.9, seed=i, max_tokens=10)
                for i, q in enumerate(QUESTIONS[:4])]
    expected = [alone(llama, r) for r in requests]
    assert [s.ids() for s in batched(llama, requests)] == expected


@pytest.mark.slow
def test_adapters_in_one_batch_keep_their_own_weights(
    llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("adapters")
    base = TransformersBackend(llama_dir)
    views = {"base": base,
             "blue": base.add_adapter(train_adapter(root / "blue", llama_dir, max_steps=15),
                                      "blue"),
             "other": base.add_adapter(train_adapter(root / "other", llama_dir, max_steps=15,
                                                     seed=7, learning_rate=0.03), "other")}
    ids = chat_ids(base, QUESTIONS[0])
    expected = {name: greedy(view, ids) for name, view in views.items()}
    assert len({tuple(v) for v in expected.values()}) == 3  # three different answers
    sinks = {}
    for _ in range(2):  # interleaved: base, blue, other, base, blue, other
        for name, view in views.items():
            sink = Collected()
            assert view.stream_to is not None
            view.stream_to(Request(ids, temperature=0.0, max_tokens=12), sink)
            sinks.setdefault(name, []).append(sink)
    for name, collected in sinks.items():
        assert [s.ids() for s in collected] == [expected[name]] * 2
    assert base.stats()["max_batch_seqs"] >= 3
    base.close()


@pytest.mark.slow
def test_smollm2_concurrent_chats_equal_each_alone(smollm2_hf_folder: Path) -> None:
    backend = TransformersBackend(smollm2_hf_folder)
    questions = ["What is the capital of France?", "Name three colours.",
                 "Write a haiku about the sea.", "What is 2 + 2?"]
    requests = [Request(chat_ids(backend, q), temperature=0.0, max_tokens=24)
                for q in questions]
    expected = [alone(backend, r) for r in requests]
    assert [s.ids() for s in batched(backend, requests, gap_s=0.05)] == expected
    assert backend.stats()["max_batch_seqs"] >= 2
    backend.close()


def test_gpu_decode_benchmark_smoke_mode_runs_on_the_cpu() -> None:
    """benchmarks/gpu_decode.py --smoke: the Falcon-shaped model through the
    transformers path, alone, beside HF generate and in concurrent streams."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_decode.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--streams", "3",
                           "--repeats", "1", "--tokens", "6"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "2 layers, hidden 256, multi-query, parallel attention" in out
    for line in ("of roofline (target >= 70%)", "lanner / HF = ", "3 concurrent streams",
                 "greedy tokens identical to HF generate: yes"):
        assert line in out, out
