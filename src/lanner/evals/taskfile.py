"""Task files in lm-evaluation-harness's own YAML format, read into a ``TaskSpec``.

Lanner runs the subset of lm-eval's ``TaskConfig`` listed in ``_KEYS``; a key
outside it (``process_docs``, ``!function`` hooks, Hub datasets...) is a
``TaskError`` naming the file and the key, never a silently different run.
Two extensions: a data file written ``package:MODULE/relative/path`` lives
inside an installed package, and other relative data paths are looked up
beside the YAML file first, then in the working folder (where lm-eval looks).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lanner.errors import TaskError

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
# Keys that change nothing Lanner computes (names, bookkeeping, decontamination;
# unsafe_code: generated code always runs in the sandbox, see evals/humaneval.py).
_INERT = {"task_alias", "tag", "dataset_name", "training_split", "should_decontaminate",
          "doc_to_decontamination_query", "metadata", "include", "unsafe_code"}
_KEYS = _INERT | {
    "task", "dataset_path", "dataset_kwargs", "validation_split", "test_split",
    "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice", "description",
    "target_delimiter", "fewshot_delimiter", "fewshot_config", "num_fewshot", "metric_list",
    "output_type", "generation_kwargs", "repeats", "filter_list",
}
_FEWSHOT_KEYS = {"sampler", "samples", "split"}
_GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}
_METRIC_META = {"metric", "aggregation", "higher_is_better"}
_FORMATS = {"json": "json", "csv": "csv"}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default


@dataclass(frozen=True)
class Generation:
    """``generation_kwargs``: greedy unless ``do_sample``."""

    until: tuple[str, ...]
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class FilterStep:
    function: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Filter:
    """One entry of ``filter_list``: a named pipeline of steps."""

    name: str
    steps: tuple[FilterStep, ...]


@dataclass(frozen=True)
class Metric:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    """The entry's other keys (``ignore_case``, a custom metric's options...)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path
    output_type: str
    data_format: str
    data_files: dict[str, tuple[Path, ...]]
    test_split: str
    fewshot_split: str | None
    fewshot_samples: tuple[dict[str, Any], ...] | None
    fewshot_sampler: str
    num_fewshot: int
    description: str
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any
    target_delimiter: str
    fewshot_delimiter: str
    generation: Generation | None
    filters: tuple[Filter, ...]
    metrics: tuple[Metric, ...]
    metadata: dict[str, Any]
    config: dict[str, Any]
    """The YAML as resolved (includes merged): stored with every run."""

    @property
    def folder(self) -> Path:
        return self.path.parent

    def sha256(self) -> str:
        """Hash of the YAML and every data file it reads: two runs with the same
        hash saw the same task."""
        digest = hashlib.sha256(self.path.read_bytes())
        for split in sorted(self.data_files):
            for file in self.data_files[split]:
                digest.update(file.read_bytes())
        return digest.hexdigest()


class _Loader(yaml.SafeLoader):
    """SafeLoader that names lm-eval's ``!function`` tag instead of failing obscurely."""


def _function_tag(loader: yaml.SafeLoader, node: yaml.Node) -> None:
    raise TaskError(f"{loader.name}: '!function {node.value}' (a Python hook) is not supported: "
                    "Lanner runs task files without executing code from them")


_Loader.add_constructor("!function", _function_tag)


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``, with lm-eval's ``include`` merged in."""
    try:
        with path.open(encoding="utf-8") as f:
            loader = _Loader(f)
            loader.name = str(path)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file is a YAML mapping of keys")
    if "include" in data:
        base = read_yaml(path.parent / str(data["include"]))
        data = {**base, **data}
    return data


def load_task(path: str | Path) -> TaskSpec:
    """Read and check the task file at ``path``."""
    path = Path(path).expanduser().resolve()
    cfg = read_yaml(path)
    where = str(path)
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise TaskError(f"{where}: unsupported key {unknown[0]!r} (Lanner reads: "
                        f"{', '.join(sorted(_KEYS - _INERT))})")
    output_type = cfg.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(f"{where}: output_type {output_type!r} is not one of {OUTPUT_TYPES}")
    if cfg.get("repeats", 1) != 1:
        raise TaskError(f"{where}: repeats: only 1 is supported")
    data_format, files = _data_files(cfg, path)
    test_split = cfg.get("test_split") or cfg.get("validation_split")
    if not test_split:
        raise TaskError(f"{where}: test_split (or validation_split) is required")
    if test_split not in files:
        raise TaskError(f"{where}: test_split {test_split!r} is not in dataset_kwargs.data_files")
    fewshot = cfg.get("fewshot_config") or {}
    _check_keys(where, "fewshot_config", fewshot, _FEWSHOT_KEYS)
    fewshot_split = fewshot.get("split", cfg.get("fewshot_split"))
    if fewshot_split is not None and fewshot_split not in files:
        raise TaskError(f"{where}: fewshot_split {fewshot_split!r} is not in data_files")
    samples = fewshot.get("samples")
    sampler = fewshot.get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise TaskError(f"{where}: fewshot_config.sampler {sampler!r}: one of default, first_n")
    num_fewshot = int(cfg.get("num_fewshot") or 0)
    if num_fewshot and fewshot_split is None and samples is None:
        raise TaskError(f"{where}: num_fewshot is {num_fewshot} but there is no fewshot_split "
                        "or fewshot_config.samples to draw examples from")
    if output_type == "multiple_choice" and cfg.get("doc_to_choice") is None:
        raise TaskError(f"{where}: a multiple_choice task needs doc_to_choice")
    fewshot_delimiter = cfg.get("fewshot_delimiter", "\n\n")
    return TaskSpec(
        name=str(cfg.get("task") or path.stem), path=path, output_type=output_type,
        data_format=data_format, data_files=files, test_split=test_split,
        fewshot_split=fewshot_split,
        fewshot_samples=tuple(samples) if samples is not None else None,
        fewshot_sampler=sampler, num_fewshot=num_fewshot,
        description=cfg.get("description") or "",
        doc_to_text=cfg.get("doc_to_text"), doc_to_target=cfg.get("doc_to_target"),
        doc_to_choice=cfg.get("doc_to_choice"),
        target_delimiter=cfg.get("target_delimiter", " "),
        fewshot_delimiter=fewshot_delimiter,
        generation=_generation(where, cfg, output_type, fewshot_delimiter),
        filters=_filters(where, cfg.get("filter_list")),
        metrics=_metrics(where, cfg.get("metric_list"), output_type),
        metadata=dict(cfg.get("metadata") or {}), config=cfg,
    )


