"""The generated Triton backward (dq, dk, dv), the score-program derivative and the op's autograd.

Gradients are compared with float64 autograd of the PyTorch reference, within 2× the error of
PyTorch's own autograd in the input dtype. Without a GPU the kernels run through Triton's
interpreter (conftest sets ``TRITON_INTERPRET=1``).
"""

import logging
import math

import pytest
import torch

from attncompiler.codegen.configs import bwd_keep, default_bwd_config, default_config
from attncompiler.codegen.flash import flash_forward
from attncompiler.codegen.flash_bwd import flash_backward, generate
from attncompiler.options import triton_interpret
from attncompiler.passes import score_mod
from attncompiler.passes.score_mod import evaluate, parse, score_derivative, without_key_limit
from attncompiler.reference import attention_backward_reference, attention_reference
from tolerance import assert_as_accurate_as_torch

INTERPRET = triton_interpret()
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

SCALED = "(mul s 0.125)"
CAUSAL = "(where (le k q) (mul s 0.125) -inf)"
CAUSAL_BOTTOM_RIGHT = "(where (le k (add q (sub Sk Sq))) (mul s 0.125) -inf)"
MASKED = "(where $0 (mul s 0.125) -inf)"
BIASED = "(add (mul s 0.125) $0)"
op = torch.ops.attncompiler.attention
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def autograd_grads(q, k, v, operands, program, grad_out, dtype, zero_empty_rows=False):
    """(dq, dk, dv) of the reference computed in ``dtype`` (PyTorch's own arithmetic in that dtype)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = attention_reference(q, k, v, operands, program, zero_empty_rows, compute_dtype=dtype)
    out.backward(grad_out.to(dtype))
    return q.grad, k.grad, v.grad


def kernel_grads(q, k, v, operands, program, grad_out, zero_empty_rows=False):
    out, lse = flash_forward(q, k, v, operands, program, interpret=INTERPRET, zero_empty_rows=zero_empty_rows)
    return flash_backward(q, k, v, out, lse, grad_out, operands, program, zero_empty_rows, interpret=INTERPRET)


def check(q, k, v, operands, program, zero_empty_rows=False):
    """The kernel's gradients are as accurate as PyTorch's autograd in the input dtype."""
    grad_out = randn(*attention_reference(q, k, v, operands, program).shape, dtype=v.dtype)
    ours = kernel_grads(q, k, v, operands, program, grad_out, zero_empty_rows)
    exact = autograd_grads(q, k, v, operands, program, grad_out, torch.float64, zero_empty_rows)
    theirs = autograd_grads(q, k, v, operands, program, grad_out, q.dtype, zero_empty_rows)
    for name, got, want, torch_got, x in zip("qkv", ours, exact, theirs, (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert_as_accurate_as_torch(got, want, torch_got)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, hq, hk, sq, sk, d, dv", [
    (2, 2, 2, 1, 1, 16, 16),
    (1, 2, 2, 37, 113, 64, 64),
    (1, 1, 1, 113, 37, 80, 48),
    (1, 4, 2, 37, 50, 64, 32),
    (1, 3, 1, 20, 40, 128, 128),
])
def test_shapes_and_groups(b, hq, hk, sq, sk, d, dv, dtype):
    """Odd lengths, Sq != Sk, head dims 16..128, Dv != D, GQA and MQA groups."""
    check(randn(b, hq, sq, d, dtype=dtype), randn(b, hk, sk, d, dtype=dtype), randn(b, hk, sk, dv, dtype=dtype),
          [], SCALED)


def test_head_dim_256():
    check(randn(1, 1, 20, 256), randn(1, 1, 33, 256), randn(1, 1, 33, 256), [], SCALED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("program, sq, sk", [(CAUSAL, 113, 113), (CAUSAL, 100, 70),
                                             (CAUSAL_BOTTOM_RIGHT, 37, 113)])
def test_causal_index_predicate(program, sq, sk, dtype):
    """Causal masks from positions: key tiles skipped, unmasked and masked phases, GQA."""
    check(randn(1, 4, sq, 64, dtype=dtype), randn(1, 2, sk, 64, dtype=dtype), randn(1, 2, sk, 64, dtype=dtype),
          [], program)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bool_mask_broadcast(dtype):
    q, k, v = randn(2, 2, 37, 64, dtype=dtype), randn(2, 2, 50, 64, dtype=dtype), randn(2, 2, 50, 64, dtype=dtype)
    mask = torch.rand(37, 50, device=DEVICE) < 0.6
    mask[:, 0] = True
    check(q, k, v, [mask], MASKED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_additive_bias_broadcast(dtype):
    q, k, v = randn(2, 3, 37, 32, dtype=dtype), randn(2, 3, 45, 32, dtype=dtype), randn(2, 3, 45, 32, dtype=dtype)
    check(q, k, v, [4 * randn(1, 3, 37, 45, dtype=dtype)], BIASED)


def test_operand_in_the_derivative_and_mqa_batch_broadcast():
    """A per-head temperature multiplies the score (so it appears in ∂/∂s); k, v broadcast over batch."""
    q, k, v = randn(2, 4, 37, 32), randn(1, 1, 40, 32), randn(1, 1, 40, 32)
    check(q, k, v, [torch.rand(4, 1, 1, device=DEVICE) + 0.5], "(mul s $0)")


def test_fully_masked_rows_get_zero_gradients_under_the_sdpa_rule():
    """With ``zero_empty_rows``, rows with no visible key contribute nothing and get dq = 0."""
    q, k, v = randn(1, 2, 37, 64), randn(1, 2, 45, 64), randn(1, 2, 45, 64)
    mask = torch.ones(37, 45, dtype=torch.bool, device=DEVICE)
    mask[[0, 5, 36]] = False
    dq, _, _ = check(q, k, v, [mask], MASKED, zero_empty_rows=True)
    assert (dq[:, :, [0, 5, 36]] == 0).all()


FLT_MIN_FILL = -3.4028234663852886e+38  # torch.finfo(torch.float32).min


@pytest.mark.parametrize("fill", [repr(FLT_MIN_FILL), f"(add (mul s 0.125) {FLT_MIN_FILL!r})"],
                         ids=["constant", "additive"])
@pytest.mark.parametrize("bound", ["$0", "(le k (sub q 40.0))"], ids=["mask", "index"])
def test_rows_without_a_visible_key_under_a_finite_fill(fill, bound):
    """With a finfo.min fill a row that sees no key averages every key (eager's answer): its P is
    1/n, not the 1 an fp32 logsumexp equal to the fill would give; dq, dk, dv match autograd."""
    q, k, v = randn(1, 4, 77, 32), randn(1, 2, 90, 32), randn(1, 2, 90, 32)
    mask = torch.rand(77, 90, device=DEVICE) < 0.5
    mask[[0, 5, 76]] = False
    check(q, k, v, [mask] if bound == "$0" else [], f"(where {bound} (mul s 0.125) {fill})")


def test_lse_is_the_row_logsumexp():
    """The forward's second output: natural-log logsumexp in fp32, -inf for a row with no visible key."""
    q, k, v = randn(1, 2, 37, 64, dtype=torch.float16), randn(1, 2, 45, 64, dtype=torch.float16), \
        randn(1, 2, 45, 64, dtype=torch.float16)
    mask = torch.rand(37, 45, device=DEVICE) < 0.5
    mask[3] = False
    _, lse = flash_forward(q, k, v, [mask], MASKED, interpret=INTERPRET)
    scores = evaluate(parse(MASKED), q.double() @ k.double().mT, [mask])
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 37)
    assert torch.isneginf(lse[:, :, 3]).all()
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    _, empty = flash_forward(q, k[:, :, :0], v[:, :, :0], [], SCALED, interpret=INTERPRET)
    assert torch.isneginf(empty).all()


