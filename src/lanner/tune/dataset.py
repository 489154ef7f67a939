"""Training examples: data rows -> token ids with a loss mask from the ChatFormat.

A chat row is rendered once, whole, by the same ChatFormat that ``lanner chat``
uses (``add_generation_prompt=False``), and tokenized as ``Model.chat_request``
tokenizes (no BOS added, special-token text parsed). Each assistant reply runs
from the end of the conversation before it, rendered with the generation prompt
(what chat sends the model), through the reply's end-of-turn string (the
ChatFormat's ``stop``): those characters are trained, so the model learns to stop.
Tokens are matched to characters through the fast tokenizer's offsets, so
masking never changes how the text tokenizes.

A completion row is raw text, tokenized as ``Model.completion_request`` does
(BOS if the model adds one, special-token text not parsed); the completion and
an appended EOS are trained.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lanner.engine.chatformat import ChatFormat
from lanner.errors import ChatFormatError, InvalidRequest
from lanner.tune.rows import (
    BadRow,
    BadRows,
    ChatSample,
    Messages,
    Row,
    Sample,
    TextSample,
    read_rows,
    sample_maker,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from lanner.tune.config import TuneConfig

IGNORE = -100
"""The label of a token that is not trained (PyTorch's cross-entropy ignore_index)."""
Span = tuple[int, int]


@dataclass
class Example:
    """One training row."""

    input_ids: list[int]
    labels: list[int]
    """Aligned with ``input_ids`` (the model shifts them, as Hugging Face models
    do): the token's own id where it is trained, IGNORE (-100) elsewhere."""
    source: str
    """Where it came from, "file:line"; a packed row joins its rows' with " + "."""
    position_ids: list[int] | None = None
    """None: positions 0..n-1. A packed row (``pack``): positions that restart at
    0 at each example's first token, which is where each example begins."""


@dataclass
class SplitStats:
    """What became of a split's rows."""

    rows: int = 0
    """Rows read, malformed ones included."""
    skipped: int = 0
    """Malformed rows skipped (``data.skip_bad_rows``)."""
    too_long: int = 0
    """Rows longer than ``max_seq_len`` tokens, dropped (never cut)."""
    examples: int = 0
    tokens: int = 0
    """Tokens in the examples kept."""
    trained_tokens: int = 0
    """Of those, the tokens with a label (but a row's first, which nothing predicts)."""
    skipped_reasons: list[str] = field(default_factory=list)
    """The first few malformed rows, "file:line: why"."""


@dataclass
class Examples:
    train: list[Example]
    eval: list[Example]
    train_stats: SplitStats
    eval_stats: SplitStats


def build_examples(config: TuneConfig, tokenizer: Any, chat_format: ChatFormat) -> Examples:
    """The train and eval examples of ``config.data``, tokenized and masked.

    ``tokenizer``: the base model's fast Hugging Face tokenizer; ``chat_format``:
    its ChatFormat (see ``lanner.tune.base``). A malformed row is a DataError
    naming file and line unless ``data.skip_bad_rows``.
    """
    data = config.data
    encoder = Encoder(tokenizer, chat_format, data.train_on)
    make = sample_maker(data.format, data.system, data.schema)
    train_bad, eval_bad = BadRows(data.skip_bad_rows), BadRows(data.skip_bad_rows)
    train_rows = [row for file in data.train for row in read_rows(file, train_bad)]
    eval_rows = [row for file in data.eval for row in read_rows(file, eval_bad)]
    if data.eval_split:
        train_rows, eval_rows = split_rows(train_rows, data.eval_split, config.seed)
    train, train_stats = _encode_split(train_rows, train_bad, make, encoder, config.max_seq_len)
    evals, eval_stats = _encode_split(eval_rows, eval_bad, make, encoder, config.max_seq_len)
    return Examples(train, evals, train_stats, eval_stats)


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, eval): a seeded random ``fraction`` of the rows (at least one) held
    out, both in file order."""
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise InvalidRequest("data.eval_split", f"holding out {n_eval} of {len(rows)} rows "
                             "leaves none to train on")
    held = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def _encode_split(rows: list[Row], bad: BadRows, make: Callable[[dict[str, Any]], Sample],
                  encoder: Encoder, max_seq_len: int) -> tuple[list[Example], SplitStats]:
    stats = SplitStats(rows=len(rows) + bad.count)
    examples = []
    for row in rows:
        try:
            ids, labels = encoder.encode(make(row.values))
        except (BadRow, ChatFormatError) as exc:
            bad.report(row.source, str(exc))
            continue
        if len(ids) > max_seq_len:
            stats.too_long += 1
            continue
        examples.append(Example(ids, labels, row.source))
        stats.tokens += len(ids)
        stats.trained_tokens += sum(label != IGNORE for label in labels[1:])
    stats.skipped, stats.skipped_reasons = bad.count, bad.reasons
    stats.examples = len(examples)
    return examples, stats


class Encoder:
    """Token ids and labels of one Sample."""

    def __init__(self, tokenizer: Any, chat_format: ChatFormat, train_on: str) -> None:
        self.tokenizer, self.format, self.train_all = tokenizer, chat_format, train_on == "all"
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        adds_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
        self._bos: list[int] = [bos] if adds_bos else []
        self._eos: list[int] = [eos] if eos is not None else []

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        if isinstance(sample, TextSample):
            return self._text(sample)
        return self._chat(sample)

    def _chat(self, sample: ChatSample) -> tuple[list[int], list[int]]:
        text = self.format.render(sample.messages, add_generation_prompt=False)
        spans = [(0, len(text))] if self.train_all else reply_spans(
            sample.messages, text, self.format)
        ids, offsets = self._tokenize(text, special=True)
        return ids, _labels(ids, offsets, spans)

    def _text(self, sample: TextSample) -> tuple[list[int], list[int]]:
        text = sample.prompt + sample.completion
        start = 0 if self.train_all else len(sample.prompt)
        ids, offsets = self._tokenize(text, special=False)
        labels = _labels(ids, offsets, [(start, len(text))])
        return ([*self._bos, *ids, *self._eos],
                [IGNORE] * len(self._bos) + labels + self._eos)

    def _tokenize(self, text: str, *, special: bool) -> tuple[list[int], list[Span]]:
        # The same call as TransformersBackend.tokenize, plus the offsets.
        enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special,
                             return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def reply_spans(messages: Messages, text: str, fmt: ChatFormat) -> list[Span]:
    """The character spans of ``text`` (the whole conversation, rendered) that
    the assistant wrote: each reply and its end-of-turn string. Raises BadRow
    when the template renders a conversation's beginning differently alone."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix_length(fmt.render(messages[:i], add_generation_prompt=True), text, fmt)
        turn_end = _prefix_length(fmt.render(messages[: i + 1], add_generation_prompt=False),
                                  text, fmt)
        content = message.get("content") or ""
        content_end = start + len(content) if text.startswith(content, start) else start
        spans.append((start, _end_of_turn(text, content_end, turn_end, fmt.stop)))
    return spans


