"""Lanner's scores agree with lm-evaluation-harness's on the same model and YAML.

lm-eval itself runs here (``--model hf``, offline, local JSON data) on the
bundled SmolLM2 converted to a safetensors folder; Lanner's transformers
backend must choose the same answer on every item and so give the same
acc / acc_norm / exact_match; its llama.cpp backend (F16) within one point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lanner.engine.engine import Engine
from lanner.evals import runner
from lanner.evals.taskfile import load_task

DATA = Path(__file__).parent / "data" / "evals"
pytestmark = pytest.mark.slow


def lm_eval_hf(folder: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``lm_eval --model hf`` on ``task`` from tests/data/evals: its metrics and samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(DATA)  # lm-eval reads relative data files from the working folder
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[task],
        task_manager=TaskManager(include_path=str(DATA)), device="cpu", batch_size=1,
        log_samples=True, fewshot_random_seed=1234,
    )
    assert out is not None
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return {"metrics": out["results"][task], "samples": samples}


@pytest.fixture(scope="module")
def reference(smollm2_hf_folder: Path) -> dict[str, dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        return {t: lm_eval_hf(smollm2_hf_folder, t, mp)
                for t in ("lanner_mc_tiny", "lanner_gen_tiny")}


def test_multiple_choice_matches_lm_eval_item_by_item(
    reference: dict[str, dict[str, Any]], smollm2_hf_folder: Path, lanner_home: Path,
) -> None:
    model = Engine(lanner_home).load(str(smollm2_hf_folder), backend="transformers",
                                     dtype="float32")
    ours = runner.evaluate(model, load_task(DATA / "mc_tiny.yaml"))
    theirs = reference["lanner_mc_tiny"]
    for item, sample in zip(ours.items, theirs["samples"], strict=True):
        their_lls = [float(r[0][0]) for r in sample["resps"]]
        our_lls = [ll for ll, _ in item.output]
        np.testing.assert_allclose(our_lls, their_lls, rtol=1e-4, atol=1e-3)
        assert int(np.argmax(our_lls)) == int(np.argmax(their_lls)), item.doc_id
        assert item.scores["acc,none"] == sample["acc"]
        assert item.scores["acc_norm,none"] == sample["acc_norm"]
    for key in ("acc,none", "acc_norm,none"):
        assert ours.metrics[key].value == pytest.approx(theirs["metrics"][key])
        stderr_key = key.replace(",", "_stderr,")
        assert ours.metrics[key].stderr == pytest.approx(theirs["metrics"][stderr_key])


def test_generate_until_matches_lm_eval(
    reference: dict[str, dict[str, Any]], smollm2_hf_folder: Path, lanner_home: Path,
) -> None:
    model = Engine(lanner_home).load(str(smollm2_hf_folder), backend="transformers",
                                     dtype="float32")
    ours = runner.evaluate(model, load_task(DATA / "gen_tiny.yaml"))
    theirs = reference["lanner_gen_tiny"]
    for item, sample in zip(ours.items, theirs["samples"], strict=True):
        assert item.output["text"] == sample["resps"][0][0]
    key = "exact_match,number"
    assert ours.metrics[key].value == pytest.approx(theirs["metrics"][key])


def test_llama_cpp_backend_within_one_point(
    reference: dict[str, dict[str, Any]], smollm2_gguf: Path, lanner_home: Path,
) -> None:
    model = Engine(lanner_home).load("smollm2", backend="llama.cpp")  # the F16 re-encoding
    ours = runner.evaluate(model, load_task(DATA / "mc_tiny.yaml"))
    for key in ("acc,none", "acc_norm,none"):
        assert abs(ours.metrics[key].value - reference["lanner_mc_tiny"]["metrics"][key]) <= 0.01
