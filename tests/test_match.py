"""Every spelling of attention the matcher knows is rewritten, runs the Triton kernel and is exact.

Each case is a small function or module compiled with ``attncompiler.explain`` (inner compiler
"eager", Triton through the CPU interpreter). Negative cases must be left alone, with a reason
that names what is wrong, and still compute what eager computes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attncompiler
from tolerance import assert_as_accurate_as_torch

B, H, S, D = 2, 2, 16, 8
SK = 24  # a key length different from the query length, to catch swapped dims
OPTIONS = {"inner": "eager"}


def rand(*shape, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape) * 7 + len(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def qkv(layout="bhsd", dtype=torch.float32):
    """q ``[.., S, D]``, k and v ``[.., SK, D]`` in the given layout."""
    shapes = {
        "bhsd": ((B, H, S, D), (B, H, SK, D)),
        "3d": ((B * H, S, D), (B * H, SK, D)),
        "bshd": ((B, S, H, D), (B, SK, H, D)),
    }[layout]
    return (rand(*shapes[0], dtype=dtype, seed=1), rand(*shapes[1], dtype=dtype, seed=2),
            rand(*shapes[1], dtype=dtype, seed=3))


def causal_bool(sq=S, sk=SK):
    """True where a query may attend (never a fully masked row)."""
    return torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)


def run(fn, *inputs, expected_sites=1):
    """Compile ``fn``, check the site count, that the Triton kernel ran, and return the report."""
    attncompiler.KERNEL_CALLS.clear()
    report = attncompiler.explain(fn, *inputs, options=OPTIONS)
    assert len(report.sites) == expected_sites, report.table()
    assert report.num_rewritten == expected_sites, str(report)
    for site in report.sites:
        assert site.rewritten and site.reason is None, site
        assert site.kernel is not None and site.kernel.startswith("triton:"), site
    assert attncompiler.KERNEL_CALLS["triton"] >= expected_sites, dict(attncompiler.KERNEL_CALLS)
    assert attncompiler.KERNEL_CALLS["reference"] == 0, dict(attncompiler.KERNEL_CALLS)
    assert "attncompiler.attention" in report.graph_after
    return report


def check_exact(fn, *inputs, expected_sites=1):
    """Rewritten, Triton ran, and the output equals the uncompiled function's (fp32, tight)."""
    with torch.no_grad():
        expected = fn(*inputs)
        report = run(fn, *inputs, expected_sites=expected_sites)
    torch.testing.assert_close(report.output, expected, rtol=1e-5, atol=1e-5)
    return report


def check_not_rewritten(fn, *inputs, reason: str):
    """No site rewritten, a reason containing ``reason`` recorded, output still eager's."""
    with torch.no_grad():
        expected = fn(*inputs)
        report = attncompiler.explain(fn, *inputs, options=OPTIONS)
    assert report.sites, "the candidate should still be reported"
    assert report.num_rewritten == 0, str(report)
    assert any(reason in (s.reason or "") for s in report.sites), report.table()
    assert "attncompiler.attention" not in report.graph_after
    torch.testing.assert_close(report.output, expected, rtol=1e-6, atol=1e-6)
    return report


# --- matrix-product spellings -----------------------------------------------------------------

def attn_torch_matmul(q, k, v):
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D), dim=-1), v)


def attn_at(q, k, v):
    return ((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(-1) @ v


def attn_tensor_matmul(q, k, v):
    return ((q.matmul(k.transpose(-2, -1))) * 0.35).softmax(dim=-1).matmul(v)


def attn_bmm(q, k, v):
    return torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D), dim=-1), v)


