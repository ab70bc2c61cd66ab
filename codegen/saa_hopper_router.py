"""SAA's ``"sampled-keys"`` router for Hopper (sm_90) in Gluon: the shortlisted key blocks' logits.

The same estimate as the one-pass loop of :func:`attncompiler.codegen.saa.sampled_key_selection_kernel`
(each listed key block's largest share, over a query block's scored rows, of the row's sampled
probability mass), laid out for the tensor cores: one program per query block and head, one warpgroup.
The sampled keys of a step's listed blocks (``SAMPLES`` keys) arrive by TMA from a strided view of the
keys (every ``key_stride``-th key is a row of it) into a ring of ``STAGES`` slots; each step's scores
come from one warpgroup product; each row's probabilities are summed per block in registers, and the
``[rows, blocks]`` sums go to shared memory, a step's columns at a time, so no step selects or moves the
sums of the others. The row totals are the sums of those columns, taken once at the end.

As in the Triton loop, the probabilities are taken against each row's largest score of the first
step, never rescaled; if a row's total passes 2**126, the pass runs again against the rows' largest
scores (a pass for them first). The selection that follows (:func:`attncompiler.codegen.saa.select_listed`)
is the Triton kernels' own.
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAS_GLUON = True
except ImportError:  # a Triton without Gluon: the Triton router serves every GPU
    HAS_GLUON = False

from attncompiler.codegen.flash import _tma_strides
from attncompiler.codegen.saa_blocks import keys_seen, query_block_program
from attncompiler.codegen.saa_hopper import LOG2E, gluon_runs_on
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_routing import BlockGeometry, Selection

ROWS = 64        # scored rows a query block: one warpgroup's product
# Ring slots of a step's sampled keys. On an H200 (the default operating point, random bf16 inputs), 2 slots
# took 0.523 ms at SmolLM2's 8K shape and 2.655 at its 32K shape, 3 slots 0.566 and 2.856. Products issued
# asynchronously, a step ahead of the sums, were slower (0.658 against 0.565 ms with the selection at 8K).
STAGES = 2
# Sampled keys a step (whole blocks' samples, at least one block's). On an H200 (router and selection ms, the
# default operating point's 32 samples a block): 64 took 0.562 at SmolLM2's 8K shape, 2.743 at its 32K shape,
# 0.257 at D128 32K; 128 took 0.654, 3.076 and 0.284 (143 registers a thread, three programs an SM).
SAMPLES = 64


def sampled_view(k: torch.Tensor, key_stride: int) -> torch.Tensor:
    """Every ``key_stride``-th key of k ``[B, Hk, S, D]``: ``[B, Hk, ceil(S / key_stride), D]`` (a view)."""
    return k[:, :, ::key_stride]


def hopper_router_supported(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, config: SAAConfig,
                            list_pad: int) -> bool:
    """Whether :func:`hopper_listed_logits` runs these inputs: Gluon present, an sm_90 GPU, fp16/bf16 q and
    k of one dtype and head dim 64 or 128, 64 scored rows a query block, 16 to 64 sampled keys a key
    block, shortlists of at most 128 entries, and the sampled keys movable by TMA."""
    if not gluon_runs_on(q.device):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or q.shape[-1] not in (64, 128):
        return False
    if geometry.block_m // config.effective_query_stride != ROWS or list_pad > 128:
        return False
    if geometry.block_n // config.key_stride not in (16, 32, 64):
        return False
    sampled = sampled_view(k, config.key_stride)
    return sampled.data_ptr() % 16 == 0 and _tma_strides(sampled.shape, sampled.stride(), sampled.dtype) is not None


if HAS_GLUON:

    @gluon.jit
    def _load_step(k_desc, LIST_ROW, n_slots, i, b, kh, smem, bar, PER_BLOCK: gl.constexpr, BLOCKS: gl.constexpr):
        """Step i's sampled keys: the PER_BLOCK samples of list slots BLOCKS·i onward (the first's again past
        the list), one block after another, into a ring slot."""
        first = gl.load(LIST_ROW + BLOCKS * i)
        mbarrier.expect(bar, BLOCKS * k_desc.block_type.nbytes)
        for j in gl.static_range(BLOCKS):
            block = gl.load(LIST_ROW + BLOCKS * i + j, mask=BLOCKS * i + j < n_slots, other=first)
            tma.async_copy_global_to_shared(k_desc, [b, kh, block * PER_BLOCK, 0], bar,
                                            smem.slice(j * PER_BLOCK, PER_BLOCK, dim=2))

    @gluon.jit
    def _visible(s, i, cols, rows, LIST_ROW, n_slots, SEQ_K, KEY_OFFSET, CAUSAL: gl.constexpr,
                 BLOCK_N: gl.constexpr, PER_BLOCK: gl.constexpr, BLOCKS: gl.constexpr, STRIDE: gl.constexpr):
        """Step i's scores s ``[R, W]``, -inf where the sample is past the list or the keys or, causally,
        after the row."""
        slot = BLOCKS * i + cols // PER_BLOCK                             # [W] list slot of each sample
        block = gl.load(LIST_ROW + slot, mask=slot < n_slots, other=0)
        keys = block * BLOCK_N + (cols % PER_BLOCK) * STRIDE              # [W]
        visible = (slot < n_slots) & (keys < SEQ_K)
        if CAUSAL:
            visible = visible[None, :] & (keys[None, :] <= rows[:, None] + KEY_OFFSET)
        else:
            visible = visible[None, :] & (rows[:, None] >= 0)
        return gl.where(visible, s, float("-inf"))

    @gluon.jit
    def _sampled_pass(q_smem, k_smem, sums_smem, bars, k_desc, LIST_ROW, n_slots, n_whole, t0, shift, rows, b, kh,
                      rate, SEQ_K, KEY_OFFSET, MODE: gl.constexpr, CAUSAL: gl.constexpr, HEAD_D: gl.constexpr,
                      BLOCK_N: gl.constexpr, STRIDE: gl.constexpr, BLOCKS: gl.constexpr, STAGES: gl.constexpr,
                      s_layout: gl.constexpr):
        """One pass over the listed blocks' samples, BLOCKS blocks a step, ring loads numbered from t0.
        MODE 0: each step's per-block sums of ``exp2(s·rate - shift)`` into sums_smem, shift from the rows'
        largest first-step scores (returned); 1: the rows' largest scores (returned, the scores' units);
        2: as 0 against the given shift. Steps within the first n_whole list entries (blocks every row
        sees whole) take no masks."""
        PER_BLOCK: gl.constexpr = BLOCK_N // STRIDE
        SAMPLES: gl.constexpr = BLOCKS * PER_BLOCK
        R: gl.constexpr = q_smem.shape[0]
        n_steps = gl.cdiv(n_slots, BLOCKS)
        whole_steps = n_whole // BLOCKS
        zero = gl.zeros([R, SAMPLES], gl.float32, s_layout)
        cols = gl.arange(0, SAMPLES, layout=gl.SliceLayout(0, s_layout))  # [W] samples
        best = gl.full([R], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        for j in gl.static_range(STAGES):
            if j < n_steps:
                _load_step(k_desc, LIST_ROW, n_slots, j, b, kh, k_smem.index((t0 + j) % STAGES),
                           bars.index((t0 + j) % STAGES), PER_BLOCK, BLOCKS)
        for i in range(n_steps):
            t = t0 + i
            stage = t % STAGES
            mbarrier.wait(bars.index(stage), (t // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(stage).reshape([SAMPLES, HEAD_D]).permute((1, 0)), zero,
                              use_acc=False)                              # [R, W]
            gl.thread_barrier()                                           # every warp is done with the slot
            if i + STAGES < n_steps:
                _load_step(k_desc, LIST_ROW, n_slots, i + STAGES, b, kh, k_smem.index(stage), bars.index(stage),
                           PER_BLOCK, BLOCKS)
            if (i == 0) | (i >= whole_steps) | (MODE == 1):
                s = _visible(s, i, cols, rows, LIST_ROW, n_slots, SEQ_K, KEY_OFFSET, CAUSAL, BLOCK_N, PER_BLOCK,
                             BLOCKS, STRIDE)
            if MODE == 1:
                best = gl.maximum(best, gl.max(s, 1))
            else:
                if MODE == 0:
                    if i == 0:
                        first = gl.max(s, 1)
                        shift = gl.where(first == float("-inf"), 0.0, first) * rate
                p = gl.exp2(s * rate - shift[:, None])                    # [R, W]
                sums_smem.index(i).store(gl.sum(gl.reshape(p, [R, BLOCKS, PER_BLOCK]), 2))  # [R, BLOCKS]
        if MODE == 1:
            return best
        return shift

    @gluon.jit
    def _listed_sums(sums_smem, n_slots, STEPS: gl.constexpr, R: gl.constexpr, BLOCKS: gl.constexpr,
                     layout: gl.constexpr):
        """The per-block sums ``[ST, R, BLOCKS]`` of the n_slots listed blocks (0 past them) and the rows'
        totals ``[R]``."""
        gl.thread_barrier()
        view = sums_smem._reinterpret(gl.float32, [STEPS, R, BLOCKS], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        acc = view.load(layout)
        slot = (gl.arange(0, STEPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))[:, None, None] * BLOCKS
                + gl.arange(0, BLOCKS, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))[None, None, :])
        acc = gl.where(slot < n_slots, acc, 0.0)
        return acc, gl.sum(gl.sum(acc, 2), 0)

    @gluon.jit
    def hopper_router_kernel(
        Q, k_desc, LIST, LIST_CNT, OUT,
        stride_qb, stride_qh, stride_qm, stride_qd,
        qk_scale, H, GROUP, NUM_M, SEQ_Q, SEQ_K, KEY_OFFSET, LIST_WIDTH,
        CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, ROWS: gl.constexpr,
        BLOCK_N: gl.constexpr, STRIDE: gl.constexpr, LIST_PAD: gl.constexpr, BLOCKS: gl.constexpr,
        STAGES: gl.constexpr, LAST_FIRST: gl.constexpr,
    ):
        """One query block's logits (a program of a 1-D grid, its query block and batch·head by
        :func:`query_block_program`) of the ``CNT`` key blocks listed
        in ``LIST`` ``[B·H·num_m, LIST_WIDTH]``, in list order at ``OUT`` ``[B·H·num_m, LIST_PAD]``: the log
        of each block's largest share of a scored row's sampled mass (shares below 2**-126 read as
        2**-126). The ROWS scored rows are the last of each run of BLOCK_M / ROWS rows (a ragged last
        block's rows past it repeat it); K by a TMA descriptor of its every STRIDE-th key ``[B, Hk, S', D]``,
        tiles ``[1, 1, BLOCK_N / STRIDE, D]``."""
        PER_BLOCK: gl.constexpr = BLOCK_N // STRIDE
        STEPS: gl.constexpr = LIST_PAD // BLOCKS
        RUN: gl.constexpr = BLOCK_M // ROWS
        pid_m, pid_bh = query_block_program(gl.program_id(0), NUM_M, LAST_FIRST)
        b = pid_bh // H
        kh = (pid_bh % H) // GROUP
        row = pid_bh.to(gl.int64) * NUM_M + pid_m                         # (b, h, query block)
        LIST_ROW = LIST + row * LIST_WIDTH
        n_slots = gl.load(LIST_CNT + row)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCKS * PER_BLOCK, 16])
        sums_layout: gl.constexpr = gl.BlockedLayout([1, 1, BLOCKS], [1, 32, 1], [4, 1, 1], [2, 1, 0])
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        first_row = pid_m * BLOCK_M
        last_row = gl.minimum(first_row + BLOCK_M, SEQ_Q) - 1
        offs_r = gl.minimum(first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, q_layout)) * RUN + (RUN - 1),
                            last_row)                                     # [R] scored rows
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, q_layout))
        q = gl.load(Q + b.to(gl.int64) * stride_qb + (pid_bh % H).to(gl.int64) * stride_qh
                    + offs_r[:, None].to(gl.int64) * stride_qm + offs_d[None, :] * stride_qd)  # [R, D]
        dtype: gl.constexpr = Q.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_D],
                                           gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_D], dtype), q)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCKS * PER_BLOCK, HEAD_D], k_desc.layout)
        sums_smem = gl.allocate_shared_memory(gl.float32, [STEPS, ROWS, BLOCKS],
                                              gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(bars.index(j), count=1)
        fence_async_shared()

        seen = SEQ_K
        if CAUSAL:
            seen = keys_seen(first_row, KEY_OFFSET, SEQ_K)
        slots = gl.arange(0, LIST_PAD, layout=gl.BlockedLayout([1], [32], [4], [0]))
        blocks = gl.load(LIST_ROW + slots, mask=slots < n_slots, other=0)
        n_whole = gl.sum(((slots < n_slots) & ((blocks + 1) * BLOCK_N <= seen)).to(gl.int32), 0)  # a prefix

        rows = gl.convert_layout(offs_r, gl.SliceLayout(1, s_layout))
        no_shift = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        _sampled_pass(q_smem, k_smem, sums_smem, bars, k_desc, LIST_ROW, n_slots, n_whole, 0, no_shift, rows, b, kh,
                      qk_scale, SEQ_K, KEY_OFFSET, 0, CAUSAL, HEAD_D, BLOCK_N, STRIDE, BLOCKS, STAGES, s_layout)
        acc, l_i = _listed_sums(sums_smem, n_slots, STEPS, ROWS, BLOCKS, sums_layout)
        if gl.max(l_i, 0) > 8.5e37:  # a sum passed 2**126: the rows' largest scores, then the sums against them
            gl.thread_barrier()                                           # (every warp has read the sums)
            n_steps = gl.cdiv(n_slots, BLOCKS)
            m_i = _sampled_pass(q_smem, k_smem, sums_smem, bars, k_desc, LIST_ROW, n_slots, n_whole, n_steps,
                                no_shift, rows, b, kh, qk_scale, SEQ_K, KEY_OFFSET, 1, CAUSAL, HEAD_D, BLOCK_N,
                                STRIDE, BLOCKS, STAGES, s_layout)
            shift = gl.where(m_i == float("-inf"), 0.0, m_i) * qk_scale
            _sampled_pass(q_smem, k_smem, sums_smem, bars, k_desc, LIST_ROW, n_slots, n_whole, 2 * n_steps, shift,
                          rows, b, kh, qk_scale, SEQ_K, KEY_OFFSET, 2, CAUSAL, HEAD_D, BLOCK_N, STRIDE, BLOCKS,
                          STAGES, s_layout)
            acc, l_i = _listed_sums(sums_smem, n_slots, STEPS, ROWS, BLOCKS, sums_layout)
        share = gl.where(l_i > 0, 1.0 / gl.maximum(l_i, 1e-30), 0.0)   # [R] rows' reciprocals (0: no keys)
        best = gl.max(acc * share[None, :, None], 1)                      # [ST, BLOCKS] largest share over the rows
        out_layout: gl.constexpr = gl.SliceLayout(1, sums_layout)
        offs = (gl.arange(0, STEPS, layout=gl.SliceLayout(1, out_layout))[:, None] * BLOCKS
                + gl.arange(0, BLOCKS, layout=gl.SliceLayout(0, out_layout))[None, :])
        gl.store(OUT + row * LIST_PAD + offs, gl.log(gl.maximum(best, 1.1754943508222875e-38)), mask=offs < n_slots)


def hopper_listed_logits(q: torch.Tensor, k: torch.Tensor, scale: float, geometry: BlockGeometry,
                         config: SAAConfig, shortlist: Selection, list_pad: int,
                         last_first: bool = False) -> torch.Tensor:
    """``[B, H, num_m, list_pad]`` fp32: the ``"sampled-keys"`` logits of the key blocks ``shortlist`` lists,
    in list order (undefined past each list's count), on inputs :func:`hopper_router_supported` accepts;
    ``last_first``: the programs take every head's last query blocks first."""
    batch, heads, _, dim = q.shape
    per_block = geometry.block_n // config.key_stride
    listed, counts = shortlist.indices.contiguous(), shortlist.counts.contiguous()
    out = torch.empty(batch, heads, geometry.num_m, list_pad, dtype=torch.float32, device=q.device)
    sampled = sampled_view(k, config.key_stride)
    block = [1, 1, per_block, dim]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16 if k.dtype == torch.float16 else gl.bfloat16)
    descriptor = TensorDescriptor(sampled, list(sampled.shape),
                                  list(_tma_strides(sampled.shape, sampled.stride(), sampled.dtype)), block, layout)
    hopper_router_kernel[(geometry.num_m * batch * heads,)](
        q, descriptor, listed, counts, out, *q.stride(), scale * LOG2E, heads, heads // k.shape[1], geometry.num_m,
        geometry.seq_q, geometry.seq_k, geometry.key_offset, listed.shape[-1],
        CAUSAL=geometry.causal, HEAD_D=dim, BLOCK_M=geometry.block_m, ROWS=ROWS, BLOCK_N=geometry.block_n,
        STRIDE=config.key_stride, LIST_PAD=list_pad, BLOCKS=max(1, SAMPLES // per_block), STAGES=STAGES,
        LAST_FIRST=last_first, num_warps=4,
    )
    return out
