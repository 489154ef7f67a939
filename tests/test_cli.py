"""The CLI end to end on the bundled model, as a user types it."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lanner import __version__
from lanner.engine.registry import half_type

LANNER = [sys.executable, "-m", "lanner"]
QUESTION = "What is the capital of France?"


def lanner(*args: str, home: Path, stdin: str | None = None, timeout: float = 180,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LANNER, "--home", str(home), *args], input=stdin, capture_output=True,
        text=True, timeout=timeout, env=os.environ.copy(),
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lanner: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_help_is_fast_and_imports_no_backend() -> None:
    code = ("import sys, time; t=time.perf_counter(); import lanner, lanner.cli; "
            "lanner.cli.build_parser(); print(time.perf_counter()-t); "
            "print([m for m in ('torch','transformers','llama_cpp','llguidance',"
            "'lanner.engine.constrain') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert float(out[0]) < 1.0
    assert out[1] == "[]"


def test_only_the_named_verb_is_registered() -> None:
    """A command names its verb: only that verb's parser is built (every verb
    module imported costs a one-shot `lanner run` ~50 ms); help, a bare
    `lanner` and unknown verbs get the whole parser."""
    from lanner.cli import VERBS, build_parser, named_verb

    assert named_verb(["run", "smollm2", "hi"]) == "run"
    assert named_verb(["--home", "/tmp/x", "chat-format", "m"]) == "chat_format"
    assert named_verb(["--home=/tmp/x", "serve"]) == "serve"
    assert named_verb(["--help", "run"]) is None
    assert named_verb(["bogus"]) is None and named_verb([]) is None
    code = "import lanner.cli; lanner.cli.main(['run', '--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: lanner run")
    code = "import lanner.cli; lanner.cli.main(['run', 'm', 'p', '--max-tokens', 'x'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "invalid int value: 'x'" in out.stderr
    parser_of_all = build_parser()
    assert len(parser_of_all._subparsers._group_actions[0].choices) == len(VERBS)  # type: ignore[union-attr]
    out = subprocess.run([sys.executable, "-c", "import sys, lanner.cli as c; "
                          "c.build_parser(('run',)); print(sorted(m for m in sys.modules "
                          "if m.startswith('lanner.cli.')))"],
                         capture_output=True, text=True, check=True)
    assert "'lanner.cli.serve'" not in out.stdout and "'lanner.cli.run'" in out.stdout
    # --version alone builds no parser at all; with other words, argparse answers it.
    out = subprocess.run([sys.executable, "-c", "import sys, lanner.cli as c; r = c.main("
                          "['--version']); print(r, [m for m in sys.modules "
                          "if m.startswith('lanner.cli.')])"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [f"lanner {__version__}", "0 []"]
    out = subprocess.run([*LANNER, "--home", "/nonexistent", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"lanner {__version__}\n"


def test_run_answers_paris_greedy(lanner_home: Path) -> None:
    result = lanner("run", "smollm2", QUESTION, "--temperature", "0", home=lanner_home)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_same_seed_same_text(lanner_home: Path) -> None:
    args = ("run", "smollm2", "Tell me a short story.", "--seed", "7", "--temperature", "0.8",
            "--max-tokens", "40")
    first = lanner(*args, home=lanner_home)
    second = lanner(*args, home=lanner_home)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_prompt_from_stdin_and_json_output(lanner_home: Path) -> None:
    result = lanner("run", "smollm2", "-", "--temperature", "0", "--max-tokens", "8",
                    "--json", home=lanner_home, stdin=QUESTION)
    data = json.loads(result.stdout)
    assert data["model"] == "smollm2"
    assert data["usage"]["completion_tokens"] <= 8
    assert data["finish_reason"] in ("stop", "length")
    # The question typed on stdin is what the model was asked (and logged).
    con = sqlite3.connect(lanner_home / "logs.db")
    prompts = [row[0] for row in con.execute("SELECT prompt FROM responses")]
    con.close()
    assert prompts == [QUESTION]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("run", "no-such-model", "hi"), ("unknown model", "no-such-model")),
        (("run", "/nonexistent/model.gguf", "hi"), ("no such file",)),
        (("run", "smollm2", "hi", "--temperature", "-1"), ("temperature",)),
        (("run", "smollm2", "hi", "--top-p", "1.5"), ("top_p",)),
        (("run", "smollm2", "hi", "--top-p", "0"), ("top_p",)),
        (("run", "smollm2", "word " * 400, "--n-ctx", "256"), ("256", "tokens long")),
    ],
)
def test_bad_input_is_one_clear_line(lanner_home: Path, args: tuple[str, ...],
                                     words: tuple[str, ...]) -> None:
    assert_clean_error(lanner(*args, home=lanner_home), *words)


def test_corrupt_gguf_is_a_clear_error(lanner_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    assert_clean_error(lanner("run", str(bad), "hi", home=lanner_home), "broken.gguf")


def test_show_probs_match_the_models_logits(lanner_home: Path, smollm2_gguf: Path) -> None:
    # smollm2-q4_1 runs the shipped file as it is, so llama.cpp can recompute it.
    result = lanner("run", "smollm2-q4_1", QUESTION, "--temperature", "0", "--max-tokens", "6",
                    "--show-probs", "3", "--json", home=lanner_home)
    data = json.loads(result.stdout)
    tokens = data["tokens"]
    assert len(tokens) == data["usage"]["completion_tokens"] > 0

    # Recompute every position's distribution with llama-cpp-python directly.
    from llama_cpp import Llama

    # Same settings as the backend (flash attention on); tokens fed one at a time
    # as in generation, since llama.cpp's batched maths rounds differently.
    llm = Llama(str(smollm2_gguf), n_ctx=512, logits_all=True, flash_attn=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    import jinja2

    prompt = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.eval(ids)
    for i, token in enumerate(tokens):
        if i:
            llm.eval([tokens[i - 1]["id"]])
        logits = np.asarray(llm.scores[len(ids) - 1 + i], dtype=np.float64)
        logp = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
        assert token["logprob"] == pytest.approx(logp[token["id"]], abs=1e-3)
        best = np.argsort(-logp)[:3]
        got = [a["logprob"] for a in token["top_logprobs"]]
        np.testing.assert_allclose(got, logp[best], atol=1e-3)
    shown = lanner("run", "smollm2", QUESTION, "--temperature", "0", "--max-tokens", "3",
                   "--show-probs", home=lanner_home).stdout.splitlines()
    assert len(shown) == 3 and "%" in shown[0]


def test_logs_show_provenance(lanner_home: Path, smollm2_gguf: Path) -> None:
    import hashlib

    lanner("run", "smollm2", QUESTION, "--temperature", "0", "--max-tokens", "8",
           "--seed", "11", home=lanner_home)
    result = lanner("logs", "--json", home=lanner_home)
    (turn,) = json.loads(result.stdout)
    # The default smollm2 runs the shipped weights re-encoded as BF16 or F16
    # (whichever this CPU multiplies natively): the log names and hashes the
    # file that actually ran.
    ran = Path(turn["model_path"])
    assert ran.name.endswith(f".{half_type()}.gguf") and ran.exists()
    assert turn["model_sha256"] == hashlib.sha256(ran.read_bytes()).hexdigest()
    assert turn["sampling"]["temperature"] == 0 and turn["seed"] == 11
    assert turn["backend"] == "llama.cpp" and turn["prompt"] == QUESTION
    text = lanner("logs", home=lanner_home).stdout
    assert turn["model_sha256"][:12] in text


def test_chat_multi_turn_reset_save_and_continue(lanner_home: Path, tmp_path: Path) -> None:
    save_to = tmp_path / "saved.json"
    script = f"My name is Ada.\n/save {save_to}\n/reset\nHello\n"
    result = lanner("chat", "smollm2", "--temperature", "0", "--max-tokens", "12",
                    "-s", "You are terse.", home=lanner_home, stdin=script)
    assert result.returncode == 0, result.stderr
    saved = json.loads(save_to.read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    again = lanner("chat", "--continue", "--temperature", "0", "--max-tokens", "4",
                   home=lanner_home, stdin="And again\n")
    assert "Resuming conversation" in again.stderr
    turns = json.loads(lanner("logs", "-n", "0", "--json", home=lanner_home).stdout)
    assert len(turns) == 3
    resumed = max(turns, key=lambda t: t["id"])
    assert [(m["role"], m["content"]) for m in resumed["messages"]][:2] == [
        ("system", "You are terse."), ("user", "Hello")]
    assert resumed["messages"][-1] == {"role": "user", "content": "And again"}


def test_kill_9_during_streaming_keeps_earlier_turns(lanner_home: Path) -> None:
    proc = subprocess.Popen(
        [*LANNER, "--home", str(lanner_home), "chat", "smollm2", "--temperature", "0",
         "--max-tokens", "400"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdin and proc.stdout
    db = lanner_home / "logs.db"
    for n, question in enumerate(("Say hi.", "Name a colour."), start=1):
        proc.stdin.write(question + "\n")
        proc.stdin.flush()
        _wait_for_turns(db, n)
    proc.stdin.write("Write a long essay about the sea.\n")
    proc.stdin.flush()
    proc.stdout.read(1)  # streaming has started
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    result = lanner("logs", "-n", "0", "--json", home=lanner_home)
    prompts = [t["prompt"] for t in json.loads(result.stdout)]
    assert sorted(prompts) == ["Name a colour.", "Say hi."]


def _wait_for_turns(db: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                con = sqlite3.connect(db)
                count = con.execute("SELECT count(*) FROM responses").fetchone()[0]
                con.close()
                if count >= n:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"{n} turns were not logged in {timeout} s")


def test_the_half_type_follows_the_cpu(tmp_path: Path) -> None:
    """smollm2 is re-encoded as BF16 where the CPU has AVX512_BF16, else F16."""
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor : 0\nflags : fpu avx512f avx512bw avx512_vnni\n")
    assert half_type(str(with_bf16)) == "bf16"
    assert half_type(str(without)) == "f16"
    assert half_type(str(tmp_path / "missing")) == "f16"


def test_models_lists_the_bundled_model_and_what_it_runs_as(lanner_home: Path) -> None:
    listed = lanner("models", home=lanner_home)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    # The shipped Q4_1 file, which llama.cpp re-encodes as BF16 or F16 before running it.
    assert "98.4 MB" in rows["smollm2"] and f"gguf -> {half_type()}" in rows["smollm2"]
    assert "Apache-2.0" in rows["smollm2"]
    assert "->" not in rows["smollm2-q4_1"]
