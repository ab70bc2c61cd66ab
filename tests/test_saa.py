"""SAA: the Triton kernels against the PyTorch reference, routing, density, and the error-budget gate.

Without a GPU the kernels run on CPU through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``).
"""

import logging
import math
import re
from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from attncompiler.codegen import flash
from attncompiler.codegen import saa as saa_kernels
from attncompiler.codegen.saa import block_means, sampled_key_selection
from attncompiler.codegen.saa import sampled_key_logits as sampled_key_logits_kernel
from attncompiler.codegen.saa import select_blocks as select_blocks_kernel
from attncompiler.options import OptionError, Options, triton_interpret
from attncompiler.reference import attention_reference
from attncompiler.saa import SAAProgram, saa_applicable, saa_forward, saa_plan, saa_program, saa_triton
from attncompiler.saa_config import SAAConfig, SAAConfigError
from attncompiler.saa_ops import GRAPHED, SAA_CALLS, SAA_SITES, SHORT_CALLS, relative_error
from attncompiler.saa_reference import (Centroids, attend_reference, centroids_reference, far_sums_reference,
                                        pool_reference, saa_reference)
from attncompiler.saa_routing import (BlockGeometry, Selection, far_end, mean_key_logits, sampled_key_logits,
                                     sampled_shortlist, select_blocks, shortlist_config)
from tolerance import assert_as_accurate_as_torch

INTERPRET = triton_interpret()
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
# Padding rows of a query tile compute 0/0 in numpy; they are not stored.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")]  # log2(0) = -inf

SMALL = dict(block_m=16, block_n=16, min_keys=0, tau=None)  # SAA at every length; top_k alone unless a test sets tau
CAUSAL_FORMS = {  # name: (causal, bottom_right, score program)
    "full": (False, False, "(mul s {scale})"),
    "causal": (True, False, "(where (le k q) (mul s {scale}) -inf)"),
    "bottom-right": (True, True, "(where (le k (add q (sub Sk Sq))) (mul s {scale}) -inf)"),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def qkv(b, h, hk, sq, sk, d, dv, dtype=torch.float32):
    return randn(b, h, sq, d, dtype=dtype), randn(b, hk, sk, d, dtype=dtype), randn(b, hk, sk, dv, dtype=dtype)


def geometry_of(q, k, config, causal, bottom_right):
    sq, sk = q.shape[-2], k.shape[-2]
    return BlockGeometry(sq, sk, config.block_m, config.block_n, causal, sk - sq if bottom_right else 0)


def double(centroids: Centroids) -> Centroids:
    return replace(centroids, keys=centroids.keys.double(), values=centroids.values.double())


def assert_attend_as_accurate_as_torch(out, q, k, v, centroids, selection, scale, geometry, config, dtype):
    """The attend pass's output ``out`` against the fp64 reference on the same routing, as accurate as the
    PyTorch reference computed in ``dtype``."""
    exact = attend_reference(q.double(), k.double(), v.double(), double(centroids), selection, scale, geometry,
                             config, torch.float64)
    ours_torch = attend_reference(q, k, v, centroids, selection, scale, geometry, config, compute_dtype=dtype)
    assert_as_accurate_as_torch(out, exact, ours_torch.to(dtype))


@pytest.mark.parametrize("form", CAUSAL_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, h, hk, sq, sk, d, dv, config", [
    (1, 2, 2, 37, 37, 64, 64, SAAConfig(**SMALL, top_k=0, sinks=1, local_blocks=1, centroids=1)),
    (2, 4, 2, 45, 61, 80, 64, SAAConfig(**SMALL, top_k=1, sinks=0, local_blocks=1, centroids=4)),
    (1, 3, 1, 113, 70, 128, 128, SAAConfig(block_m=32, block_n=16, top_k=None, tau=0.5, centroids=2)),
    (1, 2, 1, 1, 50, 64, 32, SAAConfig(**SMALL, top_k=1, local_blocks=0, centroids=2)),
    (1, 2, 1, 300, 300, 64, 64, SAAConfig(**SMALL, top_k=1, far_group=4, near_blocks=2)),
    (1, 2, 1, 200, 250, 64, 32, SAAConfig(**{**SMALL, "tau": 0.5}, top_k=None, centroids=2, far_group=2,
                                          near_blocks=0)),
])
def test_kernel_matches_reference(form, dtype, b, h, hk, sq, sk, d, dv, config):
    """The attend-and-aggregate kernel against the fp64 reference with the same routing: odd sizes,
    GQA, Sq != Sk, one query, causal alignments, top-k and tau, far blocks by groups; as accurate as
    PyTorch in ``dtype``."""
    causal, bottom_right, _ = CAUSAL_FORMS[form]
    q, k, v = qkv(b, h, hk, sq, sk, d, dv, dtype)
    geometry = geometry_of(q, k, config, causal, bottom_right)
    poisoned = torch.full((b, h, sq, dv), math.nan, dtype=dtype, device=DEVICE)
    out, selection, centroids = saa_triton(q, k, v, 0.3, geometry, config, out=poisoned)
    assert out is poisoned
    assert_attend_as_accurate_as_torch(out, q, k, v, centroids, selection, 0.3, geometry, config, dtype)
    if not (form == "causal" and sq == 1):  # one query sees one key block
        assert selection.counts.sum() < geometry.allowed_total(b * h)  # some blocks enter through centroids


@pytest.mark.parametrize("scale", [0.3, -0.3])
def test_kernel_scales_exact_scores_in_the_exponent_only_when_the_scale_is_positive(scale):
    """A positive scale folds into the exponent (the row maximum of raw scores times the scale); a
    negative one, whose maximum is the scaled minimum, scales the scores first: both as accurate as PyTorch."""
    config = SAAConfig(**SMALL, top_k=2, far_group=2, near_blocks=1)
    q, k, v = qkv(1, 2, 1, 90, 90, 64, 64, torch.float16)
    geometry = geometry_of(q, k, config, True, False)
    out, selection, centroids = saa_triton(q, k, v, scale, geometry, config)
    assert_attend_as_accurate_as_torch(out, q, k, v, centroids, selection, scale, geometry, config, torch.float16)
    assert selection.counts.sum() < geometry.allowed_total(2)


@pytest.mark.parametrize("routing, keys", [({"top_k": 1}, 300), ({"top_k": None, "tau": 0.8}, 600)])
@pytest.mark.parametrize("form", CAUSAL_FORMS)
def test_far_key_blocks_enter_by_one_centroid_per_group(form, routing, keys):
    """Beyond near_blocks of the diagonal, the full key blocks not computed exactly enter by the mean
    key and value of each group of far_group blocks (log of its keys on the logit): the kernel gives
    the reference's output, which differs from one centroid per block by far more than the kernel's
    error, and equals it when no block is that far. With tau, a query block has more exact blocks in
    its far groups than the kernel subtracts from the groups' sums in one product (16)."""
    causal, bottom_right, _ = CAUSAL_FORMS[form]
    config = SAAConfig(**{**SMALL, **routing}, far_group=4, near_blocks=3, candidates=32)
    # (top-left causal needs every query; otherwise the last 96 see all but the diagonal's key blocks)
    queries = keys if form == "causal" else 96
    q, k, v = qkv(1, 2, 1, queries, keys, 64, 64, torch.float16)
    geometry = geometry_of(q, k, config, causal, bottom_right)
    out, selection, centroids = saa_triton(q, k, v, 0.3, geometry, config)
    if config.tau is not None:
        far = torch.arange(geometry.num_n, device=DEVICE) < far_end(geometry, config, selection.full)[:, None]
        assert (selection.exact & far).sum(-1).max() > 16

    def reference(**knobs):
        return attend_reference(q.double(), k.double(), v.double(), double(centroids), selection, 0.3, geometry,
                                replace(config, **knobs), torch.float64)

    grouped, per_block = reference(), reference(far_group=1)
    assert (out.double() - grouped).abs().max() * 20 < (grouped - per_block).abs().max()
    assert_as_accurate_as_torch(out, grouped, attend_reference(q, k, v, centroids, selection, 0.3, geometry, config,
                                                               compute_dtype=torch.float16).half())
    assert torch.equal(reference(near_blocks=geometry.num_n), per_block)


@pytest.mark.parametrize("router", ["mean-key", "sampled-keys", "sampled-keys shortlist"])
@pytest.mark.parametrize("form", CAUSAL_FORMS)
def test_triton_path_routes_as_the_reference(form, router):
    """The kernels' pooling gives the same centroids and the same selection as the reference."""
    causal, bottom_right, _ = CAUSAL_FORMS[form]
    shortlist = {"candidates": 2} if router.endswith("shortlist") else {}
    config = SAAConfig(**SMALL, top_k=2, centroids=4, router=router.split()[0], **shortlist)
    q, k, v = qkv(2, 4, 2, 77, 93, 64, 64)
    geometry = geometry_of(q, k, config, causal, bottom_right)
    out, selection, centroids = saa_triton(q, k, v, 0.125, geometry, config)
    expected = centroids_reference(k, v, geometry, config)
    torch.testing.assert_close(centroids.keys, expected.keys)
    torch.testing.assert_close(centroids.values, expected.values)
    torch.testing.assert_close(centroids.block_keys, expected.block_keys)
    assert torch.equal(centroids.counts, expected.counts)
    reference_out, reference_selection = saa_reference(q, k, v, 0.125, causal, config, geometry.key_offset)
    assert torch.equal(selection.exact, reference_selection.exact)
    assert torch.equal(selection.counts, reference_selection.counts)
    torch.testing.assert_close(out, reference_out, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sq, sk, causal, key_offset", [
    (77, 93, False, 0), (77, 93, True, 0), (77, 93, True, 16), (93, 40, True, -53), (300, 300, True, 0),
    (16, 1000, False, 0),
])
@pytest.mark.parametrize("knobs", [dict(top_k=2), dict(top_k=None, tau=0.6), dict(top_k=3, tau=0.9),
                                   dict(top_k=0, sinks=0, local_blocks=0), dict(top_k=100)])
