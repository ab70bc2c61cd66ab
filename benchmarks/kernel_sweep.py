"""Launch-config sweep of the generated dense kernels at one shape, with SDPA and FlexAttention as yardsticks.

For each forward config of :data:`~attncompiler.codegen.configs.CONFIG_SPACE` and each backward
config of :data:`~attncompiler.codegen.configs.BWD_CONFIG_SPACE` that compiles, prints the time of
the forward, and of each backward kernel (preprocess, dK/dV, dQ, from the profiler), in ms and
TFLOP/s. No prune predicate is applied: the sweep shows what the predicates keep out.
``--warp-specialize`` also times the forward with Triton's warp-specialized key loop.

    python benchmarks/kernel_sweep.py [--seq 4096] [--head-dim 128] [--causal] [--passes fwd bwd] [--top 12]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from attncompiler.codegen import flash
from attncompiler.codegen.common import load_source, source_hash
from attncompiler.codegen.configs import BWD_CONFIG_SPACE, CONFIG_SPACE, _pow2_at_least
from attncompiler.codegen.flash_bwd import flash_backward

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from attention import HIDDEN, TOKENS, flops, program_of  # noqa: E402

KEY_LOOP = "for start_n in range(key_start, key_end, BLOCK_N):"


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def warp_specialized_kernel(program: str):
    """The forward kernel with its key loop as ``tl.range(..., warp_specialize=True)``."""
    _, source = flash.generate(program)
    if KEY_LOOP not in source:
        raise RuntimeError("the forward template's key loop changed")
    source = source.replace(KEY_LOOP, "for start_n in tl.range(key_start, key_end, BLOCK_N, warp_specialize=True):")
    name = f"flash_fwd_ws_{source_hash(source)}"
    old = source.split("def flash_fwd_", 1)[1].split("(", 1)[0]
    source = source.replace(f"flash_fwd_{old}", name)
    return getattr(load_source(name, source), name)


def run_forward(q, k, v, program, config, kernel=None):
    if kernel is None:
        return flash.flash_forward(q, k, v, [], program, config=config)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    b, h, s, d = q.shape
    num_m = math.ceil(s / config.block_m)
    kernel[(num_m * b * h,)](
        q, k, v, out, lse.unsqueeze(-1), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *lse.unsqueeze(-1).stride()[:3], h, 1, s, s, num_m, HEAD_D=d, HEAD_DV=d,
        BLOCK_D=_pow2_at_least(d), BLOCK_DV=_pow2_at_least(d), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_PRECISION="tf32", ZERO_EMPTY_ROWS=False, num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse


def kernel_times(fn, iters: int = 20) -> dict[str, float]:
    """ms per call of each GPU kernel that ``fn`` launches, grouped by the kernel's role."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.key_averages():
        name = event.key
        role = next((r for r in ("preprocess", "dkdv", "dq") if r in name), None)
        if role:
            times[role] += event.device_time_total / 1e3 / iters
    return dict(times)


def wanted(config, args) -> bool:
    return (not args.stages or config.num_stages in args.stages) and (not args.warps or config.num_warps in args.warps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--passes", nargs="+", choices=("fwd", "bwd"), default=["fwd", "bwd"])
    parser.add_argument("--warp-specialize", action="store_true")
    parser.add_argument("--stages", type=int, nargs="+", help="only these num_stages")
    parser.add_argument("--warps", type=int, nargs="+", help="only these num_warps")
    parser.add_argument("--top", type=int, default=12, help="rows to print per table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_sweep.py needs a CUDA GPU")
    d, s = args.head_dim, args.seq
    heads, batch = HIDDEN // d, TOKENS // s
    dtype = getattr(torch, args.dtype)
    q, k, v, grad = (torch.randn(batch, heads, s, d, device="cuda", dtype=dtype) for _ in range(4))
    program = program_of(d ** -0.5, args.causal)
    fwd_work = flops(batch, heads, s, d, args.causal, backward=False)
    bwd_work = 2.5 * fwd_work
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
          f"{args.dtype} D{d} S{s} B{batch} H{heads} causal={args.causal}")

    yardsticks = []
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            fwd = bench(lambda: sdpa(q, k, v, is_causal=args.causal))
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            out = sdpa(qg, kg, vg, is_causal=args.causal)
            bwd = bench(lambda: torch.autograd.grad(out, (qg, kg, vg), grad, retain_graph=True))
        yardsticks.append(f"{name}: fwd {fwd:.3f} ms ({fwd_work / fwd / 1e9:.0f} TFLOP/s), "
                          f"bwd {bwd:.3f} ms ({bwd_work / bwd / 1e9:.0f} TFLOP/s)")
        print(yardsticks[-1])

    if "fwd" in args.passes:
        rows = []
        variants = [(False, None)] + ([(True, warp_specialized_kernel(program))] if args.warp_specialize else [])
        for config in CONFIG_SPACE:
            if not wanted(config, args):
                continue
            for ws, kernel in variants:
                try:
                    ms = bench(lambda: run_forward(q, k, v, program, config, kernel))
                except Exception as e:  # out of resources, compile failures: reported, not fatal
                    print(f"  fwd {config} ws={ws}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    continue
                rows.append((ms, config, ws))
                print(f"  fwd {config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages} "
                      f"ws={int(ws)}: {ms:.3f} ms", flush=True)
        rows.sort(key=lambda r: r[0])
        print("\n| forward config | warp-specialized | ms | TFLOP/s |\n|---|---|---|---|")
        for ms, config, ws in rows[:args.top]:
            print(f"| {config.block_m}×{config.block_n}, {config.num_warps} warps, {config.num_stages} stages "
                  f"| {'yes' if ws else 'no'} | {ms:.3f} | {fwd_work / ms / 1e9:.0f} |")

    if "bwd" in args.passes:
        out, lse = flash.flash_forward(q, k, v, [], program)
        rows = []
        for config in BWD_CONFIG_SPACE:
            if not wanted(config, args):
                continue

            def step():
                return flash_backward(q, k, v, out, lse, grad, [], program, zero_empty_rows=False, config=config)
            try:
                ms = bench(step)
                parts = kernel_times(step)
            except Exception as e:
                print(f"  bwd {config}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            rows.append((ms, config, parts))
            print(f"  bwd {config.block_resident}x{config.block_streamed} w{config.num_warps} s{config.num_stages}: "
                  f"{ms:.3f} ms " + " ".join(f"{r}={t:.3f}" for r, t in parts.items()), flush=True)
        rows.sort(key=lambda r: r[0])
        print("\n| backward config (resident×streamed) | ms | TFLOP/s | preprocess | dK/dV | dQ |\n|---|---|---|---|---|---|")
        for ms, config, parts in rows[:args.top]:
            print(f"| {config.block_resident}×{config.block_streamed}, {config.num_warps} warps, "
                  f"{config.num_stages} stages | {ms:.3f} | {bwd_work / ms / 1e9:.0f} | "
                  + " | ".join(f"{parts.get(r, 0):.3f}" for r in ("preprocess", "dkdv", "dq")) + " |")
        best_dkdv = min(rows, key=lambda r: r[2].get("dkdv", math.inf))
        best_dq = min(rows, key=lambda r: r[2].get("dq", math.inf))
        print(f"fastest dK/dV: {best_dkdv[1]} {best_dkdv[2].get('dkdv', 0):.3f} ms; "
              f"fastest dQ: {best_dq[1]} {best_dq[2].get('dq', 0):.3f} ms")
    print("\n".join(yardsticks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
