"""Bit-exact bfloat16 matrix products for x86-64 CPUs without bfloat16
instructions (``kernels/bf16_linear.c``), built with the system's C compiler
when a model first needs them.

On such a CPU (AVX2, no AVX512_BF16: the Zen 2 VM of docs/benchmarks.md)
PyTorch multiplies a bfloat16 matrix one output at a time and one row at a
time, widening the input again for every output: one token's step reads the
weights at ~13 GB/s, and a prompt of 44 tokens costs 44 single-token products
(~15 ms a token on SmolLM2-135M). The kernel makes exactly the same float32
additions in the same order, so its outputs equal ``F.linear``'s bit for bit
(checked here on every build before it is used, and by the tests), but widens
the input once and reuses each widened weight vector for several rows: on
SmolLM2's shapes there, 1.6x on one token's products, 4.6x on 8 rows, 6x on a
44-row prompt (benchmarks/bf16_kernel.py).

Used only where it reproduces PyTorch: ATen's CPU capability is AVX2 (its
vector width is what the kernel reproduces), oneDNN has no bfloat16 path
here, a C compiler is on the PATH (``CC``, else ``cc``/``gcc``), and the
built kernel matches ``F.linear`` on a check run. Everywhere else the model
keeps PyTorch's products. ``LANNER_BF16_KERNEL=off`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "bf16_linear.c"
FLAGS = ("-O2", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def usable() -> str | None:
    """Why the kernel cannot reproduce PyTorch's products here, or None."""
    if os.environ.get("LANNER_BF16_KERNEL", "").lower() in {"0", "off", "no", "false"}:
        return "LANNER_BF16_KERNEL=off"
    if platform.system() != "Linux" or platform.machine() not in {"x86_64", "AMD64"}:
        return f"not an x86-64 Linux machine ({platform.system()} {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        return f"PyTorch's CPU kernels here are {capability}, not AVX2"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has a bfloat16 path on this CPU"
    return None


@functools.cache
def bf16_linear() -> Linear | None:
    """``(x, weight) -> x @ weight.T`` for bfloat16 ``x`` (..., K) and a
    contiguous (N, K) ``weight`` whose K is a multiple of 16, equal to
    ``F.linear``'s result bit for bit; None where that cannot hold (logged)."""
    reason = usable()
    if reason is None:
        try:
            linear = build()
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"building {SOURCE.name} failed: {exc}"
        else:
            reason = _check(linear)
            if reason is None:
                return linear
    log.info("bfloat16 products stay PyTorch's: %s", reason)
    return None


def build() -> Linear:
    """Compile and load the kernel, unchecked (``bf16_linear`` checks it)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on the PATH")
    with tempfile.TemporaryDirectory(prefix="lanner-kernel-") as tmp:
        library = Path(tmp) / "bf16_linear.so"
        subprocess.run([compiler, *FLAGS, "-o", str(library), str(SOURCE)], check=True,
                       capture_output=True, timeout=120)
        loaded = ctypes.CDLL(str(library))  # mapped: the file may go with the folder
    function = loaded.lanner_bf16_linear
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    function.restype = ctypes.c_int

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        n, k = weight.shape
        if k % 16 or x.shape[-1] != k:
            raise ValueError(f"the bfloat16 kernel takes K a multiple of 16 in both operands, "
                             f"not x {tuple(x.shape)} and weight {tuple(weight.shape)}")
        out = x.new_empty(*x.shape[:-1], n)
        rows = x.numel() // k
        if rows and n and function(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n,
                                   k, torch.get_num_threads()) != 0:
            raise MemoryError("the bfloat16 kernel could not allocate its input copy")
        return out

    return linear


def _check(linear: Linear) -> str | None:
    """None when ``linear`` equals ``F.linear`` bit for bit on random inputs
    of the shapes models use (one row and several; K with and without a
    16-input tail after the 64-input blocks), else what differed."""
    generator = torch.Generator().manual_seed(0)
    for rows, n, k in ((1, 96, 576), (5, 40, 1536), (3, 33, 208), (2, 8, 16)):
        for scale in (0.05, 4.0):
            x = (torch.randn(rows, k, generator=generator) * scale).bfloat16()
            weight = (torch.randn(n, k, generator=generator) * scale).bfloat16()
            ours, theirs = linear(x, weight), F.linear(x, weight)
            if not torch.equal(ours.view(torch.int16), theirs.view(torch.int16)):
                return f"its products differ from F.linear's at {rows}x{k} @ {k}x{n}"
    return None
