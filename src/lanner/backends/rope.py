"""RoPE scaling (``--rope-scaling linear|yarn``, ``--rope-factor F``): one
description, written into llama.cpp's context parameters or a Hugging Face
config's ``rope_parameters``, so both backends stretch positions the same way.

- linear (position interpolation): every rotary frequency divided by F, so
  position p is encoded as p / F.
- YaRN: high-frequency dimensions (more than beta_fast = 32 turns over the
  trained context) are kept, low-frequency ones (under beta_slow = 1 turn) are
  divided by F, a linear ramp in between; cos and sin are scaled by
  0.1 ln F + 1. llama.cpp and transformers compute exactly this.

The factor stretches the model's trained context (``original_context``); the
default window grows by the same factor. Nothing here imports llama_cpp or
transformers at module level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lanner.errors import InvalidRequest, ModelLoadError

SCALINGS = ("linear", "yarn")
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True, slots=True)
class RopeScaling:
    type: str
    """"linear" or "yarn"."""
    factor: float
    original_context: int
    """The trained context the factor stretches (the model's own)."""

    @property
    def context(self) -> int:
        """The context the scaled positions cover: ``original_context * factor``."""
        return int(self.original_context * self.factor)

    def to_json(self) -> dict[str, object]:
        return {"type": self.type, "factor": self.factor,
                "original_context": self.original_context}


def resolve(kind: str | None, factor: float | None, n_ctx: int | None,
            n_ctx_train: int) -> RopeScaling | None:
    """The scaling asked for, or None. Without a factor, ``n_ctx`` over the
    trained context gives it (``n_ctx / n_ctx_train``)."""
    if kind is None:
        if factor is not None:
            raise InvalidRequest("rope_factor", "needs a rope_scaling (linear or yarn)")
        return None
    if kind not in SCALINGS:
        raise InvalidRequest("rope_scaling", f"must be one of {', '.join(SCALINGS)}, got {kind!r}")
    if n_ctx_train < 1:
        raise InvalidRequest("rope_scaling", "the model does not say its trained context")
    if factor is None:
        if n_ctx is None or n_ctx <= n_ctx_train:
            raise InvalidRequest("rope_factor", "give a factor, or an n_ctx above the model's "
                                 f"trained context of {n_ctx_train} tokens")
        factor = n_ctx / n_ctx_train
    if isinstance(factor, bool) or not isinstance(factor, int | float) \
            or not math.isfinite(factor) or factor <= 1:
        raise InvalidRequest("rope_factor", f"must be a number above 1, got {factor!r}")
    return RopeScaling(kind, float(factor), n_ctx_train)


def default_window(n_ctx_train: int, cap: int, scaling: RopeScaling | None) -> int:
    """The window when none is asked for: the trained context, at most ``cap``
    (KV memory), times the factor when scaled."""
    window = min(n_ctx_train, cap)
    return window if scaling is None else int(window * scaling.factor)


def settings(backend: object) -> dict[str, object]:
    """How a loaded model's positions were set up, for a response's provenance:
    its window and RoPE scaling (None: the model's own)."""
    scaling = getattr(backend, "rope_scaling", None)
    return {"n_ctx": getattr(backend, "n_ctx", None),
            "rope_scaling": scaling.to_json() if isinstance(scaling, RopeScaling) else None}


# -- llama.cpp -----------------------------------------------------------------


def check_unscaled(model_scaling: str | None) -> None:
    """A model that already declares a RoPE scaling keeps it: the two
    backends would not stack another on top of it the same way."""
    if model_scaling and model_scaling != "none":
        raise InvalidRequest("rope_scaling", f"the model already uses {model_scaling} RoPE "
                             "scaling of its own")


def set_llama_params(params: Any, scaling: RopeScaling) -> None:
    """Fill a ``llama_context_params`` for ``scaling``."""
    import llama_cpp

    params.rope_freq_scale = 1.0 / scaling.factor
    if scaling.type == "linear":
        params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR
        params.yarn_ext_factor = 0.0
        return
    params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN
    params.yarn_ext_factor = 1.0  # the full ramp
    params.yarn_attn_factor = 1.0  # llama.cpp multiplies it by 0.1 ln F + 1 itself
    params.yarn_beta_fast = YARN_BETA_FAST
    params.yarn_beta_slow = YARN_BETA_SLOW
    params.yarn_orig_ctx = scaling.original_context


# -- transformers --------------------------------------------------------------


def hf_config(folder: Path, kind: str | None, factor: float | None,
              n_ctx: int | None) -> tuple[Any, RopeScaling] | None:
    """The folder's config with ``scaling`` in its ``rope_parameters`` (to pass
    to ``from_pretrained``), and the scaling; None when none is asked for."""
    if kind is None and factor is None:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # loaders raise OSError, ValueError, KeyError...
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelLoadError(f"{folder}: cannot load: {lines[0]}") from exc
    text = config.get_text_config()
    trained = getattr(text, "max_position_embeddings", None)
    scaling = resolve(kind, factor, n_ctx, trained if isinstance(trained, int) else 0)
    if scaling is None:
        return None
    text.rope_parameters = scaled_rope_parameters(text, scaling)
    text.max_position_embeddings = scaling.context
    return config, scaling


def scaled_rope_parameters(config: Any, scaling: RopeScaling) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` (rope_theta and the rest kept)
    with ``scaling`` added; a config whose RoPE is already scaled, or differs
    per layer type, is refused."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            raise InvalidRequest("rope_scaling", f"{config.model_type} has no RoPE to scale")
        params = {"rope_type": "default", "rope_theta": theta}
    if "rope_theta" not in params:
        raise InvalidRequest("rope_scaling", f"{config.model_type} has a RoPE per layer type; "
                             "scaling it is not supported")
    current = params.get("rope_type", params.get("type", "default"))
    check_unscaled(None if current == "default" else str(current))
    params.pop("type", None)
    params.update(rope_type=scaling.type, factor=scaling.factor)
    if scaling.type == "yarn":
        params.update(original_max_position_embeddings=scaling.original_context,
                      beta_fast=YARN_BETA_FAST, beta_slow=YARN_BETA_SLOW)
    return params
