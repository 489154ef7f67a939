"""A merged model as GGUF, for llama.cpp: the base's own GGUF file with the
weights the adapter changed replaced, everything else (metadata, tokenizer,
untouched tensors in their original quantisation) copied byte for byte.

The installed ``gguf`` package reads and writes GGUF files but has no Hugging
Face -> GGUF converter (that is llama.cpp's ``convert_hf_to_gguf.py``, not
installed), so only a base that was itself a GGUF can be exported. Names come
from the map transformers uses to load GGUF (``get_gguf_hf_weights_map``); each
written tensor is checked by loading it back the way transformers does
(its tensor processor: for llama, the q/k row permutation), exactly.
Changed tensors are stored as F32: the merged weights themselves, not a
re-quantisation of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lanner.backends.gguf_convert import gguf_sha256, read_manifest
from lanner.errors import NotSupported

_NO_CONVERTER = ("writing GGUF from a safetensors model needs llama.cpp's convert_hf_to_gguf.py, "
                 "which is not installed; convert the merged folder with it")


def source_gguf(base_folder: Path) -> Path:
    """The GGUF file a base folder was converted from; NotSupported if none."""
    manifest = read_manifest(base_folder)
    source = Path(str(manifest.get("source", "")))
    if not manifest or not source.is_file():
        raise NotSupported(f"--gguf: the base model {base_folder} was not converted from a GGUF "
                           f"file that is still there; {_NO_CONVERTER}")
    if gguf_sha256(source) != manifest.get("sha256"):
        raise NotSupported(f"--gguf: {source} changed since the base model was converted from it")
    return source


def export(model: Any, changed: list[str], source: Path, dest: Path,
           chat_template: str | None = None) -> None:
    """Write ``dest``: ``source`` with the tensors named ``changed`` (Hugging
    Face names of ``model``'s state dict) taken from ``model``."""
    import gguf

    reader = gguf.GGUFReader(source)
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if field is None:
        raise NotSupported(f"--gguf: {source} names no architecture")
    arch = str(field.contents())
    processor = _processor(arch, model.config)
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    to_hf = get_gguf_hf_weights_map(model, processor)
    state = model.state_dict()
    replaced = {t.name: _gguf_weights(state[to_hf[t.name]], t.name, processor)
                for t in reader.tensors if to_hf.get(t.name) in set(changed)}
    missing = set(changed) - {to_hf[name] for name in replaced}
    if missing:
        raise NotSupported(f"--gguf: {source.name} has no tensor for {sorted(missing)[0]}")
    writer = gguf.GGUFWriter(dest, arch, endianess=reader.endianess)
    _copy_fields(reader, writer, chat_template)
    for t in reader.tensors:
        data = replaced.get(t.name, t.data)
        kind = gguf.GGMLQuantizationType.F32 if t.name in replaced else t.tensor_type
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(replaced.get(t.name, t.data), tensor_endianess=reader.endianess)
    writer.close()


def _processor(arch: str, config: Any) -> Any:
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        TensorProcessor,
    )

    cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if cls not in (TensorProcessor, LlamaTensorProcessor):
        raise NotSupported(f"--gguf: exporting {arch} models is not supported (transformers "
                           f"reshapes their GGUF tensors); {_NO_CONVERTER}")
    heads = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None)
             or config.num_attention_heads}
    return cls(config=heads)


def _gguf_weights(weights: Any, name: str, processor: Any) -> Any:
    """``weights`` (a torch tensor) as the GGUF stores them, checked to load back."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    wanted = weights.detach().float().cpu().numpy()
    data = wanted
    heads = {".attn_q.": "num_attention_heads", ".attn_k.": "num_key_value_heads"}
    for part, key in heads.items():
        if part in name and isinstance(processor, LlamaTensorProcessor):
            data = _permute(wanted, processor.config[key])
    back = processor.process(weights=data, name=name).weights
    if not np.array_equal(back, wanted):
        raise NotSupported(f"--gguf: {name} would not load back as it was; {_NO_CONVERTER}")
    return np.ascontiguousarray(data)


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's row order for rotary q/k weights (``convert_hf_to_gguf``)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(
        shape)


def _copy_fields(reader: Any, writer: Any, chat_template: str | None) -> None:
    import gguf

    for field in reader.fields.values():
        name = field.name
        if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF."):
            continue  # the writer adds these itself
        if name == gguf.Keys.Tokenizer.CHAT_TEMPLATE and chat_template is not None:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
