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
from .saa_routing import (BlockGeometry, RouterKernels, Selection, far_end, group_counts, sampled_shortlist,
                          training_free_logits)

if TYPE_CHECKING:
    from .saa_predictor import LayerPredictor


@dataclass(frozen=True)
class FarSums:
    """The far groups' terms, fp32, keys then values along the last dim (``D + Dv``): per key block
    ``[B, Hk, G·F, D + Dv]`` and per group of F key blocks ``[B, Hk, G, D + Dv]``, the sum of its
    centroids times the keys behind each (per-block rows past the last key block: 0 from
    :func:`far_sums_reference`, unwritten by the kernel, and read by neither)."""

    blocks: torch.Tensor
    groups: torch.Tensor

    @classmethod
    def of_blocks(cls, blocks: torch.Tensor, far_group: int) -> "FarSums":
        """The per-block sums ``[B, Hk, G·F, D + Dv]`` with their groups' (F = ``far_group``)."""
        return cls(blocks, blocks.unflatten(-2, (-1, far_group)).sum(-2))


@dataclass(frozen=True)
class Centroids:
    """Mean keys ``[B, Hk, N·C, D]`` and values ``[B, Hk, N·C, Dv]`` of consecutive runs of keys (0 for
    runs past the last key), ``counts`` ``[N·C]``: keys behind each, ``block_keys``: the fp32 mean key
    of each key block ``[B, Hk, N, D]``, for routing (None where only the attend pass reads these), and
    ``far``: the far groups' sums, which the Triton attend pass reads (None without far groups)."""

    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    block_keys: torch.Tensor | None = None
    far: FarSums | None = None


def pool_reference(x: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    """fp32 means ``[..., groups, D]`` of runs of ``group`` consecutive rows of ``x`` ``[..., S, D]``
    (0 for runs past the end)."""
    seq = x.shape[-2]
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, groups * group - seq))
    sums = padded.reshape(*x.shape[:-2], groups, group, x.shape[-1]).sum(-2)
    counts = group_counts(seq, group, groups, x.device)
    return sums / counts.clamp(min=1)[:, None]


def centroids_reference(k: torch.Tensor, v: torch.Tensor, geometry: BlockGeometry, config: SAAConfig) -> Centroids:
    """The centroids (fp32), the mean key of each key block and, with far groups, their sums (the
    PyTorch form of the centroids from :func:`attncompiler.codegen.saa.block_means`)."""
    groups = geometry.num_n * config.centroids
    counts = group_counts(geometry.seq_k, config.sub_block, groups, k.device)
    keys, values = pool_reference(k, config.sub_block, groups), pool_reference(v, config.sub_block, groups)
    far = far_sums_reference(keys, values, counts, geometry, config) if config.far_group > 1 else None
    return Centroids(keys, values, counts, pool_reference(k, config.block_n, geometry.num_n), far)


def far_sums_reference(keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, geometry: BlockGeometry,
                       config: SAAConfig) -> FarSums:
    """Each key block's and each far group's centroids ``[B, Hk, N·C, D|Dv]`` times the keys behind each
    (``counts`` ``[N·C]``), summed in fp32."""
    terms = torch.cat([keys, values], -1).float() * counts.float()[:, None]         # [B, Hk, N·C, D + Dv]
    blocks = terms.unflatten(-2, (geometry.num_n, config.centroids)).sum(-2)        # [B, Hk, N, D + Dv]
    blocks = torch.nn.functional.pad(blocks, (0, 0, 0, -geometry.num_n % config.far_group))
    return FarSums.of_blocks(blocks, config.far_group)


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
    """One softmax over the exact keys, the centroids of the other full blocks near the diagonal and
    one centroid per group of far ones, in ``compute_dtype``."""
    group = q.shape[1] // k.shape[1]
    k, v, k_cent, v_cent = (t.to(compute_dtype).repeat_interleave(group, 1)
                            for t in (k, v, centroids.keys, centroids.values))
    q = q.to(compute_dtype)
    device = q.device
    rows = torch.arange(geometry.seq_q, device=device)
    cols = torch.arange(geometry.seq_k, device=device)
    row_block = rows // geometry.block_m
    row_exact = selection.exact[:, :, row_block]                                     # [B, H, Sq, N]

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale                              # [B, H, Sq, Sk]
    keep = row_exact[..., cols // geometry.block_n]
    if geometry.causal:
        keep = keep & (cols[None, :] <= rows[:, None] + geometry.key_offset)
    scores = scores.masked_fill(~keep, float("-inf"))

    cent_block = torch.arange(centroids.counts.numel(), device=device) // config.centroids
    counts = centroids.counts.to(compute_dtype)
    cent_scores = torch.matmul(q, k_cent.transpose(-2, -1)) * scale + counts.log()
    far = cent_block[None, :] < far_end(geometry, config, selection.full)[row_block][:, None]  # [Sq, N·C]
    aggregated = (~row_exact[..., cent_block] & (cent_block[None, :] < selection.full[row_block][:, None])
                  & (centroids.counts > 0))                                            # [B, H, Sq, N·C]
    cent_scores = cent_scores.masked_fill(~(aggregated & ~far), float("-inf"))
    logits = torch.cat([scores, cent_scores], -1)
    value_rows = torch.cat([v, v_cent], -2)
    if config.far_group == 1:
        return torch.matmul(torch.softmax(logits, -1), value_rows)
    group_scores, group_values = _far_groups(q, k_cent, v_cent, counts, aggregated & far, scale, config)
    probs = torch.softmax(torch.cat([logits, group_scores], -1), -1)
    split = logits.shape[-1]
    return (torch.matmul(probs[..., :split], value_rows)
            + torch.einsum("bhsg,bhsgd->bhsd", probs[..., split:], group_values))


def _far_groups(q: torch.Tensor, k_cent: torch.Tensor, v_cent: torch.Tensor, counts: torch.Tensor,
                member: torch.Tensor, scale: float, config: SAAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's scores ``[B, H, Sq, G]`` against, and values ``[B, H, Sq, G, Dv]`` of, one centroid per
    group of ``far_group`` key blocks: the mean key and value of the runs ``member`` ``[B, H, Sq, N·C]``
    marks in the group, with the log of their keys on the score (-inf for a group with none)."""
    runs = config.far_group * config.centroids
    pad = (-counts.numel()) % runs
    weight = torch.nn.functional.pad(member * counts, (0, pad)).unflatten(-1, (-1, runs))    # [B, H, Sq, G, R]
    k_runs, v_runs = (torch.nn.functional.pad(t, (0, 0, 0, pad)).unflatten(-2, (-1, runs)) for t in (k_cent, v_cent))
    keys = weight.sum(-1)                                                              # [B, H, Sq, G]
    share = weight / keys.clamp(min=1)[..., None]
    group_keys = torch.einsum("bhsgr,bhgrd->bhsgd", share, k_runs)
    group_values = torch.einsum("bhsgr,bhgrd->bhsgd", share, v_runs)
    group_scores = torch.einsum("bhsd,bhsgd->bhsg", q, group_keys) * scale + keys.clamp(min=1).log()
    return group_scores.masked_fill(keys == 0, float("-inf")), group_values


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
