"""Shape-specific autotuning: time every kernel config that fits a shape bucket and keep the fastest.

A *shape bucket* is what a kernel's speed depends on: dtype, head dims, GQA group, mask kind,
score program, whether keys beyond a bound are masked (causal), and power-of-two buckets of the
query length, key length and batch·heads. For a bucket the tuner

1. lists the candidates: every Triton config of :data:`CONFIG_SPACE` that fits (shared memory,
   registers, tiles no larger than the sequences need) and PyTorch's SDPA backends where they
   compute the same function (scaled scores, optionally a mask, bias or causal mask);
2. runs each once on a reduced problem and compares it with the reference, dropping a wrong or
   crashing candidate with a warning;
3. times the survivors (CUDA events after warm-up, median of repeats, inputs rotated so that the
   L2 cache does not flatter small shapes) and stores the fastest Triton config in the
   :mod:`attncompiler.cache`, with the fastest SDPA backend as its baseline.

At run time :func:`select_config` turns the op's inputs into a bucket key (memoized per shape)
and looks it up: a new sequence length never recompiles and never re-tunes within its bucket.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from attncompiler.codegen.configs import CONFIG_SPACE, FlashConfig, _pow2_at_least, default_config, keep
from attncompiler.passes.score_mod import SCORE, Binary, Const, Index, Operand, Where, key_limit, leaves, parse

from . import report
from .cache import Entry, LocalCache, TuningCache, current_environment
from .options import Options
from .reference import attention_reference
from .spec import align, group_of, output_shape

log = logging.getLogger("attncompiler")

Inputs = tuple  # (q, k, v, operands)
Timer = Callable[["Candidate", Callable[[int], object], int], float]
Progress = Callable[[int, int, str], None]

SEARCH_OF_MODE = {"on-first-use": "quick", "exhaustive": "exhaustive"}
MAX_REGISTERS_PER_THREAD = 255
MAX_ROTATIONS = 8
TOLERANCE_FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class TuningError(RuntimeError):
    """No Triton candidate ran correctly for a bucket."""


# ----------------------------------------------------------------------------- shape buckets

def seq_bucket(n: int) -> int:
    """Lengths 0 and 1 (decode) stay themselves; longer ones round up to a power of two (≥ 16)."""
    return n if n <= 1 else _pow2_at_least(n)


@functools.lru_cache(maxsize=1024)
def _program_traits(program: str) -> tuple[str, bool, bool]:
    """``(hash, keys bounded by position, reads positions)`` of a score program."""
    expr = parse(program)
    digest = hashlib.sha256(program.encode()).hexdigest()[:10]
    return digest, key_limit(expr) is not None, any(isinstance(x, Index) for x in leaves(expr))


@functools.lru_cache(maxsize=4096)
def _bucket_key(program: str, dtype: torch.dtype, q_shape: tuple, k_shape: tuple, v_shape: tuple,
                operand_dtypes: tuple) -> str:
    digest, causal, positions = _program_traits(program)
    kinds = sorted({"bool" if dt == torch.bool else "bias" for dt in operand_dtypes} |
                   ({"positions"} if positions else set()))
    batch_heads = math.prod(output_shape(q_shape, k_shape, v_shape)[:-2])
    return "/".join([
        str(dtype).removeprefix("torch."), f"d{q_shape[-1]}", f"dv{v_shape[-1]}",
        f"g{group_of(q_shape, k_shape, v_shape)}", "+".join(kinds) or "nomask", f"p{digest}",
        "causal" if causal else "full", f"q{seq_bucket(q_shape[-2])}", f"k{seq_bucket(k_shape[-2])}",
        f"bh{_pow2_at_least(batch_heads, floor=1)}",
    ])


def bucket_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor],
               program: str) -> str:
    """The shape bucket of one attention call, e.g. ``float16/d64/dv64/g1/nomask/p…/causal/q1024/k1024/bh64``."""
    return _bucket_key(program, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape),
                       tuple(t.dtype for t in operands))


# ----------------------------------------------------------------------------- candidates

@dataclass(frozen=True)
class Candidate:
    """One way to compute a bucket's attention: a Triton config, or an SDPA backend (``config`` None)."""

    name: str
    run: Callable[[Inputs], torch.Tensor]
    config: FlashConfig | None = None


