"""The ``attncompiler`` command line: inspect rewrites, tune kernels, manage the cache, benchmark.

    attncompiler inspect model.py[:build] | --hf llama [--seq 256] [--dot FILE] [--source]
    attncompiler tune model.py | --hf llama | --shapes 4x16x1024x64 [--causal] [--exhaustive] [--train]
    attncompiler cache path | ls | show | clear | export FILE | import FILE
    attncompiler bench [--seqs 1024 4096] [--out FILE] [--plot FILE]
    attncompiler calibrate [--gguf FILE] | --hf llama [--tokens 1024] [--samples 4] [--out FILE]

Targets are described in :mod:`attncompiler.targets`. A user mistake (bad target, no GPU for
tuning, unreadable file) prints one ``attncompiler: error: ...`` line and exits with status 2 for
bad usage or 1 for everything else, never with a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import TextIO

import torch

from attncompiler.codegen.common import kernel_dir

from . import cache, saa_calibrate, tuner
from .gguf import checkpoints_dir
from .options import OptionError, Options, cache_dir, triton_interpret
from .report import Report, collect
from .targets import Target, TargetError, hf_target, load_file_target

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CommandError(Exception):
    """A failure to report as one line; ``status`` 2 for bad usage, 1 otherwise."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class ProgressBar:
    """``[#####.....] 3/12 label`` redrawn in place on ``stream``."""

    def __init__(self, stream: TextIO, width: int = 24):
        self.stream, self.width = stream, width

    def update(self, done: int, total: int, label: str) -> None:
        filled = self.width * done // max(total, 1)
        self.stream.write(f"\r  [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {label[:32]:<32}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


# ----------------------------------------------------------------------------- targets

def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", help="FILE.py[:FUNCTION] whose FUNCTION (default build) returns "
                                                  "(model, inputs)")
    parser.add_argument("--hf", metavar="ARCH", help="instead of a file: a tiny Hugging Face ARCH (llama, mistral, "
                                                     "qwen2, ...) with random weights")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of --hf inputs (default 128)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of --hf inputs (default 1)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), help="dtype of --hf models (default bfloat16 on cuda, "
                                                              "float32 on cpu)")
    parser.add_argument("--inner", choices=["eager", "inductor"], default="eager",
                        help="compiler for the rest of the graph (default eager: fast to compile)")


