"""SAA Triton kernels: block means, block logits, block selection, and one attend-and-aggregate pass.

``saa_means_kernel`` averages each query block's rows (its mean query, for routing) and gives each key
block's key and value centroids and its mean key, in one launch that streams queries, keys and values
once. ``mean_key_logits_kernel`` gives the ``"mean-key"`` logits (each
mean query against each mean key) tile by tile, skipping the tiles no row sees (PyTorch form:
:func:`attncompiler.saa_routing.mean_key_logits`). ``sampled_key_logits_kernel`` gives the ``"sampled-keys"``
router's logits: for each scored query row (the last of each run of ``query_stride``), its scores
against every ``key_stride``-th key of each (shortlisted) key block, normalized per row and maximized
over the query block (PyTorch form:
:func:`attncompiler.saa_routing.sampled_key_logits`). ``select_blocks_kernel`` picks each query
block's exact key blocks from the logits (PyTorch form:
:func:`attncompiler.saa_routing.select_blocks`). For the default operating point (a top-k over a
shortlist, 2-byte inputs) ``sampled_key_selection_kernel`` does both in one launch, without writing
the logits. ``saa_attend_kernel`` keeps a ``[BLOCK_M, D]``
query tile on chip and folds two kinds of entries into one online softmax (base 2): the keys of
the key blocks routed to this query block, exactly, and then the centroids of every other full key
block, whose logits carry ``log2 n`` for the ``n`` keys each stands for; both move by TMA
descriptors on Hopper and by pointer loads elsewhere. Beyond ``near_blocks`` of the diagonal, one
centroid per group of ``far_group`` key blocks: the group's key and value sums (from the centroid
kernel, once per call) less those of its exact blocks, over its remaining keys. The PyTorch oracle is
:func:`attncompiler.saa_reference.attend_reference`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from attncompiler.codegen.fallback import FormFallback
from attncompiler.codegen.flash import launch_tma_or_pointers
from attncompiler.codegen.saa_blocks import (allowed_blocks, diagonal_block, full_blocks, keys_behind, keys_seen,
                                             query_block_program)
from attncompiler.codegen.saa_hopper import LOG2E, hopper_attend, hopper_attend_supported
from attncompiler.codegen.saa_hopper_router import hopper_listed_logits, hopper_router_supported
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_reference import Centroids, FarSums
from attncompiler.saa_routing import BlockGeometry, Selection, group_counts, selection_width, shortlist_size


# Pipeline depths of the attend pass: its routed key blocks and its centroid loop (which streams in
# order). On an H200 at 32K and 128K tokens (D128 and D64), 2 and 2 were fastest of 1-2 and 1-4:
# 7.12 ms at 128K (D128), against 7.21 with 3 centroid stages and 8.96 with one stage for both
# (benchmarks/saa.py --sweep).
EXACT_STAGES = 2
CENTROID_STAGES = 2
# Pipeline depth of the fused router-and-top-k (and of the one-pass router kernel, the same loop):
# on an H200 at the default operating point (4 warps), 2 stages took 2.11 ms at 128K (D128) against
# 2.46 with 1 and 2.76 with 3 or 4; 8 warps were slower.
FUSED_SELECTION_STAGES = 2
# Registers a thread of the fused router-and-top-k, where its block sums take at most 32 (scored rows
# times list entries <= 4096, as at the default operating point): 4 programs an SM instead of the 3 its
# 147 allow, the few spills outside its loop. On an H200 (router ms): 0.853 → 0.751 at SmolLM2's 8K
# shape, 0.506 → 0.448 D64 32K, 0.317 → 0.295 D128 32K, 1.285 → 1.176 D128 128K. At 96 (5 programs, spills in
# the loop) D64 gained 2-3% and D128 lost up to 19%.
FUSED_SELECTION_REGISTERS = 128
# Warps of the selection from given logits (select_listed_kernel, after the Gluon router). On an H200 (the Gluon
# router and this selection, the default operating point): 1 / 2 / 4 warps 0.565 / 0.603 / 0.720 ms at
# SmolLM2's 8K shape, 2.723 / 2.895 / 3.378 at its 32K shape.
SELECT_LISTED_WARPS = 1
# Registers a thread of the attend pass with 2-byte inputs at head dims <= 64 and 8 warps: two programs an SM
# (their 83 KB of shared memory fit twice), where ptxas would take 247 and fit one; no spills. On an H200
# (attend ms, the same plan, random bf16 inputs), against the earlier 4 warps uncapped: 2.80 → 2.61 at
# SmolLM2's 8K shape, 1.47 → 1.39 D64 32K, 6.08 → 5.79 D64 128K, 12.3 → 11.6 at SmolLM2's 32K shape; 8 warps
# uncapped (or capped at 168) took 3.76, 2.05, 8.57 and 16.7. (At head dim 128 one program fills the shared
# memory, and a cap of 128 spills.)
SMALL_HEAD_ATTEND_REGISTERS = 128
# Near centroids a step of the attend pass: a query block has up to 47 of them at the default operating point
# (near_blocks 16, far groups of 32). On an H200 (attend ms, the same plan), tiles of 32 against 64: 2.60 → 2.57
# at SmolLM2's 8K shape, 1.38 → 1.37 D64 32K, 5.76 → 5.74 D64 128K; tiles of 16 no better.
NEAR_CENTROID_TILE = 32
# Elements of a tile per warp in the pooling and centroid kernels (one block of rows a program, streamed once):
# one warp for SAA's blocks of 128 rows at head dims up to 128. On an H200 (ms, random bf16 inputs, 1 / 4 warps):
# centroids 0.204 / 0.239 at SmolLM2's 32K shape (30 × 3 kv heads, D64), 0.279 / 0.327 D64 128K (32 heads),
# 0.278 / 0.341 D128 128K (16 heads); query means 0.275 / 0.319 at SmolLM2's 32K shape (9 heads), 0.137 / 0.162
# D64 128K, 0.138 / 0.149 D128 128K. Two warps fell between, eight were slower.
STREAM_TILE_PER_WARP = 16384
# Launch keys whose Gluon attend pass raised run this module's kernel.
HOPPER_FORMS = FormFallback("using the Triton attend pass")


@triton.jit
def mean_key_logits_kernel(
    QM, KM, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_om, stride_on,
    scale, H, GROUP, NUM_M, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET,
    CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, CHUNK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One ``[TILE_M, TILE_N]`` tile of the ``"mean-key"`` logits ``scale · q̄·k̄ + log n`` of one head (mean
    queries of TILE_M query blocks against mean keys of TILE_N key blocks, fp32). With CAUSAL, a tile
    whose key blocks no row of its query blocks sees is not computed (its logits stay unwritten)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * TILE_M + tl.arange(0, TILE_M)                        # [TM] query blocks
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)                        # [TN] key blocks
    seen = NUM_N
    if CAUSAL:
        seen = allowed_blocks(tl.minimum((pid_m * TILE_M + TILE_M) * BLOCK_M, SEQ_Q) - 1, KEY_OFFSET, SEQ_K, BLOCK_N)
    if pid_n * TILE_N < seen:
        p_q = QM + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
        p_k = KM + b * stride_kb + (h // GROUP) * stride_kh + offs_n[None, :] * stride_kn
        acc = tl.zeros([TILE_M, TILE_N], tl.float32)
        for start in tl.static_range(0, HEAD_D, CHUNK_D):
            offs_d = start + tl.arange(0, CHUNK_D)                        # [CD]
            b_q = tl.load(p_q + offs_d[None, :] * stride_qd, mask=(offs_m[:, None] < NUM_M)
                          & (offs_d[None, :] < HEAD_D), other=0.0)        # [TM, CD]
            b_k = tl.load(p_k + offs_d[:, None] * stride_kd, mask=(offs_n[None, :] < NUM_N)
                          & (offs_d[:, None] < HEAD_D), other=0.0)        # [CD, TN]
            acc = tl.dot(b_q, b_k, acc, input_precision=DOT_PRECISION)
        keys = tl.maximum(keys_behind(offs_n * BLOCK_N, SEQ_K, BLOCK_N), 1).to(tl.float32)  # [TN] (1 past the end)
        p_o = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(p_o, acc * scale + tl.log(keys)[None, :], mask=(offs_m[:, None] < NUM_M) & (offs_n[None, :] < NUM_N))


@triton.jit
def _pool_rows(X, OUT, pid_g, pid_bh, stride_xb, stride_xh, stride_xs, stride_xd, stride_ob, stride_oh, stride_og,
               stride_od, H, SEQ, HEAD_D, GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    """The fp32 mean of run pid_g of GROUP rows of head pid_bh of X (of its rows before SEQ; 0 if none) at OUT."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = pid_g * GROUP
    offs_s = start + tl.arange(0, GROUP)                                  # [G]
    offs_d = tl.arange(0, BLOCK_D)                                        # [BD]
    p_x = X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :] * stride_xd
    b_x = tl.load(p_x, mask=(offs_s[:, None] < SEQ) & (offs_d[None, :] < HEAD_D), other=0.0)  # [G, BD]
    count = tl.maximum(tl.minimum(SEQ - start, GROUP), 1)
    b_mean = tl.sum(b_x.to(tl.float32), 0) / count                        # [BD]
    p_o = OUT + b * stride_ob + h * stride_oh + pid_g * stride_og + offs_d * stride_od
    tl.store(p_o, b_mean, mask=offs_d < HEAD_D)


