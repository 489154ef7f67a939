"""The fine-tuning loop: a tiny random Llama for the mechanics (loss falls,
accumulation, packing, resume after kill -9, data-parallel under accelerate),
the bundled SmolLM2 end to end (tune, run with the adapter, merge)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lanner.cli import main
from lanner.errors import InvalidRequest, LannerError
from lanner.tune.batches import Batch, collate, shared_prefix
from lanner.tune.config import LoraConfig, load_config
from lanner.tune.dataset import IGNORE, Example, pack
from lanner.tune.lora import (
    NextTokenLoss,
    add_lora,
    load_base,
    shared_prefix_works,
)
from lanner.tune.trainer import train
from tunekit import chat_ids, greedy, make_tiny_llama, write_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


def losses(metrics: dict) -> list[float]:
    return [h["loss"] for h in metrics["history"]]


def test_loss_falls_and_every_output_is_written(llama: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, llama, save_steps=4,
                                      data={"eval_split": 0.25}))
    result = train(config, progress=False)
    curve = losses(result.metrics)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.5
    out = result.output_dir
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/chat_template.jinja", "adapter/lanner-adapter.json",
                 "checkpoint-4/trainer_state.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_loss"] == curve[-1] and metrics["tokens_per_second"] > 0
    assert [e["step"] for e in metrics["evals"]] == [4, 6]
    assert metrics["data"]["train"]["examples"] == 24
    import yaml

    assert yaml.safe_load((out / "config.resolved.yaml").read_text()) == config.to_dict()


def test_same_seed_same_run_and_accumulation_equals_a_bigger_batch(
    llama: Path, tmp_path: Path
) -> None:
    config = load_config(write_config(tmp_path, llama, max_steps=3))
    whole = train(config, progress=False).metrics
    again = train(dataclasses.replace(config, output_dir=tmp_path / "again"),
                  progress=False).metrics
    split = train(dataclasses.replace(config, output_dir=tmp_path / "split", batch_size=2,
                                      gradient_accumulation_steps=2), progress=False).metrics
    assert losses(again) == losses(whole)
    assert losses(split) == pytest.approx(losses(whole), abs=1e-5)


def test_packed_rows_keep_attention_inside_each_example(llama: Path) -> None:
    torch.manual_seed(0)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    model = add_lora(load_base(llama, CPU, qlora=False), lora)
    model.eval()
    examples = [Example(list(range(5, 5 + n)), list(range(5, 5 + n)), f"x:{n}")
                for n in (9, 6, 4)]
    alone = sum(_loss(model, [e], direct=False) for e in examples)
    packed = pack(examples, 24)
    assert len(packed) == 1
    # Packing leaves out each example's first label; so does a single example.
    assert _loss(model, packed, True) == pytest.approx(alone, rel=1e-5)
    assert _loss(model, packed, False) == pytest.approx(alone, rel=1e-5)
    # Padded batches: the pads change nothing either.
    assert _loss(model, examples, True) == pytest.approx(alone, rel=1e-5)


def test_a_shared_prompt_is_computed_once_with_the_same_loss_and_gradients(
        llama: Path) -> None:
    torch.manual_seed(0)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    model = add_lora(load_base(llama, CPU, qlora=False), lora)
    model.eval()
    prompt = list(range(10, 40))  # 30 untrained tokens shared by every row
    rows = [Example(prompt + tail, [IGNORE] * 31 + tail[1:], f"r{i}")
            for i, tail in enumerate(([41, 42, 43, 44], [45, 46], [47, 48, 49, 50, 51, 52]))]
    shared = collate(rows, pad_id=0)
    assert shared.allowed is not None and shared.input_ids.shape == (1, 30 + 4 + 2 + 6)
    padded = collate(rows, pad_id=0, share_prefix=False)
    assert padded.allowed is None and padded.input_ids.shape == (3, 36)

    def loss_and_grads(batch: Batch, direct: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = NextTokenLoss(model, direct)(batch.input_ids, batch.position_ids,
                                            batch.targets, batch.allowed)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()
                                      if p.requires_grad]

    want, want_grads = loss_and_grads(padded, direct=False)
    for direct in (False, True):
        got, grads = loss_and_grads(shared, direct)
        assert got == pytest.approx(want, rel=1e-5)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert shared_prefix_works(model, CPU)


def test_a_short_or_trained_common_start_is_not_shared() -> None:
    prompt = [5, 6, 7]
    short = [Example(prompt + list(range(20, 30)), [IGNORE] * 4 + list(range(21, 30)), "a"),
             Example(prompt + list(range(30, 40)), [IGNORE] * 4 + list(range(31, 40)), "b")]
    assert shared_prefix(short) == 0  # 3 of ~13 tokens: padding is cheaper
    trained = [Example(list(range(40)) + [50 + i], list(range(40)) + [50 + i], f"t{i}")
               for i in range(2)]
    assert shared_prefix(trained) == 0  # train_on: all, the prompt is trained
    untrained = [Example(e.input_ids, [IGNORE] * 40 + e.labels[40:], e.source)
                 for e in trained]
    assert shared_prefix(untrained) == 39  # the token before each row's first target
    assert shared_prefix(untrained[:1]) == 0


def _loss(model: object, rows: list[Example], direct: bool) -> float:
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        return float(NextTokenLoss(model, direct)(batch.input_ids, batch.position_ids,
                                                  batch.targets))


def test_qlora_on_cpu_is_a_clear_error_before_any_work(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_config(tmp_path, llama, qlora=True)
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "qlora" in err and "CUDA" in err
    assert not (tmp_path / "out").exists()


def test_resume_needs_a_checkpoint_of_the_same_run(llama: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, llama, max_steps=2, save_steps=1))
    with pytest.raises(LannerError, match="no checkpoint"):
        train(config, resume=True, progress=False)
    train(config, progress=False)
    with pytest.raises(LannerError, match="learning_rate"):
        train(dataclasses.replace(config, learning_rate=0.5), progress=False)
    with pytest.raises(LannerError, match="earlier run"):
        train(config, resume=False, progress=False)


def test_too_little_data_for_one_step_names_the_setting(llama: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, llama, batch_size=64))
    with pytest.raises(InvalidRequest, match="batch_size"):
        train(config, progress=False)


def test_cli_dry_run_and_max_steps(llama: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, llama)
    assert main(["tune", str(path), "--dry-run"]) == 0
    assert "the sky is blue." in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert main(["tune", str(path), "--max-steps", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "adapter")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 2


def _tune_process(config: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lanner", "tune", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(llama: Path, tmp_path: Path) -> None:
    overrides = {"max_steps": 60, "save_steps": 10, "lora": {"dropout": 0.1}}
    (tmp_path / "killed").mkdir()
    killed = write_config(tmp_path / "killed", llama, **overrides)
    proc = _tune_process(killed)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "out" / "checkpoint-20").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "out" / "adapter").exists()  # it really stopped early
    resumed = _tune_process(killed)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert "resuming from" in err.decode()

    (tmp_path / "whole").mkdir()
    whole = train(load_config(write_config(tmp_path / "whole", llama, **overrides)),
                  progress=False)
    metrics = json.loads((tmp_path / "killed" / "out" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 20
    assert metrics["final_loss"] == pytest.approx(whole.metrics["final_loss"], abs=1e-4)
    a = load_file(tmp_path / "killed" / "out" / "adapter" / "adapter_model.safetensors")
    b = load_file(whole.adapter / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_two_processes_under_accelerate_match_one_with_the_same_global_batch(
    llama: Path, tmp_path: Path
) -> None:
    (tmp_path / "ddp").mkdir()
    config = write_config(tmp_path / "ddp", llama, max_steps=4, batch_size=2)
    # accelerate's torchrun launcher (its --cpu launcher starts one process without mpirun);
    # the processes find no CUDA and train over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "lanner", "tune", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "out" / "metrics.json").read_text())
    assert ddp["processes"] == 2 and ddp["global_batch"] == 4

    (tmp_path / "one").mkdir()
    one = train(load_config(write_config(tmp_path / "one", llama, max_steps=4, batch_size=2,
                                         gradient_accumulation_steps=2)), progress=False)
    assert losses(ddp) == pytest.approx(losses(one.metrics), abs=1e-4)
    a = load_file(tmp_path / "ddp" / "out" / "adapter" / "adapter_model.safetensors")
    b = load_file(one.adapter / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
def test_smollm2_tunes_runs_with_its_adapter_and_merges(
    smollm2_hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lanner.backends.transformers import TransformersBackend
    from lanner.tune.merge import merge

    config = load_config(write_config(tmp_path, smollm2_hf_folder, max_steps=8,
                                      learning_rate=0.002, lora={"r": 8}))
    result = train(config, progress=False)
    curve = losses(result.metrics)
    assert sum(curve[-2:]) < sum(curve[:2]) - 0.2, curve

    assert main(["run", str(smollm2_hf_folder), "What colour is the sky?", "--adapter",
                 str(result.adapter), "--temperature", "0", "--max-tokens", "8",
                 "--no-log"]) == 0
    assert "blue" in capsys.readouterr().out.lower()

    merged = merge(result.adapter).folder
    tuned = TransformersBackend(smollm2_hf_folder, adapter=result.adapter)
    ids = chat_ids(tuned, "Name a fruit.")
    assert greedy(TransformersBackend(merged), ids) == greedy(tuned, ids)
