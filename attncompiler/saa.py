"""SAA, sparse-aggregate attention: attention that computes only some key blocks exactly.

Per query block and head, SAA routes (by default each query row against sampled keys of the key
blocks that the block's mean query shortlists), keeps the attention sinks, the diagonal blocks and
the best-scoring blocks exact, and lets every other visible key block enter the same softmax
through its centroids (see
:mod:`attncompiler.saa_routing` and :mod:`attncompiler.saa_reference`). It is approximate, so it
runs only where the user asked for it, and within an error budget (:mod:`attncompiler.saa_ops`).

SAA applies to score programs that are a plain scale, ``(mul s c)``, or a scale under a causal
mask, ``(where (le k q) (mul s c) -inf)`` (top-left aligned) or with the bound
``q + Sk - Sq`` (bottom-right aligned), in any equivalent spelling of the comparison. The masked
value may also be a sentinel such as ``finfo.min`` (``(add (mul s c) -3.4e38)``, as Hugging Face
masks give): it hides a key exactly as ``-inf`` does from every row that sees some key. A row that
sees none averages every key under a sentinel, which only happens bottom-right aligned with
``Sk < Sq``; such calls run dense attention (:meth:`SAAProgram.averages_empty_rows`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attncompiler.passes.score_mod import Binary, Const, Expr, Index, Score, Where, is_sentinel_fill_of, parse

from .options import triton_interpret
from .saa_config import SAAConfig
from .saa_reference import Centroids, saa_reference, select
from .saa_routing import BlockGeometry, RouterKernels, Selection
from .spec import align

if TYPE_CHECKING:
    from .saa_predictor import LayerPredictor


@dataclass(frozen=True)
class SAAProgram:
    """What SAA needs from a score program: the scale, the causal alignment and the kind of fill."""

    scale: float
    causal: bool
    bottom_right: bool = False
    sentinel_fill: bool = False  # masked scores are finfo.min-like, not -inf

    def key_offset(self, seq_q: int, seq_k: int) -> int:
        """Key ``j`` is visible to query ``i`` when ``j <= i + key_offset``."""
        return seq_k - seq_q if self.bottom_right else 0

    def averages_empty_rows(self, seq_q: int, seq_k: int) -> bool:
        """Whether some query sees no key and so, under a sentinel fill, averages every key (SAA cannot)."""
        return self.sentinel_fill and self.causal and self.key_offset(seq_q, seq_k) < 0


@dataclass(frozen=True)
class SAAStats:
    """What one SAA call computed: the number of exact key blocks of each (batch, head, query block)
    ``[B, H, num_m]`` and the allowed key blocks in all."""

    exact_counts: torch.Tensor
    allowed_blocks: int

    @property
    def exact_blocks(self) -> torch.Tensor:
        """Key blocks computed exactly, in all: a 0-d tensor (read it to synchronize)."""
        return self.exact_counts.sum()

    @property
    def density(self) -> float:
        """Fraction of the allowed key blocks computed exactly (1.0 is dense attention)."""
        return float(self.exact_blocks) / self.allowed_blocks if self.allowed_blocks else 1.0


def _scale(expr: Expr) -> float | None:
    if isinstance(expr, Binary) and expr.op == "mul":
        for a, b in ((expr.a, expr.b), (expr.b, expr.a)):
            if isinstance(a, Score) and isinstance(b, Const) and math.isfinite(b.value):
                return float(b.value)
    return None


def _integer_value(expr: Expr, env: dict[str, int]) -> float | None:
    """``expr`` over index leaves and constants at the positions ``env``; None for anything else."""
    if isinstance(expr, Index):
        return env[expr.name]
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Binary) and expr.op in ("add", "sub"):
        a, b = _integer_value(expr.a, env), _integer_value(expr.b, env)
        if a is None or b is None:
            return None
        return a + b if expr.op == "add" else a - b
    return None


def _key_bound(cond: Expr) -> tuple[Expr, int] | None:
    """``(bound, shift)`` when ``cond`` says ``k <= bound + shift``."""
    if not isinstance(cond, Binary):
        return None
    flipped = {"ge": "le", "gt": "lt"}
    op, key, bound = cond.op, cond.a, cond.b
    if op in flipped:
        op, key, bound = flipped[op], cond.b, cond.a
    if op not in ("le", "lt") or key != Index("k"):
        return None
    return bound, 0 if op == "le" else -1


def _masked_fill(where: Where) -> str | None:
    """How ``where`` masks: "-inf", "sentinel" (a constant at or below finfo.min-like values, or the
    unmasked score plus one), or None for anything else."""
    fill = where.b
    if isinstance(fill, Const) and fill.value == -math.inf:
        return "-inf"
    return "sentinel" if is_sentinel_fill_of(fill, where.a) else None


@functools.lru_cache(maxsize=256)
def saa_program(program: str) -> SAAProgram | None:
    """The scale and causal alignment of ``program``, or None when SAA does not apply to it (parsed once per text)."""
    try:
        expr = parse(program)
    except ValueError:
        return None
    scale = _scale(expr)
    if scale is not None:
        return SAAProgram(scale, causal=False)
    fill = _masked_fill(expr) if isinstance(expr, Where) else None
    if fill is None:
        return None
    scale, found = _scale(expr.a), _key_bound(expr.cond)
    if scale is None or found is None:
        return None
    bound, shift = found
    offsets = set()
    for seq_q, seq_k in ((5, 5), (3, 8), (8, 3)):
        for q in (0, seq_q - 1):
            value = _integer_value(bound, {"q": q, "Sq": seq_q, "Sk": seq_k, "k": 0})
            if value is None:
                return None
            offsets.add((value + shift - q, seq_k - seq_q))
    sentinel = fill == "sentinel"
    if all(offset == 0 for offset, _ in offsets):
        return SAAProgram(scale, causal=True, sentinel_fill=sentinel)
    if all(offset == difference for offset, difference in offsets):
        return SAAProgram(scale, causal=True, bottom_right=True, sentinel_fill=sentinel)
    return None


def saa_applicable(program: str) -> bool:
    """Whether SAA can compute the score program ``program`` (a scale, optionally causal)."""
    return saa_program(program) is not None


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def triton_runnable(t: torch.Tensor) -> bool:
    """Whether the SAA kernels can run on ``t``'s device and dtype (bf16 does not run in the interpreter)."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpret() and t.dtype != torch.bfloat16)


