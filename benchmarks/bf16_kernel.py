"""bfloat16 matrix products on a CPU without bfloat16 instructions: PyTorch's
``F.linear`` against Lanner's kernel (``lanner.backends.hf_kernels``), on
every linear layer of a SmolLM2-135M-shaped model (30 layers of q, k, v, o,
gate, up, down, then the 49,152-row output layer), random weights, for steps
of 1, 8 and 44 rows (one token, 8 streams, a prompt). Each pass reads
distinct matrices, as a model does, so one row's figure is bound by memory.
The outputs must be equal bit for bit (checked); the figures are the best of
``--repeats`` interleaved passes.

    python benchmarks/bf16_kernel.py [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lanner.backends import hf_kernels

LAYERS = 30
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
VOCAB = 49152


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="1,8,44")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = hf_kernels.bf16_linear()
    if kernel is None:
        why = hf_kernels.usable() or "its check against F.linear failed"
        raise SystemExit(f"the kernel is not used on this machine: {why}")
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=generator) * 0.05).bfloat16()
               for _ in range(LAYERS) for n, k in SHAPES]
    weights.append((torch.randn(VOCAB, 576, generator=generator) * 0.05).bfloat16())
    size = sum(w.numel() * w.element_size() for w in weights)
    print(f"bfloat16 products, SmolLM2-135M shapes ({size / 1e6:.0f} MB of weights), "
          f"{torch.get_num_threads()} threads, best of {args.repeats}, "
          f"{datetime.date.today()}, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k, generator=generator).bfloat16() for k in (576, 1536)}
        for weight in weights[:8] + weights[-1:]:
            x = inputs[weight.shape[1]]
            ours, theirs = kernel(x, weight), F.linear(x, weight)
            if not torch.equal(ours.view(torch.int16), theirs.view(torch.int16)):
                raise SystemExit(f"{rows} rows: outputs differ from F.linear's")

        def one_pass(linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     inputs: dict[int, torch.Tensor] = inputs) -> None:
            for weight in weights:
                linear(inputs[weight.shape[1]], weight)

        best = {"F.linear": float("inf"), "kernel": float("inf")}
        for _ in range(args.repeats):
            for label, linear in (("F.linear", F.linear), ("kernel", kernel)):
                start = time.perf_counter()
                one_pass(linear)
                best[label] = min(best[label], time.perf_counter() - start)
        torch_ms, kernel_ms = best["F.linear"] * 1e3, best["kernel"] * 1e3
        print(f"  {rows:3d} row{'s' * (rows > 1)}: F.linear {torch_ms:8.2f} ms, kernel "
              f"{kernel_ms:8.2f} ms ({torch_ms / kernel_ms:.2f}x; weights read at "
              f"{size / best['kernel'] / 1e9:.1f} against {size / best['F.linear'] / 1e9:.1f} "
              "GB/s), outputs bit-identical")


if __name__ == "__main__":
    main()