def config_name(config: FlashConfig) -> str:
    return f"{config.block_m}x{config.block_n}/w{config.num_warps}/s{config.num_stages}"


def registers_per_thread(c: FlashConfig, head_dim: int, head_dim_v: int, itemsize: int) -> int:
    """Estimated 32-bit registers per thread: the fp32 accumulator, score and probability tiles, the Q tile."""
    d, dv = _pow2_at_least(head_dim), _pow2_at_least(head_dim_v)
    words = c.block_m * dv + 2 * c.block_m * c.block_n + c.block_m * d * itemsize // 4
    return words // (32 * c.num_warps)


def fits_sequences(c: FlashConfig, seq_q: int, seq_k: int) -> bool:
    """A tile longer than its sequence only computes padding; keep just the smallest such tile."""
    smallest_m = min(x.block_m for x in CONFIG_SPACE)
    smallest_n = min(x.block_n for x in CONFIG_SPACE)
    return c.block_m <= max(_pow2_at_least(seq_q), smallest_m) and c.block_n <= max(_pow2_at_least(seq_k), smallest_n)


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one block may use on ``device`` (None: no limit, the interpreter)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


def triton_configs(q: torch.Tensor, v: torch.Tensor, seq_k: int, search: str, smem: int | None) -> list[FlashConfig]:
    """The configs worth timing: the default first, then those of the search space that fit.

    ``smem`` is the device's shared memory per block, None for the interpreter. A quick search
    keeps the default's pipeline depth; an exhaustive one tries every depth. The interpreter
    ignores warps and stages, so there only distinct tile shapes are kept.
    """
    interpret = smem is None
    head_dim, head_dim_v, itemsize = q.shape[-1], v.shape[-1], q.element_size()
    default = default_config(q, head_dim_v, interpret)
    found = [default]
    for c in CONFIG_SPACE:
        if search == "quick" and not interpret and c.num_stages != default.num_stages:
            continue
        if not interpret and not keep(c, head_dim, head_dim_v, itemsize, smem):
            continue
        if registers_per_thread(c, head_dim, head_dim_v, itemsize) > MAX_REGISTERS_PER_THREAD:
            continue
        if not fits_sequences(c, q.shape[-2], seq_k):
            continue
        if interpret and any((c.block_m, c.block_n) == (f.block_m, f.block_n) for f in found):
            continue
        if c not in found:
            found.append(c)
    return found


def sdpa_arguments(program: str, operands: Sequence[torch.Tensor]) -> dict | None:
    """Keyword arguments with which ``scaled_dot_product_attention`` computes ``program``, if it can.

    SDPA computes scaled scores plus at most one of: a float bias, a boolean mask, a top-left
    causal mask (``k <= q``). Anything else (soft-capping, sliding windows, ...) has no baseline.
    """
    expr, kwargs = parse(program), {}
    is_operand = len(operands) == 1
    if is_operand and isinstance(expr, Binary) and expr.op == "add" and Operand(0) in (expr.a, expr.b) \
            and operands[0].dtype != torch.bool:
        kwargs["attn_mask"] = operands[0]
        expr = expr.b if expr.a == Operand(0) else expr.a
    elif isinstance(expr, Where) and expr.b == Const(-math.inf):
        if is_operand and expr.cond == Operand(0) and operands[0].dtype == torch.bool:
            kwargs["attn_mask"] = operands[0]
            expr = expr.a
        elif not operands and expr.cond == Binary("le", Index("k"), Index("q")):
            kwargs["is_causal"] = True
            expr = expr.a
    if operands and "attn_mask" not in kwargs:
        return None
    if expr == SCORE:
        return {**kwargs, "scale": 1.0}
    if isinstance(expr, Binary) and expr.op == "mul" and SCORE in (expr.a, expr.b):
        other = expr.b if expr.a == SCORE else expr.a
        return {**kwargs, "scale": other.value} if isinstance(other, Const) else None
    if isinstance(expr, Binary) and expr.op == "div" and expr.a == SCORE and isinstance(expr.b, Const):
        return {**kwargs, "scale": 1.0 / expr.b.value}
    return None