def default_device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_target(args: argparse.Namespace) -> Target:
    if (args.target is None) == (args.hf is None):
        raise CommandError("give either a target file (FILE.py[:FUNCTION]) or --hf ARCH", status=2)
    if args.target is not None:
        return load_file_target(args.target)
    device = default_device(args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    return hf_target(args.hf, args.seq, args.batch, device, dtype)


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def compile_and_run(target: Target, options: dict,
                    train: bool = False) -> tuple[Report, list[tuple[torch.fx.Graph, torch.fx.Graph]]]:
    """Compile ``target`` with the backend, run it once; the report and each graph before/after rewriting.

    With ``train`` the run also goes backward, from the sum of every output that requires a gradient."""
    from .backend import attncompiler_backend

    Options.resolve(options)
    graphs = []

    def capturing_backend(gm, example_inputs):
        before = copy_graph(gm.graph)
        compiled = attncompiler_backend(gm, example_inputs, options=options)
        graphs.append((before, gm.graph))
        return compiled

    torch.compiler.reset()
    compiled = torch.compile(target.model, backend=capturing_backend)
    with torch.set_grad_enabled(train), collect() as report:
        report.output = compiled(*target.args, **target.kwargs)
        if train:
            leaves = [t for t in torch.utils._pytree.tree_leaves(report.output)
                      if isinstance(t, torch.Tensor) and t.requires_grad]
            if not leaves:
                raise CommandError(f"--train: no output of {target.name} requires a gradient")
            sum(t.float().sum() for t in leaves).backward()
    return report, graphs


# ----------------------------------------------------------------------------- inspect

def cmd_inspect(args: argparse.Namespace) -> int:
    from .dot import regions_dot

    target = resolve_target(args)
    report, graphs = compile_and_run(target, {"inner": args.inner})
    print(f"{target.name}: {report.num_rewritten} of {len(report.sites)} attention sites rewritten "
          f"in {len(report.graphs)} graph(s)\n")
    print(report.table())
    for record in report.graphs:
        print(f"\n--- graph {record.index} before rewriting ---\n{record.before.strip()}")
        print(f"\n--- graph {record.index} after rewriting ---\n{record.after.strip()}")
    if args.source:
        for path in dict.fromkeys(s.source for s in report.sites if s.source):
            print(f"\n--- generated kernel {path} ---\n{Path(path).read_text().rstrip()}")
    if args.dot:
        write_text(args.dot, regions_dot(graphs))
        print(f"\nwrote the rewritten regions to {args.dot} (render: dot -Tsvg {args.dot} -o regions.svg)")
    return 0


# ----------------------------------------------------------------------------- tune

def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CommandError(f"--shapes {text!r}: expected BATCHxHEADSxSEQxHEAD_DIM, e.g. 4x16x1024x64", status=2)
    return tuple(int(p) for p in parts)


def tuning_device(args: argparse.Namespace) -> str:
    """The device to time on: a CUDA GPU, or the CPU where the Triton interpreter runs the kernels."""
    device = default_device(args)
    if device == "cuda" and not torch.cuda.is_available():
        raise CommandError("tuning times kernels on the GPU they will run on, and no CUDA GPU is visible "
                           "(torch.cuda.is_available() is False)")
    if device == "cpu" and not triton_interpret():
        raise CommandError("tuning needs a CUDA GPU (none is visible); on CPU it only runs under "
                           "TRITON_INTERPRET=1, for testing")
    return device


def cmd_tune(args: argparse.Namespace) -> int:
    device = tuning_device(args)
    mode = "exhaustive" if args.exhaustive else "on-first-use"
    if args.shapes and (args.target or args.hf):
        raise CommandError("give a target or --shapes, not both", status=2)
    shapes = [parse_shape(s) for s in args.shapes or []]
    bar = ProgressBar(sys.stderr)
    with tuner.reporting_progress(bar.update):
        if shapes:
            report = tune_shapes(shapes, args, device, mode)
        else:
            report, _ = compile_and_run(resolve_target(args), {"inner": args.inner, "tune": mode, "kernel": "triton"},
                                        train=args.train)
    print(choices_table(report))
    return 0


def tune_shapes(shapes: list[tuple[int, int, int, int]], args: argparse.Namespace, device: str, mode: str) -> Report:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    tuner.configure(Options.resolve({"tune": mode}))
    with torch.no_grad(), collect() as report:
        for batch, heads, seq, dim in shapes:
            kv_heads = args.kv_heads or heads
            if heads % kv_heads:
                raise CommandError(f"{heads} query heads cannot share {kv_heads} key/value heads", status=2)
            scaled = f"(mul s {dim ** -0.5!r})"
            program = f"(where (le k q) {scaled} -inf)" if args.causal else scaled
            q = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype)
            k, v = (torch.randn(batch, kv_heads, seq, dim, device=device, dtype=dtype) for _ in range(2))
            print(f"tuning {batch}x{heads}x{seq}x{dim} {str(dtype).removeprefix('torch.')}"
                  f"{' causal' if args.causal else ''}{' forward and backward' if args.train else ''}",
                  file=sys.stderr)
            tuner.select_config(q, k, v, [], program)
            if args.train:
                tuner.select_bwd_config(q, k, v, [], program)
    return report


def choices_table(report: Report) -> str:
    if not report.choices:
        return "no attention call ran a Triton kernel, so nothing was tuned"
    rows = [("shape bucket", "config", "from", "ms", "best SDPA", "runs", "backward", "speedup")]
    for c in report.choices:
        rows.append((c.bucket, c.config or "default", c.source, f"{c.ms:.4g}" if c.ms else "-",
                     f"{c.baseline} {c.baseline_ms:.4g} ms" if c.baseline else "-", c.kernel, c.backward or "-",
                     f"{c.speedup:.2f}x" if c.speedup else "-"))
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# ----------------------------------------------------------------------------- cache

