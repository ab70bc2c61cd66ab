"""The generated Triton forward kernel and the custom op against a float64 reference.

Without a GPU the kernels run on CPU through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); on a CUDA machine, without the interpreter, the same tests run on the GPU.
"""

import inspect
import math
import os
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from attncompiler.codegen.common import kernel_dir, source_hash
from attncompiler.codegen.configs import FlashConfig
from attncompiler.codegen.flash import flash_forward, generate, load_kernel
from attncompiler.spec import output_shape
from attncompiler.options import triton_interpret
from attncompiler.passes.score_mod import evaluate, parse
from attncompiler.reference import attention_reference
from tolerance import assert_as_accurate_as_torch

INTERPRET = triton_interpret()
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

SCALED = "(mul s 0.125)"
MASKED = "(where $0 (mul s 0.125) -inf)"
BIASED = "(add (mul s 0.125) $0)"
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="Triton 3.9's interpreter keeps bf16 as raw uint16 and tl.dot multiplies those "
                      "integers, so bf16 kernels give garbage there (also bf16 casts truncate)"))
op = torch.ops.attncompiler.attention
# The padding rows of a query tile (and fully masked rows) compute 0/0 in numpy; they are not stored.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def exact(q, k, v, operands, program):
    """The float64 result (kept in float64, not rounded to the input dtype)."""
    return attention_reference(q.double(), k.double(), v.double(), operands, program, compute_dtype=torch.float64)


def eager(q, k, v, operands, program):
    """PyTorch's own result in the input dtype: matmul → score program → softmax → matmul."""
    return attention_reference(q, k, v, operands, program, compute_dtype=q.dtype)


def exact_lse(q, k, operands, program):
    """The float64 row logsumexp of the program's scores."""
    return torch.logsumexp(evaluate(parse(program), q.double() @ k.double().transpose(-2, -1), operands), dim=-1)


def eager_lse(q, k, operands, program):
    """PyTorch's row logsumexp in the input dtype."""
    return torch.logsumexp(evaluate(parse(program), q @ k.transpose(-2, -1), operands), dim=-1)


def run(q, k, v, operands, program, config=None):
    """The kernel's output, written into a NaN-poisoned ``out`` so that unwritten elements fail."""
    out = torch.full(output_shape(q.shape, k.shape, v.shape), math.nan, dtype=v.dtype, device=DEVICE)
    result, lse = flash_forward(q, k, v, operands, program, config=config, interpret=INTERPRET, out=out)
    assert result is out and lse.shape == out.shape[:-1] and lse.dtype == torch.float32
    return out


def check(q, k, v, operands, program, config=None):
    """Run the kernel and assert it is as accurate as PyTorch's eager low-precision computation."""
    out = run(q, k, v, operands, program, config)
    assert out.dtype == v.dtype
    assert_as_accurate_as_torch(out, exact(q, k, v, operands, program), eager(q, k, v, operands, program))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, h, sq, sk, d, dv", [
    (2, 3, 1, 1, 64, 64),
    (1, 2, 37, 37, 64, 64),
    (1, 2, 113, 113, 16, 16),
    (2, 1, 1, 300, 64, 64),
    (1, 2, 37, 113, 80, 80),
    (1, 2, 113, 37, 96, 96),
    (1, 1, 37, 50, 128, 128),
    (1, 1, 20, 40, 256, 256),
    (1, 2, 37, 113, 64, 32),
    (1, 1, 37, 37, 16, 80),
])
def test_shapes(b, h, sq, sk, d, dv, dtype):
    """Odd sequence lengths, Sq != Sk, head dims 16..256 and Dv != D."""
    check(randn(b, h, sq, d, dtype=dtype), randn(b, h, sk, d, dtype=dtype), randn(b, h, sk, dv, dtype=dtype),
          [], SCALED)