def sdpa_backends(device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend

    names = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-math": SDPBackend.MATH}
    if device.type == "cuda":
        names |= {"sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    return names


def candidates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor], program: str,
               search: str) -> list[Candidate]:
    """Triton configs first, then the SDPA backends that compute the same function."""
    from attncompiler.codegen.flash import flash_forward
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    interpret = q.device.type != "cuda"

    def triton_run(config: FlashConfig):
        def run(x):
            result = flash_forward(x[0], x[1], x[2], list(x[3]), program, config=config, interpret=interpret)
            return result[0] if isinstance(result, tuple) else result  # (out, lse) where lse is returned too
        return run

    configs = triton_configs(q, v, k.shape[-2], search, shared_memory_limit(q.device))
    found = [Candidate(f"triton {config_name(c)}", triton_run(c), c) for c in configs]
    kwargs = sdpa_arguments(program, operands)
    if kwargs is None:
        return found
    gqa = {"enable_gqa": True} if group_of(q.shape, k.shape, v.shape) > 1 else {}

    def sdpa_run(backend):
        def run(x):
            q_, k_, v_, _ = align(x[0], x[1], x[2])
            mask = {"attn_mask": x[3][0]} if "attn_mask" in kwargs else {}
            with sdpa_kernel(backend):
                return scaled_dot_product_attention(q_, k_, v_, **{**kwargs, **mask, **gqa})
        return run

    return found + [Candidate(name, sdpa_run(backend)) for name, backend in sdpa_backends(q.device).items()]


# ----------------------------------------------------------------------------- correctness and timing

def reduced_problem(inputs: Inputs) -> Inputs:
    """One key/value head and the query heads that share it, from the first batch element.

    Enough to check a candidate against the reference at the bucket's sequence lengths without
    materializing the full ``[batch·heads, Sq, Sk]`` scores.
    """
    q, k, v, group = align(*inputs[:3])
    operands = list(inputs[3])
    if q.dim() == 2:  # give the problem a head dim, so that references can go head by head
        scores = (q.shape[0], k.shape[0])
        return q[None], k[None], v[None], [t.expand(scores)[None] for t in operands]
    lead = q.dim() - 2
    q_index = (slice(0, 1),) * (lead - 1) + (slice(0, group),)
    kv_index = (slice(0, 1),) * lead
    scores = (*q.shape[:-1], k.shape[-2])
    return q[q_index], k[kv_index], v[kv_index], [t.expand(scores)[q_index] for t in operands]


