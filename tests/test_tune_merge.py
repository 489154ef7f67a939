"""``lanner merge``: an adapter merged into a full model folder answers as
base + adapter does; ``--gguf`` writes the base's GGUF with the changed
tensors replaced, which loads back to the merged weights and runs in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lanner.backends import gguf_convert
from lanner.backends.transformers import TransformersBackend
from lanner.cli import main
from lanner.errors import InvalidRequest
from lanner.tune.merge import merge
from tunekit import chat_ids, greedy, make_tiny_llama, train_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_adapter(tmp_path_factory.mktemp("tune"), base, max_steps=10,
                         lora={"target_modules": "all-linear"})


def test_merged_model_answers_as_base_plus_adapter(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    tuned = TransformersBackend(base, adapter=adapter)
    merged = TransformersBackend(out)
    for question in ("name a colour?", "count to three"):
        ids = chat_ids(tuned, question)
        assert greedy(merged, ids) == greedy(tuned, ids)
    assert merged.metadata.chat_template == tuned.metadata.chat_template
    assert json.loads((out / "lanner-merge.json").read_text())["adapter"] == str(adapter)
    assert not list(tmp_path.glob(".*partial"))


def test_an_adapter_that_names_no_base_needs_base(base: Path, adapter: Path,
                                                  tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    config = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "gone"}))
    with pytest.raises(InvalidRequest, match="--base"):
        merge(bare)
    assert merge(bare, base=str(base)).folder == tmp_path / "merged"


def test_gguf_from_a_safetensors_base_says_what_is_missing(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["merge", str(adapter), "-o", str(tmp_path / "m"), "--gguf"]) == 1
    assert "convert_hf_to_gguf.py, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_gguf_export_loads_back_to_the_merged_weights(tinycoder_gguf: Path,
                                                      tmp_path: Path) -> None:
    adapter = train_adapter(tmp_path / "tune", tinycoder_gguf, max_steps=4, chat_format="chatml",
                            lora={"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]})
    merged = merge(adapter, tmp_path / "merged", gguf=True)
    assert merged.gguf == tmp_path / "merged" / "model.gguf"

    back = gguf_convert.converted_folder(merged.gguf, tmp_path / "converted")
    want = load_file(merged.folder / "model.safetensors")
    got = load_file(back / "model.safetensors")
    changed = [k for k in want if "q_proj" in k or "k_proj" in k]
    assert changed and all(torch.equal(got[k], want[k]) for k in want if k in got)

    from gguf import GGUFReader

    source, exported = GGUFReader(str(tinycoder_gguf)), GGUFReader(str(merged.gguf))
    tensors = {t.name: t for t in exported.tensors}
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type == source.tensors[0].tensor_type  # untouched: as it was
    assert bytes(embed.data) == bytes(source.tensors[0].data)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F32"
    assert exported.get_field("tokenizer.chat_template") is not None

    from lanner.backends.llamacpp import LlamaCppBackend
    from lanner.engine.types import Request, collect

    llama = LlamaCppBackend(merged.gguf)
    try:
        result = collect(llama.stream(Request(prompt="hello", temperature=0.0, max_tokens=4)))
    finally:
        llama.close()
    assert result.finish is not None and result.finish.usage.completion_tokens >= 1
