"""`lanner tune` against a plain TRL `SFTTrainer` + peft: training tokens/s on
the same model, data and settings, without and with packing.

Model: the bundled SmolLM2-135M-Instruct, converted once to a safetensors
folder (float32 on CPU, bfloat16 on CUDA, for both). Data: the text-to-SQL
train split (evals/tasks/text_to_sql/train.jsonl) as chat turns, the question
asked by the user and the query answered in a ```sql block, without the schema,
so the rows are of mixed lengths (52 to 222 tokens, median 81, with SmolLM2's
default system prompt). Lanner reads them as `format: chat` messages; TRL gets the same
turns as a conversational prompt/completion dataset, so both render them with
the model's chat template and train only the reply (TRL's completion-only loss,
Lanner's assistant masking).

Settings, equal on both sides: LoRA r 16, alpha 32, dropout 0.05 on all linear
layers; AdamW, learning rate 2e-4, cosine schedule, no warm-up, gradient
clipping at 1.0; batch 8, no accumulation, max length 256; one epoch; seed 0;
no checkpoints, no evaluation. TRL's defaults that differ from Lanner's are set
to Lanner's: no gradient checkpointing (TRL turns it on by default; Lanner has
none) and no mixed precision. Packing: Lanner's best-fit packing, TRL's "bfd"
(both padding-free: positions restart per example, attention stays inside;
Lanner keeps batch_size packed rows, TRL joins a batch into one row).

Tokens/s = real (non-pad) tokens trained on / time in the training loop: for
TRL its `train_runtime` over the tokenized dataset it trained on; for Lanner
`metrics.json` (the time of its optimizer steps). Each run is a separate
process, one after another, using every core. Nothing is written to the repo.

    python benchmarks/tune_speed.py            # whole split (a few minutes on CPU)
    python benchmarks/tune_speed.py --rows 96  # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lanner.backends.gguf_convert import converted_folder
from lanner.engine.registry import bundled_path

SPLIT = Path(__file__).resolve().parents[1] / "src/lanner/evals/tasks/text_to_sql/train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
SETTINGS = {"learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_steps": 0, "epochs": 1,
            "batch_size": 8, "gradient_accumulation_steps": 1, "max_seq_len": 256, "seed": 0}


def write_data(folder: Path, rows: int | None) -> tuple[Path, Path]:
    """The split as chat messages (Lanner) and as prompt/completion turns (TRL)."""
    lines = [json.loads(line) for line in SPLIT.read_text().splitlines() if line.strip()]
    chat, pairs = folder / "chat.jsonl", folder / "prompt_completion.jsonl"
    with chat.open("w") as c, pairs.open("w") as p:
        for row in lines[:rows]:
            question = {"role": "user", "content": row["question"]}
            answer = {"role": "assistant", "content": f"```sql\n{row['query']}\n```"}
            c.write(json.dumps({"messages": [question, answer]}) + "\n")
            p.write(json.dumps({"prompt": [question], "completion": [answer]}) + "\n")
    return chat, pairs


def run_lanner(model: Path, data: Path, folder: Path, packing: bool) -> dict[str, Any]:
    out = folder / f"lanner-{'packed' if packing else 'padded'}"
    config = {"base_model": str(model), "data": {"train": str(data), "format": "chat"},
              "lora": LORA, **SETTINGS, "packing": packing, "output_dir": str(out),
              "save_steps": 10**6, "logging_steps": 10**6}
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "lanner", "--home", str(folder / "home"),
                           "tune", str(path)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"lanner tune failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"tokens": metrics["train_tokens"], "seconds": metrics["train_seconds"],
            "steps": metrics["steps"], "final_loss": metrics["final_loss"]}


def run_trl(model: Path, data: Path, folder: Path, packing: bool) -> dict[str, Any]:
    args = {"model": str(model), "data": str(data), "packing": packing,
            "out": str(folder / f"trl-{'packed' if packing else 'padded'}")}
    done = subprocess.run([sys.executable, __file__, "--trl-worker", json.dumps(args)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"TRL failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def trl_worker(args: dict[str, Any]) -> None:
    """One TRL run, in its own process; prints its numbers as one JSON line."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    config = SFTConfig(
        output_dir=args["out"], per_device_train_batch_size=SETTINGS["batch_size"],
        gradient_accumulation_steps=SETTINGS["gradient_accumulation_steps"],
        num_train_epochs=SETTINGS["epochs"], learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type=SETTINGS["lr_scheduler"], warmup_steps=SETTINGS["warmup_steps"],
        max_grad_norm=1.0, weight_decay=0.0, max_length=SETTINGS["max_seq_len"],
        packing=args["packing"], gradient_checkpointing=False, bf16=cuda, fp16=False,
        use_cpu=not cuda, seed=SETTINGS["seed"], save_strategy="no", eval_strategy="no",
        report_to="none", logging_steps=10**6, disable_tqdm=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, peft_config=lora,
                         train_dataset=load_dataset("json", data_files=args["data"],
                                                    split="train"))
    rows = trainer.train_dataset["input_ids"]
    out = trainer.train()
    print(json.dumps({"tokens": sum(len(r) for r in rows), "seconds":
                      out.metrics["train_runtime"], "steps": out.global_step,
                      "final_loss": out.training_loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, help="use the first N rows of the split")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    gguf = bundled_path("smollm2")
    if gguf is None:
        sys.exit("needs the bundled SmolLM2 (make install)")
    with tempfile.TemporaryDirectory(prefix="tune-speed-") as tmp:
        folder = Path(tmp)
        model = converted_folder(gguf, folder / "converted")
        chat, pairs = write_data(folder, args.rows)
        print(f"SmolLM2-135M, {sum(1 for _ in chat.open())} text-to-SQL rows, "
              f"batch {SETTINGS['batch_size']}, LoRA r {LORA['r']} all-linear, one epoch")
        print(f"{'':10} {'tool':8} {'steps':>6} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
        for packing in (False, True):
            label = "packed" if packing else "padded"
            results = {"lanner": run_lanner(model, chat, folder, packing),
                       "trl": run_trl(model, pairs, folder, packing)}
            for tool, r in results.items():
                rate = r["tokens"] / r["seconds"]
                r["rate"] = rate
                print(f"{label:10} {tool:8} {r['steps']:6d} {r['tokens']:8d} "
                      f"{r['seconds']:8.1f} {rate:9.1f}", flush=True)
            print(f"{label:10} lanner / trl tokens/s: "
                  f"{results['lanner']['rate'] / results['trl']['rate']:.3f}x", flush=True)


if __name__ == "__main__":
    main()
