"""Launch configurations of the generated kernels: the space, its prune predicate, the defaults."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

MAX_REGISTERS_PER_THREAD = 255


@dataclass(frozen=True)
class FlashConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def shared_memory_bytes(c: FlashConfig, head_dim: int, head_dim_v: int, itemsize: int) -> int:
    """Shared memory the forward needs: the Q tile plus ``num_stages`` K and V tiles."""
    d, dv = _pow2_at_least(head_dim), _pow2_at_least(head_dim_v)
    return itemsize * (c.block_m * d + c.num_stages * c.block_n * (d + dv))


def registers_per_thread(c: FlashConfig, head_dim: int, head_dim_v: int, itemsize: int) -> int:
    """Estimated 32-bit registers per thread: the fp32 accumulator, score and probability tiles, the Q tile."""
    d, dv = _pow2_at_least(head_dim), _pow2_at_least(head_dim_v)
    words = c.block_m * dv + 2 * c.block_m * c.block_n + c.block_m * d * itemsize // 4
    return words // (32 * c.num_warps)


def keep(c: FlashConfig, head_dim: int, head_dim_v: int, itemsize: int, smem_limit: int) -> bool:
    """Prune configs that cannot fit on the device (shared memory, registers) or waste most of a warp group."""
    if shared_memory_bytes(c, head_dim, head_dim_v, itemsize) > smem_limit:
        return False
    if registers_per_thread(c, head_dim, head_dim_v, itemsize) > MAX_REGISTERS_PER_THREAD:
        return False
    if c.block_m * c.block_n // (32 * c.num_warps) < 16:
        return False
    return not (max(head_dim, head_dim_v) > 128 and c.block_m * c.block_n > 128 * 64)


CONFIG_SPACE = [
    FlashConfig(bm, bn, w, s)
    for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
]


def default_config(q: torch.Tensor, head_dim_v: int, interpret: bool) -> FlashConfig:
    """A good untuned config for this query shape, dtype and device: on an H100 (bf16, S = 4K), the
    fastest of :data:`CONFIG_SPACE` at D64, and at D128 causal and not (``benchmarks/kernel_sweep.py``)."""
    seq_q, head_dim = q.shape[-2], q.shape[-1]
    if interpret:
        return FlashConfig(min(64, _pow2_at_least(seq_q)), 32, 4, 1)
    widest = max(head_dim, head_dim_v)
    if q.dtype == torch.float32:
        config = FlashConfig(64, 32, 4, 2) if widest > 64 else FlashConfig(64, 64, 4, 2)
    elif widest <= 64:
        config = FlashConfig(128, 64, 8, 3)
    elif widest <= 128:
        config = FlashConfig(64, 64, 4, 3)
    else:
        config = FlashConfig(64, 32, 4, 2)
    return FlashConfig(min(config.block_m, _pow2_at_least(seq_q)), config.block_n, config.num_warps,
                       config.num_stages)


@dataclass(frozen=True)
class BwdTiles:
    """One backward kernel's launch: it keeps a *resident* tile and accumulates into it while
    streaming tiles of the other side."""

    resident: int
    streamed: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    """Launches of the backward kernels, tuned apart: dK/dV keeps key tiles of ``block_resident`` and
    streams query tiles of ``block_streamed``; dQ (and the preprocess, over the same query tiles)
    keeps query tiles of ``dq_block_m`` and streams key tiles of ``dq_block_n``."""

    block_resident: int
    block_streamed: int
    num_warps: int
    num_stages: int
    dq_block_m: int
    dq_block_n: int
    dq_num_warps: int
    dq_num_stages: int

    @classmethod
    def of(cls, dkdv: BwdTiles, dq: BwdTiles) -> "BwdConfig":
        return cls(dkdv.resident, dkdv.streamed, dkdv.num_warps, dkdv.num_stages,
                   dq.resident, dq.streamed, dq.num_warps, dq.num_stages)

    @property
    def dkdv(self) -> BwdTiles:
        return BwdTiles(self.block_resident, self.block_streamed, self.num_warps, self.num_stages)

    @property
    def dq(self) -> BwdTiles:
        return BwdTiles(self.dq_block_m, self.dq_block_n, self.dq_num_warps, self.dq_num_stages)


def bwd_shared_memory_bytes(t: BwdTiles, head_dim: int, head_dim_v: int, itemsize: int) -> int:
    """Shared memory of one backward kernel: two resident tiles plus ``num_stages`` pairs of
    streamed tiles (k, v for dQ; q, dO for dK/dV)."""
    d, dv = _pow2_at_least(head_dim), _pow2_at_least(head_dim_v)
    return itemsize * (t.resident + t.num_stages * t.streamed) * (d + dv)


def bwd_registers_per_thread(t: BwdTiles, head_dim: int, head_dim_v: int) -> int:
    """Estimated fp32 registers per thread of one backward kernel: the resident tile's two
    accumulators plus the three ``[resident, streamed]`` score-sized tiles (scores, probabilities,
    their gradient)."""
    d, dv = _pow2_at_least(head_dim), _pow2_at_least(head_dim_v)
    return t.resident * (d + dv + 3 * t.streamed) // (32 * t.num_warps)


def bwd_tiles_keep(t: BwdTiles, head_dim: int, head_dim_v: int, itemsize: int, smem_limit: int) -> bool:
    """Prune launches of a backward kernel that overflow shared memory or registers, or leave warps idle."""
    if bwd_shared_memory_bytes(t, head_dim, head_dim_v, itemsize) > smem_limit:
        return False
    if bwd_registers_per_thread(t, head_dim, head_dim_v) > MAX_REGISTERS_PER_THREAD:
        return False
    return t.resident * t.streamed // (32 * t.num_warps) >= 2


def bwd_keep(c: BwdConfig, head_dim: int, head_dim_v: int, itemsize: int, smem_limit: int) -> bool:
    """Both kernels' launches pass :func:`bwd_tiles_keep`."""
    return all(bwd_tiles_keep(t, head_dim, head_dim_v, itemsize, smem_limit) for t in (c.dkdv, c.dq))


BWD_TILES_SPACE = [
    BwdTiles(r, s, w, st)
    for r, s, w, st in itertools.product((32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3, 4, 5))
]


def default_bwd_config(q: torch.Tensor, head_dim_v: int, interpret: bool) -> BwdConfig:
    """An untuned backward config for this query shape, dtype and device. On an H100 (bf16, S = 4K,
    ``benchmarks/kernel_sweep.py``), dK/dV: at D64 and D128 among the fastest of
    :data:`BWD_TILES_SPACE` (causal and not, within 2% of the best); dQ: the fastest at D128."""
    widest = max(q.shape[-1], head_dim_v)
    if interpret:
        tiles = BwdTiles(64, 32, 4, 1)
        return BwdConfig.of(tiles, tiles)
    if q.dtype == torch.float32:
        tiles = BwdTiles(32, 16, 4 if widest <= 128 else 8, 1)
        return BwdConfig.of(tiles, tiles)
    if widest <= 128:
        return BwdConfig.of(BwdTiles(64, 64, 4, 2), BwdTiles(128, 64, 8, 3))
    tiles = BwdTiles(32, 32, 8, 2)
    return BwdConfig.of(tiles, tiles)
