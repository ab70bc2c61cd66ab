"""First-use check of the Triton backward on a GPU: its gradients against the reference, once per kind.

On CUDA the first Triton backward of each (program, dtype, head dims, GQA group) is compared on one
batch element and one key/value head group with float64 gradients of the reference, and must be
within a few times the error of the same closed-form gradients computed in the inputs' dtype. A kind that fails runs the reference
backward from then on, with one warning: a miscompiled kernel never trains a model silently.
"""

from __future__ import annotations

import logging

import torch

from .reference import attention_backward_reference
from .spec import align

log = logging.getLogger("attncompiler")

MAX_CHECKED_SCORES = 1 << 27  # larger problems are checked on a later, smaller call
TOLERANCE = 3.0               # times PyTorch's own error

_verdicts: dict[tuple, bool] = {}


def applies(device: torch.device) -> bool:
    """Compiled kernels are checked; the CPU interpreter runs the kernel's source as written."""
    return device.type == "cuda"


def kind_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, program: str) -> tuple:
    _, _, _, group = align(q, k, v)
    return program, q.dtype, q.shape[-1], v.shape[-1], group


def trusted(kind: tuple) -> bool | None:
    """True or False once the kind was checked, None before."""
    return _verdicts.get(kind)


def check(kind: tuple, q, k, v, grad_out, operands, program: str, zero_empty_rows: bool,
          grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
    """Compare ``grads`` (dq, dk, dv of the Triton backward) with the reference on a slice and
    remember the verdict for ``kind``; True when they agree, or when the slice is too large to
    check now (the verdict is then left open)."""
    sliced = _one_group(q, k, v, grad_out, operands, grads)
    if sliced is None:
        return True
    q, k, v, grad_out, operands, grads = sliced
    if q.shape[-2] * k.shape[-2] * q[..., 0, 0].numel() > MAX_CHECKED_SCORES:
        return True
    exact = attention_backward_reference(q.double(), k.double(), v.double(), grad_out.double(),
                                         [t.double() if t.is_floating_point() else t for t in operands],
                                         program, zero_empty_rows)
    own = attention_backward_reference(q, k, v, grad_out, operands, program, zero_empty_rows, compute_dtype=q.dtype)
    ok = True
    for name, ours, theirs, truth in zip(("dq", "dk", "dv"), grads, own, exact):
        error, allowed = _error(ours, truth), TOLERANCE * _error(theirs, truth) + 1e-6 * truth.abs().max().item()
        if not error <= allowed:
            log.warning("attncompiler: the Triton backward for %s (%s) is off in %s by %.3g (PyTorch's own "
                        "error %.3g); this kind uses the reference backward from now on",
                        program, q.dtype, name, error, allowed / TOLERANCE)
            ok = False
            break
    _verdicts[kind] = ok
    return ok


def _error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item() if truth.numel() else 0.0


def _one_group(q, k, v, grad_out, operands, grads):
    """Batch element 0 and the query heads sharing key/value head 0, for ``[B, H, S, D]`` inputs."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return None
    group = q.shape[1] // k.shape[1] if k.shape[1] > 1 else q.shape[1]

    def cut(t: torch.Tensor, heads: int) -> torch.Tensor:
        if t.dim() >= 4 and t.shape[-4] > 1:
            t = t[..., :1, :, :, :]
        if t.dim() >= 3 and t.shape[-3] > 1:
            t = t[..., :heads, :, :]
        return t

    dq, dk, dv = grads
    return (cut(q, group), cut(k, 1), cut(v, 1), cut(grad_out, group), [cut(t, group) for t in operands],
            (cut(dq, group), cut(dk, 1), cut(dv, 1)))
