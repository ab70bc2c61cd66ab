"""Tiny Hugging Face architectures (random weights): every attention site rewritten, outputs unchanged.

Eager attention and, where transformers offers it, SDPA attention; decoders get a left-padded
batch (fully masked query rows included), encoders a right-padded one.
"""

import pytest
import torch

import attncompiler
from attncompiler.hf_zoo import ARCHS, attention_sites, build

CASES = [(name, impl) for name, arch in ARCHS.items() for impl in ("eager", "sdpa") if impl == "eager" or arch.sdpa]


def first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else next(iter(output.values()))


@pytest.mark.parametrize("name, impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_every_site_rewritten_and_output_unchanged(name, impl, kernel_calls):
    model, inputs = build(name, impl)
    with torch.no_grad():
        expected = first_tensor(model(**inputs))
        report = attncompiler.explain(model, **inputs, options={"inner": "eager"})
    sites = attention_sites(name)
    assert len(report.sites) == sites, report.table()
    assert report.num_rewritten == sites, report.table()
    assert kernel_calls["triton"] == sites and kernel_calls["reference"] == 0, dict(kernel_calls)
    torch.testing.assert_close(first_tensor(report.output), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name, impl, kinds", [
    ("llama", "eager", ["padding + causal"]),
    ("llama", "sdpa", ["padding + causal"]),
    ("mistral", "sdpa", ["padding + causal + sliding window (k > q - 8)"]),
    ("gemma2", "eager", ["padding + causal + sliding window (k > q - 8)", "padding + causal"]),  # alternating
    ("gpt2", "eager", ["padding + causal"]),
    ("bert", "eager", ["padding"]),
    ("bert", "sdpa", ["padding"]),
])
def test_masks_are_computed_from_positions(name, impl, kinds):
    """The model's mask subgraph is read as a predicate: no Sq × Sk mask reaches the kernel."""
    model, inputs = build(name, impl)
    with torch.no_grad():
        report = attncompiler.explain(model, **inputs, options={"inner": "eager"})
    masks = [site.summary["mask"] for site in report.sites]
    assert [kind for kind in kinds if any(f"computed: {kind} from" in m for m in masks)] == kinds, masks
    assert not any("12, 12]" in m for m in masks), masks


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3"])
def test_without_attention_mask_the_mask_is_causal_from_positions(name, kernel_calls):
    """No attention_mask: transformers gathers position ids and compares packed-sequence ids; the
    analysis proves both come from an arange, leaving a causal (windowed) predicate and no operand."""
    model, inputs = build(name, "eager", batch=1)
    inputs = {"input_ids": inputs["input_ids"], "use_cache": False}
    with torch.no_grad():
        expected = first_tensor(model(**inputs))
        report = attncompiler.explain(model, **inputs, options={"inner": "eager"})
    for site in report.sites:
        assert site.summary["mask"].startswith("computed: causal"), site.summary
        assert "$" not in site.summary["program"], site.summary
    assert kernel_calls["triton"] == len(report.sites) == attention_sites(name)
    torch.testing.assert_close(first_tensor(report.output), expected, rtol=2e-5, atol=2e-5)
