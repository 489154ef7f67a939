"""Whole-process speed of a one-shot answer: ``lanner run`` against a plain
llama-cpp-python script on the same GGUF file.

Each side is a fresh Python process that writes a 128-token greedy answer to
one chat prompt and exits, so the time counts everything a user waits for:
interpreter start, imports, model load, the chat template, prompt decoding,
generation (and, for Lanner, logging the turn to its SQLite database). Time to
first token is when the first byte of the answer reaches the pipe. The two
sides alternate, after one warm-up each (the file is in the page cache, the 16-bit
re-encoding exists), and the texts must be identical: the same tokens.

The reference is what a user would write: ``Llama(path, n_ctx, n_threads,
flash_attn=True, verbose=False)`` and ``create_chat_completion(stream=True)``,
with Lanner's context size, threads and attention kernel, so both do the same
work. ``smollm2`` runs the BF16 or F16 re-encoding of the shipped Q4_1 file
(``registry.half_type``), so its reference gets that file (found through
``lanner.engine``).

    python benchmarks/startup.py [--models smollm2-q4_1 smollm2] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper."
N_TOKENS = 128

PLAIN = """\
import os, sys
from llama_cpp import Llama

llm = Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=os.cpu_count(),
            flash_attn=True, verbose=False)
stream = llm.create_chat_completion([{"role": "user", "content": sys.argv[3]}],
                                    max_tokens=int(sys.argv[4]), temperature=0, stream=True)
for chunk in stream:
    text = chunk["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
sys.stdout.write("\\n")
"""


@dataclass
class Timing:
    first_token: float
    total: float
    cpu: float
    """user + system seconds: less sensitive to a busy machine than wall time."""
    text: str


def timed(cmd: list[str], env: dict[str, str]) -> Timing:
    """Run ``cmd``; seconds to its first byte of output and to its exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # Unbuffered: read(1) must take one byte, not a buffer that communicate() skips.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            bufsize=0)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_token = time.perf_counter() - start
    rest, err = proc.communicate()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{err.decode()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Timing(first_token, total, cpu, (first + rest).decode())


def lanner_cmd(model: str, n_tokens: int, extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "lanner", "run", model, PROMPT,
            "--temperature", "0", "--max-tokens", str(n_tokens), *extra]


def plain_cmd(path: Path, n_ctx: int, n_tokens: int) -> list[str]:
    return [sys.executable, "-c", PLAIN, str(path), str(n_ctx), PROMPT, str(n_tokens)]


def file_and_context(model: str, home: Path) -> tuple[Path, int]:
    """The GGUF file ``lanner run MODEL`` runs (re-encoded first if its entry
    asks for it) and the context size it gives llama.cpp."""
    from lanner.engine.engine import Engine

    engine = Engine(home)
    loaded = engine.load(model)
    path, n_ctx = loaded.spec.path, loaded.backend.n_ctx  # type: ignore[attr-defined]
    engine.close()
    return path, n_ctx


def compare(model: str, repeat: int, home: Path, n_tokens: int = N_TOKENS,
            extra: Sequence[str] = ()) -> float:
    path, n_ctx = file_and_context(model, home)
    env = dict(os.environ, LANNER_HOME=str(home))
    # As an installed package: the warm-up writes bytecode, later runs read it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    sides = {"lanner run": lanner_cmd(model, n_tokens, extra),
             "llama-cpp-python": plain_cmd(path, n_ctx, n_tokens)}
    for cmd in sides.values():
        timed(cmd, env)  # warm-up: page cache, bytecode
    runs: dict[str, list[Timing]] = {name: [] for name in sides}
    for i in range(repeat):
        for name, cmd in sides.items():
            runs[name].append(timed(cmd, env))
        line = "   ".join(f"{name} {runs[name][-1].first_token:5.2f} s first token, "
                           f"{runs[name][-1].total:5.2f} s total, {runs[name][-1].cpu:5.2f} s CPU"
                           for name in sides)
        print(f"  run {i + 1}: {line}", flush=True)
    texts = {t.text for timings in runs.values() for t in timings}
    if len(texts) != 1:
        raise SystemExit(f"{model}: the two sides wrote different answers:\n"
                         + "\n---\n".join(map(repr, texts)))
    ours = statistics.median(t.total for t in runs["lanner run"])
    ref = statistics.median(t.total for t in runs["llama-cpp-python"])
    ttft_ours = statistics.median(t.first_token for t in runs["lanner run"])
    ttft_ref = statistics.median(t.first_token for t in runs["llama-cpp-python"])
    cpu_ours = statistics.median(t.cpu for t in runs["lanner run"])
    cpu_ref = statistics.median(t.cpu for t in runs["llama-cpp-python"])
    print(f"{model} ({path.name}, n_ctx {n_ctx}), median of {repeat}: "
          f"lanner run {ours:.2f} s (first token {ttft_ours:.2f} s, CPU {cpu_ours:.2f} s), "
          f"llama-cpp-python {ref:.2f} s (first token {ttft_ref:.2f} s, CPU {cpu_ref:.2f} s); "
          f"speed ratio {ref / ours:.3f}x (CPU {cpu_ref / cpu_ours:.3f}x)", flush=True)
    return ref / ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-q4_1", "smollm2"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--max-tokens", type=int, default=N_TOKENS,
                        help=f"answer length (default {N_TOKENS}; 1 times start-up alone)")
    parser.add_argument("--lanner-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for lanner run, e.g. --lanner-flag=--no-log (repeatable)")
    args = parser.parse_args()
    repeat = 2 if args.quick else args.repeat
    with tempfile.TemporaryDirectory(prefix="lanner-startup-") as tmp:
        for model in args.models:
            compare(model, repeat, Path(tmp), args.max_tokens, args.lanner_flag)


if __name__ == "__main__":
    main()