def _prefix_length(prefix: str, text: str, fmt: ChatFormat) -> int:
    if not text.startswith(prefix):
        raise BadRow(f"chat template ({fmt.name}) renders the conversation before a reply "
                     "differently from the start of the whole conversation, so the "
                     "reply's tokens cannot be told apart")
    return len(prefix)


def _end_of_turn(text: str, content_end: int, turn_end: int, stops: tuple[str, ...]) -> int:
    """Where the reply's end-of-turn string ends (the first stop string after
    the content), else where the template's assistant turn ends."""
    ends = [found + len(s) for s in stops
            if (found := text.find(s, content_end, turn_end)) >= 0]
    return min(ends, default=turn_end)


def _labels(ids: list[int], offsets: list[Span], spans: list[Span]) -> list[int]:
    """Each token's id where its characters overlap a trained span, else IGNORE."""
    def trained(a: int, b: int) -> bool:
        return any((a < e and b > s) or (a == b and s <= a < e) for s, e in spans)
    return [t if trained(a, b) else IGNORE for t, (a, b) in zip(ids, offsets, strict=True)]


# -- packing ------------------------------------------------------------------------


def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Examples packed into rows of at most ``max_seq_len`` tokens (best fit,
    longest first), each row with ``position_ids`` restarting at 0 per example.

    Each example's first label is set to IGNORE, so no example learns to predict
    its first token from the one before it (unpacked, that label is never used).

    What the trainer must do: call the model with ``position_ids``,
    ``attention_mask=None`` and ``use_cache=False``. transformers then finds the
    examples where the positions restart and keeps attention within each
    (``masking_utils.find_packed_sequence_indices``; sdpa, eager and flash
    attention alike), and the rotary positions are each example's own. An
    attention_mask, or a KV cache (which models create by default, in training
    mode too), turns that detection off and attention crosses examples. To batch
    rows of different lengths, pad each row with pad tokens whose position_ids
    run 0, 1, ... (a sequence of their own, which no real token attends to) and
    labels IGNORE.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row index), ascending
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_seq_len:
            raise ValueError(f"{examples[i].source}: {n} tokens, more than {max_seq_len}")
        k = bisect.bisect_left(room, (n, -1))  # the fullest row it still fits in
        if k == len(room):
            rows.append([])
            left, row = max_seq_len, len(rows) - 1
        else:
            left, row = room.pop(k)
        rows[row].append(i)
        bisect.insort(room, (left - n, row))
    return [_joined([examples[i] for i in row]) for row in rows]


def _joined(parts: list[Example]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for part in parts:
        ids += part.input_ids
        labels += [IGNORE, *part.labels[1:]]
        positions += range(len(part.input_ids))
    return Example(ids, labels, " + ".join(p.source for p in parts), positions)
