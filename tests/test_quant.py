"""--quant in the transformers backend: what a CPU machine refuses, clearly and
before loading weights, and the bitsandbytes settings a GPU would get."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lanner.backends import hf_quant
from lanner.backends.transformers import TransformersBackend
from lanner.cli import main
from lanner.engine.engine import Engine
from lanner.errors import BackendUnavailable, InvalidRequest, ModelLoadError
from test_transformers_backend import BOS, EOS, PAD, make_tokenizer, save_model

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = make_tokenizer(add_bos=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=256,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return save_model(tmp_path_factory.mktemp("llama"), LlamaForCausalLM(config), tokenizer)


def prequantised(folder: Path, tmp_path: Path, method: str) -> Path:
    """A copy of ``folder`` whose config.json says it is GPTQ/AWQ-quantised."""
    out = tmp_path / method
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).symlink_to(f)
    (out / "config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quant_on_cpu_is_refused_before_loading(llama_dir: Path, quant: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("lanner.backends.transformers.AutoModelForCausalLM.from_pretrained",
                        no_loading)
    with pytest.raises(InvalidRequest, match=f"quant: {quant} loading needs a CUDA GPU with "
                       "bitsandbytes, and this runs on cpu; on a CPU use a quantised GGUF"):
        TransformersBackend(llama_dir, device="cpu", quant=quant)


def test_unknown_quant_names_the_choices(llama_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="quant: must be one of int8, int4; got 'int3'"):
        TransformersBackend(llama_dir, device="cpu", quant="int3")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_checkpoints_on_cpu_are_a_clear_error(
        llama_dir: Path, tmp_path: Path, method: str) -> None:
    folder = prequantised(llama_dir, tmp_path, method)
    with pytest.raises(ModelLoadError, match=f"is {method.upper()}-quantised .*need a CUDA GPU "
                       "and this runs on cpu"):
        TransformersBackend(folder, device="cpu")


def test_gpu_paths_name_the_missing_package(llama_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_quant.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailable, match="needs the bitsandbytes package"):
        hf_quant.load_options(llama_dir, "int8", CUDA, torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="needs gptqmodel"):
        hf_quant.load_options(prequantised(llama_dir, tmp_path, "gptq"), None, CUDA,
                              torch.bfloat16)


def test_gpu_gets_bitsandbytes_int8_and_nf4(llama_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_quant.importlib.util, "find_spec", lambda name: object())
    int8 = hf_quant.load_options(llama_dir, "int8", CUDA, torch.bfloat16)["quantization_config"]
    assert isinstance(int8, BitsAndBytesConfig) and int8.load_in_8bit and not int8.load_in_4bit
    int4 = hf_quant.load_options(llama_dir, "int4", CUDA, torch.float32)["quantization_config"]
    assert int4.load_in_4bit and int4.bnb_4bit_quant_type == "nf4"
    assert int4.bnb_4bit_compute_dtype == torch.bfloat16  # never float32 compute on a GPU
    assert hf_quant.load_options(llama_dir, None, CUDA, torch.bfloat16) == {}


def test_quant_makes_transformers_the_default_and_llamacpp_refuses_it(
        lanner_home: Path, tinycoder_gguf: Path) -> None:
    engine = Engine(lanner_home)
    with pytest.raises(InvalidRequest, match="quant: the llama.cpp backend runs a GGUF's own"):
        engine.load("tinycoder", backend="llama.cpp", quant="int4")
    with pytest.raises(InvalidRequest, match="quant: int4 loading needs a CUDA GPU"):
        engine.load("tinycoder", quant="int4", device="cpu")  # transformers, by default


def test_cli_quant_int4_on_cpu_exits_with_the_message(
        lanner_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--home", str(lanner_home), "run", "tinycoder", "hi", "--quant", "int4",
                 "--max-tokens", "2"])
    assert code == 2
    assert "int4 loading needs a CUDA GPU" in capsys.readouterr().err


def test_the_gpu_benchmark_says_what_it_needs_on_a_cpu() -> None:
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "quantised_loading.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert "needs an NVIDIA GPU with CUDA and bitsandbytes" in done.stderr
