"""How the attention op's inputs line up: broadcast batch dims and grouped query heads.

q ``[..., Hq, Sq, D]``, k ``[..., Hk, Sk, D]``, v ``[..., Hk, Sk, Dv]``. Leading dims broadcast as
in ``torch.matmul``. The head dim (-3) broadcasts too, and beyond that may be *grouped*: when
``Hq`` is a multiple of ``Hk``, query head ``h`` reads key/value head ``h // (Hq / Hk)`` (GQA;
``Hk = 1`` is MQA). The same rule holds for 3-D ``[B·H, S, D]`` inputs, where grouping the
flattened index gives the same pairing. Operands broadcast to the score shape ``[..., H, Sq, Sk]``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


def _padded(shape: Sequence, rank: int) -> tuple:
    return (1,) * (rank - len(shape)) + tuple(shape)


def heads(q_shape: Sequence, kv_shape: Sequence) -> tuple[int, int]:
    """``(output heads, group)`` for query heads ``q_shape[-3]`` and key/value heads ``kv_shape[-3]``."""
    hq = q_shape[-3] if len(q_shape) >= 3 else 1
    hk = kv_shape[-3] if len(kv_shape) >= 3 else 1
    if hq == hk or hk == 1:
        return hq, hq if hk == 1 else 1
    if hq == 1:
        return hk, 1
    if hq % hk != 0:
        raise ValueError(f"{hq} query heads cannot be grouped over {hk} key/value heads")
    return hq, hq // hk


def _cached_for_concrete_shapes(rule):
    """``rule(q_shape, k_shape, v_shape)`` answered from a cache when every size is an int (every call
    of the op), and worked out each time for symbolic shapes; ``.cached`` is the cache, ``.rule`` the
    uncached rule."""
    cached = functools.lru_cache(maxsize=1024)(rule)

    @functools.wraps(rule)
    def answer(q_shape: Sequence, k_shape: Sequence, v_shape: Sequence):
        if all(type(size) is int for shape in (q_shape, k_shape, v_shape) for size in shape):
            return cached(tuple(q_shape), tuple(k_shape), tuple(v_shape))
        return rule(q_shape, k_shape, v_shape)

    answer.cached, answer.rule = cached, rule
    return answer


@_cached_for_concrete_shapes
def output_shape(q_shape: Sequence, k_shape: Sequence, v_shape: Sequence) -> tuple:
    """Shape of the result: broadcast leading dims, grouped heads, ``[Sq, Dv]``."""
    kv = tuple(torch.broadcast_shapes(tuple(k_shape[:-2]), tuple(v_shape[:-2])))
    rank = max(len(q_shape), len(k_shape), len(v_shape))
    if rank < 3:
        return (*kv, q_shape[-2], v_shape[-1]) if kv else (q_shape[-2], v_shape[-1])
    q_batch = _padded(q_shape[:-2], rank - 2)
    kv_batch = _padded(kv, rank - 2)
    lead = tuple(torch.broadcast_shapes(q_batch[:-1], kv_batch[:-1]))
    out_heads, _ = heads(q_batch + (0, 0), kv_batch + (0, 0))
    return (*lead, out_heads, q_shape[-2], v_shape[-1])


@_cached_for_concrete_shapes
def group_of(q_shape: Sequence, k_shape: Sequence, v_shape: Sequence) -> int:
    """How many query heads share one key/value head (1 without grouping)."""
    kv = tuple(torch.broadcast_shapes(tuple(k_shape[:-2]), tuple(v_shape[:-2])))
    return heads(tuple(q_shape[:-2]) + (0, 0), kv + (0, 0))[1] if len(q_shape) >= 3 and kv else 1


def align(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Expanded views with equal leading dims: q to the output batch, k and v keeping their own
    (possibly fewer) heads. Returns ``(q, k, v, group)``."""
    shape = output_shape(q.shape, k.shape, v.shape)
    group = group_of(q.shape, k.shape, v.shape)
    q = q.expand(*shape[:-2], *q.shape[-2:])
    if len(shape) < 3:
        return q, k.expand(*shape[:-2], *k.shape[-2:]), v.expand(*shape[:-2], *v.shape[-2:]), 1
    kv_heads = shape[-3] // group
    k = k.expand(*shape[:-3], kv_heads, *k.shape[-2:])
    v = v.expand(*shape[:-3], kv_heads, *v.shape[-2:])
    return q, k, v, group


def ungroup(t: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat each key/value head ``group`` times along dim -3 (what grouping means)."""
    return t if group == 1 else t.repeat_interleave(group, dim=-3)
