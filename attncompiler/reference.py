"""PyTorch reference attention: the oracle for tests and the path for devices without a kernel."""

from __future__ import annotations

import functools

import torch

from attncompiler.passes.score_mod import evaluate, parse
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
