"""SAA's attend-and-aggregate pass for Hopper (sm_90) in Gluon, warp-specialized.

The same pass as :func:`attncompiler.codegen.saa.saa_attend_kernel` (one program per query block and
head, one online softmax over the exact keys, the near centroids and the far groups' centroids), laid
out as FlashAttention-3 lays out dense attention: one producer warp moves tiles by TMA into a ring of
``STAGES`` shared-memory slots (the query block's exact key blocks, then its near centroids in tiles
of ``BLOCK_N``), and two consumer warpgroups of 64 query rows each compute them. A consumer keeps two
tensor-core products in flight: the scores of tile j while the probabilities of tile j - 1 meet their
values, so the softmax of one tile overlaps the other's product. Before the ring, while it fills,
each consumer folds in the far groups, whose centroids it builds in shared memory from their sums;
the producer leaves each near-centroid tile's score bias (its log-counts, -inf for exact blocks)
beside it.

Only the tensors and launches of :func:`attncompiler.codegen.saa.saa_attend` reach here
(:func:`hopper_attend`); :func:`hopper_attend_supported` says where this form applies.
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                    warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAS_GLUON = True
except ImportError:  # a Triton without Gluon: the Triton kernel serves every GPU
    HAS_GLUON = False

from attncompiler.codegen.flash import _tma_strides
from attncompiler.codegen.saa_blocks import allowed_blocks, diagonal_block, full_blocks, keys_behind
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_reference import Centroids
from attncompiler.saa_routing import BlockGeometry, Selection

LOG2E = 1.4426950408889634
# Ring slots of K/V tiles: on an H200 (D128, the exact blocks alone at 32K and 128K), 2 slots took 0.884 / 3.897
# ms, 3 slots 0.912 / 3.923.
STAGES = 2
GROUPS = 32            # far groups a step
LISTED = 16            # list entries a step of the far groups' sums
CONSUMER_REGS = 232    # registers per thread of each consumer warpgroup (setmaxnreg)
PRODUCER_REGS = 40     # and of the producer


def gluon_runs_on(device: torch.device) -> bool:
    """Whether this module's and the router's Gluon kernels can run on ``device``: Gluon present, an sm_90 GPU."""
    return HAS_GLUON and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def hopper_attend_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SAAConfig,
                            centroids: Centroids | None = None) -> bool:
    """Whether :func:`hopper_attend` runs these inputs: Gluon present, an sm_90 GPU, 2-byte inputs of
    one dtype, head dims of 128 for keys and values (where it measured faster than the Triton pass;
    at 64 it took 8–17% longer than the Triton pass at 8 warps, and 10–16% longer in ring tiles of 64 keys
    with two programs an SM), query and key blocks of 128, and
    tensors TMA can move (16-byte aligned, contiguous head dim), the centroids' too when given (in the
    inputs' dtype)."""
    if not gluon_runs_on(q.device):
        return False
    tensors = [q, k, v] + ([centroids.keys, centroids.values] if centroids is not None else [])
    if q.dtype not in (torch.float16, torch.bfloat16) or any(t.dtype != q.dtype for t in tensors):
        return False
    if q.shape[-1] != 128 or v.shape[-1] != 128 or config.block_m != 128 or config.block_n != 128:
        return False
    return all(t.data_ptr() % 16 == 0 and _tma_strides(t.shape, t.stride(), t.dtype) is not None for t in tensors)


