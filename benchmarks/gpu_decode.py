"""Decode speed of a Falcon-7B-shaped model through Lanner's transformers path.

Random weights in bf16 with Falcon-7B's shape (32 layers, hidden 4544, 71 query
heads sharing one key/value head: multi-query attention; attention and MLP in
parallel; vocabulary 65024), saved once to a temporary folder and loaded by
``TransformersBackend`` as any model folder. In one run:

  * single stream: Lanner's tokens/s, beside the memory-bandwidth roofline
    (every weight byte and the KV cache read once per token, at the device's
    copy bandwidth measured here) and beside HF ``generate`` on the same loaded
    model (same prompt, greedy; whether the tokens are identical is printed:
    random weights give near-ties that bf16 kernels may break differently);
  * --streams concurrent requests (default 32) decoded together: aggregate tokens/s.

Targets (issue 13): single stream >= 70% of the roofline and >= 2x HF generate.
``--smoke`` runs a 2-layer, narrow model of the same kind on the CPU in seconds
(the test suite runs it); its figures check the script, not a GPU.
Usage: python benchmarks/gpu_decode.py [--smoke] [--tokens N] [--streams N]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

FALCON_7B = {"hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
             "vocab_size": 65024}
SMOKE = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 1024}
PROMPT_TOKENS = 32


def make_model(folder: Path, shape: dict[str, int], device: str) -> Path:
    """A random-weight Falcon of ``shape`` in bf16, and a word-level tokenizer
    that can spell every id, saved in ``folder``. No EOS: every run decodes
    exactly the tokens asked for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import FalconConfig, FalconForCausalLM, PreTrainedTokenizerFast

    config = FalconConfig(**shape, multi_query=True, parallel_attn=True,
                          new_decoder_architecture=False, bias=False, alibi=False,
                          max_position_embeddings=2048, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = FalconForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(shape["vocab_size"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(folder)
    del model
    return folder


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large on-device copy (read + write), best of a few."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * n / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_per_token(model: Any, context: int) -> int:
    """Weights read once per decoded token, plus the KV cache at ``context``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * head_dim * 2 * context  # one KV head, bf16
    return weights + kv


def run_lanner(backend: Any, ids: list[int], n: int) -> tuple[float, list[int]]:
    from lanner.engine.types import Request, collect

    sync(backend.device)
    start = time.perf_counter()
    out = collect(backend.stream(Request(ids, temperature=0.0, max_tokens=n)))
    sync(backend.device)
    tokens = [t.id for t in out.tokens]
    return len(tokens) / (time.perf_counter() - start), tokens


def run_hf(backend: Any, ids: list[int], n: int) -> tuple[float, list[int]]:
    prompt = torch.tensor([ids], device=backend.device)
    sync(backend.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = backend.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=n, do_sample=False)
    sync(backend.device)
    tokens = out[0, len(ids):].tolist()
    return len(tokens) / (time.perf_counter() - start), tokens


def run_streams(backend: Any, prompts: list[list[int]], n: int) -> float:
    """Aggregate tokens/s of every prompt decoded together (``stream_to``)."""
    from lanner.engine.types import Finish, Request

    done = threading.Semaphore(0)
    total = [0]

    def sink(item: object) -> None:
        if isinstance(item, Finish):
            total[0] += item.usage.completion_tokens
        elif item is None:
            done.release()

    start = time.perf_counter()
    for ids in prompts:
        backend.stream_to(Request(ids, temperature=0.0, max_tokens=n), sink)
    for _ in prompts:
        done.acquire()
    return total[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer narrow model on the CPU: checks the script")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats, streams = args.repeats, args.streams
    from lanner.backends.transformers import TransformersBackend

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    shape = SMOKE if args.smoke else FALCON_7B
    n = args.tokens or (16 if args.smoke else 256)
    with tempfile.TemporaryDirectory(prefix="lanner-gpu-decode-") as tmp:
        folder = make_model(Path(tmp), shape, device)
        backend = TransformersBackend(folder, dtype="bfloat16", device=device,
                                      n_seq_max=max(streams, 1))
        measure(backend, shape, n, streams, repeats, args.smoke)
        backend.close()


def measure(backend: Any, shape: dict[str, int], n: int, streams: int, repeats: int,
            smoke: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    vocab = shape["vocab_size"]
    ids = torch.randint(1, vocab, (PROMPT_TOKENS,), generator=generator).tolist()
    run_lanner(backend, ids, 4)  # warm-up (kernels, allocator)
    run_hf(backend, ids, 4)
    ours = hf = 0.0
    ours_ids: list[int] = []
    hf_ids: list[int] = []
    for _ in range(repeats):  # interleaved, best of each
        rate, ours_ids = run_lanner(backend, ids, n)
        ours = max(ours, rate)
        rate, hf_ids = run_hf(backend, ids, n)
        hf = max(hf, rate)
    bandwidth = copy_bandwidth(backend.device)
    per_token = bytes_per_token(backend.model, PROMPT_TOKENS + n // 2)
    roofline = bandwidth / per_token
    prompts = [torch.randint(1, vocab, (PROMPT_TOKENS,), generator=generator).tolist()
               for _ in range(streams)]
    run_streams(backend, prompts[:2], 4)  # warm-up of the batched shapes
    aggregate = run_streams(backend, prompts, n)
    same = next((i for i, (a, b) in enumerate(zip(ours_ids, hf_ids, strict=False)) if a != b),
                None)
    name = torch.cuda.get_device_name() if backend.device.type == "cuda" else "CPU"
    print(f"gpu decode, Falcon-shaped random bf16 ({shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}, multi-query, parallel attention), {name}, "
          f"{PROMPT_TOKENS}-token prompt, {n} new tokens, best of {repeats}"
          f"{', SMOKE (not a measurement)' if smoke else ''}")
    print(f"  weights {per_token / 1e9:.2f} GB read per token; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; roofline {roofline:.1f} tok/s")
    print(f"  lanner, transformers path, 1 stream   {ours:9.1f} tok/s  "
          f"{ours / roofline:6.1%} of roofline (target >= 70%)")
    print(f"  HF generate, 1 stream                 {hf:9.1f} tok/s  "
          f"lanner / HF = {ours / hf:.2f} (target >= 2)")
    print(f"  lanner, {streams} concurrent streams       {aggregate:9.1f} tok/s aggregate "
          f"({aggregate / ours:.1f}x one stream)")
    print(f"  greedy tokens identical to HF generate: "
          f"{'yes' if same is None else f'no, first difference at token {same}'}")


if __name__ == "__main__":
    main()
