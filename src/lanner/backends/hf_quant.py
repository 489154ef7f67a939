"""Quantised loading for the transformers backend (``--quant int8|int4``).

On a CUDA GPU, bitsandbytes quantises the weights as they load: ``int8``
(LLM.int8(), outliers kept in 16 bits) and ``int4`` (NF4 with bfloat16
compute, as QLoRA loads them). Checkpoints that are already GPTQ- or
AWQ-quantised say so in config.json (``quantization_config``); transformers
loads them where their kernels' library and CUDA are present, and this module
checks both before any weights are read.

On a CPU there is no bitsandbytes path, and both are an error that says what
to use instead (a GGUF quantisation with llama.cpp). PyTorch's dynamic int8
of the linear layers was measured on the bundled model and dropped: no faster
through this backend, and far from the float32 outputs (docs/benchmarks.md,
``benchmarks/quantised_loading.py --cpu-dynamic``).

``load_options`` gives the extra ``from_pretrained`` arguments, raising the
clear error before any weights are read.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from lanner.errors import BackendUnavailable, InvalidRequest, ModelLoadError

QUANTS = ("int8", "int4")
"""What ``--quant`` takes (the names ``lanner fit --quant`` uses for them)."""
_KERNELS = {
    "gptq": ("gptqmodel",),
    "awq": ("gptqmodel", "awq"),
}
"""Pre-quantised formats and the packages whose kernels transformers uses for them."""


def load_options(folder: Path, quant: str | None, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
    """Extra keyword arguments for ``from_pretrained``; raises before loading
    when the quantisation cannot run here (the message says why and what to do)."""
    check_prequantised(folder, device)
    if quant is None:
        return {}
    if quant not in QUANTS:
        raise InvalidRequest("quant", f"must be one of {', '.join(QUANTS)}; got {quant!r}")
    if device.type != "cuda":
        raise InvalidRequest("quant", f"{quant} loading needs a CUDA GPU with bitsandbytes, "
                             f"and this runs on {device.type}; on a CPU use a quantised GGUF "
                             "with the llama.cpp backend (Q8_0 for 8 bits, Q4_K_M for 4; "
                             "`lanner fit MODEL --quant q4_k_m` sizes it)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendUnavailable(f"--quant {quant} on a GPU needs the bitsandbytes package "
                                 "(pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)}


def describe(quant: str | None, device: torch.device) -> str | None:
    """What ran, for the model's metadata (and so the log)."""
    if quant is None:
        return None
    return f"bitsandbytes {'LLM.int8()' if quant == 'int8' else 'nf4'}"


def check_prequantised(folder: Path, device: torch.device) -> None:
    """A GPTQ/AWQ checkpoint needs CUDA and its kernels' package: say so now,
    not in a stack trace from deep inside the loader."""
    method = prequantised_method(folder)
    if method is None or method not in _KERNELS:
        return
    packages = _KERNELS[method]
    what = f"{folder.name} is {method.upper()}-quantised (config.json quantization_config)"
    if device.type != "cuda":
        raise ModelLoadError(f"{what}; its kernels need a CUDA GPU and this runs on "
                             f"{device.type}. On a CPU use the unquantised checkpoint or a "
                             "GGUF quantisation with the llama.cpp backend")
    if not any(importlib.util.find_spec(p) for p in packages):
        raise BackendUnavailable(f"{what}; loading it needs {' or '.join(packages)} "
                                 f"(pip install {packages[0]})")


def prequantised_method(folder: Path) -> str | None:
    """``quantization_config.quant_method`` of a model folder's config.json, if any."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return str(method).lower() if method else None
