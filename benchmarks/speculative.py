"""Speculative decoding against plain decoding, in one run, greedy, on one model:

  * single stream, in process (what `lanner run` does): each prompt through a
    model loaded with `--speculative off` and with `ngram` (and `draft:MODEL`
    with --draft), in alternating order, a fresh prompt per repeat (a serial
    number first, so no side reuses a cached answer); tokens/s of the whole
    request (prompt + answer). Half the repeats with the models loaded in one
    order, half in the other: of two identical models, the one loaded first
    decoded 6-9% slower on these VMs. The texts must be identical, else it exits 1.
    Input-grounded prompts (an answer quoting a given passage, a code edit
    returning a given function with one name changed, a summary of a given
    list) against open-ended ones. Each prompt's line shows how much of the
    answer is copied from the prompt (the share of answer tokens inside a
    4-token run that also occurs in the prompt): what makes a prompt
    input-grounded is the answer, not the request.
    Greedy decoding with and without drafts must give the same tokens. llama.cpp's
    kernels do not give bit-identical logits for a token decoded alone and in a
    batch (its matrix products take another code path from two rows up), so
    the script first measures how far apart they are on the target model
    (``rounding``: greedy tokens decoded one at a time against the same tokens
    in one batched pass), and where the two sides part, asks the plain side for
    the logprobs of both tokens there: a gap within twice that rounding is a
    near tie settled by rounding (reported); a wider one is a bug (exit 1).
    Then the ceilings on this run's own plain answers at the step costs its
    scheduler measured (``bounds``): what prompt lookup would gain if it
    knew every draft's outcome, or only whether its first token is right.
    The gap between them and the measured figure is what a better guess of
    the outcome could still win; the ceilings themselves move with the
    machine (how much a step of n tokens costs against one of 1).
  * 8 concurrent streams through `lanner serve --speculative off|ngram` (the
    same grounded and open-ended prompts) in paired rounds, one server up at
    a time, each started afresh for its turn (which goes first alternates)
    and given 3 sets of 8 requests; the median of the rounds' ratios, 6
    rounds by default. One set alone swung by up to 2x on the shared VM.

Usage: python benchmarks/speculative.py [--target smollm2] [--draft MODEL] [--quick]
`--target qwen2.5-coder-0.5b` needs `make qwen` (skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_throughput import free_port, start  # noqa: E402
from step_costs import SIZES  # noqa: E402

from lanner.backends.speculative import K_MAX, NgramIndex  # noqa: E402
from lanner.engine.engine import Engine  # noqa: E402
from lanner.engine.model import Model, make_request  # noqa: E402
from lanner.engine.types import collect  # noqa: E402
from lanner.errors import ModelNotFound  # noqa: E402

PASSAGE = (
    "The Thames is a river that flows through southern England, including London. At "
    "346 kilometres, it is the longest river entirely in England and the second-longest "
    "in the United Kingdom, after the Severn. It rises at Thames Head in Gloucestershire "
    "and flows into the Thames Estuary on the North Sea between Essex and Kent."
)
FUNCTION = '''def average_score(scores):
    """The mean of a list of scores, or 0 for an empty list."""
    if not scores:
        return 0
    total = 0
    for score in scores:
        total += score
    return total / len(scores)
'''
ITEMS = ["Buy milk and eggs", "Call the plumber about the kitchen sink",
         "Book train tickets to Edinburgh for Friday", "Return the library books",
         "Send the quarterly report to Maria", "Renew the car insurance",
         "Water the tomato plants", "Pick up the dry cleaning"]

GROUNDED = {
    "quote": f"Here is a passage:\n\n{PASSAGE}\n\nRepeat the passage exactly as written.",
    "code-edit": f"Rename the variable `total` to `running_sum` in this function and return "
                 f"the whole function, unchanged otherwise:\n\n```python\n{FUNCTION}```",
    "summary": "Here is my to-do list:\n" + "\n".join(f"- {item}" for item in ITEMS)
               + "\n\nSummarise it as a numbered list, one item per line, in the same words.",
}
OPEN = {
    "story": "Write a short story about a lighthouse keeper.",
    "explain": "Explain how rainbows form.",
    "advice": "Give me some tips for learning to play the guitar.",
}


TIE = [0.0]
"""Logprob gap under which a parting is put down to rounding: twice the
largest batched-against-alone difference measured (``rounding``)."""
COPY_RUN = 4
"""Answer tokens inside a run of this many that also occurs in the prompt count as copied."""

SAVE: list[Path] = []
"""Where --save writes the answers and step costs."""
STEPS: dict[int, int] = {}
"""llama_decode calls per model: steps taken, whatever the machine's load."""


