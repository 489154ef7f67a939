"""Long context: RoPE scaling through both backends (the same next token past
the trained context), its record in the log, the chat's context gauge and the
oldest turns dropped when a conversation outgrows the window."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import pytest
from transformers import LlamaConfig

from lanner.backends import rope
from lanner.backends.fake import FakeBackend
from lanner.backends.gguf_reencode import reencoded
from lanner.backends.llamacpp import LlamaCppBackend
from lanner.backends.transformers import TransformersBackend
from lanner.chat.session import ChatSession, Dropped
from lanner.engine.engine import Engine
from lanner.engine.types import Request, Token, collect
from lanner.errors import ContextLengthExceeded, InvalidRequest
from lanner.store import Store

LANNER = [sys.executable, "-m", "lanner"]


def lanner(*args: str, home: Path, stdin: str | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LANNER, "--home", str(home), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


# -- the scaling itself --------------------------------------------------------


def test_a_factor_needs_a_scaling_and_must_stretch() -> None:
    with pytest.raises(InvalidRequest, match="rope_factor: needs a rope_scaling"):
        rope.resolve(None, 2.0, None, 2048)
    with pytest.raises(InvalidRequest, match="rope_scaling: must be one of linear, yarn"):
        rope.resolve("ntk", 2.0, None, 2048)
    for bad in (1.0, 0.5, float("nan"), True):
        with pytest.raises(InvalidRequest, match="rope_factor: must be a number above 1"):
            rope.resolve("yarn", bad, None, 2048)
    with pytest.raises(InvalidRequest, match="trained context of 2048 tokens"):
        rope.resolve("linear", None, 2048, 2048)
    assert rope.resolve(None, None, 4096, 2048) is None


def test_without_a_factor_the_window_gives_it() -> None:
    scaling = rope.resolve("yarn", None, 6144, 2048)
    assert scaling == rope.RopeScaling("yarn", 3.0, 2048)
    assert scaling.context == 6144
    # The default window grows by the factor (the unscaled default is capped for KV memory).
    assert rope.default_window(2048, 8192, scaling) == 6144
    assert rope.default_window(32768, 8192, rope.RopeScaling("linear", 2.0, 32768)) == 16384
    assert rope.default_window(32768, 8192, None) == 8192


def test_transformers_config_gets_rope_parameters() -> None:
    config = LlamaConfig(max_position_embeddings=1024, rope_theta=50000.0)
    linear = rope.scaled_rope_parameters(config, rope.RopeScaling("linear", 2.0, 1024))
    assert linear == {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    yarn = rope.scaled_rope_parameters(config, rope.RopeScaling("yarn", 4.0, 1024))
    assert yarn == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0,
                    "original_max_position_embeddings": 1024, "beta_fast": 32.0,
                    "beta_slow": 1.0}
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 10000.0})
    with pytest.raises(InvalidRequest, match="already uses linear RoPE scaling"):
        rope.scaled_rope_parameters(scaled, rope.RopeScaling("yarn", 2.0, 2048))


# -- llama.cpp and transformers agree past the trained context ------------------

TRAINED = 256  # SmolLM2's GGUF says 8192; this copy says 256 so the test is quick
PROMPT_TOKENS = 460  # past the trained context, inside twice it


def _declare_context(src: Path, dst: Path, n_ctx: int) -> None:
    """Copy a GGUF, its llama.context_length (a uint32 in the header) set to ``n_ctx``."""
    shutil.copyfile(src, dst)
    key = b"llama.context_length"
    with dst.open("r+b") as f:
        head = f.read(1 << 20)
        at = head.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        assert struct.unpack_from("<I", head, at)[0] == 4  # GGUF type uint32
        f.seek(at + 4)
        f.write(struct.pack("<I", n_ctx))


@pytest.fixture(scope="module")
def short_trained(smollm2_gguf: Path, smollm2_hf_folder: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """SmolLM2 saying its trained context is 256: the F16 GGUF llama.cpp runs, and
    the same weights as a transformers folder (config.json says 256 too)."""
    work = tmp_path_factory.mktemp("short-trained")
    _declare_context(smollm2_gguf, work / "smollm2-256.gguf", TRAINED)
    gguf = reencoded(work / "smollm2-256.gguf", "f16", work / "f16")
    folder = work / "hf"
    folder.mkdir()
    for item in smollm2_hf_folder.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "config.json").unlink()
    config = json.loads((smollm2_hf_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config,
                                                    "max_position_embeddings": TRAINED}))
    return gguf, folder


def _next_token(backend: Any, ids: list[int]) -> Token:
    result = collect(backend.stream(Request(prompt=ids, max_tokens=1, temperature=0.0,
                                            logprobs=True, top_logprobs=5)))
    token: Token = result.tokens[0]
    return token


@pytest.fixture(scope="module")
def unscaled(short_trained: tuple[Path, Path]) -> tuple[list[int], Token]:
    """The prompt's ids (the GGUF's tokenizer: the converted one splits some
    newlines differently, so both backends get these ids) and llama.cpp's
    next token without scaling."""
    text = topics["assignment"][:4000]  # Python's reference manual: prose that stays put
    with LlamaCppBackend(short_trained[0], n_ctx=2 * TRAINED, n_seq_max=1) as b:
        ids = b.tokenize(text)[:PROMPT_TOKENS]
        assert len(ids) == PROMPT_TOKENS
        return ids, _next_token(b, ids)


@pytest.mark.parametrize("kind", rope.SCALINGS)
def test_both_backends_give_the_same_next_token_at_twice_the_trained_context(
    kind: str, short_trained: tuple[Path, Path], unscaled: tuple[list[int], Token],
) -> None:
    gguf, folder = short_trained
    ids, plain = unscaled
    with LlamaCppBackend(gguf, rope_scaling=kind, rope_factor=2.0, n_seq_max=1) as b:
        assert (b.metadata.n_ctx_train, b.n_ctx) == (TRAINED, 2 * TRAINED)
        llama = _next_token(b, ids)
    hf = TransformersBackend(folder, rope_scaling=kind, rope_factor=2.0, dtype="float32")
    try:
        assert (hf.metadata.n_ctx_train, hf.n_ctx) == (TRAINED, 2 * TRAINED)
        torch_side = _next_token(hf, ids)
    finally:
        hf.close()
    assert llama.id == torch_side.id, (llama.top, torch_side.top)
    # Not only the winner: the whole top 5, to within F16-vs-F32 rounding.
    assert [t.token_id for t in llama.top[:3]] == [t.token_id for t in torch_side.top[:3]]
    for a, b2 in zip(llama.top, torch_side.top, strict=True):
        if a.token_id == b2.token_id:
            assert a.logprob == pytest.approx(b2.logprob, abs=0.03)
    # And the scaling did something: unscaled positions give other numbers, further
    # from the scaled ones than the two backends are from each other.
    unscaled_lp = {t.token_id: t.logprob for t in plain.top}
    moved = max((abs(unscaled_lp[t.token_id] - t.logprob) for t in llama.top
                 if t.token_id in unscaled_lp), default=1.0)
    assert moved > 0.1 or set(unscaled_lp) != {t.token_id for t in llama.top}, (plain, llama)


def test_a_gguf_that_is_already_scaled_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="already uses yarn RoPE scaling"):
        rope.check_unscaled("yarn")
    rope.check_unscaled("none")
    rope.check_unscaled(None)


def test_the_log_records_the_scaling(lanner_home: Path) -> None:
    result = lanner("run", "tinycoder", "--raw", "--rope-scaling", "yarn", "--rope-factor", "2",
                    "--max-tokens", "3", "--temperature", "0", "def f", home=lanner_home)
    assert result.returncode == 0, result.stderr
    turns = json.loads(lanner("logs", "-n", "1", "--json", home=lanner_home).stdout)
    assert turns[0]["model_settings"] == {
        "n_ctx": 4096, "rope_scaling": {"type": "yarn", "factor": 2.0,
                                        "original_context": 2048}}
    shown = lanner("logs", "-n", "1", home=lanner_home).stdout
    assert "n_ctx 4096, rope yarn x2.0 of 2048" in shown
    bad = lanner("run", "tinycoder", "--raw", "--rope-factor", "2", "x", home=lanner_home)
    assert bad.returncode == 2 and "needs a rope_scaling" in bad.stderr


# -- the chat session and its window ---------------------------------------------


@pytest.fixture
def engine(lanner_home: Path) -> Iterator[Engine]:
    e = Engine(lanner_home)
    yield e
    e.close()


def _turn(i: int) -> str:
    return f"message {i} " + "x" * 60


def test_a_full_window_drops_whole_old_turns_and_keeps_the_system_prompt(
    engine: Engine, lanner_home: Path,
) -> None:
    model = engine.attach("fake", FakeBackend(lambda _: "y" * 40, n_ctx=400))
    drops: list[Dropped] = []
    with Store(lanner_home / "logs.db") as store:
        session = ChatSession(model, store, system="Be brief.", on_drop=drops.append,
                              options={"max_tokens": 40})
        for i in range(6):
            collect(session.send(_turn(i)))
            assert session.messages[0] == {"role": "system", "content": "Be brief."}
            assert session.context().tokens <= 400
        assert drops, "six 100-token turns cannot fit 400 tokens"
        assert all(d.turns >= 1 and d.window == 400 for d in drops)
        assert [m["role"] for m in drops[0].messages] == ["user", "assistant"]
        assert drops[0].messages[0]["content"] == _turn(0)
        kept = [m["content"] for m in session.messages if m["role"] == "user"]
        assert 1 <= len(kept) < 6
        assert kept == [_turn(i) for i in range(6 - len(kept), 6)]
        # Every turn was answered and logged with what was actually sent.
        turns = store.turns(limit=None)
    assert [t.prompt for t in turns] == [_turn(i) for i in range(6)]
    assert all(t.response == "y" * 40 and t.messages[0]["role"] == "system" for t in turns)
    assert _turn(0) not in [m["content"] for m in turns[-1].messages]


def test_without_an_observer_the_overflow_is_the_loud_error(engine: Engine) -> None:
    model = engine.attach("fake", FakeBackend(lambda _: "y" * 40, n_ctx=400))
    session = ChatSession(model, None, system="Be brief.", options={"max_tokens": 40})
    with pytest.raises(ContextLengthExceeded):
        for i in range(6):
            collect(session.send(_turn(i)))


def test_a_message_that_alone_overflows_is_still_an_error(engine: Engine) -> None:
    model = engine.attach("fake", FakeBackend(["ok"], n_ctx=200))
    drops: list[Dropped] = []
    session = ChatSession(model, None, system="Be brief.", on_drop=drops.append)
    collect(session.send("hello"))
    with pytest.raises(ContextLengthExceeded):
        collect(session.send("z" * 300))
    assert session.messages[0]["role"] == "system"


def test_the_gauge_counts_the_rendered_conversation(engine: Engine) -> None:
    fake = FakeBackend(["Fine."], n_ctx=1000)
    model = engine.attach("fake", fake)
    session = ChatSession(model, None, system="S")
    collect(session.send("hi"))
    use = session.context()
    text = model.chat_format.render(session.messages, add_generation_prompt=False)
    assert use.tokens == len(fake.tokenize(text, add_bos=False, special=True)) > 0
    assert (use.window, use.fraction) == (1000, use.tokens / 1000)


# -- lanner chat, through the real CLI --------------------------------------------

SYSTEM = "You are a helpful assistant. Always end with 'Ahoy!'"


def test_chat_outgrows_a_small_window_and_keeps_answering(lanner_home: Path) -> None:
    note = ("Here is a note about my trip: we took the train along the coast, stopped in "
            "three small towns, ate fish soup, walked on the beach at sunset and met a "
            "painter who showed us her studio by the harbour. ")
    questions = [f"{note}Question {i}: name a fruit and a city whose name begins with "
                 f"{'ABCDEFGH'[i]}." for i in range(8)]
    script = "\n".join([*questions[:4], "/context", *questions[4:], "/context"]) + "\n"
    result = lanner("chat", "smollm2", "--n-ctx", "512", "--max-tokens", "32",
                    "--temperature", "0", "-s", SYSTEM, home=lanner_home, stdin=script)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "lanner: error" not in result.stderr
    assert "[context window full: dropped the" in result.stderr
    assert "the system prompt stays" in result.stderr
    gauges = [line for line in result.stderr.splitlines() if line.startswith("context: ")]
    assert len(gauges) == 2 and all(" of 512 tokens (" in g for g in gauges)
    turns = json.loads(lanner("logs", "-n", "0", "--json", home=lanner_home).stdout)
    turns.sort(key=lambda t: t["id"])
    assert [t["prompt"] for t in turns] == questions  # every message answered
    assert all(t["response"].strip() for t in turns)
    for t in turns:
        assert t["messages"][0] == {"role": "system", "content": SYSTEM}
        assert t["prompt_tokens"] + t["completion_tokens"] <= 512
        assert t["model_settings"]["n_ctx"] == 512
    last_sent = [m["content"] for m in turns[-1]["messages"] if m["role"] == "user"]
    assert questions[0] not in last_sent and last_sent[-1] == questions[-1]


def test_models_and_info_show_the_trained_context(lanner_home: Path) -> None:
    listed = lanner("models", home=lanner_home)
    assert listed.returncode == 0, listed.stderr
    header, *lines = [re.split(r"\s{2,}", line) for line in listed.stdout.splitlines()]
    column = header.index("CONTEXT")
    rows = {cells[0]: cells for cells in lines}
    assert rows["smollm2"][column] == "8192" and rows["tinycoder"][column] == "2048"
    as_json = json.loads(lanner("models", "--json", home=lanner_home).stdout)
    assert {m["name"]: m["n_ctx_train"] for m in as_json}["tinycoder"] == 2048
    info = lanner("info", "tinycoder", home=lanner_home)
    assert "trained context:  2048 tokens" in info.stdout
    catalog = lanner("models", "--catalog", home=lanner_home).stdout.splitlines()
    assert "TRAINED CTX" in catalog[0]
    smol = next(line.split() for line in catalog if line.startswith("smollm2-135m "))
    assert "8192" in smol