def test_long_sequence():
    """1023 queries and keys: many query blocks and a ragged last key block (wider key tiles than default)."""
    q, k, v = randn(1, 1, 1023, 16), randn(1, 1, 1023, 16), randn(1, 1, 1023, 16)
    check(q, k, v, [], SCALED, config=FlashConfig(64, 128, 4, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_dtypes_with_mask_and_bias(dtype):
    """A causal mask and an additive bias together, in each dtype; the output keeps the input dtype."""
    q, k, v = randn(1, 2, 37, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype)
    causal = torch.ones(37, 45, dtype=torch.bool, device=DEVICE).tril(45 - 37)
    bias = randn(1, 2, 37, 45, dtype=dtype)
    out = check(q, k, v, [causal, bias], "(add (where $0 (mul s 0.125) -inf) $1)")
    assert out.dtype == dtype


@pytest.mark.parametrize("program, folded", [
    ("(div s 8.0)", True), (MASKED, True), ("(where (le k q) (mul s 0.125) -inf)", True),
    (BIASED, False), ("(where $0 (mul s 0.125) -3.4028234663852886e+38)", False),
])
def test_scale_folded_into_the_exponent(program, folded):
    """A scale times -inf-masked raw scores runs with scale·log2(e) folded into one FMA per score;
    biases and finite fills keep the per-row rate. Both agree with PyTorch."""
    _, source = generate(program)
    assert ("p = tl.exp2(s * SCORE_RATE" in source) == folded
    assert ("rate = tl.where(m_use >= LOG2E_SAFE_MIN" in source) != folded
    q, k, v = randn(1, 2, 37, 64), randn(1, 2, 45, 64), randn(1, 2, 45, 64)
    operands = [torch.rand(37, 45, device=DEVICE) < 0.7] if "$0" in program else []
    if program == BIASED:
        operands = [randn(1, 2, 37, 45)]
    check(q, k, v, operands, program)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bool_mask_sq_sk(dtype):
    """A random [Sq, Sk] boolean mask broadcast over batch and heads."""
    q, k, v = randn(2, 2, 37, 64, dtype=dtype), randn(2, 2, 113, 64, dtype=dtype), randn(2, 2, 113, 64, dtype=dtype)
    mask = torch.rand(37, 113, device=DEVICE) < 0.5
    mask[:, 0] = True
    check(q, k, v, [mask], MASKED)


def test_padding_mask_b11sk():
    """A [B, 1, 1, Sk] key padding mask: left padding that masks whole key blocks, right padding."""
    q, k, v = randn(2, 3, 37, 64), randn(2, 3, 70, 64), randn(2, 3, 70, 64)
    mask = torch.ones(2, 1, 1, 70, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :40] = False
    mask[1, ..., 50:] = False
    out = check(q, k, v, [mask], MASKED)
    assert not torch.allclose(out, run(q, k, v, [torch.ones_like(mask)], MASKED))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_additive_bias_1hsqsk(dtype):
    """A float bias [1, H, Sq, Sk] broadcast over the batch."""
    q, k, v = randn(2, 3, 37, 64, dtype=dtype), randn(2, 3, 50, 64, dtype=dtype), randn(2, 3, 50, 64, dtype=dtype)
    check(q, k, v, [4 * randn(1, 3, 37, 50, dtype=dtype)], BIASED)


def test_zero_dim_operand():
    """A 0-d tensor operand (a runtime scale) broadcast to every score."""
    q, k, v = randn(2, 2, 37, 64), randn(2, 2, 40, 64), randn(2, 2, 40, 64)
    check(q, k, v, [torch.tensor(0.3, device=DEVICE)], "(mul s $0)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_neg_inf_give_nan(dtype):
    """Rows masked with -inf everywhere are NaN, exactly where eager softmax-then-matmul gives NaN."""
    q, k, v = randn(1, 2, 37, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype)
    mask = torch.ones(37, 45, dtype=torch.bool, device=DEVICE)
    mask[[0, 5, 36]] = False
    out = check(q, k, v, [mask], MASKED)
    scores = torch.where(mask, q @ k.transpose(-2, -1) * 0.125, -math.inf)
    eager_out = torch.softmax(scores, dim=-1) @ v
    assert torch.equal(out.isnan(), eager_out.isnan())
    assert out[:, :, [0, 5, 36]].isnan().all() and not out[:, :, 1:5].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_give_zeros_under_the_sdpa_rule(dtype):
    """With ``zero_empty_rows`` a row with no visible key is 0, as eager SDPA gives; others unchanged."""
    q, k, v = randn(1, 2, 37, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype)
    mask = torch.ones(37, 45, dtype=torch.bool, device=DEVICE)
    mask[[0, 5, 36]] = False
    out = torch.full((1, 2, 37, 64), math.nan, dtype=dtype, device=DEVICE)
    flash_forward(q, k, v, [mask], MASKED, interpret=INTERPRET, out=out, zero_empty_rows=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)
    assert (out[:, :, [0, 5, 36]] == 0).all()
    assert_as_accurate_as_torch(out, exact(q, k, v, [mask], MASKED).nan_to_num(0.0), sdpa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_finfo_min_give_uniform_average(dtype):
    """Rows masked with finfo.min everywhere are the plain average of v."""
    q, k, v = randn(1, 2, 37, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype), randn(1, 2, 45, 64, dtype=dtype)
    mask = torch.ones(37, 45, dtype=torch.bool, device=DEVICE)
    mask[[0, 5, 36]] = False
    out = check(q, k, v, [mask], f"(where $0 (mul s 0.125) {torch.finfo(dtype).min!r})")
    average = v.double().mean(dim=-2, keepdim=True).expand(1, 2, 3, 64)
    assert_as_accurate_as_torch(out[:, :, [0, 5, 36]], average, v.mean(dim=-2, keepdim=True).expand(1, 2, 3, 64))
    assert not torch.allclose(out[:, :, 1:5].double(), average[:, :, :1].expand(1, 2, 4, 64), atol=0.1)


def test_fully_masked_rows_by_a_finfo_min_bias_give_uniform_average():
    """An fp32 additive mask of finfo.min on every key of a row (as models build it) gives the plain
    average of v, as in eager: scaling such scores by log2(e) must not overflow to -inf."""
    q, k, v = randn(1, 2, 37, 64), randn(1, 2, 45, 64), randn(1, 2, 45, 64)
    bias = torch.zeros(37, 45, device=DEVICE)
    bias[[0, 5, 36]] = torch.finfo(torch.float32).min
    out = check(q, k, v, [bias], BIASED)
    average = v.double().mean(dim=-2, keepdim=True).expand(1, 2, 3, 64)
    assert_as_accurate_as_torch(out[:, :, [0, 5, 36]], average, v.mean(dim=-2, keepdim=True).expand(1, 2, 3, 64))


@pytest.mark.parametrize("program", [
    "(where (le k q) (mul s 0.125) -inf)",
    "(where (le k (add q (sub Sk Sq))) (mul s 0.125) -inf)",
    "(where (and (le k q) (gt k (sub q 20.0))) (mul s 0.125) -inf)",
    "(where (lt k (add q 1.5)) (mul s 0.125) -inf)",
])
@pytest.mark.parametrize("sq, sk", [(113, 113), (100, 150), (37, 200)])
def test_index_predicates(program, sq, sk):
    """Causal (top-left, bottom-right), a sliding window and a fractional strict bound: key tiles in
    the unmasked phase, the masked phase, and skipped ones."""
    q, k, v = randn(1, 2, sq, 32), randn(1, 2, sk, 32), randn(1, 2, sk, 32)
    check(q, k, v, [], program)


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, torch.finfo(torch.float16).min])
def test_finite_fill_index_predicate_rows_without_keys_average_every_key(fill):
    """A causal bound filled with finfo.min, Sq > Sk: the first rows see no key and average all of v
    (as eager does); key blocks past a tile's bound are folded in once each, not twice."""
    q, k, v = randn(1, 2, 100, 32), randn(1, 2, 70, 32), randn(1, 2, 70, 32)
    program = f"(where (le k (add q (sub Sk Sq))) (mul s 0.125) {fill!r})"
    out = check(q, k, v, [], program, config=FlashConfig(64, 32, 4, 1))
    average = v.double().mean(dim=-2, keepdim=True).expand(1, 2, 30, 32)
    assert_as_accurate_as_torch(out[:, :, :30], average, v.mean(dim=-2, keepdim=True).expand(1, 2, 30, 32))


def test_3d_inputs():
    """[B·H, S, D] inputs with a [Sq, Sk] mask."""
    q, k, v = randn(6, 37, 64), randn(6, 113, 64), randn(6, 113, 48)
    out = check(q, k, v, [torch.ones(37, 113, dtype=torch.bool, device=DEVICE).tril()], MASKED)
    assert out.shape == (6, 37, 48)


def test_2d_inputs():
    """[S, D] inputs."""
    out = check(randn(37, 64), randn(113, 64), randn(113, 64), [], SCALED)
    assert out.shape == (37, 64)


def test_mqa_broadcast_heads_and_batch():
    """k and v with one head (and one batch element) broadcast against q's [B, H]."""
    q, k, v = randn(2, 4, 37, 64), randn(1, 1, 50, 64), randn(2, 1, 50, 64)
    out = check(q, k, v, [randn(2, 4, 37, 50)], BIASED)
    assert out.shape == (2, 4, 37, 64)


@pytest.mark.parametrize("hq, hk", [(8, 2), (6, 3), (4, 1)])
def test_grouped_query_heads(hq, hk):
    """GQA: query head h reads key/value head h // (hq / hk); no repeated k/v is materialized."""
    q, k, v = randn(2, hq, 37, 64), randn(2, hk, 50, 64), randn(2, hk, 50, 32)
    mask = torch.rand(2, 1, 37, 50, device=DEVICE) > 0.2
    out = check(q, k, v, [mask], MASKED)
    assert out.shape == (2, hq, 37, 32)
    repeated = [t.repeat_interleave(hq // hk, dim=1) for t in (k, v)]
    torch.testing.assert_close(out, run(q, *repeated, [mask], MASKED), rtol=0, atol=0)


def test_grouped_query_heads_3d():
    """Grouping on a flattened [B·H, S, D] index pairs the same heads as on [B, H, S, D]."""
    q, k, v = randn(2, 8, 37, 64), randn(2, 2, 50, 64), randn(2, 2, 50, 64)
    out3 = run(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), [], SCALED)
    torch.testing.assert_close(out3, run(q, k, v, [], SCALED).flatten(0, 1), rtol=0, atol=0)


def test_gqa_5d_broadcast():
    """5-D [B, Hkv, G, S, D] grouped-query layout: leading dims are flattened, k/v broadcast over G."""
    q, k, v = randn(2, 2, 3, 37, 64), randn(2, 2, 1, 40, 64), randn(2, 2, 1, 40, 64)
    out = check(q, k, v, [torch.ones(37, 40, dtype=torch.bool, device=DEVICE).tril(3)], MASKED)
    assert out.shape == (2, 2, 3, 37, 64)


def test_non_contiguous_inputs():
    """q, v given as [B, S, H, D] then transposed; k as [B, H, D, S] transposed (stride 1 along S)."""
    q = randn(2, 37, 3, 64).transpose(1, 2)
    k = randn(2, 3, 64, 113).transpose(2, 3)
    v = randn(2, 113, 3, 64).transpose(1, 2)
    mask = (torch.rand(2, 113, 37, device=DEVICE) < 0.7).transpose(1, 2)[:, None]
    mask[..., 0] = True
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or mask.is_contiguous())
    check(q, k, v, [mask], MASKED)


def test_empty_keys_and_queries():
    """Sk = 0 gives zeros (as eager does); Sq = 0 gives an empty result."""
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 0, 16), randn(1, 2, 0, 16)
    assert torch.equal(run(q, k, v, [], SCALED), eager(q, k, v, [], SCALED))
    assert run(randn(1, 2, 0, 16), randn(1, 2, 7, 16), randn(1, 2, 7, 16), [], SCALED).shape == (1, 2, 0, 16)


def test_out_is_validated():
    """``out`` of the wrong shape, dtype or layout is rejected."""
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16), randn(1, 2, 7, 16)
    for out in (torch.empty(1, 2, 5, 8), torch.empty(1, 2, 5, 16, dtype=torch.float16),
                torch.empty(1, 5, 2, 16).transpose(1, 2)):
        with pytest.raises(ValueError, match="out must be"):
            flash_forward(q, k, v, [], SCALED, interpret=INTERPRET, out=out.to(DEVICE))