def this_machine() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_cache_path(args: argparse.Namespace) -> int:
    print(cache_dir())
    print(cache.LocalCache(cache.current_environment(this_machine())).path)
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    files = cache.cache_files()
    if not files:
        print(f"no tuning results in {cache.tuning_dir()}")
        return 0
    mine = cache.current_environment(this_machine())
    rows = [("file", "device", "cc", "torch", "triton", "kernels", "entries", "")]
    for path in files:
        try:
            env, entries = cache.read_file(path)
        except cache.CacheError as e:
            rows.append((path.name, "-", "-", "-", "-", "-", "-", f"ignored: {e}"))
            continue
        rows.append((path.name, env.device, env.capability, env.torch, env.triton, env.kernels, str(len(entries)),
                     "this machine" if env == mine else ""))
    print(format_table(rows))
    return 0


def cmd_cache_show(args: argparse.Namespace) -> int:
    local = cache.LocalCache(cache.current_environment(this_machine()))
    entries = local.load()
    if not entries:
        print(f"no tuning results for this machine in {local.path}")
        return 0
    rows = [("shape bucket", "config", "search", "ms", "best SDPA", "winner", "backward", "speedup")]
    for key, e in sorted(entries.items()):
        backward = f"{tuner.config_name(e.backward.config)} {e.backward.ms:.4g} ms" if e.backward else "-"
        rows.append((key, tuner.config_name(e.config), e.search, f"{e.ms:.4g}",
                     f"{e.baseline} {e.baseline_ms:.4g} ms" if e.baseline else "-", e.winner, backward,
                     f"{e.speedup:.2f}x" if e.speedup else "-"))
    print(format_table(rows))
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    tuning = [p for p in cache.tuning_dir().glob("*")] if cache.tuning_dir().is_dir() else []
    kernels = kernel_dir()
    kernel_files = list(kernels.glob("*.py")) if kernels.is_dir() else []
    models = checkpoints_dir()
    checkpoints = [p for p in models.iterdir() if p.is_dir()] if models.is_dir() else []
    for path in tuning:
        path.unlink()
    for directory in (kernels, models):
        if directory.is_dir():
            shutil.rmtree(directory)
    print(f"removed {sum(p.suffix == '.json' for p in tuning)} tuning file(s), {len(kernel_files)} "
          f"generated kernel(s) and {len(checkpoints)} converted model checkpoint(s) from {cache_dir()}")
    return 0


def cmd_cache_export(args: argparse.Namespace) -> int:
    payload = cache.export_payload()
    write_text(args.file, json.dumps(payload, indent=1) + "\n")
    count = sum(len(c["entries"]) for c in payload["caches"])
    print(f"exported {count} entries of {len(payload['caches'])} environment(s) to {args.file}")
    return 0


