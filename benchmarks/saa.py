"""SAA forward on the GPU against dense attention, in one run: causal prefill, bf16.

SAA's time includes everything one call does (pooling, routing, centroids, the attend-and-
aggregate kernel); the table also shows its two halves timed alone: planning (pooling, centroids,
routing) and the attend kernel. Peers: attncompiler's dense kernel (``codegen.flash``), SDPA with cuDNN and
SDPA with the flash backend. One sequence, heads·head_dim = 2048, random inputs. Prints a
markdown table (milliseconds, SAA's density and relative error against dense, speedups) and
records it, dated, in ``benchmarks/RESULTS.md`` unless ``--no-record``.

    python benchmarks/saa.py [--seqs 8192 16384 32768 65536 131072] [--head-dims 64 128]
                             [--saa '{"top_k": 16}'] [--kv-heads N] [--sweep] [--profile] [--no-record]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa
from torch.profiler import ProfilerActivity, profile

from attncompiler.codegen.flash import flash_forward, tma_supported
from attncompiler.codegen.saa import saa_attend
from attncompiler.saa import saa_forward, saa_plan
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_ops import relative_error
from attncompiler.saa_routing import BlockGeometry

HIDDEN = 2048
RESULTS = Path(__file__).with_name("RESULTS.md")


def implementations(scale: float, config: SAAConfig) -> dict:
    """Name → causal forward of (q, k, v) in [B, H, S, D] (k, v may have fewer heads)."""
    program = f"(where (le k q) (mul s {scale!r}) -inf)"

    def with_backend(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return run

    return {
        "saa": lambda q, k, v: saa_forward(q, k, v, scale, True, config, kernel="triton")[0],
        "attncompiler": lambda q, k, v: flash_forward(q, k, v, [], program)[0],
        "sdpa-cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash": with_backend(SDPBackend.FLASH_ATTENTION),
    }


def plan_profile(q, k, v, scale: float, geometry: BlockGeometry, config: SAAConfig) -> str:
    """The GPU kernels of planning, by total time over five calls (a profiler table), and the host's
    time to issue one plan (when it exceeds the GPU's, launches bound planning)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            saa_plan(q, k, v, scale, geometry, config)
        torch.cuda.synchronize()
    launches = sum(event.count for event in prof.key_averages() if event.device_time_total > 0) / 5
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        saa_plan(q, k, v, scale, geometry, config)
    host_ms = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60)
    return (f"{table}\n  host time to issue one plan: {host_ms:.3f} ms, {launches:.0f} GPU kernels\n"
            f"{host_functions(lambda: saa_plan(q, k, v, scale, geometry, config))}")


