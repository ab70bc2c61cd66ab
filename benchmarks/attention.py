"""Attention forward and forward+backward on the GPU: attncompiler's generated kernels against their peers, in one run.

Peers: SDPA with the flash backend (FlashAttention-2), SDPA with cuDNN, FlexAttention
(compiled; a block mask for causal) and eager matmul-softmax-matmul. batch·seq = 16K tokens,
hidden = heads·head_dim = 2048, bf16 and fp16, causal and not, random inputs. Prints a markdown
table (TFLOP/s and our ratio to each peer), writes it to ``--out`` when given, and with
``--results`` adds it as a dated section to ``benchmarks/RESULTS.md``.

    python benchmarks/attention.py [--seqs 1024 4096 16384] [--head-dims 64 128] [--causal both]
                                   [--passes fwd fwd+bwd] [--precompile JOBS] [--out FILE] [--results]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from attncompiler.codegen.flash import flash_forward
from attncompiler.codegen.flash_bwd import flash_backward
from attncompiler.failures import failure_text

TOKENS, HIDDEN = 16384, 2048
PEERS = ("attncompiler", "sdpa-flash", "sdpa-cudnn", "flex", "eager")
RATIO_PEERS = ("sdpa-flash", "sdpa-cudnn", "flex")
EAGER_SCORE_BYTES = 4 << 30  # eager materializes B·H·S² scores (and their gradient): skip beyond this
RESULTS = Path(__file__).with_name("RESULTS.md")


def program_of(scale: float, causal: bool) -> str:
    """The score program a matched causal / plain attention site carries."""
    scaled = f"(mul s {scale!r})"
    return f"(where (le k q) {scaled} -inf)" if causal else scaled


class Ours(torch.autograd.Function):
    """The generated forward and backward kernels, called directly (no op dispatch or config lookup)."""

    @staticmethod
    def forward(ctx, q, k, v, program):
        out, lse = flash_forward(q, k, v, [], program)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.program = program
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*flash_backward(q, k, v, out, lse, grad_out, [], ctx.program, zero_empty_rows=False), None)


def peers(scale: float, causal: bool, seq: int) -> dict:
    """Name → attention function of (q, k, v) in [B, H, S, D], differentiable."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per shape: past Dynamo's recompile limit a compiled function silently runs eager.
    torch.compiler.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, seq, seq)
    program = program_of(scale, causal)

    def with_backend(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, scale=scale, is_causal=causal)
        return run

    def eager(q, k, v):
        scores = (q @ k.transpose(-2, -1)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
        return torch.softmax(scores, dim=-1) @ v

    return {
        "attncompiler": lambda q, k, v: Ours.apply(q, k, v, program),
        "sdpa-flash": with_backend(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
        "flex": lambda q, k, v: flex(q, k, v, scale=scale, block_mask=block_mask),
        "eager": eager,
    }


def flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, backward: bool) -> float:
    """Matmul FLOPs: 4·B·H·S²·D forward (half of it causal); the backward does 2.5× the forward."""
    forward = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def measure(seq: int, head_dim: int, dtype: torch.dtype, causal: bool, backward: bool) -> dict[str, float | None]:
    """TFLOP/s of each implementation at one shape (None where it cannot run or disagrees)."""
    heads, batch = HIDDEN // head_dim, TOKENS // seq
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=backward)
               for _ in range(3))
    grad_out = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype)
    work = flops(batch, heads, seq, head_dim, causal, backward)
    reference = None
    results = {}
    for name, fn in peers(head_dim ** -0.5, causal, seq).items():
        if name == "eager" and batch * heads * seq * seq * dtype.itemsize * (3 if backward else 1) > EAGER_SCORE_BYTES:
            results[name] = None
            continue
        try:
            if backward:
                def step():
                    fn(q, k, v).backward(grad_out)
                outputs = torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
            else:
                def step():
                    with torch.no_grad():
                        fn(q, k, v)
                with torch.no_grad():
                    outputs = (fn(q, k, v),)
            reference = outputs if reference is None else reference
            err = max(relative_error(a, b) for a, b in zip(outputs, reference))
            if err > 2e-2:
                raise RuntimeError(f"{name} differs from attncompiler by {err:.3g} (relative)")
            ms = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v] if backward else None,
                                         return_mode="median")
            results[name] = work / ms / 1e9
        except (RuntimeError, torch.OutOfMemoryError) as e:
            print(f"  {name}: {failure_text(e)}", file=sys.stderr)
            results[name] = None
    return results