@pytest.mark.parametrize("program", [CAUSAL, MASKED, BIASED])
def test_gpu_default_tiles(program):
    """The GPU's fp16 default configs (forward and backward) over several tiles of a GQA head, with
    the ragged last tile and a mask or bias."""
    q, k, v = randn(1, 4, 300, 64, dtype=torch.float16), randn(1, 2, 300, 64, dtype=torch.float16), \
        randn(1, 2, 300, 64, dtype=torch.float16)
    operands = {MASKED: [torch.rand(300, 300, device=DEVICE) < 0.7], BIASED: [randn(1, 4, 300, 300)]}
    operands = operands.get(program, [])
    grad_out = randn(1, 4, 300, 64, dtype=torch.float16)
    out, lse = flash_forward(q, k, v, operands, program, default_config(q, 64, interpret=False), interpret=INTERPRET)
    ours = flash_backward(q, k, v, out, lse, grad_out, operands, program, False,
                          default_bwd_config(q, 64, interpret=False), interpret=INTERPRET)
    exact = autograd_grads(q, k, v, operands, program, grad_out, torch.float64)
    theirs = autograd_grads(q, k, v, operands, program, grad_out, torch.float16)
    for got, want, torch_got in zip(ours, exact, theirs):
        assert_as_accurate_as_torch(got, want, torch_got)