def test_op_auto_runs_the_triton_kernel(kernel_calls):
    """kernel="auto" runs the Triton kernel here (interpreter or GPU) and counts it."""
    q, k, v = randn(2, 2, 37, 64), randn(2, 2, 50, 64), randn(2, 2, 50, 64)
    mask = torch.ones(37, 50, dtype=torch.bool, device=DEVICE).tril(13)
    out, lse = op(q, k, v, [mask], MASKED, "auto")
    assert dict(kernel_calls) == {"triton": 1}
    assert_as_accurate_as_torch(out, exact(q, k, v, [mask], MASKED), eager(q, k, v, [mask], MASKED))
    assert_as_accurate_as_torch(lse, exact_lse(q, k, [mask], MASKED), eager_lse(q, k, [mask], MASKED))


def test_op_reference_runs_the_reference(kernel_calls):
    """kernel="reference" runs the PyTorch reference and counts it."""
    q, k, v = randn(2, 2, 37, 64), randn(2, 2, 50, 64), randn(2, 2, 50, 64)
    out, lse = op(q, k, v, [], SCALED, "reference")
    assert dict(kernel_calls) == {"reference": 1}
    assert_as_accurate_as_torch(out, exact(q, k, v, [], SCALED), eager(q, k, v, [], SCALED))
    assert lse.dtype == torch.float32
    assert_as_accurate_as_torch(lse, exact_lse(q, k, [], SCALED), eager_lse(q, k, [], SCALED))


