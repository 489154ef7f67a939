"""Fine-tuning: LoRA/QLoRA supervised fine-tuning from a YAML config.

The front half lives here: the config (``load_config``), the base model's
tokenizer and ChatFormat (``base``), the examples with their loss masks from
that same ChatFormat (``build_examples``, ``pack``) and the dry run. Importing
this package loads no torch or transformers.
"""

from lanner.tune.base import base_model_folder, load_tokenizer, tokenizer_chat_format
from lanner.tune.config import DataConfig, LoraConfig, TuneConfig, load_config
from lanner.tune.dataset import (
    IGNORE,
    Example,
    Examples,
    SplitStats,
    build_examples,
    pack,
)
from lanner.tune.dryrun import dry_run, dry_run_report

__all__ = [
    "IGNORE", "DataConfig", "Example", "Examples", "LoraConfig", "SplitStats", "TuneConfig",
    "base_model_folder", "build_examples", "dry_run", "dry_run_report", "load_config",
    "load_tokenizer", "pack", "tokenizer_chat_format",
]
