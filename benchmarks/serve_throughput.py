"""Serving throughput under concurrency, in one run, on one GGUF:

  * `lanner serve` (continuous batching),
  * `python -m llama_cpp.server` (llama-cpp-python's own OpenAI server),
  * the raw ceiling: llama.cpp's batched decode of B sequences through the
    low-level API, no server and no sampling beyond argmax. It uses llama.cpp's
    default layout: a split KV cache, 4096 cells shared out evenly, so each
    sequence attends over its own few cells only.

`lanner serve` runs once per --serve-args: by default its own default (a
unified KV cache: any request may use the whole window), and e.g.
"--kv split --n-ctx 512" for the raw ceiling's layout.

For 1, 4, 8, 16 concurrent streaming chat requests (128 new tokens each):
aggregate tokens/s and p50/p95 time to first token. The raw ceiling and
`lanner serve` are measured in alternating rounds (--repeats, default 3; medians
reported, and each ratio as the median of its rounds), so that a drift in the
shared machine's speed hits both sides; llama_cpp.server, far slower, runs once
after them. Loopback only; every request loop is bounded.
Usage: python benchmarks/serve_throughput.py [--model M] [--serve-args FLAGS ...]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from lanner.engine.engine import prepare
from lanner.engine.registry import resolve

_quiet: object = None
TOPICS = ["the sea", "a lighthouse", "mountains", "a library", "winter", "a city at night",
          "a garden", "the desert", "a train journey", "an old clock", "rain", "a market",
          "the moon", "a forest", "a river", "a bakery"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], port: int, health: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


def _has_content(line: str) -> bool:
    """A chunk with non-empty delta content (either JSON spacing style)."""
    compact = line.replace('": "', '":"')
    return '"content":"' in compact and '"content":""' not in compact


_requests = itertools.count()


async def one_stream(session: aiohttp.ClientSession, url: str, model: str, i: int,
                     n: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streaming request. Every
    request's message is new (a serial number first), so a server's prefix
    cache can reuse the system prompt but never a whole earlier prompt."""
    serial = next(_requests)
    body = {"model": model, "stream": True, "max_tokens": n, "temperature": 0.8, "seed": i,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user",
                          "content": f"#{serial}. Write a long story about "
                                     f"{TOPICS[i % len(TOPICS)]}."}]}
    start = time.perf_counter()
    ttft, chunks, usage, done = 0.0, 0, None, False
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        # The client shares the 2 cores with the server: aiohttp parses HTTP in
        # C, and JSON is parsed only for the usage chunk; content chunks are
        # spotted by text.
        async for raw in resp.content:
            line = raw.decode()
            if line.startswith("data: [DONE]"):
                done = True
            elif not line.startswith("data: {"):
                continue
            elif '"usage":' in line and '"completion_tokens"' in line:
                usage = json.loads(line[6:])["usage"]["completion_tokens"]
            elif _has_content(line):
                ttft = ttft or time.perf_counter() - start
                chunks += 1
    if not done:
        raise RuntimeError(f"stream {i} ended without data: [DONE]")
    # llama_cpp.server sends no usage chunk: count its content chunks instead.
    return ttft, usage if usage is not None else chunks


async def load(url: str, model: str, concurrency: int, n: int) -> dict[str, float]:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(session, url, model, i, n) for i in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"tok_s": sum(r[1] for r in results) / wall,
            "p50_ttft": statistics.median(ttfts),
            "p95_ttft": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


Result = dict[str, float]


def report(name: str, c: int, r: Result) -> None:
    ttft = f"  ttft p50 {r['p50_ttft']:.3f}s p95 {r['p95_ttft']:.3f}s" if "p50_ttft" in r else ""
    print(f"  {name:<26} streams={c:<3} {r['tok_s']:7.1f} tok/s{ttft}", flush=True)


