"""The transformers backend against Hugging Face's own implementation.

Tiny random-weight Llama and Falcon models (built here, with a byte-level BPE
tokenizer trained here) check that generation, logprobs and scoring equal what
``transformers`` computes directly; the bundled SmolLM2 GGUF, converted once per
session, checks the GGUF path end to end with a real chat.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lanner.backends import conversion_cache, gguf_convert, hf_kernels, hf_sampling, hf_weights
from lanner.backends.base import Backend
from lanner.backends.hf_run import IncrementalDetokenizer
from lanner.backends.transformers import TransformersBackend
from lanner.engine.types import Finish, Request, TextDelta, collect
from lanner.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus for a tiny model.",
    "a model reads tokens and writes tokens, one at a time.",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BOS, EOS, PAD = 0, 1, 2
PROMPT = "the quick brown fox"


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE (every byte is a token, so any id sequence decodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHATML,
    )


def save_model(folder: Path, model: Any, tokenizer: PreTrainedTokenizerFast) -> Path:
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = make_tokenizer(add_bos=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=256,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    return save_model(tmp_path_factory.mktemp("llama"), model, tokenizer)


@pytest.fixture(scope="module")
def falcon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = make_tokenizer(add_bos=False)
    torch.manual_seed(3)  # a seed whose greedy output does not start with EOS
    config = FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, vocab_size=len(tokenizer),
        max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2,
    )
    model = FalconForCausalLM(config)
    return save_model(tmp_path_factory.mktemp("falcon"), model, tokenizer)


@pytest.fixture(scope="module")
def llama(llama_dir: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(llama_dir)
    yield backend
    backend.close()


def reference(folder: Path) -> Any:
    """The same checkpoint loaded by transformers alone."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt_ids: list[int], n: int) -> list[int]:
    """``model.generate`` greedy continuation, without the EOS it may end on."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    new = out[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    return new[:-1] if new and new[-1] in eos_ids else new


# -- generation equals transformers ------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_greedy_tokens_equal_hf_generate(arch: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(f"{arch}_dir")
    backend = TransformersBackend(folder)
    assert isinstance(backend, Backend)
    prompt_ids = backend.tokenize(PROMPT)
    out = collect(backend.stream(Request(prompt_ids, max_tokens=20, temperature=0.0)))
    expected = hf_greedy(reference(folder), prompt_ids, 20)
    assert [t.id for t in out.tokens] == expected
    assert len(expected) == 20  # the whole length ran: the comparison covers 20 steps
    assert out.finish is not None and out.finish.reason == "length"
    assert out.finish.usage.prompt_tokens == len(prompt_ids)
    assert out.finish.usage.completion_tokens == 20
    assert out.text == backend.detokenize(expected)


def test_metadata_and_tokenize(llama: TransformersBackend, falcon_dir: Path) -> None:
    meta = llama.metadata
    assert (meta.architecture, meta.bos_token, meta.eos_token) == ("llama", "<s>", "</s>")
    assert meta.chat_template == CHATML
    assert meta.n_ctx_train == 256 and llama.n_ctx == 256
    assert llama.name == "transformers" and llama.version == transformers.__version__
    assert llama.tokenize("the </s>", special=True)[0] == BOS
    assert llama.tokenize("the </s>", special=True)[-1] == EOS
    assert EOS not in llama.tokenize("the </s>", special=False)
    assert llama.tokenize("the", add_bos=False)[0] != BOS
    assert llama.detokenize(llama.tokenize("hello world", add_bos=False)) == "hello world"
    falcon = TransformersBackend(falcon_dir, n_ctx=64)
    assert falcon.metadata.architecture == "falcon" and falcon.n_ctx == 64
    assert BOS not in falcon.tokenize("the fox")  # a tokenizer without BOS gets none


def test_logprobs_equal_log_softmax_of_model_logits(llama: TransformersBackend) -> None:
    prompt_ids = llama.tokenize(PROMPT)
    req = Request(prompt_ids, max_tokens=8, logprobs=True, top_logprobs=5, temperature=0.0)
    tokens = collect(llama.stream(req)).tokens
    ids = prompt_ids + [t.id for t in tokens]
    with torch.inference_mode():
        logits = llama.model(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1 : -1]  # (8, V)
    for token, row in zip(tokens, expected, strict=True):
        assert token.logprob == pytest.approx(float(row[token.id]), abs=1e-4)
        values = [alt.logprob for alt in token.top]
        assert values == sorted(values, reverse=True) and len(values) == 5
        assert [alt.token_id for alt in token.top] == torch.topk(row, 5).indices.tolist()
        assert values == pytest.approx(torch.topk(row, 5).values.tolist(), abs=1e-4)
        assert token.top[0].token_id == token.id  # greedy picks the best alternative
        assert token.top[0].token == llama.detokenize([token.id])


def test_no_logprobs_unless_asked(llama: TransformersBackend) -> None:
    tokens = collect(llama.stream(Request(PROMPT, max_tokens=3, temperature=0.0))).tokens
    assert all(t.logprob is None and t.top == () for t in tokens)


def test_same_seed_same_text_other_seed_other_text(llama: TransformersBackend) -> None:
    def sample(seed: int) -> list[int]:
        req = Request(PROMPT, max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                      seed=seed)
        return [t.id for t in collect(llama.stream(req)).tokens]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_bfloat16_loads_and_generates(llama_dir: Path) -> None:
    backend = TransformersBackend(llama_dir, dtype="bfloat16")
    assert backend.model.dtype == torch.bfloat16
    assert backend.metadata.extra["dtype"] == "bfloat16"
    out = collect(backend.stream(Request(PROMPT, max_tokens=5, temperature=0.0)))
    assert len(out.tokens) == 5 and out.finish is not None and out.finish.reason == "length"
    backend.close()
    assert backend.model is None


def test_bfloat16_weights_are_not_packed_twice_without_room(
        llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN-packed copy doubles the linear weights' memory: it is made
    only while it takes at most half of what the system has available."""

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    linear_bytes = sum(m.weight.numel() * 2 for m in model.modules()
                       if type(m) is torch.nn.Linear)
    # Without oneDNN bfloat16, AVX2 CPUs take the exact kernel, which needs no copy.
    unpacked = "bf16-kernel" if hf_kernels.bf16_linear() is not None else None
    monkeypatch.setattr(hf_weights, "available_memory", lambda: 2 * linear_bytes - 2)
    assert hf_weights.prepare(model) == unpacked
    assert not any(hasattr(m, "packed_weight") for m in model.modules())
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        monkeypatch.setattr(hf_weights, "available_memory", lambda: 2 * linear_bytes)
        assert hf_weights.prepare(model) == "onednn-packed"
    monkeypatch.setattr(hf_weights, "available_memory", lambda: None)
    assert hf_weights.prepare(AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.bfloat16).eval()) == unpacked


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_weight_layouts_keep_the_model_s_logits(llama_dir: Path, dtype: str) -> None:
    """On a CPU the backend lays its linear weights out for fast decode steps
    (``hf_weights``): column-major in float32 (logits equal the plain model's
    to float tolerance), oneDNN-packed in bfloat16 (bit for bit), in a prompt
    pass and a one-token pass; greedy tokens equal generate's on the plain model."""
    backend = TransformersBackend(llama_dir, dtype=dtype)
    plain = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype)).eval()
    linears = [m for m in backend.model.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    if dtype == "float32":
        assert backend.weight_layout == "column-major+onednn-rows"  # room for the copy here
        assert all(m.weight.stride()[0] == 1 for m in linears)  # column-major
        for layer in backend.model.model.layers:  # q/k/v and gate/up: views of one matrix
            attn, mlp = layer.self_attn, layer.mlp
            assert attn.qkv_t.shape == (64, 64 + 32 + 32) and mlp.gate_up_t.shape == (64, 256)
            # the copies packed for several rows: q/k/v and gate/up stacked, one each
            assert attn.qkv_rows.shape == (64 + 32 + 32, 64)
            assert mlp.gate_up_rows.shape == (256, 64)
            stacked = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
            assert not any(hasattr(m, "packed_rows") for m in stacked)
            assert all(m.packed_rows.shape == m.weight.shape for m in (attn.o_proj, mlp.down_proj))
            assert attn.q_proj.weight.data_ptr() == attn.qkv_t.data_ptr()
            assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_t.data_ptr()
        assert backend.model.lm_head.packed_rows.shape == backend.model.lm_head.weight.shape
        tolerance = {"rtol": 1e-5, "atol": 1e-5}
    else:
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        kernel = hf_kernels.bf16_linear() is not None  # AVX2 without oneDNN bfloat16
        assert backend.weight_layout == ("onednn-packed" if bf16 else
                                         "bf16-kernel" if kernel else None)
        assert all(hasattr(m, "packed_weight") == bf16 for m in linears)
        on_kernel = [getattr(m.forward, "__func__", None) is hf_weights._kernel_forward
                     for m in linears]
        assert all(k == kernel for k in on_kernel)
        for layer in backend.model.model.layers:  # and q/k/v, gate/up stacked, one copy each
            assert hasattr(layer.self_attn, "qkv_packed") == bf16
            assert hasattr(layer.mlp, "gate_up_packed") == bf16
        tolerance = {"rtol": 0, "atol": 0}
    assert backend.metadata.extra["weight_layout"] == backend.weight_layout
    assert all(m.weight.is_contiguous() for m in plain.modules() if type(m) is torch.nn.Linear)
    prompt_ids = backend.tokenize(PROMPT)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for n in (ids.shape[1], 1):
            torch.testing.assert_close(backend.model(ids[:, :n]).logits,
                                       plain(ids[:, :n]).logits, **tolerance)
    out = collect(backend.stream(Request(prompt_ids, max_tokens=20, temperature=0.0)))
    assert [t.id for t in out.tokens] == hf_greedy(plain, prompt_ids, 20)
    backend.close()


# -- ending a generation -------------------------------------------------------


def test_stop_string_cuts_text_and_finishes_stop(llama: TransformersBackend) -> None:
    full = collect(llama.stream(Request(PROMPT, max_tokens=20, temperature=0.0))).text
    stop = full[8:11]
    assert len(stop) == 3 and stop.strip()
    out = collect(llama.stream(Request(PROMPT, max_tokens=20, stop=(stop,), temperature=0.0)))
    assert out.text == full[: full.index(stop)]
    assert out.finish is not None and out.finish.reason == "stop"
    assert out.finish.usage.completion_tokens < 20


def test_max_tokens_and_full_context_finish_length(llama_dir: Path) -> None:
    backend = TransformersBackend(llama_dir, n_ctx=10)
    prompt_ids = backend.tokenize(PROMPT)
    out = collect(backend.stream(Request(prompt_ids, max_tokens=None, temperature=0.0)))
    assert out.finish is not None and out.finish.reason == "length"
    assert out.finish.usage.completion_tokens == 10 - len(prompt_ids) == len(out.tokens)
    with pytest.raises(ContextLengthExceeded):
        backend.stream(Request(list(range(3, 13)), temperature=0.0))  # refused before any token


def test_generation_config_eos_list_stops(llama_dir: Path, tmp_path: Path) -> None:
    greedy = collect(TransformersBackend(llama_dir).stream(
        Request(PROMPT, max_tokens=20, temperature=0.0))).tokens
    stop_id = greedy[3].id
    first = next(i for i, t in enumerate(greedy) if t.id == stop_id)
    folder = Path(shutil.copytree(llama_dir, tmp_path / "eos"))
    gen_config = json.loads((folder / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [EOS, stop_id]
    (folder / "generation_config.json").write_text(json.dumps(gen_config))
    backend = TransformersBackend(folder)
    out = collect(backend.stream(Request(PROMPT, max_tokens=20, temperature=0.0)))
    assert [t.id for t in out.tokens] == [t.id for t in greedy[:first]]
    assert out.finish is not None and out.finish.reason == "stop"
    assert out.finish.usage.completion_tokens == first


def test_closing_the_stream_early_frees_the_kv_cache(llama: TransformersBackend) -> None:
    scheduler = llama._scheduler
    assert scheduler is not None
    stream = llama.stream(Request(PROMPT, max_tokens=50, temperature=0.0))
    first = next(stream)
    assert isinstance(first, TextDelta)
    assert llama.stats()["active_sequences"] == 1
    assert scheduler._cache.rows == 1
    stream.close()  # returns once the request has left its slot
    assert llama.stats()["active_sequences"] == 0
    deadline = time.monotonic() + 10
    while scheduler._cache.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler._cache.rows == 0  # idle: the KV memory is given back


def test_an_eval_sends_as_many_requests_at_once_as_the_backend_batches(
        llama: TransformersBackend, tmp_path: Path) -> None:
    """The eval runner runs ``n_seq_max`` generation items at once; here they
    share decode steps instead of queueing one behind another."""
    from lanner.engine.engine import Engine
    from lanner.evals import runner
    from lanner.evals.taskfile import load_task

    assert llama.n_seq_max > 1
    model = Engine(tmp_path / "home").attach("tiny", llama)
    task = load_task(Path(__file__).parent / "data" / "evals" / "gen_tiny.yaml")
    result = runner.evaluate(model, task)
    assert len(result.items) == 12
    assert llama.stats()["max_batch_seqs"] > 1


def test_model_with_a_sliding_window_decodes_alone(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window shorter than the context is not one causal mask: such a model
    keeps transformers' own cache and has no batched stream_to, same tokens."""
    config = json.loads((llama_dir / "config.json").read_text())
    folder = tmp_path / "windowed"
    shutil.copytree(llama_dir, folder)
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    windowed = TransformersBackend(folder)
    assert windowed.stream_to is None and windowed._scheduler is None
    assert windowed.n_seq_max == 1
    caches: list[weakref.ref[Any]] = []
    new_cache = windowed._new_cache

    def tracked() -> Any:
        cache = new_cache()
        caches.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(windowed, "_new_cache", tracked)
    request = Request(PROMPT, max_tokens=12, temperature=0.0)
    plain = TransformersBackend(llama_dir)
    expected = [t.id for t in collect(plain.stream(request)).tokens]
    assert [t.id for t in collect(windowed.stream(request)).tokens] == expected
    stream = windowed.stream(Request(PROMPT, max_tokens=50, temperature=0.0))
    next(stream)
    assert caches[-1]() is not None
    stream.close()
    gc.collect()
    assert caches[-1]() is None


def test_stream_ends_with_one_finish_and_text_matches_tokens(llama: TransformersBackend) -> None:
    events = list(llama.stream(Request(PROMPT, max_tokens=30, temperature=1.5, seed=3)))
    assert isinstance(events[-1], Finish)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    ids = [t.id for e in events[:-1] if isinstance(e, TextDelta) for t in e.tokens]
    text = "".join(e.text for e in events[:-1] if isinstance(e, TextDelta))
    assert text == llama.detokenize(ids)  # whole characters, nothing lost or doubled


def test_incremental_detokenizer_never_splits_a_character(llama: TransformersBackend) -> None:
    e_acute = llama.tokenize("é", add_bos=False)
    assert len(e_acute) == 2  # two byte tokens
    detok = IncrementalDetokenizer(llama.detokenize, llama.tokenize("caf", add_bos=False))
    assert detok.push(e_acute[0]) == ""
    assert detok.push(e_acute[1]) == "é"
    assert detok.push(e_acute[0]) == ""
    assert detok.flush() == "\ufffd"  # an unfinished character is given up at the end


# -- scoring ---------------------------------------------------------------------


def test_loglikelihood_equals_model_logprobs(llama: TransformersBackend) -> None:
    context, continuation = "the quick brown", " fox jumps"
    total, greedy = llama.loglikelihood(context, continuation)
    ctx = llama.tokenize(context)
    whole = llama.tokenize(context + continuation)
    with torch.inference_mode():
        logprobs = torch.log_softmax(llama.model(torch.tensor([whole])).logits[0].float(), -1)
    rows = logprobs[len(ctx) - 1 : -1]
    targets = torch.tensor(whole[len(ctx) :])
    assert total == pytest.approx(float(rows.gather(1, targets[:, None]).sum()), abs=1e-4)
    assert greedy == bool((rows.argmax(-1) == targets).all())
    assert llama.loglikelihood("the quick brown ", "fox jumps")[0] == pytest.approx(total)


def test_loglikelihood_of_greedy_token_is_greedy(llama: TransformersBackend) -> None:
    first = collect(llama.stream(Request(PROMPT, max_tokens=1, logprobs=True, temperature=0.0)))
    token = first.tokens[0]
    # The continuation must tokenize back to the greedy token for the check to mean anything.
    assert llama.tokenize(PROMPT + token.text) == llama.tokenize(PROMPT) + [token.id]
    total, greedy = llama.loglikelihood(PROMPT, token.text)
    assert greedy and total == pytest.approx(token.logprob, abs=1e-4)


# -- errors --------------------------------------------------------------------


def test_loglikelihood_batch_equals_one_pair_at_a_time(llama: TransformersBackend) -> None:
    """Shared contexts scored in one pass (4D mask) give each pair's own value."""
    pairs = [("the quick brown", " fox"), ("the quick brown", " fox jumps over"),
             ("the quick brown", " dog"), ("hello", " world"), ("", "the lazy dog"),
             ("hello", ""), ("a b c", " d e f g h")]
    batched = llama.loglikelihood_batch(pairs)
    for (context, continuation), (value, greedy) in zip(pairs, batched, strict=True):
        expected = llama.loglikelihood(context, continuation)
        assert value == pytest.approx(expected[0], abs=1e-4)
        assert greedy == expected[1]


def test_missing_and_broken_models_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        TransformersBackend(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError) as info:
        TransformersBackend(broken)
    assert "\n" not in str(info.value) and str(broken) in str(info.value)


def test_bad_options_name_the_field(llama_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="dtype"):
        TransformersBackend(llama_dir, dtype="float8")
    with pytest.raises(InvalidRequest, match="n_ctx"):
        TransformersBackend(llama_dir, n_ctx=0)


def test_prompt_ids_outside_vocabulary_are_refused(llama: TransformersBackend) -> None:
    with pytest.raises(InvalidRequest, match="prompt"):
        llama.stream(Request([5, 10_000]))


def test_unreadable_gguf_leaves_no_cache_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    cache = tmp_path / "converted"
    with pytest.raises(ModelLoadError):
        TransformersBackend(bad, cache_dir=cache)
    # No half-written folder, no temp folder: only the hash index and its lock.
    assert {e.name for e in cache.iterdir()} <= {conversion_cache.INDEX, conversion_cache.LOCK}


def test_conversions_default_to_the_lanner_home(lanner_home: Path) -> None:
    assert gguf_convert.default_cache_root() == lanner_home / "converted"


# -- sampler ---------------------------------------------------------------------


def test_masks_equal_hf_logits_warpers() -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(500) * 3
    ids = torch.zeros(1, 1, dtype=torch.long)
    cases = [
        (hf_sampling.top_k_mask(logits, 7), TopKLogitsWarper(7)),
        (hf_sampling.top_p_mask(logits, 0.9), TopPLogitsWarper(0.9)),
        (hf_sampling.min_p_mask(logits, 0.05), MinPLogitsWarper(0.05)),
    ]
    for ours, warper in cases:
        theirs = warper(ids, logits[None].clone())[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert 0 < int(torch.isfinite(ours).sum()) < 500


def test_masks_on_known_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def kept(masked: torch.Tensor) -> list[int]:
        return torch.isfinite(masked).nonzero().flatten().tolist()

    assert kept(hf_sampling.top_k_mask(logits, 2)) == [0, 1]
    assert kept(hf_sampling.top_k_mask(logits, 0)) == [0, 1, 2, 3]
    assert kept(hf_sampling.top_p_mask(logits, 0.7)) == [0, 1]
    assert kept(hf_sampling.top_p_mask(logits, 0.4)) == [0]
    assert kept(hf_sampling.top_p_mask(logits, 1.0)) == [0, 1, 2, 3]
    assert kept(hf_sampling.min_p_mask(logits, 0.2)) == [0, 1, 2]
    assert kept(hf_sampling.min_p_mask(logits, 0.0)) == [0, 1, 2, 3]


def test_repetition_penalty_hf_semantics() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([0, 1, 1])
    out = hf_sampling.apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    theirs = RepetitionPenaltyLogitsProcessor(2.0)(seen[None], logits[None].clone())[0]
    assert torch.equal(out, theirs)
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched


def test_presence_and_frequency_penalties_count_the_completion_only() -> None:
    request = Request([9, 9], presence_penalty=0.5, frequency_penalty=0.25)
    (process,) = hf_sampling.make_logits_processors(request, prompt_len=2)
    logits = torch.zeros(10)
    out = process(logits, torch.tensor([9, 9, 3, 3, 5]))  # prompt [9, 9], completion [3, 3, 5]
    assert out[3] == pytest.approx(-1.0) and out[5] == pytest.approx(-0.75)
    assert out[9] == 0.0  # prompt tokens are not penalised (OpenAI semantics)


def test_sampler_respects_masks_and_seed() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert set(draws(logits, seed=0, top_k=2)) == {0, 1}
    assert draws(logits, seed=0) == draws(logits, seed=0)
    assert draws(logits, seed=0) != draws(logits, seed=1)
    assert set(draws(logits, seed=0)) == {0, 1, 2, 3}
    assert set(draws(logits, seed=0, temperature=0.0)) == {0}
    assert set(draws(logits, seed=0, min_p=0.6)) == {0, 1}


@pytest.mark.parametrize("options", [
    {"top_k": 10, "top_p": 0.9, "min_p": 0.02},  # the k-best path
    {"top_k": 0, "top_p": 0.8, "min_p": 0.0},  # the full-vocabulary path
])
def test_sampler_draws_follow_the_masked_softmax(options: dict[str, Any]) -> None:
    """The sampler draws over the tokens the masks keep (the k best when top-k
    is set); its frequencies match softmax of the masked logits (chi-square),
    and nothing outside the kept set is ever drawn."""
    from scipy import stats

    torch.manual_seed(5)
    logits = torch.randn(60) * 2
    reference = hf_sampling.min_p_mask(hf_sampling.top_p_mask(
        hf_sampling.top_k_mask(logits / 0.7, options["top_k"]), options["top_p"]),
        options["min_p"])
    probs = torch.softmax(reference, dim=-1)
    kept = torch.nonzero(probs > 0)[:, 0]
    assert 3 <= len(kept) <= 20  # the masks did cut, and more than one token is left
    generator = torch.Generator().manual_seed(1)
    sample = hf_sampling.make_sampler(0.7, generator=generator, **options)
    counts = torch.bincount(torch.stack([sample(logits) for _ in range(6000)]), minlength=60)
    assert counts[probs == 0].sum() == 0
    expected = probs[kept].double() / probs[kept].double().sum() * 6000
    assert stats.chisquare(counts[kept].double(), expected).pvalue > 0.001


def test_sampler_keeps_logits_tied_at_the_k_th() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, -5.0])  # the 3rd best ties with two more
    assert set(draws(logits, seed=0, top_k=3, top_p=1.0)) == {0, 1, 2, 3, 4}


def draws(logits: torch.Tensor, seed: int, temperature: float = 1.0, **options: Any) -> list[int]:
    """200 draws from a sampler with its own generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    sample = hf_sampling.make_sampler(temperature, generator=generator, **options)
    return [int(sample(logits)) for _ in range(200)]


# -- the bundled SmolLM2, through GGUF conversion ---------------------------------


@pytest.fixture(scope="session")
def converted_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path, converted_cache: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(smollm2_gguf, cache_dir=converted_cache)
    yield backend
    backend.close()


def chat_ids(backend: TransformersBackend, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    text = backend.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return backend.tokenize(text, add_bos=False, special=True)


@pytest.mark.slow
def test_converted_smollm2_answers_paris_like_hf_generate(smollm2: TransformersBackend) -> None:
    prompt_ids = chat_ids(smollm2, "What is the capital of France?")
    out = collect(smollm2.stream(Request(prompt_ids, max_tokens=40, temperature=0.0)))
    assert "Paris" in out.text
    assert out.finish is not None and out.finish.reason == "stop"  # ended on <|im_end|>
    assert [t.id for t in out.tokens] == hf_greedy(smollm2.model, prompt_ids, 40)


@pytest.mark.slow
def test_converted_smollm2_metadata_and_scoring(smollm2: TransformersBackend) -> None:
    meta = smollm2.metadata
    assert meta.architecture == "llama" and meta.eos_token == "<|im_end|>"
    assert meta.chat_template is not None and "<|im_start|>" in meta.chat_template
    assert meta.n_ctx_train == 8192
    assert str(meta.extra["converted_from"]).endswith(".gguf")
    paris, paris_greedy = smollm2.loglikelihood("The capital of France is", " Paris")
    london, london_greedy = smollm2.loglikelihood("The capital of France is", " London")
    assert paris_greedy and not london_greedy and paris > london


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_greedy_tokens_equal_hf_generate_in_each_dtype(
        smollm2_gguf: Path, converted_cache: Path, dtype: str) -> None:
    """The bundled model, its weights laid out for CPU decoding (``hf_weights``),
    decodes the tokens HF generate does on the plain model in the same dtype.
    (Not every prompt agrees in bfloat16: "Write a haiku about the sea." parts
    at a one-ulp tie, 16.375 against 16.25, with or without the layouts.)"""
    backend = TransformersBackend(smollm2_gguf, cache_dir=converted_cache, dtype=dtype)
    plain = AutoModelForCausalLM.from_pretrained(backend.folder,
                                                 dtype=getattr(torch, dtype)).eval()
    for question in ("What is the capital of France?",
                     "Write a long, detailed essay about the history of the Roman Empire."):
        prompt_ids = chat_ids(backend, question)
        out = collect(backend.stream(Request(prompt_ids, max_tokens=48, temperature=0.0)))
        assert [t.id for t in out.tokens] == hf_greedy(plain, prompt_ids, 48)
    backend.close()


@pytest.fixture(scope="module")
def tinycoder(
    tinycoder_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TransformersBackend]:
    """The bundled 2-layer random Llama GGUF (Llama's SentencePiece vocab), converted."""
    backend = TransformersBackend(tinycoder_gguf, cache_dir=tmp_path_factory.mktemp("converted"))
    yield backend
    backend.close()


def test_gguf_conversion_is_cached_and_reused(
    tinycoder: TransformersBackend, tinycoder_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tinycoder.folder.parent
    named = {e.name for e in cache.iterdir()} - {conversion_cache.INDEX, conversion_cache.LOCK}
    assert named == {gguf_convert.gguf_sha256(tinycoder_gguf)[:16]}
    for name in ("config.json", "model.safetensors", "tokenizer.json", gguf_convert.MANIFEST):
        assert (tinycoder.folder / name).is_file()
    manifest = gguf_convert.read_manifest(tinycoder.folder)
    assert manifest["source"] == str(tinycoder_gguf.resolve())

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "_convert", no_conversion)
    again = TransformersBackend(tinycoder_gguf, cache_dir=cache)
    assert again.folder == tinycoder.folder
    again.close()


def test_converted_tinycoder_matches_hf_generate_and_keeps_spaces(
    tinycoder: TransformersBackend,
) -> None:
    meta = tinycoder.metadata
    assert (meta.architecture, meta.bos_token, meta.eos_token) == ("llama", "<s>", "</s>")
    prompt_ids = tinycoder.tokenize("def fib(n):")
    assert prompt_ids[0] == tinycoder.tokenizer.bos_token_id  # Llama's tokenizer adds BOS
    out = collect(tinycoder.stream(Request(prompt_ids, max_tokens=16, temperature=0.0)))
    ids = [t.id for t in out.tokens]
    assert ids == hf_greedy(tinycoder.model, prompt_ids, 16)
    # Streamed text is exactly what the completion adds to the prompt's text,
    # SentencePiece word-start spaces included.
    prompt_text = tinycoder.detokenize(prompt_ids)
    assert prompt_text + out.text == tinycoder.detokenize(prompt_ids + ids)
    assert " " in out.text


def test_prompt_logprobs_equal_model_logprobs(llama: TransformersBackend) -> None:
    ids = llama.tokenize("the quick brown fox")
    scored = llama.prompt_logprobs(ids, top=3)
    assert [t.id for t in scored] == ids
    assert scored[0].logprob is None and scored[0].top == ()
    with torch.inference_mode():
        logprobs = torch.log_softmax(llama.model(torch.tensor([ids])).logits[0].float(), -1)
    for k in range(1, len(ids)):
        assert scored[k].logprob == pytest.approx(float(logprobs[k - 1, ids[k]]), abs=1e-4)
        best = torch.topk(logprobs[k - 1], 3).indices.tolist()
        assert [a.token_id for a in scored[k].top] == best
    assert "".join(t.text for t in scored) == llama.detokenize(ids)
    with pytest.raises(InvalidRequest, match="prompt"):
        llama.prompt_logprobs([5, 10_000])
