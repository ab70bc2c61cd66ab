"""Launch-config sweep of the generated dense kernels at one shape, with SDPA and FlexAttention as yardsticks.

For each forward config of :data:`~attncompiler.codegen.configs.CONFIG_SPACE` and each backward
launch of :data:`~attncompiler.codegen.configs.BWD_TILES_SPACE` that compiles (given to both backward
kernels), prints the time of the forward, and of each backward kernel (preprocess, dK/dV, dQ, from
the profiler), in ms and TFLOP/s. No prune predicate is applied: the sweep shows what the predicates keep out.
``--variants`` picks the forward kernels: the generated TMA form (the default on Hopper), its
pointer-load form, or the TMA form with its key loop warp-specialized or with the heaviest (causal)
query tiles scheduled first.

    python benchmarks/kernel_sweep.py [--seq 4096] [--head-dim 128] [--causal] [--passes fwd bwd] [--top 12]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections import defaultdict

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from attncompiler.codegen import flash
from attncompiler.codegen.common import load_source, source_hash
from attncompiler.codegen.configs import BWD_TILES_SPACE, CONFIG_SPACE, BwdConfig, default_bwd_config
from attncompiler.codegen.flash_bwd import flash_backward

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from attention import HIDDEN, TOKENS, flops, program_of  # noqa: E402

FORMS = {"tma": True, "pointer": False}  # the generated forward's two forms: tiles moved by TMA or by pointers
KEY_LOOP = "for start_n in range(key_start, key_end, BLOCK_N):"
QUERY_TILE = "pid_m = pid % NUM_M_BLOCKS"
# Source rewrites of the generated forward that a variant times: (text, replacement).
VARIANT_EDITS = {
    "warp-specialized": (KEY_LOOP, "for start_n in tl.range(key_start, key_end, BLOCK_N, warp_specialize=True):"),
    "heavy-first": (QUERY_TILE, "pid_m = NUM_M_BLOCKS - 1 - pid % NUM_M_BLOCKS"),
}


def failure(e: Exception) -> str:
    """One line for a config that did not run: a compile error's position, source line and message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and line.strip() != "^"]
    return f"{type(e).__name__}: " + " | ".join(lines[:3] + lines[-1:] if len(lines) > 4 else lines)[:400]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def edited_forward(program: str, label: str, edits: list[tuple[str, str]]):
    """``(name, kernel)``: the TMA forward kernel for ``program`` with each ``(text, replacement)`` of
    ``edits`` applied to its generated source."""
    _, source = flash.generate(program, tma=True)
    old = source.split("def flash_fwd_", 1)[1].split("(", 1)[0]
    for text, replacement in edits:
        if text not in source:
            raise RuntimeError(f"the forward template changed: no {text!r}")
        source = source.replace(text, replacement)
    name = f"flash_fwd_{label.replace('-', '_').replace(' ', '_')}_{source_hash(source)}"
    source = source.replace(f"flash_fwd_{old}", name)
    return name, getattr(load_source(name, source), name)


@contextlib.contextmanager
def running(program: str, edited):
    """While entered, ``flash_forward`` runs ``edited`` (a ``(name, kernel)`` pair) as ``program``'s TMA form."""
    loaded = flash.load_kernel
    flash.load_kernel = lambda p, tma=False: edited if p == program and tma else loaded(p, tma)
    try:
        yield
    finally:
        flash.load_kernel = loaded


@contextlib.contextmanager
def forward_variant(program: str, variant: str):
    """While entered, ``flash_forward`` runs ``program``'s TMA form edited by ``variant`` (one of
    :data:`VARIANT_EDITS`; "tma" and "pointer" leave the forms as generated)."""
    if variant in FORMS:
        yield
        return
    with running(program, edited_forward(program, variant, [VARIANT_EDITS[variant]])):
        yield


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


def bwd_name(config: BwdConfig) -> str:
    """A backward config as the tables show it: one launch for both kernels, or each kernel's."""
    def tiles(t):
        return f"{t.resident}×{t.streamed}, {t.num_warps} warps, {t.num_stages} stages"
    return tiles(config.dkdv) if config.dkdv == config.dq else f"dK/dV {tiles(config.dkdv)}; dQ {tiles(config.dq)}"


