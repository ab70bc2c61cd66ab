"""The backend as users meet it: entry point, inner compilers, options, safety, dynamic shapes,
training, the printed report and :func:`attncompiler.collect`."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attncompiler
from attncompiler import OptionError

D = 8
OPTIONS = {"inner": "eager"}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(seq=16, seq_k=None, b=2, h=2, d=D):
    seq_k = seq if seq_k is None else seq_k
    return rand(b, h, seq, d, seed=1), rand(b, h, seq_k, d, seed=2), rand(b, h, seq_k, d, seed=3)


def attention(q, k, v):
    return (q @ k.mT / math.sqrt(D)).softmax(-1) @ v


def assert_exact(out, expected):
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def options_error(excinfo) -> OptionError | None:
    """The OptionError an exception is or wraps (Dynamo wraps backend errors)."""
    e = excinfo.value
    while e is not None and not isinstance(e, OptionError):
        e = e.__cause__ or getattr(e, "inner_exception", None)
    return e


# --- entry point and inner compilers --------------------------------------------------------------

def test_entry_point_in_fresh_process_without_import(tmp_path):
    script = textwrap.dedent("""
        import sys
        import torch
        assert "attncompiler" not in sys.modules
        f = torch.compile(lambda q, k, v: (q @ k.mT).softmax(-1) @ v, backend="attncompiler",
                          options={"inner": "eager"})
        q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
        out = f(q, k, v)
        torch.testing.assert_close(out, (q @ k.mT).softmax(-1) @ v, rtol=1e-5, atol=1e-5)
        import attncompiler
        print("KERNEL_CALLS", dict(attncompiler.KERNEL_CALLS))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATTNCOMPILER_CACHE_DIR": str(tmp_path)}
    env.pop("ATTNCOMPILER_KERNEL", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "KERNEL_CALLS {'triton': 1}" in result.stdout, result.stdout
    assert list((tmp_path / "kernels").glob("flash_fwd_*.py")), "the generated kernel was not written"


def test_default_inner_compiler_is_inductor(kernel_calls):
    def fn(q, k, v, bias):
        return torch.relu(F.softmax(q @ k.transpose(-2, -1) * D ** -0.5 + bias, dim=-1) @ v) * 2

    q, k, v = qkv()
    bias = rand(1, 1, 16, 16, seed=4)
    compiled = torch.compile(fn, backend="attncompiler")
    with attncompiler.collect() as report:
        out = compiled(q, k, v, bias)
    assert report.num_rewritten == 1, str(report)
    assert "attncompiler.attention" in report.graph_after
    assert kernel_calls["triton"] == 1
    assert_exact(out, fn(q, k, v, bias))
    assert torch._dynamo.utils.counters["inductor"], "Inductor did not compile the graph"


# --- options ---------------------------------------------------------------------------------------

def test_unknown_option_lists_valid_keys():
    compiled = torch.compile(attention, backend="attncompiler", options={"inner": "eager", "kernal": "triton"})
    with pytest.raises(Exception) as excinfo:
        compiled(*qkv())
    error = options_error(excinfo)
    assert error is not None, excinfo.value
    message = str(error)
    assert "kernal" in message
    for key in ("inductor", "inner", "kernel", "rewrite"):
        assert key in message, message


def test_explain_validates_before_compiling():
    with pytest.raises(OptionError, match="valid keys are"):
        attncompiler.explain(attention, *qkv(), options={"inner": "eager", "bogus": 1})


@pytest.mark.parametrize("options, message", [
    ({"kernel": "cuda"}, "'kernel' must be one of"),
    ({"inner": "aot_eager"}, "'inner' must be one of"),
    ({"rewrite": "yes"}, "'rewrite' must be True or False"),
    ({"inductor": ["max_autotune"]}, "'inductor' must be a dict"),
])
def test_bad_option_value_raises(options, message):
    with pytest.raises(OptionError, match=message):
        attncompiler.Options.resolve(options)
    compiled = torch.compile(attention, backend="attncompiler", options=options)
    with pytest.raises(Exception) as excinfo:
        compiled(*qkv())
    assert options_error(excinfo) is not None and re.search(message, str(options_error(excinfo)))


def test_options_must_be_a_dict():
    with pytest.raises(OptionError, match="must be a dict"):
        attncompiler.Options.resolve([("inner", "eager")])


def test_bad_mode_raises():
    compiled = torch.compile(attention, backend="attncompiler", mode="fastest")
    with pytest.raises(Exception) as excinfo:
        compiled(*qkv())
    error = options_error(excinfo)
    assert error is not None and "fastest" in str(error) and "max-autotune" in str(error), excinfo.value


def test_good_mode_accepted():
    opts = attncompiler.Options.resolve(None, "max-autotune-no-cudagraphs")
    assert opts.mode == "max-autotune-no-cudagraphs" and opts.inner == "inductor"


def test_bad_environment_value_raises(monkeypatch):
    monkeypatch.setenv("ATTNCOMPILER_KERNEL", "cuda")
    with pytest.raises(OptionError, match="'kernel' must be one of"):
        attncompiler.Options.resolve({})
    monkeypatch.setenv("ATTNCOMPILER_KERNEL", "auto")
    monkeypatch.setenv("ATTNCOMPILER_REWRITE", "maybe")
    with pytest.raises(OptionError, match="ATTNCOMPILER_REWRITE"):
        attncompiler.Options.resolve({})


def test_env_kernel_reference(monkeypatch, kernel_calls):
    monkeypatch.setenv("ATTNCOMPILER_KERNEL", "reference")
    q, k, v = qkv()
    report = attncompiler.explain(attention, q, k, v, options=OPTIONS)
    (site,) = report.sites
    assert site.rewritten and site.kernel == "reference", site
    assert kernel_calls["reference"] == 1 and kernel_calls["triton"] == 0, kernel_calls
    assert_exact(report.output, attention(q, k, v))


def test_option_beats_environment(monkeypatch, kernel_calls):
    monkeypatch.setenv("ATTNCOMPILER_KERNEL", "reference")
    report = attncompiler.explain(attention, *qkv(), options={"inner": "eager", "kernel": "triton"})
    assert report.sites[0].kernel.startswith("triton:")
    assert kernel_calls["triton"] == 1 and kernel_calls["reference"] == 0


def test_env_inner_and_rewrite(monkeypatch):
    monkeypatch.setenv("ATTNCOMPILER_INNER", "Eager ")
    monkeypatch.setenv("ATTNCOMPILER_REWRITE", "0")
    opts = attncompiler.Options.resolve(None)
    assert opts.inner == "eager" and opts.rewrite is False


def test_rewrite_false_reports_but_rewrites_nothing(kernel_calls):
    def fn(q, k, v):
        return attention(q, k, v) + F.scaled_dot_product_attention(q, k, v)

    q, k, v = qkv()
    report = attncompiler.explain(fn, q, k, v, options={"inner": "eager", "rewrite": False})
    assert len(report.sites) == 2 and report.num_rewritten == 0, str(report)
    for site in report.sites:
        assert "rewrite=False" in site.reason and site.kernel is None
        assert site.summary["q"] == "[2, 2, 16, 8]"  # matched and described all the same
    assert "attncompiler.attention" not in report.graph_after
    assert report.graph_after == report.graph_before
    assert sum(kernel_calls.values()) == 0
    assert_exact(report.output, fn(q, k, v))


# --- per-site safety -------------------------------------------------------------------------------

def test_codegen_failure_leaves_site_as_it_was(monkeypatch, caplog, kernel_calls):
    import attncompiler.codegen.flash as flash

    def broken(program, tma=False):
        raise RuntimeError("codegen exploded")

    monkeypatch.setattr(flash, "load_kernel", broken)
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        report = attncompiler.explain(attention, q, k, v, options=OPTIONS)
    (site,) = report.sites
    assert not site.rewritten and site.kernel is None
    assert "RuntimeError" in site.reason and "codegen exploded" in site.reason
    assert report.graph_after == report.graph_before
    assert sum(kernel_calls.values()) == 0
    assert_exact(report.output, attention(q, k, v))
    warnings = [r for r in caplog.records if r.name == "attncompiler" and r.levelno == logging.WARNING]
    assert any("codegen exploded" in r.getMessage() for r in warnings), caplog.text


def test_failure_midway_through_surgery_removes_inserted_nodes(monkeypatch, caplog, kernel_calls):
    """q/k/v permutes are inserted before the op; a failure on the op must take them out again."""
    from attncompiler.passes import rewrite

    real = rewrite._set_example_value

    def fail_on_op(node):
        if node.target is torch.ops.attncompiler.attention.default:
            raise ValueError("no fake value")
        real(node)

    monkeypatch.setattr(rewrite, "_set_example_value", fail_on_op)

    def fn(q, k, v):  # [B, S, H, D] inputs: the rewrite must permute all three
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    q, k, v = (t.transpose(1, 2) for t in qkv())
    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        report = attncompiler.explain(fn, q, k, v, options=OPTIONS)
    (site,) = report.sites
    assert not site.rewritten and site.kernel is None and "no fake value" in site.reason
    assert report.graph_after == report.graph_before
    assert sum(kernel_calls.values()) == 0
    assert_exact(report.output, fn(q, k, v))
    assert "no fake value" in caplog.text


def test_one_failing_site_does_not_stop_the_others(monkeypatch, kernel_calls):
    import attncompiler.codegen.flash as flash

    real = flash.load_kernel

    def picky(program, tma=False):
        if "0.5" in str(program):
            raise RuntimeError("not this one")
        return real(program, tma)

    monkeypatch.setattr(flash, "load_kernel", picky)

    def fn(q, k, v):
        return (q @ k.mT * 0.5).softmax(-1) @ v + (q @ k.mT * 0.25).softmax(-1) @ v

    q, k, v = qkv()
    report = attncompiler.explain(fn, q, k, v, options=OPTIONS)
    assert [s.rewritten for s in report.sites] == [False, True], str(report)
    assert "not this one" in report.sites[0].reason
    assert kernel_calls["triton"] == 1
    assert_exact(report.output, fn(q, k, v))


def test_rejected_replacement_reports_no_kernel(monkeypatch):
    """A replacement refused late (its fake output disagrees with the region) names no kernel."""
    from attncompiler.passes import rewrite

    real = rewrite._set_example_value

    def wrong_dtype(node):
        real(node)
        if node.target is torch.ops.attncompiler.attention.default:
            node.meta["example_value"] = tuple(t.to(torch.float64) for t in node.meta["example_value"])

    monkeypatch.setattr(rewrite, "_set_example_value", wrong_dtype)
    q, k, v = qkv()
    report = attncompiler.explain(attention, q, k, v, options=OPTIONS)
    (site,) = report.sites
    assert not site.rewritten and "replacement would give torch.float64" in site.reason, site
    assert site.kernel is None, site
    assert report.graph_after == report.graph_before
    assert_exact(report.output, attention(q, k, v))


# --- dynamic shapes --------------------------------------------------------------------------------

def test_dynamic_sequence_lengths_compile_once(kernel_calls):
    def fn(q, k, v, bias):
        return F.softmax(q @ k.transpose(-2, -1) * 0.35 + bias, dim=-1) @ v

    compiled = torch.compile(fn, backend="attncompiler", options=OPTIONS, dynamic=True)
    torch._dynamo.utils.counters.clear()
    with attncompiler.collect() as report:
        for seq in (16, 37, 64):
            q, k, v = qkv(seq)
            bias = rand(1, 1, seq, seq, seed=seq)
            assert_exact(compiled(q, k, v, bias), fn(q, k, v, bias))
    assert len(report.graphs) == 1, str(report)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert report.num_rewritten == 1, str(report)
    assert kernel_calls["triton"] == 3 and kernel_calls["reference"] == 0


def test_mark_dynamic_sequence_lengths(kernel_calls):
    compiled = torch.compile(attention, backend="attncompiler", options=OPTIONS)
    with attncompiler.collect() as report:
        for i, (sq, sk) in enumerate([(16, 24), (37, 5), (64, 64)]):
            q, k, v = qkv(sq, sk)
            if i == 0:
                torch._dynamo.mark_dynamic(q, 2)
                for t in (k, v):
                    torch._dynamo.mark_dynamic(t, 2)
            assert_exact(compiled(q, k, v), attention(q, k, v))
    assert len(report.graphs) == 1 and report.num_rewritten == 1, str(report)
    assert kernel_calls["triton"] == 3


def test_scale_from_a_dynamic_head_dim_is_left_alone_and_correct(kernel_calls):
    """With ``dynamic=True`` the head dim is symbolic, so ``/ sqrt(q.size(-1))`` is no constant."""
    def fn(q, k, v):
        return (q @ k.mT / math.sqrt(q.size(-1))).softmax(-1) @ v

    compiled = torch.compile(fn, backend="attncompiler", options=OPTIONS, dynamic=True)
    with attncompiler.collect() as report:
        for seq in (16, 37):
            q, k, v = qkv(seq)
            assert_exact(compiled(q, k, v), fn(q, k, v))
    (site,) = report.sites
    if not site.rewritten:
        assert "not a tensor or constant" in site.reason, site.reason
        assert sum(kernel_calls.values()) == 0


# --- training --------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = self.dropout(F.softmax(scores, dim=-1))
        return self.out((probs @ v).transpose(1, 2).reshape(b, s, -1))


def test_backward_matches_eager(kernel_calls):
    torch.manual_seed(0)
    model = Attention().train()
    x = rand(2, 16, 32, seed=5).requires_grad_()
    mask = torch.ones(16, 16, dtype=torch.bool).tril()

    def grads(m):
        m.zero_grad()
        x.grad = None
        loss = (m(x, mask) ** 2).sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]

    eager_loss, eager_grads = grads(model)
    compiled = torch.compile(model, backend="attncompiler", options=OPTIONS)
    with attncompiler.collect() as report:
        loss, compiled_grads = grads(compiled)
    assert report.num_rewritten == 1, str(report)
    assert kernel_calls["triton"] == 1
    assert_exact(loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- report and collect ----------------------------------------------------------------------------

def test_printed_report():
    def fn(q, k, v):
        return attention(q, k, v), (q @ k.mT).softmax(1)

    report = attncompiler.explain(fn, *qkv(), options=OPTIONS)
    text = str(report)
    assert text.startswith("attncompiler: 1 of 2 attention sites rewritten in 1 graph(s)"), text
    header = next(line for line in text.splitlines() if line.startswith("graph"))
    assert header.split() == ["graph", "node", "rewritten", "kernel", "what", "/", "why", "not"]
    assert re.search(r"--- graph \d+ after rewriting ---", text)
    assert "torch.ops.attncompiler.attention.default(" in text
    assert "scale=0.353553" in text and "softmax over dim 1" in text
    rows = report.table().splitlines()[2:]
    assert [row.split()[2] for row in rows] == ["yes", "no"]


def test_collect_across_graph_break(kernel_calls):
    def fn(q, k, v):
        a = attention(q, k, v)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(a, k, v)

    q, k, v = qkv()
    compiled = torch.compile(fn, backend="attncompiler", options=OPTIONS)
    with attncompiler.collect() as outer:
        with attncompiler.collect() as inner:
            out = compiled(q, k, v)
    assert len(outer.graphs) == 2 and len(outer.sites) == 2, str(outer)
    assert outer.num_rewritten == 2
    assert len({s.graph for s in outer.sites}) == 2
    assert [s.node for s in inner.sites] == [s.node for s in outer.sites]
    assert kernel_calls["triton"] == 2
    assert_exact(out, fn(q, k, v))

    torch.compile(attention, backend="attncompiler", options=OPTIONS)(q, k, v)  # outside: not collected
    assert len(outer.sites) == 2 and len(outer.graphs) == 2
