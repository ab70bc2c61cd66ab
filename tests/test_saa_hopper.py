"""SAA's Gluon attend pass for Hopper against the PyTorch oracle, as accurate as the Triton pass (sm_90 only)."""

from dataclasses import replace

import pytest
import torch

from attncompiler.codegen.saa import HOPPER_FORMS, saa_attend
from attncompiler.codegen.saa_hopper import hopper_attend_supported
from attncompiler.saa import saa_plan
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_reference import attend_reference
from attncompiler.saa_routing import BlockGeometry
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