@triton.jit
def _block_centroids(K, V, KC, VC, KM, SUMS, FAR, ARRIVED, pid_n, pid_bh,
                     stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_cb, stride_ch, stride_cn, stride_cd, stride_wb, stride_wh, stride_wn, stride_wd,
                     stride_mb, stride_mh, stride_mn, stride_md, H, SEQ, HEAD_D, HEAD_DV, NUM_N, SUM_ROWS,
                     CENTROIDS: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     WITH_SUMS: tl.constexpr, FAR_GROUP: tl.constexpr):
    """Key block pid_n of kv head pid_bh: the mean key and value of each of its CENTROIDS runs of SUB keys
    (in KC's and VC's dtype; 0 for a run past SEQ) and the block's mean key in fp32 (KM, for routing).
    WITH_SUMS, also the fp32 sums of its centroids times the keys behind each, keys then values (SUMS
    ``[B·H, SUM_ROWS, D + Dv]``, the far groups' terms), and their far group's (:func:`_far_group_sum`)."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)                                        # [BD]
    offs_dv = tl.arange(0, BLOCK_DV)                                      # [BDV]
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    key_sum = tl.zeros([BLOCK_D], tl.float32)                             # [BD]
    key_terms = tl.zeros([BLOCK_D], tl.float32)                           # [BD] centroid keys times counts
    value_terms = tl.zeros([BLOCK_DV], tl.float32)                        # [BDV]
    for c in tl.static_range(CENTROIDS):
        run = pid_n * CENTROIDS + c
        offs_s = run * SUB + tl.arange(0, SUB)                            # [SUB] keys of this run
        s_ok = offs_s < SEQ
        b_k = tl.load(K_bh + offs_s[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                      mask=s_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)  # [SUB, BD]
        b_v = tl.load(V_bh + offs_s[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                      mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)  # [SUB, BDV]
        count = tl.maximum(tl.minimum(SEQ - run * SUB, SUB), 1)
        run_keys = tl.sum(b_k.to(tl.float32), 0)                          # [BD]
        key_sum += run_keys
        key_mean = (run_keys / count).to(KC.dtype.element_ty)             # [BD]
        value_mean = (tl.sum(b_v.to(tl.float32), 0) / count).to(VC.dtype.element_ty)  # [BDV]
        tl.store(KC + b * stride_cb + h * stride_ch + run * stride_cn + offs_d * stride_cd, key_mean,
                 mask=offs_d < HEAD_D)
        tl.store(VC + b * stride_wb + h * stride_wh + run * stride_wn + offs_dv * stride_wd, value_mean,
                 mask=offs_dv < HEAD_DV)
        if WITH_SUMS:  # (a run past SEQ has mean 0)
            key_terms += key_mean.to(tl.float32) * count
            value_terms += value_mean.to(tl.float32) * count
    block_count = tl.maximum(tl.minimum(SEQ - pid_n * CENTROIDS * SUB, CENTROIDS * SUB), 1)
    tl.store(KM + b * stride_mb + h * stride_mh + pid_n * stride_mn + offs_d * stride_md, key_sum / block_count,
             mask=offs_d < HEAD_D)
    if WITH_SUMS:
        p_sums = SUMS + (pid_bh.to(tl.int64) * SUM_ROWS + pid_n) * (HEAD_D + HEAD_DV)
        tl.store(p_sums + offs_d, key_terms, mask=offs_d < HEAD_D)
        tl.store(p_sums + HEAD_D + offs_dv, value_terms, mask=offs_dv < HEAD_DV)
        _far_group_sum(SUMS, FAR, ARRIVED, pid_n, pid_bh, offs_d, offs_dv, HEAD_D, HEAD_DV, NUM_N, SUM_ROWS, FAR_GROUP)


@triton.jit
def _far_group_sum(SUMS, FAR, ARRIVED, pid_n, pid_bh, offs_d, offs_dv, HEAD_D, HEAD_DV, NUM_N, SUM_ROWS,
                   FAR_GROUP: tl.constexpr):
    """Once key block pid_n has stored its sums: if it is the last of its group's blocks to arrive (counted
    at ARRIVED ``[B·H·G]``, zeros at the launch), the group's sum, its blocks' rows added in block order
    (so the same whichever arrives last), at FAR ``[B·H, G, D + Dv]``. No program waits for another. On an
    H200 this took SmolLM2's 30 per-layer calls at 8K from 3.97 to 3.89 ms against a PyTorch reduction
    after the launch (0.35 → 0.30 ms for the launch and the reduction alone)."""
    group = pid_n // FAR_GROUP
    num_groups = SUM_ROWS // FAR_GROUP
    tl.debug_barrier()                                                    # every thread's sums are stored
    arrived = tl.atomic_add(ARRIVED + pid_bh.to(tl.int64) * num_groups + group, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.minimum(NUM_N - group * FAR_GROUP, FAR_GROUP) - 1:
        rows = group * FAR_GROUP + tl.arange(0, FAR_GROUP)               # [F] key blocks of the group
        p_rows = SUMS + (pid_bh.to(tl.int64) * SUM_ROWS + rows[:, None]) * (HEAD_D + HEAD_DV)
        row_ok = rows[:, None] < NUM_N
        keys = tl.load(p_rows + offs_d[None, :], mask=row_ok & (offs_d[None, :] < HEAD_D), other=0.0,
                       cache_modifier=".cg")                              # [F, BD] (from L2: other SMs wrote them)
        values = tl.load(p_rows + HEAD_D + offs_dv[None, :], mask=row_ok & (offs_dv[None, :] < HEAD_DV),
                         other=0.0, cache_modifier=".cg")                 # [F, BDV]
        p_far = FAR + (pid_bh.to(tl.int64) * num_groups + group) * (HEAD_D + HEAD_DV)
        tl.store(p_far + offs_d, tl.sum(keys, 0), mask=offs_d < HEAD_D)
        tl.store(p_far + HEAD_D + offs_dv, tl.sum(values, 0), mask=offs_dv < HEAD_DV)


@triton.jit
def saa_means_kernel(
    Q, QM, K, V, KC, VC, KM, SUMS, FAR, ARRIVED,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_ob, stride_oh, stride_og, stride_od,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_mb, stride_mh, stride_mn, stride_md,
    H, SEQ_Q, HEAD_QD, NUM_M, POOL_PROGRAMS, KV_H, SEQ_K, HEAD_D, HEAD_DV, NUM_N, SUM_ROWS, KEY_OFFSET, UNPOOLED,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_QD: tl.constexpr, CENTROIDS: tl.constexpr,
    SUB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WITH_SUMS: tl.constexpr,
    FAR_GROUP: tl.constexpr,
):
    """SAA's block means in one launch (a 1-D grid): the first POOL_PROGRAMS programs pool a query block of
    one head each (its mean query, fp32, at QM; 0, unread, where the query block sees at most UNPOOLED
    key blocks), the others take a key block of one kv head each (its centroids, mean key and sums, and
    the last of a far group its group's sum: :func:`_block_centroids`). Both stream their rows once."""
    pid = tl.program_id(0)
    if pid < POOL_PROGRAMS:
        m = pid % NUM_M
        seen = NUM_N
        if CAUSAL:
            seen = allowed_blocks(tl.minimum((m + 1) * BLOCK_M, SEQ_Q) - 1, KEY_OFFSET, SEQ_K, CENTROIDS * SUB)
        _pool_rows(Q, QM, m, pid // NUM_M, stride_qb, stride_qh, stride_qs, stride_qd, stride_ob,
                   stride_oh, stride_og, stride_od, H, tl.where(seen > UNPOOLED, SEQ_Q, 0), HEAD_QD, BLOCK_M, BLOCK_QD)
    else:
        pid -= POOL_PROGRAMS
        _block_centroids(K, V, KC, VC, KM, SUMS, FAR, ARRIVED, pid % NUM_N, pid // NUM_N, stride_kb, stride_kh,
                         stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_cb, stride_ch,
                         stride_cn, stride_cd, stride_wb, stride_wh, stride_wn, stride_wd, stride_mb, stride_mh,
                         stride_mn, stride_md, KV_H, SEQ_K, HEAD_D, HEAD_DV, NUM_N, SUM_ROWS, CENTROIDS, SUB,
                         BLOCK_D, BLOCK_DV, WITH_SUMS, FAR_GROUP)


@triton.jit
def _forced_blocks(blocks, m, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET, SINKS, LOCAL, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(allowed, forced)`` for key blocks ``blocks`` of query block m: whether some row may see them,
    and whether they are kept whatever the router says (sinks, the local blocks up to the diagonal,
    blocks that some row sees only in part)."""
    first = m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, SEQ_Q) - 1
    diagonal = diagonal_block(last, KEY_OFFSET, SEQ_Q, SEQ_K, CAUSAL, BLOCK_N)
    allowed = NUM_N
    full = NUM_N
    if CAUSAL:
        allowed = diagonal + 1
        full = full_blocks(first, KEY_OFFSET, SEQ_K, NUM_N, BLOCK_N)
    is_allowed = blocks < allowed
    forced = is_allowed & ((blocks < SINKS) | (blocks >= full) | ((blocks <= diagonal) & (blocks > diagonal - LOCAL)))
    return is_allowed, forced


@triton.jit
def _order_bits(priority):
    """fp32 priorities as int32 bits that order as the priorities do."""
    bits = priority.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _top_k(priority, forced, TOP_K, USE_TOP_K: tl.constexpr):
    """Which entries to keep: the forced ones and the TOP_K next largest priorities (every finite one
    without USE_TOP_K), ties to the earlier entry. A top-k needs no order: the want-th largest
    priority, found bit by bit, is the threshold (32 counts instead of a sort)."""
    ordinal = (_order_bits(priority) ^ -2147483648).to(tl.uint32, bitcast=True)  # [N] in the same order, unsigned
    candidate = priority > float("-inf")
    candidates = tl.sum(candidate.to(tl.int32), 0)
    want = candidates
    if USE_TOP_K:
        want = tl.minimum(want, tl.sum(forced.to(tl.int32), 0) + TOP_K)
    threshold = tl.zeros([], tl.uint32)                                  # (0: every candidate is above it)
    if want < candidates:                                                 # (else every candidate is kept)
        for bit in tl.static_range(31, -1, -1):
            trial = threshold | tl.full([], 1 << bit, tl.uint32)
            threshold = tl.where(tl.sum((ordinal >= trial).to(tl.int32), 0) >= want, trial, threshold)
    above = candidate & (ordinal > threshold)
    tie = candidate & (ordinal == threshold)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= want - tl.sum(above.to(tl.int32), 0)))


@triton.jit
def _top_k_of_ranked(priority, ranked, want, N: tl.constexpr):
    """What :func:`_top_k` keeps of ``want`` entries, from ``ranked`` (the priorities sorted, largest
    first): the want-th largest is the threshold, ties go to the earlier entry. One sort of a short list
    serves both this and ``tau``'s masses; on an H200 it took the Gluon router and its selection from
    0.561 to 0.541 ms at SmolLM2's 8K shape (1.120 to 1.065 per layer) and the fused Triton kernel from
    0.756 to 0.717, against ranking every pair of entries (the same selections)."""
    rank = tl.arange(0, N)
    threshold = tl.max(tl.where(rank == want - 1, ranked, float("-inf")), 0)
    threshold = tl.where(want > 0, threshold, float("inf"))
    candidate = priority > float("-inf")
    above = candidate & (priority > threshold)
    tie = candidate & (priority == threshold)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= want - tl.sum(above.to(tl.int32), 0)))


@triton.jit
def _mass_terms(priority, logits, is_allowed, forced):
    """``tau``'s estimated masses before their order: ``(routed, top, weight, total, forced_mass)``, which
    entries are routed (a finite priority), the largest allowed logit (0 if none), each allowed entry's
    ``exp(logit - top)`` (0 elsewhere), their sum, and the forced entries' share of it."""
    routed = (priority < float("inf")) & (priority > float("-inf"))
    top = tl.max(tl.where(is_allowed, logits, float("-inf")), 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(is_allowed, tl.exp(logits - top), 0.0)
    total = tl.sum(weight, 0)
    return routed, top, weight, total, tl.sum(tl.where(forced, weight, 0.0), 0) / total


@triton.jit
def _kept_by_ranked_mass(priority, ranked, logits, is_allowed, forced, TOP_K, TAU, N: tl.constexpr):
    """What :func:`_kept_by_mass` counts (with a top-k), from ``ranked`` (the priorities sorted, largest
    first: the forced ones, then the routed ones, whose masses so come in the same order as sorting them
    would put them)."""
    routed, top, weight, total, forced_mass = _mass_terms(priority, logits, is_allowed, forced)
    n_routed = tl.sum(routed.to(tl.int32), 0)
    rank = tl.arange(0, N)
    routed_logits = tl.gather(ranked, tl.minimum(rank + tl.sum(forced.to(tl.int32), 0), N - 1), 0)  # [N]
    routed_mass = tl.where(rank < n_routed, tl.exp(routed_logits - top), 0.0) / total  # [N] largest first
    before = forced_mass + tl.cumsum(routed_mass, 0) - routed_mass
    return tl.minimum(tl.sum(((rank < n_routed) & (before < TAU)).to(tl.int32), 0), TOP_K)


@triton.jit
def _store_in_order(IDX_ROW, CNT_ROW, blocks, keep, slots, MAX_EXACT):
    """Lists the kept ``blocks`` (in their order) at IDX_ROW, zeros after them, and their count at CNT_ROW."""
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    count = tl.sum(keep.to(tl.int32), 0)
    tl.store(CNT_ROW, count)
    tl.store(IDX_ROW + slot, blocks, mask=keep)
    tl.store(IDX_ROW + slots, tl.zeros_like(slots), mask=(slots >= count) & (slots < MAX_EXACT))


@triton.jit
def _sampled_scores(q, K, stride_kn, stride_kd, offs_r, offs_d, sample_blocks, sample_ok, SEQ_K, qk_scale,
                    KEY_OFFSET, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    WIDTH: tl.constexpr, STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    WHOLE: tl.constexpr = False):
    """``[BM, W]``: each row's scores (log2 domain) against W samples, sample s being key
    ``(s % spb) · STRIDE`` of key block ``sample_blocks[s]`` (spb = BLOCK_N / STRIDE samples per block);
    -inf where not visible or not ``sample_ok``. WHOLE: every sample exists and every row sees it (no masks)."""
    PER_BLOCK: tl.constexpr = BLOCK_N // STRIDE
    offs_s = tl.arange(0, WIDTH)                                          # [W] samples
    keys = sample_blocks * BLOCK_N + (offs_s % PER_BLOCK) * STRIDE        # [W] their keys
    p_kt = K + keys[None, :] * stride_kn + offs_d[:, None] * stride_kd    # [BD, W]
    if WHOLE:
        b_kt = tl.load(p_kt, mask=offs_d[:, None] < HEAD_D, other=0.0)
        return tl.dot(q, b_kt, input_precision=DOT_PRECISION) * qk_scale
    key_ok = (keys < SEQ_K) & sample_ok
    b_kt = tl.load(p_kt, mask=key_ok[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
    scores = tl.dot(q, b_kt, input_precision=DOT_PRECISION) * qk_scale   # [BM, W]
    visible = key_ok[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= offs_r[:, None] + KEY_OFFSET)
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def _mass_logit(mass):
    """The log of a block's share of a row's mass; shares below 2**-126, which fp32 cannot tell from 0,
    read as 2**-126."""
    return tl.log(tl.maximum(mass, 1.1754943508222875e-38))


@triton.jit
def _query_tile(Q, K, pid_m, pid_bh, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, H, GROUP,
                SEQ_Q, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """The ROWS scored rows of query block pid_m of batch·head pid_bh: the
    last of each run of S = BLOCK_M / ROWS rows, and the block's last row (a ragged last block's rows
    past it repeat it). ``(b_q [R, BD], offs_r [R] rows, offs_d [BD], row_ok [R], K_bh)``, K_bh the keys
    of its key/value head."""
    S: tl.constexpr = BLOCK_M // ROWS
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_r = pid_m * BLOCK_M + tl.arange(0, ROWS) * S + (S - 1)           # [R] query rows
    if S > 1:
        offs_r = tl.minimum(offs_r, tl.minimum(pid_m * BLOCK_M + BLOCK_M, SEQ_Q) - 1)
    offs_d = tl.arange(0, BLOCK_D)                                        # [BD]
    row_ok = offs_r < SEQ_Q
    p_q = Q + b * stride_qb + h * stride_qh + offs_r[:, None] * stride_qm + offs_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)  # [R, BD]
    return b_q, offs_r, offs_d, row_ok, K + b * stride_kb + (h // GROUP) * stride_kh


@triton.jit
def _list_blocks(LIST, slots, n_slots, LISTED: tl.constexpr):
    """The key blocks at positions ``slots`` of a query block's list (LIST, or 0, 1, ... when not
    LISTED), and which of them exist."""
    ok = slots < n_slots
    if LISTED:
        return tl.load(LIST + slots, mask=ok, other=0), ok
    return slots, ok


@triton.jit
def _whole_entries(LIST, n_slots, first_row, KEY_OFFSET, SEQ_K, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   LIST_PAD: tl.constexpr):
    """How many of a query block's listed key blocks (in block order) every one of its rows sees whole:
    a prefix of the list (row first_row sees the fewest keys; the keys' end cuts the last block)."""
    blocks, listed = _list_blocks(LIST, tl.arange(0, LIST_PAD), n_slots, True)  # [LP]
    seen = SEQ_K
    if CAUSAL:
        seen = keys_seen(first_row, KEY_OFFSET, SEQ_K)
    return tl.sum((listed & ((blocks + 1) * BLOCK_N <= seen)).to(tl.int32), 0)


@triton.jit
def _step_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, LIST, start, n_slots, SEQ_K, score_scale,
                 KEY_OFFSET, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCKS: tl.constexpr, STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr, WHOLE: tl.constexpr):
    """``[R, W]``: the rows' scores (``score_scale · q·k``) against the samples of the BLOCKS listed key
    blocks from list position start."""
    PER_BLOCK: tl.constexpr = BLOCK_N // STRIDE
    SAMPLES: tl.constexpr = BLOCKS * PER_BLOCK
    sample_slot = tl.arange(0, SAMPLES) // PER_BLOCK                      # [W] list position of each sample
    blocks, ok = _list_blocks(LIST, start + sample_slot, n_slots, True)  # [W] key block of each sample
    return _sampled_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, blocks, ok, SEQ_K, score_scale,
                           KEY_OFFSET, CAUSAL, HEAD_D, BLOCK_N, SAMPLES, STRIDE, DOT_PRECISION, WHOLE)


@triton.jit
def _add_step(s, shift, l_i, acc, start, rate, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
              STEPS: tl.constexpr, STRIDE: tl.constexpr):
    """Adds a step's probabilities ``exp2(s · rate - shift)`` (s ``[R, W]``, shift ``[R]``) to the row sums
    l_i and, summed per key block, into the step's (zero) columns of acc ``[R, ST, BLOCKS]``."""
    PER_BLOCK: tl.constexpr = BLOCK_N // STRIDE
    p = tl.exp2(s * rate - shift[:, None])                                # [R, W]
    step_sums = tl.sum(tl.reshape(p, [ROWS, BLOCKS, PER_BLOCK]), 2)       # [R, BLOCKS]
    this_step = tl.arange(0, STEPS)[None, :, None] == start // BLOCKS     # [1, ST, 1]
    # (the row sums from p, not from step_sums: that layout change took the router to 255 registers)
    return l_i + tl.sum(p, 1), tl.where(this_step, step_sums[:, None, :], acc)


@triton.jit
def _rescaling_step(s, m_i, l_i, acc, start, rate, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCKS: tl.constexpr, STEPS: tl.constexpr, STRIDE: tl.constexpr):
    """:func:`_add_step` against the running row maxima m_i (the scores' units), rescaling the sums
    before as the maxima grow (as an attention accumulator is)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_use) * rate)                                 # [R]
    l_i, acc = _add_step(s, m_use * rate, l_i * alpha, acc * alpha[:, None, None], start, rate, ROWS, BLOCK_N,
                         BLOCKS, STEPS, STRIDE)
    return m_new, l_i, acc


@triton.jit
def _listed_block_masses(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, row_ok, LIST, n_slots, n_whole,
                         SEQ_K, qk_scale, KEY_OFFSET, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
                         LIST_PAD: tl.constexpr, STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         FOLD_SCALE: tl.constexpr):
    """``[LIST_PAD]``: for each of the n_slots key blocks at LIST, the largest over the rows of its
    share of the row's sampled probability mass, in one pass: each step's sampled probabilities are
    summed per block (BLOCKS <= LIST_PAD blocks a step) into that step's columns.

    The probabilities are taken against each row's largest score of the first step (its listed blocks
    come first in block order: every row that sees a sampled key sees the first block's), never
    rescaled. A later probability may reach about 2**115 before a row sum passes 2**126, where its
    reciprocal would flush to 0; if one does, the whole list is taken again with running maxima
    (:func:`_rescaling_step`). Small shares lose nothing against running maxima, which are never below
    the first step's. The steps within the first n_whole entries (blocks every row sees whole) take no
    masks (on an H200 at 128K, the fused router-and-top-k took 1.85 ms against 1.98 with every step
    masked for D128, 3.08 against 3.35 for D64). FOLD_SCALE (qk_scale > 0) applies qk_scale in the
    exponent rather than to the scores (the fused router-and-top-k on an H200: 2.03 → 1.97 ms at 128K,
    D128; 1.37 → 1.33 at 8K, SmolLM2's shape)."""
    STEPS: tl.constexpr = LIST_PAD // BLOCKS
    score_scale = qk_scale
    rate = 1.0
    if FOLD_SCALE:
        score_scale = 1.0
        rate = qk_scale
    l_i = tl.zeros([ROWS], tl.float32)                                    # [R] row sum
    acc = tl.zeros([ROWS, STEPS, BLOCKS], tl.float32)                     # [R, ST, BLOCKS] row sums per listed block
    s = _step_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, LIST, 0, n_slots, SEQ_K, score_scale,
                     KEY_OFFSET, CAUSAL, HEAD_D, BLOCK_N, BLOCKS, STRIDE, DOT_PRECISION, False)
    reference = tl.max(s, 1)                                              # [R] (scores' units)
    shift = tl.where(reference == float("-inf"), 0.0, reference) * rate   # [R] (log2 units)
    l_i, acc = _add_step(s, shift, l_i, acc, 0, rate, ROWS, BLOCK_N, BLOCKS, STEPS, STRIDE)
    whole_end = n_whole // BLOCKS * BLOCKS
    for start in range(BLOCKS, whole_end, BLOCKS):
        s = _step_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, LIST, start, n_slots, SEQ_K, score_scale,
                         KEY_OFFSET, CAUSAL, HEAD_D, BLOCK_N, BLOCKS, STRIDE, DOT_PRECISION, True)
        l_i, acc = _add_step(s, shift, l_i, acc, start, rate, ROWS, BLOCK_N, BLOCKS, STEPS, STRIDE)
    for start in range(tl.maximum(whole_end, BLOCKS), n_slots, BLOCKS):
        s = _step_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, LIST, start, n_slots, SEQ_K, score_scale,
                         KEY_OFFSET, CAUSAL, HEAD_D, BLOCK_N, BLOCKS, STRIDE, DOT_PRECISION, False)
        l_i, acc = _add_step(s, shift, l_i, acc, start, rate, ROWS, BLOCK_N, BLOCKS, STEPS, STRIDE)
    if tl.max(l_i, 0) > 8.5e37:  # a sum passed 2**126: again, with running maxima
        m_i = tl.full([ROWS], float("-inf"), tl.float32)                  # [R] row maximum (scores' units)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, STEPS, BLOCKS], tl.float32)
        for start in range(0, n_slots, BLOCKS):
            s = _step_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, LIST, start, n_slots, SEQ_K,
                             score_scale, KEY_OFFSET, CAUSAL, HEAD_D, BLOCK_N, BLOCKS, STRIDE, DOT_PRECISION, False)
            m_i, l_i, acc = _rescaling_step(s, m_i, l_i, acc, start, rate, ROWS, BLOCK_N, BLOCKS, STEPS, STRIDE)
    share = tl.where(row_ok & (l_i > 0), 1.0 / tl.maximum(l_i, 1e-30), 0.0)  # [R] (rows without keys drop out)
    return tl.reshape(tl.max(acc * share[:, None, None], 0), [LIST_PAD])


@triton.jit
def _block_masses_two_pass(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, row_ok, p_out, LIST, n_slots, SEQ_K,
                           qk_scale, KEY_OFFSET, LISTED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, LANES: tl.constexpr,
                           STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The n_slots key blocks (at LIST when LISTED, else 0 .. n_slots-1) in two passes: each row's
    logsumexp over its sampled scores s, then per block ``exp(s - lse)`` summed by a product with the
    samples' block membership; stores the log of the largest sum over the rows at ``p_out + block``."""
    PER_BLOCK: tl.constexpr = BLOCK_N // STRIDE
    SAMPLES: tl.constexpr = BLOCKS * PER_BLOCK
    sample_slot = tl.arange(0, SAMPLES) // PER_BLOCK                      # [W] slot of each sample in a step
    m_i = tl.full([ROWS], float("-inf"), tl.float32)                      # [R] row maximum (log2)
    l_i = tl.zeros([ROWS], tl.float32)                                    # [R] row sum
    for start in range(0, n_slots, BLOCKS):
        blocks, ok = _list_blocks(LIST, start + sample_slot, n_slots, LISTED)  # [W]
        s = _sampled_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, blocks, ok, SEQ_K, qk_scale,
                            KEY_OFFSET, CAUSAL, HEAD_D, BLOCK_N, SAMPLES, STRIDE, DOT_PRECISION)  # [R, W]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log2(tl.maximum(l_i, 1e-30))                           # [R]
    lse = tl.where(row_ok & (l_i > 0), lse, float("inf"))                 # rows without keys drop out
    lanes = tl.arange(0, LANES)
    for start in range(0, n_slots, BLOCKS):
        offs_n, n_ok = _list_blocks(LIST, start + lanes, n_slots, LISTED)  # [NB]
        blocks, ok = _list_blocks(LIST, start + sample_slot, n_slots, LISTED)  # [W]
        s = _sampled_scores(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, blocks, ok, SEQ_K, qk_scale,
                            KEY_OFFSET, CAUSAL, HEAD_D, BLOCK_N, SAMPLES, STRIDE, DOT_PRECISION)  # [R, W]
        member = (sample_slot[:, None] == lanes[None, :]).to(tl.float32)  # [W, NB] samples' block membership
        mass = tl.dot(tl.exp2(s - lse[:, None]), member, input_precision=DOT_PRECISION)  # [R, NB]
        tl.store(p_out + offs_n, _mass_logit(tl.max(mass, 0)), mask=n_ok & (lanes < BLOCKS))


@triton.jit
def sampled_key_logits_kernel(
    Q, K, OUT, IDX, CNT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    qk_scale, H, GROUP, NUM_M, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET, LIST_WIDTH,
    SHORTLIST: tl.constexpr, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, LANES: tl.constexpr,
    LIST_PAD: tl.constexpr, ONE_PASS: tl.constexpr, STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
):
    """One query block's ``"sampled-keys"`` logits, BLOCKS key blocks per step: the log of the largest
    share of a row's sampled probability mass that falls in each key block (shares below 2**-126,
    which fp32 cannot tell from 0, read as 2**-126).

    With SHORTLIST it visits only the ``CNT`` key blocks listed in ``IDX`` (``[B·H·num_m, LIST_WIDTH]``,
    at most LIST_PAD) for this query block and leaves the other logits as they are (the caller fills
    them with -inf); without, every key block up to the diagonal, and -inf past it. ONE_PASS (for a
    shortlist of 2-byte inputs) sums the blocks' shares in one pass; otherwise two passes take LANES
    >= BLOCKS lanes per step (at least 16 for ``tl.dot``); with fp32 inputs at head dim 128 the one-pass
    form failed on an H200."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b_q, offs_r, offs_d, row_ok, K_bh = _query_tile(Q, K, pid_m, pid_bh, stride_qb, stride_qh, stride_qm, stride_qd,
                                                    stride_kb, stride_kh, H, GROUP, SEQ_Q, HEAD_D, BLOCK_D, BLOCK_M,
                                                    ROWS)
    p_out = OUT + pid_bh.to(tl.int64) * NUM_M * NUM_N + pid_m * NUM_N

    list_row = pid_bh.to(tl.int64) * NUM_M + pid_m
    shortlist_row = IDX + list_row * LIST_WIDTH                           # this query block's list
    if SHORTLIST and ONE_PASS:
        n_slots = tl.load(CNT + list_row)
        n_whole = _whole_entries(shortlist_row, n_slots, pid_m * BLOCK_M, KEY_OFFSET, SEQ_K, CAUSAL, BLOCK_N,
                                 LIST_PAD)
        best = _listed_block_masses(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, row_ok, shortlist_row,
                                    n_slots, n_whole, SEQ_K, qk_scale, KEY_OFFSET, CAUSAL, HEAD_D, ROWS, BLOCK_N,
                                    BLOCKS, LIST_PAD, STRIDE, DOT_PRECISION, FOLD_SCALE)  # [LP]
        blocks, listed = _list_blocks(shortlist_row, tl.arange(0, LIST_PAD), n_slots, True)  # [LP]
        tl.store(p_out + blocks, _mass_logit(best), mask=listed)
    elif SHORTLIST:
        _block_masses_two_pass(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, row_ok, p_out, shortlist_row,
                               tl.load(CNT + list_row), SEQ_K, qk_scale, KEY_OFFSET, True, CAUSAL, HEAD_D, ROWS,
                               BLOCK_N, BLOCKS, LANES, STRIDE, DOT_PRECISION)
    else:
        n_end = NUM_N
        if CAUSAL:  # key blocks past the last row's last visible key: -inf
            last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, SEQ_Q) - 1
            n_end = allowed_blocks(last_row, KEY_OFFSET, SEQ_K, BLOCK_N)
        _block_masses_two_pass(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, row_ok, p_out, IDX, n_end, SEQ_K,
                               qk_scale, KEY_OFFSET, False, CAUSAL, HEAD_D, ROWS, BLOCK_N, BLOCKS, LANES, STRIDE,
                               DOT_PRECISION)
        lanes = tl.arange(0, LANES)
        for start in range(n_end, NUM_N, LANES):
            offs_n = start + lanes
            tl.store(p_out + offs_n, tl.full([LANES], float("-inf"), tl.float32), mask=offs_n < NUM_N)


@triton.jit
def _keep_listed(listed_logits, shortlist_row, n_slots, row, pid_m, IDX, CNT, EXACT, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET,
                 MAX_EXACT, SINKS, LOCAL, TOP_K, TAU, CAUSAL: tl.constexpr, USE_TAU: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LIST_PAD: tl.constexpr):
    """Query block ``row``'s selection from the logits ``[LP]`` of the n_slots key blocks of its shortlist
    (in block order): the forced blocks and the TOP_K best of the rest (with USE_TAU, at most the TOP_K
    best that bring the estimated mass to TAU), listed in block order at IDX with their count at CNT;
    EXACT (holding the shortlist's flags) is left holding the kept ones."""
    slots = tl.arange(0, LIST_PAD)
    blocks, listed = _list_blocks(shortlist_row, slots, n_slots, True)   # [LP] in block order
    _, forced = _forced_blocks(blocks, pid_m, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET, SINKS, LOCAL, CAUSAL, BLOCK_M,
                               BLOCK_N)
    forced = forced & listed
    logits = tl.where(listed, listed_logits, float("-inf"))               # [LP] (unlisted blocks: no mass)
    priority = tl.where(forced, float("inf"), logits)
    ranked = tl.sort(priority, 0, descending=True)                        # [LP] largest first
    budget = TOP_K
    if USE_TAU:
        budget = _kept_by_ranked_mass(priority, ranked, logits, listed, forced, TOP_K, TAU, LIST_PAD)
    want = tl.minimum(tl.sum((priority > float("-inf")).to(tl.int32), 0), tl.sum(forced.to(tl.int32), 0) + budget)
    keep = _top_k_of_ranked(priority, ranked, want, LIST_PAD)
    _store_in_order(IDX + row * MAX_EXACT, CNT + row, blocks, keep, slots, MAX_EXACT)
    tl.store(EXACT + row * NUM_N + blocks, keep.to(tl.int8), mask=listed)


@triton.jit
def sampled_key_selection_kernel(
    Q, K, LIST, LIST_CNT, IDX, CNT, EXACT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    qk_scale, H, GROUP, NUM_M, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET, LIST_WIDTH, MAX_EXACT, SINKS, LOCAL, TOP_K, TAU,
    CAUSAL: tl.constexpr, USE_TAU: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, LIST_PAD: tl.constexpr,
    STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr, LAST_FIRST: tl.constexpr,
):
    """One query block's ``"sampled-keys"`` top-k (a program of a 1-D grid, its query block and batch·head
    by :func:`query_block_program`), straight from its shortlist (2-byte inputs): the
    one-pass logits of the listed key blocks, then the forced blocks and the TOP_K best of the rest
    (with USE_TAU, at most the TOP_K best that bring the estimated mass to TAU), listed in block order
    at IDX with their count at CNT. The same selection as
    ``select_blocks_kernel`` makes of ``sampled_key_logits_kernel``'s logits, without writing them.
    EXACT holds the shortlist's flags (its listed blocks set) and is left holding the kept ones."""
    pid_m, pid_bh = query_block_program(tl.program_id(0), NUM_M, LAST_FIRST)
    b_q, offs_r, offs_d, row_ok, K_bh = _query_tile(Q, K, pid_m, pid_bh, stride_qb, stride_qh, stride_qm, stride_qd,
                                                    stride_kb, stride_kh, H, GROUP, SEQ_Q, HEAD_D, BLOCK_D, BLOCK_M,
                                                    ROWS)
    row = pid_bh.to(tl.int64) * NUM_M + pid_m                             # (b, h, query block)
    shortlist_row = LIST + row * LIST_WIDTH
    n_slots = tl.load(LIST_CNT + row)
    n_whole = _whole_entries(shortlist_row, n_slots, pid_m * BLOCK_M, KEY_OFFSET, SEQ_K, CAUSAL, BLOCK_N, LIST_PAD)
    best = _listed_block_masses(b_q, K_bh, stride_kn, stride_kd, offs_r, offs_d, row_ok, shortlist_row,
                                n_slots, n_whole, SEQ_K, qk_scale, KEY_OFFSET, CAUSAL, HEAD_D, ROWS, BLOCK_N,
                                BLOCKS, LIST_PAD, STRIDE, DOT_PRECISION, FOLD_SCALE)  # [LP]
    _keep_listed(_mass_logit(best), shortlist_row, n_slots, row, pid_m, IDX, CNT, EXACT, NUM_N, SEQ_Q, SEQ_K,
                 KEY_OFFSET, MAX_EXACT, SINKS, LOCAL, TOP_K, TAU, CAUSAL, USE_TAU, BLOCK_M, BLOCK_N, LIST_PAD)


@triton.jit
def select_listed_kernel(
    LOGITS, LIST, LIST_CNT, IDX, CNT, EXACT,
    NUM_M, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET, LIST_WIDTH, MAX_EXACT, SINKS, LOCAL, TOP_K, TAU,
    CAUSAL: tl.constexpr, USE_TAU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LIST_PAD: tl.constexpr,
):
    """The top-k of :func:`sampled_key_selection_kernel` from given logits of the listed key blocks
    (``LOGITS`` ``[B·H·num_m, LIST_PAD]``, in list order; program ids: query block, batch·head)."""
    pid_m = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) * NUM_M + pid_m                  # (b, h, query block)
    n_slots = tl.load(LIST_CNT + row)
    slots = tl.arange(0, LIST_PAD)
    logits = tl.load(LOGITS + row * LIST_PAD + slots, mask=slots < n_slots, other=float("-inf"))
    _keep_listed(logits, LIST + row * LIST_WIDTH, n_slots, row, pid_m, IDX, CNT, EXACT, NUM_N, SEQ_Q, SEQ_K,
                 KEY_OFFSET, MAX_EXACT, SINKS, LOCAL, TOP_K, TAU, CAUSAL, USE_TAU, BLOCK_M, BLOCK_N, LIST_PAD)


@triton.jit
def _kept_by_mass(priority, logits, is_allowed, forced, TOP_K, TAU, USE_TOP_K: tl.constexpr, N_PAD: tl.constexpr):
    """How many routed (not forced) blocks ``tau`` keeps: taken by priority, descending, while the
    estimated mass before each (the softmax of the logits over the allowed blocks, the forced ones'
    included) stays below TAU; at most TOP_K with USE_TOP_K. Blocks of equal priority have equal
    masses, so sorting the routed masses alone gives the count."""
    routed, _, weight, total, forced_mass = _mass_terms(priority, logits, is_allowed, forced)
    routed_mass = tl.sort(tl.where(routed, weight, 0.0) / total, 0, descending=True)  # [NP] largest first
    before = forced_mass + tl.cumsum(routed_mass, 0) - routed_mass
    rank = tl.arange(0, N_PAD)
    kept = tl.sum(((rank < tl.sum(routed.to(tl.int32), 0)) & (before < TAU)).to(tl.int32), 0)
    if USE_TOP_K:
        kept = tl.minimum(kept, TOP_K)
    return kept


@triton.jit
def select_blocks_kernel(
    LOGITS, IDX, CNT, EXACT,
    NUM_M, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET, MAX_EXACT, SINKS, LOCAL, TOP_K, TAU,
    CAUSAL: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TAU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_PAD: tl.constexpr,
):
    """One query block's exact key blocks: the forced ones and the best-ranked others, TOP_K of
    them and/or those ``tau`` keeps, listed in block order at IDX with their count at CNT and as
    flags in EXACT."""
    row = tl.program_id(0).to(tl.int64)                                   # (b, h, query block)
    offs_n = tl.arange(0, N_PAD)                                          # [NP] key blocks
    is_allowed, forced = _forced_blocks(offs_n, row % NUM_M, NUM_N, SEQ_Q, SEQ_K, KEY_OFFSET, SINKS, LOCAL,
                                        CAUSAL, BLOCK_M, BLOCK_N)
    logits = tl.load(LOGITS + row * NUM_N + offs_n, mask=is_allowed, other=float("-inf"))  # [NP] (allowed < NUM_N)
    priority = tl.where(forced, float("inf"), tl.where(is_allowed, logits, float("-inf")))
    budget = TOP_K
    if USE_TAU:
        budget = _kept_by_mass(priority, logits, is_allowed, forced, TOP_K, TAU, USE_TOP_K, N_PAD)
    keep = _top_k(priority, forced, budget, USE_TOP_K or USE_TAU)         # [NP]
    _store_in_order(IDX + row * MAX_EXACT, CNT + row, offs_n, keep, offs_n, MAX_EXACT)
    tl.store(EXACT + row * NUM_N + offs_n, keep.to(tl.int8), mask=offs_n < NUM_N)


@triton.jit
def _key_block(K, V, b, kh, start, offs_n, col_ok, offs_d, offs_dv, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr):
    """The BLOCK_N keys (or centroids) from row ``start`` (``offs_n``) of key/value head (b, kh): the keys
    transposed ``[BD, BN]`` and values ``[BN, BDV]``, zero where not col_ok and past the head dims; by
    TMA tensor descriptors (K and V ``[B, Hk, Sk, D]``, tiles ``[1, 1, BN, BD]``, edges zero-filled by
    the hardware) or by masked pointer loads."""
    if TMA:
        b_i32, kh_i32 = b.to(tl.int32), kh.to(tl.int32)
        b_kt = tl.trans(K.load([b_i32, kh_i32, start, 0]).reshape(BLOCK_N, BLOCK_D))
        b_v = V.load([b_i32, kh_i32, start, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        p_k = K + b * stride_kb + kh * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        b_kt = tl.load(p_k, mask=col_ok[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
        p_v = V + b * stride_vb + kh * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        b_v = tl.load(p_v, mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    return b_kt, b_v


@triton.jit
def _fold(s, b_v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr, rate=1.0):
    """One online-softmax step: scores ``rate · s`` ``[BM, BN]`` (log2 domain, -inf where hidden; rate > 0)
    and their values b_v ``[BN, BDV]`` folded into the running row maxima m_i, sums l_i ``[BM]`` and acc
    ``[BM, BDV]``. A rate (the scale) folds into the exponent: one FMA per score."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * rate)                          # [BM]
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)                  # rows that see nothing yet
    alpha = tl.exp2(m_i - m_use)                                          # [BM]
    p = tl.exp2(s * rate - m_use[:, None])                                # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _exact_scores(b_q, b_kt, qk_scale, FOLD_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores ``[BM, BN]`` of queries b_q against keys b_kt, times qk_scale unless FOLD_SCALE leaves the
    scale to :func:`_fold`'s exponent."""
    s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)
    if not FOLD_SCALE:
        s = s * qk_scale
    return s


@triton.jit
def _far_group_means(FAR_SUMS, BLOCK_SUMS, IDX_ROW, far_exact, offs_g, g_ok, offs_d, offs_dv, SEQ_K,
                     HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, FAR_GROUP: tl.constexpr,
                     LISTED: tl.constexpr):
    """For groups ``offs_g`` ``[G]`` of FAR_GROUP key blocks (of one key/value head): the mean key
    ``[G, BD]`` and value ``[G, BDV]`` (fp32) of their keys outside the exact blocks, and how many keys
    that is ``[G]``. Each is the group's sum (FAR_SUMS rows: keys, then values) less the sums
    (BLOCK_SUMS rows) of the exact blocks among the first ``far_exact`` entries of the list at IDX_ROW,
    LISTED entries at a time (a one-hot product: each exact block belongs to one group)."""
    WIDTH: tl.constexpr = HEAD_D + HEAD_DV
    p_sums = FAR_SUMS + offs_g[:, None] * WIDTH
    key_sum = tl.load(p_sums + offs_d[None, :], mask=g_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    value_sum = tl.load(p_sums + HEAD_D + offs_dv[None, :], mask=g_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
                        other=0.0)                                        # [G, BD], [G, BDV]
    keys = tl.where(g_ok, keys_behind(offs_g * (FAR_GROUP * BLOCK_N), SEQ_K, FAR_GROUP * BLOCK_N), 0)
    keys = keys.to(tl.float32)                                            # [G]
    for start in range(0, far_exact, LISTED):
        offs_e = start + tl.arange(0, LISTED)                             # [E] list entries
        e_ok = offs_e < far_exact
        n = tl.load(IDX_ROW + offs_e, mask=e_ok, other=0)                 # [E] exact blocks in far groups
        member = ((offs_g[:, None] == n[None, :] // FAR_GROUP) & e_ok[None, :]).to(tl.float32)  # [G, E]
        b_k = tl.load(BLOCK_SUMS + n[:, None] * WIDTH + offs_d[None, :],
                      mask=e_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)  # [E, BD]
        b_v = tl.load(BLOCK_SUMS + n[:, None] * WIDTH + HEAD_D + offs_dv[None, :],
                      mask=e_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)  # [E, BDV]
        key_sum -= tl.dot(member, b_k, input_precision="ieee")
        value_sum -= tl.dot(member, b_v, input_precision="ieee")
        block_keys = keys_behind(n * BLOCK_N, SEQ_K, BLOCK_N).to(tl.float32)  # [E]
        keys -= tl.sum(member * block_keys[None, :], 1)
    share = 1.0 / tl.maximum(keys, 1.0)
    return key_sum * share[:, None], value_sum * share[:, None], keys


def last_blocks_first(k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether the attend pass over keys ``k`` and values ``v`` takes every head's last query blocks first
    (:func:`query_block_program`): when causal, where the call's keys and values fit in half the GPU's L2 cache.

    Under a causal mask a query block's exact blocks grow with its position, so a launch in block order
    ends on its heaviest programs; taken first, they leave the light ones to fill the tail. Interleaving
    the heads costs the cache its locality, so only calls whose keys and values stay in it take that
    order, as one layer's call of a model (batch 1) does. On an H200 (60 MB of L2), 30 calls of batch 1 in a
    CUDA graph, ms in block order → last blocks first: SmolLM2's inputs 4.30 → 4.01 at 8K (keys and values
    6 MB a call), 7.74 → 7.46 at 16K, 14.43 → 14.41 at 32K (25 MB); random D64, 32 heads, 8 kv heads,
    3.39 → 3.28 at 8K (17 MB) but 7.00 → 7.16 at 32K (67 MB); one call of SmolLM2's 30 layers as the
    batch (189 MB), attend pass alone: 2.03 → 2.21 at 8K. (The Gluon pass at D128 keeps block order: last
    blocks first took 4–17% longer there where this rule declines, 34 to 268 MB, and 2–4% longer where it
    holds, 16 MB: 8 calls of 32 heads with 4 kv heads at 8K, 4.14–4.17 → 4.22–4.24 ms.)"""
    return causal and _fits_in_l2(k, k.numel() * k.element_size() + v.numel() * v.element_size(), share=2)


def routes_last_blocks_first(k: torch.Tensor, causal: bool, key_stride: int) -> bool:
    """Whether the router's programs over keys ``k`` take every head's last query blocks first
    (:func:`query_block_program`): when causal, where the keys it samples (every ``key_stride``-th) fit in a
    quarter of the GPU's L2 cache.

    The router's work per query block grows with its shortlist, which under a causal mask is shorter for
    the first query blocks; in block order the programs an SM holds at once can all be heavy ones.
    Taking the last blocks of every head first spreads them. On an H200 (60 MB of L2), the router of 30 calls
    of batch 1 at SmolLM2's shapes (random inputs, a CUDA graph), block order → last blocks first: 0.93 → 0.76
    ms at 8K, 1.63 → 1.48 at 16K, 3.12 → 2.91 at 32K; the whole calls 4.17 → 3.98, 7.92 → 7.77, 15.42 →
    15.24–15.34. Interleaving the heads costs the cache its locality where many heads' keys are sampled:
    one call of batch 1 with 32 heads of D64 at 32K (32 MB sampled) took 0.318 → 0.335 ms, while SmolLM2's 30
    layers as one batch at 8K (22.5 MB) took 0.563 → 0.554 and 16 MB of keys 0.671 → 0.660."""
    return causal and _fits_in_l2(k, k.numel() * k.element_size() // key_stride, share=4)


def _fits_in_l2(t: torch.Tensor, size: int, share: int) -> bool:
    """Whether ``size`` bytes fit in 1/``share`` of the L2 cache of CUDA tensor ``t``'s GPU (False off CUDA)."""
    return t.device.type == "cuda" and share * size <= _l2_bytes(t.device)


@functools.lru_cache(maxsize=None)
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


@triton.jit
def saa_attend_kernel(
    Q, K, V, KC, VC, FAR_SUMS, BLOCK_SUMS, IDX, CNT, EXACT, O,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_ob, stride_oh, stride_om, stride_od,
    qk_scale, H, GROUP, SEQ_Q, SEQ_K, NUM_M_BLOCKS, NUM_N_BLOCKS, MAX_EXACT, KEY_OFFSET, NEAR,
    CAUSAL: tl.constexpr, CENTROIDS: tl.constexpr, FAR_GROUP: tl.constexpr, TMA: tl.constexpr,
    EVEN_N: tl.constexpr, FOLD_SCALE: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_TILE: tl.constexpr, BLOCK_C: tl.constexpr,
    GROUPS: tl.constexpr, CENTROID_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, LAST_FIRST: tl.constexpr,
):
    """One query block (BLOCK_M rows) of one head. KC and VC are the centroids, as TMA descriptors or
    pointers. With FAR_GROUP > 1, the full key blocks ending NEAR or more blocks before the diagonal
    enter by one centroid per FAR_GROUP blocks, GROUPS groups a step, from the fp32 key and value sums
    of every group (FAR_SUMS ``[B, Hk, G, D + Dv]``, G = ceil(N / FAR_GROUP)) and key block (BLOCK_SUMS
    ``[B, Hk, G·FAR_GROUP, D + Dv]``)."""
    pid_m, pid_bh = query_block_program(tl.program_id(0), NUM_M_BLOCKS, LAST_FIRST)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kh = h // GROUP                                                       # shared key/value head
    row = pid_bh.to(tl.int64) * NUM_M_BLOCKS + pid_m                      # (b, h, query block)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # [BM]
    offs_d = tl.arange(0, BLOCK_D)                                        # [BD]
    offs_dv = tl.arange(0, BLOCK_DV)                                      # [BDV]
    row_ok = offs_m < SEQ_Q
    p_q = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)  # [BM, BD]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)                   # [BM] running max (log2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                                 # [BM] running sum
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)                       # [BM, BDV]

    # Exact key blocks, listed in block order: those every row sees whole first, without masks (but
    # the ragged last block's, when SEQ_K is not a multiple of BLOCK_N), then the last `partial`, the
    # causal blocks that some row sees only in part (forced, so all listed), masked. One loop with a
    # branch for the mask pipelines them all: two loops each filled and drained their own pipeline,
    # and took 4% longer at SmolLM2's 8K and 32K shapes on an H200 (attend ms 1.94 / 9.58 against
    # 2.03 / 9.95, the same outputs). The ragged last block takes the same branch (the causal test holds
    # for every key a row sees whole): a second branch for it made Triton 3.6's pipeliner fail on sm_90.
    exact_rate = qk_scale if FOLD_SCALE else 1.0
    num_exact = tl.load(CNT + row)
    first_row = pid_m * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, SEQ_Q) - 1
    full = NUM_N_BLOCKS
    partial = 0
    if CAUSAL:
        full = full_blocks(first_row, KEY_OFFSET, SEQ_K, NUM_N_BLOCKS, BLOCK_N)
        partial = tl.minimum(allowed_blocks(last_row, KEY_OFFSET, SEQ_K, BLOCK_N) - full, num_exact)
    # Each exact block in TILES steps of KEY_TILE keys.
    TILES: tl.constexpr = BLOCK_N // KEY_TILE
    whole_steps = (num_exact - partial) * TILES
    for i in range(0, num_exact * TILES):
        start = tl.load(IDX + row * MAX_EXACT + i // TILES) * BLOCK_N + (i % TILES) * KEY_TILE
        offs_n = start + tl.arange(0, KEY_TILE)                           # [KT]
        col_ok = offs_n < SEQ_K
        b_kt, b_v = _key_block(K, V, b, kh, start, offs_n, col_ok, offs_d, offs_dv, stride_kb, stride_kh,
                               stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, HEAD_D, HEAD_DV,
                               KEY_TILE, BLOCK_D, BLOCK_DV, TMA)          # [BD, KT], [KT, BDV]
        s = _exact_scores(b_q, b_kt, qk_scale, FOLD_SCALE, DOT_PRECISION)  # [BM, KT]
        masked = i >= whole_steps                                         # a partly seen block
        if not EVEN_N:
            masked = masked | (start + KEY_TILE > SEQ_K)                  # or the ragged last one
        if masked:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + KEY_OFFSET)
            s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _fold(s, b_v, m_i, l_i, acc, DOT_PRECISION, exact_rate)

    # Centroids of the full key blocks (seen whole by every row of the query block) that were not
    # computed exactly: one per group of FAR_GROUP blocks before far_end, one per run of SUB keys after it.
    SUB: tl.constexpr = BLOCK_N // CENTROIDS                              # keys behind a centroid
    far_end = 0
    if FAR_GROUP > 1:
        diagonal = diagonal_block(last_row, KEY_OFFSET, SEQ_Q, SEQ_K, CAUSAL, BLOCK_N)
        far_groups = tl.minimum(tl.maximum(diagonal + 1 - NEAR, 0) // FAR_GROUP, full // FAR_GROUP)
        far_end = far_groups * FAR_GROUP
        kv_head = b * (H // GROUP) + kh
        far_sums = FAR_SUMS + kv_head * tl.cdiv(NUM_N_BLOCKS, FAR_GROUP) * (HEAD_D + HEAD_DV)
        block_sums = BLOCK_SUMS + kv_head * tl.cdiv(NUM_N_BLOCKS, FAR_GROUP) * FAR_GROUP * (HEAD_D + HEAD_DV)
        far_exact = 0                                                     # exact blocks before far_end: a prefix
        for start_e in range(0, num_exact, GROUPS):
            offs_e = start_e + tl.arange(0, GROUPS)
            listed = tl.load(IDX + row * MAX_EXACT + offs_e, mask=offs_e < num_exact, other=far_end)
            far_exact += tl.sum((listed < far_end).to(tl.int32), 0)
        for start_g in tl.range(0, far_groups, GROUPS, num_stages=CENTROID_STAGES):
            offs_g = start_g + tl.arange(0, GROUPS)                       # [G] groups of key blocks
            key_mean, value_mean, keys = _far_group_means(
                far_sums, block_sums, IDX + row * MAX_EXACT, far_exact, offs_g, offs_g < far_groups, offs_d,
                offs_dv, SEQ_K, HEAD_D, HEAD_DV, BLOCK_N, FAR_GROUP, GROUPS)  # [G, BD], [G, BDV], [G]
            s = tl.dot(b_q, tl.trans(key_mean.to(b_q.dtype)), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where((keys > 0)[None, :], s + tl.log2(tl.maximum(keys, 1.0))[None, :], float("-inf"))  # [BM, G]
            m_i, l_i, acc = _fold(s, value_mean.to(O.dtype.element_ty), m_i, l_i, acc, DOT_PRECISION)
    num_centroids = full * CENTROIDS
    for start_c in tl.range(far_end * CENTROIDS, num_centroids, BLOCK_C, num_stages=CENTROID_STAGES):
        offs_c = start_c + tl.arange(0, BLOCK_C)                          # [BC]
        c_ok = offs_c < num_centroids
        is_exact = tl.load(EXACT + row * NUM_N_BLOCKS + offs_c // CENTROIDS, mask=c_ok, other=1)  # [BC]
        behind = keys_behind(offs_c * SUB, SEQ_K, SUB)                   # [BC] keys behind each (0 past the end)
        b_lc = tl.log2(tl.maximum(behind, 1).to(tl.float32))              # [BC] (masked where 0)
        b_kct, b_vc = _key_block(KC, VC, b, kh, start_c, offs_c, c_ok, offs_d, offs_dv, stride_cb,
                                 stride_ch, stride_cn, stride_cd, stride_wb, stride_wh, stride_wn, stride_wd, HEAD_D,
                                 HEAD_DV, BLOCK_C, BLOCK_D, BLOCK_DV, TMA)  # [BD, BC], [BC, BDV]
        s = tl.dot(b_q, b_kct.to(b_q.dtype), input_precision=DOT_PRECISION) * qk_scale + b_lc[None, :]
        s = tl.where((c_ok & (is_exact == 0) & (behind > 0))[None, :], s, float("-inf"))  # [BM, BC]
        m_i, l_i, acc = _fold(s, b_vc.to(O.dtype.element_ty), m_i, l_i, acc, DOT_PRECISION)  # (O is in v's dtype)

    b_o = acc / l_i[:, None]                                              # [BM, BDV]
    p_o = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


def attend_warps(block_m: int, widest_head_dim: int) -> int:
    """The attend pass's default warps: 4 for query blocks of up to 64 rows, 16 for 256 rows or more at head dims
    <= 64, else 8. On an H200 (attend ms, random bf16 inputs, the default operating point but ``block_m`` 256;
    8 / 16 warps): 5.554 / 3.236 at SmolLM2's 8K shape, 2.960 / 1.733 D64 32K (128 rows with 8 warps: 2.545,
    1.369), where 8 warps at 128 registers spill; at D128 8 warps took 1.351 ms against 9.906 with 16 (32K)."""
    if block_m <= 64:
        return 4
    if block_m >= 256 and widest_head_dim <= 64:
        return 16
    return 8


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def _stream_warps(rows: int, width: int) -> int:
    """Warps of a program that streams a ``[rows, width]`` tile: one per STREAM_TILE_PER_WARP elements, 1 to 8."""
    return max(1, min(8, rows * width // STREAM_TILE_PER_WARP))


# Tiles of the "mean-key" logits kernel (query blocks × key blocks), its head-dim chunk and its
# products' precision: on an H200 at 128K, tf32x3 took 0.10 ms (D128) and 0.07 (D64) against 0.24
# and 0.19 in fp32 ("ieee") and baddbmm's 0.18 and 0.27, within 4.8e-7 of baddbmm's logits.
# A launch takes the largest tile whose grid has a program for every SM, else the smallest (the logits
# are the same bit for bit). On an H200 at SmolLM2's shapes (ms, 30 layers as one batch / as 30 calls of
# batch 1 in one CUDA graph), tiles of 64 / 32 / 16: 8K 0.012 / 0.015 / 0.020 and 0.185 / 0.140 / 0.117;
# 32K 0.049 / 0.092 / 0.183 and 0.214 / 0.193 / 0.265.
MEAN_KEY_TILES = (64, 32, 16)
MEAN_KEY_CHUNK_D = 32
MEAN_KEY_PRECISION = "tf32x3"


def _mean_key_tile(num_m: int, num_n: int, batch_heads: int, device: torch.device) -> int:
    """The tile of :data:`MEAN_KEY_TILES` a mean-key launch takes: the largest whose grid has a program for
    each SM of a CUDA ``device`` (the first elsewhere), else the smallest."""
    if device.type != "cuda":
        return MEAN_KEY_TILES[0]
    sms = _multiprocessors(device)
    return next((tile for tile in MEAN_KEY_TILES
                 if triton.cdiv(num_m, tile) * triton.cdiv(num_n, tile) * batch_heads >= sms), MEAN_KEY_TILES[-1])


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def mean_key_logits(q_means: torch.Tensor, k_means: torch.Tensor, geometry: BlockGeometry,
                    scale: float) -> torch.Tensor:
    """``[B, H, num_m, num_n]`` fp32: ``scale · q̄·k̄ + log n`` from mean queries ``[B, H, num_m, D]`` and mean
    keys ``[B, Hk, num_n, D]``, where some row of the query block sees the key block; when causal, the
    logits of key blocks that no row sees are undefined (every reader masks them). PyTorch form:
    :func:`attncompiler.saa_routing.mean_key_logits`."""
    batch, heads, num_m, dim = q_means.shape
    out = torch.empty(batch, heads, num_m, geometry.num_n, dtype=torch.float32, device=q_means.device)
    if out.numel() == 0:
        return out
    tile = _mean_key_tile(num_m, geometry.num_n, batch * heads, q_means.device)
    mean_key_logits_kernel[(triton.cdiv(geometry.num_n, tile), triton.cdiv(num_m, tile), batch * heads)](
        q_means, k_means, out, *q_means.stride(), *k_means.stride(), *out.stride(),
        scale, heads, heads // k_means.shape[1], num_m, geometry.num_n, geometry.seq_q, geometry.seq_k,
        geometry.key_offset, CAUSAL=geometry.causal, HEAD_D=dim, CHUNK_D=min(MEAN_KEY_CHUNK_D, _pow2_at_least(dim)),
        BLOCK_M=geometry.block_m, BLOCK_N=geometry.block_n, TILE_M=tile, TILE_N=tile, DOT_PRECISION=MEAN_KEY_PRECISION,
    )
    return out


def block_means(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: BlockGeometry,
                config: SAAConfig) -> tuple[torch.Tensor, Centroids]:
    """Queries ``[B, H, Sq, D]``' fp32 block means ``[B, H, num_m, D]`` (for routing), and the centroids of keys
    ``[B, Hk, Sk, D]`` and values ``[B, Hk, Sk, Dv]``: ``config.centroids`` per key block, in k's and v's
    dtype, with each key block's fp32 mean key and, with far groups (``config.far_group > 1``), their sums
    (:class:`FarSums`); in one launch. A query block that sees no more key blocks than the shortlist takes
    (:func:`attncompiler.saa_routing.shortlist_size`) has them all listed: its mean is 0, its rows unread (on an
    H200 the launch took 0.087 ms against 0.127 on SmolLM2's 30 layers at 8K, 0.420 against 0.460 at 32K).
    PyTorch forms: :func:`attncompiler.saa_reference.pool_reference` and
    :func:`attncompiler.saa_reference.centroids_reference`."""
    batch, heads, seq_q, head_qd = q.shape
    _, kv_heads, seq_k, head_d = k.shape
    head_dv = v.shape[-1]
    q_means = torch.empty(batch, heads, geometry.num_m, head_qd, dtype=torch.float32, device=q.device)
    runs = geometry.num_n * config.centroids
    keys = torch.empty(batch, kv_heads, runs, head_d, dtype=k.dtype, device=k.device)
    values = torch.empty(batch, kv_heads, runs, head_dv, dtype=v.dtype, device=v.device)
    block_keys = torch.empty(batch, kv_heads, geometry.num_n, head_d, dtype=torch.float32, device=k.device)
    grouped = config.far_group > 1
    far_groups = math.ceil(geometry.num_n / config.far_group) if grouped else 0
    sum_rows = far_groups * config.far_group
    block_sums = torch.empty(batch, kv_heads, sum_rows, head_d + head_dv, dtype=torch.float32, device=k.device)
    group_sums = torch.empty(batch, kv_heads, far_groups, head_d + head_dv, dtype=torch.float32, device=k.device)
    arrived = torch.zeros(batch * kv_heads * far_groups, dtype=torch.int32, device=k.device)
    pool_programs = geometry.num_m * batch * heads
    listed = shortlist_size(config)
    unpooled = -1 if listed is None else listed                          # query blocks seeing more are pooled
    programs = pool_programs + geometry.num_n * batch * kv_heads
    if q_means.numel() or keys.numel() or values.numel():
        block_qd, block_d, block_dv = (_pow2_at_least(d, floor=1) for d in (head_qd, head_d, head_dv))
        saa_means_kernel[(programs,)](
            q, q_means, k, v, keys, values, block_keys, block_sums, group_sums, arrived,
            *q.stride(), *q_means.stride(), *k.stride(), *v.stride(), *keys.stride(), *values.stride(),
            *block_keys.stride(),
            heads, seq_q, head_qd, geometry.num_m, pool_programs, kv_heads, seq_k, head_d, head_dv, geometry.num_n,
            sum_rows, geometry.key_offset, unpooled, CAUSAL=geometry.causal, BLOCK_M=config.block_m,
            BLOCK_QD=block_qd, CENTROIDS=config.centroids, SUB=config.sub_block,
            BLOCK_D=block_d, BLOCK_DV=block_dv, WITH_SUMS=grouped, FAR_GROUP=config.far_group,
            num_warps=max(_stream_warps(config.block_m, block_qd), _stream_warps(config.sub_block,
                                                                                 max(block_d, block_dv))),
        )
    far = FarSums(block_sums, group_sums) if grouped else None
    return q_means, Centroids(keys, values, group_counts(seq_k, config.sub_block, runs, k.device), block_keys, far)


def _sampled_blocks_per_step(geometry: BlockGeometry, stride: int, rows: int, block_d: int,
                             list_pad: int | None = None) -> int:
    """Key blocks the router visits per step: 128 sampled keys, or in the one-pass form when it scores
    fewer than 128 rows 4096 / rows of them (a step's scores stay 4096), at most 16384 / block_d (a step's
    keys at most 32 KB in 2-byte inputs); or the ``list_pad`` listed blocks when fewer (the one-pass
    form's steps tile its list). On an H200 at 64 rows (query_stride 2), 64 samples a step took the fused
    router-and-top-k's planning from 2.22 to 2.07 ms at 128K (D128), 3.33 to 3.14 (D64), 1.25 to 1.12 at
    8K (SmolLM2's shape); at 128 rows they took it from 3.00 to 3.36 ms (D128, 128K). Planning ms at
    SmolLM2's 8K / 32K shapes, 64 samples a step against 4096 / rows: 32 rows, every 2nd key 1.605 /
    8.039 against 1.375 / 6.748 (256 samples: 1.539 / 7.215); 32 rows, every 4th key 1.125 / 5.498
    against 1.025 / 4.821; 16 rows, every key 1.637 / 8.174 against 1.489 / 7.280 (512: 1.927 / 9.160).
    At D128, 16 heads, 128K: 32 rows 3.349 against 2.968 (every 2nd key), 2.345 against 2.177 (every
    4th); 16 rows of every key took 3.805 with 256 samples against 3.565 with 128."""
    samples = min(4096 // rows, 16384 // block_d) if list_pad is not None and rows < 128 else 128
    blocks = max(1, samples // (geometry.block_n // stride))
    return blocks if list_pad is None else min(blocks, list_pad)


def sampled_key_logits(q: torch.Tensor, k: torch.Tensor, scale: float, geometry: BlockGeometry, stride: int,
                       shortlist: Selection | None = None, interpret: bool = False,
                       query_stride: int = 1) -> torch.Tensor:
    """``[B, H, num_m, num_n]`` fp32, the ``"sampled-keys"`` router's logits from queries ``[B, H, Sq, D]`` and
    keys ``[B, Hk, Sk, D]``, scoring every ``stride``-th key against the last row of each run of
    ``query_stride`` rows (and each query block's last row), one program per query block; with a
    ``shortlist``, only of the key blocks it lists (-inf elsewhere).
    PyTorch form: :func:`attncompiler.saa_routing.sampled_key_logits`."""
    batch, heads, _, dim = q.shape
    shape = (batch, heads, geometry.num_m, geometry.num_n)
    if shortlist is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
        indices = counts = out  # not read
    else:
        out = torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)
        indices, counts = shortlist.indices.contiguous(), shortlist.counts.contiguous()
    if out.numel() == 0:
        return out
    list_width = indices.shape[-1] if shortlist is not None else 0
    list_pad = _pow2_at_least(list_width)
    one_pass = shortlist is not None and q.element_size() == 2
    rows = geometry.block_m // query_stride
    block_d = _pow2_at_least(dim)
    blocks = _sampled_blocks_per_step(geometry, stride, rows, block_d, list_pad if one_pass else None)
    sampled_key_logits_kernel[(geometry.num_m, batch * heads)](
        q, k, out, indices, counts, *q.stride(), *k.stride(),
        scale * LOG2E, heads, heads // k.shape[1], geometry.num_m, geometry.num_n, geometry.seq_q, geometry.seq_k,
        geometry.key_offset, list_width,
        SHORTLIST=shortlist is not None, CAUSAL=geometry.causal, HEAD_D=dim, BLOCK_D=block_d,
        BLOCK_M=geometry.block_m, ROWS=rows, BLOCK_N=geometry.block_n, BLOCKS=blocks,
        LANES=max(blocks, 16),
        LIST_PAD=list_pad, ONE_PASS=one_pass, STRIDE=stride,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FOLD_SCALE=scale > 0, num_warps=4,
        num_stages=1 if interpret else FUSED_SELECTION_STAGES if one_pass else 3,
    )
    return out


MAX_SORTED_BLOCKS = 4096  # key blocks one selection program sorts in registers


def select_blocks(logits: torch.Tensor, geometry: BlockGeometry, config: SAAConfig,
                  interpret: bool = False) -> Selection:
    """The exact key blocks of every query block from estimated logits ``[B, H, num_m, num_n]``
    (fp32), in one kernel launch; at most :data:`MAX_SORTED_BLOCKS` key blocks, listed in block
    order. The kept blocks are those above a threshold found by bisection on the priorities' bits
    (32 counts instead of a sort); with ``tau`` each program first sorts its blocks by priority to
    count how many the mass rule keeps."""
    batch, heads, num_m, num_n = logits.shape
    if num_n > MAX_SORTED_BLOCKS:
        raise ValueError(f"{num_n} key blocks: the selection kernel sorts at most {MAX_SORTED_BLOCKS}")
    width = selection_width(geometry, config)
    device = logits.device
    indices = torch.empty(batch, heads, num_m, width, dtype=torch.int32, device=device)
    counts = torch.empty(batch, heads, num_m, dtype=torch.int32, device=device)
    exact = torch.empty(batch, heads, num_m, num_n, dtype=torch.int8, device=device)
    allowed, full = geometry.bounds(device)
    if logits.numel():
        n_pad = _pow2_at_least(num_n, floor=2)
        select_blocks_kernel[(batch * heads * num_m,)](
            logits.float().contiguous(), indices, counts, exact,
            num_m, num_n, geometry.seq_q, geometry.seq_k, geometry.key_offset, width,
            config.sinks, config.local_blocks, config.top_k or 0, config.tau or 0.0,
            CAUSAL=geometry.causal, USE_TOP_K=config.top_k is not None, USE_TAU=config.tau is not None,
            BLOCK_M=geometry.block_m, BLOCK_N=geometry.block_n, N_PAD=n_pad,
            num_warps=_selection_warps(n_pad, config),
        )
    return Selection(indices, counts, exact.view(torch.bool), allowed, full)


def _selection_warps(n_pad: int, config: SAAConfig) -> int:
    """Warps of one selection program. A top-k's 32 dependent counts are warp reductions with one warp
    (on an H200, 1024 key blocks: 0.225 ms against 0.259 with 4 warps for 16K programs); the
    ``tau`` sort and longer rows take more."""
    if config.tau is None and n_pad <= 1024:
        return 1
    return 4 if n_pad <= 1024 else 8


def fuses_sampled_selection(q: torch.Tensor, config: SAAConfig) -> bool:
    """Whether :func:`sampled_key_selection` computes this operating point's selection: a
    ``"sampled-keys"`` top-k (with or without ``tau``) over a shortlist, with 2-byte inputs (the
    one-pass router)."""
    return (config.router == "sampled-keys" and config.candidates is not None and config.top_k is not None
            and q.element_size() == 2)


def sampled_key_selection(q: torch.Tensor, k: torch.Tensor, scale: float, geometry: BlockGeometry,
                          config: SAAConfig, shortlist: Selection, interpret: bool = False,
                          hopper: bool | None = None) -> Selection:
    """The exact key blocks that :func:`select_blocks` picks from :func:`sampled_key_logits` of the
    blocks ``shortlist`` lists, without the ``[B, H, num_m, num_n]`` logits, where
    :func:`fuses_sampled_selection` holds. ``shortlist`` (its blocks in block order, as every
    selection lists them) gives up its ``exact`` flags to the result.

    On an sm_90 GPU, inputs :func:`attncompiler.codegen.saa_hopper_router.hopper_router_supported` accepts
    take the Gluon router's logits of the listed blocks and then :func:`select_listed` (``hopper``: None
    where it applies, True insists, False never); elsewhere one fused Triton kernel routes and selects.
    Where a form does not compile for a launch shape, that shape takes the next from then on (logged
    once): the fused kernel, then the two kernels of :func:`sampled_key_logits` and :func:`select_blocks`."""
    if not fuses_sampled_selection(q, config):
        raise ValueError("the fused sampled-keys selection takes a top-k over a shortlist of fp16 or bf16 inputs")
    batch, heads, _, dim = q.shape
    width = selection_width(geometry, config)
    indices = torch.empty(batch, heads, geometry.num_m, width, dtype=torch.int32, device=q.device)
    counts = torch.empty(batch, heads, geometry.num_m, dtype=torch.int32, device=q.device)
    listed, listed_counts = shortlist.indices.contiguous(), shortlist.counts.contiguous()
    exact = shortlist.exact.view(torch.int8)
    list_width = listed.shape[-1]
    list_pad = _pow2_at_least(list_width)
    query_stride = config.effective_query_stride
    rows = geometry.block_m // query_stride
    block_d = _pow2_at_least(dim)
    launch = (q.dtype, dim, geometry.block_m, geometry.block_n, geometry.causal, config.key_stride,
              query_stride, list_pad, config.tau is not None)
    last_first = routes_last_blocks_first(k, geometry.causal, config.key_stride)
    if indices.numel() == 0:
        return Selection(indices, counts, shortlist.exact, shortlist.allowed, shortlist.full)

    def fused() -> Selection:
        sampled_key_selection_kernel[(geometry.num_m * batch * heads,)](
            q, k, listed, listed_counts, indices, counts, exact, *q.stride(), *k.stride(),
            scale * LOG2E, heads, heads // k.shape[1], geometry.num_m, geometry.num_n, geometry.seq_q,
            geometry.seq_k, geometry.key_offset, list_width, width, config.sinks, config.local_blocks,
            config.top_k, config.tau or 0.0, CAUSAL=geometry.causal, USE_TAU=config.tau is not None, HEAD_D=dim,
            BLOCK_D=block_d, BLOCK_M=geometry.block_m, ROWS=rows, BLOCK_N=geometry.block_n,
            BLOCKS=_sampled_blocks_per_step(geometry, config.key_stride, rows, block_d, list_pad), LIST_PAD=list_pad,
            STRIDE=config.key_stride, DOT_PRECISION="tf32", FOLD_SCALE=scale > 0, LAST_FIRST=last_first, num_warps=4,
            num_stages=1 if interpret else FUSED_SELECTION_STAGES,
            maxnreg=FUSED_SELECTION_REGISTERS if rows * list_pad <= 4096 else None,
        )
        return Selection(indices, counts, shortlist.exact, shortlist.allowed, shortlist.full)

    def apart() -> Selection:
        logits = sampled_key_logits(q, k, scale, geometry, config.key_stride, shortlist, interpret, query_stride)
        return select_blocks(logits, geometry, config, interpret)

    def triton_forms() -> Selection:
        return FUSED_SELECTION.run(launch, fused, apart, "the fused SAA router-and-top-k kernel for %s", launch)

    def gluon_form() -> Selection:
        logits = hopper_listed_logits(q, k, scale, geometry, config, shortlist, list_pad, last_first)
        return select_listed(logits, shortlist, geometry, config, indices, counts)

    runs_gluon = not interpret and scale > 0 and hopper_router_supported(q, k, geometry, config, list_pad)
    if hopper and not runs_gluon:
        raise ValueError("the Gluon SAA router needs an sm_90 GPU, Gluon, fp16/bf16 inputs of head dim 64 or 128, "
                         "64 scored rows a query block, 16 to 64 sampled keys a block, shortlists of at most 128, "
                         "TMA-movable keys and a positive scale")
    if hopper:
        return gluon_form()
    if runs_gluon and hopper is None:
        return HOPPER_ROUTER.run(launch, gluon_form, triton_forms, "the Gluon SAA router for %s", launch)
    return triton_forms()


def select_listed(logits: torch.Tensor, shortlist: Selection, geometry: BlockGeometry, config: SAAConfig,
                  indices: torch.Tensor, counts: torch.Tensor) -> Selection:
    """The selection :func:`sampled_key_selection` makes, from the logits ``[B, H, num_m, LIST_PAD]`` of the
    key blocks ``shortlist`` lists (in list order), written into ``indices`` and ``counts``; the
    shortlist gives up its ``exact`` flags to the result."""
    batch, heads, num_m, list_pad = logits.shape
    listed = shortlist.indices.contiguous()
    select_listed_kernel[(num_m, batch * heads)](
        logits, listed, shortlist.counts.contiguous(), indices, counts, shortlist.exact.view(torch.int8),
        num_m, geometry.num_n, geometry.seq_q, geometry.seq_k, geometry.key_offset, listed.shape[-1],
        indices.shape[-1], config.sinks, config.local_blocks, config.top_k, config.tau or 0.0,
        CAUSAL=geometry.causal, USE_TAU=config.tau is not None, BLOCK_M=geometry.block_m, BLOCK_N=geometry.block_n,
        LIST_PAD=list_pad, num_warps=SELECT_LISTED_WARPS,
    )
    return Selection(indices, counts, shortlist.exact, shortlist.allowed, shortlist.full)


# Launch shapes (dtype, head dim, block sizes, causal, key and query strides, list width, tau or not) whose
# fused selection kernel raised route with sampled_key_logits and select_blocks.
FUSED_SELECTION = FormFallback("routing with two kernels")
# Launch shapes whose Gluon router raised route with the Triton kernels.
HOPPER_ROUTER = FormFallback("routing with the Triton kernels")


def saa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centroids: Centroids, selection: Selection,
               scale: float, geometry: BlockGeometry, config: SAAConfig, interpret: bool = False,
               out: torch.Tensor | None = None, num_warps: int | None = None, num_stages: int | None = None,
               centroid_stages: int | None = None, tma: bool | None = None,
               key_tile: int | None = None, hopper: bool | None = None) -> torch.Tensor:
    """The attend-and-aggregate pass: q ``[B, H, Sq, D]``, k ``[B, Hk, Sk, D]``, v ``[B, Hk, Sk, Dv]``, and
    the centroids of runs of ``config.sub_block`` keys from :func:`block_means` (with the far
    groups' sums when ``config.far_group > 1``).

    Returns ``[B, H, Sq, Dv]`` in v's dtype (written into ``out`` when given). ``num_warps``,
    ``num_stages`` (the exact blocks' loop), ``centroid_stages`` (the centroid loop) and ``key_tile``
    (keys an exact block's steps take, a power of two from 16 to ``block_n``) override the defaults:
    :func:`attend_warps` (8 warps with 2-byte inputs at head dims <= 64 capped at
    :data:`SMALL_HEAD_ATTEND_REGISTERS` registers), :data:`EXACT_STAGES`, :data:`CENTROID_STAGES` and whole
    blocks. The exact blocks and the centroids move by TMA where the GPU and the layouts allow it (``tma``: as in
    :func:`attncompiler.codegen.flash.launch_tma_or_pointers`), else by pointer loads.

    On an sm_90 GPU, inputs :func:`attncompiler.codegen.saa_hopper.hopper_attend_supported` accepts run
    the warp-specialized Gluon form of the pass (``hopper``: None where it applies and no launch
    override is given, falling back to this kernel where it raises; True insists; False never).
    """
    batch, heads, seq_q, head_d = q.shape
    head_dv = v.shape[-1]
    if out is None:
        out = torch.empty(batch, heads, seq_q, head_dv, dtype=v.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if config.far_group > 1 and centroids.far is None:
        raise ValueError(f"far groups of {config.far_group} key blocks need their sums: make the centroids "
                         "with block_means under the same operating point")
    overridden = any(x is not None for x in (num_warps, num_stages, centroid_stages, tma, key_tile))
    if hopper or (hopper is None and not interpret and not overridden):
        if scale > 0 and hopper_attend_supported(q, k, v, config, centroids):
            gluon_form = functools.partial(hopper_attend, q, k, v, centroids, selection, scale, geometry, config, out)
            if hopper:
                return gluon_form()
            key = (q.dtype, q.shape[-1], v.shape[-1], config.to_json(), geometry.causal)
            return HOPPER_FORMS.run(key, gluon_form, lambda: saa_attend(q, k, v, centroids, selection, scale,
                                                                        geometry, config, out=out, hopper=False),
                                    "the Gluon attend pass (%s, head dims %d, %d)", q.dtype, q.shape[-1], v.shape[-1])
        if hopper:
            raise ValueError("the Gluon attend pass needs an sm_90 GPU, Gluon, fp16/bf16 inputs of head dim 128, "
                             "blocks of 128, TMA-movable tensors and a positive scale")
    indices = selection.indices.contiguous()
    counts = selection.counts.contiguous()
    exact = selection.exact.view(torch.int8).contiguous()
    widest = max(head_d, head_dv)
    block_d, block_dv = _pow2_at_least(head_d), _pow2_at_least(head_dv)
    block_c = 16 if interpret else NEAR_CENTROID_TILE                     # centroids per step
    key_tile = key_tile or config.block_n
    if key_tile < 16 or key_tile > config.block_n or config.block_n % key_tile:
        raise ValueError(f"key_tile must be a power of two from 16 to block_n={config.block_n}, got {key_tile}")
    grid = (geometry.num_m * batch * heads,)
    key_centroids, value_centroids = centroids.keys, centroids.values
    far = centroids.far or FarSums(key_centroids, value_centroids)       # (not read without far groups)
    warps = num_warps or attend_warps(config.block_m, widest)

    def launch(descriptors: list | None) -> None:
        keys, values, centroid_keys, centroid_values = descriptors or (k, v, key_centroids, value_centroids)
        saa_attend_kernel[grid](
            q, keys, values, centroid_keys, centroid_values, far.groups, far.blocks, indices, counts, exact,
            out,
            *q.stride(), *k.stride(), *v.stride(), *key_centroids.stride(), *value_centroids.stride(),
            *out.stride(),
            scale * LOG2E, heads, heads // k.shape[1], seq_q, geometry.seq_k, geometry.num_m, geometry.num_n,
            indices.shape[-1], geometry.key_offset, config.near_blocks,
            CAUSAL=geometry.causal, CENTROIDS=config.centroids, FAR_GROUP=config.far_group,
            TMA=descriptors is not None, EVEN_N=geometry.seq_k % config.block_n == 0,
            FOLD_SCALE=scale > 0,
            HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, KEY_TILE=key_tile, BLOCK_C=block_c, GROUPS=16,
            CENTROID_STAGES=1 if interpret else centroid_stages or CENTROID_STAGES,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            LAST_FIRST=last_blocks_first(k, v, geometry.causal),
            num_warps=warps, num_stages=1 if interpret else num_stages or EXACT_STAGES,
            maxnreg=SMALL_HEAD_ATTEND_REGISTERS if warps == 8 and widest <= 64 and q.element_size() == 2 else None,
        )

    tiles = [[1, 1, key_tile, block_d], [1, 1, key_tile, block_dv], [1, 1, block_c, block_d],
             [1, 1, block_c, block_dv]]
    launch_tma_or_pointers(launch, tma, [k, v, key_centroids, value_centroids], tiles,
                           (f"the SAA attend pass ({key_tile} keys a step)", head_d, head_dv, config))
    return out