def reference_outputs(problem: Inputs, program: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp32-or-wider reference, PyTorch's own result in the input dtype)``, one query head at a time."""
    q, k, v, operands = problem
    exact, own = [], []
    for h in range(q.shape[-3]):
        head_q, head_operands = q[..., h:h + 1, :, :], [t[..., h:h + 1, :, :] for t in operands]
        exact.append(attention_reference(head_q.float(), k.float(), v.float(), head_operands, program))
        own.append(attention_reference(head_q, k, v, head_operands, program, compute_dtype=q.dtype))
    return torch.cat(exact, dim=-3), torch.cat(own, dim=-3)


def accuracy_problem(out: torch.Tensor, exact: torch.Tensor, own: torch.Tensor) -> str | None:
    """Why ``out`` is not an acceptable result (None if it is): at most 2× PyTorch's own error."""
    if out.shape != exact.shape:
        return f"shape {list(out.shape)}, expected {list(exact.shape)}"
    nan = torch.isnan(exact)
    if not torch.equal(torch.isnan(out), nan):
        return "NaN where the reference has none (or the reverse)"
    if not nan.all():
        ours = (out[~nan].double() - exact[~nan].double()).abs().max().item()
        theirs = (own[~nan].double() - exact[~nan].double()).abs().max().item()
        allowed = 2 * theirs + TOLERANCE_FLOOR.get(out.dtype, 1e-4)
        if not ours <= allowed:
            return f"max error {ours:.3g}, allowed {allowed:.3g}"
    return None


def rotated_inputs(inputs: Inputs) -> list[Inputs]:
    """Copies of q, k and v, enough that together they exceed twice the GPU's L2 cache."""
    if inputs[0].device.type != "cuda":
        return [inputs]
    l2 = torch.cuda.get_device_properties(inputs[0].device).L2_cache_size
    size = sum(t.numel() * t.element_size() for t in inputs[:3])
    count = max(1, min(MAX_ROTATIONS, math.ceil(2 * l2 / max(size, 1))))
    return [inputs] + [(*(t.clone() for t in inputs[:3]), inputs[3]) for _ in range(count - 1)]


def cuda_event_timer(candidate: Candidate, run: Callable[[int], object], rotations: int,
                     warmup: int = 5, repeats: int = 25) -> float:
    """Median milliseconds of ``run`` over ``repeats`` CUDA-event timings, after ``warmup`` runs."""
    for i in range(warmup):
        run(i % rotations)
    events = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(i % rotations)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def wall_clock_timer(candidate: Candidate, run: Callable[[int], object], rotations: int,
                     warmup: int = 1, repeats: int = 3) -> float:
    """Median wall-clock milliseconds: for CPU runs (the interpreter), where no CUDA events exist."""
    for i in range(warmup):
        run(i % rotations)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i % rotations)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def tune(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor], program: str,
         search: str = "quick", timer: Timer | None = None, progress: Progress | None = None) -> Entry:
    """Time every candidate for this call's bucket and return the result (not stored)."""
    inputs = (q, k, v, list(operands))
    found = candidates(q, k, v, operands, program, search)
    key = bucket_key(q, k, v, operands, program)
    problem = reduced_problem(inputs)
    exact, own = reference_outputs(problem, program)
    rotations = rotated_inputs(inputs)
    timer = timer or (cuda_event_timer if q.device.type == "cuda" else wall_clock_timer)
    times: dict[Candidate, float] = {}
    for i, candidate in enumerate(found):
        if progress:
            progress(i, len(found), candidate.name)
        try:
            problem_text = accuracy_problem(candidate.run(problem), exact, own)
            if problem_text is None:
                times[candidate] = timer(candidate, lambda r: candidate.run(rotations[r]), len(rotations))
        except Exception as e:  # a config that cannot compile or launch, a backend that cannot run
            problem_text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if candidate.config is None:  # an SDPA backend without a kernel for this shape
                log.debug("attncompiler: %s skipped for %s (%s)", candidate.name, key, problem_text)
                continue
        if problem_text is not None:
            log.warning("attncompiler: tuning %s: dropped %s (%s)", key, candidate.name, problem_text)
    if progress:
        progress(len(found), len(found), "done")
    kernels = {c: t for c, t in times.items() if c.config is not None}
    if not kernels:
        raise TuningError(f"no Triton config ran correctly for {key}")
    best = min(kernels, key=kernels.get)
    baselines = {c: t for c, t in times.items() if c.config is None}
    baseline = min(baselines, key=baselines.get) if baselines else None
    return Entry(best.config, kernels[best], search, sum(c.config is not None for c in found),
                 baseline.name if baseline else None, baselines[baseline] if baseline else None)