def one(model: Model, text: str, n: int
        ) -> tuple[list[int], str, int, float, float, float, list[int]]:
    """(token ids, text, completion tokens, seconds after the first token, whole
    seconds, share of the answer copied from the prompt, prompt ids) of one
    greedy chat answer."""
    request = model.chat_request([{"role": "user", "content": text}], temperature=0,
                                 max_tokens=n)
    calls = model.backend.decode_calls  # type: ignore[attr-defined]
    start = time.perf_counter()
    out = collect(model.backend.stream(request))
    seconds = time.perf_counter() - start
    STEPS[id(model)] = STEPS.get(id(model), 0) + model.backend.decode_calls - calls  # type: ignore[attr-defined]
    assert out.finish is not None
    decode = out.finish.timings.total_s - out.finish.timings.ttft_s
    ids = [t.id for t in out.tokens]
    return (ids, out.text, out.finish.usage.completion_tokens, decode, seconds,
            copied(list(request.prompt), ids), list(request.prompt))


def copied(prompt: list[int], answer: list[int]) -> float:
    """Share of ``answer``'s tokens inside a ``COPY_RUN``-token run found in ``prompt``."""
    runs = {tuple(prompt[i:i + COPY_RUN]) for i in range(len(prompt) - COPY_RUN + 1)}
    mark = [False] * len(answer)
    for i in range(len(answer) - COPY_RUN + 1):
        if tuple(answer[i:i + COPY_RUN]) in runs:
            mark[i:i + COPY_RUN] = [True] * COPY_RUN
    return sum(mark) / len(answer) if answer else 0.0


def rounding(model: Model, text: str, n: int = 96) -> float:
    """Largest difference between a greedy token's logprob decoded one token at
    a time and the same token's logprob in one batched pass over the whole text."""
    request = model.chat_request([{"role": "user", "content": text}], temperature=0,
                                 max_tokens=n, logprobs=True)
    tokens = collect(model.backend.stream(request)).tokens
    batched = model.backend.prompt_logprobs([*request.prompt, *(t.id for t in tokens)])
    first = len(request.prompt)
    return max(abs((t.logprob or 0.0) - (batched[first + i].logprob or 0.0))
               for i, t in enumerate(tokens))


def parting(model: Model, text: str, n: int, plain: list[int], other: list[int]) -> str | None:
    """Where greedy answers ``plain`` and ``other`` part: None for a near tie
    (the plain side's top two logprobs there within ``TIE``), else what differs."""
    at = next(i for i, (a, b) in enumerate(zip([*plain, -1], [*other, -1], strict=False))
              if a != b)
    if at >= min(len(plain), len(other)):
        return f"one answer ends at token {at}, the other goes on"
    asked = model.chat_request([{"role": "user", "content": text}], temperature=0, max_tokens=n)
    # The next token after the shared part, from a prompt of prompt + shared part.
    request = make_request([*asked.prompt, *plain[:at]],
                           {"temperature": 0, "max_tokens": 1, "top_logprobs": 5})
    tokens = collect(model.backend.stream(request)).tokens
    top = {alt.token_id: alt.logprob for alt in tokens[0].top}
    gap = abs(top.get(plain[at], float("-inf")) - top.get(other[at], float("-inf")))
    print(f"    parted at token {at}: plain {plain[at]}, other {other[at]}, logprob gap "
          f"{gap:.3f} ({'a near tie' if gap <= TIE[0] else 'NOT a near tie'})")
    return None if gap <= TIE[0] else f"token {at}: logprob gap {gap:.3f}"


