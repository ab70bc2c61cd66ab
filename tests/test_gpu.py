"""The Triton forward kernel and the backend on a CUDA GPU, in fp16 and bf16."""

import pytest
import torch

import attncompiler
from attncompiler.codegen.flash import flash_forward
from attncompiler.reference import attention_reference
from tolerance import assert_as_accurate_as_torch

pytestmark = pytest.mark.gpu

SHAPES = [  # (batch, heads, seq_q, seq_k, head_dim)
    (2, 3, 1, 1, 64), (2, 3, 37, 37, 64), (1, 4, 113, 1023, 80), (1, 2, 1023, 1023, 96),
    (2, 4, 1, 4096, 128), (1, 2, 300, 257, 256), (4, 8, 512, 512, 128), (1, 2, 64, 64, 16),
]


def eager(q, k, v, mask=None, scale=1.0):
    """matmul → softmax → matmul in the input dtype, as a model would write it."""
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s.softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bias"])
def test_kernel_matches_reference(dtype, shape, mask_kind):
    b, h, sq, sk, d = shape
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (sq, sk, sk))
    scale = d ** -0.5
    program, operands, mask = f"(mul s {scale!r})", [], None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, sq, sk, device="cuda") > 0.3
        mask[..., 0] = True  # no fully masked rows: those give NaN in both
        program, operands = f"(where $0 (mul s {scale!r}) -inf)", [mask]
    elif mask_kind == "bias":
        mask = torch.randn(1, h, sq, sk, device="cuda", dtype=dtype)
        program, operands = f"(add (mul s {scale!r}) $0)", [mask]
    out = torch.full((b, h, sq, d), float("nan"), device="cuda", dtype=dtype)
    flash_forward(q, k, v, operands, program, out=out)
    exact = attention_reference(q, k, v, operands, program, compute_dtype=torch.float64)
    assert_as_accurate_as_torch(out, exact, eager(q, k, v, mask, scale))


def test_backend_runs_the_kernel_on_cuda(kernel_calls):
    class Attention(torch.nn.Module):
        def __init__(self, dim=256, heads=4):
            super().__init__()
            self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x, mask):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            w = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5) + mask
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            return self.out((w @ v).transpose(1, 2).reshape(b, s, -1))

    model = Attention().cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(2, 1, 300, 300, device="cuda", dtype=torch.bfloat16)
    mask[1, ..., 250:] = torch.finfo(torch.bfloat16).min
    with torch.no_grad():
        expected = model(x, mask)
        report = attncompiler.explain(model, x, mask)
        exact = model.double()(x.double(), mask.double())
    assert report.num_rewritten == 1 and report.sites[0].kernel.startswith("triton:")
    assert kernel_calls["triton"] == 1
    assert_as_accurate_as_torch(report.output.double(), exact, expected)
