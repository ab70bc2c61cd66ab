"""The forward kernel's TMA form: Q, K, V and O moved by tensor descriptors instead of pointers.

On CPU the form runs through the interpreter when asked for (``tma=True``); on a Hopper GPU it is
what ``flash_forward`` runs by default, and these tests check that it does.
"""

import logging
import math

import pytest
import torch

from attncompiler.codegen import flash
from attncompiler.codegen.configs import FlashConfig
from attncompiler.codegen.flash import flash_forward, tma_descriptors
from attncompiler.options import triton_interpret
from attncompiler.reference import attention_reference
from attncompiler.spec import output_shape
from tolerance import assert_as_accurate_as_torch

INTERPRET = triton_interpret()
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
HOPPER = not INTERPRET and torch.cuda.get_device_capability()[0] >= 9
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")

PROGRAMS = {
    "scaled": ("(mul s 0.125)", 0),
    "causal": ("(where (le k q) (mul s 0.125) -inf)", 0),
    "window": ("(where (and (le k q) (gt k (sub q 20.0))) (mul s 0.125) -inf)", 0),
    "bias": ("(add (mul s 0.125) $0)", 1),
    # Sq > Sk, bottom-right causal filled with fp32's finfo.min: the first rows see no key and average
    # all of v, through the kernel's extra fold over the keys past the bound.
    "finite-fill": ("(where (le k (add q (sub Sk Sq))) (mul s 0.125) -3.4028234663852886e+38)", 0),
}


@pytest.fixture
def forms(monkeypatch):
    """Which forms of the forward kernel were loaded: ``True`` for TMA, ``False`` for pointers."""
    loaded = []
    real = flash.load_kernel

    def spy(program, tma=False):
        loaded.append(tma)
        return real(program, tma)

    monkeypatch.setattr(flash, "load_kernel", spy)
    monkeypatch.setattr(flash.TMA_FORMS, "failed", set())
    return loaded


def qkv(b, hq, hk, sq, sk, d, dv, dtype=torch.float16):
    torch.manual_seed(0)
    return (torch.randn(b, hq, sq, d, device=DEVICE).to(dtype), torch.randn(b, hk, sk, d, device=DEVICE).to(dtype),
            torch.randn(b, hk, sk, dv, device=DEVICE).to(dtype))


def tma_or_auto():
    """``tma=True`` in the interpreter (which never picks TMA by itself); the default on a GPU."""
    return True if INTERPRET else None


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("b, hq, hk, sq, sk, d, dv", [
    (1, 4, 2, 37, 53, 64, 64),     # GQA, ragged tiles on both sides
    (2, 2, 2, 70, 70, 40, 40),     # head dim below the tile width: columns past it are zero-filled
    (1, 2, 1, 100, 70, 64, 32),    # Sq > Sk, a narrower value head
])
def test_tma_form_matches_the_reference(name, b, hq, hk, sq, sk, d, dv, forms):
    program, n_operands = PROGRAMS[name]
    q, k, v = qkv(b, hq, hk, sq, sk, d, dv)
    operands = [torch.randn(sq, sk, device=DEVICE).to(torch.float16) for _ in range(n_operands)]
    out = torch.full(output_shape(q.shape, k.shape, v.shape), math.nan, dtype=v.dtype, device=DEVICE)
    config = FlashConfig(32, 16, 4, 1) if INTERPRET else None  # several key steps per query tile
    _, lse = flash_forward(q, k, v, operands, program, config=config, interpret=INTERPRET, out=out, tma=tma_or_auto())
    if INTERPRET or HOPPER:
        assert forms == [True], "the TMA form did not run"
    exact = attention_reference(q.double(), k.double(), v.double(), operands, program, compute_dtype=torch.float64)
    # PyTorch's fp16 result; the fp32 fill overflows fp16 scores, so that program's scores stay in fp32.
    compute = torch.float32 if name == "finite-fill" else q.dtype
    assert_as_accurate_as_torch(out, exact, attention_reference(q, k, v, operands, program, compute_dtype=compute))
    pointer_out, pointer_lse = flash_forward(q, k, v, operands, program, config=config, interpret=INTERPRET, tma=False)
    assert forms[-1] is False
    torch.testing.assert_close(out, pointer_out, rtol=0, atol=0 if INTERPRET else 2e-3, equal_nan=True)
    torch.testing.assert_close(lse, pointer_lse, rtol=0, atol=0 if INTERPRET else 1e-5, equal_nan=True)


def test_descriptors_need_16_byte_strides_and_a_contiguous_head_dim():
    blocks = [[1, 1, 16, 16]]
    assert tma_descriptors([torch.zeros(1, 2, 8, 16, dtype=torch.float16)], blocks) is not None
    assert tma_descriptors([torch.zeros(1, 2, 8, 12, dtype=torch.float16)], blocks) is None  # 24-byte rows
    assert tma_descriptors([torch.zeros(1, 2, 16, 8, dtype=torch.float16).mT], blocks) is None  # D not contiguous
    assert tma_descriptors([torch.zeros(1, 2, 8, 16, dtype=torch.float32)], blocks) is None  # fp16/bf16 only
    broadcast = torch.zeros(1, 1, 8, 16, dtype=torch.float16).expand(1, 2, 8, 16)
    assert tma_descriptors([broadcast], blocks) is None  # stride 0 over heads
    (one_row,) = tma_descriptors([torch.zeros(3, 2, 1, 16, dtype=torch.float16)[:, :1]], blocks)
    assert one_row.strides == [32, 16, 16, 1]  # size-1 dims take the contiguous stride


def test_asking_for_tma_where_it_cannot_move_the_tensors_is_an_error():
    q, k, v = qkv(1, 2, 2, 8, 8, 12, 12)
    with pytest.raises(ValueError, match="TMA cannot move these tensors"):
        flash_forward(q, k, v, [], PROGRAMS["scaled"][0], interpret=INTERPRET, tma=True)


def test_a_tma_form_that_fails_falls_back_to_pointer_loads(monkeypatch, forms, caplog):
    """Where the TMA form raises (a compile error, say), the call and later ones use pointer loads."""
    real = flash.load_kernel

    def no_tma(program, tma=False):
        if tma:
            raise RuntimeError("TMA lowering failed")
        return real(program, tma)

    monkeypatch.setattr(flash, "load_kernel", no_tma)
    monkeypatch.setattr(flash, "tma_supported", lambda device: True)
    program = PROGRAMS["causal"][0]
    q, k, v = qkv(1, 2, 2, 37, 37, 64, 64)
    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        out, _ = flash_forward(q, k, v, [], program, interpret=INTERPRET)
        again, _ = flash_forward(q, k, v, [], program, interpret=INTERPRET)
    assert "TMA lowering failed" in caplog.text and "using pointer loads" in caplog.text
    (failure,) = flash.TMA_FORMS.failed
    assert failure[:3] == (program, 64, 64)
    exact = attention_reference(q.double(), k.double(), v.double(), [], program, compute_dtype=torch.float64)
    assert_as_accurate_as_torch(out, exact, attention_reference(q, k, v, [], program, compute_dtype=q.dtype))
    torch.testing.assert_close(again, out, rtol=0, atol=0)
