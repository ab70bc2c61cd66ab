"""Attention forward on the GPU: attncompiler's generated kernel against its peers, in one run.

Peers: SDPA with the flash backend (FlashAttention-2), SDPA with cuDNN, FlexAttention
(compiled) and eager matmul-softmax-matmul. batch·seq = 16K tokens, hidden = heads·head_dim =
2048, bf16 and fp16, random inputs. Prints a markdown table (TFLOP/s and our ratio to each peer)
and writes it to ``--out`` when given.

    python benchmarks/attention.py [--seqs 1024 4096 16384] [--head-dims 64 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from attncompiler.codegen.flash import flash_forward

TOKENS, HIDDEN = 16384, 2048


def peers(scale: float) -> dict:
    """Name → forward function of (q, k, v) in [B, H, S, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    program = f"(mul s {scale!r})"

    def with_backend(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, scale=scale)
        return run

    return {
        "attncompiler": lambda q, k, v: flash_forward(q, k, v, [], program),
        "sdpa-flash": with_backend(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
        "flex": lambda q, k, v: flex(q, k, v, scale=scale),
        "eager": lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v,
    }


def measure(seq: int, head_dim: int, dtype: torch.dtype) -> dict[str, float | None]:
    """TFLOP/s of each implementation at one shape (None where it cannot run)."""
    heads, batch = HIDDEN // head_dim, TOKENS // seq
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    flops = 4 * batch * heads * seq * seq * head_dim
    scale = head_dim ** -0.5
    reference = None
    results = {}
    for name, fn in peers(scale).items():
        if name == "eager" and batch * heads * seq * seq * 2 > 8 << 30:
            results[name] = None
            continue
        try:
            out = fn(q, k, v)
            reference = out if reference is None else reference
            err = (out.float() - reference.float()).abs().max().item()
            if err > 5e-2:
                raise RuntimeError(f"{name} differs from attncompiler by {err:.3g}")
            ms = triton.testing.do_bench(lambda: fn(q, k, v), warmup=50, rep=200, return_mode="median")
            results[name] = flops / ms / 1e9
        except RuntimeError as e:
            print(f"  {name}: {str(e).splitlines()[0]}", file=sys.stderr)
            results[name] = None
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")

    names = list(peers(1.0))
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
              f"triton {triton.__version__} · forward, non-causal, batch·seq={TOKENS}, hidden={HIDDEN}")
    lines = [header, "", "| dtype | D | S | " + " | ".join(f"{n} TFLOP/s" for n in names) +
             " | ours / flash | ours / cuDNN | ours / flex |", "|" + "---|" * (3 + len(names) + 3)]
    for dtype in args.dtypes:
        for d in args.head_dims:
            for s in args.seqs:
                r = measure(s, d, getattr(torch, dtype))
                cells = [f"{r[n]:.0f}" if r[n] else "–" for n in names]
                ratios = [f"{r['attncompiler'] / r[p]:.2f}×" if r["attncompiler"] and r[p] else "–"
                          for p in ("sdpa-flash", "sdpa-cudnn", "flex")]
                lines.append(f"| {dtype} | {d} | {s} | " + " | ".join(cells + ratios) + " |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
