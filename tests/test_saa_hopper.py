"""SAA's Gluon kernels for Hopper (sm_90 only): the attend pass against the PyTorch oracle, as accurate as the
Triton pass; the router's logits and selections against the Triton router's."""

from dataclasses import replace

import pytest
import torch

from attncompiler.codegen import saa as saa_kernels
from attncompiler.codegen.saa import HOPPER_FORMS, saa_attend, sampled_key_logits, sampled_key_selection
from attncompiler.codegen.saa_hopper import hopper_attend_supported
from attncompiler.codegen.saa_hopper_router import hopper_listed_logits, hopper_router_supported
from attncompiler.saa import saa_plan
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_reference import attend_reference
from attncompiler.saa_routing import BlockGeometry, select_blocks, shortlist_config
from tolerance import assert_as_accurate_as_torch

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")]

POINTS = {  # the default (far groups of 32 beyond 16 blocks), small far groups, none
    "default": {},
    "far groups of 2, 2 centroids": {"far_group": 2, "near_blocks": 2, "centroids": 2, "top_k": 4},
    "no far groups": {"far_group": 1, "top_k": 3, "tau": None},
}


def inputs(b, h, hk, sq, sk, d, dtype, heads_last=False):
    def randn(heads, seq):
        if heads_last:  # [B, S, H, D] memory, as Hugging Face models hand it over
            return torch.randn(b, seq, heads, d, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(b, heads, seq, d, device="cuda", dtype=dtype)
    return randn(h, sq), randn(hk, sk), randn(hk, sk)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq, sk, causal, key_offset", [(4096, 4096, True, 0), (3000, 3000, True, 0),
                                                        (1000, 5000, True, 4000), (2500, 3100, False, 0)])
def test_gluon_attend_pass_is_as_accurate_as_the_triton_pass(point, dtype, sq, sk, causal, key_offset):
    """Exact blocks (whole, ragged and causal), near centroids and far groups, GQA: the Gluon pass
    (insisted on, so it ran) is within twice the Triton pass's distance from the fp64 oracle."""
    config = replace(SAAConfig(), **POINTS[point])
    q, k, v = inputs(2, 4, 2, sq, sk, 128, dtype)
    geometry = BlockGeometry(sq, sk, 128, 128, causal, key_offset)
    scale = 128 ** -0.5
    selection, centroids = saa_plan(q, k, v, scale, geometry, config)
    assert hopper_attend_supported(q, k, v, config)
    got = saa_attend(q, k, v, centroids, selection, scale, geometry, config, hopper=True)
    triton_out = saa_attend(q, k, v, centroids, selection, scale, geometry, config, hopper=False)
    exact = attend_reference(q, k, v, centroids, selection, scale, geometry, config, compute_dtype=torch.float64)
    assert_as_accurate_as_torch(got, exact, triton_out, factor=2.0, floor=1e-3)


def test_gluon_attend_pass_reads_strided_heads_and_is_the_default_for_them():
    """q, k, v in [B, S, H, D] memory go by TMA as they are; without ``hopper`` the Gluon pass runs
    (no fallback recorded) and gives what it gives when insisted on."""
    config = SAAConfig()
    q, k, v = inputs(1, 8, 2, 8192, 8192, 128, torch.bfloat16, heads_last=True)
    geometry = BlockGeometry(8192, 8192, 128, 128, True)
    selection, centroids = saa_plan(q, k, v, 128 ** -0.5, geometry, config)
    insisted = saa_attend(q, k, v, centroids, selection, 128 ** -0.5, geometry, config, hopper=True)
    failed = set(HOPPER_FORMS.failed)
    default = saa_attend(q, k, v, centroids, selection, 128 ** -0.5, geometry, config)
    assert HOPPER_FORMS.failed == failed and torch.equal(default, insisted)
    triton_out = saa_attend(q, k, v, centroids, selection, 128 ** -0.5, geometry, config, hopper=False)
    assert (insisted.float() - triton_out.float()).abs().max().item() < 0.05


def test_gluon_attend_pass_applies_only_where_it_runs():
    """fp16/bf16 head dim 128 (keys, values and centroids alike), blocks of 128, TMA-movable tensors."""
    config = SAAConfig()
    q, k, v = inputs(1, 2, 2, 256, 256, 128, torch.bfloat16)
    _, centroids = saa_plan(q, k, v, 128 ** -0.5, BlockGeometry(256, 256, 128, 128, True), config)
    assert hopper_attend_supported(q, k, v, config) and hopper_attend_supported(q, k, v, config, centroids)
    assert not hopper_attend_supported(q, k, v, config, replace(centroids, keys=centroids.keys.float()))
    assert not hopper_attend_supported(q[..., :64].contiguous(), k[..., :64].contiguous(), v, config)
    assert not hopper_attend_supported(q.float(), k.float(), v.float(), config)
    assert not hopper_attend_supported(q, k, v, replace(config, block_m=64))
    assert not hopper_attend_supported(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, config)


