"""Where the dense forward's time goes on this GPU: the kernel against probes that each drop part of its
work, the compiled kernel's resources and instruction mix, and the machine's own ceilings, in one run.

Probes are edits of the generated TMA forward that are timed only (their outputs are wrong by design):

- ``no exp2``: probabilities are the shifted scores themselves, so no exponential is computed;
- ``no rescale``: the running sum and the accumulator are not rescaled when the row maximum moves;
- ``matmuls only``: both (what is left: the two products, the row maximum and the tile moves).

Ceilings measured in the same process: a bf16 matrix product by cuBLAS (8192³, the tensor cores'
reachable peak) and the exp2 rate of the special-function units (a Triton kernel doing nothing
else). From those, the time the forward's products and exponentials need if they never overlap. The
SASS counts come from the default launch config's compiled kernel (``cuobjdump``). Last, the host's
time to issue one forward call against its kernel's time on the GPU.

    python benchmarks/forward_anatomy.py [--seq 4096] [--head-dim 128] [--causal] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from attncompiler.codegen import flash
from attncompiler.failures import failure_text

sys.path.insert(0, str(Path(__file__).parent))
from attention import HIDDEN, TOKENS, flops, program_of  # noqa: E402
from kernel_sweep import add_shape_arguments, edited_forward, running  # noqa: E402

NO_EXP2 = [("alpha = tl.exp2((m_i - m_use) * SCORE_RATE)", "alpha = (m_i - m_use) * SCORE_RATE"),
           ("p = tl.exp2(s * SCORE_RATE - (m_use * SCORE_RATE)[:, None])",
            "p = s * SCORE_RATE - (m_use * SCORE_RATE)[:, None]")]
NO_RESCALE = [("l_i = l_i * alpha + tl.sum(p, 1)", "l_i = l_i + tl.sum(p, 1)"),
              ("acc = acc * alpha[:, None] + tl.dot(", "acc = acc + tl.dot(")]
PROBES = {"no exp2": NO_EXP2, "no rescale": NO_RESCALE, "matmuls only": NO_EXP2 + NO_RESCALE}
# SASS instruction classes worth counting in an attention forward.
SASS_CLASSES = ("HGMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "SHFL", "UTMALDG", "SYNCS",
                "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR", "BAR.SYNC")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


@triton.jit
def exp2_rate_kernel(X, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """ITERS exponentials per element of a register-resident block (and one multiply to keep them bounded)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    for _ in range(ITERS):
        x = tl.exp2(x) * 0.5
    tl.store(X + offs, x)


def exp2_per_second() -> float:
    """Exponentials per second the whole GPU computes, from :func:`exp2_rate_kernel`."""
    block, iters = 1024, 4096
    programs = torch.cuda.get_device_properties(0).multi_processor_count * 16
    x = torch.rand(programs * block, device="cuda")
    ms = bench(lambda: exp2_rate_kernel[(programs,)](x, ITERS=iters, BLOCK=block, num_warps=4))
    return programs * block * iters / ms * 1e3


def matmul_tflops(dtype: torch.dtype) -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * 8192 ** 3 / bench(lambda: a @ b) / 1e9


def issue_and_kernel_ms(fn, calls: int = 50) -> tuple[float, float]:
    """``(host, kernel)`` ms per call of ``fn``: the host's time to issue it (calls queued without waiting)
    and its GPU kernels' time (profiler). Where the host is slower, back-to-back calls leave the GPU idle."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernel = sum(event.device_time_total for event in prof.key_averages()) / calls / 1e3
    return host, kernel


class Capturing:
    """A Triton kernel whose last compiled launch is kept (``compiled``), for its resources and SASS."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiled = self.kernel[grid](*args, **kwargs)
            return self.compiled
        return launch


def sass_counts(compiled) -> tuple[Counter, int]:
    """``(counts, instructions)``: :data:`SASS_CLASSES` counted in the kernel's SASS, and all its instructions."""
    sass = compiled.asm["sass"]  # one "control<TAB>instruction ;" line per instruction
    opcodes = re.findall(r"^[^\t\n]*\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, flags=re.M)
    counts = Counter({"full waits": len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0\b", sass))})
    for opcode in opcodes:
        for name in SASS_CLASSES:
            if opcode == name or opcode.startswith(name + "."):
                counts[name] += 1
    return counts, len(opcodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/forward_anatomy.py needs a CUDA GPU")
    d, s, dtype = args.head_dim, args.seq, getattr(torch, args.dtype)
    heads, batch = HIDDEN // d, TOKENS // s
    q, k, v = (torch.randn(batch, heads, s, d, device="cuda", dtype=dtype) for _ in range(3))
    program = program_of(d ** -0.5, args.causal)
    work = flops(batch, heads, s, d, args.causal, backward=False)
    scores = batch * heads * s * s / (2 if args.causal else 1)
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
          f"{args.dtype} D{d} S{s} B{batch} H{heads} causal={args.causal}\n")

    def ours():
        return flash.flash_forward(q, k, v, [], program)[0]

    name, kernel = flash.load_kernel(program, tma=True)
    capture = Capturing(kernel)
    with running(program, (name, capture)):
        ours()
    rows = [("attncompiler forward", bench(ours))]
    host_ms, kernel_ms = issue_and_kernel_ms(ours)
    for label, edits in PROBES.items():
        with running(program, edited_forward(program, label, edits)):
            rows.append((f"probe: {label}", bench(ours)))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        rows.append(("sdpa-cudnn", bench(lambda: sdpa(q, k, v, is_causal=args.causal))))

    peak = matmul_tflops(dtype)
    exp_rate = exp2_per_second()
    serial_ms = (work / peak / 1e9) + scores / exp_rate * 1e3
    print("| kernel | ms | TFLOP/s | time vs ours |\n|---|---|---|---|")
    for label, ms in rows:
        print(f"| {label} | {ms:.3f} | {work / ms / 1e9:.0f} | {ms / rows[0][1]:.2f} |")
    print(f"| products at the cuBLAS peak ({peak:.0f} TFLOP/s) + exponentials at the measured exp2 rate "
          f"({exp_rate / 1e12:.2f} T/s), not overlapped | {serial_ms:.3f} | {work / serial_ms / 1e9:.0f} | "
          f"{serial_ms / rows[0][1]:.2f} |")

    print(f"\none forward call: the host issues it in {host_ms:.3f} ms, its kernel runs {kernel_ms:.3f} ms on the GPU"
          f"{' (host-bound)' if host_ms > kernel_ms else ''}")
    compiled = capture.compiled
    config = flash.default_config(q, d, interpret=False)
    print(f"\ncompiled forward ({config.block_m}×{config.block_n}, {config.num_warps} warps, "
          f"{config.num_stages} stages): {compiled.n_regs} registers/thread, {compiled.n_spills} spills, "
          f"{compiled.metadata.shared} bytes of shared memory")
    try:
        counts, total = sass_counts(compiled)
    except Exception as e:  # no cuobjdump next to Triton
        print(f"SASS not available: {failure_text(e)}")
        return 0
    print(f"SASS: {total} instructions; " + ", ".join(f"{n} {counts[n]}" for n in SASS_CLASSES)
          + f"; waits for every product in flight (WARPGROUP.DEPBAR.LE gsb0, 0x0): {counts['full waits']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