def serve_and_measure(name: str, cmd: list[str], port: int, health: str, model: str,
                      levels: list[int], n: int) -> dict[int, Result]:
    proc = start(cmd, port, health)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, model, 1, 8))  # warm-up
        out = {}
        for c in levels:
            out[c] = asyncio.run(load(url, model, c, n))
            report(name, c, out[c])
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def raw_ceiling(gguf: Path, batch: int, n: int, threads: int) -> float:
    """Tokens/s of llama.cpp decoding ``batch`` sequences together, greedy."""
    import llama_cpp
    import numpy as np

    global _quiet
    _quiet = llama_cpp.llama_log_callback(lambda *a: None)  # must outlive the call
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_seq_max = 4096, 512, max(batch, 1)
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    prompt = [llama_cpp.llama_vocab_bos(vocab)] * 1 + list(range(1000, 1031))
    lb = llama_cpp.llama_batch_init(max(len(prompt) * batch, batch), 0, batch)

    def fill(items: list[tuple[int, int, int, bool]]) -> None:
        lb.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            lb.token[i], lb.pos[i], lb.n_seq_id[i] = tok, pos, 1
            lb.seq_id[i][0], lb.logits[i] = seq, logits

    start = time.perf_counter()
    fill([(t, p, s, p == len(prompt) - 1) for s in range(batch) for p, t in enumerate(prompt)])
    llama_cpp.llama_decode(ctx, lb)
    rows = [s * len(prompt) + len(prompt) - 1 for s in range(batch)]
    for step in range(n):
        nxt = [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, r),
                                                   shape=(n_vocab,)))) for r in rows]
        fill([(t, len(prompt) + step, s, True) for s, t in enumerate(nxt)])
        llama_cpp.llama_decode(ctx, lb)
        rows = list(range(batch))
    rate = batch * n / (time.perf_counter() - start)
    llama_cpp.llama_batch_free(lb)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2",
                        help="a Lanner model name; all three run the GGUF file it runs")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip", default="", help="comma list of: lanner,llama_cpp,raw")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of raw and lanner measurements, alternating (default 3)")
    parser.add_argument("--serve-args", action="append",
                        help="extra `lanner serve` flags, e.g. \"--kv split --n-ctx 512\"; "
                        "repeat to measure several configurations (default: none)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="lanner-bench-"))
    # The file Lanner actually runs (smollm2: the shipped Q4_1 re-encoded as BF16 or F16).
    args.gguf = prepare(resolve(args.model, home), None, home).path
    levels = [int(x) for x in args.levels.split(",")]
    skip = set(args.skip.split(","))
    print(f"serve throughput, {args.gguf.name}, {args.tokens} new tokens per stream, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    # Raw and lanner rounds alternate, level by level, --repeats times: the
    # machine's speed drifts, and each ratio compares measurements minutes apart
    # at most. The median of each is reported.
    runs: dict[str, dict[int, list[Result]]] = {}
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        if "lanner" not in skip:
            for extra in args.serve_args or [""]:
                port = free_port()
                cmd = [sys.executable, "-m", "lanner", "--home", str(home), "serve",
                       args.model, "--port", str(port), "--no-embeddings", *extra.split()]
                url = f"http://127.0.0.1:{port}"
                servers[f"lanner serve {extra}".strip()] = (start(cmd, port, "/health"), url)
                for c in levels:  # warm-up: the first batches of each shape are slower
                    asyncio.run(load(url, args.model, c, 16))
        for _ in range(args.repeats):
            for c in levels:
                if "raw" not in skip:
                    result = {"tok_s": raw_ceiling(args.gguf, c, args.tokens, args.threads)}
                    runs.setdefault("raw", {}).setdefault(c, []).append(result)
                    report("raw batched", c, result)
                for label, (_, url) in servers.items():
                    result = asyncio.run(load(url, args.model, c, args.tokens))
                    runs.setdefault(label, {}).setdefault(c, []).append(result)
                    report(label, c, result)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    results = {label: {c: median(rs) for c, rs in by_level.items()}
               for label, by_level in runs.items()}
    if "llama_cpp" not in skip:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.gguf),
               "--port", str(port), "--n_ctx", "4096", "--n_threads", str(args.threads),
               "--model_alias", args.model,
               # its default cancels a running stream when another request arrives
               "--interrupt_requests", "False"]
        results["llama_cpp"] = serve_and_measure("llama_cpp.server", cmd, port, "/v1/models",
                                                 args.model, levels, args.tokens)
    summarise(results, runs)


def median(rs: list[Result]) -> Result:
    return {key: statistics.median(r[key] for r in rs) for key in rs[0]}


def summarise(r: dict[str, dict[int, Result]], runs: dict[str, dict[int, list[Result]]]) -> None:
    def paired(label: str, c: int) -> str:
        """The median of the per-round ratios, and their range."""
        ratios = sorted(a["tok_s"] / b["tok_s"] for a, b in zip(runs[label][c], runs["raw"][c],
                                                                  strict=True))
        return (f"{statistics.median(ratios):.3f} (rounds {ratios[0]:.3f}-{ratios[-1]:.3f})"
                if len(ratios) > 1 else f"{ratios[0]:.3f}")

    print("medians:")
    for label, by_level in r.items():
        for c, result in by_level.items():
            report(label, c, result)
    for label in [k for k in r if k.startswith("lanner")]:
        print(f"  {label}:")
        lanner = r[label]
        if "raw" in r and 1 in lanner:
            print(f"    single stream: lanner / raw B=1 = {paired(label, 1)} (target >= 0.95)")
        if 8 in lanner and "llama_cpp" in r:
            ratio = lanner[8]["tok_s"] / r["llama_cpp"][8]["tok_s"]
            print(f"    8 streams: lanner / llama_cpp.server = {ratio:.2f} (target >= 2.5)")
        if 8 in lanner and "raw" in r:
            print(f"    8 streams: lanner / raw ceiling = {paired(label, 8)} (target >= 0.9)")


if __name__ == "__main__":
    main()
