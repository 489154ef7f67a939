"""Task YAML, data and prompts: checked against lm-evaluation-harness itself.

The prompt of every item (few-shot examples drawn with the same seed, the same
delimiters) and every (context, continuation) request must be exactly what
lm-eval builds from the same YAML; bad files must fail with a clear error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lanner.errors import TaskError
from lanner.evals import metrics, registry, runner
from lanner.evals.taskfile import load_task

DATA = Path(__file__).parent / "data" / "evals"


def _lm_eval_requests(task_name: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The requests lm-eval itself builds for a task in tests/data/evals."""
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(DATA)  # lm-eval reads relative data files from the working folder
    task = get_task_dict([task_name], TaskManager(include_path=str(DATA)))[task_name]
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=None)
    return [(inst.doc_id, inst.idx, inst.arguments) for inst in task.instances]


def test_multiple_choice_requests_equal_lm_evals(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _lm_eval_requests("lanner_mc_tiny", monkeypatch)
    task = load_task(DATA / "mc_tiny.yaml")
    items = runner.prepare(task, num_fewshot=task.num_fewshot, seed=1234, limit=None)
    ours = [(item.doc_id, i, (item.context, task.target_delimiter + choice))
            for item in items for i, choice in enumerate(item.choices or [])]
    assert len(ours) == len(expected) == 24 * 4
    assert ours == expected
    assert items[0].context.count("Question:") == 3  # two examples and the question


def test_generate_until_contexts_equal_lm_evals(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _lm_eval_requests("lanner_gen_tiny", monkeypatch)
    task = load_task(DATA / "gen_tiny.yaml")
    items = runner.prepare(task, num_fewshot=0, seed=1234, limit=None)
    assert [(item.doc_id, 0, item.context) for item in items] == [
        (doc_id, idx, args[0]) for doc_id, idx, args in expected
    ]
    assert task.generation is not None
    assert list(task.generation.until) == expected[0][2][1]["until"]
    assert task.generation.max_gen_toks == expected[0][2][1]["max_gen_toks"]


def test_fewshot_from_the_test_split_never_shows_the_item(tmp_path: Path) -> None:
    yaml_text = (DATA / "mc_tiny.yaml").read_text().replace("fewshot_split: train",
                                                            "fewshot_split: test")
    for name in ("mc_tiny_test.jsonl", "mc_tiny_train.jsonl"):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "t.yaml").write_text(yaml_text.replace("num_fewshot: 2", "num_fewshot: 5"))
    task = load_task(tmp_path / "t.yaml")
    for item in runner.prepare(task, num_fewshot=5, seed=1, limit=None):
        question = item.context.rsplit("Question: ", 1)[1]
        assert item.context.count(question) == 1


def _write(tmp_path: Path, text: str, data: str = '{"q": "a", "a": "b"}\n') -> Path:
    (tmp_path / "d.jsonl").write_text(data)
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return path


_BASE = ("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\n"
         "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")


@pytest.mark.parametrize(("extra", "message"), [
    ("process_docs: 3\n", "unsupported key 'process_docs'"),
    ("doc_to_image: img\n", "unsupported key 'doc_to_image'"),
    ("generation_kwargs:\n  num_beams: 4\n", "generation_kwargs.num_beams"),
    ("output_type: multiple_choice\n", "needs doc_to_choice"),
    ("output_type: loglikelihood_bananas\n", "output_type 'loglikelihood_bananas'"),
    ("num_fewshot: 3\n", "no fewshot_split"),
    ("repeats: 5\n", "repeats"),
])
def test_unsupported_keys_are_named(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(TaskError, match=message) as info:
        load_task(_write(tmp_path, _BASE + extra))
    assert "task.yaml" in str(info.value)


def test_function_tags_and_hub_datasets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="!function utils.process_docs"):
        load_task(_write(tmp_path, _BASE + "doc_to_choice: !function utils.process_docs\n"))
    with pytest.raises(TaskError, match="local files only"):
        hub = _BASE.replace("dataset_path: json", "dataset_path: openai/gsm8k")
        load_task(_write(tmp_path, hub))


def test_unknown_metric_and_filter_fail_before_the_model_runs(tmp_path: Path) -> None:
    task = load_task(_write(tmp_path, _BASE + "metric_list:\n  - metric: bleu\n"))
    with pytest.raises(TaskError, match="metric 'bleu' is not supported"):
        metrics.check(task)
    task = load_task(_write(tmp_path, _BASE + "filter_list:\n  - name: x\n    filter:\n"
                            "      - function: majority_vote\n"))
    with pytest.raises(TaskError, match="'majority_vote' is not supported"):
        metrics.check(task)


def test_a_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, _BASE, '{"q": "a", "a": "b"}\n{"q": "c", "a": \n')
    with pytest.raises(TaskError, match=r"d\.jsonl:2: not valid JSON"):
        runner.prepare(load_task(path), num_fewshot=0, seed=0, limit=None)
    path = _write(tmp_path, _BASE, '{"q": "a", "a": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(TaskError, match=r"d\.jsonl:2: a row must be a JSON object"):
        runner.prepare(load_task(path), num_fewshot=0, seed=0, limit=None)


def test_a_missing_data_file_and_a_template_error_are_named(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="data file 'nope.jsonl' not found"):
        load_task(_write(tmp_path, _BASE.replace("test: d.jsonl", "test: nope.jsonl")))
    task = load_task(_write(tmp_path, _BASE.replace("'{{q}}'", "'{{question}}'")))
    with pytest.raises(TaskError, match="doc_to_text: 'question' is undefined"):
        runner.prepare(task, num_fewshot=0, seed=0, limit=None)


def test_csv_data_and_include(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('question,label\n"Is it, really?",1\nNo,0\n')
    (tmp_path / "base.yaml").write_text(
        "dataset_path: csv\ndataset_kwargs:\n  data_files:\n    test: d.csv\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_choice: ['no', 'yes']\n")
    (tmp_path / "task.yaml").write_text("include: base.yaml\ntask: csvtask\n"
                                        "doc_to_text: '{{question}}'\ndoc_to_target: label\n")
    task = load_task(tmp_path / "task.yaml")
    items = runner.prepare(task, num_fewshot=0, seed=0, limit=None)
    assert [(i.context, i.gold, i.target) for i in items] == [
        ("Is it, really?", 1, "yes"), ("No", 0, "no")]
    assert registry.find("csvtask", [tmp_path]) == tmp_path / "task.yaml"


def test_unknown_task_name_lists_the_known_ones() -> None:
    with pytest.raises(TaskError, match="no task named 'nope'"):
        registry.find("nope")