@pytest.mark.skipif(not INTERPRET, reason="about the CPU interpreter")
def test_op_auto_runs_bf16_on_cpu_with_the_reference(kernel_calls):
    """The interpreter cannot do bf16 dots, so kernel="auto" picks the reference; "triton" refuses."""
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    out, _ = op(q, k, v, [], SCALED, "auto")
    assert dict(kernel_calls) == {"reference": 1}
    torch.testing.assert_close(out, attention_reference(q, k, v, [], SCALED))
    with pytest.raises(RuntimeError, match="fp16 or fp32"):
        op(q, k, v, [], SCALED, "triton")


def test_op_fake_tensor_mode(kernel_calls):
    """The fake implementation gives the broadcast shape and v's dtype without running anything."""
    with FakeTensorMode():
        q = torch.empty(2, 4, 37, 64, dtype=torch.float16)
        k = torch.empty(1, 1, 50, 64, dtype=torch.float16)
        v = torch.empty(2, 1, 50, 32, dtype=torch.float16)
        out, lse = op(q, k, v, [torch.empty(37, 50, dtype=torch.bool)], MASKED, "auto")
    assert isinstance(out, FakeTensor) and isinstance(lse, FakeTensor)
    assert out.shape == (2, 4, 37, 32) and out.dtype == torch.float16
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    assert not kernel_calls


