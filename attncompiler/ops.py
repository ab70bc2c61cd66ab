"""The ``attncompiler::attention`` custom op: dispatch to a kernel, fake implementation, autograd.

``attention(q, k, v, operands, program, kernel, zero_empty_rows)`` computes
``softmax(program(q·kᵀ, operands)) · v`` where ``program`` is a score program in text form
(see :mod:`attncompiler.passes.score_mod`). ``kernel`` is "triton", "reference" or "auto".
A query row with no visible key gives NaN as ``torch.softmax`` does, or zeros with
``zero_empty_rows`` as ``scaled_dot_product_attention`` does.
Every run is counted in :data:`KERNEL_CALLS` by the name of what actually ran.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from .options import triton_interpret
from .reference import attention_reference
from .spec import output_shape

log = logging.getLogger("attncompiler")

KERNEL_CALLS: Counter = Counter()
_failed_programs: set[str] = set()


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
              program: str, kernel: str, zero_empty_rows: bool = False) -> torch.Tensor:
    """softmax(program(q·kᵀ, operands))·v. q ``[..., Sq, D]``, k ``[..., Sk, D]``, v ``[..., Sk, Dv]``."""
    if resolve_kernel(kernel, q.device, q.dtype) == "triton" and program not in _failed_programs:
        from attncompiler.codegen.flash import flash_forward
        from attncompiler.tuner import select_config

        try:
            out = flash_forward(q, k, v, list(operands), program, interpret=q.device.type == "cpu",
                                zero_empty_rows=zero_empty_rows,
                                config=select_config(q, k, v, operands, program))
        except Exception as e:  # a kernel that cannot compile or launch: keep the model running
            _failed_programs.add(program)
            log.warning("attncompiler: Triton kernel failed for %s (%s: %s); using the reference",
                        program, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        else:
            KERNEL_CALLS["triton"] += 1
            return out
    KERNEL_CALLS["reference"] += 1
    return attention_reference(q, k, v, list(operands), program, zero_empty_rows)


@attention.register_fake
def _(q, k, v, operands, program, kernel, zero_empty_rows=False):
    return q.new_empty(output_shape(q.shape, k.shape, v.shape), dtype=v.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, operands, program, _, zero_empty_rows = inputs
    ctx.program = program
    ctx.zero_empty_rows = zero_empty_rows
    ctx.num_operands = len(operands)
    ctx.save_for_backward(q, k, v, *operands)


def _backward(ctx, grad_out):
    """Gradients by differentiating the reference (recomputes the scores)."""
    q, k, v, *operands = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in (q, k, v, *operands)]
        out = attention_reference(*inputs[:3], inputs[3:], ctx.program, ctx.zero_empty_rows)
        wrt = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    result = [next(grads) if t.requires_grad else None for t in inputs]
    result = [g.to(t.dtype) if g is not None else None for g, t in zip(result, inputs)]
    return result[0], result[1], result[2], result[3:], None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