@pytest.mark.parametrize("program, folded", [(MASKED, True), (CAUSAL, True), (BIASED, False)])
def test_scale_folded_in_the_backward(program, folded):
    """With the scale folded, P is one FMA and exp2 per score and the scale multiplies dK and dQ once."""
    source = generate(program)[1]
    assert ("p = tl.exp2(z * SCORE_RATE" in source) == folded
    assert f"SCORE_SCALE = tl.constexpr({0.125 if folded else 1.0})" in source
    q, k, v = randn(1, 2, 37, 32), randn(1, 2, 45, 32), randn(1, 2, 45, 32)
    operands = {MASKED: [torch.rand(37, 45, device=DEVICE) < 0.7], BIASED: [randn(1, 2, 37, 45)]}
    check(q, k, v, operands.get(program, []), program)


def test_sequences_longer_than_a_tile_in_both_directions():
    """Several key and query tiles per program, ragged last tiles, causal skipping of whole tiles."""
    check(randn(1, 1, 150, 16), randn(1, 1, 170, 16), randn(1, 1, 170, 16), [], CAUSAL_BOTTOM_RIGHT)


def test_empty_keys_and_queries():
    """No keys: the output is constant zeros, so every gradient is 0; no queries: dk = dv = 0."""
    for sq, sk in ((5, 0), (0, 7)):
        q, k, v = randn(1, 2, sq, 16), randn(1, 2, sk, 16), randn(1, 2, sk, 16)
        grads = kernel_grads(q, k, v, [], SCALED, randn(1, 2, sq, 16))
        for g, x in zip(grads, (q, k, v)):
            assert g.shape == x.shape and not g.any()


# --- the op's autograd ---------------------------------------------------------------------------

def op_inputs(*shapes, dtype=torch.float32):
    return [randn(*s, dtype=dtype).requires_grad_() for s in shapes]


def test_op_backward_runs_the_triton_kernel(kernel_calls):
    q, k, v = op_inputs((2, 4, 37, 32), (2, 2, 50, 32), (2, 2, 50, 16))
    out, lse = op(q, k, v, [], CAUSAL, "auto")
    assert not lse.requires_grad
    grad_out = randn(*out.shape)
    out.backward(grad_out)
    assert dict(kernel_calls) == {"triton": 1, "triton_bwd": 1}
    exact = autograd_grads(q, k, v, [], CAUSAL, grad_out, torch.float64)
    theirs = autograd_grads(q, k, v, [], CAUSAL, grad_out, torch.float32)
    for got, want, torch_got in zip((q.grad, k.grad, v.grad), exact, theirs):
        assert_as_accurate_as_torch(got, want, torch_got)


