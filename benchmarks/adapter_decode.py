"""Decode speed with a LoRA adapter loaded: Lanner's transformers path against
peft's own ``PeftModel.generate`` on the same weights, ids and dtype.

The adapter is made here: rank 8 on every linear layer of the bundled
SmolLM2-135M (converted from its GGUF), with random B matrices (peft starts
them at zero, which would make the adapter a no-op). Greedy tokens must be
identical on both sides (checked); the figure is the best of ``--repeats``
interleaved runs of ``--tokens`` new tokens.

    python benchmarks/adapter_decode.py [--dtypes float32,bfloat16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import MESSAGES, smollm2_folder  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(folder: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lanner.backends.transformers import TransformersBackend
    from lanner.engine.types import Request, collect

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        folder = smollm2_folder(home)
        adapter = make_adapter(folder, home / "adapter")
        ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(
            MESSAGES, add_generation_prompt=True, return_tensors="pt",
            return_dict=True)["input_ids"]
        print(f"decode with a LoRA adapter (rank 8, every linear), SmolLM2-135M-Instruct, "
              f"{args.tokens} new tokens, greedy, {torch.get_num_threads()} threads, best of "
              f"{args.repeats}, {datetime.date.today()}, load average {os.getloadavg()[0]:.1f}")
        for dtype in args.dtypes.split(","):
            base = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
            peft = PeftModel.from_pretrained(base, adapter).eval()
            ours = TransformersBackend(folder, dtype=dtype, adapter=adapter)

            def run_peft(peft: PeftModel = peft,
                         eos: frozenset[int] = ours._eos_ids) -> list[int]:
                with torch.inference_mode():
                    out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=args.tokens, do_sample=False)
                new = out[0, ids.shape[1]:].tolist()
                return new[:-1] if new and new[-1] in eos else new

            def run_ours(ours: TransformersBackend = ours) -> list[int]:
                request = Request(ids[0].tolist(), temperature=0.0, max_tokens=args.tokens)
                return [t.id for t in collect(ours.stream(request)).tokens]

            sides = {"peft generate": run_peft, "lanner": run_ours}
            outputs = {label: run() for label, run in sides.items()}
            if outputs["peft generate"] != outputs["lanner"]:
                pairs = zip(outputs["peft generate"], outputs["lanner"], strict=False)
                at = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
                raise SystemExit(f"{dtype}: greedy tokens differ from peft's at token {at}")
            best = dict.fromkeys(sides, 0.0)
            for _ in range(args.repeats):
                for label, run in sides.items():
                    start = time.perf_counter()
                    n = len(run())
                    best[label] = max(best[label], n / (time.perf_counter() - start))
            for label, rate in best.items():
                print(f"  {label:14s} {dtype:9s} {rate:6.1f} tok/s")
            ratio = best["lanner"] / best["peft generate"]
            print(f"  lanner / peft generate ({dtype}) = {ratio:.3f} (greedy tokens "
                  f"identical: checked, {len(outputs['lanner'])} tokens)")
            ours.close()


if __name__ == "__main__":
    main()
