"""``lanner merge ADAPTER``: a LoRA adapter merged into a full model folder."""

from __future__ import annotations

import argparse

from lanner import paths


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge a LoRA adapter into a full model folder (and GGUF)",
        description="Merge a LoRA adapter (e.g. OUTPUT_DIR/adapter from lanner tune) into its "
        "base model and save a full safetensors model folder with the tokenizer and the chat "
        "template the adapter was trained with. --gguf also writes model.gguf for llama.cpp "
        "(only for a base that was a GGUF file: the base file with the changed tensors "
        "replaced).")
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter folder (peft format)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="the folder to write (default: 'merged' beside the adapter)")
    p.add_argument("--base", metavar="MODEL",
                   help="the base model, when the adapter does not record it (a Lanner name, "
                   "model folder or .gguf)")
    p.add_argument("--gguf", action="store_true", help="also write OUT/model.gguf")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.tune.merge import merge

    merged = merge(args.adapter, args.output, base=args.base, home=paths.home(args.home),
                   gguf=args.gguf)
    print(merged.folder)
    if merged.gguf is not None:
        print(merged.gguf)
    return 0
