"""Start-up overlap and the quick exit of a one-shot ``lanner run``.

``Engine.preload`` reads a llama.cpp model's weights on a background thread
and the ``load`` with the same arguments takes them; ``console_main`` ends a
``lanner run`` process once its exit handlers have run, without the
interpreter's teardown.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from lanner.backends import llamacpp_native
from lanner.engine.engine import Engine
from lanner.engine.types import collect
from lanner.errors import ModelLoadError, ModelNotFound
from lanner.store import Store


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Each llama.cpp model load: (file name, the thread it ran on)."""
    seen: list[tuple[str, str]] = []
    real = llamacpp_native._load

    def counting(path: Path, **options: Any) -> Any:
        seen.append((path.name, threading.current_thread().name))
        quiet.append(options.get("quiet", False))
        return real(path, **options)

    quiet.clear()

    monkeypatch.setattr(llamacpp_native, "_load", counting)
    return seen


quiet: list[bool] = []
"""Whether each load in ``loads`` logged to the C no-op instead of Python."""


def test_load_takes_the_preloaded_weights(smollm2_gguf: Path, lanner_home: Path,
                                          loads: list[tuple[str, str]]) -> None:
    engine = Engine(lanner_home)
    engine.preload(str(smollm2_gguf), n_seq_max=1)
    model = engine.load(str(smollm2_gguf), n_seq_max=1)
    # One load, on the preload thread; nothing left waiting for a taker.
    assert loads == [(smollm2_gguf.name, f"lanner-preload-{smollm2_gguf.name}")]
    assert llamacpp_native._preloads == {}
    # Its log lines went to C, not to a Python callback waiting for the GIL.
    assert llamacpp_native._no_op_callback is not None and quiet == [True]
    preloaded = collect(model.chat_stream([{"role": "user", "content": "Name a colour."}],
                                          temperature=0, max_tokens=12))
    model.backend.close()

    plain = Engine(lanner_home).load(str(smollm2_gguf), n_seq_max=1)
    assert loads[1] == (smollm2_gguf.name, threading.current_thread().name)
    assert quiet[1] is False
    fresh = collect(plain.chat_stream([{"role": "user", "content": "Name a colour."}],
                                      temperature=0, max_tokens=12))
    plain.backend.close()
    assert preloaded.text == fresh.text and preloaded.text


def test_a_load_with_other_load_options_reads_the_file_itself(
        tinycoder_gguf: Path, lanner_home: Path, loads: list[tuple[str, str]]) -> None:
    engine = Engine(lanner_home)
    engine.preload(str(tinycoder_gguf), use_mmap=False, n_seq_max=1)
    model = engine.load(str(tinycoder_gguf), n_seq_max=1)  # mmap: not what was preloaded
    model.backend.close()
    assert sorted(name for name, _ in loads) == [tinycoder_gguf.name] * 2
    key = (str(tinycoder_gguf), 0, False)
    assert list(llamacpp_native._preloads) == [key]
    llama_cpp.llama_model_free(llamacpp_native._preloads.pop(key).result())


def test_a_preload_that_fails_raises_in_load(tmp_path: Path, tinycoder_gguf: Path,
                                             lanner_home: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tinycoder_gguf.read_bytes()[:1_500_000])
    engine = Engine(lanner_home)
    engine.preload(str(truncated))  # reading fails on the thread, not here
    with pytest.raises(ModelLoadError, match="truncated.gguf") as preloaded:
        engine.load(str(truncated))
    assert llamacpp_native._preloads == {}
    # The same reason as a load on the caller's thread gives: the log was not lost.
    with pytest.raises(ModelLoadError) as direct:
        Engine(lanner_home).load(str(truncated))
    assert str(preloaded.value) == str(direct.value)
    assert "could not read it" not in str(direct.value)
    with pytest.raises(ModelNotFound):
        engine.preload("no-such-model")  # a name that does not resolve fails at once, as load


def test_only_llama_cpp_preloads(tinycoder_gguf: Path, lanner_home: Path,
                                 loads: list[tuple[str, str]]) -> None:
    engine = Engine(lanner_home)
    engine.preload(str(tinycoder_gguf), backend="transformers")
    engine.preload(str(tinycoder_gguf), n_gpu_layers="all")  # wrong type: load will say so
    assert loads == [] and llamacpp_native._preloads == {}


QUICK = """
import atexit, sys
marker = sys.argv.pop(1)
atexit.register(lambda: open(marker, "w").write("ran"))  # registered before the command's own
from lanner.cli import console_main
console_main()
"""


def test_run_exits_after_its_exit_handlers_with_the_answer_logged(
        lanner_home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "handler-ran"
    result = subprocess.run(
        [sys.executable, "-c", QUICK, str(marker), "--home", str(lanner_home), "run",
         "smollm2-q4_1", "Name a colour.", "--temperature", "0", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "ran"
    with Store(lanner_home / "logs.db") as store:
        turns = store.turns()
    assert len(turns) == 1 and turns[0].prompt == "Name a colour."
    assert result.stdout == turns[0].response + "\n" and turns[0].response


def test_run_errors_keep_their_exit_code(lanner_home: Path) -> None:
    lanner = [sys.executable, "-m", "lanner", "--home", str(lanner_home)]
    missing = subprocess.run([*lanner, "run", "no-such-model", "Hi"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1
    assert "unknown model 'no-such-model'" in missing.stderr
    bad_flag = subprocess.run([*lanner, "run", "smollm2-q4_1", "Hi", "--max-tokens", "x"],
                              capture_output=True, text=True, timeout=120)
    assert bad_flag.returncode == 2 and "--max-tokens" in bad_flag.stderr


def test_a_reader_that_leaves_early_still_gets_the_turn_logged(lanner_home: Path) -> None:
    command = (f"{sys.executable} -m lanner --home {lanner_home} run smollm2-q4_1 "
               "'Write a long story.' --temperature 0 --max-tokens 64 | head -c 5")
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert len(result.stdout) == 5
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr
    with Store(lanner_home / "logs.db") as store:
        turns = store.turns()
    assert len(turns) == 1 and turns[0].response.startswith(result.stdout)
