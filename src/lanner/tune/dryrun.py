"""What ``lanner tune CONFIG --dry-run`` prints: one training example as the
model will see it, its trained tokens marked, and the dataset's token counts.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any

from lanner.tune.base import base_model_folder, load_tokenizer, tokenizer_chat_format
from lanner.tune.config import TuneConfig
from lanner.tune.dataset import IGNORE, Example, Examples, SplitStats, build_examples, pack

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around trained text when there is no colour
_GREEN, _RESET = "\x1b[32m", "\x1b[0m"
_RULE = "-" * 72


def dry_run(config: TuneConfig, home: Path, *, color: bool = False) -> str:
    """Load the base model's tokenizer and ChatFormat, build the examples and
    describe them (``dry_run_report``); no weights are loaded."""
    tokenizer = load_tokenizer(base_model_folder(config.base_model, home))
    chat_format = tokenizer_chat_format(tokenizer, config.chat_format)
    examples = build_examples(config, tokenizer, chat_format)
    return dry_run_report(config, examples, tokenizer, color=color)


def dry_run_report(config: TuneConfig, examples: Examples, tokenizer: Any, *,
                   color: bool = False) -> str:
    """The first training example with its trained tokens marked (green when
    ``color``, else between ⟦ ⟧), then a table of the dataset's counts."""
    parts = []
    if examples.train:
        first = examples.train[0]
        mark = "green" if color else f"between {OPEN} {CLOSE}"
        text = marked_text(first, tokenizer, color=color)
        parts += [f"First training example ({first.source}); trained tokens {mark}:", _RULE,
                  text.removesuffix("\n"), _RULE]
    else:
        parts.append("No training example to show.")
    parts.append(counts_table(examples, config.max_seq_len))
    if config.packing and examples.train:
        rows = len(pack(examples.train, config.max_seq_len))
        parts.append(f"packing: {examples.train_stats.examples} training examples in {rows} "
                     f"rows of up to {config.max_seq_len} tokens")
    for stats in (examples.train_stats, examples.eval_stats):
        parts += [f"skipped {reason}" for reason in stats.skipped_reasons]
    return "\n".join(parts)


def marked_text(example: Example, tokenizer: Any, *, color: bool = False) -> str:
    """The example's text, decoded run by run, with the trained runs marked."""
    out = []
    for trained, run in groupby(zip(example.input_ids, example.labels, strict=True),
                                key=lambda pair: pair[1] != IGNORE):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if trained:
            text = f"{_GREEN}{text}{_RESET}" if color else f"{OPEN}{text}{CLOSE}"
        out.append(text)
    return "".join(out)


def counts_table(examples: Examples, max_seq_len: int) -> str:
    """Rows, tokens and trained tokens per split, with the rows left out."""
    header = ("split", "rows", "examples", "tokens", "trained tokens",
              f"too long (> {max_seq_len})", "malformed, skipped")
    lines = [header, _counts("train", examples.train_stats)]
    if examples.eval_stats.rows:
        lines.append(_counts("eval", examples.eval_stats))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
                     .rstrip() for line in lines)


def _counts(name: str, stats: SplitStats) -> tuple[str, ...]:
    return (name, f"{stats.rows:,}", f"{stats.examples:,}", f"{stats.tokens:,}",
            f"{stats.trained_tokens:,}", f"{stats.too_long:,}", f"{stats.skipped:,}")