def shortlist_of(q, geometry, config, seed=0):
    """A fresh shortlist: the ``max(candidates, top_k)`` best key blocks of random mean-key logits (and the
    forced ones), in block order."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(*q.shape[:2], geometry.num_m, geometry.num_n, device="cuda", generator=generator)
    return select_blocks(logits, geometry, shortlist_config(config))


def listed_logits(q, k, scale, geometry, config, listed):
    """``(gluon, triton, in_list)``: the Gluon router's and the Triton router kernel's logits of the blocks
    ``listed`` lists, in list order, and which entries are listed (the Gluon router runs these inputs)."""
    width = listed.indices.shape[-1]
    list_pad = saa_kernels._pow2_at_least(width)
    assert hopper_router_supported(q, k, geometry, config, list_pad)
    gluon = hopper_listed_logits(q, k, scale, geometry, config, listed, list_pad)[..., :width]
    triton_logits = sampled_key_logits(q, k, scale, geometry, config.key_stride, listed,
                                       query_stride=config.effective_query_stride)
    in_list = torch.arange(width, device="cuda") < listed.counts[..., None]
    return gluon, triton_logits.gather(-1, listed.indices.long()), in_list


@pytest.mark.parametrize("d, dtype, key_stride, block_m, query_stride, sq, sk, causal, key_offset", [
    (64, torch.bfloat16, 4, 128, 2, 8192, 8192, True, 0),       # the default, SmolLM2's head dim
    (128, torch.bfloat16, 4, 128, 2, 3000, 3000, True, 0),      # ragged last blocks
    (64, torch.float16, 2, 128, 2, 1000, 5000, True, 4000),     # bottom-right, 64 samples a block
    (128, torch.float16, 8, 64, 1, 2500, 3100, False, 0),       # not causal, 16 samples a block, every row
    (64, torch.bfloat16, 4, 256, 4, 4095, 4095, True, 0),       # query blocks of 256, every 4th row
])
def test_gluon_router_logits_are_the_triton_routers(d, dtype, key_stride, block_m, query_stride, sq, sk, causal,
                                                    key_offset):
    """The Gluon router's logits of each query block's listed blocks equal the Triton router kernel's
    (fp32 sums in another order), whichever query blocks its programs take first, and the selection made
    from them keeps what the fused Triton kernel keeps wherever no two logits tie to within that rounding."""
    config = replace(SAAConfig(), block_m=block_m, key_stride=key_stride, query_stride=query_stride)
    geometry = BlockGeometry(sq, sk, block_m, 128, causal, key_offset)
    q, k, _ = inputs(2, 6, 2, sq, sk, d, dtype)
    scale = d ** -0.5
    listed = shortlist_of(q, geometry, config)
    got, want, in_list = listed_logits(q, k, scale, geometry, config, listed)
    assert torch.isfinite(got[in_list]).all()
    assert (got[in_list] - want[in_list]).abs().max().item() < 1e-4
    last_first = hopper_listed_logits(q, k, scale, geometry, config, listed, saa_kernels._pow2_at_least(
        listed.indices.shape[-1]), last_first=True)[..., :got.shape[-1]]
    assert torch.equal(last_first[in_list], got[in_list])                 # the programs' order changes nothing
    gluon = sampled_key_selection(q, k, scale, geometry, config, shortlist_of(q, geometry, config), hopper=True)
    fused = sampled_key_selection(q, k, scale, geometry, config, shortlist_of(q, geometry, config), hopper=False)
    same = (gluon.indices == fused.indices).all(-1) & (gluon.counts == fused.counts)
    assert same.float().mean().item() > 0.999


def test_gluon_router_takes_later_blocks_that_outscore_its_first_step():
    """Sampled scores of a later listed block (key block 10: positive queries, its keys positive and 60-fold)
    so far above the first step's that sums against the first step's maxima overflow fp32: the rows'
    largest scores are taken first and the logits are the Triton router's still."""
    config = SAAConfig()
    geometry = BlockGeometry(4096, 4096, 128, 128, True)
    torch.manual_seed(0)
    q, k, _ = inputs(1, 4, 2, 4096, 4096, 64, torch.bfloat16)
    q = q.abs() + 0.5
    k[:, :, 1280:1408] = k[:, :, 1280:1408].abs() * 60
    rows = q[:, :, 4095:4096].float()                                   # the last query block's last row
    first, later = (rows @ k[:, :, keys].float().repeat_interleave(2, 1).transpose(-1, -2)
                    for keys in (slice(0, 256, 4), slice(1280, 1408, 4)))  # the first step's blocks, block 10
    assert ((later.amax(-1) - first.amax(-1)) * 0.125).max().item() > 89  # e**89 > fp32's largest
    listed = shortlist_of(q, geometry, config)
    got, want, in_list = listed_logits(q, k, 0.125, geometry, config, listed)
    late = listed.indices[..., -1, :] == 10                                # the last query block lists block 10
    assert late.any() and (want[..., -1, :][late & in_list[..., -1, :]] > -1).all()
    assert torch.isfinite(got[in_list]).all() and (got[in_list] - want[in_list]).abs().max().item() < 0.05


def test_gluon_router_is_the_default_where_it_runs():
    """Without ``hopper`` the Gluon router routes the default operating point (no fallback recorded), and it
    refuses what it does not compute when insisted on."""
    config = SAAConfig()
    geometry = BlockGeometry(8192, 8192, 128, 128, True)
    q, k, _ = inputs(1, 8, 2, 8192, 8192, 64, torch.bfloat16, heads_last=True)
    failed = set(saa_kernels.HOPPER_ROUTER.failed)
    default = sampled_key_selection(q, k, 0.125, geometry, config, shortlist_of(q, geometry, config))
    insisted = sampled_key_selection(q, k, 0.125, geometry, config, shortlist_of(q, geometry, config), hopper=True)
    assert saa_kernels.HOPPER_ROUTER.failed == failed
    assert torch.equal(default.indices, insisted.indices) and torch.equal(default.counts, insisted.counts)
    odd = replace(config, query_stride=1)                                  # 128 scored rows
    assert not hopper_router_supported(q, k, geometry, odd, 64)
    with pytest.raises(ValueError, match="Gluon SAA router"):
        sampled_key_selection(q, k, 0.125, geometry, odd, shortlist_of(q, geometry, odd), hopper=True)
    assert not hopper_router_supported(q[..., :32].contiguous(), k[..., :32].contiguous(), geometry, config, 64)
    assert not hopper_router_supported(q.float(), k.float(), geometry, config, 64)