def single_stream(load: Callable[[list[str]], dict[str, Model]], sides: list[str], n: int,
                  repeats: int) -> bool:
    """Per prompt and side: tokens and seconds over the repeats; ratios per group.
    Decode tok/s counts the tokens after the first over the time after it (the
    prompt's decoding is the same work on both sides); whole: all of the request.

    The repeats run in two phases, the models loaded afresh in each: first in
    the order ``sides``, then reversed. Of two models loaded from the same
    file with the same settings, the one loaded first decoded 6-9% slower here
    *(one-off, llama.cpp alone and through Lanner, several runs)*; a fixed
    order gave the side loaded second that much for free."""
    same = True
    totals: dict[tuple[str, str], list[float]] = {}
    per: dict[tuple[str, str], dict[str, list[float]]] = {}
    shares: dict[tuple[str, str], list[float]] = {}
    stats: dict[str, dict[str, float]] = {side: {} for side in sides}
    steps = dict.fromkeys(sides, 0)
    ties = 0
    models: dict[str, Model] = {}
    half = (repeats + 1) // 2
    phases = [(list(sides), range(half)), (list(reversed(sides)), range(half, repeats))]
    phases = [(order, runs) for order, runs in phases if runs]
    for order, runs in phases:
        models = load(order)  # closes the previous phase's models
        for group, prompts in (("grounded", GROUNDED), ("open-ended", OPEN)):
            for name, text in prompts.items():
                key = (group, name)
                sums = per.setdefault(key, {side: [0.0, 0.0, 0.0, 0.0] for side in sides})
                for r in runs:
                    # Prompt by prompt, as when one pass ran every repeat: with
                    # --repeats 3 the same questions as the runs before the phases.
                    serial = 1 + list({**GROUNDED, **OPEN}).index(name) * repeats + r
                    order_r = order if r % 2 == 0 else list(reversed(order))
                    outs = {}
                    for side in order_r:
                        ids, answer, tokens, decode, whole, share, prompt = one(
                            models[side], f"#{serial}. {text}", n)
                        outs[side] = (ids, answer)
                        for i, value in enumerate((tokens, decode, whole, 1)):
                            sums[side][i] += value
                        if side == "off":
                            shares.setdefault(key, []).append(share)
                            ANSWERS.append((group, prompt, ids))
                    base = outs["off"]
                    for side, out in outs.items():
                        if out[0] != base[0]:
                            why = parting(models["off"], f"#{serial}. {text}", n, base[0],
                                          out[0])
                            ties += why is None
                            if why is not None:
                                same = False
                                print(f"  MISMATCH {name} r{r} {side}: {why}")
        for side, model in models.items():
            steps[side] += STEPS.pop(id(model), 0)
            counts: dict[str, float] = getattr(model.backend, "stats", dict)()
            for k in ("spec_drafted_tokens", "spec_accepted_tokens"):
                stats[side][k] = stats[side].get(k, 0) + (counts.get(k) or 0)
    for (group, name), sums in per.items():
        line = f"  {group:<10} {name:<10} copied {statistics.mean(shares[(group, name)]):4.0%}"
        for side, got in sums.items():
            acc = totals.setdefault((group, side), [0.0, 0.0, 0.0, 0.0])
            for i, value in enumerate(got):
                acc[i] += value
            line += f"  {side} {rate(got):6.1f} tok/s ({rate(got) / rate(sums['off']):.2f}x)"
        print(line, flush=True)
    ratios = {}
    for group in ("grounded", "open-ended"):
        off = totals[(group, "off")]
        ratios[group] = rate(totals[(group, "ngram")]) / rate(off)
        for side in sides:
            both = totals[(group, side)]
            print(f"  {group:<10} all  {side:<14} decode {rate(both):6.1f} tok/s "
                  f"{rate(both) / rate(off):.2f}x plain;  whole request {rate(both, 2):6.1f} "
                  f"tok/s {rate(both, 2) / rate(off, 2):.2f}x", flush=True)
    tokens = sum(totals[(g, "off")][0] for g in ("grounded", "open-ended"))
    for side in sides:
        drafted, accepted = stats[side]["spec_drafted_tokens"], stats[side]["spec_accepted_tokens"]
        print(f"  {side}: {steps[side]} decode steps for {tokens:.0f} tokens (prompts "
              f"included); drafted {drafted:.0f}, accepted {accepted:.0f} "
              f"({accepted / drafted if drafted else 0.0:.4f})")
    print(f"  same tokens with and without speculation: {'yes' if same else 'NO'}"
          + (f" (apart from {ties} near tie(s) settled by rounding)" if ties else ""),
          flush=True)
    bounds(models["ngram"], ratios)
    if SAVE:
        SAVE[0].write_text(json.dumps({
            "answers": ANSWERS, "ratios": ratios,
            "step_seconds": models["ngram"].backend.step_seconds}))  # type: ignore[attr-defined]
    return same


ANSWERS: list[tuple[str, list[int], list[int]]] = []
"""(group, prompt ids, plain greedy answer ids) of every single-stream request."""


