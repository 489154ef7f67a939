"""Fixtures for the fine-tuning tests: a tiny random Llama with a ChatML
tokenizer (trained here, no downloads), chat data that a model can learn in a
few steps, and tune configs that point at them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "what is the colour of the sky? the sky is blue.",
    "name a fruit. an apple is a fruit.",
    "count to three: one two three.",
    "SELECT title FROM books WHERE price > 10",
]
QUESTIONS = ["name a colour", "say a fruit", "count to three", "what is the sky",
             "pick a number", "say hello", "name a book", "list two fruits"]


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 64) saved with its tokenizer in ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHATML)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_chat_data(path: Path, n: int = 32) -> Path:
    """Conversations whose answer is always the same short text: easy to learn."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            question = QUESTIONS[i % len(QUESTIONS)] + "?" * (1 + i % 3)
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": "the sky is blue."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_config(folder: Path, base_model: Path | str, **overrides: Any) -> Path:
    """A tune YAML in ``folder`` on chat data written beside it."""
    train = write_chat_data(folder / "train.jsonl")
    config: dict[str, Any] = {
        "base_model": str(base_model),
        "data": {"train": str(train), "format": "chat"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "learning_rate": 0.01, "lr_scheduler": "constant", "max_steps": 6,
        "batch_size": 4, "max_seq_len": 64, "seed": 1, "save_steps": 100,
        "logging_steps": 100, "output_dir": str(folder / "out"),
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def train_adapter(folder: Path, base_model: Path | str, **overrides: Any) -> Path:
    """Tune ``base_model`` in-process as ``write_config`` says; the adapter folder."""
    from lanner.tune.config import load_config
    from lanner.tune.trainer import train

    folder.mkdir(parents=True, exist_ok=True)
    config = load_config(write_config(folder, base_model, **overrides))
    return train(config, home=folder / "home", progress=False).adapter


def chat_ids(backend: Any, question: str) -> list[int]:
    """The prompt ids ``lanner chat`` sends for one user message."""
    from lanner.engine.chatformat import resolve_chat_format

    text = resolve_chat_format(backend.metadata).render(
        [{"role": "user", "content": question}], add_generation_prompt=True)
    ids: list[int] = backend.tokenize(text, add_bos=False, special=True)
    return ids


def greedy(backend: Any, ids: list[int], n: int = 12) -> list[int]:
    """Greedy token ids from a transformers backend."""
    from lanner.engine.types import Request, collect

    result = collect(backend.stream(Request(prompt=ids, temperature=0.0, max_tokens=n)))
    return [t.id for t in result.tokens]
