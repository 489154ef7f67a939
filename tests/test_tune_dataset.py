"""lanner.tune.dataset: rows -> token ids with the loss mask from the ChatFormat.

The tokenizer and chat template are the bundled SmolLM2's (converted folder);
prompts are compared token for token with what ``Model.chat_request`` (what
``lanner chat`` sends) and ``Model.completion_request`` build.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from lanner.chat.prompts import render_prompt
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import DataError
from lanner.tune import (
    IGNORE,
    Example,
    Examples,
    TuneConfig,
    base_model_folder,
    build_examples,
    dry_run,
    dry_run_report,
    load_tokenizer,
    pack,
    tokenizer_chat_format,
)
from lanner.tune.rows import read_schema, sql_reply

SQL_DATA = Path(__file__).parents[1] / "src" / "lanner" / "evals" / "tasks" / "text_to_sql"
SQL_TASK = SQL_DATA.parent / "sql.yaml"
END = "<|im_end|>"  # SmolLM2's end-of-turn token (and EOS)

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_folder: Path) -> Any:
    return load_tokenizer(smollm2_hf_folder)


@pytest.fixture(scope="module")
def model(smollm2_hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    yield engine.load(str(smollm2_hf_folder), backend="transformers")
    engine.close()


def _config(tmp_path: Path, rows: list[Any] | str, name: str = "train.jsonl",
            **options: Any) -> TuneConfig:
    """A config over one data file holding ``rows`` (JSON Lines, or text as given)."""
    file = tmp_path / name
    if isinstance(rows, str):
        file.write_text(rows)
    else:
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": name, **options.pop("data", {})}
    return TuneConfig.from_dict({"base_model": "smollm2", "data": data, **options}, tmp_path)


def _build(tmp_path: Path, tokenizer: Any, rows: list[Any] | str, **options: Any) -> Examples:
    config = _config(tmp_path, rows, **options)
    return build_examples(config, tokenizer, tokenizer_chat_format(tokenizer))


def _runs(example: Example) -> list[tuple[int, list[int]]]:
    """(start index, token ids) of each run of trained tokens."""
    runs, i = [], 0
    for trained, group in groupby(example.labels, key=lambda label: label != IGNORE):
        n = len(list(group))
        if trained:
            runs.append((i, example.input_ids[i:i + n]))
        i += n
    return runs


def _trained_text(example: Example, tokenizer: Any) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=False) for _, ids in _runs(example)]


def _labels_are_ids_or_ignored(example: Example) -> bool:
    return all(label in (token, IGNORE)
               for token, label in zip(example.input_ids, example.labels, strict=True))


# -- each format: the trained tokens are the replies, the prompt is chat's ----------


def test_chat_trains_each_reply_and_its_end_of_turn(tmp_path: Path, tokenizer: Any,
                                                    model: Model) -> None:
    examples = _build(tmp_path, tokenizer, [{"messages": CHAT}])
    [example] = examples.train
    assert example.source == f"{tmp_path / 'train.jsonl'}:1"
    assert _trained_text(example, tokenizer) == ["Hello! How can I help?" + END, "4" + END]
    assert _labels_are_ids_or_ignored(example)
    text = model.chat_format.render(CHAT, add_generation_prompt=False)
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False) == text
    # Before each reply: exactly the tokens `lanner chat` sends for the turns so far.
    for (start, _), turns in zip(_runs(example), (2, 4), strict=True):
        assert example.input_ids[:start] == list(model.chat_request(CHAT[:turns]).prompt)
    assert (examples.train_stats.trained_tokens, examples.train_stats.tokens) == (
        sum(label != IGNORE for label in example.labels), len(example.input_ids))


def test_alpaca_is_one_user_turn_and_one_reply(tmp_path: Path, tokenizer: Any,
                                               model: Model) -> None:
    rows = "instruction,input,output\nName a colour.,,Blue.\nTranslate.,Good morning,Bonjour\n"
    examples = _build(tmp_path, tokenizer, rows, name="train.csv",
                      data={"format": "alpaca", "system": "Answer in one word."})
    first, second = examples.train
    assert second.source == f"{tmp_path / 'train.csv'}:3"
    assert _trained_text(first, tokenizer) == ["Blue." + END]
    assert _trained_text(second, tokenizer) == ["Bonjour" + END]
    asked = [{"role": "system", "content": "Answer in one word."},
             {"role": "user", "content": "Translate.\n\nGood morning"}]
    start = _runs(second)[0][0]
    assert second.input_ids[:start] == list(model.chat_request(asked).prompt)


def test_completion_is_raw_text_with_eos_trained(tmp_path: Path, tokenizer: Any,
                                                 model: Model) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "The capital of France is", "completion": " Paris."},
            {"prompt": "<|im_start|>1, 2,", "completion": " 3"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    config = TuneConfig.from_dict({"base_model": "smollm2", "data": {
        "train": "train.parquet", "format": "completion"}}, tmp_path)
    examples = build_examples(config, tokenizer, tokenizer_chat_format(tokenizer))
    for example, row in zip(examples.train, rows, strict=True):
        assert _trained_text(example, tokenizer) == [row["completion"] + END]
        start = _runs(example)[0][0]
        # Raw text: special-token text is not parsed, as `lanner run --raw` sends it.
        assert example.input_ids[:start] == list(model.completion_request(row["prompt"]).prompt)
    assert examples.train[1].source == f"{tmp_path / 'train.parquet'}:row 2"


def test_sql_asks_the_eval_task_prompt_and_trains_the_query(tmp_path: Path, tokenizer: Any,
                                                            model: Model) -> None:
    rows = [json.loads(line) for line in
            (SQL_DATA / "train.jsonl").read_text().splitlines()[:3]]
    examples = _build(tmp_path, tokenizer, rows,
                      data={"format": "sql", "schema": str(SQL_DATA / "schema.sql")})
    doc_to_text = jinja2.Template(yaml.safe_load(SQL_TASK.read_text())["doc_to_text"])
    for example, row in zip(examples.train, rows, strict=True):
        assert _trained_text(example, tokenizer) == [f"```sql\n{row['query']}\n```" + END]
        asked = [{"role": "user", "content": doc_to_text.render(question=row["question"])}]
        start = _runs(example)[0][0]
        assert example.input_ids[:start] == list(model.chat_request(asked).prompt)


def test_the_sql_prompt_template_is_the_eval_tasks() -> None:
    doc_to_text = yaml.safe_load(SQL_TASK.read_text())["doc_to_text"]
    question = "Which authors are from Chile?"
    assert render_prompt("tune_sql_user.jinja", schema=read_schema(SQL_DATA / "schema.sql"),
                         question=question) == jinja2.Template(doc_to_text).render(
                             question=question)
    assert sql_reply(" SELECT 1 \n") == "```sql\nSELECT 1\n```"


def test_train_on_all_trains_every_token(tmp_path: Path, tokenizer: Any) -> None:
    chat = _build(tmp_path, tokenizer, [{"messages": CHAT}], data={"train_on": "all"})
    assert chat.train[0].labels == chat.train[0].input_ids
    text = _build(tmp_path, tokenizer, [{"prompt": "a b", "completion": " c"}],
                  data={"train_on": "all", "format": "completion"})
    assert text.train[0].labels == text.train[0].input_ids


# -- malformed and over-long rows -------------------------------------------------------


BAD_JSONL = "\n".join([
    json.dumps({"messages": CHAT[1:3]}),
    "{not json",
    "[1, 2]",
    json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
    "",
    json.dumps({"messages": [{"role": "robot", "content": "?"}]}),
    json.dumps({"text": "wrong column"}),
]) + "\n"


@pytest.mark.parametrize(("rows", "name", "options", "where", "words"), [
    (BAD_JSONL, "train.jsonl", {}, 2, "not valid JSON"),
    ('{"instruction": "x"}\n', "t.jsonl", {"format": "alpaca"}, 1, "no 'output'"),
    ('{"instruction": "x", "output": 3}\n', "t.jsonl", {"format": "alpaca"}, 1,
     "output: must be text"),
    ("prompt,completion\na,b\nc,d,e\n", "t.csv", {"format": "completion"}, 3, "3 fields"),
    ('[{"question": "q", "query": "SELECT 1"}, {"question": "q"}]', "t.json",
     {"format": "sql"}, "row 2", "no 'query'"),
])
def test_a_malformed_row_names_file_and_line(tmp_path: Path, tokenizer: Any, rows: str,
                                             name: str, options: dict[str, Any],
                                             where: int | str, words: str) -> None:
    if options.get("format") == "sql":
        options["schema"] = str(SQL_DATA / "schema.sql")
    with pytest.raises(DataError) as info:
        _build(tmp_path, tokenizer, rows, name=name, data=options)
    assert str(info.value).startswith(f"{tmp_path / name}:{where}: ")
    assert words in str(info.value) and "skip_bad_rows" in str(info.value)


def test_skip_bad_rows_skips_and_counts_them(tmp_path: Path, tokenizer: Any) -> None:
    examples = _build(tmp_path, tokenizer, BAD_JSONL, data={"skip_bad_rows": True})
    stats = examples.train_stats
    assert [e.source for e in examples.train] == [f"{tmp_path / 'train.jsonl'}:1"]
    assert (stats.rows, stats.skipped, stats.examples) == (6, 5, 1)
    lines = sorted(int(reason.split(":")[1]) for reason in stats.skipped_reasons)
    assert lines == [2, 3, 4, 6, 7]


def test_rows_longer_than_max_seq_len_are_dropped_and_counted(tmp_path: Path,
                                                              tokenizer: Any) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 200}, CHAT[2]]}
    examples = _build(tmp_path, tokenizer, [{"messages": CHAT}, long, {"messages": CHAT}],
                      max_seq_len=128)
    stats = examples.train_stats
    assert (stats.rows, stats.too_long, stats.examples) == (3, 1, 2)
    assert all(len(e.input_ids) <= 128 for e in examples.train)


def test_eval_split_is_seeded_and_eval_files_are_counted_apart(tmp_path: Path,
                                                               tokenizer: Any) -> None:
    rows = [{"prompt": f"{i} +1 =", "completion": f" {i + 1}"} for i in range(10)]
    split = {"format": "completion", "eval_split": 0.2}
    first = _build(tmp_path, tokenizer, rows, data=split, seed=3)
    again = _build(tmp_path, tokenizer, rows, data=split, seed=3)
    assert (first.train_stats.examples, first.eval_stats.examples) == (8, 2)
    assert [e.source for e in first.eval] == [e.source for e in again.eval]
    assert {e.source for e in first.eval}.isdisjoint(e.source for e in first.train)
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[0]) + "\n")
    apart = _build(tmp_path, tokenizer, rows, data={"format": "completion",
                                                    "eval": "eval.jsonl"})
    assert (apart.train_stats.rows, apart.eval_stats.rows, len(apart.eval)) == (10, 1, 1)


# -- packing ---------------------------------------------------------------------------------


def _example(n: int, first: int, source: str) -> Example:
    ids = list(range(first, first + n))
    return Example(ids, [IGNORE] * (n // 2) + ids[n // 2:], source)


def test_pack_fills_rows_and_keeps_labels_and_boundaries() -> None:
    examples = [_example(n, 10 * i, f"f:{i}") for i, n in enumerate([5, 3, 4, 2, 6])]
    rows = pack(examples, 8)
    assert len(rows) == 3  # 20 tokens: best fit needs no more than 3 rows of 8
    by_source = {e.source: e for e in examples}
    seen = []
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids or []) <= 8
        start = 0
        for source in row.source.split(" + "):
            original, n = by_source[source], len(by_source[source].input_ids)
            assert row.input_ids[start:start + n] == original.input_ids
            assert row.position_ids and row.position_ids[start:start + n] == list(range(n))
            # The first label never trains across the boundary; the rest are kept.
            assert row.labels[start:start + n] == [IGNORE, *original.labels[1:]]
            start += n
            seen.append(source)
    assert sorted(seen) == sorted(by_source)
    with pytest.raises(ValueError, match="f:4: 6 tokens"):
        pack(examples, 5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_attend_only_within_themselves(attention: str) -> None:
    """What pack's docstring tells the trainer: position_ids, no attention_mask
    and no cache give each packed example the logits it has alone, padding included."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny: dict[str, Any] = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "max_position_embeddings": 64,
                            "attn_implementation": attention}
    config = LlamaConfig(**tiny)
    torch.manual_seed(0)
    net = LlamaForCausalLM(config).eval()
    a, b = _example(7, 1, "a"), _example(4, 30, "b")
    [row] = pack([a, b], 16)
    pad = 3  # padded as a sequence of its own, as the docstring says
    ids = torch.tensor([row.input_ids + [0] * pad])
    positions = torch.tensor([(row.position_ids or []) + list(range(pad))])
    with torch.no_grad():
        packed = net(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        alone = [net(input_ids=torch.tensor([e.input_ids])).logits[0] for e in (a, b)]
    torch.testing.assert_close(packed[:7], alone[0])
    torch.testing.assert_close(packed[7:11], alone[1])


# -- the dry run ------------------------------------------------------------------------------


def test_dry_run_marks_the_trained_tokens_and_counts(tmp_path: Path, tokenizer: Any,
                                                     smollm2_hf_folder: Path) -> None:
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}, {"messages": CHAT}]
    config = _config(tmp_path, rows, base_model=str(smollm2_hf_folder), packing=True,
                     data={"skip_bad_rows": True})
    text = dry_run(config, tmp_path / "home")
    assert f"{tmp_path / 'train.jsonl'}:1" in text.splitlines()[0]
    assert "user\nHi there" + END + "\n<|im_start|>assistant\n\u27e6Hello! How can I help?" \
        + END + "\u27e7\n" in text
    lines = text.splitlines()
    header, train = lines[lines.index("-" * 72, 2) + 1:][:2]  # after the second rule
    assert header.split()[:5] == ["split", "rows", "examples", "tokens", "trained"]
    assert train.split()[:3] == ["train", "3", "2"]
    assert train.split()[-2:] == ["0", "1"]  # none too long, one malformed skipped
    assert "packing: 2 training examples in 1 rows" in text
    assert "messages: no assistant message" in text
    examples = build_examples(config, tokenizer, tokenizer_chat_format(tokenizer))
    coloured = dry_run_report(config, examples, tokenizer, color=True)
    assert "\x1b[32mHello! How can I help?" + END + "\x1b[0m" in coloured
    assert "\u27e6" not in coloured


def test_a_bundled_gguf_base_uses_its_converted_folder(tmp_path: Path,
                                                       smollm2_hf_folder: Path) -> None:
    # The conversion the transformers backend keeps in <home>/converted is reused.
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / smollm2_hf_folder.name).symlink_to(smollm2_hf_folder)
    assert base_model_folder("smollm2", tmp_path) == tmp_path / "converted" / \
        smollm2_hf_folder.name
    assert base_model_folder(str(smollm2_hf_folder), tmp_path) == smollm2_hf_folder.resolve()
