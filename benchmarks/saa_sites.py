"""SAA through its op, site after site as a model's layers call it: what the host costs short calls.

Calls ``attncompiler::saa_attention`` at ``--layers`` sites of one shape, as a prefill does, and
times one pass over the sites (after a first pass, each site's gate): SAA with later calls
replayed from CUDA graphs (the default), SAA without graphs (``"graphs": false``), the dense op,
and SDPA (default dispatch, grouped heads). Each site has its own random bf16 inputs; causal; the
error budget is open (random inputs are SAA's worst case for error, and the gate is not what is
timed here). Heads, kv heads and head dim default to SmolLM2-135M's. Prints a markdown table of
milliseconds per pass and per call, and records it, dated, in ``benchmarks/RESULTS.md`` unless
``--no-record``.

    python benchmarks/saa_sites.py [--seqs 8192 16384] [--layers 30] [--heads 9] [--kv-heads 3] [--head-dim 64]
                                   [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from torch.nn.functional import scaled_dot_product_attention as sdpa

from attncompiler.saa_config import SAAConfig
from attncompiler.saa_ops import GRAPHED, SAA_CALLS, SAA_SITES, _dense_attention
from saa import print_and_record


def site_inputs(layers: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> list[tuple[torch.Tensor, ...]]:
    """Random bf16 q ``[1, heads, seq, D]``, k and v ``[1, kv_heads, seq, D]`` for each site."""
    def randn(h):
        return torch.randn(1, h, seq, head_dim, device="cuda", dtype=torch.bfloat16)

    return [(randn(heads), randn(kv_heads), randn(kv_heads)) for _ in range(layers)]


def passes(inputs, program: str, scale: float) -> dict:
    """Name → one pass over the sites (each a call per site)."""
    def saa(graphs: bool):
        config = SAAConfig(min_keys=0, max_error=1e9, graphs=graphs).to_json()
        return lambda: [torch.ops.attncompiler.saa_attention(q, k, v, program, config, f"layer{i}", "auto")
                        for i, (q, k, v) in enumerate(inputs)]

    return {
        "SAA, graphs": saa(True),
        "SAA, no graphs": saa(False),
        "dense op": lambda: [_dense_attention(q, k, v, program, "auto", False) for q, k, v in inputs],
        "sdpa": lambda: [sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True) for q, k, v in inputs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-record", action="store_true", help="do not write to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/saa_sites.py needs a CUDA GPU")
    scale = args.head_dim ** -0.5
    program = f"(where (le k q) (mul s {scale!r}) -inf)"
    names = list(passes([], program, scale))
    header = (f"## {datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
              f"triton {triton.__version__} · SAA site after site: {args.layers} sites, {args.heads} heads, "
              f"{args.kv_heads} kv heads, head dim {args.head_dim}, causal, bf16, random inputs")
    lines = [header, "", "| S | " + " | ".join(f"{n}, ms a pass (a call)" for n in names)
             + " | graphs' speedup | SAA with graphs vs dense op | SAA with graphs vs sdpa |",
             "|---" * (len(names) + 4) + "|"]
    for seq in args.seqs:
        inputs = site_inputs(args.layers, seq, args.heads, args.kv_heads, args.head_dim)
        ms, replays = {}, {}
        for name, one_pass in passes(inputs, program, scale).items():
            SAA_SITES.clear()
            GRAPHED.clear()
            one_pass()  # each site's first call: the gate (and compiles)
            ms[name] = triton.testing.do_bench(one_pass, warmup=5, rep=50, return_mode="median")
            replays[name] = GRAPHED.replays
        cells = [f"{ms[n]:.2f} ({ms[n] / args.layers:.3f})" for n in names]
        cells += [f"{ms['SAA, no graphs'] / ms['SAA, graphs']:.2f}×", f"{ms['dense op'] / ms['SAA, graphs']:.2f}×",
                  f"{ms['sdpa'] / ms['SAA, graphs']:.2f}×"]
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
        print(lines[-1], f"(calls replayed: {replays['SAA, graphs']}; {dict(SAA_CALLS)})", flush=True)
        del inputs
    print_and_record(lines, "saa_sites.py", argv, args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
