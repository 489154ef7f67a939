"""``lanner chat-format MODEL``: show the exact prompt a model receives.

Renders a sample conversation (system, user, assistant, user, generation prompt
on) with the model's chat format, without loading weights. The prompt goes to
stdout byte for byte; the format's origin, hash and stop strings go to stderr
(or everything into one JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_SYSTEM = "You are a helpful assistant."
SAMPLE_TURNS = (
    ("user", "What is the capital of France?"),
    ("assistant", "The capital of France is Paris."),
    ("user", "And of Italy?"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat-format", help="show the exact prompt a model receives for a chat")
    p.add_argument("model", help="model name or path")
    p.add_argument("--chat-format", help="built-in format name or a .jinja file "
                   "(default: the model's own template)")
    p.add_argument("--system", default=DEFAULT_SYSTEM,
                   help=f"system prompt of the sample conversation (default: {DEFAULT_SYSTEM!r})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lanner --help` does not pay for Jinja.
    from lanner import paths
    from lanner.chat.metadata import read_metadata
    from lanner.engine.chatformat import resolve_chat_format, validate_messages
    from lanner.engine.registry import resolve

    spec = resolve(args.model, paths.home(getattr(args, "home", None)))
    fmt = resolve_chat_format(read_metadata(spec), args.chat_format, spec.chat_format)
    messages = validate_messages(sample_messages(args.system))
    prompt = fmt.render(messages, add_generation_prompt=True)
    if args.json:
        report: dict[str, Any] = {
            "model": spec.name, "path": str(spec.path), "chat_format": fmt.name,
            "template_hash": fmt.template_hash, "bos_token": fmt.bos_token,
            "eos_token": fmt.eos_token, "stop": list(fmt.stop), "messages": messages,
            "prompt": prompt,
        }
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    sys.stdout.write(prompt)
    sys.stdout.flush()
    print(f"\n--- chat format: {fmt.name} (template sha256 {fmt.template_hash[:12]})",
          file=sys.stderr)
    print(f"--- stop: {json.dumps(list(fmt.stop), ensure_ascii=False)}", file=sys.stderr)
    return 0


def sample_messages(system: str) -> list[dict[str, Any]]:
    """The sample conversation: the system prompt (if not empty), then SAMPLE_TURNS."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": role, "content": text} for role, text in SAMPLE_TURNS]