def host_functions(fn, calls: int = 20, rows: int = 14) -> str:
    """Where the host's time goes in ``fn``: the functions with the most time of their own (cProfile)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()[text.getvalue().find("ncalls"):]


def saa_stages(q, k, v, scale: float, config: SAAConfig, sweep: bool = False, profile_plan: bool = False) -> dict:
    """Milliseconds of SAA's two halves: planning (pooling, centroids, routing) and the attend kernel
    (with ``sweep``, also the attend kernel under other warp counts and pipeline depths, and with its
    exact blocks and centroids by TMA and by pointers, printed; with ``profile_plan``, planning's
    kernels, printed)."""
    seq = q.shape[-2]
    geometry = BlockGeometry(seq, seq, config.block_m, config.block_n, True)
    selection, centroids = saa_plan(q, k, v, scale, geometry, config)
    if profile_plan:
        print(f"  planning S={seq} D={q.shape[-1]}, router {config.router}:\n"
              f"{plan_profile(q, k, v, scale, geometry, config)}", file=sys.stderr)

    def attend(**launch):
        return lambda: saa_attend(q, k, v, centroids, selection, scale, geometry, config,
                                  **launch)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    if sweep:
        for warps in (4, 8):
            for stages in (1, 2):
                for centroid_stages in (1, 2, 3, 4):
                    ms = bench(attend(num_warps=warps, num_stages=stages, centroid_stages=centroid_stages))
                    print(f"  attend S={seq} D={q.shape[-1]}: {warps} warps, {stages} stages, {centroid_stages} "
                          f"centroid stages: {ms:.3f} ms", file=sys.stderr)
        for tma in (True, False) if tma_supported(q.device) else (False,):  # at the default settings
            print(f"  attend S={seq} D={q.shape[-1]}: exact blocks and centroids by {'TMA' if tma else 'pointers'}: "
                  f"{bench(attend(tma=tma)):.3f} ms", file=sys.stderr)
    return {"plan": bench(lambda: saa_plan(q, k, v, scale, geometry, config)), "attend": bench(attend())}


def measure(seq: int, head_dim: int, kv_heads: int | None, config: SAAConfig, sweep: bool = False,
            profile_plan: bool = False) -> dict:
    """Milliseconds of each implementation at one shape (None where it cannot run), SAA's density
    and its relative error against the first dense peer that ran."""
    heads = HIDDEN // head_dim
    kv = kv_heads or heads
    q = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = head_dim ** -0.5
    result: dict = {"density": None, "error": None, "plan": None, "attend": None}
    outputs = {}
    for name, fn in implementations(scale, config).items():
        try:
            outputs[name] = fn(q, k, v)
            result[name] = triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
        except (RuntimeError, ValueError) as e:
            print(f"  {name}: {str(e).splitlines()[0]}", file=sys.stderr)
            result[name] = None
    dense = next((outputs[n] for n in ("sdpa-cudnn", "sdpa-flash", "attncompiler") if n in outputs), None)
    if "saa" in outputs and dense is not None:
        result["error"] = relative_error(outputs["saa"], dense)
        result["density"] = saa_forward(q, k, v, scale, True, config, kernel="triton")[1].density
        result.update(saa_stages(q, k, v, scale, config, sweep, profile_plan))
    return result


def record(table: str, command: str) -> None:
    """Insert ``table`` as the newest dated section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{table.splitlines()[0]}\n\n`{command}`\n\n" + "\n".join(table.splitlines()[2:]) + "\n\n"
    at = text.find("\n## ")
    text = text.rstrip("\n") + "\n\n" + section if at < 0 else text[:at + 1] + section + text[at + 1:]
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: as many as query heads)")
    parser.add_argument("--saa", default="{}", help="SAA operating point as JSON (SAAConfig fields)")
    parser.add_argument("--sweep", action="store_true", help="also time the attend kernel under other launch settings")
    parser.add_argument("--profile", action="store_true", help="also print planning's GPU kernels by time")
    parser.add_argument("--no-record", action="store_true", help="do not write to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/saa.py needs a CUDA GPU")
    config = SAAConfig.from_dict(json.loads(args.saa))

    peers = ["attncompiler", "sdpa-cudnn", "sdpa-flash"]
    header = (f"## {datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
              f"triton {triton.__version__} · SAA forward, causal, bf16, batch 1, hidden {HIDDEN}"
              f"{f', {args.kv_heads} kv heads' if args.kv_heads else ''}")
    lines = [header, "", f"SAA operating point: {config}", "",
             "| D | S | density | rel. error | SAA ms | plan ms | attend ms | " + " | ".join(f"{p} ms" for p in peers)
             + " | " + " | ".join(f"SAA vs {p}" for p in peers) + " |", "|---" * (7 + 2 * len(peers)) + "|"]
    for d in args.head_dims:
        for s in args.seqs:
            r = measure(s, d, args.kv_heads, config, args.sweep, args.profile)
            cells = [f"{r['density']:.3f}" if r["density"] is not None else "–",
                     f"{r['error']:.3f}" if r["error"] is not None else "–"]
            cells += [f"{r[n]:.2f}" if r[n] else "–" for n in ["saa", "plan", "attend", *peers]]
            cells += [f"{r[p] / r['saa']:.2f}×" if r[p] and r["saa"] else "–" for p in peers]
            lines.append(f"| {d} | {s} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_record:
        record(table, "python benchmarks/saa.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