def test_op_learned_bias_uses_the_reference_backward(kernel_calls):
    """A bias that requires grad needs dBias, which the Triton backward does not compute."""
    q, k, v, bias = op_inputs((1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16), (1, 2, 9, 11))
    op(q, k, v, [bias], BIASED, "auto")[0].sum().backward()
    assert dict(kernel_calls) == {"triton": 1, "reference_bwd": 1}
    assert bias.grad is not None and bias.grad.shape == bias.shape


def test_op_reference_kernel_uses_the_reference_backward(kernel_calls):
    q, k, v = op_inputs((1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16))
    op(q, k, v, [], SCALED, "reference")[0].sum().backward()
    assert dict(kernel_calls) == {"reference": 1, "reference_bwd": 1}


def test_op_program_without_derivative_rule_uses_the_reference_backward(kernel_calls, monkeypatch, caplog):
    """A program the derivative rules do not cover gets the reference backward, and says why."""
    monkeypatch.delitem(score_mod.UNARY_DERIVATIVES, "neg")
    program = "(neg (mul s -0.0625))"
    q, k, v = op_inputs((1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16))
    with caplog.at_level(logging.INFO, logger="attncompiler"):
        op(q, k, v, [], program, "auto")[0].sum().backward()
    assert dict(kernel_calls) == {"triton": 1, "reference_bwd": 1}
    assert "no Triton backward" in caplog.text and "no derivative rule for 'neg'" in caplog.text
    expected = autograd_grads(q, k, v, [], program, torch.ones(1, 2, 9, 16, device=DEVICE), torch.float32)
    torch.testing.assert_close(q.grad, expected[0])


def test_op_backward_kernel_failure_falls_back_to_the_reference(kernel_calls, monkeypatch, caplog):
    """A backward kernel that cannot compile or launch leaves training running on the reference."""
    import attncompiler.codegen.flash_bwd as flash_bwd

    def broken(*args, **kwargs):
        raise RuntimeError("backward codegen exploded")

    monkeypatch.setattr(flash_bwd, "flash_backward", broken)
    program = "(mul s 0.0625)"
    q, k, v = op_inputs((1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16))
    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        op(q, k, v, [], program, "auto")[0].sum().backward()
    assert dict(kernel_calls) == {"triton": 1, "reference_bwd": 1}
    assert "backward codegen exploded" in caplog.text
    expected = autograd_grads(q, k, v, [], program, torch.ones(1, 2, 9, 16, device=DEVICE), torch.float32)
    for got, want in zip((q.grad, k.grad, v.grad), expected):
        torch.testing.assert_close(got, want)


