"""The fine-tuning config: a YAML file read into typed dataclasses, checked once.

Every key is a field below and its docstring is its documentation. An unknown
key or a bad value is ``InvalidRequest`` naming the field's path (``lora.r``).
Relative paths resolve against the YAML file's folder. ``TuneConfig.to_dict()``
is the resolved config that the trainer saves beside what it writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from lanner.engine.registry import BUNDLED
from lanner.errors import InvalidRequest

DataFormat = Literal["chat", "alpaca", "completion", "sql"]
TrainOn = Literal["assistant", "all"]
Scheduler = Literal["constant", "linear", "cosine"]
Optimizer = Literal["adamw"]
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _min(low: float) -> dict[str, Any]:
    return {"min": low}


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how a row becomes a conversation."""

    train: tuple[Path, ...]
    """Training data: one file or a list. JSON Lines (.jsonl, or .json holding
    JSON Lines or one list of rows), CSV (.csv, a header row) or Parquet (.parquet)."""
    eval: tuple[Path, ...] = ()
    """Evaluation data: one file or a list, in the same formats as ``train``."""
    eval_split: float = field(default=0.0, metadata={"min": 0.0, "lt": 1.0})
    """Without ``eval``: hold out this fraction of the training rows for
    evaluation (a random choice seeded by ``seed``); 0 holds out none."""
    format: DataFormat = "chat"
    """How a row reads. chat: ``messages``, a list of {role, content}; alpaca:
    ``instruction``, optional ``input``, ``output``; completion: ``prompt`` and
    ``completion``, trained as raw text without the chat template (EOS appended);
    sql: ``question`` and ``query``, asked about the tables in ``schema``."""
    train_on: TrainOn = "assistant"
    """assistant: only the assistant replies (each with its end-of-turn token),
    or the completion, are trained; all: every token is."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping at the first one."""
    system: str | None = None
    """A system prompt for every conversation that has none (not for completion)."""
    schema: Path | None = None
    """format sql: the SQL file of CREATE TABLE statements shown with every
    question (its ``--`` comment lines left out, as the sql evaluation task does)."""


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter (peft's LoraConfig)."""

    r: int = field(default=16, metadata=_min(1))
    """Rank of the update matrices."""
    alpha: float = field(default=32.0, metadata={"gt": 0.0})
    """Scaling: the update is multiplied by alpha / r."""
    dropout: float = field(default=0.05, metadata={"min": 0.0, "lt": 1.0})
    """Dropout on the adapter's input."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """"all-linear" (every linear layer but the output head) or a list of
    module names such as [q_proj, v_proj]."""


@dataclass(frozen=True)
class TuneConfig:
    """A LoRA/QLoRA supervised fine-tuning run."""

    base_model: str
    """A Lanner model name (``lanner models``), a Hugging Face model folder, or a
    .gguf file (converted once to safetensors, as the transformers backend does)."""
    data: DataConfig
    """The dataset (see DataConfig)."""
    chat_format: str | None = None
    """Override the model's own chat template: a built-in name or a .jinja
    file (as ``--chat-format``). Training, serving and evaluation use the same."""
    lora: LoraConfig = LoraConfig()
    """The adapter (see LoraConfig)."""
    qlora: bool = False
    """Load the base model in 4 bits through bitsandbytes (needs a CUDA GPU)."""
    optimizer: Optimizer = "adamw"
    """The optimizer (AdamW, decoupled weight decay)."""
    learning_rate: float = field(default=2e-4, metadata={"gt": 0.0})
    """Peak learning rate."""
    lr_scheduler: Scheduler = "cosine"
    """Learning-rate schedule after warm-up: constant, linear or cosine decay to 0."""
    warmup_steps: int = field(default=0, metadata=_min(0))
    """Optimizer steps of linear warm-up from 0 to ``learning_rate``."""
    epochs: int | None = field(default=None, metadata=_min(1))
    """Passes over the training data (default 1); give this or ``max_steps``."""
    max_steps: int | None = field(default=None, metadata=_min(1))
    """Stop after this many optimizer steps instead of counting epochs."""
    batch_size: int = field(default=4, metadata=_min(1))
    """Rows per forward pass (packed rows when ``packing``)."""
    gradient_accumulation_steps: int = field(default=1, metadata=_min(1))
    """Forward passes per optimizer step (effective batch = batch_size x this)."""
    max_seq_len: int = field(default=1024, metadata=_min(2))
    """Longest example in tokens; longer rows are dropped and counted, never cut."""
    packing: bool = False
    """Pack several examples into each row of up to ``max_seq_len`` tokens
    (attention stays within each example)."""
    seed: int = 0
    """Seeds the eval split, the shuffling and the adapter's initialisation."""
    output_dir: Path = Path("tune-output")
    """Where the adapter, checkpoints, metrics and the resolved config go."""
    save_steps: int = field(default=100, metadata=_min(1))
    """Save a checkpoint every this many optimizer steps."""
    eval_steps: int | None = field(default=None, metadata=_min(1))
    """Evaluate every this many optimizer steps (default: at each save); needs eval data."""
    logging_steps: int = field(default=10, metadata=_min(1))
    """Log the training loss every this many optimizer steps."""

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_steps is None:
            object.__setattr__(self, "epochs", 1)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON data (paths absolute)."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain

    @classmethod
    def from_dict(cls, data: object, base_dir: Path) -> TuneConfig:
        """Check ``data`` (a YAML mapping) and build the config; relative paths
        resolve against ``base_dir``. InvalidRequest names a bad field."""
        config = typing.cast(TuneConfig, _convert(cls, data, "", base_dir))
        _check_together(config)
        return _resolve_names(config, base_dir)


def load_config(path: str | Path) -> TuneConfig:
    """Read a tune YAML file. InvalidRequest names the bad field (``lora.r``)."""
    import yaml

    path = Path(path).expanduser().resolve()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(str(path), f"cannot read the config: {exc}") from exc
    except yaml.YAMLError as exc:
        raise InvalidRequest(str(path), f"not valid YAML: {exc}") from exc
    if isinstance(data, dict) and "output_dir" not in data:
        data = {**data, "output_dir": f"{path.stem}-output"}  # beside the config
    return TuneConfig.from_dict(data, path.parent)


# -- conversion ------------------------------------------------------------------


def _convert(tp: Any, value: Any, name: str, base: Path) -> Any:
    """``value`` as type ``tp`` (field path ``name``), or InvalidRequest."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, name, base)
    if origin in (Union, types.UnionType):
        return _union(tp, args, value, name, base)
    if origin is Literal:
        if value not in args:
            raise InvalidRequest(name, f"must be one of {', '.join(map(str, args))}; "
                                 f"got {value!r}")
        return value
    if origin is tuple:  # tuple[X, ...]: one value or a list of them
        items = value if isinstance(value, list) else [value]
        return tuple(_convert(args[0], v, f"{name}[{i}]", base) for i, v in enumerate(items))
    return _scalar(tp, value, name, base)


def _dataclass(cls: Any, value: Any, name: str, base: Path) -> Any:
    if not isinstance(value, dict):
        raise InvalidRequest(name or "config", f"must be a mapping of keys to values, "
                             f"got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in value:
        if key not in fields:
            raise InvalidRequest(_join(name, str(key)),
                                 f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for key, f in fields.items():
        path = _join(name, key)
        if key not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidRequest(path, "is required")
            continue
        kwargs[key] = _convert(hints[key], value[key], path, base)
        _check_range(path, kwargs[key], f.metadata)
    return cls(**kwargs)


def _union(tp: Any, args: tuple[Any, ...], value: Any, name: str, base: Path) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        try:
            return _convert(arg, value, name, base)
        except InvalidRequest:
            continue
    if args == (str, tuple[str, ...]):  # lora.target_modules
        raise InvalidRequest(name, f'must be "all-linear" or a list of module names; got {value!r}')
    raise InvalidRequest(name, f"must be {_describe(tp)}; got {value!r}")


def _scalar(tp: Any, value: Any, name: str, base: Path) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidRequest(name, f"must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(name, f"must be a whole number; got {value!r}")
        return value
    if tp is float:
        return _float(value, name)
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(name, f"must be a non-empty string; got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(name, f"must be a path; got {value!r}")
        return (base / Path(value).expanduser()).resolve()
    raise TypeError(f"config field {name} has an unsupported type {tp!r}")


def _float(value: Any, name: str) -> float:
    # YAML 1.1 reads 2e-4 (no dot) as a string; it is still the number meant.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value):
        raise InvalidRequest(name, f"must be a number; got {value!r}")
    return float(value)


def _check_range(name: str, value: Any, limits: Any) -> None:
    if value is None or not isinstance(value, int | float):
        return
    if "min" in limits and value < limits["min"]:
        raise InvalidRequest(name, f"must be at least {limits['min']}; got {value}")
    if "gt" in limits and value <= limits["gt"]:
        raise InvalidRequest(name, f"must be more than {limits['gt']}; got {value}")
    if "lt" in limits and value >= limits["lt"]:
        raise InvalidRequest(name, f"must be less than {limits['lt']}; got {value}")


def _describe(tp: Any) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
             Path: "a path"}
    parts = [names.get(a, str(a)) for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(parts) + (" or null" if type(None) in typing.get_args(tp) else "")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# -- checks across fields ----------------------------------------------------------


def _check_together(config: TuneConfig) -> None:
    data = config.data
    if not data.train:
        raise InvalidRequest("data.train", "must name at least one file")
    if config.lora.target_modules == ():
        raise InvalidRequest("lora.target_modules", "must not be empty")
    if config.epochs is not None and config.max_steps is not None:
        raise InvalidRequest("max_steps", "give epochs or max_steps, not both")
    if data.eval and data.eval_split:
        raise InvalidRequest("data.eval_split", "give data.eval or data.eval_split, not both")
    if config.eval_steps is not None and not (data.eval or data.eval_split):
        raise InvalidRequest("eval_steps", "there is no eval data (data.eval or data.eval_split)")
    if (data.format == "sql") != (data.schema is not None):
        raise InvalidRequest("data.schema", "format sql needs the schema file, and only it "
                             "uses one")
    if data.system is not None and data.format == "completion":
        raise InvalidRequest("data.system", "format completion uses no chat template, so no "
                             "system prompt")
    if isinstance(config.lora.target_modules, str) and config.lora.target_modules != "all-linear":
        raise InvalidRequest("lora.target_modules", 'must be "all-linear" or a list of module '
                             f"names; got {config.lora.target_modules!r}")
    for key, files in (("data.train", data.train), ("data.eval", data.eval)):
        for i, file in enumerate(files):
            _check_data_file(f"{key}[{i}]" if len(files) > 1 else key, file)
    if data.schema is not None and not data.schema.is_file():
        raise InvalidRequest("data.schema", f"no such file: {data.schema}")


def _check_data_file(name: str, file: Path) -> None:
    if file.suffix.lower() not in DATA_SUFFIXES:
        raise InvalidRequest(name, f"{file.name}: must end in {', '.join(DATA_SUFFIXES)}")
    if not file.is_file():
        raise InvalidRequest(name, f"no such file: {file}")


def _resolve_names(config: TuneConfig, base: Path) -> TuneConfig:
    """``base_model`` and ``chat_format`` given as paths resolve against the YAML's
    folder; a bare name stays a name, looked up when the run starts."""
    changes: dict[str, Any] = {}
    for key in ("base_model", "chat_format"):
        value = getattr(config, key)
        if value is None or not _looks_like_path(value, key, base):
            continue
        path = (base / Path(value).expanduser()).resolve()
        if not path.exists():
            raise InvalidRequest(key, f"no such file or folder: {path}")
        changes[key] = str(path)
    if not config.output_dir.is_absolute():  # the default, when not read from a YAML file
        changes["output_dir"] = (base / config.output_dir).resolve()
    return dataclasses.replace(config, **changes) if changes else config


def _looks_like_path(value: str, key: str, base: Path) -> bool:
    if key == "base_model" and value in BUNDLED:
        return False
    return ("/" in value or "\\" in value or value.endswith((".gguf", ".jinja"))
            or value.startswith(("~", ".")) or (base / value).exists())


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