def saa_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, geometry: BlockGeometry,
             config: SAAConfig, predictor: LayerPredictor | None = None) -> tuple[Selection, Centroids]:
    """The first half of SAA on 4-D q ``[B, H, Sq, D]``, k, v ``[B, Hk, Sk, D|Dv]``: the centroids
    and the routed selection of exact key blocks, by Triton kernels."""
    from attncompiler.codegen.saa import (MAX_SORTED_BLOCKS, block_means, fuses_sampled_selection, mean_key_logits,
                                          sampled_key_logits, sampled_key_selection, select_blocks)

    q_means, centroids = block_means(q, k, v, geometry, config)
    interpret = q.device.type == "cpu"
    kernels = RouterKernels(sampled_key=functools.partial(sampled_key_logits, interpret=interpret))
    if geometry.num_n <= MAX_SORTED_BLOCKS:  # (the fused selection falls back to the selection kernel)
        # (the kernel's mean-key logits leave the blocks no row sees undefined: the selection kernel masks them)
        kernels = dataclasses.replace(kernels, mean_key=mean_key_logits,
                                      choose=functools.partial(select_blocks, interpret=interpret))
        if fuses_sampled_selection(q, config):
            kernels = dataclasses.replace(kernels, sampled_choice=functools.partial(sampled_key_selection,
                                                                                   interpret=interpret))
    return select(q, q_means, k, centroids, scale, geometry, config, predictor, kernels), centroids


def saa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, geometry: BlockGeometry,
               config: SAAConfig, out: torch.Tensor | None = None, predictor: LayerPredictor | None = None,
               ) -> tuple[torch.Tensor, Selection, Centroids]:
    """SAA with the Triton kernels on 4-D q ``[B, H, Sq, D]``, k, v ``[B, Hk, Sk, D|Dv]``:
    ``(out, selection, centroids)``; ``out`` is written in place when given; ``predictor`` routes."""
    from attncompiler.codegen.saa import saa_attend

    selection, centroids = saa_plan(q, k, v, scale, geometry, config, predictor)
    out = saa_attend(q, k, v, centroids, selection, scale, geometry, config,
                     interpret=q.device.type == "cpu", out=out)
    return out, selection, centroids


def saa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                config: SAAConfig, *, bottom_right: bool = False, zero_empty_rows: bool = False,
                kernel: str = "auto", predictor: LayerPredictor | None = None) -> tuple[torch.Tensor, SAAStats]:
    """SAA of q ``[..., Hq, Sq, D]``, k ``[..., Hk, Sk, D]``, v ``[..., Hk, Sk, Dv]`` → ``(out, stats)``.

    Batch dims broadcast and heads group as in :mod:`attncompiler.spec`. The score is
    ``scale · q·k``; when ``causal``, key ``j`` is visible to query ``i`` when ``j <= i`` (or
    ``j <= i + Sk - Sq`` with ``bottom_right``). ``out`` is ``[..., Hq, Sq, Dv]`` in v's dtype.
    Rows that see no key are NaN, as with ``torch.softmax``, or zeros with ``zero_empty_rows`` (as
    ``scaled_dot_product_attention`` gives).
    ``kernel``: "triton", "reference" or "auto" (Triton where it can run). ``predictor``: a calibrated
    router for this layer (:mod:`attncompiler.saa_predictor`; default: the training-free estimate alone).
    """
    if kernel not in ("auto", "triton", "reference"):
        raise ValueError(f"kernel must be 'auto', 'triton' or 'reference', got {kernel!r}")
    use_triton = kernel == "triton" or (kernel == "auto" and triton_runnable(q))
    if kernel == "triton" and not triton_runnable(q):
        raise RuntimeError(f"the SAA Triton kernels cannot run on {q.dtype} {q.device.type} tensors here")
    q, k, v, _ = align(q, k, v)
    shape = (*q.shape[:-1], v.shape[-1])
    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    seq_q, seq_k = q4.shape[-2], k4.shape[-2]
    key_offset = seq_k - seq_q if bottom_right else 0
    geometry = BlockGeometry(seq_q, seq_k, config.block_m, config.block_n, causal, key_offset)
    if q4.numel() == 0 or seq_k == 0:  # no queries, or softmax over no keys (zeros, as in eager)
        empty = torch.zeros(shape, dtype=v.dtype, device=q.device)
        return empty, SAAStats(torch.zeros(0, dtype=torch.int64), 0)
    if use_triton:
        out, selection, _ = saa_triton(q4, k4, v4, scale, geometry, config, predictor=predictor)
    else:
        out, selection = saa_reference(q4, k4, v4, scale, causal, config, key_offset, predictor=predictor)
    if zero_empty_rows and causal and key_offset < 0:
        out[..., :-key_offset, :] = 0.0
    return out.reshape(shape), SAAStats(selection.counts, geometry.allowed_total(q4.shape[0] * q4.shape[1]))