def test_op_symbolic_sizes(kernel_calls):
    """Compiled with dynamic=True, one graph with symbolic sizes serves several sequence lengths."""
    counter = CompileCounterWithBackend("eager")

    def fn(q, k, v, bias):
        return torch.ops.attncompiler.attention(q, k, v, [bias], BIASED, "auto")[0] * 2

    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for sq, sk in ((5, 7), (9, 13), (17, 3)):
        q, k, v, bias = randn(2, 3, sq, 16), randn(2, 3, sk, 16), randn(2, 3, sk, 8), randn(sq, sk)
        out = compiled(q, k, v, bias)
        assert out.shape == (2, 3, sq, 8)
        assert_as_accurate_as_torch(out, 2 * exact(q, k, v, [bias], BIASED), 2 * eager(q, k, v, [bias], BIASED))
    assert counter.frame_count == 1
    assert kernel_calls["triton"] == 3
    [node] = [n for n in counter.graphs[0].graph.nodes if n.target is torch.ops.attncompiler.attention]
    assert all(isinstance(d, torch.SymInt) for d in node.meta["example_value"][0].shape)


def test_op_gradcheck_float64():
    """Gradients for q, k, v and a float bias pass gradcheck (reference backward, float64)."""
    q, k, v = (torch.randn(1, 2, *s, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (5, 4), (5, 3)))
    bias = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    program = "(add (where $0 (mul s 0.5) -inf) $1)"
    assert torch.autograd.gradcheck(lambda q, k, v, b: op(q, k, v, [mask, b], program, "reference")[0],
                                    (q, k, v, bias))