if HAS_GLUON:

    @gluon.jit
    def _fold(s, m_i, l_i, rate=1.0):
        """Online-softmax step on scores ``rate · s`` ``[M, N]`` (log2 domain, -inf where hidden; rate > 0,
        folded into the exponent: one FMA a score): the probabilities, the running maxima's rescale
        factor, and the new maxima and sums ``[M]``."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * rate)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)              # rows that see nothing yet
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s * rate - m_use[:, None])
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _exact_logits(s, start, offs_m, offs_n, qk_scale, SEQ_K, KEY_OFFSET, CAUSAL: gl.constexpr):
        """The logits (log2 domain) of an exact block's scores s ``[M, BN]`` from key ``start``: -inf where
        hidden (past SEQ_K, or causally)."""
        keys = start + offs_n                                             # [BN]
        visible = keys < SEQ_K
        if CAUSAL:
            visible = visible[None, :] & (keys[None, :] <= offs_m[:, None] + KEY_OFFSET)
        else:
            visible = visible[None, :] & (offs_m[:, None] >= 0)
        return gl.where(visible, s * qk_scale, float("-inf"))

    @gluon.jit
    def _centroid_bias(cents, EXACT_ROW, c_first, c_end, SEQ_K, CENTROIDS: gl.constexpr, BLOCK_N: gl.constexpr):
        """What near centroids ``cents`` add to their scores: ``log2`` of the keys behind each, or -inf
        outside c_first..c_end, for an exact block's centroids and past the keys."""
        SUB: gl.constexpr = BLOCK_N // CENTROIDS
        in_range = (cents >= c_first) & (cents < c_end)
        is_exact = gl.load(EXACT_ROW + cents // CENTROIDS, mask=in_range, other=1)
        behind = keys_behind(cents * SUB, SEQ_K, SUB)
        return gl.where(in_range & (is_exact == 0) & (behind > 0), gl.log2(gl.maximum(behind, 1).to(gl.float32)),
                        float("-inf"))

    @gluon.jit
    def _fold_tile(s, t, n_exact, n_whole, IDX_ROW, bias_smem, bias_bar, offs_m, offs_n, qk_scale, m_i, l_i, SEQ_K,
                   KEY_OFFSET, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   layout: gl.constexpr):
        """The online-softmax step of ring tile t's scores s ``[M, BN]``: an exact block (masked only where
        it is causal or ragged), or near centroids, whose bias the producer left in ``bias_smem``."""
        if t < n_exact:
            start = gl.load(IDX_ROW + t) * BLOCK_N
            if (t < n_whole) & (start + BLOCK_N <= SEQ_K):
                p, alpha, m_i, l_i = _fold(s, m_i, l_i, qk_scale)
            else:
                p, alpha, m_i, l_i = _fold(_exact_logits(s, start, offs_m, offs_n, qk_scale, SEQ_K, KEY_OFFSET, CAUSAL),
                                           m_i, l_i)
        else:
            slot = t % STAGES
            mbarrier.wait(bias_bar.index(slot), (t // STAGES) & 1)
            bias = bias_smem.index(slot).load(layout)                     # [1, BN]
            p, alpha, m_i, l_i = _fold(s * qk_scale + bias, m_i, l_i)
        return p, alpha, m_i, l_i

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, bias_smem, q_bar, k_bar, v_bar,
                  bias_bar, k_empty, v_empty, IDX_ROW, EXACT_ROW, n_exact, n_tiles, c_first, c_end, b, h, kh, first_row,
                  SEQ_K, CENTROIDS: gl.constexpr, STAGES: gl.constexpr, TILE_N: gl.constexpr, HALF_M: gl.constexpr):
        """The query block's two halves, then each ring tile: exact key block t (keys and values) for
        t < n_exact, then tiles of TILE_N near centroids from row c_first with their score bias; a slot
        is refilled once both consumers released it."""
        bias_layout: gl.constexpr = gl.BlockedLayout([1, TILE_N // 32], [1, 32], [1, 1], [1, 0])
        offs_c = gl.arange(0, TILE_N, layout=gl.SliceLayout(0, bias_layout))
        for c in gl.static_range(2):
            mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, first_row + c * HALF_M, 0], q_bar.index(c),
                                            q_smem.index(c))
        for t in range(n_tiles):
            slot = t % STAGES
            phase = (t // STAGES) & 1
            exact = t < n_exact
            start = gl.load(IDX_ROW + t, mask=exact, other=0) * TILE_N
            cent = c_first + (t - n_exact) * TILE_N
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
            if exact:
                tma.async_copy_global_to_shared(k_desc, [b, kh, start, 0], k_bar.index(slot), k_smem.index(slot))
            else:
                tma.async_copy_global_to_shared(kc_desc, [b, kh, cent, 0], k_bar.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)                 # (the slot's last bias is read too)
            mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
            if exact:
                tma.async_copy_global_to_shared(v_desc, [b, kh, start, 0], v_bar.index(slot), v_smem.index(slot))
            else:
                tma.async_copy_global_to_shared(vc_desc, [b, kh, cent, 0], v_bar.index(slot), v_smem.index(slot))
                bias = _centroid_bias(cent + offs_c, EXACT_ROW, c_first, c_end, SEQ_K, CENTROIDS, TILE_N)  # [BN]
                bias_smem.index(slot).store(bias[None, :])
            mbarrier.arrive(bias_bar.index(slot), count=1)

    @gluon.jit
    def _far_exact(IDX_ROW, n_exact, far_end, LISTED: gl.constexpr, layout: gl.constexpr):
        """How many list entries are exact blocks before far_end (a prefix: the list is in block order)."""
        count = 0
        for start in range(0, n_exact, LISTED):
            offs = start + gl.arange(0, LISTED, layout=layout)
            blocks = gl.load(IDX_ROW + offs, mask=offs < n_exact, other=far_end)
            count += gl.sum((blocks < far_end).to(gl.int32), 0)
        return count

    @gluon.jit
    def _far_group_means(far_sums, block_sums, IDX_ROW, far_exact, start_g, far_groups, SEQ_K, HEAD_D: gl.constexpr,
                         HEAD_DV: gl.constexpr, BLOCK_N: gl.constexpr, FAR_GROUP: gl.constexpr,
                         GROUPS: gl.constexpr, LISTED: gl.constexpr):
        """For far groups ``start_g`` onward (GROUPS of them): the mean key ``[G, D]`` and value ``[G, Dv]``
        (fp32) of their keys outside the exact blocks (the first ``far_exact`` list entries), and how many
        keys that is ``[G]``. Each is the group's sum less those of its exact blocks, LISTED entries at a
        time by a one-hot product on the tensor cores (tf32: a block's sum to about 5e-4 of itself)."""
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
        one_hot_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=layout, k_width=1)
        sums_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=layout, k_width=1)
        WIDTH: gl.constexpr = HEAD_D + HEAD_DV
        offs_g = start_g + gl.arange(0, GROUPS, layout=gl.SliceLayout(1, layout))          # [G]
        g_ok = offs_g < far_groups
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, layout))
        offs_dv = gl.arange(0, HEAD_DV, layout=gl.SliceLayout(0, layout))
        p_sums = far_sums + offs_g[:, None] * WIDTH
        key_sum = gl.load(p_sums + offs_d[None, :], mask=g_ok[:, None], other=0.0)            # [G, D]
        value_sum = gl.load(p_sums + HEAD_D + offs_dv[None, :], mask=g_ok[:, None], other=0.0)  # [G, Dv]
        keys = gl.where(g_ok, keys_behind(offs_g * (FAR_GROUP * BLOCK_N), SEQ_K, FAR_GROUP * BLOCK_N), 0)
        keys = keys.to(gl.float32)                                        # [G]
        offs_gh = start_g + gl.arange(0, GROUPS, layout=gl.SliceLayout(1, one_hot_layout))
        offs_ds = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, sums_layout))
        offs_dvs = gl.arange(0, HEAD_DV, layout=gl.SliceLayout(0, sums_layout))
        for start in range(0, far_exact, LISTED):
            offs_e = start + gl.arange(0, LISTED, layout=gl.SliceLayout(0, one_hot_layout))  # [E] list entries
            e_ok = offs_e < far_exact
            blocks = gl.load(IDX_ROW + offs_e, mask=e_ok, other=0)        # [E]
            member = (offs_gh[:, None] == (blocks // FAR_GROUP)[None, :]) & e_ok[None, :]  # [G, E]
            block_keys = keys_behind(blocks * BLOCK_N, SEQ_K, BLOCK_N).to(gl.float32)
            keys -= gl.convert_layout(gl.sum(gl.where(member, block_keys[None, :], 0.0), 1), gl.SliceLayout(1, layout))
            minus_one_hot = gl.where(member, -1.0, 0.0)
            offs_es = start + gl.arange(0, LISTED, layout=gl.SliceLayout(1, sums_layout))
            es_ok = offs_es < far_exact
            p_rows = block_sums + gl.load(IDX_ROW + offs_es, mask=es_ok, other=0)[:, None] * WIDTH
            block_key_sums = gl.load(p_rows + offs_ds[None, :], mask=es_ok[:, None], other=0.0)       # [E, D]
            block_value_sums = gl.load(p_rows + HEAD_D + offs_dvs[None, :], mask=es_ok[:, None], other=0.0)
            key_sum = mma_v2(minus_one_hot, block_key_sums, key_sum, input_precision="tf32")
            value_sum = mma_v2(minus_one_hot, block_value_sums, value_sum, input_precision="tf32")
        share = 1.0 / gl.maximum(keys, 1.0)
        return key_sum * share[:, None], value_sum * share[:, None], keys

    @gluon.jit
    def _consumer(c: gl.constexpr, q_smem, k_smem, v_smem, g_keys, g_values, bias_smem, q_bar, k_bar,
                  v_bar, bias_bar, k_empty, v_empty, IDX_ROW, far_sums, block_sums, O, stride_ob, stride_oh,
                  stride_om, stride_od, b, h, first_row, n_exact, n_whole, n_tiles, c_first, c_end, far_groups,
                  qk_scale, SEQ_Q, SEQ_K, KEY_OFFSET, CAUSAL: gl.constexpr, CENTROIDS: gl.constexpr,
                  FAR_GROUP: gl.constexpr, HEAD_D: gl.constexpr, HEAD_DV: gl.constexpr, HALF_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUPS: gl.constexpr, LISTED: gl.constexpr):
        """Rows ``first_row + c·HALF_M`` onward: the far groups (while the ring fills), then every ring
        tile; stores the output."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, HEAD_DV, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype
        q = q_smem.index(c).reshape([HALF_M, HEAD_D])                     # [HM, D]
        offs_m = first_row + c * HALF_M + gl.arange(0, HALF_M, layout=rows_s)  # [HM]
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))     # [BN]
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, rows_s)        # [HM] running max (log2)
        l_i = gl.zeros([HALF_M], gl.float32, rows_s)                      # [HM] running sum
        acc = gl.zeros([HALF_M, HEAD_DV], gl.float32, o_layout)           # [HM, Dv]
        mbarrier.wait(q_bar.index(c), 0)

        if FAR_GROUP > 1:
            # One centroid per far group, built in this consumer's shared memory from the groups' sums.
            g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                instr_shape=[16, GROUPS, 16])
            far_exact = 0
            if far_groups > 0:
                far_exact = _far_exact(IDX_ROW, n_exact, far_groups * FAR_GROUP, LISTED,
                                       gl.BlockedLayout([1], [32], [4], [0]))
            g_zero = gl.zeros([HALF_M, GROUPS], gl.float32, g_layout)
            g_keys = g_keys.index(c)
            g_values = g_values.index(c)
            for start_g in range(0, far_groups, GROUPS):
                key_mean, value_mean, keys = _far_group_means(
                    far_sums, block_sums, IDX_ROW, far_exact, start_g, far_groups, SEQ_K, HEAD_D, HEAD_DV, BLOCK_N,
                    FAR_GROUP, GROUPS, LISTED)                            # [G, D], [G, Dv], [G]
                g_keys.store(key_mean.to(dtype))
                g_values.store(value_mean.to(dtype))
                fence_async_shared()
                gl.thread_barrier()
                s = warpgroup_mma(q, g_keys.permute((1, 0)), g_zero, use_acc=False)  # [HM, G]
                keys = gl.convert_layout(keys, gl.SliceLayout(0, g_layout))
                logits = gl.where((keys > 0)[None, :], s * qk_scale + gl.log2(gl.maximum(keys, 1.0))[None, :],
                                  float("-inf"))
                p, alpha, m_new, l_new = _fold(logits, gl.convert_layout(m_i, gl.SliceLayout(1, g_layout)),
                                               gl.convert_layout(l_i, gl.SliceLayout(1, g_layout)))
                m_i = gl.convert_layout(m_new, rows_s)
                l_i = gl.convert_layout(l_new, rows_s)
                acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
                acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), g_values, acc)
                gl.thread_barrier()                                       # g_keys, g_values read

        if n_tiles > 0:
            # Tile 0 alone; then tile t's scores and tile t-1's product in flight together.
            s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
            mbarrier.wait(k_bar.index(0), 0)
            k_tile = k_smem.index(0).reshape([BLOCK_N, HEAD_D])
            s = warpgroup_mma(q, k_tile.permute((1, 0)), s_zero, use_acc=False)
            mbarrier.arrive(k_empty.index(0), count=1)
            p, alpha, m_i, l_i = _fold_tile(s, 0, n_exact, n_whole, IDX_ROW, bias_smem, bias_bar, offs_m, offs_n,
                                            qk_scale, m_i, l_i, SEQ_K, KEY_OFFSET, CAUSAL, BLOCK_N, STAGES, s_layout)
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for t in range(1, n_tiles):
                slot = t % STAGES
                last = (t - 1) % STAGES
                mbarrier.wait(k_bar.index(slot), (t // STAGES) & 1)
                k_tile = k_smem.index(slot).reshape([BLOCK_N, HEAD_D])
                s_token = warpgroup_mma(q, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_bar.index(last), ((t - 1) // STAGES) & 1)
                v_tile = v_smem.index(last).reshape([BLOCK_N, HEAD_DV])
                acc_token = warpgroup_mma(p_op, v_tile, acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=[s_token])
                mbarrier.arrive(k_empty.index(slot), count=1)
                p, alpha, m_i, l_i = _fold_tile(s, t, n_exact, n_whole, IDX_ROW, bias_smem, bias_bar, offs_m, offs_n,
                                                qk_scale, m_i, l_i, SEQ_K, KEY_OFFSET, CAUSAL, BLOCK_N, STAGES,
                                                s_layout)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc_token])
                mbarrier.arrive(v_empty.index(last), count=1)
                acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            last = (n_tiles - 1) % STAGES
            mbarrier.wait(v_bar.index(last), ((n_tiles - 1) // STAGES) & 1)
            v_tile = v_smem.index(last).reshape([BLOCK_N, HEAD_DV])
            acc = warpgroup_mma(p_op, v_tile, acc)
            mbarrier.arrive(v_empty.index(last), count=1)

        out = acc / gl.convert_layout(l_i, rows_o)[:, None]                # [HM, Dv]
        offs_om = first_row + c * HALF_M + gl.arange(0, HALF_M, layout=rows_o)
        offs_od = gl.arange(0, HEAD_DV, layout=gl.SliceLayout(0, o_layout))
        p_o = (O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + offs_om[:, None].to(gl.int64) * stride_om
               + offs_od[None, :] * stride_od)
        gl.store(p_o, out.to(dtype), mask=(offs_om < SEQ_Q)[:, None])

    @gluon.jit
    def saa_attend_hopper_kernel(
        q_desc, k_desc, v_desc, kc_desc, vc_desc, FAR_SUMS, BLOCK_SUMS, IDX, CNT, EXACT, O,
        stride_ob, stride_oh, stride_om, stride_od,
        qk_scale, H, GROUP, SEQ_Q, SEQ_K, NUM_M_BLOCKS, NUM_N_BLOCKS, MAX_EXACT, KEY_OFFSET, NEAR,
        CAUSAL: gl.constexpr, CENTROIDS: gl.constexpr, FAR_GROUP: gl.constexpr, HEAD_D: gl.constexpr,
        HEAD_DV: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        GROUPS: gl.constexpr, LISTED: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        """One query block (BLOCK_M rows) of one head; K, V and the centroids by TMA descriptors
        (``[B, Hk, S, D]``, tiles ``[1, 1, BLOCK_N, D]``), q's by halves of the block."""
        HALF_M: gl.constexpr = BLOCK_M // 2
        pid = gl.program_id(0)
        pid_m = pid % NUM_M_BLOCKS
        pid_bh = pid // NUM_M_BLOCKS
        b = pid_bh // H
        h = pid_bh % H
        kh = h // GROUP
        row = pid_bh.to(gl.int64) * NUM_M_BLOCKS + pid_m                  # (b, h, query block)
        first_row = pid_m * BLOCK_M
        last_row = gl.minimum(first_row + BLOCK_M, SEQ_Q) - 1

        n_exact = gl.load(CNT + row)
        full = NUM_N_BLOCKS
        partial = 0
        if CAUSAL:
            full = full_blocks(first_row, KEY_OFFSET, SEQ_K, NUM_N_BLOCKS, BLOCK_N)
            partial = gl.minimum(allowed_blocks(last_row, KEY_OFFSET, SEQ_K, BLOCK_N) - full, n_exact)
        far_groups = 0
        if FAR_GROUP > 1:
            diagonal = diagonal_block(last_row, KEY_OFFSET, SEQ_Q, SEQ_K, CAUSAL, BLOCK_N)
            far_groups = gl.minimum(gl.maximum(diagonal + 1 - NEAR, 0) // FAR_GROUP, full // FAR_GROUP)
        c_first = far_groups * FAR_GROUP * CENTROIDS                      # near centroids: rows c_first..c_end
        c_end = full * CENTROIDS
        n_tiles = n_exact + gl.cdiv(gl.maximum(c_end - c_first, 0), BLOCK_N)
        kv_head = b.to(gl.int64) * (H // GROUP) + kh
        far_sums = FAR_SUMS + kv_head * gl.cdiv(NUM_N_BLOCKS, FAR_GROUP) * (HEAD_D + HEAD_DV)
        block_sums = BLOCK_SUMS + kv_head * gl.cdiv(NUM_N_BLOCKS, FAR_GROUP) * FAR_GROUP * (HEAD_D + HEAD_DV)
        IDX_ROW = IDX + row * MAX_EXACT
        EXACT_ROW = EXACT + row * NUM_N_BLOCKS

        dtype: gl.constexpr = q_desc.block_type.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF_M, HEAD_D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DV], v_desc.layout)
        # per consumer: the far groups' centroids, tensor-core operands
        g_keys = gl.allocate_shared_memory(dtype, [2, GROUPS, HEAD_D],
                                           gl.NVMMASharedLayout.get_default_for([GROUPS, HEAD_D], dtype))
        g_values = gl.allocate_shared_memory(dtype, [2, GROUPS, HEAD_DV],
                                             gl.NVMMASharedLayout.get_default_for([GROUPS, HEAD_DV], dtype))
        bias_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_N],
                                              gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))  # near centroids' bias
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        bias_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(2):
            mbarrier.init(q_bar.index(c), count=1)
        for slot in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(slot), count=1)
            mbarrier.init(v_bar.index(slot), count=1)
            mbarrier.init(k_empty.index(slot), count=2)                   # both consumers release a slot
            mbarrier.init(v_empty.index(slot), count=2)
            mbarrier.init(bias_bar.index(slot), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (0, q_smem, k_smem, v_smem, g_keys, g_values, bias_smem, q_bar, k_bar, v_bar, bias_bar,
                         k_empty, v_empty, IDX_ROW, far_sums, block_sums, O, stride_ob, stride_oh,
                         stride_om, stride_od, b, h, first_row, n_exact, n_exact - partial, n_tiles, c_first, c_end,
                         far_groups, qk_scale, SEQ_Q, SEQ_K, KEY_OFFSET, CAUSAL, CENTROIDS, FAR_GROUP, HEAD_D,
                         HEAD_DV, HALF_M, BLOCK_N, STAGES, GROUPS, LISTED)),
            (_consumer, (1, q_smem, k_smem, v_smem, g_keys, g_values, bias_smem, q_bar, k_bar, v_bar, bias_bar,
                         k_empty, v_empty, IDX_ROW, far_sums, block_sums, O, stride_ob, stride_oh,
                         stride_om, stride_od, b, h, first_row, n_exact, n_exact - partial, n_tiles, c_first, c_end,
                         far_groups, qk_scale, SEQ_Q, SEQ_K, KEY_OFFSET, CAUSAL, CENTROIDS, FAR_GROUP, HEAD_D,
                         HEAD_DV, HALF_M, BLOCK_N, STAGES, GROUPS, LISTED)),
            (_producer, (q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, bias_smem, q_bar, k_bar,
                         v_bar, bias_bar, k_empty, v_empty, IDX_ROW, EXACT_ROW, n_exact, n_tiles, c_first, c_end, b, h,
                         kh, first_row, SEQ_K, CENTROIDS, STAGES, BLOCK_N, HALF_M)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    """A TMA descriptor of ``[B, H, S, D]`` tensor t in tiles ``[1, 1, rows, D]`` (zero past the edges)."""
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16 if t.dtype == torch.float16 else gl.bfloat16)
    return TensorDescriptor(t, list(t.shape), list(_tma_strides(t.shape, t.stride(), t.dtype)), block, layout)