def warm(seq: int, head_dim: int, dtype: torch.dtype, causal: bool, backward: bool) -> None:
    """Run each compiled implementation once at one shape, untimed: fills the on-disk compile caches
    (Inductor's graphs, Triton's kernels) that a later process then reads instead of compiling."""
    heads, batch = HIDDEN // head_dim, TOKENS // seq
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=backward)
               for _ in range(3))
    for name, fn in peers(head_dim ** -0.5, causal, seq).items():
        if name not in ("attncompiler", "flex"):
            continue
        if backward:
            fn(q, k, v).sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)
    torch.cuda.synchronize()


def precompile(grid: list[tuple], jobs: int) -> None:
    """Compile every shape of ``grid`` in ``jobs`` processes at once (see :func:`warm`)."""
    import json
    import subprocess

    print(f"compiling {len(grid)} shapes in {jobs} processes", file=sys.stderr, flush=True)
    workers = [subprocess.Popen([sys.executable, __file__, "--warm-shapes", json.dumps(grid[i::jobs])])
               for i in range(jobs)]
    for worker in workers:
        worker.wait()


def table_row(dtype: str, head_dim: int, seq: int, causal: bool, pass_name: str, r: dict[str, float | None]) -> str:
    cells = [f"{r[n]:.0f}" if r.get(n) else "–" for n in PEERS]
    ours = r.get("attncompiler")
    ratios = [f"{ours / r[p]:.2f}×" if ours and r.get(p) else "–" for p in RATIO_PEERS]
    short = dtype.replace("bfloat", "bf").replace("float", "fp")
    return f"| {short} | {head_dim} | {seq} | {'yes' if causal else 'no'} | {pass_name} | " + \
        " | ".join(cells + ratios) + " |"


def table_header() -> list[str]:
    names = list(PEERS) + [f"ours / {p.removeprefix('sdpa-')}" for p in RATIO_PEERS]
    return ["| dtype | D | S | causal | pass | " + " | ".join(names) + " |", "|" + "---|" * (5 + len(names))]


def add_to_results(path: Path, heading: str, command: str, table: str) -> None:
    """Insert a dated section right after the file's introduction (newest first)."""
    text = path.read_text()
    first = text.find("\n## ")
    intro, rest = (text, "") if first < 0 else (text[:first + 1], text[first + 1:])
    section = f"## {heading}\n\n`{command}`\n\n{table}\n\n"
    path.write_text(intro.rstrip("\n") + "\n\n" + section + rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--results", action="store_true", help=f"add the table to {RESULTS.name} as a dated section")
    parser.add_argument("--precompile", type=int, default=0, metavar="JOBS",
                        help="first compile every shape in JOBS processes at once (the timed run then reads the caches)")
    parser.add_argument("--warm-shapes", help=argparse.SUPPRESS)  # a --precompile worker's shapes, as JSON
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    if args.warm_shapes:
        import json
        for dtype, d, s, causal, pass_name in json.loads(args.warm_shapes):
            warm(s, d, getattr(torch, dtype), causal, backward=pass_name == "fwd+bwd")
        return 0

    causal_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    grid = [(dtype, d, s, causal, pass_name) for dtype in args.dtypes for d in args.head_dims for s in args.seqs
            for causal in causal_modes for pass_name in args.passes]
    if args.precompile:
        precompile(grid, args.precompile)
    heading = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
               f"triton {triton.__version__}")
    lines = [f"TFLOP/s; batch·seq={TOKENS}, hidden={HIDDEN}; fwd+bwd counts 3.5× the forward's FLOPs.", "",
             *table_header()]
    for dtype, d, s, causal, pass_name in grid:
        r = measure(s, d, getattr(torch, dtype), causal, backward=pass_name == "fwd+bwd")
        lines.append(table_row(dtype, d, s, causal, pass_name, r))
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\n{heading}\n\n{table}")
    if args.out:
        Path(args.out).write_text(f"{heading}\n\n{table}\n")
    if args.results:
        command = "python benchmarks/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
        add_to_results(RESULTS, heading, command.strip(), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