def bounds(model: Model, measured: dict[str, float]) -> None:
    """What prompt lookup could gain on this run's own answers at the step
    costs this run's scheduler measured (a step of n tokens, its overheads
    included; sizes it never ran are interpolated): replayed with an oracle
    that knows how many draft tokens will be kept and drafts just those when
    they pay, and with one that only knows whether the first draft token is
    right (and then drafts all the lookup offers, up to K_MAX). Lanner's
    drafts know neither: these are ceilings for the figure above, not
    predictions."""
    got = model.backend.step_seconds  # type: ignore[attr-defined]
    sizes = sorted(got)
    if len(sizes) < 2:
        return
    slope = (got[sizes[-1]] - got[sizes[-2]]) / (sizes[-1] - sizes[-2])

    def cost(n: int) -> float:
        if n > sizes[-1]:
            return got[sizes[-1]] + slope * (n - sizes[-1])
        return float(np.interp(n, sizes, [got[m] for m in sizes]))

    print("  step of n tokens, as the scheduler measured it: "
          + "  ".join(f"{n}: {got[n] / got[1]:.2f}x" for n in sizes if n in SIZES))
    for group in ("grounded", "open-ended"):
        answers = [(p, a) for g, p, a in ANSWERS if g == group]
        plain = sum(len(a) - 1 for _, a in answers) * cost(1)
        oracle = sum(replay(p, a, cost, gate_only=False) for p, a in answers)
        gate = sum(replay(p, a, cost, gate_only=True) for p, a in answers)
        print(f"  {group:<10} ceiling on these answers: knowing every draft's outcome "
              f"{plain / oracle:.2f}x, knowing only the first token's {plain / gate:.2f}x "
              f"(measured above: {measured[group]:.2f}x)", flush=True)


def replay(prompt: list[int], answer: list[int], cost: Callable[[int], float],
           gate_only: bool) -> float:
    """Seconds to decode ``answer`` after its first token with prompt lookup
    (see ``bounds``)."""
    index = NgramIndex(list(prompt) + answer[:1])
    seconds, i = 0.0, 1
    while i < len(answer):
        left = len(answer) - i - 1
        draft, _ = index.propose(min(K_MAX, left)) if left > 0 else ([], 0)
        kept = 0
        for a, b in zip(draft, answer[i:], strict=False):
            if a != b:
                break
            kept += 1
        if gate_only:
            fed = len(draft) if kept else 0
        else:  # just the kept ones, if drafting pays at all
            fed = max(range(kept + 1), key=lambda d: (d + 1) / cost(d + 1))
        seconds += cost(1 + fed)
        step = min(kept, fed) + 1
        if fed:
            index.accepted(step - 1)  # where the copy goes on, as the drafter tracks it
        for token in answer[i:i + step]:
            index.append(token)
        i += step
    return seconds


def rate(sums: list[float], which: int = 1) -> float:
    """Tokens per second of sums (tokens, seconds after the first token, whole
    seconds, requests): after each first token (``which`` 1) or whole (2)."""
    tokens = sums[0] - sums[3] if which == 1 else sums[0]
    return tokens / sums[which] if sums[which] else 0.0


