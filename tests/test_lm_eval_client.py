"""lm-evaluation-harness's own API client against ``lanner serve``.

Its ``local-completions`` model sends token-id prompts with ``echo``,
``logprobs`` and ``max_tokens: 1`` to ``/v1/completions`` and reads the
loglikelihoods back from ``token_logprobs``. On the bundled SmolLM2 served
through transformers in float32 it must give what its ``hf`` model gives on the
same weights: the same answer on every item, the same acc and acc_norm.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

DATA = Path(__file__).parent / "data" / "evals"
TASK = "lanner_mc_tiny"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(smollm2_hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``lanner serve FOLDER --backend transformers --dtype float32`` on a loopback
    port, with its own home; yields its base URL."""
    home = tmp_path_factory.mktemp("serve-home")
    port = free_port()
    log = (home / "server.log").open("w")
    env = {**os.environ, "LANNER_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lanner", "--home", str(home), "serve", str(smollm2_hf_folder),
         "--backend", "transformers", "--dtype", "float32", "--port", str(port),
         "--no-embeddings"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None, (home / "server.log").read_text()
            assert time.monotonic() < deadline, "lanner serve did not come up"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def evaluate(model: str, model_args: str, monkeypatch: pytest.MonkeyPatch,
             **options: Any) -> dict[str, Any]:
    """lm-eval on TASK from tests/data/evals: its metrics and its samples by doc_id."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(DATA)  # lm-eval reads relative data files from the working folder
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[TASK],
        task_manager=TaskManager(include_path=str(DATA)), log_samples=True,
        fewshot_random_seed=1234, **options)
    assert out is not None
    return {"metrics": out["results"][TASK],
            "samples": sorted(out["samples"][TASK], key=lambda s: s["doc_id"])}


def test_local_completions_through_lanner_serve_matches_lm_eval_hf(
    served: str, smollm2_hf_folder: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = smollm2_hf_folder
    # The served model's id is the folder as given to `lanner serve`.
    api = evaluate("local-completions", ",".join([
        f"model={folder}", f"base_url={served}/v1/completions", f"tokenizer={folder}",
        "tokenizer_backend=huggingface", "tokenized_requests=True", "num_concurrent=1",
        "max_retries=1"]), monkeypatch)
    hf = evaluate("hf", f"pretrained={folder},dtype=float32", monkeypatch, device="cpu",
                  batch_size=1)
    for key in ("acc,none", "acc_norm,none"):
        assert api["metrics"][key] == hf["metrics"][key]
    assert len(api["samples"]) == len(hf["samples"]) == 24
    for ours, theirs in zip(api["samples"], hf["samples"], strict=True):
        our_lls = [float(r[0][0]) for r in ours["resps"]]
        their_lls = [float(r[0][0]) for r in theirs["resps"]]
        assert int(np.argmax(our_lls)) == int(np.argmax(their_lls)), ours["doc_id"]
        # One fp32 forward pass each, batched differently: equal to rounding.
        np.testing.assert_allclose(our_lls, their_lls, rtol=1e-5, atol=1e-4)
        assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])


def test_transformers_refuses_ids_outside_the_vocabulary_by_name(
    served: str, smollm2_hf_folder: Path,
) -> None:
    for fields in ({}, {"echo": True, "logprobs": 1}):
        r = httpx.post(served + "/v1/completions", timeout=120, json={
            "model": str(smollm2_hf_folder), "prompt": [[1, 2], [3, 10**6]], "max_tokens": 1,
            **fields})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "prompt" and "outside the vocabulary" in error["message"]
