"""The ``attncompiler::attention`` custom op: dispatch to a kernel, fake implementation, autograd.

``attention(q, k, v, operands, program, kernel, zero_empty_rows)`` computes
``softmax(program(q·kᵀ, operands)) · v`` where ``program`` is a score program in text form
(see :mod:`attncompiler.passes.score_mod`). ``kernel`` is "triton", "reference" or "auto".
A query row with no visible key gives NaN as ``torch.softmax`` does, or zeros with
``zero_empty_rows`` as ``scaled_dot_product_attention`` does. It returns ``(out, lse)``; the row
logsumexp ``lse`` lets ``attncompiler::attention_backward`` run the generated Triton backward.

Where tuning found an SDPA backend faster than every Triton config for the call's shape bucket,
and SDPA computes the site's function (:func:`attncompiler.tuner.sdpa_dispatch`), the forward runs
``scaled_dot_product_attention`` under that backend instead. It writes no logsumexp (``lse`` is
NaN); the backward of such a forward recomputes ``out`` and ``lse`` with the Triton forward first.

Every run is counted in :data:`KERNEL_CALLS` by the name of what actually ran: "triton",
"reference" or the SDPA backend ("sdpa-cudnn", ...) forward; "triton_bwd" or "reference_bwd"
backward, and "triton_recompute" for each logsumexp a backward recomputed.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter

import torch

from . import backward_check
from .failures import failure_text
from .options import triton_interpret
from .reference import attention_backward_reference, attention_reference, attention_reference_with_lse
from .spec import output_shape

log = logging.getLogger("attncompiler")

KERNEL_CALLS: Counter = Counter()
_failed_programs: set[str] = set()
_failed_backward_programs: set[str] = set()
BACKWARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the saved lse is fp32


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """What ``kernel`` means for ``dtype`` tensors on ``device``: "triton" or "reference".

    The Triton interpreter cannot compute bf16 dot products (it multiplies the raw bits), so on
    CPU bf16 runs the reference.
    """
    if kernel == "reference":
        return "reference"
    interpretable = device.type == "cpu" and triton_interpret() and dtype != torch.bfloat16
    runnable = triton_available() and (device.type == "cuda" or interpretable)
    if kernel == "triton" and not runnable:
        raise RuntimeError(f"the Triton attention kernel cannot run on {dtype} {device.type} tensors here "
                           "(on CPU it needs TRITON_INTERPRET=1 and fp16 or fp32)")
    return "triton" if runnable else "reference"


@torch.library.custom_op("attncompiler::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: list[torch.Tensor],
              program: str, kernel: str, zero_empty_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: softmax(program(q·kᵀ, operands))·v and the float32 row logsumexp of the scores.

    q ``[..., Sq, D]``, k ``[..., Sk, D]``, v ``[..., Sk, Dv]``; out ``[..., Sq, Dv]``, lse ``[..., Sq]``.
    """
    if resolve_kernel(kernel, q.device, q.dtype) == "triton" and program not in _failed_programs:
        from attncompiler.codegen.flash import flash_forward
        from attncompiler.tuner import sdpa_attention, sdpa_failed, select

        config, backend = select(q, k, v, operands, program, zero_empty_rows)
        if backend is not None:
            try:
                # Contiguous, as the fake kernel promises (flash returns a [B, S, H, D]-major view).
                out = sdpa_attention(q, k, v, operands, program, backend).to(v.dtype).contiguous()
            except Exception as e:  # a backend without a kernel for this call's exact shape: run Triton
                sdpa_failed(q, k, v, operands, program, zero_empty_rows, e)
            else:
                KERNEL_CALLS[backend] += 1
                return out, torch.full(out.shape[:-1], math.nan, dtype=torch.float32, device=out.device)
        try:
            out, lse = flash_forward(q, k, v, list(operands), program, interpret=q.device.type == "cpu",
                                     zero_empty_rows=zero_empty_rows, config=config)
        except Exception as e:  # a kernel that cannot compile or launch: keep the model running
            _failed_programs.add(program)
            log.warning("attncompiler: Triton kernel failed for %s (%s); using the reference", program,
                        failure_text(e))
        else:
            KERNEL_CALLS["triton"] += 1
            return out, lse
    KERNEL_CALLS["reference"] += 1
    out, lse = attention_reference_with_lse(q, k, v, list(operands), program, zero_empty_rows)
    return out, lse.float()