class Attention(torch.nn.Module):
    """A small causal GQA attention layer written the way models write it."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_compiled_module_trains_with_the_triton_backward(inner, kernel_calls):
    """torch.compile(backend="attncompiler") of a layer gives the gradients eager autograd gives; with
    Inductor the backward graph holds the attention_backward op, which runs the Triton kernels."""
    model = Attention().to(DEVICE)
    x = randn(2, 37, 64).requires_grad_()
    options = {"inner": inner, "inductor": {"force_disable_caches": True}}
    compiled = torch.compile(model, backend="attncompiler", options=options)
    compiled(x).square().sum().backward()
    ours = [x.grad] + [p.grad for p in model.parameters()]
    assert kernel_calls["triton"] == 1 and kernel_calls["triton_bwd"] == 1, dict(kernel_calls)

    def eager_grads(dtype):
        m = Attention().to(DEVICE, dtype)
        m.load_state_dict(model.state_dict())
        xe = x.detach().to(dtype).requires_grad_()
        m(xe).square().sum().backward()
        return [xe.grad] + [p.grad for p in m.parameters()]

    for got, want, torch_got in zip(ours, eager_grads(torch.float64), eager_grads(torch.float32)):
        assert_as_accurate_as_torch(got, want, torch_got)


@pytest.mark.parametrize("q_shape, kv_shape, program, zero_empty_rows", [
    ((1, 4, 9, 16), (1, 2, 11, 16), CAUSAL, False),
    ((2, 4, 9, 16), (1, 1, 11, 16), "(mul s $1)", False),
    ((2, 9, 16), (2, 11, 16), MASKED, True),
])
def test_closed_form_reference_backward_matches_autograd(q_shape, kv_shape, program, zero_empty_rows):
    """The fallback inside the backward op (no autograd there) against float64 autograd."""
    mask = torch.rand(9, 11) < 0.5
    mask[3] = False
    operands = [mask, torch.rand(4, 1, 1, dtype=torch.float64) + 0.5]
    q = torch.randn(*q_shape, dtype=torch.float64)
    k, v = (torch.randn(*kv_shape, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(*attention_reference(q, k, v, operands, program).shape, dtype=torch.float64)
    got = attention_backward_reference(q, k, v, grad_out, operands, program, zero_empty_rows)
    want = autograd_grads(q, k, v, operands, program, grad_out, torch.float64, zero_empty_rows)
    for g, w, x in zip(got, want, (q, k, v)):
        assert g.shape == x.shape
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128, 256])
def test_default_backward_configs_fit_hopper(dtype, head_dim):
    """Untuned backward configs pass the prune predicate for a 227 KiB shared-memory GPU."""
    q = torch.empty(1, 1, 8, head_dim, dtype=dtype)
    config = default_bwd_config(q, head_dim, interpret=False)
    assert bwd_keep(config, head_dim, head_dim, dtype.itemsize, 227 * 1024), config


# --- the score program's derivative --------------------------------------------------------------

@pytest.mark.parametrize("program", [
    SCALED, CAUSAL, BIASED, MASKED, "(div s 8.0)", "(sub (mul s 0.5) $1)", "(mul s $1)", "(neg (mul s s))",
    "(div 2.0 (add s 10.0))", "(where (gt s 0.0) s (mul s 0.1))", "(add (mul s 0.125) (mul $1 (sub q k)))",
])
def test_score_derivative_matches_autograd(program):
    """∂program/∂s evaluated with PyTorch equals autograd through the evaluated program."""
    s = torch.randn(2, 7, 9, dtype=torch.float64, requires_grad=True)
    operands = [torch.rand(7, 9) < 0.7, torch.randn(2, 7, 9, dtype=torch.float64)]
    expr = parse(program)
    (expected,) = torch.autograd.grad(evaluate(expr, s, operands).sum(), s)
    derivative = evaluate(score_derivative(expr), s.detach(), operands)
    torch.testing.assert_close(torch.broadcast_to(derivative, s.shape).to(torch.float64), expected)


def test_score_derivative_is_simplified():
    assert str(score_derivative(parse(CAUSAL))) == "(where (le k q) 0.125 0.0)"
    assert str(score_derivative(parse(BIASED))) == "0.125"
    assert str(score_derivative(parse("(add $0 (sub q k))"))) == "0.0"


def test_score_derivative_rejects_ops_without_a_rule(monkeypatch):
    monkeypatch.delitem(score_mod.UNARY_DERIVATIVES, "neg")
    with pytest.raises(ValueError, match="no derivative rule for 'neg'"):
        score_derivative(parse("(neg s)"))
    with pytest.raises(ValueError, match="no derivative rule"):
        generate("(neg (mul s 0.5))")


def test_without_key_limit_drops_only_the_bounding_term():
    assert str(without_key_limit(parse(CAUSAL))) == "(mul s 0.125)"
    window = "(where (and (le k q) (gt k (sub q 8.0))) (mul s 0.125) -inf)"
    assert str(without_key_limit(parse(window))) == "(where (gt k (sub q 8.0)) (mul s 0.125) -inf)"
    assert without_key_limit(parse(MASKED)) == parse(MASKED)