def test_selection_kernel_picks_the_blocks_of_the_pytorch_selection(sq, sk, causal, key_offset, knobs):
    """Forced blocks (sinks, local, partial) and the best-ranked others, by top-k and/or estimated
    mass: the same sets, counts and block-order lists as the PyTorch form."""
    config = SAAConfig(**{**SMALL, "sinks": 1, "local_blocks": 2, **knobs})
    geometry = BlockGeometry(sq, sk, 16, 16, causal, key_offset)
    logits = randn(2, 3, geometry.num_m, geometry.num_n) * 3
    got = select_blocks_kernel(logits, geometry, config, interpret=INTERPRET)
    want = select_blocks(logits, geometry, config)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.exact, want.exact)
    assert torch.equal(got.indices, want.indices)
    listed = torch.arange(want.indices.shape[-1], device=DEVICE) < want.counts[..., None]
    blocks = torch.arange(geometry.num_n, device=DEVICE).expand_as(want.exact)
    in_block_order = torch.sort(torch.where(want.exact, blocks, geometry.num_n), -1).values[..., :listed.shape[-1]]
    assert torch.equal(want.indices, torch.where(listed, in_block_order, 0).int())  # the kept blocks, then 0
    assert (got.counts > 0).any() or knobs.get("top_k") == 0


@pytest.mark.parametrize("knobs", [dict(top_k=3), dict(top_k=None, tau=0.6)])
def test_selection_kernel_reads_no_logit_of_a_block_that_no_row_sees(knobs):
    """The kernel's mean-key logits leave such blocks unwritten: NaN there selects as -inf does (by top-k,
    and by estimated mass, whose softmax spans the blocks some row sees)."""
    config = SAAConfig(**{**SMALL, **knobs})
    geometry = BlockGeometry(300, 300, 16, 16, True, 0)
    logits = randn(2, 3, geometry.num_m, geometry.num_n)
    unseen = torch.arange(geometry.num_n, device=DEVICE) >= geometry.allowed_blocks(DEVICE)[:, None]  # [M, N]
    got = select_blocks_kernel(logits.masked_fill(unseen, math.nan), geometry, config, interpret=INTERPRET)
    want = select_blocks(logits.masked_fill(unseen, -math.inf), geometry, config)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.exact, want.exact)


@pytest.mark.parametrize("sq, sk, causal, key_offset", [(77, 93, False, 0), (77, 93, True, 0), (93, 40, True, -53),
                                                        (1500, 1500, True, 0), (1200, 1500, True, 300),
                                                        (16, 1500, False, 0)])
@pytest.mark.parametrize("h, hk, d", [(4, 2, 80), (2, 2, 16)])
@pytest.mark.parametrize("tile", [64, 16])
def test_mean_key_logits_kernel_matches_pytorch_where_some_row_sees_the_block(sq, sk, causal, key_offset, h, hk, d,
                                                                              tile, monkeypatch):
    """``scale · q̄·k̄ + log n`` in fp32, in tiles of 64 × 64 or 16 × 16 blocks (several here, some past the
    diagonal, which causal calls skip), GQA, head dims in chunks of 32 and a ragged last key block."""
    monkeypatch.setattr(saa_kernels, "MEAN_KEY_TILES", (tile,))
    geometry = BlockGeometry(sq, sk, 16, 16, causal, key_offset)
    q_means, k_means = randn(2, h, geometry.num_m, d), randn(2, hk, geometry.num_n, d)
    got = saa_kernels.mean_key_logits(q_means, k_means, geometry, 0.3)
    want = mean_key_logits(q_means, k_means, geometry, 0.3)
    seen = torch.arange(geometry.num_n, device=DEVICE) < geometry.allowed_blocks(DEVICE)[:, None]  # [M, N]
    assert got.shape == want.shape and seen.all() != causal  # causal calls here have blocks no row sees
    torch.testing.assert_close(got[..., seen], want[..., seen], atol=1e-5, rtol=1e-5)