async def stream_one(session: aiohttp.ClientSession, url: str, model: str, text: str,
                     n: int) -> int:
    body = {"model": model, "stream": True, "max_tokens": n, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": text}]}
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode()
            if '"usage":' in line and '"completion_tokens"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


async def concurrent(url: str, model: str, streams: int, n: int, serial: int
                     ) -> tuple[int, float]:
    """``streams`` requests at once: their completion tokens and the seconds they took."""
    prompts = [*GROUNDED.values(), *OPEN.values()]
    timeout = aiohttp.ClientTimeout(total=1200)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        counts = await asyncio.gather(*(
            stream_one(session, url, model, f"#{serial}-{i}. {prompts[i % len(prompts)]}", n)
            for i in range(streams)))
        return sum(counts), time.perf_counter() - start


def serving(target: str, streams: int, n: int, rounds: int, batches: int) -> None:
    """Paired rounds, one server up at a time: each round starts the ``off``
    and the ``ngram`` server in turn (which first alternates), warms it with
    one short request, runs ``streams`` at once and stops it. With both up, the
    one loaded first decoded slower (see ``single_stream``). A turn is
    ``batches`` such sets one after another (tokens over seconds, summed); a
    set of 8 short answers lasts a few seconds, and alone swung by 2x. The
    figure is the median of the rounds' ratios, so a slow spell of the
    machine counts once. Greedy answers in a batch can part from run to run
    (a batch's rows round differently), so the tokens per turn are shown."""
    got: dict[str, list[float]] = {"off": [], "ngram": []}
    tokens: dict[str, list[int]] = {"off": [], "ngram": []}
    metrics = []
    for r in range(rounds):
        for side in (("off", "ngram") if r % 2 == 0 else ("ngram", "off")):
            port = free_port()
            cmd = [sys.executable, "-m", "lanner", "serve", target, "--port", str(port),
                   "--no-embeddings", "--speculative", side, "--keep-alive", "-1"]
            proc = start(cmd, port, "/health")
            url = f"http://127.0.0.1:{port}"
            try:
                asyncio.run(concurrent(url, target, 1, 8, 0))  # load the model
                sets = [asyncio.run(concurrent(url, target, streams, n, 1000 * b + r))
                        for b in range(1, batches + 1)]
                tokens[side].append(sum(t for t, _ in sets))
                got[side].append(tokens[side][-1] / sum(s for _, s in sets))
                if side == "ngram":
                    metrics.append(httpx.get(url + "/metrics", timeout=10).text)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    ratios = [a / b for a, b in zip(got["ngram"], got["off"], strict=True)]
    off, spec = statistics.median(got["off"]), statistics.median(got["ngram"])
    print(f"  {streams} streams through lanner serve, median of {rounds} paired rounds "
          f"of {batches} sets each: "
          f"ngram/off {statistics.median(ratios):.2f}x (off {off:.1f} tok/s, ngram "
          f"{spec:.1f} tok/s; rounds: {[round(x, 2) for x in ratios]}; "
          f"tokens per round: off {tokens['off']}, ngram {tokens['ngram']})")
    print("  ngram server, each round: " + "\n  ".join(
        ln for text in metrics for ln in text.splitlines()
        if ln.startswith("lanner_backend_spec")))


def single_streams(args: argparse.Namespace) -> bool | None:
    """The single-stream part; None when the target is not registered here."""
    engines: list[Engine] = []
    values = {"off": "off", "ngram": "ngram"}
    if args.draft:
        values[f"draft:{args.draft}"] = f"draft:{args.draft}"

    def load(order: list[str]) -> dict[str, Model]:
        """The sides' models, loaded afresh in ``order`` (a new engine each time)."""
        for old in engines:
            old.close()
        engines[:] = [Engine()]
        return {side: engines[0].load(args.target, speculative=values[side], n_ctx=2048)
                for side in order}

    try:
        first = load(list(values))
    except ModelNotFound as e:
        print(f"skipped: {args.target} is not registered here ({e}); `make qwen` adds "
              "qwen2.5-coder-0.5b")
        return None
    print(f"{args.target} ({first['off'].spec.path.name}), greedy, {args.tokens} tokens, "
          f"{args.repeats} repeats in two phases (the sides loaded in one order, then the "
          "other)", flush=True)
    worst = max(rounding(first["off"], text) for text in [*GROUNDED.values(), *OPEN.values()])
    TIE[0] = 2 * worst
    print(f"  batched and one-token logprobs differ by up to {worst:.3f} on this model: "
          f"partings within {TIE[0]:.3f} count as rounding", flush=True)
    same = single_stream(load, list(values), args.tokens, args.repeats)
    for engine in engines:
        engine.close()
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--draft", help="also a draft model, e.g. smollm2-q4_1")
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=3,
                        help="sets of --streams requests in each server's turn of a round")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-single", action="store_true",
                        help="only the concurrent streams through lanner serve")
    parser.add_argument("--save", type=Path, metavar="FILE",
                        help="write the plain answers and the step costs the scheduler "
                             "measured as JSON (to replay drafting policies offline)")
    parser.add_argument("--quick", action="store_true",
                        help="64 tokens, one repeat, one serving round")
    args = parser.parse_args()
    if args.save:
        SAVE.append(args.save)
    if args.quick:
        args.tokens, args.repeats, args.rounds, args.batches = 64, 1, 1, 1
    same: bool | None = True
    if not args.skip_single:
        same = single_streams(args)
        if same is None:
            return 0
    if not args.skip_serve:
        serving(args.target, args.streams, args.tokens, args.rounds, args.batches)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
