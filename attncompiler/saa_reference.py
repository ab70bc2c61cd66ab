"""SAA in PyTorch: the oracle for the Triton kernels and the path for devices without them.

For each query row, the softmax runs over two kinds of entries: every visible key of the key
blocks its query block computes exactly, with logit ``scale · q·k``; and the centroids of every
other full key block, with logit ``scale · q·k̄ + log n`` and value ``v̄`` (``k̄``, ``v̄`` the mean
key and value of ``n`` consecutive keys). A centroid thus stands for ``n`` keys sharing its mean.
When every allowed block is exact, this is dense attention.

Tensors are ``[B, H, S, D]`` for queries and ``[B, Hk, S, D]`` for keys and values, with query
head ``h`` reading key head ``h // (H / Hk)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .saa_config import SAAConfig
from .saa_routing import (BlockGeometry, RouterKernels, Selection, group_counts, sampled_shortlist,
                          training_free_logits)

if TYPE_CHECKING:
    from .saa_predictor import LayerPredictor


@dataclass(frozen=True)
class Centroids:
    """Mean keys ``[B, Hk, N·C, D]`` and values ``[B, Hk, N·C, Dv]`` of consecutive runs of keys (0 for
    runs past the last key), ``counts`` ``[N·C]``: keys behind each, and ``block_keys``: the fp32 mean key
    of each key block ``[B, Hk, N, D]``, for routing (None where only the attend pass reads these)."""

    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    block_keys: torch.Tensor | None = None


def pool_reference(x: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    """fp32 means ``[..., groups, D]`` of runs of ``group`` consecutive rows of ``x`` ``[..., S, D]``
    (0 for runs past the end)."""
    seq = x.shape[-2]
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, groups * group - seq))
    sums = padded.reshape(*x.shape[:-2], groups, group, x.shape[-1]).sum(-2)
    counts = group_counts(seq, group, groups, x.device)
    return sums / counts.clamp(min=1)[:, None]


def centroids_reference(k: torch.Tensor, v: torch.Tensor, geometry: BlockGeometry, config: SAAConfig) -> Centroids:
    groups = geometry.num_n * config.centroids
    counts = group_counts(geometry.seq_k, config.sub_block, groups, k.device)
    return Centroids(pool_reference(k, config.sub_block, groups), pool_reference(v, config.sub_block, groups),
                     counts, pool_reference(k, config.block_n, geometry.num_n))


def select(q: torch.Tensor, q_means: torch.Tensor, k: torch.Tensor, centroids: Centroids, scale: float,
           geometry: BlockGeometry, config: SAAConfig, predictor: LayerPredictor | None = None,
           kernels: RouterKernels | None = None) -> Selection:
    """Route from queries ``[B, H, Sq, D]``, their block means ``[B, H, M, D]``, keys ``[B, Hk, Sk, D]`` and
    the centroids (with the key blocks' mean keys) by ``config.router``, with ``predictor``'s
    learned term when given (it corrects ``"mean-key"``, the router it was calibrated with). ``kernels``
    computes the logits and picks the blocks (PyTorch by default)."""
    if predictor is not None and config.router != "mean-key":
        raise ValueError(f'a learned router corrects the "mean-key" estimate; route with router="mean-key", '
                         f'not {config.router!r}, to use it')
    kernels = kernels or RouterKernels()
    if kernels.sampled_choice is not None:
        shortlist = sampled_shortlist(q_means, centroids.block_keys, scale, geometry, config, kernels)
        return kernels.sampled_choice(q, k, scale, geometry, config, shortlist)
    logits = training_free_logits(q, q_means, k, centroids.block_keys, scale, geometry, config, kernels)  # [B, H, M, N]
    if predictor is not None:
        logits = logits + predictor.logits(q_means, centroids.block_keys, geometry)
    return kernels.choose(logits, geometry, config)


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centroids: Centroids,
                     selection: Selection, scale: float, geometry: BlockGeometry, config: SAAConfig,
                     compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One softmax over the exact keys and the centroids of the other full blocks, in ``compute_dtype``."""
    group = q.shape[1] // k.shape[1]
    k, v, k_cent, v_cent = (t.to(compute_dtype).repeat_interleave(group, 1)
                            for t in (k, v, centroids.keys, centroids.values))
    q = q.to(compute_dtype)
    device = q.device
    rows = torch.arange(geometry.seq_q, device=device)
    cols = torch.arange(geometry.seq_k, device=device)
    row_exact = selection.exact[:, :, rows // geometry.block_m]                       # [B, H, Sq, N]

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale                              # [B, H, Sq, Sk]
    keep = row_exact[..., cols // geometry.block_n]
    if geometry.causal:
        keep = keep & (cols[None, :] <= rows[:, None] + geometry.key_offset)
    scores = scores.masked_fill(~keep, float("-inf"))

    cent_block = torch.arange(centroids.counts.numel(), device=device) // config.centroids
    cent_scores = torch.matmul(q, k_cent.transpose(-2, -1)) * scale + centroids.counts.to(compute_dtype).log()
    full = selection.full[rows // geometry.block_m]                                    # [Sq]
    cent_keep = ~row_exact[..., cent_block] & (cent_block[None, :] < full[:, None]) & (centroids.counts > 0)
    cent_scores = cent_scores.masked_fill(~cent_keep, float("-inf"))                   # [B, H, Sq, N·C]

    probs = torch.softmax(torch.cat([scores, cent_scores], -1), -1)
    return torch.matmul(probs, torch.cat([v, v_cent], -2))


def saa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                  config: SAAConfig, key_offset: int = 0, compute_dtype: torch.dtype = torch.float32,
                  predictor: LayerPredictor | None = None) -> tuple[torch.Tensor, Selection]:
    """SAA of q ``[B, H, Sq, D]``, k ``[B, Hk, Sk, D]``, v ``[B, Hk, Sk, Dv]``: ``(out in v's dtype, selection)``.

    Causal: key ``j`` is visible to query ``i`` when ``j <= i + key_offset``. ``predictor``: a
    calibrated router for this layer (default: the training-free estimate alone).
    """
    geometry = BlockGeometry(q.shape[-2], k.shape[-2], config.block_m, config.block_n, causal, key_offset)
    centroids = centroids_reference(k, v, geometry, config)
    selection = select(q, pool_reference(q, config.block_m, geometry.num_m), k, centroids, scale, geometry, config,
                       predictor)
    out = attend_reference(q, k, v, centroids, selection, scale, geometry, config, compute_dtype)
    return out.to(v.dtype), selection