def _check_keys(where: str, section: str, value: object, known: set[str]) -> None:
    if not isinstance(value, dict):
        raise TaskError(f"{where}: {section} must be a mapping")
    unknown = sorted(set(value) - known)
    if unknown:
        raise TaskError(f"{where}: unsupported key {section}.{unknown[0]} "
                        f"(supported: {', '.join(sorted(known))})")


def _data_files(cfg: dict[str, Any], path: Path) -> tuple[str, dict[str, tuple[Path, ...]]]:
    where = str(path)
    source = cfg.get("dataset_path")
    if source not in _FORMATS:
        raise TaskError(f"{where}: dataset_path {source!r}: Lanner reads local files only "
                        "(dataset_path: json or csv, with dataset_kwargs.data_files)")
    kwargs = cfg.get("dataset_kwargs") or {}
    _check_keys(where, "dataset_kwargs", kwargs, {"data_files"})
    spec = kwargs.get("data_files")
    if not spec:
        raise TaskError(f"{where}: dataset_kwargs.data_files is required")
    if not isinstance(spec, dict):  # datasets' convention: a bare file list is "train"
        spec = {"train": spec}
    files = {
        str(split): tuple(_data_path(str(f), path) for f in ([v] if isinstance(v, str) else v))
        for split, v in spec.items()
    }
    return _FORMATS[source], files


def _data_path(name: str, task_path: Path) -> Path:
    if name.startswith("package:"):
        module, _, rest = name.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise TaskError(f"{task_path}: data file {name!r} needs the package {module!r}, "
                            "which is not installed")
        candidate = (Path(list(found.submodule_search_locations)[0]) / rest).resolve()
    else:
        candidate = Path(name).expanduser()
        if not candidate.is_absolute():
            beside = task_path.parent / candidate
            candidate = beside if beside.exists() else Path.cwd() / candidate
    if not candidate.is_file():
        raise TaskError(f"{task_path}: data file {name!r} not found ({candidate})")
    return candidate


def _generation(
    where: str, cfg: dict[str, Any], output_type: str, fewshot_delimiter: str
) -> Generation | None:
    if output_type != "generate_until":
        if cfg.get("generation_kwargs"):
            raise TaskError(f"{where}: generation_kwargs only apply to generate_until tasks")
        return None
    kwargs = dict(cfg.get("generation_kwargs") or {})
    _check_keys(where, "generation_kwargs", kwargs, _GENERATION_KEYS)
    until = kwargs.get("until", [fewshot_delimiter])  # lm-eval's default
    until = [until] if isinstance(until, str) else list(until)
    return Generation(
        until=tuple(until),
        max_gen_toks=int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        do_sample=bool(kwargs.get("do_sample", False)),
        temperature=float(kwargs.get("temperature", 0.0)),
        top_p=kwargs.get("top_p"), top_k=kwargs.get("top_k"),
    )


def _filters(where: str, entries: Any) -> tuple[Filter, ...]:
    if not entries:
        return (Filter("none", (FilterStep("take_first", {}),)),)
    out = []
    for entry in entries:
        _check_keys(where, "filter_list[]", entry, {"name", "filter"})
        steps = []
        for step in entry.get("filter") or []:
            if not isinstance(step, dict) or "function" not in step:
                raise TaskError(f"{where}: filter {entry.get('name')!r}: each step needs "
                                "a function")
            options = {k: v for k, v in step.items() if k != "function"}
            steps.append(FilterStep(str(step["function"]), options))
        out.append(Filter(str(entry.get("name", "none")), tuple(steps)))
    return tuple(out)


_DEFAULT_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("exact_match",),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}


# Each metric keeps lm-eval's own aggregation; naming it in the YAML is allowed.
_AGGREGATIONS = {None, "mean", "perplexity", "weighted_perplexity", "bits_per_byte"}


def _metrics(where: str, entries: Any, output_type: str) -> tuple[Metric, ...]:
    if not entries:
        return tuple(Metric(name) for name in _DEFAULT_METRICS[output_type])
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or "metric" not in entry:
            raise TaskError(f"{where}: each metric_list entry needs a 'metric' key")
        aggregation = entry.get("aggregation")
        if aggregation not in _AGGREGATIONS:
            known = ", ".join(sorted(a for a in _AGGREGATIONS if a))
            raise TaskError(f"{where}: metric {entry['metric']!r}: aggregation {aggregation!r} "
                            f"is not supported (one of: {known})")
        options = {k: v for k, v in entry.items() if k not in _METRIC_META}
        out.append(Metric(str(entry["metric"]), options))
    return tuple(out)