def test_op_gradients_match_eager_autograd():
    """Gradients of the op (Triton forward, reference backward) match autograd of the eager formula."""
    def inputs(dtype):
        g = torch.Generator().manual_seed(1)
        shapes = ((2, 3, 37, 32), (2, 3, 50, 32), (2, 3, 50, 16), (1, 3, 37, 50))
        return [torch.randn(*s, generator=g, dtype=dtype).to(DEVICE).requires_grad_() for s in shapes]

    def eager_grads(dtype):
        q, k, v, bias = inputs(dtype)
        out = torch.softmax(q @ k.transpose(-2, -1) * 0.125 + bias, dim=-1) @ v
        out.backward(grad_out.to(dtype))
        return [t.grad for t in (q, k, v, bias)]

    grad_out = torch.randn(2, 3, 37, 16, device=DEVICE)
    q, k, v, bias = inputs(torch.float32)
    op(q, k, v, [bias], BIASED, "auto")[0].backward(grad_out)
    for ours, exact_grad, torch_grad in zip((q.grad, k.grad, v.grad, bias.grad),
                                            eager_grads(torch.float64), eager_grads(torch.float32)):
        assert ours.shape == exact_grad.shape
        assert_as_accurate_as_torch(ours, exact_grad, torch_grad)


def test_generate_is_deterministic_and_content_hashed():
    """generate() is a pure function of the program; the kernel name carries the source's hash."""
    name, source = generate(MASKED)
    assert (name, source) == generate(MASKED) == generate(parse(MASKED))
    assert name == f"flash_fwd_{source_hash(source.replace(name, '{name}'))}"
    assert f"def {name}(" in source and MASKED in source
    assert "T0, stride_t0_b" in source and "T0" not in generate(SCALED)[1]
    assert generate(BIASED)[0] != name


def test_generated_source_is_written_under_the_cache_dir():
    """load_kernel writes <cache>/kernels/<name>.py and the kernel that runs is read from that file."""
    program = "(sub (mul s 0.25) $0)"
    name, kernel = load_kernel(program)
    path = kernel_dir() / f"{name}.py"
    assert path.parent == Path(os.environ["ATTNCOMPILER_CACHE_DIR"]).expanduser() / "kernels"
    assert path.read_text() == generate(program)[1]
    assert Path(inspect.getsourcefile(kernel.fn)).resolve() == path.resolve()


def test_generate_rejects_gaps_in_operand_indices():
    with pytest.raises(ValueError, match="must use operands 0..n-1"):
        generate("(add s $1)")
