"""The model a run trains: the base weights (in 4 bits with QLoRA) with a fresh
peft LoRA adapter on top, and the loss it is trained on.

The base folder comes from ``base.base_model_folder`` (a GGUF is converted once,
into the same cache the transformers backend reads), so training and serving
load the same weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from lanner.backends.hf_adapters import quiet_peft
from lanner.errors import BackendUnavailable, InvalidRequest, ModelLoadError
from lanner.tune.config import LoraConfig, TuneConfig
from lanner.tune.dataset import IGNORE


def check_qlora(config: TuneConfig) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes: say so before any work."""
    if not config.qlora:
        return
    if not torch.cuda.is_available():
        raise InvalidRequest("qlora", "4-bit QLoRA needs a CUDA GPU (bitsandbytes) and this "
                             "machine has none; set qlora: false to train LoRA on the "
                             "full-precision model")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendUnavailable("qlora: needs the bitsandbytes package "
                                 "(pip install bitsandbytes)")


def load_base(folder: Path, device: torch.device, qlora: bool) -> Any:
    """The base model on ``device``: float32 on CPU, bfloat16 on CUDA (as the
    transformers backend's ``dtype: auto``), NF4 with QLoRA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    extra: dict[str, Any] = {}
    if qlora:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map={"": device}, local_files_only=True, **extra)
    except Exception as exc:  # loaders raise many types on unreadable folders
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelLoadError(f"{folder}: cannot load: {lines[0]}") from exc
    model.config.use_cache = False
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def add_lora(model: Any, lora: LoraConfig) -> Any:
    """``model`` with a new trainable LoRA adapter (peft ``PeftModel``); the
    caller seeds torch first, since the A matrices start random."""
    import peft

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(
        lora.target_modules)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]
                             lora_dropout=lora.dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    try:
        with quiet_peft():
            return peft.get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise InvalidRequest("lora.target_modules", str(exc).splitlines()[0]) from exc


class NextTokenLoss(torch.nn.Module):
    """Summed cross-entropy of the trained next-token targets of a batch.

    ``direct_head``: the decoder's hidden states go through the output head only
    at trained positions, so prompt tokens cost no vocabulary-sized matmul and
    softmax (most of an SFT batch). Used only where ``head_matches`` shows it
    gives the model's own logits (some models scale or cap them after the head).
    Attention: no attention mask; ``position_ids`` restart at 0 at each packed
    example, which makes transformers build a block-diagonal causal mask
    (``masking_utils.find_packed_sequence_indices``; checked by ``packing_works``).
    """

    def __init__(self, model: Any, direct_head: bool) -> None:
        super().__init__()
        self.model = model
        self.direct_head = direct_head

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                targets: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        trained = targets != IGNORE  # (B, T)
        mask = None if allowed is None else _additive(allowed, self.model.dtype)
        if self.direct_head:
            base = self.model.get_base_model()
            hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                        attention_mask=mask, use_cache=False
                                        ).last_hidden_state  # (B, T, H)
            logits = base.get_output_embeddings()(hidden[trained])  # (N, V)
        else:
            out = self.model(input_ids=input_ids, position_ids=position_ids,
                             attention_mask=mask, use_cache=False)
            logits = out.logits[trained]  # (N, V)
        return F.cross_entropy(logits.float(), targets[trained], reduction="sum")


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool "may attend" mask as the additive mask transformers takes in 4D."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def head_matches(model: Any, device: torch.device) -> bool:
    """Whether decoder + output head reproduce the model's logits on a few tokens."""
    ids = torch.arange(1, 9, device=device)[None]  # (1, 8)
    base = model.get_base_model()
    full = model(input_ids=ids, use_cache=False).logits
    direct = base.get_output_embeddings()(base.get_decoder()(input_ids=ids).last_hidden_state)
    return bool(torch.allclose(full.float(), direct.float(), rtol=1e-3, atol=1e-3))


@torch.no_grad()
def packing_works(model: Any, device: torch.device) -> bool:
    """Whether two examples packed in one row (positions restarting) get the
    logits each gets alone: the architecture keeps attention inside each."""
    a = torch.arange(1, 6, device=device)  # (5,)
    b = torch.arange(7, 10, device=device)  # (3,)
    ids = torch.cat([a, b])[None]  # (1, 8)
    positions = torch.cat([torch.arange(5), torch.arange(3)]).to(device)[None]
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    alone = model(input_ids=b[None], use_cache=False).logits[0]
    return bool(torch.allclose(packed[5:].float(), alone.float(), rtol=1e-3, atol=1e-3))


@torch.no_grad()
def shared_prefix_works(model: Any, device: torch.device) -> bool:
    """Whether two rows laid out as one shared prompt and two tails under a 4D
    mask (``batches.collate``) get the logits each row gets alone."""
    from lanner.tune.batches import collate_shared
    from lanner.tune.dataset import Example

    rows = [Example(ids, [IGNORE] * 4 + ids[4:], "check") for ids in
            ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 8])]
    batch = collate_shared(rows, 3).to(device)
    assert batch.allowed is not None
    mask = _additive(batch.allowed, model.dtype)
    shared = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=mask, use_cache=False).logits[0]
    start = 3  # the prefix is 3 tokens; each tail follows
    for row in rows:
        tail = len(row.input_ids) - 3
        alone = model(input_ids=torch.tensor([row.input_ids], device=device),
                      use_cache=False).logits[0, 3:]
        if not torch.allclose(shared[start : start + tail].float(), alone.float(),
                              rtol=1e-3, atol=1e-3):
            return False
        start += tail
    return True