def hopper_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centroids: Centroids, selection: Selection,
                  scale: float, geometry: BlockGeometry, config: SAAConfig, out: torch.Tensor) -> torch.Tensor:
    """The attend pass of :func:`attncompiler.codegen.saa.saa_attend` on inputs
    :func:`hopper_attend_supported` accepts, written into ``out``."""
    batch, heads, seq_q, head_d = q.shape
    indices = selection.indices.contiguous()
    far = centroids.far
    far_groups, far_blocks = (far.groups, far.blocks) if far is not None else (indices, indices)
    saa_attend_hopper_kernel[(geometry.num_m * batch * heads,)](
        _descriptor(q, config.block_m // 2), _descriptor(k, config.block_n), _descriptor(v, config.block_n),
        _descriptor(centroids.keys, config.block_n), _descriptor(centroids.values, config.block_n),
        far_groups, far_blocks, indices, selection.counts.contiguous(), selection.exact.view(torch.int8).contiguous(),
        out, *out.stride(),
        scale * LOG2E, heads, heads // k.shape[1], seq_q, geometry.seq_k, geometry.num_m, geometry.num_n,
        indices.shape[-1], geometry.key_offset, config.near_blocks,
        CAUSAL=geometry.causal, CENTROIDS=config.centroids, FAR_GROUP=config.far_group, HEAD_D=head_d,
        HEAD_DV=v.shape[-1], BLOCK_M=config.block_m, BLOCK_N=config.block_n, STAGES=STAGES, GROUPS=GROUPS,
        LISTED=LISTED, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4,
    )
    return out