def test_mean_key_launches_take_the_largest_tile_whose_grid_fills_the_gpu(monkeypatch):
    """64 × 64 tiles where their programs cover the SMs (a model's 30 layers in one call), smaller ones for
    a layer's call alone (one head's 64 query blocks: 1 program of 64, 4 of 32, 16 of 16); 64 off CUDA."""
    monkeypatch.setattr(saa_kernels, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert saa_kernels._mean_key_tile(64, 64, 30 * 9, cuda) == 64
    assert saa_kernels._mean_key_tile(64, 64, 9, cuda) == 16
    assert saa_kernels._mean_key_tile(64, 64, 40, cuda) == 32
    assert saa_kernels._mean_key_tile(256, 256, 9, cuda) == 64
    assert saa_kernels._mean_key_tile(64, 64, 9, torch.device("cpu")) == 64


@pytest.mark.parametrize("stride", [1, 4, 16])
@pytest.mark.parametrize("sq, sk, causal, key_offset", [(77, 77, True, 0), (40, 93, True, 53), (77, 93, False, 0),
                                                        (93, 73, True, -20)])
def test_sampled_key_logits_are_row_logsumexps_of_every_stride_th_key(sq, sk, causal, key_offset, stride):
    """Per row, the logsumexp of the scores of the block's keys at multiples of ``stride`` from its first,
    minus the row's logsumexp over blocks; the largest over the query block's rows."""
    geometry = BlockGeometry(sq, sk, 16, 16, causal, key_offset)
    q, k = randn(1, 2, sq, 8), randn(1, 1, sk, 8)
    got = sampled_key_logits(q, k, 0.3, geometry, stride)
    torch.testing.assert_close(got, sampled_logits_by_loops(q, k, geometry, stride), atol=1e-5, rtol=1e-5)


def sampled_logits_by_loops(q, k, geometry: BlockGeometry, stride: int, listed: torch.Tensor | None = None,
                            query_stride: int = 1):
    """The ``"sampled-keys"`` logits of q ``[1, H, Sq, D]``, k ``[1, 1, Sk, D]`` (scale 0.3, key blocks of 16) by
    explicit loops: per row, each block's logsumexp over its visible keys at multiples of ``stride``, over
    the ``listed`` blocks only (``[1, H, M, N]``) when given, minus the row's logsumexp over blocks; the
    largest over the query block's rows that end a run of ``query_stride`` rows, and its last row."""
    sq, sk = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) * 0.3                                            # [1, H, Sq, Sk]
    rows, cols = torch.arange(sq, device=DEVICE), torch.arange(sk, device=DEVICE)
    visible = (cols <= rows[:, None] + geometry.key_offset if geometry.causal
               else torch.ones(sq, sk, dtype=torch.bool, device=DEVICE))
    kept = (cols % 16 % stride == 0) & visible                                         # [Sq, Sk]
    per_row = torch.stack([scores[..., n * 16:(n + 1) * 16].masked_fill(~kept[:, n * 16:(n + 1) * 16], -math.inf)
                           .logsumexp(-1) for n in range(geometry.num_n)], -1)          # [1, H, Sq, N]
    block_m = geometry.block_m
    if listed is not None:
        per_row = per_row.masked_fill(~listed[:, :, rows // block_m], -math.inf)
    norm = per_row.logsumexp(-1, keepdim=True)
    per_row = torch.where(norm > -math.inf, per_row - norm, -math.inf)
    blocks = []
    for m in range(geometry.num_m):
        last = min(m * block_m + block_m, sq) - 1
        scored = list(range(m * block_m + query_stride - 1, last, query_stride)) + [last]
        blocks.append(per_row[..., scored, :].amax(-2))
    return torch.stack(blocks, -2)


@pytest.mark.parametrize("query_stride", [2, 4])
@pytest.mark.parametrize("sq, sk, causal, key_offset", [(77, 77, True, 0), (66, 93, True, 27), (77, 93, False, 0),
                                                        (93, 73, True, -20)])
def test_sampled_key_logits_take_the_last_row_of_every_run_of_query_stride_rows(sq, sk, causal, key_offset,
                                                                                   query_stride):
    """Query blocks of 64 rows: the largest over the rows that end a run of query_stride rows, and the
    block's last row (a ragged last block of 13 or 2 rows keeps its own)."""
    geometry = BlockGeometry(sq, sk, 64, 16, causal, key_offset)
    q, k = randn(1, 2, sq, 8), randn(1, 1, sk, 8)
    got = sampled_key_logits(q, k, 0.3, geometry, 4, query_stride=query_stride)
    want = sampled_logits_by_loops(q, k, geometry, 4, query_stride=query_stride)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, sampled_key_logits(q, k, 0.3, geometry, 4))  # fewer rows, other maxima


def assert_sampled_logits_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel's sampled-keys logits against the PyTorch form's: -inf at the same blocks, no NaN, the
    rest close (2-byte inputs: rounded scores, tf32 block sums)."""
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)) and not torch.isnan(got).any()
    finite = torch.isfinite(want)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[finite], want[finite], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("stride, shortlisted, dtype", [(1, False, torch.float32), (2, False, torch.float32),
                                                        (16, False, torch.float32), (4, True, torch.float32),
                                                        (4, True, torch.float16)])
@pytest.mark.parametrize("sq, sk, causal, key_offset", [(77, 77, True, 0), (40, 93, True, 53), (77, 93, False, 0),
                                                        (93, 73, True, -20)])
def test_sampled_key_kernel_matches_pytorch(sq, sk, causal, key_offset, stride, shortlisted, dtype):
    """Shortlisted fp16 runs the one-pass form, fp32 the two-pass one."""
    geometry = BlockGeometry(sq, sk, 16, 16, causal, key_offset)
    q, k = randn(2, 4, sq, 32, dtype=dtype), randn(2, 2, sk, 32, dtype=dtype)
    shortlist = random_shortlist(geometry, 2, 4, listed=2) if shortlisted else None
    got = sampled_key_logits_kernel(q, k, 0.3, geometry, stride, shortlist, interpret=INTERPRET)
    want = sampled_key_logits(q, k, 0.3, geometry, stride, shortlist)
    assert_sampled_logits_close(got, want, dtype)


@pytest.mark.parametrize("shortlisted, dtype", [(False, torch.float32), (True, torch.float16)])
@pytest.mark.parametrize("sq, sk, causal, key_offset", [(77, 77, True, 0), (65, 65, True, 0), (77, 93, False, 0),
                                                        (93, 73, True, -20)])
def test_sampled_key_kernel_scores_the_rows_query_stride_picks_as_pytorch_does(sq, sk, causal, key_offset,
                                                                              shortlisted, dtype):
    """Query blocks of 32 rows scored 16 at a time (query_stride 2), in both forms of the kernel; ragged
    last blocks of 13, 1 and 29 rows."""
    geometry = BlockGeometry(sq, sk, 32, 16, causal, key_offset)
    q, k = randn(2, 4, sq, 32, dtype=dtype), randn(2, 2, sk, 32, dtype=dtype)
    shortlist = random_shortlist(geometry, 2, 4, listed=2) if shortlisted else None
    got = sampled_key_logits_kernel(q, k, 0.3, geometry, 2, shortlist, interpret=INTERPRET, query_stride=2)
    want = sampled_key_logits(q, k, 0.3, geometry, 2, shortlist, query_stride=2)
    assert_sampled_logits_close(got, want, dtype)


def random_shortlist(geometry: BlockGeometry, batch: int, heads: int, listed: int) -> Selection:
    """A selection of ``listed`` random allowed key blocks (besides the forced) per query block."""
    config = SAAConfig(block_m=geometry.block_m, block_n=geometry.block_n, top_k=listed)
    return select_blocks(randn(batch, heads, geometry.num_m, geometry.num_n), geometry, config)


@pytest.mark.parametrize("sq, sk, causal, key_offset", [(77, 77, True, 0), (40, 93, True, 53), (77, 93, False, 0),
                                                        (93, 73, True, -20)])
def test_sampled_key_logits_with_a_shortlist_score_and_normalize_over_the_listed_blocks_only(sq, sk, causal,
                                                                                             key_offset):
    """Each row normalized over the listed blocks as if the others did not exist; the others are -inf."""
    geometry = BlockGeometry(sq, sk, 16, 16, causal, key_offset)
    q, k = randn(1, 2, sq, 8), randn(1, 1, sk, 8)
    shortlist = random_shortlist(geometry, 1, 2, listed=1)
    got = sampled_key_logits(q, k, 0.3, geometry, 4, shortlist)
    assert torch.isneginf(got[~shortlist.exact]).all()
    torch.testing.assert_close(got, sampled_logits_by_loops(q, k, geometry, 4, shortlist.exact), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 4, 8])
@pytest.mark.parametrize("shortlisted, dtype", [(False, torch.float32), (True, torch.float32),
                                                (True, torch.float16)])
def test_sampled_key_kernel_takes_128_samples_per_step_at_any_stride(stride, shortlisted, dtype):
    """Blocks of 64 keys at head dim 128: a step scores 128 samples from 128 / (64 / stride) key blocks
    (two at stride 1), so the key tile fits in shared memory at every stride; shortlisted as by the
    default operating point (96 of 110 blocks and the forced ones: the one-pass form's widest list)."""
    seq_k = 7040 if shortlisted else 333
    geometry = BlockGeometry(200, seq_k, 64, 64, True, seq_k - 200)
    q, k = randn(1, 2, 200, 128, dtype=dtype), randn(1, 1, geometry.seq_k, 128, dtype=dtype)
    shortlist = random_shortlist(geometry, 1, 2, listed=96) if shortlisted else None
    got = sampled_key_logits_kernel(q, k, 0.1, geometry, stride, shortlist, interpret=INTERPRET)
    want = sampled_key_logits(q, k, 0.1, geometry, stride, shortlist)
    assert_sampled_logits_close(got, want, dtype)


BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="Triton's CPU interpreter computes bf16 tiles wrongly (a bf16 tl.dot is off by 1e10)"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
@pytest.mark.parametrize("shortlisted", [False, True])
def test_sampled_key_kernel_matches_pytorch_over_many_key_steps(shortlisted, dtype):
    """Seventy key blocks (forty listed): each pass of the kernel loops over several steps of key blocks."""
    geometry = BlockGeometry(1100, 1100, 16, 16, True, 0)
    q, k = randn(1, 4, 1100, 64, dtype=dtype), randn(1, 2, 1100, 64, dtype=dtype)
    shortlist = random_shortlist(geometry, 1, 4, listed=40) if shortlisted else None
    got = sampled_key_logits_kernel(q, k, 0.3, geometry, 2, shortlist, interpret=INTERPRET)
    want = sampled_key_logits(q, k, 0.3, geometry, 2, shortlist)
    assert_sampled_logits_close(got, want, dtype)


@pytest.mark.parametrize("sq, sk, causal, key_offset", [(900, 1100, True, 200), (1100, 1030, False, 0),
                                                        (1030, 1030, True, 0)])
def test_one_pass_router_scores_the_blocks_every_row_sees_whole_without_masks_as_with(sq, sk, causal, key_offset):
    """Forty listed key blocks (fp16, the one-pass form): a late query block's first steps cover blocks
    that every row sees whole and take no masks, its later ones do; bottom-right aligned, not causal,
    and a ragged last key block (which the unmasked steps must not take)."""
    geometry = BlockGeometry(sq, sk, 16, 16, causal, key_offset)
    q, k = randn(1, 4, sq, 64, dtype=torch.float16), randn(1, 2, sk, 64, dtype=torch.float16)
    shortlist = random_shortlist(geometry, 1, 4, listed=40)
    got = sampled_key_logits_kernel(q, k, 0.3, geometry, 2, shortlist, interpret=INTERPRET)
    want = sampled_key_logits(q, k, 0.3, geometry, 2, shortlist)
    assert_sampled_logits_close(got, want, torch.float16)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("second_jump", [0.0, 2.5])
def test_one_pass_router_takes_later_blocks_that_outscore_its_first_step(causal, second_jump):
    """The one-pass router takes probabilities against each row's largest score of its first step and
    never rescales them: here keys past 600 score about 2**80 times higher than those before (the sums
    stay finite), and with a second jump keys past 900 score 2**70 times higher again, which overflows
    fp32 and sends the whole list through again with running maxima. Either way the logits are those
    of PyTorch (which has no floor: the kernel reads shares below 2**-126 as 2**-126)."""
    geometry = BlockGeometry(1100, 1100, 16, 16, causal, 0)
    direction = randn(64)
    q = direction + 0.3 * randn(1, 4, 1100, 64)
    k = randn(1, 2, 1100, 64)
    k[:, :, 600:] += 3.0 * direction
    k[:, :, 900:] += second_jump * direction
    q, k = q.half(), k.half()
    shortlist = random_shortlist(geometry, 1, 4, listed=40)
    got = sampled_key_logits_kernel(q, k, 0.3, geometry, 2, shortlist, interpret=INTERPRET)
    want = sampled_key_logits(q, k, 0.3, geometry, 2, shortlist)
    floor = math.log(2.0 ** -126)
    want = want.where(want.isneginf() | (want > floor), torch.tensor(floor))
    assert_sampled_logits_close(got, want, torch.float16)
    late = want[..., -1, :]  # the last query block: every jump in its list
    assert (late[..., 600 // 16 + 1:] > -10).any() and (late[..., :600 // 16] < -30).all()


def shortlist_and_two_kernel_selection(q, k, geometry: BlockGeometry, config: SAAConfig):
    """``(shortlist, selection, logits)``: a maker of fresh copies of one random shortlist (the selection
    kernel over random logits; the fused kernel takes over its flags), the selection the router kernel
    and the selection kernel make over it, and the router kernel's logits; scale 0.3."""
    mean_key_logits = randn(*q.shape[:2], geometry.num_m, geometry.num_n)

    def shortlist() -> Selection:
        return select_blocks_kernel(mean_key_logits, geometry, shortlist_config(config), interpret=INTERPRET)

    logits = sampled_key_logits_kernel(q, k, 0.3, geometry, config.key_stride, shortlist(), interpret=INTERPRET,
                                       query_stride=config.effective_query_stride)
    return shortlist, select_blocks_kernel(logits, geometry, config, interpret=INTERPRET), logits


@pytest.mark.parametrize("sq, sk, causal, key_offset", [(40, 93, True, 53), (77, 93, False, 0), (93, 73, True, -20),
                                                        (160, 160, True, 0)])
@pytest.mark.parametrize("stride, top_k, tau, query_stride", [(1, 2, None, 1), (4, 0, None, 1), (16, 5, None, 1),
                                                              (4, 3, 0.5, 1), (4, 3, 0.5, 2)])
def test_fused_sampled_selection_keeps_what_the_router_and_selection_kernels_keep(sq, sk, causal, key_offset,
                                                                                  stride, top_k, tau, query_stride):
    """The router and its top-k (with or without tau) in one launch (fp16): the same counts, block-order
    lists and exact flags as the selection kernel makes of the router kernel's logits over the same
    shortlist. Query blocks of 16 rows, or of 32 scored every other row."""
    block_m = 16 * query_stride
    config = SAAConfig(**{**SMALL, "tau": tau, "block_m": block_m}, sinks=1, local_blocks=2, top_k=top_k,
                       router="sampled-keys", candidates=3, key_stride=stride, query_stride=query_stride)
    geometry = BlockGeometry(sq, sk, block_m, 16, causal, key_offset)
    q, k = randn(2, 4, sq, 32, dtype=torch.float16), randn(2, 2, sk, 32, dtype=torch.float16)
    shortlist, want, _ = shortlist_and_two_kernel_selection(q, k, geometry, config)
    listed = shortlist()
    got = sampled_key_selection(q, k, 0.3, geometry, config, listed, interpret=INTERPRET)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.exact, want.exact) and got.exact is listed.exact
    assert not saa_kernels.FUSED_SELECTION.failed  # the fused kernel ran
    if sk >= 160 and top_k < config.candidates:  # a long list, cut down to the forced blocks and the top-k
        assert (got.counts < listed.counts).any()


@pytest.mark.parametrize("sq, sk, key_offset", [(93, 73, -20), (160, 160, 0)])
def test_fused_sampled_selection_is_the_same_with_the_last_query_blocks_first(monkeypatch, sq, sk, key_offset):
    """The fused kernel's programs taking every head's last query blocks first (as one layer's causal call
    on a GPU does) select what they select in block order."""
    config = SAAConfig(**{**SMALL, "tau": 0.5}, sinks=1, local_blocks=2, top_k=3, router="sampled-keys",
                       candidates=3, key_stride=4)
    geometry = BlockGeometry(sq, sk, 16, 16, True, key_offset)
    q, k = randn(2, 4, sq, 32, dtype=torch.float16), randn(2, 2, sk, 32, dtype=torch.float16)
    shortlist, want, _ = shortlist_and_two_kernel_selection(q, k, geometry, config)
    launches = []
    real = saa_kernels.sampled_key_selection_kernel

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["LAST_FIRST"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(saa_kernels, "sampled_key_selection_kernel", Recorded())
    monkeypatch.setattr(saa_kernels, "routes_last_blocks_first", lambda k, causal, key_stride: causal)
    got = sampled_key_selection(q, k, 0.3, geometry, config, shortlist(), interpret=INTERPRET)
    assert launches == [True]
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.exact, want.exact)


@pytest.mark.parametrize("candidates, tau", [(40, None), (130, None), (40, 0.15), (130, 0.05)])
def test_fused_sampled_selection_ranks_a_short_list_and_bisects_a_long_one(candidates, tau):
    """Lists of up to 128 entries (here 64 wide) keep their top-k by rank, longer ones (256 wide) by
    bisection on the priorities' bits: both keep what the selection kernel keeps, with tau too (which
    keeps fewer than the top-k somewhere)."""
    config = SAAConfig(**{**SMALL, "tau": tau}, sinks=1, local_blocks=2, top_k=6, router="sampled-keys",
                       candidates=candidates, key_stride=4)
    geometry = BlockGeometry(40, 2300, 16, 16, True, 2260)  # 144 key blocks, all allowed
    q, k = randn(1, 2, 40, 32, dtype=torch.float16), randn(1, 1, 2300, 32, dtype=torch.float16)
    shortlist, want, logits = shortlist_and_two_kernel_selection(q, k, geometry, config)
    if tau is not None:
        top_k_only = select_blocks_kernel(logits, geometry, replace(config, tau=None), interpret=INTERPRET)
        assert (want.counts < top_k_only.counts).any()
    listed = shortlist()
    assert saa_kernels._pow2_at_least(listed.indices.shape[-1]) == (64 if candidates == 40 else 256)
    got = sampled_key_selection(q, k, 0.3, geometry, config, listed, interpret=INTERPRET)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.exact, want.exact) and (got.counts < listed.counts).all()
    assert not saa_kernels.FUSED_SELECTION.failed


@pytest.mark.parametrize("sq, sk, causal, key_offset", [(77, 93, False, 0), (93, 73, True, -20), (160, 160, True, 0)])
@pytest.mark.parametrize("top_k, tau", [(2, None), (3, 0.5)])
def test_selection_from_the_listed_blocks_logits_keeps_what_the_fused_kernel_keeps(sq, sk, causal, key_offset,
                                                                                   top_k, tau):
    """``select_listed`` (the top-k after the Gluon router) over the router kernel's logits of each query
    block's listed blocks, in list order: the same counts, lists and exact flags as the selection kernel."""
    config = SAAConfig(**{**SMALL, "tau": tau}, sinks=1, local_blocks=2, top_k=top_k, router="sampled-keys",
                       candidates=3, key_stride=4)
    geometry = BlockGeometry(sq, sk, 16, 16, causal, key_offset)
    q, k = randn(2, 4, sq, 32, dtype=torch.float16), randn(2, 2, sk, 32, dtype=torch.float16)
    shortlist, want, logits = shortlist_and_two_kernel_selection(q, k, geometry, config)
    listed = shortlist()
    list_pad = saa_kernels._pow2_at_least(listed.indices.shape[-1])
    in_list_order = logits.gather(-1, listed.indices.long())               # [B, H, num_m, width]
    given = torch.nn.functional.pad(in_list_order, (0, list_pad - in_list_order.shape[-1]), value=float("nan"))
    indices, counts = torch.empty_like(want.indices), torch.empty_like(want.counts)
    got = saa_kernels.select_listed(given, listed, geometry, config, indices, counts)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.exact, want.exact) and got.exact is listed.exact and got.indices is indices


def test_a_fused_kernel_that_fails_to_compile_leaves_routing_to_the_two_kernels(monkeypatch, caplog):
    """Logged once per launch shape; the selection is the two kernels' (and later calls skip the fused one)."""
    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                raise RuntimeError("out of resources")
            return launch

    launches = []
    monkeypatch.setattr(saa_kernels, "sampled_key_selection_kernel", Failing())
    monkeypatch.setattr(saa_kernels.FUSED_SELECTION, "failed", set())
    config = SAAConfig(**SMALL, top_k=1, router="sampled-keys", candidates=2, key_stride=4)
    geometry = BlockGeometry(93, 93, 16, 16, True)
    q, k = randn(1, 2, 93, 32, dtype=torch.float16), randn(1, 1, 93, 32, dtype=torch.float16)
    shortlist, want, _ = shortlist_and_two_kernel_selection(q, k, geometry, config)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            got = sampled_key_selection(q, k, 0.3, geometry, config, shortlist(), interpret=INTERPRET)
            assert torch.equal(got.exact, want.exact) and torch.equal(got.counts, want.counts)
    assert len(launches) == 1 and len(saa_kernels.FUSED_SELECTION.failed) == 1
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "routing with two kernels" in caplog.records[0].message


def test_fused_sampled_selection_refuses_what_it_does_not_compute():
    q, k = randn(1, 1, 32, 16), randn(1, 1, 32, 16)
    geometry = BlockGeometry(32, 32, 16, 16, True)
    config = SAAConfig(**SMALL, top_k=1, router="sampled-keys", candidates=2)
    shortlist = select_blocks_kernel(randn(1, 1, 2, 2), geometry, shortlist_config(config), interpret=INTERPRET)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        sampled_key_selection(q, k, 0.3, geometry, config, shortlist, interpret=INTERPRET)
    with pytest.raises(ValueError, match="takes a top-k"):
        sampled_key_selection(q.half(), k.half(), 0.3, geometry, replace(config, top_k=None, tau=0.5), shortlist,
                              interpret=INTERPRET)


@pytest.mark.parametrize("form", CAUSAL_FORMS)
def test_the_kernel_path_fuses_the_default_router_and_selection_for_2_byte_inputs(form, monkeypatch):
    """With fp16 inputs a shortlisted "sampled-keys" top-k routes in the fused kernel, and gives the
    selection and output that the router and selection kernels give apart."""
    causal, bottom_right, _ = CAUSAL_FORMS[form]
    config = SAAConfig(**SMALL, top_k=2, centroids=2, router="sampled-keys", candidates=3, key_stride=4)
    q, k, v = qkv(1, 4, 2, 77, 93, 64, 64, dtype=torch.float16)
    geometry = geometry_of(q, k, config, causal, bottom_right)
    fused_calls = []
    fused = saa_kernels.sampled_key_selection
    monkeypatch.setattr(saa_kernels, "sampled_key_selection", lambda *a, **kw: fused_calls.append(1) or fused(*a, **kw))
    out, selection, _ = saa_triton(q, k, v, 0.125, geometry, config)
    assert fused_calls == [1] and not saa_kernels.FUSED_SELECTION.failed
    monkeypatch.setattr(saa_kernels, "fuses_sampled_selection", lambda q, config: False)
    apart_out, apart, _ = saa_triton(q, k, v, 0.125, geometry, config)
    assert fused_calls == [1]
    assert torch.equal(selection.exact, apart.exact) and torch.equal(selection.counts, apart.counts)
    assert torch.equal(out, apart_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_means_pool_queries_and_keys_in_one_launch(dtype, monkeypatch):
    """One launch gives each query block's fp32 mean query (a short last block averages its rows), each key
    block's run means (in k's and v's dtype, 0 for runs past the last key) and its fp32 mean key, as the
    PyTorch forms do; a short last block averages only its keys."""
    config = SAAConfig(**SMALL, centroids=4, candidates=None)
    q = randn(2, 6, 45, 80, dtype=dtype)
    k, v = randn(2, 3, 37, 80, dtype=dtype), randn(2, 3, 37, 48, dtype=dtype)
    geometry = BlockGeometry(45, 37, 16, 16, True)
    kernel, grids = saa_kernels.saa_means_kernel, []

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(saa_kernels, "saa_means_kernel", Recorded())
    q_means, got = block_means(q, k, v, geometry, config)
    assert grids == [(3 * 2 * 6 + 3 * 2 * 3,)]  # query blocks of 6 heads, then key blocks of 3 kv heads
    torch.testing.assert_close(q_means, pool_reference(q, 16, 3))
    want = centroids_reference(k, v, geometry, config)
    assert q_means.dtype == got.block_keys.dtype == torch.float32 and got.keys.dtype == got.values.dtype == dtype
    torch.testing.assert_close(got.keys, want.keys.to(dtype))
    torch.testing.assert_close(got.values, want.values.to(dtype))
    torch.testing.assert_close(got.block_keys, want.block_keys)
    assert torch.equal(got.counts, want.counts) and got.counts[-3:].tolist() == [1, 0, 0]
    assert not got.keys[:, :, -2:].any() and not got.values[:, :, -2:].any()


@pytest.mark.parametrize("causal", [True, False])
def test_block_means_leave_unread_the_queries_the_shortlist_does_not_need(causal):
    """A query block that sees no more key blocks than the shortlist takes has them all listed, so its
    mean is 0 and its rows are not read (NaN there stays out); the shortlist is the one the true means
    give. Not causal, every query block sees all six key blocks and is pooled."""
    config = SAAConfig(**SMALL, top_k=1, candidates=2)
    q, k, v = qkv(1, 4, 2, 96, 96, 32, 32, torch.float16)
    geometry = BlockGeometry(96, 96, 16, 16, causal)
    pooled = pool_reference(q, 16, 6)
    unread = 2 if causal else 0
    q[:, :, :16 * unread] = float("nan")
    q_means, centroids = block_means(q, k, v, geometry, config)
    assert torch.equal(q_means[:, :, :unread], torch.zeros_like(q_means[:, :, :unread]))
    torch.testing.assert_close(q_means[:, :, unread:], pooled[:, :, unread:])
    if causal:
        true_means = torch.cat([pooled[:, :, :unread], q_means[:, :, unread:]], 2)
        got = sampled_shortlist(q_means, centroids.block_keys, 0.2, geometry, config)
        want = sampled_shortlist(true_means, centroids.block_keys, 0.2, geometry, config)
        assert torch.equal(got.exact, want.exact) and torch.equal(got.counts, want.counts)
        assert got.counts[..., :2].tolist() == [[[1, 2]] * 4]


@pytest.mark.parametrize("centroids, far_group", [(1, 2), (4, 4)])
def test_block_means_sum_each_key_block_and_far_group(centroids, far_group):
    """With far groups, the same launch sums each key block's centroids times the keys behind each
    (fp32, keys then values), and the last block of each group to finish sums the group's (a short
    last group only its blocks), the same on every call."""
    config = SAAConfig(**SMALL, centroids=centroids, far_group=far_group)
    k, v = randn(2, 3, 37, 80, dtype=torch.float16), randn(2, 3, 37, 48, dtype=torch.float16)
    geometry = BlockGeometry(37, 37, 16, 16, True)  # 3 key blocks, the last of 5 keys
    got = block_means(k, k, v, geometry, config)[1]
    want = far_sums_reference(got.keys, got.values, got.counts, geometry, config)
    assert got.far.blocks.shape == (2, 3, 4, 128) and got.far.groups.shape == (2, 3, 4 // far_group, 128)
    torch.testing.assert_close(got.far.blocks[:, :, :3], want.blocks[:, :, :3])
    torch.testing.assert_close(got.far.groups, want.groups)
    exact_sums = torch.cat([k, v], -1).float().unflatten(-2, (-1, 37)).sum(-2)       # [2, 3, 1, 128]
    torch.testing.assert_close(got.far.groups.sum(-2, keepdim=True), exact_sums, atol=0.05, rtol=1e-3)
    assert torch.equal(block_means(k, k, v, geometry, config)[1].far.groups, got.far.groups)
    assert block_means(k, k, v, geometry, replace(config, far_group=1))[1].far is None


def test_attend_pass_with_far_groups_refuses_centroids_without_their_sums():
    config = SAAConfig(**SMALL, top_k=1, far_group=2)
    q, k, v = qkv(1, 2, 1, 64, 64, 32, 32, torch.float16)
    geometry = geometry_of(q, k, config, True, False)
    selection, centroids = saa_plan(q, k, v, 0.3, geometry, config)
    with pytest.raises(ValueError, match="far groups of 2 key blocks need their sums"):
        saa_kernels.saa_attend(q, k, v, replace(centroids, far=None), selection, 0.3, geometry, config,
                               interpret=INTERPRET)


class AttendLaunches:
    """Stands in for ``saa_attend_kernel`` and records whether each launch moved its tiles by TMA, and its
    warps; with ``fail_tma``, a TMA launch raises as a kernel that does not compile would."""

    def __init__(self, real, fail_tma: bool = False):
        self.real, self.fail_tma, self.tma, self.warps, self.last_first = real, fail_tma, [], [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tma.append(kwargs["TMA"])
            self.warps.append(kwargs["num_warps"])
            self.last_first.append(kwargs["LAST_FIRST"])
            if kwargs["TMA"] and self.fail_tma:
                raise RuntimeError("TMA lowering failed")
            return self.real[grid](*args, **kwargs)
        return launch


def attend_once(q, k, v, config, form, tma):
    """The attend pass alone, over the routing and centroids of the Triton path."""
    causal, bottom_right, _ = CAUSAL_FORMS[form]
    geometry = geometry_of(q, k, config, causal, bottom_right)
    selection, centroids = saa_plan(q, k, v, 0.3, geometry, config)
    out = saa_kernels.saa_attend(q, k, v, centroids, selection, 0.3, geometry, config,
                                 interpret=INTERPRET, tma=tma)
    return out, selection, centroids, geometry


@pytest.mark.parametrize("d, warps", [(64, 16), (128, 8)])
def test_query_blocks_of_256_rows_take_16_warps_at_head_dims_up_to_64(d, warps, monkeypatch):
    """256-row query blocks launch 16 warps at head dims <= 64 (at 8 their tiles spill) and 8 above; either
    way the pass is as accurate as PyTorch."""
    launches = AttendLaunches(saa_kernels.saa_attend_kernel)
    monkeypatch.setattr(saa_kernels, "saa_attend_kernel", launches)
    config = SAAConfig(block_m=256, block_n=64, min_keys=0, tau=None, top_k=2)
    q, k, v = qkv(1, 4, 2, 700, 700, d, d, torch.float16)
    out, selection, centroids, geometry = attend_once(q, k, v, config, "causal", tma=None)
    assert launches.warps == [warps]
    assert_attend_as_accurate_as_torch(out, q, k, v, centroids, selection, 0.3, geometry, config, torch.float16)
    assert selection.counts.sum() < geometry.allowed_total(4)  # some blocks enter through centroids


@pytest.mark.parametrize("far", [{}, {"far_group": 2, "near_blocks": 1}])
@pytest.mark.parametrize("form", CAUSAL_FORMS)
@pytest.mark.parametrize("b, h, hk, sq, sk, d, dv", [(1, 2, 2, 37, 37, 64, 64), (2, 4, 2, 45, 61, 80, 64)])
def test_attend_moves_exact_blocks_and_centroids_by_tma_as_by_pointers(form, b, h, hk, sq, sk, d, dv, far,
                                                                        monkeypatch):
    """The TMA form (zero-filled edges: a ragged last key block and centroid tile, head dim 80 in a tile
    of 128; with far centroids, centroid tiles from any run) gives the pointer form's output, as
    accurate as PyTorch in fp16."""
    launches = AttendLaunches(saa_kernels.saa_attend_kernel)
    monkeypatch.setattr(saa_kernels, "saa_attend_kernel", launches)
    config = SAAConfig(**SMALL, top_k=1, centroids=2, **far)
    q, k, v = qkv(b, h, hk, sq, sk, d, dv, torch.float16)
    by_tma, selection, centroids, geometry = attend_once(q, k, v, config, form, tma=True)
    by_pointers, *_ = attend_once(q, k, v, config, form, tma=False)
    assert launches.tma == [True, False]
    assert_attend_as_accurate_as_torch(by_tma, q, k, v, centroids, selection, 0.3, geometry, config, torch.float16)
    torch.testing.assert_close(by_tma, by_pointers, rtol=0, atol=0 if INTERPRET else 1e-3)


@pytest.mark.parametrize("far", [{}, {"far_group": 2, "near_blocks": 1}])
@pytest.mark.parametrize("form", CAUSAL_FORMS)
def test_attend_takes_exact_blocks_in_key_tiles_as_it_takes_them_whole(form, far):
    """Blocks of 32 keys in two steps of 16 (a ragged last block, masked diagonal steps): as accurate
    as PyTorch in fp16, and the whole blocks' output up to rounding."""
    config = SAAConfig(**{**SMALL, "block_m": 32, "block_n": 32}, top_k=1, centroids=2, **far)
    q, k, v = qkv(2, 4, 2, 75, 91, 64, 64, torch.float16)
    causal, bottom_right, _ = CAUSAL_FORMS[form]
    geometry = geometry_of(q, k, config, causal, bottom_right)
    selection, centroids = saa_plan(q, k, v, 0.3, geometry, config)
    whole = saa_kernels.saa_attend(q, k, v, centroids, selection, 0.3, geometry, config, interpret=INTERPRET)
    tiled = saa_kernels.saa_attend(q, k, v, centroids, selection, 0.3, geometry, config, interpret=INTERPRET,
                                   key_tile=16)
    assert_attend_as_accurate_as_torch(tiled, q, k, v, centroids, selection, 0.3, geometry, config, torch.float16)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=2e-3)


@pytest.mark.parametrize("key_tile", [8, 24, 64])
def test_attend_refuses_key_tiles_that_do_not_divide_a_block(key_tile):
    config = SAAConfig(**{**SMALL, "block_m": 32, "block_n": 32}, top_k=1)
    q, k, v = qkv(1, 2, 1, 64, 64, 32, 32, torch.float16)
    geometry = geometry_of(q, k, config, True, False)
    selection, centroids = saa_plan(q, k, v, 0.3, geometry, config)
    with pytest.raises(ValueError, match="key_tile must be a power of two from 16 to block_n=32"):
        saa_kernels.saa_attend(q, k, v, centroids, selection, 0.3, geometry, config, interpret=INTERPRET,
                               key_tile=key_tile)


@pytest.mark.skipif(INTERPRET or torch.cuda.get_device_capability()[0] < 9, reason="TMA needs a Hopper GPU")
def test_attend_takes_tma_by_default_on_hopper(monkeypatch):
    launches = AttendLaunches(saa_kernels.saa_attend_kernel)
    monkeypatch.setattr(saa_kernels, "saa_attend_kernel", launches)
    monkeypatch.setattr(flash.TMA_FORMS, "failed", set())
    q, k, v = qkv(1, 4, 2, 300, 300, 128, 128, torch.bfloat16)
    attend_once(q, k, v, SAAConfig(**SMALL, top_k=2), "causal", tma=None)
    assert launches.tma == [True]


@pytest.mark.skipif(INTERPRET or torch.cuda.get_device_capability()[0] < 9, reason="the default launch on Hopper")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("form, sq, sk", [("causal", 1000, 1000), ("causal", 1024, 1024), ("bottom-right", 700, 1100),
                                          ("full", 900, 1100)])
def test_the_triton_pass_at_the_default_blocks_compiles_at_any_length(d, form, sq, sk, monkeypatch):
    """The Triton pass's launch at the default blocks of 128 (8 warps; 128 registers at D64) compiles on
    Hopper with a ragged last key block as without, moves its tiles by TMA and is as accurate as PyTorch
    in bf16. A call this small takes every head's last query blocks first when causal, and gives the
    output the launch in block order gives."""
    launches = AttendLaunches(saa_kernels.saa_attend_kernel)
    monkeypatch.setattr(saa_kernels, "saa_attend_kernel", launches)
    monkeypatch.setattr(flash.TMA_FORMS, "failed", set())
    config = SAAConfig(min_keys=0, top_k=2, tau=None)
    q, k, v = qkv(1, 4, 2, sq, sk, d, d, torch.bfloat16)
    causal, bottom_right, _ = CAUSAL_FORMS[form]
    geometry = geometry_of(q, k, config, causal, bottom_right)
    selection, centroids = saa_plan(q, k, v, 0.3, geometry, config)
    out = saa_kernels.saa_attend(q, k, v, centroids, selection, 0.3, geometry, config, hopper=False)
    assert launches.tma == [True] and launches.last_first == [causal]
    assert_attend_as_accurate_as_torch(out, q, k, v, centroids, selection, 0.3, geometry, config, torch.bfloat16)
    assert selection.counts.sum() < geometry.allowed_total(4)  # some blocks enter through centroids
    monkeypatch.setattr(saa_kernels, "last_blocks_first", lambda k, v, causal: False)
    in_order = saa_kernels.saa_attend(q, k, v, centroids, selection, 0.3, geometry, config, hopper=False)
    torch.testing.assert_close(in_order, out, rtol=0, atol=0)


@pytest.mark.skipif(INTERPRET, reason="the L2 cache is a GPU's")
def test_last_query_blocks_go_first_where_keys_and_values_fit_in_half_the_l2_cache():
    """Causal calls whose keys and values take at most half the L2 cache take the last query blocks first;
    larger and non-causal calls keep the block order."""
    half_l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size // 2
    keys = half_l2 // (2 * 64 * 2)                                  # keys and values of head dim 64, bf16
    k, v = (torch.empty(1, 1, keys, 64, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    assert saa_kernels.last_blocks_first(k, v, causal=True)
    assert not saa_kernels.last_blocks_first(k, v, causal=False)
    k, v = (torch.empty(1, 1, keys + 64, 64, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    assert not saa_kernels.last_blocks_first(k, v, causal=True)


@pytest.mark.skipif(INTERPRET, reason="the L2 cache is a GPU's")
def test_the_router_takes_the_last_query_blocks_first_where_its_sampled_keys_fit_in_a_quarter_of_the_l2_cache():
    """Causal calls whose every key_stride-th key takes at most a quarter of the L2 cache route the last query
    blocks first; larger and non-causal calls keep the block order."""
    quarter_l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size // 4
    keys = 4 * quarter_l2 // (64 * 2)                               # every 4th key of head dim 64, bf16
    k = torch.empty(1, 1, keys, 64, dtype=torch.bfloat16, device=DEVICE)
    assert saa_kernels.routes_last_blocks_first(k, causal=True, key_stride=4)
    assert not saa_kernels.routes_last_blocks_first(k, causal=False, key_stride=4)
    assert not saa_kernels.routes_last_blocks_first(k, causal=True, key_stride=2)
    k = torch.empty(1, 1, keys + 64, 64, dtype=torch.bfloat16, device=DEVICE)
    assert not saa_kernels.routes_last_blocks_first(k, causal=True, key_stride=4)


def test_an_attend_tma_form_that_fails_falls_back_to_pointer_loads(monkeypatch, caplog):
    """Where the TMA form raises, the call and later ones load by pointers, with one warning."""
    launches = AttendLaunches(saa_kernels.saa_attend_kernel, fail_tma=True)
    monkeypatch.setattr(saa_kernels, "saa_attend_kernel", launches)
    monkeypatch.setattr(flash.TMA_FORMS, "failed", set())
    monkeypatch.setattr(flash, "tma_supported", lambda device: True)
    config = SAAConfig(**SMALL, top_k=1)
    q, k, v = qkv(1, 2, 1, 40, 40, 64, 64, torch.float16)
    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        out, *_ = attend_once(q, k, v, config, "causal", tma=None)
        again, *_ = attend_once(q, k, v, config, "causal", tma=None)
    assert launches.tma == [True, False, False]
    assert caplog.text.count("TMA lowering failed") == 1 and "the SAA attend pass" in caplog.text
    want, *_ = attend_once(q, k, v, config, "causal", tma=False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["triton", "reference"])
@pytest.mark.parametrize("form", CAUSAL_FORMS)
@pytest.mark.parametrize("b, h, hk, sq, sk, d", [(2, 4, 2, 37, 37, 64), (1, 2, 1, 50, 21, 128), (1, 3, 3, 1, 45, 64)])
def test_all_blocks_exact_is_dense(kernel, form, b, h, hk, sq, sk, d):
    """With every allowed block exact, SAA is dense attention (NaN rows included)."""
    causal, bottom_right, program = CAUSAL_FORMS[form]
    q, k, v = qkv(b, h, hk, sq, sk, d, d)
    config = SAAConfig(**SMALL, top_k=sk, centroids=2)
    out, stats = saa_forward(q, k, v, 0.125, causal, config, bottom_right=bottom_right, kernel=kernel)
    dense = attention_reference(q.double(), k.double(), v.double(), [], program.format(scale=0.125),
                                compute_dtype=torch.float64)
    assert stats.density == 1.0
    assert_as_accurate_as_torch(out, dense, attention_reference(q, k, v, [], program.format(scale=0.125)))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_rows_seeing_no_key_are_zero_on_request(kernel):
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key (zeros, as SDPA gives)."""
    q, k, v = qkv(1, 2, 1, 50, 21, 64, 64)
    program = CAUSAL_FORMS["bottom-right"][2].format(scale=0.125)
    config = SAAConfig(**SMALL, top_k=0, local_blocks=1)
    out, _ = saa_forward(q, k, v, 0.125, True, config, bottom_right=True, zero_empty_rows=True, kernel=kernel)
    assert torch.equal(out[..., :29, :], torch.zeros(1, 2, 29, 64, device=DEVICE))
    assert not out[..., 29:, :].isnan().any()
    dense = attention_reference(q, k, v, [], program, zero_empty_rows=True)
    assert relative_error(out, dense) < 1e-5  # 21 keys: the sink and diagonal blocks are all of them


@pytest.mark.parametrize("causal, expected", [(False, 11 / 16), (True, 9 / 10)])
def test_density_counts_exact_blocks_over_allowed_blocks(causal, expected):
    """4×4 blocks, one sink, the diagonal, one routed block each: non-causal 2+3+3+3 of 16 exact;
    causal 1+2+3+3 of 1+2+3+4 allowed."""
    q, k, v = qkv(1, 2, 1, 64, 64, 64, 64)
    config = SAAConfig(**SMALL, top_k=1, sinks=1, local_blocks=1)
    _, stats = saa_forward(q, k, v, 0.125, causal, config)
    assert stats.allowed_blocks == (16 if not causal else 10) * 2
    assert stats.density == pytest.approx(expected)


def test_sinks_and_local_blocks_are_kept_when_routing_prefers_others():
    """Keys of the sink and diagonal blocks point away from every query; they are exact anyway."""
    direction = torch.nn.functional.normalize(randn(64), dim=0)
    q = (direction + 0.01 * randn(1, 1, 128, 64)).contiguous()
    k = (direction + 0.01 * randn(1, 1, 128, 64))
    k[..., :16, :] = -k[..., :16, :]
    for start in range(16, 128, 32):  # every other block, including each diagonal one
        k[..., start:start + 16, :] = -k[..., start:start + 16, :]
    config = SAAConfig(**SMALL, top_k=1, sinks=1, local_blocks=2)
    for causal in (False, True):
        _, selection = saa_reference(q, k, k, 1.0, causal, config)
        exact = selection.exact[0, 0]                                            # [M, N]
        for m in range(8):
            assert exact[m, 0] and exact[m, m] and exact[m, max(m - 1, 0)]
            others = [n for n in range(1, m - 1)] if causal else [n for n in range(8) if n not in (0, m - 1, m)]
            routed = [n for n in others if exact[m, n]]
            assert len(routed) == min(1, len(others))
            if any(n % 2 == 0 for n in others):  # the routed block is one whose keys align with q
                assert routed[0] % 2 == 0


def test_top_k_and_tau_rank_by_estimated_mass():
    """One query block over five key blocks with estimated logits 3, 1, 2, 0, -1 (no forced blocks)."""
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0, -1.0])
    geometry = BlockGeometry(16, 80, 16, 16, causal=False)
    mass = torch.softmax(logits, 0)                                           # 0.636, 0.086, 0.234, 0.032, 0.012

    def chosen(**knobs):
        config = SAAConfig(**{**SMALL, **knobs}, sinks=0, local_blocks=0)
        selection = select_blocks(logits.view(1, 1, 1, 5), geometry, config)
        return selection.indices[0, 0, 0, :selection.counts[0, 0, 0]].tolist()

    assert chosen(top_k=2) == [0, 2]
    assert chosen(top_k=None, tau=0.5) == [0]
    assert chosen(top_k=None, tau=float(mass[0] + 0.01)) == [0, 2]
    assert chosen(top_k=None, tau=0.95) == [0, 1, 2]
    assert chosen(top_k=None, tau=0.97) == [0, 1, 2, 3]
    assert chosen(top_k=2, tau=0.95) == [0, 2]
    assert chosen(top_k=0) == []


@pytest.mark.parametrize("program, expected", [
    ("(mul s 0.125)", SAAProgram(0.125, False)),
    ("(mul 0.125 s)", SAAProgram(0.125, False)),
    ("(where (le k q) (mul s 0.125) -inf)", SAAProgram(0.125, True)),
    ("(where (ge q k) (mul s 0.125) -inf)", SAAProgram(0.125, True)),
    ("(where (lt k (add q 1.0)) (mul s 0.125) -inf)", SAAProgram(0.125, True)),
    ("(where (le k (add q (sub Sk Sq))) (mul s 0.125) -inf)", SAAProgram(0.125, True, bottom_right=True)),
    ("(where (le k (sub (add q Sk) Sq)) (mul s 0.125) -inf)", SAAProgram(0.125, True, bottom_right=True)),
    ("s", None),
    ("(add (mul s 0.125) $0)", None),
    ("(where $0 (mul s 0.125) -inf)", None),
    ("(where (le k (add q 1.0)) (mul s 0.125) -inf)", None),
    ("(where (and (le k q) (gt k (sub q 4.0))) (mul s 0.125) -inf)", None),
    ("(where (le k q) (mul s 0.125) 0.0)", None),
])
def test_applicable_programs(program, expected):
    assert saa_program(program) == expected
    assert saa_applicable(program) == (expected is not None)


def test_the_shortlist_holds_at_least_top_k_blocks_and_only_sampled_keys_uses_it():
    """A shortlist smaller than top_k would cap it; routers other than "sampled-keys" ignore candidates."""
    assert shortlist_config(SAAConfig(top_k=40, candidates=8)).top_k == 40
    assert shortlist_config(SAAConfig(top_k=None, tau=0.9, candidates=8)) == SAAConfig(
        top_k=8, tau=None, router="mean-key", candidates=None)
    q, k, v = qkv(1, 2, 1, 200, 200, 16, 16)
    config = SAAConfig(**SMALL, top_k=2, router="mean-key")
    with_list = saa_reference(q, k, v, 0.25, True, replace(config, candidates=3))
    without = saa_reference(q, k, v, 0.25, True, replace(config, candidates=None))
    assert torch.equal(with_list[0], without[0])


@pytest.mark.parametrize("values, message", [
    ({"block_n": 48}, "block_n must be a power of two"),
    ({"top_k": None, "tau": None}, "needs top_k, tau or both"),
    ({"tau": 1.5}, "tau must be"),
    ({"centroids": 3}, "centroids must be"),
    ({"far_group": 3}, "far_group must be a power of two <= 32"),
    ({"far_group": 64}, "far_group must be a power of two <= 32"),
    ({"near_blocks": -1}, "near_blocks must be an integer >= 0"),
    ({"max_error": 0}, "max_error"),
    ({"sinks": -1}, "sinks"),
    ({"min_keys": -1}, "min_keys must be an integer >= 0"),
    ({"denser": -1}, "denser must be an integer >= 0"),
    ({"graphs": 1}, "graphs must be True or False"),
    ({"router": "every-key"}, r"router must be one of \[.sampled-keys., .mean-key.\]"),
    ({"key_stride": 3}, "key_stride must be a power of two"),
    ({"key_stride": 256}, "key_stride must be a power of two <= block_n=128"),
    ({"query_stride": 3}, "query_stride must be a power of two <= block_m / 16 = 8"),
    ({"query_stride": 16}, "query_stride must be a power of two <= block_m / 16 = 8"),
    ({"block_m": 16, "query_stride": 2}, "query_stride must be a power of two <= block_m / 16 = 1"),
    ({"router": "sampled-keys", "candidates": 0}, "candidates must be None or an integer >= 1"),
    ({"topk": 3}, r"unknown SAA option\(s\) \['topk'\]; valid keys are \['block_m'"),
])
def test_config_validation(values, message):
    with pytest.raises(SAAConfigError, match=message):
        SAAConfig.from_dict(values)
    with pytest.raises(OptionError, match=message):
        Options.resolve({"saa": values})


def test_saa_option_gives_an_operating_point():
    assert Options.resolve({}).saa is None
    assert Options.resolve({"saa": {"top_k": 4}}).saa == SAAConfig(top_k=4)
    assert SAAConfig.from_json(SAAConfig(tau=0.9, top_k=None).to_json()) == SAAConfig(tau=0.9, top_k=None)


def test_denser_points_double_the_routed_blocks_and_halve_the_mass_left_out():
    first, second, third = SAAConfig().denser_points()
    assert [(p.top_k, p.tau) for p in (first, second, third)] == [(24, pytest.approx(0.985)),
                                                                  (48, pytest.approx(0.9925)),
                                                                  (96, pytest.approx(0.99625))]
    assert first.denser == third.denser == 0 and replace(first, top_k=12, tau=0.97, denser=3) == SAAConfig()
    assert [p.top_k for p in SAAConfig(top_k=0, tau=None, denser=3).denser_points()] == [1, 2, 4]
    assert [p.tau for p in SAAConfig(top_k=None, tau=0.9, denser=1).denser_points()] == [pytest.approx(0.95)]
    assert SAAConfig(denser=0).denser_points() == [] and first.routing() == "top_k 24, tau 0.985"


def test_default_query_stride_scores_every_other_row_where_blocks_allow():
    assert SAAConfig().effective_query_stride == 2
    assert SAAConfig(block_m=16).effective_query_stride == 1  # 16 rows cannot be halved for tl.dot
    assert replace(SAAConfig(), block_m=16).effective_query_stride == 1
    assert SAAConfig(query_stride=1).effective_query_stride == 1


@pytest.fixture
def gate():
    SAA_SITES.clear()
    SAA_CALLS.clear()
    SHORT_CALLS.clear()
    GRAPHED.clear()
    yield SAA_SITES
    SAA_SITES.clear()
    GRAPHED.clear()


def test_gate_keeps_saa_within_budget(gate):
    q, k, v = qkv(1, 2, 1, 40, 40, 64, 64)
    program = CAUSAL_FORMS["causal"][2].format(scale=0.125)
    config = SAAConfig(**SMALL, top_k=8, max_error=1e-3).to_json()
    op = torch.ops.attncompiler.saa_attention
    first = op(q, k, v, program, config, "graph0:site", "auto")
    second = op(q, k, v, program, config, "graph0:site", "auto")
    record = gate["graph0:site"]
    assert record.fallback is None and record.density == 1.0 and record.error < 1e-5
    assert SAA_CALLS == {"saa": 2, "dense": 1}  # the first call also measured dense attention
    assert torch.equal(first, second)


def test_calls_shorter_than_min_keys_run_dense_and_leave_the_gate_alone(gate):
    """A decoding step (one query) and a short prompt run dense; the first long call is the gate's."""
    program = CAUSAL_FORMS["bottom-right"][2].format(scale=0.125)
    config = SAAConfig(**{**SMALL, "min_keys": 64}, top_k=8).to_json()
    op = torch.ops.attncompiler.saa_attention
    for sq, sk in ((40, 40), (1, 63)):
        q, k, v = qkv(1, 2, 1, sq, sk, 64, 64)
        torch.testing.assert_close(op(q, k, v, program, config, "graph0:site", "auto"),
                                   attention_reference(q, k, v, [], program), atol=1e-5, rtol=1e-5)
    assert SAA_CALLS == {"dense": 2} and "graph0:site" not in gate and SHORT_CALLS["graph0:site"] == 2
    q, k, v = qkv(1, 2, 1, 64, 64, 64, 64)
    op(q, k, v, program, config, "graph0:site", "auto")
    assert SAA_CALLS == {"dense": 3, "saa": 1} and gate["graph0:site"].error is not None


def test_gate_rejects_an_operating_point_over_budget(gate, caplog):
    q, k, v = qkv(1, 2, 1, 96, 96, 64, 64)
    program = CAUSAL_FORMS["causal"][2].format(scale=0.125)
    config = SAAConfig(**SMALL, top_k=0, sinks=0, local_blocks=0, centroids=1, max_error=0.01, denser=2)
    saa_out, _ = saa_forward(q, k, v, 0.125, True, config)
    dense = attention_reference(q, k, v, [], program)
    assert relative_error(saa_out, dense) > 0.01
    op = torch.ops.attncompiler.saa_attention
    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        outs = [op(q, k, v, program, config.to_json(), "graph0:site", "auto") for _ in range(2)]
    record = gate["graph0:site"]
    assert record.fallback.startswith("relative error") and "exceeds max_error 0.01" in record.fallback
    assert re.search(r", and so did the denser top_k 1 \(error [0-9.]+, density 0\.[0-9]+\) and top_k 2 "
                     r"\(error [0-9.]+, density 0\.[0-9]+\)$", record.fallback)
    assert record.error > 0.01 and record.density < 1 and record.point is None
    assert sum("runs dense attention" in r.message for r in caplog.records) == 1
    assert SAA_CALLS == {"dense": 2}
    for out in outs:
        assert relative_error(out, dense) < 1e-5


def _budget_between_the_first_two_points(q, k, v, program):
    """An operating point whose budget its first denser point meets and it does not, on these inputs: ``(config,
    dense output, the denser point's output and stats, the given point's error, the denser point's)``."""
    given = SAAConfig(**SMALL, top_k=1, sinks=0, local_blocks=0)
    denser = given.denser_points()[0]
    dense = attention_reference(q, k, v, [], program)
    (given_out, _), (denser_out, denser_stats) = (saa_forward(q, k, v, 0.125, True, c) for c in (given, denser))
    given_error, denser_error = relative_error(given_out, dense), relative_error(denser_out, dense)
    assert denser_error < given_error
    config = replace(given, max_error=(given_error + denser_error) / 2)
    return config, dense, denser_out, denser_stats, given_error, denser_error


def test_gate_runs_the_first_denser_point_within_budget(gate):
    """An operating point over its budget whose first denser point is within it: the site runs that point from
    its first call on, and says so."""
    q, k, v = qkv(1, 2, 1, 96, 96, 64, 64)
    program = CAUSAL_FORMS["causal"][2].format(scale=0.125)
    config, _, denser_out, denser_stats, given_error, denser_error = _budget_between_the_first_two_points(
        q, k, v, program)
    op = torch.ops.attncompiler.saa_attention
    outs = [op(q, k, v, program, config.to_json(), "graph0:site", "auto") for _ in range(2)]
    record = gate["graph0:site"]
    assert record.fallback is None and record.point == replace(config.denser_points()[0],
                                                               max_error=config.max_error).to_json()
    assert record.error == pytest.approx(denser_error) and record.given_error == pytest.approx(given_error)
    assert record.density == pytest.approx(denser_stats.density) and record.density < 1
    assert record.describe().startswith(f"saa at the denser top_k 2 (the given point's error {given_error:.3g}): ")
    assert SAA_CALLS == {"saa": 2, "dense": 1}
    for out in outs:
        torch.testing.assert_close(out, denser_out, rtol=0, atol=0)


def test_a_denser_point_slower_than_dense_leaves_the_site_dense(gate, monkeypatch):
    """Where the first call is timed (GPUs; here the CPU too) and SAA within the budget, at a denser point, was
    the slower, the site runs dense attention from then on and says why; the first call keeps SAA's output."""
    import attncompiler.saa_ops as saa_ops

    q, k, v = qkv(1, 2, 1, 96, 96, 64, 64)
    monkeypatch.setattr(saa_ops, "TIMED_DEVICES", (q.device.type,))
    monkeypatch.setattr(saa_ops, "_saa_milliseconds", lambda run_saa, graph, device: (2.0, False))
    monkeypatch.setattr(saa_ops, "_milliseconds", lambda call, device: 0.5)  # dense's call
    program = CAUSAL_FORMS["causal"][2].format(scale=0.125)
    config, dense, denser_out, _, given_error, _ = _budget_between_the_first_two_points(q, k, v, program)
    op = torch.ops.attncompiler.saa_attention
    first, second = (op(q, k, v, program, config.to_json(), "graph0:site", "auto") for _ in range(2))
    record = gate["graph0:site"]
    assert record.fallback == (f"relative error {given_error:.3g} exceeds max_error {config.max_error:.3g}, and SAA "
                               "within it, at the denser top_k 2, was slower than dense attention")
    assert record.speedup == 0.25 and record.describe().endswith("speedup 0.25x)")
    assert SAA_CALLS == {"saa": 1, "dense": 2}
    torch.testing.assert_close(first, denser_out, rtol=0, atol=0)
    torch.testing.assert_close(second, dense, atol=1e-5, rtol=1e-5)


def test_a_denser_point_that_fails_leaves_the_site_dense(gate, monkeypatch):
    """A kernel that raises at a denser point: the site runs dense attention (the first call's dense output) and
    says why; dense attention ran once."""
    import attncompiler.saa_ops as saa_ops

    def saa_or_failure(q, k, v, scale, causal, config, **kwargs):
        if config.top_k > 0:
            raise RuntimeError("no kernel for this list width")
        return saa_forward(q, k, v, scale, causal, config, **kwargs)

    monkeypatch.setattr(saa_ops, "saa_forward", saa_or_failure)
    q, k, v = qkv(1, 2, 1, 96, 96, 64, 64)
    program = CAUSAL_FORMS["causal"][2].format(scale=0.125)
    config = SAAConfig(**SMALL, top_k=0, sinks=0, local_blocks=0, max_error=0.01)
    out = torch.ops.attncompiler.saa_attention(q, k, v, program, config.to_json(), "graph0:site", "auto")
    assert gate["graph0:site"].fallback == "RuntimeError: no kernel for this list width (at a denser point)"
    assert SAA_CALLS == {"dense": 1}
    torch.testing.assert_close(out, attention_reference(q, k, v, [], program), atol=1e-5, rtol=1e-5)


def test_gate_without_denser_points_falls_back_at_once(gate):
    q, k, v = qkv(1, 2, 1, 96, 96, 64, 64)
    program = CAUSAL_FORMS["causal"][2].format(scale=0.125)
    config = SAAConfig(**SMALL, top_k=0, sinks=0, local_blocks=0, max_error=0.01, denser=0)
    torch.ops.attncompiler.saa_attention(q, k, v, program, config.to_json(), "graph0:site", "auto")
    record = gate["graph0:site"]
    assert record.fallback.startswith("relative error") and record.fallback.endswith(f"(density {record.density:.2f})")


def test_gate_falls_back_for_programs_saa_cannot_compute(gate):
    q, k, v = qkv(1, 2, 2, 20, 20, 64, 64)
    op = torch.ops.attncompiler.saa_attention
    out = op(q, k, v, "(mul s (neg 0.125))", SAAConfig(**SMALL).to_json(), "site", "auto")
    assert "not a scale or a causal scale" in gate["site"].fallback
    torch.testing.assert_close(out, attention_reference(q, k, v, [], "(mul s (neg 0.125))"))


def test_relative_error_requires_the_same_nan_rows():
    exact = torch.tensor([[1.0, 2.0], [math.nan, math.nan]])
    assert relative_error(exact.clone(), exact) == 0.0
    assert relative_error(torch.zeros(2, 2), exact) == math.inf


def test_fake_impl_gives_the_grouped_output_shape():
    with FakeTensorMode():
        q, k, v = torch.empty(2, 8, 33, 64), torch.empty(2, 2, 33, 64), torch.empty(2, 2, 33, 32)
        out = torch.ops.attncompiler.saa_attention(q, k, v, "(mul s 0.125)", SAAConfig().to_json(), "s", "auto")
    assert out.shape == (2, 8, 33, 32)


def test_attend_pass_refuses_the_gluon_form_where_it_cannot_run():
    """``hopper=True`` insists on the Gluon pass: inputs it cannot take (here head dim 64, or no sm_90
    GPU) raise rather than run another form."""
    config = SAAConfig(**SMALL)
    q, k, v = qkv(1, 2, 2, 40, 40, 64, 64, dtype=torch.float16)
    geometry = BlockGeometry(40, 40, 16, 16, True)
    selection, centroids = saa_plan(q, k, v, 0.125, geometry, config)
    with pytest.raises(ValueError, match="the Gluon attend pass needs an sm_90 GPU"):
        saa_kernels.saa_attend(q, k, v, centroids, selection, 0.125, geometry, config, hopper=True)
