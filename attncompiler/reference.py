"""PyTorch reference attention: the oracle for tests and the path for devices without a kernel."""

from __future__ import annotations

import torch

from attncompiler.passes.score_mod import evaluate, parse


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: list[torch.Tensor],
                        program: str, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(program(q·kᵀ, operands)) · v computed in ``compute_dtype``, returned in v's dtype.

    q ``[..., Sq, D]``, k ``[..., Sk, D]``, v ``[..., Sk, Dv]``; operands broadcast to ``[..., Sq, Sk]``.
    """
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1))
    scores = evaluate(parse(program), scores, operands)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(compute_dtype)).to(v.dtype)
