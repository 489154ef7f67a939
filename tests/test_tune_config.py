"""lanner.tune.config: a tune YAML file read into typed, checked dataclasses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lanner.errors import InvalidRequest
from lanner.tune import LoraConfig, TuneConfig, load_config


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "data" / "eval.csv").write_text("prompt,completion\n")
    (tmp_path / "schema.sql").write_text("CREATE TABLE t (x INTEGER);\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path


def _write(folder: Path, config: dict[str, Any], name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def _minimal(**extra: Any) -> dict[str, Any]:
    return {"base_model": "smollm2", "data": {"train": "data/train.jsonl"}, **extra}


def _error(folder: Path, config: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        load_config(_write(folder, config))
    return info.value


def test_defaults_and_paths_resolved_against_the_yaml_folder(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    config = load_config(_write(folder, _minimal(), "sql-run.yaml"))
    assert config.base_model == "smollm2"  # a Lanner name stays a name
    assert config.data.train == ((folder / "data" / "train.jsonl").resolve(),)
    assert config.output_dir == (folder / "sql-run-output").resolve()
    assert (config.epochs, config.max_steps) == (1, None)
    assert config.lora == LoraConfig(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear")
    assert (config.data.format, config.data.train_on, config.qlora) == ("chat", "assistant", False)


def test_every_field_read(folder: Path) -> None:
    config = load_config(_write(folder, {
        "base_model": "model", "chat_format": "chatml", "qlora": True,
        "data": {"train": ["data/train.jsonl"], "eval": "data/eval.csv", "format": "sql",
                 "schema": "schema.sql", "train_on": "all", "skip_bad_rows": True,
                 "system": "Be brief."},
        "lora": {"r": 8, "alpha": 16, "dropout": 0, "target_modules": ["q_proj", "v_proj"]},
        "learning_rate": "1e-4", "lr_scheduler": "linear", "warmup_steps": 5, "max_steps": 30,
        "batch_size": 2, "gradient_accumulation_steps": 4, "max_seq_len": 512,
        "packing": True, "seed": 7, "output_dir": "out", "save_steps": 10, "eval_steps": 5,
        "logging_steps": 1}))
    assert config.base_model == str((folder / "model").resolve())  # a folder beside the YAML
    assert config.chat_format == "chatml"
    assert config.data.eval == ((folder / "data" / "eval.csv").resolve(),)
    assert config.data.schema == (folder / "schema.sql").resolve()
    assert config.lora == LoraConfig(8, 16.0, 0.0, ("q_proj", "v_proj"))
    assert config.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert (config.epochs, config.max_steps, config.packing, config.eval_steps) == (
        None, 30, True, 5)
    assert config.output_dir == (folder / "out").resolve()


def test_to_dict_is_plain_data_and_reads_back(folder: Path) -> None:
    config = load_config(_write(folder, _minimal(lora={"target_modules": ["q_proj"]})))
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["data"]["train"] == [str((folder / "data" / "train.jsonl").resolve())]
    assert data["lora"]["target_modules"] == ["q_proj"]
    assert TuneConfig.from_dict(data, Path("/elsewhere")) == config
    built = TuneConfig.from_dict(_minimal(), folder)  # no YAML: the default output_dir
    assert built.output_dir == (folder / "tune-output").resolve()


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"lora": {"r": 0}}, "lora.r", "at least 1"),
    ({"lora": {"r": 2.5}}, "lora.r", "whole number"),
    ({"lora": {"rank": 8}}, "lora.rank", "unknown key"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout", "less than 1"),
    ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules", "all-linear"),
    ({"lora": {"target_modules": []}}, "lora.target_modules", "empty"),
    ({"lora": 8}, "lora", "mapping"),
    ({"learning_rate": "fast"}, "learning_rate", "number"),
    ({"learning_rate": 0}, "learning_rate", "more than 0"),
    ({"learning_rate": float("inf")}, "learning_rate", "number"),
    ({"lr_scheduler": "step"}, "lr_scheduler", "constant, linear, cosine"),
    ({"optimizer": "sgd"}, "optimizer", "adamw"),
    ({"qlora": "yes please"}, "qlora", "true or false"),
    ({"packing": 1}, "packing", "true or false"),
    ({"batch_size": True}, "batch_size", "whole number"),
    ({"epochs": 2, "max_steps": 10}, "max_steps", "not both"),
    ({"eval_steps": 10}, "eval_steps", "no eval data"),
    ({"learnin_rate": 1e-4}, "learnin_rate", "unknown key"),
    ({"base_model": ""}, "base_model", "non-empty"),
    ({"base_model": "./missing.gguf"}, "base_model", "no such file"),
    ({"chat_format": "templates/none.jinja"}, "chat_format", "no such file"),
])
def test_a_bad_value_names_its_field(folder: Path, change: dict[str, Any], field: str,
                                     words: str) -> None:
    error = _error(folder, _minimal(**change))
    assert error.param == field
    assert str(error).startswith(f"{field}: ") and words in str(error)


@pytest.mark.parametrize(("data", "field", "words"), [
    ({}, "data.train", "required"),
    ({"train": []}, "data.train", "at least one file"),
    ({"train": "data/missing.jsonl"}, "data.train", "no such file"),
    ({"train": "data/train.txt"}, "data.train", ".jsonl, .json, .csv, .parquet"),
    ({"train": ["data/train.jsonl", "data/nope.csv"]}, "data.train[1]", "no such file"),
    ({"train": "data/train.jsonl", "format": "sharegpt"}, "data.format", "chat, alpaca"),
    ({"train": "data/train.jsonl", "train_on": "prompt"}, "data.train_on", "assistant, all"),
    ({"train": "data/train.jsonl", "eval_split": 1.0}, "data.eval_split", "less than 1"),
    ({"train": "data/train.jsonl", "eval": "data/eval.csv", "eval_split": 0.1},
     "data.eval_split", "not both"),
    ({"train": "data/train.jsonl", "format": "sql"}, "data.schema", "needs the schema"),
    ({"train": "data/train.jsonl", "schema": "schema.sql"}, "data.schema", "only it"),
    ({"train": "data/train.jsonl", "format": "sql", "schema": "no.sql"}, "data.schema",
     "no such file"),
    ({"train": "data/train.jsonl", "format": "completion", "system": "Hi"}, "data.system",
     "no system prompt"),
])
def test_a_bad_data_section_names_its_field(folder: Path, data: dict[str, Any], field: str,
                                            words: str) -> None:
    error = _error(folder, {"base_model": "smollm2", "data": data})
    assert error.param == field and words in str(error), str(error)


def test_a_config_that_is_not_a_mapping_or_not_yaml(folder: Path) -> None:
    path = folder / "list.yaml"
    path.write_text("- base_model\n")
    with pytest.raises(InvalidRequest, match="must be a mapping"):
        load_config(path)
    path.write_text("base_model: [unclosed\n")
    with pytest.raises(InvalidRequest, match="not valid YAML"):
        load_config(path)
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_config(folder / "absent.yaml")


def test_the_text_to_sql_example_config_reads() -> None:
    example = Path(__file__).parents[1] / "examples" / "text-to-sql" / "tune.yaml"
    config = load_config(example)
    assert config.base_model == "smollm2" and config.data.format == "sql"
    assert all(p.is_file() for p in (*config.data.train, config.data.schema))
    assert config.output_dir == example.parent / "tune-output"