# ----------------------------------------------------------------------------- run time

@dataclass(frozen=True)
class Policy:
    """How run-time lookups treat a bucket (from the ``tune`` and ``cache_url`` options)."""

    mode: str = "cached"
    cache_url: str | None = None


_policy: Policy | None = None
_caches: dict[tuple, TuningCache] = {}
_failed: set[tuple] = set()
_progress: list[Progress] = []


def configure(options: Options) -> None:
    """Set the process-wide policy from a compilation's options (the backend calls this)."""
    global _policy
    policy = Policy(options.tune, options.cache_url)
    if _policy is not None and policy.cache_url != _policy.cache_url:
        _caches.clear()
    _policy = policy


def current_policy() -> Policy:
    global _policy
    if _policy is None:
        options = Options.resolve()
        _policy = Policy(options.tune, options.cache_url)
    return _policy


def tuning_cache(device: torch.device) -> TuningCache:
    """The (memoized) two-level cache of ``device``'s environment."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tuning = _caches.get((device.type, device.index))
    if tuning is None:
        environment = current_environment(device)
        url = current_policy().cache_url
        remote = None
        if url:
            from .fleet import RemoteCache

            remote = RemoteCache(url, environment)
        tuning = _caches[(device.type, device.index)] = TuningCache(LocalCache(environment), remote)
    return tuning


def forget_caches() -> None:
    """Drop the in-memory tables (they are read again from disk on the next lookup)."""
    _caches.clear()
    _failed.clear()


def select_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor],
                  program: str) -> FlashConfig | None:
    """The config to run this call with (None: the kernel's default). Tunes only when the policy says so."""
    mode = current_policy().mode
    if mode == "off":
        if report.collecting():
            report.record_choice(program, report.KernelChoice(bucket_key(q, k, v, operands, program), "default"))
        return None
    key = bucket_key(q, k, v, operands, program)
    tuning = tuning_cache(q.device)
    entry, source = tuning.lookup(key), "cache"
    if _wants_tuning(entry, mode) and (q.device.type, key) not in _failed and not _capturing(q):
        tuned = _tune_and_store(tuning, key, (q, k, v, operands), program, SEARCH_OF_MODE[mode])
        if tuned is not None:
            entry, source = tuned, "tuned"
    if report.collecting():
        choice = report.KernelChoice(key, "default") if entry is None else report.KernelChoice(
            key, source, config_name(entry.config), entry.ms, entry.baseline, entry.baseline_ms)
        report.record_choice(program, choice)
    return entry.config if entry is not None else None


def _wants_tuning(entry: Entry | None, mode: str) -> bool:
    if mode == "on-first-use":
        return entry is None
    return mode == "exhaustive" and (entry is None or entry.search != "exhaustive")


def _capturing(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tune_and_store(tuning: TuningCache, key: str, inputs: Inputs, program: str, search: str) -> Entry | None:
    """Tune one bucket and store the result; on failure log once and remember not to retry."""
    try:
        progress = _progress[-1] if _progress else None
        entry = tune(*inputs, program, search=search, progress=progress)
        tuning.store(key, entry)
    except Exception as e:  # tuning must never fail the model: fall back to the defaults
        _failed.add((inputs[0].device.type, key))
        log.warning("attncompiler: tuning failed for %s (%s: %s); using the default config",
                    key, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("attncompiler: tuned %s: %s %.4g ms%s", key, config_name(entry.config), entry.ms,
             f", {entry.speedup:.2f}x vs {entry.baseline}" if entry.speedup else "")
    return tuning.lookup(key)


@contextlib.contextmanager
def reporting_progress(progress: Progress) -> Iterator[None]:
    """Within the block, run-time tuning reports each candidate to ``progress(done, total, label)``."""
    _progress.append(progress)
    try:
        yield
    finally:
        _progress.remove(progress)
