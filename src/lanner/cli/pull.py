"""``lanner pull ORG/NAME``: download a model from the Hugging Face Hub and name it."""

from __future__ import annotations

import argparse

from lanner import paths
from lanner.cli.models import _size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull", help="download a model from the Hugging Face Hub",
        description="Download one GGUF file, or the safetensors model, of a Hugging Face Hub "
                    "repo into LANNER_HOME/models, check it against the Hub's hashes and "
                    "register it under a short name. The Hub is HF_ENDPOINT (default "
                    "https://huggingface.co); gated repos need HF_TOKEN or `hf auth login`.")
    p.add_argument("repo_id", metavar="REPO_ID", help="the repo, e.g. HuggingFaceTB/SmolLM2-135M")
    p.add_argument("--file", metavar="NAME.gguf",
                   help="which GGUF file to pull (needed when the repo has several)")
    p.add_argument("--revision", metavar="R", help="branch, tag or commit (default: main)")
    p.add_argument("--name", metavar="SHORT",
                   help="short name to run it by (default: the file's or repo's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.catalog.entries import find
    from lanner.catalog.licensing import warn_for_repo
    from lanner.engine import hub  # keeps `lanner --help` free of the Hub code

    home = paths.home(args.home)
    entry = find(args.repo_id)  # its chat format, for a checkpoint without a template
    spec = hub.pull(home, args.repo_id, file=args.file, revision=args.revision, name=args.name,
                    on_listing=lambda listing: warn_for_repo(home, args.repo_id, listing.license),
                    chat_format=entry.chat_format if entry else None)
    print(f"{spec.name}: {spec.path} ({spec.format}, {_size(spec.size_bytes)}, "
          f"licence {spec.license})")
    print(f'run it with: lanner run {spec.name} "Hello"')
    return 0
