"""The Triton forward and backward kernels and the backend on a CUDA GPU, in fp16 and bf16."""

import pytest
import torch

import attncompiler
from attncompiler.codegen.flash import flash_forward
from attncompiler.codegen.flash_bwd import flash_backward
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


BWD_SHAPES = [  # (batch, q heads, kv heads, seq_q, seq_k, head_dim)
    (1, 2, 2, 1, 1, 64), (2, 8, 2, 1023, 1023, 128), (1, 4, 4, 113, 1500, 64), (2, 4, 1, 300, 257, 256),
    (4, 8, 8, 512, 512, 80), (1, 4, 2, 2048, 2048, 64), (1, 2, 2, 4096, 4096, 128),
]
BWD_PROGRAMS = {
    "scaled": "(mul s 0.125)",
    "causal": "(where (le k q) (mul s 0.125) -inf)",
    "bool": "(where $0 (mul s 0.125) -inf)",
    "bias": "(add (mul s 0.125) $0)",
}


def _operands(kind, heads, seq_q, seq_k, dtype):
    if kind == "bool":
        mask = torch.rand(seq_q, seq_k, device="cuda") > 0.3
        mask[:, 0] = True  # no fully masked rows: those give NaN in both
        return [mask]
    if kind == "bias":
        return [torch.randn(1, heads, seq_q, seq_k, device="cuda", dtype=dtype)]
    return []


def _autograd(q, k, v, operands, program, grad_out, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    attention_reference(q, k, v, operands, program, compute_dtype=dtype).backward(grad_out.to(dtype))
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", list(BWD_PROGRAMS))
def test_backward_matches_reference(dtype, shape, kind):
    """dq, dk, dv of the Triton backward within 2x PyTorch's own error against fp64 autograd."""
    b, hq, hk, sq, sk, d = shape
    program = BWD_PROGRAMS[kind]
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hk, sk, d, device="cuda", dtype=dtype) for _ in range(2))
    operands = _operands(kind, hq, sq, sk, dtype)
    out, lse = flash_forward(q, k, v, operands, program)
    grad_out = torch.randn_like(out)
    grads = flash_backward(q, k, v, out, lse, grad_out, operands, program, zero_empty_rows=False)
    exact = _autograd(q, k, v, operands, program, grad_out, torch.float64)
    theirs = _autograd(q, k, v, operands, program, grad_out, dtype)
    for got, want, torch_got in zip(grads, exact, theirs):
        assert got.dtype == dtype
        assert_as_accurate_as_torch(got, want, torch_got)


def test_compiled_layer_trains_with_the_triton_backward(kernel_calls):
    """A bf16 causal GQA layer compiled with the backend: gradients as accurate as eager bf16's."""
    class Layer(torch.nn.Module):
        def __init__(self, dim=512, heads=8, kv_heads=2):
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
            self.q, self.kv = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim // heads * kv_heads)

        def forward(self, x):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2).reshape(b, s, -1)

    model = Layer().cuda()
    x = torch.randn(2, 1000, 512, device="cuda")

    def grads(dtype, compile_it=False):
        m = Layer().cuda().to(dtype)
        m.load_state_dict(model.state_dict())
        xd = x.to(dtype).requires_grad_()
        fn = torch.compile(m, backend="attncompiler") if compile_it else m
        fn(xd).float().square().sum().backward()
        return [xd.grad] + [p.grad for p in m.parameters()]

    ours = grads(torch.bfloat16, compile_it=True)
    assert kernel_calls["triton"] == 1 and kernel_calls["triton_bwd"] == 1, dict(kernel_calls)
    for got, want, torch_got in zip(ours, grads(torch.float64), grads(torch.bfloat16)):
        assert_as_accurate_as_torch(got, want, torch_got)