@attention.register_fake
def _(q, k, v, operands, program, kernel, zero_empty_rows=False):
    shape = output_shape(q.shape, k.shape, v.shape)
    return q.new_empty(shape, dtype=v.dtype), q.new_empty(shape[:-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, operands, program, kernel, zero_empty_rows = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.program = program
    ctx.kernel = resolve_kernel(kernel, q.device, q.dtype)
    ctx.zero_empty_rows = zero_empty_rows
    ctx.save_for_backward(q, k, v, out, lse, *operands)


def _backward(ctx, grad_out, _grad_lse):
    """The generated Triton backward (through :func:`attention_backward`) where the forward could run
    Triton on fp16, bf16 or fp32 inputs, no operand needs a gradient (a learned bias needs dBias)
    and the program has derivative rules; otherwise autograd of the reference."""
    q, k, v, out, lse, *operands = ctx.saved_tensors
    if (ctx.kernel == "triton" and q.dtype in BACKWARD_DTYPES and not any(ctx.needs_input_grad[3])
            and _differentiable(ctx.program)):
        dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, operands, ctx.program, ctx.zero_empty_rows)
        grads = (dq, dk, dv, [None] * len(operands))
    else:
        KERNEL_CALLS["reference_bwd"] += 1
        grads = _reference_backward(q, k, v, grad_out, operands, ctx.program, ctx.zero_empty_rows)
    # One gradient per argument the caller passed: the dispatcher drops arguments left at their default.
    return (*grads, None, None, None)[:len(ctx.needs_input_grad)]


@functools.lru_cache(maxsize=None)
def _differentiable(program: str) -> bool:
    from attncompiler.passes.score_mod import parse, score_derivative

    try:
        score_derivative(parse(program))
    except ValueError as e:
        log.info("attncompiler: no Triton backward for %s (%s); using the reference", program, e)
        return False
    return True


@torch.library.custom_op("attncompiler::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       grad_out: torch.Tensor, operands: list[torch.Tensor], program: str,
                       zero_empty_rows: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention` from its ``(out, lse)``, by the generated Triton backward
    with the bucket's tuned config (the reference where that cannot compile or launch, or, on a GPU,
    where its first result disagreed with the reference: see :mod:`attncompiler.backward_check`).
    Operands get no gradient. Where SDPA ran the forward, ``out`` and ``lse`` are recomputed by the
    Triton forward first."""
    kind = backward_check.kind_of(q, k, v, program) if backward_check.applies(q.device) else None
    if program not in _failed_backward_programs and (kind is None or backward_check.trusted(kind) is not False):
        from attncompiler.codegen.flash import flash_forward
        from attncompiler.codegen.flash_bwd import flash_backward
        from attncompiler.tuner import bucket_key, forward_ran_sdpa, select_bwd_config, tuning_cache

        interpret = q.device.type == "cpu"
        try:
            if forward_ran_sdpa(q, k, v, operands, program, zero_empty_rows):
                entry = tuning_cache(q.device).lookup(bucket_key(q, k, v, operands, program))
                out, lse = flash_forward(q, k, v, list(operands), program, interpret=interpret,
                                         zero_empty_rows=zero_empty_rows, config=entry.config if entry else None)
                KERNEL_CALLS["triton_recompute"] += 1
            config = select_bwd_config(q, k, v, operands, program, zero_empty_rows)
            grads = flash_backward(q, k, v, out, lse, grad_out, list(operands), program, zero_empty_rows,
                                   config=config, interpret=interpret)
        except Exception as e:  # a kernel that cannot compile or launch: keep training
            _failed_backward_programs.add(program)
            log.warning("attncompiler: Triton backward failed for %s (%s); using the reference", program,
                        failure_text(e))
        else:
            if kind is None or backward_check.trusted(kind) or backward_check.check(
                    kind, q, k, v, grad_out, list(operands), program, zero_empty_rows, grads):
                KERNEL_CALLS["triton_bwd"] += 1
                return grads
    KERNEL_CALLS["reference_bwd"] += 1
    return attention_backward_reference(q, k, v, grad_out, list(operands), program, zero_empty_rows)


@attention_backward.register_fake
def _(q, k, v, out, lse, grad_out, operands, program, zero_empty_rows):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _reference_backward(q, k, v, grad_out, operands, program, zero_empty_rows):
    """``(dq, dk, dv, operand grads)`` by differentiating the reference (recomputes the scores)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in (q, k, v, *operands)]
        out = attention_reference(*inputs[:3], inputs[3:], program, zero_empty_rows)
        wrt = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    result = [next(grads) if t.requires_grad else None for t in inputs]
    result = [g.to(t.dtype) if g is not None else None for g, t in zip(result, inputs)]
    return result[0], result[1], result[2], result[3:]


attention.register_autograd(_backward, setup_context=_setup_context)
