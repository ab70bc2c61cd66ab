"""The first Triton backward of each kind is checked against the reference; a wrong one is not used."""

import logging

import pytest
import torch

import attncompiler.codegen.flash_bwd as flash_bwd
from attncompiler import backward_check
from attncompiler.ops import KERNEL_CALLS, attention
from attncompiler.reference import attention_backward_reference

CAUSAL = "(where (le k q) (mul s 0.125) -inf)"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(backward_check, "_verdicts", {})
    monkeypatch.setattr(backward_check, "applies", lambda device: True)
    KERNEL_CALLS.clear()


def inputs(hq=4, hk=2, sq=37, sk=45, d=64, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, s, d, generator=g).to(dtype) for h, s in ((hq, sq), (hk, sk), (hk, sk)))
    return q, k, v, torch.randn(2, hq, sq, d, generator=g).to(dtype)


def test_agreeing_gradients_are_trusted():
    q, k, v, grad_out = inputs()
    grads = attention_backward_reference(q, k, v, grad_out, [], CAUSAL)
    kind = backward_check.kind_of(q, k, v, CAUSAL)
    assert backward_check.check(kind, q, k, v, grad_out, [], CAUSAL, False, grads)
    assert backward_check.trusted(kind) is True


def test_wrong_gradients_are_rejected_with_a_warning(caplog):
    q, k, v, grad_out = inputs()
    dq, dk, dv = attention_backward_reference(q, k, v, grad_out, [], CAUSAL)
    kind = backward_check.kind_of(q, k, v, CAUSAL)
    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        assert not backward_check.check(kind, q, k, v, grad_out, [], CAUSAL, False, (dq, dk, dv * 1.05))
    assert backward_check.trusted(kind) is False
    assert "off in dv" in caplog.text


def test_op_falls_back_to_the_reference_when_the_kernel_disagrees(monkeypatch):
    real = flash_bwd.flash_backward

    def off_by_a_bit(*args, **kwargs):
        dq, dk, dv = real(*args, **kwargs)
        return dq, dk * 1.1, dv

    monkeypatch.setattr(flash_bwd, "flash_backward", off_by_a_bit)
    q, k, v, grad_out = inputs(dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for _ in range(2):
        out, _ = attention(*leaves, [], CAUSAL, "triton")
        got = torch.autograd.grad(out, leaves, grad_out)
        expected = attention_backward_reference(q, k, v, grad_out, [], CAUSAL)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    assert KERNEL_CALLS["reference_bwd"] == 2 and KERNEL_CALLS["triton_bwd"] == 0


def test_large_problems_leave_the_verdict_open(monkeypatch):
    monkeypatch.setattr(backward_check, "MAX_CHECKED_SCORES", 10)
    q, k, v, grad_out = inputs()
    grads = attention_backward_reference(q, k, v, grad_out, [], CAUSAL)
    kind = backward_check.kind_of(q, k, v, CAUSAL)
    assert backward_check.check(kind, q, k, v, grad_out, [], CAUSAL, False, grads)
    assert backward_check.trusted(kind) is None