def cmd_cache_import(args: argparse.Namespace) -> int:
    try:
        raw = json.loads(Path(args.file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"cannot read {args.file}: {type(e).__name__}: {e}") from None
    try:
        imported, rejected = cache.import_payload(raw)
    except cache.CacheError as e:
        raise CommandError(f"{args.file}: {e}") from None
    for message in rejected:
        print(f"rejected {message}", file=sys.stderr)
    print(f"imported {imported} entries from {args.file}" + (f", rejected {len(rejected)}" if rejected else ""))
    return 1 if rejected else 0


def write_text(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- bench

def load_benchmark():
    """The attention benchmark script of the source tree, as a module."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "attention.py"
    if not path.is_file():
        raise CommandError(f"the benchmark script {path} is not there (it ships with the source tree)")
    spec = importlib.util.spec_from_file_location("attncompiler_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_table(rows: list[tuple[str, int, int, dict]]) -> str:
    """Markdown table of TFLOP/s, one column per implementation."""
    names = list(rows[0][3]) if rows else []
    lines = ["| dtype | D | S | " + " | ".join(f"{n} TFLOP/s" for n in names) + " |",
             "|" + "---|" * (3 + len(names))]
    for dtype, d, s, result in rows:
        cells = [f"{result[n]:.0f}" if result.get(n) else "–" for n in names]
        lines.append(f"| {dtype} | {d} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_plot(rows: list[tuple[str, int, int, dict]], path: str) -> bool:
    """TFLOP/s by sequence length, one line per implementation, one panel per dtype and head dim.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = list(dict.fromkeys((dtype, d) for dtype, d, _, _ in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dtype, d) in zip(axes[0], panels):
        mine = [(s, r) for dt, dd, s, r in rows if (dt, dd) == (dtype, d)]
        for name in mine[0][1]:
            points = [(s, r[name]) for s, r in mine if r.get(name)]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s", title=f"{dtype}, head dim {d}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def cmd_bench(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise CommandError("bench measures GPU kernels, and no CUDA GPU is visible (torch.cuda.is_available() "
                           "is False)")
    benchmark = load_benchmark()
    rows = []
    for dtype in args.dtypes:
        for d in args.head_dims:
            for s in args.seqs:
                print(f"measuring {dtype} D={d} S={s}", file=sys.stderr)
                rows.append((dtype, d, s, benchmark.measure(s, d, DTYPES[dtype])))
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
              "attention forward, TFLOP/s")
    table = f"{header}\n\n{bench_table(rows)}\n"
    print(table)
    write_text(args.out, table)
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    drawn = bench_plot(rows, plot)
    print(f"wrote {args.out}" + (f" and {plot}" if drawn else " (no plot: matplotlib is not installed)"))
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncompiler", description="Inspect, tune and benchmark the attention "
                                     "kernels of the attncompiler torch.compile backend.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="show which attention sites are rewritten, and why not",
                                  description="Compile a target with the backend, run it once and print the "
                                              "site table and each graph before and after rewriting.")
    add_target_arguments(inspect)
    inspect.add_argument("--dot", metavar="FILE", help="write a Graphviz drawing of the rewritten regions")
    inspect.add_argument("--source", action="store_true", help="print the generated Triton source")
    inspect.set_defaults(run=cmd_inspect)

    tune = commands.add_parser("tune", help="tune the kernels of a target or of given shapes on this GPU",
                               description="Time every kernel config that fits each attention site's shape "
                                           "bucket on this GPU and store the winners in the cache.")
    add_target_arguments(tune)
    tune.add_argument("--shapes", nargs="+", metavar="BxHxSxD", help="tune these shapes instead of a target")
    tune.add_argument("--kv-heads", type=int, help="key/value heads of --shapes (default: as many as query heads)")
    tune.add_argument("--causal", action="store_true", help="--shapes are causal")
    tune.add_argument("--exhaustive", action="store_true", help="search every config that fits, not a quick subset")
    tune.add_argument("--train", action="store_true", help="also tune the backward (the target's run goes backward "
                                                           "from the sum of its outputs)")
    tune.set_defaults(run=cmd_tune)

    cache_parser = commands.add_parser("cache", help="manage the tuning cache",
                                       description="Manage the per-GPU tuning cache "
                                                   "(ATTNCOMPILER_CACHE_DIR, default $XDG_CACHE_HOME/attncompiler).")
    actions = cache_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, run, help_text in [("path", cmd_cache_path, "print the cache directory and this machine's file"),
                                 ("ls", cmd_cache_ls, "list the tuning files, one per GPU environment"),
                                 ("show", cmd_cache_show, "show this machine's tuned shape buckets"),
                                 ("clear", cmd_cache_clear,
                                  "delete all tuning results, generated kernels and converted model checkpoints")]:
        actions.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".") \
            .set_defaults(run=run)
    export = actions.add_parser("export", help="write every tuning result to one JSON file",
                                description="Write every tuning result to one JSON file.")
    export.add_argument("file")
    export.set_defaults(run=cmd_cache_export)
    imported = actions.add_parser("import", help="validate and merge an exported file",
                                  description="Validate every entry of an exported file and merge the valid ones.")
    imported.add_argument("file")
    imported.set_defaults(run=cmd_cache_import)

    bench = commands.add_parser("bench", help="benchmark the attention kernel against its peers on this GPU",
                                description="Run the attention benchmark: TFLOP/s of attncompiler, SDPA "
                                            "(flash, cuDNN), FlexAttention and eager, by sequence length.")
    bench.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    bench.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    bench.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16"], default=["bfloat16", "float16"])
    bench.add_argument("--out", default="attention-bench.md", help="table file (default attention-bench.md)")
    bench.add_argument("--plot", help="PNG plot file, when matplotlib is installed (default: --out with .png)")
    bench.set_defaults(run=cmd_bench)

    saa_calibrate.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CommandError, TargetError, OptionError) as e:
        print(f"attncompiler: error: {e}", file=sys.stderr)
        return getattr(e, "status", 2 if isinstance(e, OptionError) else 1)
    except KeyboardInterrupt:
        print("attncompiler: interrupted", file=sys.stderr)
        return 130
