"""The bfloat16 matrix kernel for CPUs without bfloat16 instructions
(``lanner.backends.hf_kernels``): its sums are ATen's AVX2 sums, bit for bit.

The kernel is checked against a NumPy model of ATen's order on every machine
(it runs wherever AVX2 does), and against ``F.linear`` itself where PyTorch's
own bfloat16 products take that path (AVX2, no oneDNN bfloat16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lanner.backends import hf_kernels, hf_weights

SHAPES = [(1, 96, 576), (44, 70, 576), (3, 50, 1536), (2, 33, 208), (5, 8, 16), (1, 1, 64),
          (16, 33, 208), (37, 24, 80), (70, 9, 1536)]  # 8-row blocks, with tails and without


def aten_avx2_order(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ATen's bf16_dot_with_fp32_arith on AVX2, written out in NumPy: eight
    8-lane float32 accumulators over blocks of 64 inputs, added pairwise and
    across lanes, then a 16-input tail through one more accumulator; each
    multiply-add rounds once (the product of two bfloat16 values is exact)."""
    xs, ws = x.float().numpy(), weight.float().numpy()
    k = xs.shape[1]
    main, vec = k & ~63, k & ~15

    def lanes(v: np.ndarray) -> np.ndarray:  # (..., 8) -> (...): halves, pairs, neighbours
        h = v[..., :4] + v[..., 4:]
        p = np.stack([h[..., 0] + h[..., 2], h[..., 1] + h[..., 3]], -1)
        return p[..., 0] + p[..., 1]

    out = np.empty((xs.shape[0], ws.shape[0]), np.float32)
    for r, row in enumerate(xs):
        acc = np.zeros((ws.shape[0], 8, 8), np.float32)
        for j in range(0, main, 64):
            block = ws[:, j:j + 64].reshape(-1, 8, 8).astype(np.float64)
            products = block * row[j:j + 64].reshape(8, 8)
            acc = (acc.astype(np.float64) + products).astype(np.float32)
        acc = acc[:, :4] + acc[:, 4:]
        acc = acc[:, :2] + acc[:, 2:]
        total = lanes(acc[:, 0] + acc[:, 1])
        tail = np.zeros((ws.shape[0], 8), np.float32)
        for j in range(main, vec, 8):
            tail = (tail.astype(np.float64) + ws[:, j:j + 8].astype(np.float64) * row[j:j + 8]
                    ).astype(np.float32)
        out[r] = total + lanes(tail)
    return torch.from_numpy(out).bfloat16()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.fixture(scope="module")
def kernel() -> hf_kernels.Linear:
    return hf_kernels.build()


@pytest.mark.parametrize("scale", [0.05, 4.0])
def test_the_kernel_sums_in_aten_s_avx2_order(kernel: hf_kernels.Linear, scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    for rows, n, k in SHAPES:
        x = (torch.randn(rows, k, generator=generator) * scale).bfloat16()
        weight = (torch.randn(n, k, generator=generator) * scale).bfloat16()
        expected = aten_avx2_order(x, weight)
        assert torch.equal(bits(kernel(x, weight)), bits(expected)), (rows, n, k)
        # The model is not trivially right: float32 products summed in another
        # order (PyTorch's float32 matmul) round differently somewhere.
    x = (torch.randn(44, 1536, generator=generator) * scale).bfloat16()
    weight = (torch.randn(256, 1536, generator=generator) * scale).bfloat16()
    other_order = (x.float() @ weight.float().T).bfloat16()
    assert not torch.equal(bits(aten_avx2_order(x, weight)), bits(other_order))


def test_the_kernel_equals_f_linear_where_pytorch_takes_that_path(
        kernel: hf_kernels.Linear, monkeypatch: pytest.MonkeyPatch) -> None:
    """On AVX2 CPUs without oneDNN bfloat16 (the path the kernel reproduces)
    the kernel is in use and equals ``F.linear``; elsewhere it is not used."""
    monkeypatch.delenv("LANNER_BF16_KERNEL", raising=False)
    reason = hf_kernels.usable()
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (reason is None) == (capability == "AVX2" and not onednn_bf16), reason
    if reason is not None:
        assert hf_kernels.bf16_linear() is None
        return
    assert hf_kernels.bf16_linear() is not None
    generator = torch.Generator().manual_seed(2)
    for rows, n, k in SHAPES:
        x = torch.randn(rows, k, generator=generator).bfloat16()
        weight = torch.randn(n, k, generator=generator).bfloat16()
        assert torch.equal(bits(kernel(x, weight)), bits(F.linear(x, weight))), (rows, n, k)
    three_d = torch.randn(2, 7, 576, generator=generator).bfloat16()
    weight = torch.randn(40, 576, generator=generator).bfloat16()
    assert torch.equal(bits(kernel(three_d, weight)), bits(F.linear(three_d, weight)))
    transposed = torch.randn(576, 3, generator=generator).bfloat16().T  # not contiguous
    assert torch.equal(bits(kernel(transposed, weight)), bits(F.linear(transposed, weight)))


def test_the_kernel_refuses_what_it_cannot_sum(kernel: hf_kernels.Linear) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        kernel(torch.ones(1, 24, dtype=torch.bfloat16), torch.ones(4, 24, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiple of 16"):
        kernel(torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(4, 16, dtype=torch.bfloat16))
    assert kernel(torch.ones(0, 16, dtype=torch.bfloat16),
                  torch.ones(4, 16, dtype=torch.bfloat16)).shape == (0, 4)
    assert kernel(torch.ones(3, 16, dtype=torch.bfloat16),
                  torch.ones(0, 16, dtype=torch.bfloat16)).shape == (3, 0)


def test_the_kernel_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANNER_BF16_KERNEL", "off")
    assert hf_kernels.usable() == "LANNER_BF16_KERNEL=off"


def test_modules_on_the_kernel_train_through_pytorch(
        kernel: hf_kernels.Linear, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module whose forward goes through the kernel still has gradients
    (the kernel has no backward: training takes ``F.linear``)."""
    calls: list[int] = []

    def counted(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return kernel(x, weight)

    monkeypatch.setattr(hf_kernels, "bf16_linear", lambda: counted)
    module = torch.nn.Linear(32, 8, bias=False).bfloat16()
    module.forward = hf_weights._kernel_forward.__get__(module)  # type: ignore[method-assign]
    x = torch.randn(3, 32).bfloat16()
    with torch.inference_mode():
        assert torch.equal(bits(module(x)), bits(aten_avx2_order(x, module.weight.detach())))
    assert calls == [3]
    module(x).float().sum().backward()
    assert calls == [3]  # the training pass took F.linear
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
