"""SAA routing: which key blocks each query block computes exactly, chosen from pooled queries and keys.

Queries are split into blocks of ``block_m`` rows, keys into blocks of ``block_n``. Under a causal
predicate (key ``j`` visible to query ``i`` when ``j <= i + key_offset``) a key block is *allowed*
for a query block when some of its keys are visible to some of the block's queries, and *full*
when all of its keys are visible to all of them. Allowed blocks that are not full straddle the
diagonal; they are always computed exactly, because their visible keys differ from row to row.

The estimated logit of key block ``n`` for query block ``m`` comes from one of two training-free
routers, plus the learned term of a calibrated predictor when one is given
(:mod:`attncompiler.saa_predictor`); its estimated mass is the softmax of these logits over the
allowed blocks.

- ``"sampled-keys"`` (default): per query row, the logsumexp of its scores against every
  ``key_stride``-th key of the block, normalized over the row's visible blocks; the largest over the
  query block's rows is the block's logit, so a block that one row needs is kept. It costs
  ``1 / key_stride`` of the dense score product over the scored blocks: once with a shortlist (the
  kernel sums each block's share as an attention accumulator, rescaled as the row maximum grows),
  twice without (a pass for each row's normalizer, a pass for the block masses). With
  ``query_stride`` > 1 only the last row of each run of ``query_stride`` rows (and the query block's
  last row) is scored: every 2nd row takes 36–39% off the kernel's time, for +1.16% perplexity at 8K on
  SmolLM2 against +0.84% with every row (GPU, bf16, blocks of 128, top 12 of 32 candidates, tau 0.96),
  +0.85% with 40 candidates and tau 0.97 (the default). As many pairs of every 2nd key and every 4th row
  estimate perplexity better (+0.67% against +0.82%, at the same density), but retrieve 20 of 25
  passkeys against 25 and plan in 1.46× the time at 8K on SmolLM2's shape, 1.53× at 32K (H200, bf16). With
  ``candidates`` it scores only a shortlist: the forced blocks and the
  ``max(candidates, top_k)`` best by ``"mean-key"``; the others get -inf. Over 8 windows of 8192
  tokens (GPU, bf16, blocks of 64, top 24) that cost +0.02 points of perplexity at 96 candidates
  (+0.74% against +0.72% with every block sampled) and cut planning at 131072 tokens from 70 to
  11 ms.
- ``"mean-key"``: ``scale · q̄_m · k̄_n + log |n|`` from the block's mean query ``q̄_m`` and the key
  block's mean key ``k̄_n``; the cheapest (+3.67% at 8K at top 16, against +1.47% for
  ``"sampled-keys"``).

Why the row maximum: on SmolLM2-135M over 4096 tokens of real text (CPU, fp32, blocks of 64, top 16,
density 0.50, dense perplexity 10.834), choosing by the *true* block masses gives 10.865 when
averaged over the query block's rows and 10.847 when maximized over them, against 11.050 for
``"mean-key"``. The choice of blocks, not the granularity nor the centroids, is where the
perplexity goes. Two other training-free routers were measured and removed: the mean query's
logsumexp against every key of a block, and each row's bound from the block's key maxima and
minima (8 windows of 8192 tokens, top 16: +4.87% and +6.41%, both worse than ``"mean-key"``).

Exact blocks are the forced ones (the first ``sinks`` blocks, the ``local_blocks`` blocks ending
at the diagonal, every partial block) plus, in order of estimated logit, the ``top_k`` best
others, or the fewest others that bring the estimated mass of the exact blocks to ``tau`` (at
most ``top_k`` when both are set).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .saa_config import SAAConfig


@dataclass(frozen=True)
class BlockGeometry:
    """Block sizes and visibility of one call. Non-causal calls see every key."""

    seq_q: int
    seq_k: int
    block_m: int
    block_n: int
    causal: bool
    key_offset: int = 0

    @property
    def num_m(self) -> int:
        return math.ceil(self.seq_q / self.block_m)

    @property
    def num_n(self) -> int:
        return math.ceil(self.seq_k / self.block_n)

    def query_rows(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last row of each query block, ``[num_m]`` each."""
        first = torch.arange(self.num_m, device=device) * self.block_m
        return first, torch.clamp(first + self.block_m, max=self.seq_q) - 1

    def allowed_blocks(self, device) -> torch.Tensor:
        """``[num_m]``: key blocks ``0 .. allowed-1`` hold keys visible to some row of the query block."""
        if not self.causal:
            return torch.full((self.num_m,), self.num_n, device=device)
        _, last = self.query_rows(device)
        visible = torch.clamp(last + self.key_offset + 1, 0, self.seq_k)
        return (visible + self.block_n - 1) // self.block_n

    def full_blocks(self, device) -> torch.Tensor:
        """``[num_m]``: key blocks ``0 .. full-1`` are visible entirely to every row of the query block."""
        if not self.causal:
            return torch.full((self.num_m,), self.num_n, device=device)
        first, _ = self.query_rows(device)
        visible = torch.clamp(first + self.key_offset + 1, 0, self.seq_k)
        return torch.where(visible == self.seq_k, self.num_n, visible // self.block_n)

    def diagonal_block(self, device) -> torch.Tensor:
        """``[num_m]``: the key block holding the last row's position (bottom-right aligned when not causal)."""
        if self.causal:
            return self.allowed_blocks(device) - 1
        _, last = self.query_rows(device)
        position = torch.clamp(last + self.seq_k - self.seq_q, 0, self.seq_k - 1)
        return position // self.block_n

    def bounds(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(allowed_blocks, full_blocks)`` on ``device``, computed once per geometry and device."""
        return _bounds(self, torch.device(device))

    def allowed_total(self, batch_heads: int) -> int:
        """Allowed key blocks summed over every query block of ``batch_heads`` (batch × heads), on the host."""
        return _allowed_per_head(self) * batch_heads

    def forced_partial_blocks(self) -> int:
        """An upper bound on the partial (diagonal-straddling) blocks of one query block."""
        return (self.block_m + self.block_n - 2) // self.block_n + 1


@functools.lru_cache(maxsize=64)
def _allowed_per_head(geometry: BlockGeometry) -> int:
    return int(geometry.allowed_blocks("cpu").sum())


@functools.lru_cache(maxsize=64)
def _bounds(geometry: BlockGeometry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return geometry.allowed_blocks(device), geometry.full_blocks(device)


def far_end(geometry: BlockGeometry, config: SAAConfig, full: torch.Tensor) -> torch.Tensor:
    """``[num_m]``: the key blocks before which the full key blocks that are not exact enter by one
    centroid per group of ``far_group`` (those ending ``near_blocks`` or more blocks before the
    diagonal; whole groups of full blocks only), given each query block's ``full`` blocks."""
    group = config.far_group
    if group == 1:
        return torch.zeros_like(full)
    diagonal = geometry.diagonal_block(full.device)
    end = torch.clamp(diagonal + 1 - config.near_blocks, min=0) // group * group
    return torch.minimum(end, full // group * group)


def group_counts(seq: int, group: int, groups: int, device) -> torch.Tensor:
    """``[groups]``: rows in each run of ``group`` consecutive rows out of ``seq`` (0 past the end).
    Made once per shape and device (shared: do not modify it)."""
    return _group_counts(seq, group, groups, torch.device(device))


@functools.lru_cache(maxsize=64)
def _group_counts(seq: int, group: int, groups: int, device: torch.device) -> torch.Tensor:
    starts = torch.arange(groups, device=device) * group
    return torch.clamp(seq - starts, 0, group)


@functools.lru_cache(maxsize=64)
def _log_block_counts(seq: int, block: int, blocks: int, device: torch.device) -> torch.Tensor:
    return group_counts(seq, block, blocks, device).float().log()


@dataclass(frozen=True)
class Selection:
    """The key blocks computed exactly, per batch, query head and query block.

    ``indices[..., :counts]`` lists them in block order (the rest is padding: 0), so that a causal
    query block's partly seen key blocks, all forced, come last; ``exact`` is the same set as a mask
    over all key blocks, ``full`` the number of full blocks per query block.
    """

    indices: torch.Tensor    # [B, H, num_m, K] int32
    counts: torch.Tensor     # [B, H, num_m] int32
    exact: torch.Tensor      # [B, H, num_m, num_n] bool
    allowed: torch.Tensor    # [num_m] allowed key blocks
    full: torch.Tensor       # [num_m] full key blocks

    @property
    def exact_blocks(self) -> torch.Tensor:
        """Key blocks computed exactly, summed over every (batch, head, query block)."""
        return self.counts.sum()


def mean_key_logits(q_means: torch.Tensor, k_means: torch.Tensor, geometry: BlockGeometry,
                    scale: float) -> torch.Tensor:
    """``[B, H, num_m, num_n]``: ``scale · q̄·k̄ + log |n|`` from mean queries ``[B, H, num_m, D]`` and mean keys
    ``[B, Hk, num_n, D]`` (query head ``h`` reads key head ``h // (H / Hk)``), in fp32, by one batched product."""
    batch, heads, num_m, dim = q_means.shape
    kv_heads, num_n = k_means.shape[1], k_means.shape[2]
    grouped = q_means.float().reshape(batch * kv_heads, (heads // kv_heads) * num_m, dim)
    log_counts = _log_block_counts(geometry.seq_k, geometry.block_n, num_n, q_means.device)          # [N]
    logits = torch.baddbmm(log_counts, grouped, k_means.float().reshape(batch * kv_heads, num_n, dim).transpose(1, 2),
                           alpha=scale)
    return logits.reshape(batch, heads, num_m, num_n)


def _row_max_logits(q: torch.Tensor, geometry: BlockGeometry, kv_heads: int, row_estimates: Callable,
                    chunk_bytes: int, query_stride: int = 1) -> torch.Tensor:
    """``[B, H, num_m, num_n]``: per query row, ``row_estimates(rows [R], queries [B, Hk, G, R, D])`` gives
    ``[B, Hk, G, R, N]`` block logits (-inf where not visible); normalized over each row's blocks, the
    largest over the scored rows of each query block: the last of each run of ``query_stride`` rows,
    and the block's last row. Query blocks go in chunks of at most ``chunk_bytes``."""
    batch, heads, seq_q, dim = q.shape
    group, block_m, num_m, num_n = heads // kv_heads, geometry.block_m, geometry.num_m, geometry.num_n
    grouped = q.float().reshape(batch, kv_heads, group, seq_q, dim)
    out = torch.empty(batch, kv_heads, group, num_m, num_n, dtype=torch.float32, device=q.device)
    step = max(1, chunk_bytes // max(1, 4 * batch * heads * block_m * num_n))
    for start in range(0, num_m, step):
        rows = torch.arange(start * block_m, min((start + step) * block_m, seq_q), device=q.device)
        estimate = row_estimates(rows, grouped[:, :, :, rows[0]:rows[-1] + 1])          # [B, Hk, G, R, N]
        norm = estimate.logsumexp(-1, keepdim=True)
        estimate = torch.where(norm > -math.inf, estimate - norm, -math.inf)            # rows with no visible key
        if query_stride > 1:
            last = torch.clamp((rows // block_m + 1) * block_m, max=seq_q) - 1            # [R] each block's last row
            scored = (rows % query_stride == query_stride - 1) | (rows == last)
            estimate = estimate.masked_fill(~scored[:, None], -math.inf)
        blocks = -(-rows.numel() // block_m)
        estimate = torch.nn.functional.pad(estimate, (0, 0, 0, blocks * block_m - rows.numel()), value=-math.inf)
        out[:, :, :, start:start + blocks] = estimate.reshape(
            batch, kv_heads, group, blocks, block_m, num_n).amax(-2)
    return out.reshape(batch, heads, num_m, num_n)


def sampled_key_logits(q: torch.Tensor, k: torch.Tensor, scale: float, geometry: BlockGeometry, stride: int,
                       shortlist: Selection | None = None, chunk_bytes: int = 1 << 28,
                       query_stride: int = 1) -> torch.Tensor:
    """``[B, H, num_m, num_n]`` fp32, the ``"sampled-keys"`` logits: for each query row and key block, the
    logsumexp of ``scale · q_i·k_j`` over the block's keys ``j`` at multiples of ``stride`` from its first
    (each visible to the row); normalized over the row's visible blocks, the largest over the rows
    of a query block (the last of each run of ``query_stride`` rows, and the block's last). It costs
    ``1 / (stride · query_stride)`` of the dense score product. With a ``shortlist`` (a
    :class:`Selection`), only the key blocks it marks for the query block are scored and normalized
    over; the others are -inf."""
    seq_k, block_n, num_n = geometry.seq_k, geometry.block_n, geometry.num_n
    per_block = block_n // stride
    columns = torch.arange(num_n * per_block, device=q.device) * stride                  # [N·spb] sampled keys
    present = columns < seq_k
    samples = k.float()[:, :, columns.clamp(max=seq_k - 1)].transpose(-2, -1)[:, :, None]  # [B, Hk, 1, D, N·spb]
    listed = None
    if shortlist is not None:
        batch, heads = q.shape[:2]
        listed = shortlist.exact.reshape(batch, k.shape[1], heads // k.shape[1], geometry.num_m, num_n)

    def sampled(rows: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        scores = (part @ samples) * scale                                                  # [B, Hk, G, R, N·spb]
        hidden = ~present if not geometry.causal else ~present | (columns > rows[:, None] + geometry.key_offset)
        scores = scores.masked_fill(hidden, -math.inf)
        blocks = scores.unflatten(-1, (num_n, per_block)).logsumexp(-1)                     # [B, Hk, G, R, N]
        if listed is not None:
            blocks = blocks.masked_fill(~listed[:, :, :, rows // geometry.block_m], -math.inf)
        return blocks

    return _row_max_logits(q, geometry, k.shape[1], sampled, chunk_bytes, query_stride)


def training_free_logits(q: torch.Tensor, q_means: torch.Tensor, k: torch.Tensor, k_means: torch.Tensor | None,
                         scale: float, geometry: BlockGeometry, config: SAAConfig,
                         kernels: RouterKernels | None = None) -> torch.Tensor:
    """``[B, H, num_m, num_n]``: the logits of ``config.router`` from queries ``[B, H, Sq, D]``, their block
    means, keys ``[B, Hk, Sk, D]`` and mean keys ``[B, Hk, num_n, D]`` (needed by ``"mean-key"`` and by a
    shortlist of candidates);
    ``kernels`` computes the other forms (PyTorch by default, Triton kernels on the kernel path)."""
    kernels = kernels or RouterKernels()
    if config.router == "sampled-keys":
        shortlist = None
        if config.candidates is not None:
            shortlist = sampled_shortlist(q_means, k_means, scale, geometry, config, kernels)
        return kernels.sampled_key(q, k, scale, geometry, config.key_stride, shortlist,
                                   query_stride=config.effective_query_stride)
    return kernels.mean_key(q_means, k_means, geometry, scale)


def sampled_shortlist(q_means: torch.Tensor, k_means: torch.Tensor, scale: float, geometry: BlockGeometry,
                      config: SAAConfig, kernels: RouterKernels | None = None) -> Selection:
    """The key blocks the ``"sampled-keys"`` router scores when it has ``candidates``: the forced ones
    and the best by ``"mean-key"`` (queries' block means ``[B, H, num_m, D]``, mean keys ``[B, Hk, num_n, D]``)."""
    kernels = kernels or RouterKernels()
    return kernels.choose(kernels.mean_key(q_means, k_means, geometry, scale), geometry, shortlist_config(config))


def shortlist_size(config: SAAConfig) -> int | None:
    """How many key blocks the ``"sampled-keys"`` shortlist takes besides the forced ones, ``max(candidates,
    top_k)``; None where no shortlist is taken. A query block that sees no more key blocks than that has
    them all listed, whatever its mean query."""
    if config.router != "sampled-keys" or config.candidates is None:
        return None
    return max(config.candidates, config.top_k or 0)


def shortlist_config(config: SAAConfig) -> SAAConfig:
    """The selection that shortlists :func:`shortlist_size` key blocks by ``"mean-key"`` (besides the forced
    ones)."""
    return dataclasses.replace(config, router="mean-key", top_k=shortlist_size(config), tau=None, candidates=None)


def selection_width(geometry: BlockGeometry, config: SAAConfig) -> int:
    """Length of :attr:`Selection.indices`' last dim: every key block, or the most that ``top_k`` keeps."""
    forced_bound = config.sinks + config.local_blocks + geometry.forced_partial_blocks()
    return geometry.num_n if config.top_k is None else min(geometry.num_n, forced_bound + config.top_k)


def select_blocks(logits: torch.Tensor, geometry: BlockGeometry, config: SAAConfig) -> Selection:
    """The exact key blocks from estimated logits ``[B, H, num_m, num_n]`` (the PyTorch form of
    :func:`attncompiler.codegen.saa.select_blocks_kernel`)."""
    batch, heads, num_m, num_n = logits.shape
    device = logits.device
    blocks = torch.arange(num_n, device=device)                                      # [N]
    allowed, full = geometry.bounds(device)
    diagonal = geometry.diagonal_block(device)
    is_allowed = blocks < allowed[:, None]                                           # [M, N]
    forced = is_allowed & ((blocks < config.sinks) | (blocks >= full[:, None])
                           | ((blocks <= diagonal[:, None]) & (blocks > diagonal[:, None] - config.local_blocks)))

    priority = torch.where(forced, math.inf, torch.where(is_allowed, logits, -math.inf))
    width = selection_width(geometry, config)
    ranked, order = torch.topk(priority, width, dim=-1, sorted=True)                  # [B, H, M, K]
    num_forced = forced.sum(-1)                                                       # [M]
    position = torch.arange(width, device=device)
    keep = ranked > -math.inf
    if config.top_k is not None:
        keep &= position < (num_forced[:, None] + config.top_k)
    if config.tau is not None:
        mass = torch.softmax(torch.where(is_allowed, logits, -math.inf), dim=-1)      # [B, H, M, N]
        forced_mass = torch.where(forced, mass, 0.0).sum(-1, keepdim=True)
        routed_mass = torch.where(ranked < math.inf, torch.gather(mass, -1, order), 0.0)
        before = forced_mass + torch.cumsum(routed_mass, -1) - routed_mass             # mass before each entry
        keep &= (ranked == math.inf) | (before < config.tau)
    counts = keep.sum(-1, dtype=torch.int32)
    listed = torch.sort(torch.where(keep, order, num_n), dim=-1).values                # kept, in block order
    exact = torch.zeros(batch, heads, num_m, num_n + 1, dtype=torch.bool, device=device)
    exact.scatter_(-1, listed, True)
    indices = torch.where(listed < num_n, listed, 0).to(torch.int32)
    return Selection(indices, counts, exact[..., :num_n], allowed, full)


@dataclass(frozen=True)
class RouterKernels:
    """What computes the routers' logits and picks the blocks: PyTorch here, Triton kernels on the kernel path."""

    mean_key: Callable[[torch.Tensor, torch.Tensor, BlockGeometry, float], torch.Tensor] = mean_key_logits
    sampled_key: Callable[..., torch.Tensor] = sampled_key_logits
    choose: Callable[[torch.Tensor, BlockGeometry, SAAConfig], Selection] = select_blocks
    # Given only for an operating point it computes (a shortlisted "sampled-keys" top-k): the router
    # and its top-k in one, from the shortlist (q, k, scale, geometry, config, shortlist) → Selection,
    # in place of sampled_key and choose.
    sampled_choice: Callable[..., Selection] | None = None
