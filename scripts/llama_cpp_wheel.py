"""Build llama-cpp-python with Lanner's patches to its vendored llama.cpp, once.

`make install` runs this before installing Lanner and installs the wheel whose
path it prints. Nothing here imports Lanner (it is not installed yet).

The sdist is pip's download of the pinned release, checked against its sha256;
each file in patches/ named for that release is applied (``patch -p1``, and a
patch that does not apply is an error, never skipped); the version gets the
local label ``+lanner<N>``, which still satisfies ``llama-cpp-python==0.3.36``,
so `pip show` tells a patched build from PyPI's. Building takes 5-10 minutes on
2 cores, so the wheel is kept under ``$XDG_CACHE_HOME/lanner/wheels/``, keyed by
the sdist, the patches' contents and the CPU it is compiled for (``target``): a
change to any of them builds a new one and removes the wheels built before it.

Usage: python scripts/llama_cpp_wheel.py [--cache DIR]   (prints the wheel's path)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NoReturn

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LOCAL = "lanner8"
"""Raised with every change to the patches' effect."""
PATCHES = sorted((Path(__file__).resolve().parents[1] / "patches").glob(
    f"llama-cpp-python-{VERSION}-*.patch"))


def fail(why: str) -> NoReturn:
    sys.exit(f"llama_cpp_wheel: {why}")


def cache_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lanner" / "wheels"


def target(cpuinfo: str = "/proc/cpuinfo") -> str:
    """What the build is compiled for: llama.cpp's CMake builds for the CPU it
    runs on (-march=native), so a wheel built on one CPU can stop with an
    illegal instruction on another (a shared home, a VM moved to another host);
    ``CMAKE_ARGS`` (a CUDA build, say) changes it too."""
    flags = ""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1] for line in f
                          if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return " ".join([platform.machine(), *sorted(flags.split()),
                     "CMAKE_ARGS=" + os.environ.get("CMAKE_ARGS", "")])


def key(cpuinfo: str = "/proc/cpuinfo") -> str:
    """What the wheel is built from and for: the sdist's hash, the label, each
    patch and the ``target``."""
    h = hashlib.sha256(f"{SDIST_SHA256}+{LOCAL}".encode())
    for patch in PATCHES:
        h.update(patch.name.encode() + b"\0" + patch.read_bytes())
    h.update(b"\0" + target(cpuinfo).encode())
    return h.hexdigest()[:16]


def download(into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "-d", str(into)],
                   check=True, stdout=sys.stderr)  # stdout carries only the wheel's path
    sdist = into / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        fail(f"pip download gave no {sdist.name} in {into}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        fail(f"{sdist.name} has sha256 {digest}, expected {SDIST_SHA256}: not the release "
             "the patches were written for")
    return sdist


def apply_patches(src: Path, patches: list[Path]) -> None:
    """``patch -p1`` each of ``patches`` in ``src``; one that does not apply fails."""
    if shutil.which("patch") is None:
        fail("the `patch` command is missing (Debian/Ubuntu: apt-get install patch)")
    for patch in patches:
        done = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
                              cwd=src, capture_output=True, text=True)
        if done.returncode != 0:
            fail(f"{patch.name} does not apply to llama-cpp-python {VERSION}:\n"
                 f"{done.stdout}{done.stderr}")


def label(src: Path) -> None:
    """Give the package's version the local label ``+LOCAL``."""
    init = src / "llama_cpp" / "__init__.py"
    text, n = re.subn(rf'__version__ = "{re.escape(VERSION)}"',
                      f'__version__ = "{VERSION}+{LOCAL}"', init.read_text())
    if n != 1:
        fail(f"no __version__ = {VERSION!r} in {init}")
    init.write_text(text)


def prune(cache: Path, keep: Path) -> None:
    """Remove the wheels of earlier patches (24 MB each) from ``cache``."""
    for old in cache.iterdir():
        if old.is_dir() and old != keep:
            shutil.rmtree(old, ignore_errors=True)


def build(out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="lanner-llama-") as tmp:
        work = Path(tmp)
        sdist = download(work)
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
                tar.extractall(work, filter="data")
            else:
                tar.extractall(work)
        src = work / f"llama_cpp_python-{VERSION}"
        apply_patches(src, PATCHES)
        label(src)
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
        dist = work / "dist"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(dist), str(src)], check=True, env=env, stdout=sys.stderr)
        wheels = list(dist.glob(f"llama_cpp_python-{VERSION}+{LOCAL}-*.whl"))
        if len(wheels) != 1:
            fail(f"expected one wheel in {dist}, found {[w.name for w in wheels]}")
        out.mkdir(parents=True, exist_ok=True)
        partial = out / (wheels[0].name + ".partial")
        shutil.copy2(wheels[0], partial)
        return partial.rename(out / wheels[0].name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="where built wheels are kept")
    args = parser.parse_args()
    if not PATCHES:
        fail(f"no patches/llama-cpp-python-{VERSION}-*.patch")
    out = cache_dir(args.cache) / key()
    found = sorted(out.glob(f"llama_cpp_python-{VERSION}+{LOCAL}-*.whl"))
    if found:
        print(found[0])
        return 0
    wheel = build(out)
    prune(out.parent, out)
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