def wanted(config, args) -> bool:
    """Whether ``--configs``, ``--stages`` and ``--warps`` keep a config (a backward one by its dK/dV launch)."""
    if isinstance(config, BwdConfig):
        config = config.dkdv
    named = "x".join(str(x) for x in vars(config).values())
    return ((not args.stages or config.num_stages in args.stages) and (not args.warps or config.num_warps in args.warps)
            and (not args.configs or named in args.configs))


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The shape one kernel study runs at: ``--seq``, ``--head-dim``, ``--causal``, ``--dtype``."""
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--passes", nargs="+", choices=("fwd", "bwd"), default=["fwd", "bwd"])
    parser.add_argument("--variants", nargs="+", choices=(*FORMS, *VARIANT_EDITS),
                        help="forward kernels to time: the generated forms (TMA, pointer loads), edits of the TMA "
                             "form (default: the form flash_forward runs on this GPU)")
    parser.add_argument("--configs", nargs="+", help="only these configs, as BMxBNxWARPSxSTAGES")
    parser.add_argument("--stages", type=int, nargs="+", help="only these num_stages")
    parser.add_argument("--warps", type=int, nargs="+", help="only these num_warps")
    parser.add_argument("--top", type=int, default=12, help="rows to print per table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_sweep.py needs a CUDA GPU")
    args.variants = args.variants or ["tma" if flash.tma_supported(torch.device("cuda")) else "pointer"]
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
        reference = flash.flash_forward(q, k, v, [], program, tma=False)[0]
        for config in CONFIG_SPACE:
            if not wanted(config, args):
                continue
            for variant in args.variants:
                def step():
                    return flash.flash_forward(q, k, v, [], program, config=config, tma=FORMS.get(variant, True))[0]
                try:
                    with forward_variant(program, variant):
                        error = (step().float() - reference.float()).abs().max().item()
                        if not error < 2e-2:
                            raise RuntimeError(f"differs from the plain kernel by {error:.3g}")
                        ms = bench(step)
                except Exception as e:  # out of resources, compile failures: reported, not fatal
                    print(f"  fwd {config} {variant}: {failure(e)}")
                    continue
                rows.append((ms, config, variant))
                print(f"  fwd {config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages} "
                      f"{variant}: {ms:.3f} ms", flush=True)
        rows.sort(key=lambda r: r[0])
        print("\n| forward config | variant | ms | TFLOP/s |\n|---|---|---|---|")
        for ms, config, variant in rows[:args.top]:
            print(f"| {config.block_m}×{config.block_n}, {config.num_warps} warps, {config.num_stages} stages "
                  f"| {variant} | {ms:.3f} | {fwd_work / ms / 1e9:.0f} |")

    if "bwd" in args.passes:
        out, lse = flash.flash_forward(q, k, v, [], program)
        rows = []
        default = default_bwd_config(q, d, interpret=False)
        for config in [default] + [BwdConfig.of(t, t) for t in BWD_TILES_SPACE]:
            if not wanted(config, args):
                continue

            def step():
                return flash_backward(q, k, v, out, lse, grad, [], program, zero_empty_rows=False, config=config)
            try:
                ms = bench(step)
                parts = kernel_times(step)
            except Exception as e:
                print(f"  bwd {config}: {failure(e)}")
                continue
            rows.append((ms, config, parts))
            print(f"  bwd {bwd_name(config)}: "
                  f"{ms:.3f} ms " + " ".join(f"{r}={t:.3f}" for r, t in parts.items()), flush=True)
        rows.sort(key=lambda r: r[0])
        print("\n| backward config (resident×streamed tiles) | ms | TFLOP/s | preprocess | dK/dV | dQ |\n|---|---|---|---|---|---|")
        for ms, config, parts in rows[:args.top]:
            print(f"| {bwd_name(config)}{' (default)' if config == default else ''} | {ms:.3f} | {bwd_work / ms / 1e9:.0f} | "
                  + " | ".join(f"{parts.get(r, 0):.3f}" for r in ("preprocess", "dkdv", "dq")) + " |")
        best_dkdv = min(rows, key=lambda r: r[2].get("dkdv", math.inf))
        best_dq = min(rows, key=lambda r: r[2].get("dq", math.inf))
        print(f"fastest dK/dV: {best_dkdv[1].dkdv} {best_dkdv[2].get('dkdv', 0):.3f} ms; "
              f"fastest dQ: {best_dq[1].dq} {best_dq[2].get('dq', 0):.3f} ms")
    print("\n".join(yardsticks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
