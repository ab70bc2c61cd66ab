"""PyTorch reference attention: the oracle for tests and the path for devices without a kernel."""

from __future__ import annotations

import functools

import torch

from attncompiler.passes.score_mod import evaluate, parse, score_derivative
from attncompiler.spec import align, ungroup


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: list[torch.Tensor],
                        program: str, zero_empty_rows: bool = False,
                        compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(program(q·kᵀ, operands)) · v computed in ``compute_dtype``, returned in v's dtype.

    A query row whose scores are all ``-inf`` gives NaN, as ``torch.softmax`` does, or zeros with
    ``zero_empty_rows`` (the rule of ``scaled_dot_product_attention``).

    ``compute_dtype`` defaults to float32, or to the inputs' dtype where that is wider (float64).

    q ``[..., Sq, D]``, k ``[..., Sk, D]``, v ``[..., Sk, Dv]`` with grouped heads as in
    :mod:`attncompiler.spec`; operands broadcast to ``[..., Sq, Sk]``.
    """
    return attention_reference_with_lse(q, k, v, operands, program, zero_empty_rows, compute_dtype)[0]


def attention_reference_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: list[torch.Tensor],
                                 program: str, zero_empty_rows: bool = False,
                                 compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: :func:`attention_reference` and the row logsumexp ``[..., Sq]`` of the program's
    scores in ``compute_dtype`` (``-inf`` for a row with no visible key)."""
    if compute_dtype is None:
        compute_dtype = functools.reduce(torch.promote_types, (q.dtype, k.dtype, v.dtype), torch.float32)
    q, k, v, group = align(q, k, v)
    k, v = ungroup(k, group), ungroup(v, group)
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1))
    scores = evaluate(parse(program), scores, operands)
    probs = torch.softmax(scores, dim=-1)
    if zero_empty_rows:
        probs = probs.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    return torch.matmul(probs, v.to(compute_dtype)).to(v.dtype), torch.logsumexp(scores, dim=-1)


def attention_backward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                                 operands: list[torch.Tensor], program: str,
                                 zero_empty_rows: bool = False, compute_dtype: torch.dtype | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_reference` in closed form (no autograd), operands held
    constant: ``dS = P ∘ (dO·Vᵀ − rowsum(P ∘ dO·Vᵀ)) ∘ ∂program/∂s``. Computed in ``compute_dtype``
    (default float32, or the inputs' dtype where wider), returned in the inputs' shapes and dtypes."""
    if compute_dtype is None:
        compute_dtype = functools.reduce(torch.promote_types, (q.dtype, k.dtype, v.dtype), torch.float32)
    expr = parse(program)
    qa, ka, va, group = align(q, k, v)
    qa, ka, va = qa.to(compute_dtype), ungroup(ka, group).to(compute_dtype), ungroup(va, group).to(compute_dtype)
    raw = torch.matmul(qa, ka.transpose(-2, -1))
    scores = evaluate(expr, raw, operands)
    probs = torch.softmax(scores, dim=-1)
    if zero_empty_rows:
        probs = probs.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    grad_out = grad_out.to(compute_dtype)
    grad_probs = torch.matmul(grad_out, va.transpose(-2, -1))
    grad_raw = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
    grad_raw = grad_raw * evaluate(score_derivative(expr), raw, operands)
    dq = torch.matmul(grad_raw, ka)
    dk = _sum_groups(torch.matmul(grad_raw.transpose(-2, -1), qa), group)
    dv = _sum_groups(torch.matmul(probs.transpose(-2, -1), grad_out), group)
    return tuple(g.sum_to_size(t.shape).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


def _sum_groups(t: torch.Tensor, group: int) -> torch.Tensor:
    """Sum the ``group`` consecutive heads that share a key/value head (the adjoint of ``ungroup``)."""
    return t if group == 1 else t.unflatten(-3, (t.shape[-3] // group, group)).sum(-3)