def attn_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def attn_einsum_bshd_out(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return torch.einsum("bhqk,bhkd->bqhd", s.softmax(-1), v)


def attn_einsum_ellipsis(q, k, v):
    s = torch.einsum("...qd,...kd->...qk", q, k) / math.sqrt(D)
    return torch.einsum("...qk,...kd->...qd", s.softmax(-1), v)


def attn_einsum_bshd_inputs(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("fn, layout", [
    (attn_torch_matmul, "bhsd"),
    (attn_at, "bhsd"),
    (attn_tensor_matmul, "bhsd"),
    (attn_bmm, "3d"),
    (attn_einsum, "bhsd"),
    (attn_einsum_bshd_out, "bhsd"),
    (attn_einsum_ellipsis, "bhsd"),
    (attn_einsum_ellipsis, "3d"),
    (attn_einsum_bshd_inputs, "bshd"),
], ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_matmul_spellings(fn, layout, kernel_calls):
    report = check_exact(fn, *qkv(layout))
    assert kernel_calls["triton"] == 1
    assert report.sites[0].summary["q"] == ("[4, 16, 8]" if layout == "3d" else "[2, 2, 16, 8]")
    assert report.sites[0].summary["k"] == ("[4, 24, 8]" if layout == "3d" else "[2, 2, 24, 8]")


def test_einsum_output_order_is_kept(kernel_calls):
    q, k, v = qkv()
    report = check_exact(attn_einsum_bshd_out, q, k, v)
    assert report.output.shape == (B, S, H, D)


# --- how K is transposed ------------------------------------------------------------------------

@pytest.mark.parametrize("transpose", [
    lambda k: k.transpose(-2, -1),
    lambda k: k.transpose(2, 3),
    lambda k: k.transpose(3, 2),
    lambda k: k.mT,
    lambda k: k.permute(0, 1, 3, 2),
    lambda k: torch.transpose(k, -1, -2),
    lambda k: k.swapaxes(-2, -1),
], ids=["transpose(-2,-1)", "transpose(2,3)", "transpose(3,2)", "mT", "permute(0,1,3,2)",
        "torch.transpose", "swapaxes"])
def test_key_transpose_spellings(transpose, kernel_calls):
    def fn(q, k, v):
        return (q @ transpose(k) * 0.3).softmax(-1) @ v

    report = check_exact(fn, *qkv())
    assert report.sites[0].summary["k"] == "[2, 2, 24, 8]"
    # the transpose of K is gone with the region: the kernel reads K as given
    assert "transpose" not in report.graph_after and "mT" not in report.graph_after


def test_key_given_transposed(kernel_calls):
    q, k, v = qkv()
    kt = k.transpose(-2, -1).contiguous()  # [B, H, D, SK], no transpose node in the graph

    def fn(q, kt, v):
        return (q @ kt / math.sqrt(D)).softmax(-1) @ v

    report = check_exact(fn, q, kt, v)
    assert report.sites[0].summary["k"] == "[2, 2, 24, 8]"


# --- scale ----------------------------------------------------------------------------------------

SCALES = {
    "div python float": lambda s: s / math.sqrt(D),
    "div python int": lambda s: s / 3,
    "mul python float": lambda s: s * D ** -0.5,
    "rmul python float": lambda s: 0.25 * s,
    "div full([])": lambda s: s / torch.full([], D ** 0.5),
    "div tensor(8.0)": lambda s: s / torch.tensor(8.0),
    "mul tensor(0.125)": lambda s: s * torch.tensor(0.125),
    "absent": lambda s: s,
}


@pytest.mark.parametrize("scale", list(SCALES.values()), ids=list(SCALES))
def test_scale_spellings(scale, kernel_calls):
    def fn(q, k, v):
        return scale(q @ k.transpose(-2, -1)).softmax(-1) @ v

    report = check_exact(fn, *qkv())
    expected = scale(torch.tensor(1.0)).item()
    assert float(report.sites[0].summary["scale"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("where", ["q", "k", "kT"])
def test_scale_folded_into_q_or_k(where, kernel_calls):
    scale = D ** -0.5

    def fn(q, k, v):
        if where == "q":
            scores = (q * scale) @ k.transpose(-2, -1)
        elif where == "k":
            scores = q @ (k * scale).transpose(-2, -1)
        else:
            scores = q @ (k.transpose(-2, -1) * scale)
        return scores.softmax(-1) @ v

    report = check_exact(fn, *qkv())
    assert report.sites[0].summary["scale"] == "1"


def test_scale_split_between_q_and_k(kernel_calls):
    s = D ** -0.25

    def fn(q, k, v):
        return ((q * s) @ (k * s).transpose(-2, -1)).softmax(-1) @ v

    check_exact(fn, *qkv())


# --- softmax spellings and dtype handling ---------------------------------------------------------

SOFTMAXES = {
    "F.softmax": lambda s: F.softmax(s, dim=-1),
    "F.softmax positional": lambda s: F.softmax(s, -1),
    "F.softmax dim=3": lambda s: F.softmax(s, dim=3),
    "torch.softmax": lambda s: torch.softmax(s, -1),
    "torch.softmax dim kw": lambda s: torch.softmax(s, dim=-1),
    "Tensor.softmax": lambda s: s.softmax(-1),
    "Tensor.softmax dim kw": lambda s: s.softmax(dim=-1),
    "nn.Softmax": nn.Softmax(dim=-1),
    "F.softmax fp32": lambda s: F.softmax(s, dim=-1, dtype=torch.float32),
    "torch.softmax fp32": lambda s: torch.softmax(s, -1, dtype=torch.float32),
    "Tensor.softmax fp32": lambda s: s.softmax(-1, dtype=torch.float32),
}


@pytest.mark.parametrize("softmax", list(SOFTMAXES.values()), ids=list(SOFTMAXES))
def test_softmax_spellings(softmax, kernel_calls):
    def fn(q, k, v):
        return softmax(q @ k.transpose(-2, -1) * D ** -0.5) @ v

    check_exact(fn, *qkv())


class SoftmaxModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return self.softmax(q @ k.transpose(-2, -1) * D ** -0.5) @ v


def test_nn_softmax_submodule(kernel_calls):
    check_exact(SoftmaxModule().eval(), *qkv())


CASTS_BACK = {
    ".to(q.dtype)": lambda p, q: p.to(q.dtype),
    ".type_as(q)": lambda p, q: p.type_as(q),
    ".half()": lambda p, q: p.half(),
    ".to(torch.float16)": lambda p, q: p.to(torch.float16),
}


@pytest.mark.parametrize("cast", list(CASTS_BACK.values()), ids=list(CASTS_BACK))
def test_fp32_softmax_cast_back_fp16(cast, kernel_calls):
    """HF style: fp16 scores, softmax computed in fp32, probabilities cast back to fp16."""
    def fn(q, k, v):
        scores = q @ k.transpose(-2, -1) * D ** -0.5
        return cast(F.softmax(scores, dim=-1, dtype=torch.float32), q) @ v

    q, k, v = qkv(dtype=torch.float16)
    with torch.no_grad():
        eager = fn(q, k, v)
        report = run(fn, q, k, v)
    out = report.output
    assert out.dtype == torch.float16 and out.shape == eager.shape
    exact = (F.softmax(q.double() @ k.double().transpose(-2, -1) * D ** -0.5, dim=-1) @ v.double())
    assert_as_accurate_as_torch(out, exact, eager)


def test_fp32_softmax_cast_back_fp32_is_noop_cast(kernel_calls):
    def fn(q, k, v):
        return F.softmax(q @ k.mT / math.sqrt(D), dim=-1, dtype=torch.float32).to(q.dtype) @ v

    check_exact(fn, *qkv())


def test_float_scores_upcast_before_softmax_fp16(kernel_calls):
    """``scores.float().softmax(-1).to(q.dtype)``: the casts are part of the region."""
    def fn(q, k, v):
        return (q @ k.mT * D ** -0.5).float().softmax(-1).to(q.dtype) @ v

    q, k, v = qkv(dtype=torch.float16)
    with torch.no_grad():
        eager = fn(q, k, v)
        report = run(fn, q, k, v)
    exact = (q.double() @ k.double().mT * D ** -0.5).softmax(-1) @ v.double()
    assert_as_accurate_as_torch(report.output, exact, eager)


# --- dropout ---------------------------------------------------------------------------------------

class DropoutAttention(nn.Module):
    def __init__(self, p=0.1):
        super().__init__()
        self.dropout = nn.Dropout(p)

    def forward(self, q, k, v):
        probs = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)
        return self.dropout(probs) @ v


def test_dropout_eval_mode(kernel_calls):
    check_exact(DropoutAttention(0.1).eval(), *qkv())


def test_functional_dropout_not_training(kernel_calls):
    def fn(q, k, v):
        probs = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)
        return F.dropout(probs, p=0.2, training=False) @ v

    check_exact(fn, *qkv())


def test_dropout_training_not_rewritten():
    model = DropoutAttention(0.5).train()
    q, k, v = qkv()
    torch.manual_seed(0)
    expected = model(q, k, v)
    torch.manual_seed(0)
    report = attncompiler.explain(model, q, k, v, options=OPTIONS)
    assert report.num_rewritten == 0, str(report)
    (site,) = report.sites
    assert "dropout" in site.reason and "training" in site.reason, site.reason
    assert "attncompiler.attention" not in report.graph_after
    torch.testing.assert_close(report.output, expected)


# --- masks and biases ----------------------------------------------------------------------------

def test_additive_float_mask(kernel_calls):
    mask = torch.zeros(S, SK).masked_fill(~causal_bool(), float("-inf"))

    def fn(q, k, v, mask):
        return (q @ k.mT * D ** -0.5 + mask).softmax(-1) @ v

    report = check_exact(fn, *qkv(), mask)
    assert "bias float32[16, 24]" in report.sites[0].summary["mask"]


def test_additive_bias_per_batch_and_head(kernel_calls):
    bias = rand(B, H, S, SK, seed=9)

    def fn(q, k, v, bias):
        return F.softmax(bias + q @ k.mT / math.sqrt(D), dim=-1) @ v

    check_exact(fn, *qkv(), bias)


def test_additive_mask_broadcast_over_heads(kernel_calls):
    mask = torch.zeros(B, 1, S, SK).masked_fill(~causal_bool(), torch.finfo(torch.float32).min)

    def fn(q, k, v, mask):
        scores = q @ k.mT / math.sqrt(D)
        scores = scores + mask
        return scores.softmax(-1) @ v

    check_exact(fn, *qkv(), mask)


def test_bool_mask_masked_fill_neg_inf(kernel_calls):
    masked_out = ~causal_bool()

    def fn(q, k, v, masked_out):
        scores = (q @ k.mT / math.sqrt(D)).masked_fill(masked_out, float("-inf"))
        return scores.softmax(-1) @ v

    report = check_exact(fn, *qkv(), masked_out)
    assert "bool mask bool[16, 24]" in report.sites[0].summary["mask"]


def test_bool_mask_masked_fill_inverted_finfo_min(kernel_calls):
    keep = causal_bool()

    def fn(q, k, v, keep):
        scores = q @ k.mT / math.sqrt(D)
        scores = scores.masked_fill(~keep, torch.finfo(q.dtype).min)
        return F.softmax(scores, dim=-1) @ v

    check_exact(fn, *qkv(), keep)


def test_bool_mask_torch_masked_fill_value_kw(kernel_calls):
    masked_out = ~causal_bool()

    def fn(q, k, v, masked_out):
        scores = torch.masked_fill(q @ k.mT / math.sqrt(D), masked_out, value=-1e9)
        return F.softmax(scores, dim=-1) @ v

    check_exact(fn, *qkv(), masked_out)


def test_bool_mask_torch_where(kernel_calls):
    keep = causal_bool().expand(B, 1, S, SK)

    def fn(q, k, v, keep):
        scores = q @ k.mT / math.sqrt(D)
        scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v

    check_exact(fn, *qkv(), keep)


def test_mask_and_bias_together(kernel_calls):
    keep = causal_bool()
    bias = rand(1, H, S, SK, seed=5)

    def fn(q, k, v, keep, bias):
        scores = q @ k.mT * D ** -0.5 + bias
        return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v

    report = check_exact(fn, *qkv(), keep, bias)
    assert report.sites[0].summary["mask"].count(";") == 1


def test_mask_built_inside_the_graph(kernel_calls):
    def fn(q, k, v):
        sq, sk = q.shape[-2], k.shape[-2]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = (q @ k.mT / math.sqrt(D)).masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v

    check_exact(fn, *qkv())


# --- layouts ---------------------------------------------------------------------------------------

def test_3d_layout(kernel_calls):
    def fn(q, k, v):
        return F.softmax(q @ k.transpose(1, 2) * D ** -0.5, dim=-1) @ v

    check_exact(fn, *qkv("3d"))


def test_4d_layout_with_mask_broadcast_over_batch(kernel_calls):
    mask = torch.zeros(1, 1, S, SK).masked_fill(~causal_bool(), float("-inf"))

    def fn(q, k, v, mask):
        return F.softmax(q @ k.transpose(2, 3) * D ** -0.5 + mask, dim=-1) @ v

    check_exact(fn, *qkv(), mask)


def test_bshd_inputs_transposed(kernel_calls):
    def fn(q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v
        return out.transpose(1, 2).reshape(B, S, H * D)

    check_exact(fn, *qkv("bshd"))


def test_bshd_inputs_permuted(kernel_calls):
    def fn(q, k, v):
        q, v = q.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        kt = k.permute(0, 2, 3, 1)  # straight to [B, H, D, SK]
        return (q @ kt * D ** -0.5).softmax(-1) @ v

    report = check_exact(fn, *qkv("bshd"))
    assert report.sites[0].summary["k"] == "[2, 2, 24, 8]"


def test_broadcast_kv_heads(kernel_calls):
    """One K/V head shared by all query heads (MQA) broadcasts in the batch dims."""
    q, k, v = qkv()
    k, v = k[:, :1].contiguous(), v[:, :1].contiguous()

    def fn(q, k, v):
        return (q @ k.mT * D ** -0.5).softmax(-1) @ v

    check_exact(fn, q, k, v)


def test_two_sites_in_one_graph(kernel_calls):
    def fn(q, k, v):
        a = (q @ k.mT * D ** -0.5).softmax(-1) @ v
        b = torch.softmax(torch.matmul(a, k.transpose(-2, -1)), dim=-1) @ v
        return a + b

    check_exact(fn, *qkv(), expected_sites=2)
    assert kernel_calls["triton"] == 2


# --- shapes and operands beyond the common case ----------------------------------------------------

SHAPES = {
    "2-D, no batch": ((S, D), (SK, D), (SK, D)),
    "one query (decode step)": ((B, H, 1, D), (B, H, SK, D), (B, H, SK, D)),
    "head dim 12, value dim 20": ((B, H, S, 12), (B, H, SK, 12), (B, H, SK, 20)),
    "5-D, grouped heads": ((B, 2, 3, S, D), (B, 2, 1, SK, D), (B, 2, 1, SK, D)),
}


@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_other_shapes(shapes, kernel_calls):
    def fn(q, k, v):
        return (q @ k.mT * 0.3).softmax(-1) @ v

    check_exact(fn, *(rand(*shape, seed=i) for i, shape in enumerate(shapes)))


def test_float64_inputs(kernel_calls):
    def fn(q, k, v):
        return (q @ k.mT * 0.3).softmax(-1) @ v

    with torch.no_grad():
        q, k, v = (t.double() for t in qkv())
        report = run(fn, q, k, v)
    assert report.output.dtype == torch.float64
    torch.testing.assert_close(report.output, fn(q, k, v), rtol=1e-12, atol=1e-12)


OPERANDS = {  # name: (make the tensor, combine scores with it)
    "0-d tensor input as temperature": (lambda: torch.tensor(2.0), lambda s, t: s / t),
    "per-head scale parameter": (lambda: rand(H, 1, 1, seed=7) + 1, lambda s, t: s * t),
    "1-D key padding bias": (lambda: torch.zeros(SK).index_fill(0, torch.arange(18, SK), float("-inf")),
                             lambda s, t: s + t),
}


@pytest.mark.parametrize("make, combine", list(OPERANDS.values()), ids=list(OPERANDS))
def test_tensor_operands(make, combine, kernel_calls):
    def fn(q, k, v, t):
        return combine(q @ k.mT, t).softmax(-1) @ v

    report = check_exact(fn, *qkv(), make())
    assert report.sites[0].summary["mask"].startswith("bias float32")


def test_in_place_ops_on_the_scores(kernel_calls):
    keep = causal_bool()
    bias = rand(S, SK, seed=5)

    def fn(q, k, v, keep, bias):
        scores = q @ k.mT
        scores *= D ** -0.5
        scores += bias
        scores = scores.masked_fill_(~keep, float("-inf"))
        return scores.softmax(-1) @ v

    check_exact(fn, *qkv(), keep, bias)


def test_torch_where_with_scores_as_the_other_branch(kernel_calls):
    keep = causal_bool()

    def fn(q, k, v, keep):
        return torch.where(~keep, float("-inf"), q @ k.mT * D ** -0.5).softmax(-1) @ v

    check_exact(fn, *qkv(), keep)


def test_einsum_with_value_given_transposed(kernel_calls):
    q, k, v = qkv()

    def fn(q, k, vt):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
        return torch.einsum("bhqk,bhdk->bhqd", s.softmax(-1), vt)

    report = check_exact(fn, q, k, v.mT.contiguous())
    assert report.sites[0].summary["v"] == "[2, 2, 24, 8]"


# --- a real attention layer -----------------------------------------------------------------------

class SelfAttention(nn.Module):
    """A transformer attention block: projections, heads split/merged, mask, eval dropout."""

    def __init__(self, hidden=32, heads=4, dropout=0.1):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, attention_mask):
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling + attention_mask
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = self.dropout(probs)
        out = torch.matmul(probs, v).transpose(1, 2).contiguous().reshape(b, s, -1)
        return self.o_proj(out)


class Block(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def test_attention_module_with_projections(kernel_calls):
    torch.manual_seed(0)
    layer = SelfAttention().eval()
    x = rand(B, S, 32, seed=4)
    mask = torch.zeros(B, 1, S, S).masked_fill(~causal_bool(S, S), torch.finfo(torch.float32).min)
    report = check_exact(layer, x, mask)
    assert report.sites[0].summary["q"] == "[2, 4, 16, 8]"


def test_stack_of_transformer_blocks(kernel_calls):
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(2)]).eval()
    x = rand(B, S, 32, seed=6)
    mask = torch.zeros(1, 1, S, S).masked_fill(~causal_bool(S, S), float("-inf"))

    def fn(x, mask):
        for block in model:
            x = block(x, mask)
        return x

    check_exact(fn, x, mask, expected_sites=2)
    assert kernel_calls["triton"] == 2


# --- existing scaled_dot_product_attention ---------------------------------------------------------

def test_sdpa_plain(kernel_calls):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    report = check_exact(fn, *qkv())
    assert float(report.sites[0].summary["scale"]) == pytest.approx(D ** -0.5, rel=1e-5)


def test_sdpa_explicit_scale(kernel_calls):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)

    report = check_exact(fn, *qkv())
    assert float(report.sites[0].summary["scale"]) == pytest.approx(0.3, rel=1e-5)


def test_sdpa_bool_mask(kernel_calls):
    def fn(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    report = check_exact(fn, *qkv(), causal_bool())
    assert "bool mask" in report.sites[0].summary["mask"]


def test_sdpa_float_mask(kernel_calls):
    bias = rand(B, 1, S, SK, seed=8)

    def fn(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    report = check_exact(fn, *qkv(), bias)
    assert "bias float32" in report.sites[0].summary["mask"]


def test_sdpa_fully_masked_row_matches_eager(kernel_calls):
    keep = causal_bool()
    keep[3] = False

    def fn(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    check_exact(fn, *qkv(), keep)


def test_fully_masked_row_gives_nan_like_eager_softmax(kernel_calls):
    keep = causal_bool()
    keep[3] = False

    def fn(q, k, v, keep):
        return (q @ k.mT).masked_fill(~keep, float("-inf")).softmax(-1) @ v

    with torch.no_grad():
        expected = fn(*qkv(), keep)
        report = run(fn, *qkv(), keep)
    assert expected[:, :, 3].isnan().all()
    torch.testing.assert_close(report.output, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


# --- negative cases -----------------------------------------------------------------------------------

def test_softmax_over_dim_1_not_rewritten():
    def fn(q, k, v):
        return (q @ k.mT * D ** -0.5).softmax(1) @ v

    check_not_rewritten(fn, *qkv(), reason="softmax over dim 1")


def test_scores_also_returned_not_rewritten():
    def fn(q, k, v):
        scores = q @ k.mT * D ** -0.5
        return scores.softmax(-1) @ v, scores

    report = check_not_rewritten(fn, *qkv(), reason="also used by")
    assert "scores" in report.sites[0].reason


def test_probabilities_also_returned_not_rewritten():
    def fn(q, k, v):
        probs = (q @ k.mT * D ** -0.5).softmax(-1)
        return probs @ v, probs

    report = check_not_rewritten(fn, *qkv(), reason="probabilities")
    assert "2 users" in report.sites[0].reason


def test_probabilities_used_twice_not_rewritten():
    def fn(q, k, v):
        probs = (q @ k.mT * D ** -0.5).softmax(-1)
        return probs @ v + probs.sum(-1, keepdim=True)

    check_not_rewritten(fn, *qkv(), reason="2 users")


def test_scale_after_softmax_is_exact_either_way():
    def fn(q, k, v):
        return ((q @ k.mT).softmax(-1) * 0.5) @ v

    q, k, v = qkv()
    with torch.no_grad():
        expected = fn(q, k, v)
        report = attncompiler.explain(fn, q, k, v, options=OPTIONS)
    (site,) = report.sites
    if not site.rewritten:
        assert "not a P·V product" in site.reason, site.reason
    torch.testing.assert_close(report.output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sq,sk", [(S, S), (5, SK), (SK, SK)])
def test_sdpa_causal_rewritten_with_top_left_alignment(sq, sk):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = rand(B, H, sq, D, seed=11)
    k, v = rand(B, H, sk, D, seed=12), rand(B, H, sk, D, seed=13)
    report = check_exact(fn, q, k, v)
    assert "(le k q)" in str(report.sites[0].summary), report.table()


def test_sdpa_enable_gqa_rewritten_without_repeating_kv():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    q = rand(B, 4, S, D, seed=21)
    k, v = rand(B, 2, SK, D, seed=22), rand(B, 2, SK, D, seed=23)
    report = check_exact(fn, q, k, v)
    assert report.sites[0].summary["group"] == 2, report.table()


def test_sdpa_dropout_not_rewritten():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0), \
            F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    q, k, v = qkv()
    report = attncompiler.explain(fn, q, k, v, options=OPTIONS)
    reasons = [s.reason for s in report.sites if not s.rewritten]
    assert len(report.sites) == 2 and report.num_rewritten == 1, str(report)
    assert any("dropout_p=0.5" in r for r in reasons), reasons


def test_softmax_not_fed_by_a_matmul_not_rewritten():
    def fn(q, k, v):
        scores = (q @ k.mT).exp()
        return scores.softmax(-1) @ v

    check_not_rewritten(fn, *qkv(), reason="not a matmul")


def test_plain_softmax_not_attention():
    def fn(x):
        return x.softmax(-1) * 2

    check_not_rewritten(fn, rand(B, S, SK), reason="not a matmul")


@pytest.mark.parametrize("bias_rows", [B * H, 1], ids=["per-head bias", "shared bias"])
def test_baddbmm_scores_viewed_per_head_with_a_flat_bias(bias_rows):
    """Bloom's form: flat [B·H, S, S] scores from baddbmm with a bias, viewed as [B, H, S, S] for the
    mask, viewed back for the P·V bmm; the flat bias is read in the split space."""
    bias = rand(bias_rows, 1, SK, seed=7)
    mask = causal_bool().logical_not() * torch.finfo(torch.float32).min

    def fn(q, k, v, bias, mask):
        q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
        scores = bias.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=D ** -0.5)
        probs = (scores.view(B, H, S, -1) + mask).softmax(-1)
        return torch.bmm(probs.view(B * H, S, -1), v3)

    check_exact(fn, *qkv(), bias, mask)
