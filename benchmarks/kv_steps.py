"""Lanner's llama.cpp scheduler on the split and the unified KV cache, step by step:

sets of --streams concurrent greedy chat requests (speculative.py's grounded
and open-ended prompts, each with a serial number first, up to --tokens new
tokens) through one in-process model, no server. Each layout runs in its own
process, in paired rounds whose order alternates (--rounds), since of two
identical models the one loaded first decodes slower on these VMs.

For each layout: tokens/s over the sets, the median ratio split/unified of
the rounds, and from the last round every ``llama_decode`` call grouped by
its shape: generating steps (one token per sequence) or steps with prompt
tokens, how many sequences, in how many runs of consecutive sequence ids
(llama.cpp's split cache decodes each run in its own pass over the weights),
and whether the scheduler moved a sequence to close a gap just before it
(``moves``: that step also copies a KV buffer). Median milliseconds each.

Usage: python benchmarks/kv_steps.py [--model smollm2] [--streams 8] [--sets 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from speculative import GROUNDED, OPEN  # noqa: E402

LAYOUTS = ("split", "unified")


def runs(ids: list[int]) -> int:
    """How many runs of consecutive ids ``ids`` (sorted, distinct) form."""
    return 1 + sum(1 for a, b in zip(ids, ids[1:], strict=False) if b != a + 1)


def worker(layout: str, model: str, home: str, streams: int, sets: int, tokens: int) -> dict:
    from lanner.backends import llamacpp_sched
    from lanner.engine.engine import Engine
    from lanner.engine.types import collect

    steps: list[tuple[str, float]] = []
    real = llamacpp_sched.Scheduler._decode
    seen = [0]

    def timed(self: llamacpp_sched.Scheduler, n_seqs: int) -> None:
        batch = self._batch
        seqs = [batch._seq[i][0] for i in range(batch.n)]
        ids = sorted(set(seqs))
        moved = self.moves - seen[0]
        seen[0] = self.moves
        began = time.perf_counter()
        real(self, n_seqs)
        kind = "generating" if batch.n == len(ids) else "with prompt"
        shape = f"{kind}, {len(ids)} seqs in {runs(ids)} run(s)" + (", after a move" * (moved > 0))
        steps.append((shape, time.perf_counter() - began))

    llamacpp_sched.Scheduler._decode = timed  # type: ignore[method-assign]
    loaded = Engine(home).load(model, kv=layout)
    prompts = [*GROUNDED.values(), *OPEN.values()]

    def ask(serial: int, out: list[int]) -> None:
        text = f"#{serial}. {prompts[serial % len(prompts)]}"
        answer = collect(loaded.chat_stream([{"role": "user", "content": text}],
                                            temperature=0, max_tokens=tokens))
        out.append(len(answer.tokens))

    ask(0, [])  # warm-up
    steps.clear()
    total, seconds = 0, 0.0
    for s in range(sets):
        out: list[int] = []
        threads = [threading.Thread(target=ask, args=(1000 * (s + 1) + i, out))
                   for i in range(streams)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds += time.perf_counter() - began
        total += sum(out)
    shapes: dict[str, list[float]] = collections.defaultdict(list)
    for shape, dt in steps:
        shapes[shape].append(dt)
    sched = loaded.backend._sched  # type: ignore[attr-defined]
    return {"layout": loaded.backend.kv_layout, "tokens": total,  # type: ignore[attr-defined]
            "tok_s": total / seconds, "moves": sched.moves,
            "shapes": {k: [len(v), statistics.median(v) * 1e3] for k, v in shapes.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.home, args.streams,
                                args.sets, args.tokens)))
        return
    print(f"{args.model}, {args.streams} streams, {args.sets} sets, up to {args.tokens} "
          f"tokens, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as home:
        results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
        for r in range(args.rounds):
            for layout in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", layout, "--home", home,
                     "--model", args.model, "--streams", str(args.streams),
                     "--sets", str(args.sets), "--tokens", str(args.tokens)],
                    capture_output=True, text=True, check=True)
                results[layout].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for layout in LAYOUTS:
            rates = [r["tok_s"] for r in results[layout]]
            print(f"\n{layout}: median {statistics.median(rates):.1f} tok/s "
                  f"(rounds {', '.join(f'{x:.1f}' for x in rates)}); "
                  f"moves a round {[r['moves'] for r in results[layout]]}")
            last = results[layout][-1]
            for shape, (count, ms) in sorted(last["shapes"].items()):
                print(f"  {shape}: {count} steps, median {ms:.1f} ms")
        ratios = [s["tok_s"] / u["tok_s"]
                  for s, u in zip(results["split"], results["unified"], strict=True)]
        print(f"\nsplit/unified: median {statistics.median(ratios):.2f}x "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
