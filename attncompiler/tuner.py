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
   :mod:`attncompiler.cache`, with the fastest SDPA backend as its baseline and the *winner*:
   that backend where it beat every Triton config, else "triton".

Training calls also tune the backward (:func:`tune_backward`): first the dK/dV kernel's launches of
:data:`BWD_TILES_SPACE` that fit, with dQ at its default, then the dQ kernel's with the fastest dK/dV;
each config's gradients checked once against the reference, the fastest stored in the bucket's entry.

At run time :func:`select` turns the op's inputs into a bucket key (memoized per shape) and looks
it up: a new sequence length never recompiles and never re-tunes within its bucket. A bucket whose
winner is an SDPA backend runs ``scaled_dot_product_attention`` under that backend only where that
computes the site's function (:func:`sdpa_dispatch`); the Triton config serves the other sites of
the bucket. Such a forward writes no logsumexp (``lse`` is NaN); its backward recomputes it with
the Triton forward (:func:`forward_ran_sdpa` tells the backward which forwards those were).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from attncompiler.codegen.configs import (BWD_TILES_SPACE, CONFIG_SPACE, BwdConfig, BwdTiles, FlashConfig,
                                          _pow2_at_least, bwd_tiles_keep, default_bwd_config, default_config, keep)
from attncompiler.passes.score_mod import (SCORE, Binary, Const, Index, Operand, Where, is_sentinel_fill_of,
                                          key_limit, leaves, parse)

from . import report
from .cache import BackwardEntry, Entry, LocalCache, TuningCache, current_environment
from .failures import failure_text
from .options import Options
from .reference import attention_backward_reference, attention_reference
from .spec import align, group_of, output_shape

log = logging.getLogger("attncompiler")

Inputs = tuple  # (q, k, v, operands)
Timer = Callable[["Candidate", Callable[[int], object], int], float]
Progress = Callable[[int, int, str], None]

SEARCH_OF_MODE = {"on-first-use": "quick", "exhaustive": "exhaustive"}
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
    """One way to compute a bucket's attention (or its gradients): a Triton forward or backward
    config, or an SDPA backend (``config`` None)."""

    name: str
    run: Callable[[Inputs], object]
    config: FlashConfig | BwdConfig | None = None


def config_name(config: FlashConfig | BwdConfig) -> str:
    if isinstance(config, BwdConfig):
        return f"dkdv:{_tiles_name(config.dkdv)},dq:{_tiles_name(config.dq)}"
    return f"{config.block_m}x{config.block_n}/w{config.num_warps}/s{config.num_stages}"


def _tiles_name(t: BwdTiles) -> str:
    return f"{t.resident}x{t.streamed}/w{t.num_warps}/s{t.num_stages}"


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
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    return _candidate_configs(
        default_config(q, head_dim_v, smem is None), CONFIG_SPACE, search, smem,
        lambda c: keep(c, head_dim, head_dim_v, q.element_size(), smem),
        lambda c: fits_sequences(c, q.shape[-2], seq_k), lambda c: (c.block_m, c.block_n))


def sdpa_arguments(program: str, operands: Sequence[torch.Tensor]) -> dict | None:
    """Keyword arguments with which ``scaled_dot_product_attention`` computes ``program``, if it can.

    SDPA computes scaled scores plus at most one of: a float bias, a boolean mask, a top-left
    causal mask (``k <= q``). Anything else (soft-capping, sliding windows, ...) has no baseline.
    """
    form = _sdpa_form(program, tuple(t.dtype for t in operands))
    if form is None:
        return None
    return {**form, "attn_mask": operands[0]} if "attn_mask" in form else dict(form)


@functools.lru_cache(maxsize=1024)
def _sdpa_form(program: str, operand_dtypes: tuple) -> dict | None:
    """:func:`sdpa_arguments` with ``attn_mask`` standing for the operand (memoized: run time calls it)."""
    expr, kwargs = parse(program), {}
    is_operand = len(operand_dtypes) == 1
    if is_operand and isinstance(expr, Binary) and expr.op == "add" and Operand(0) in (expr.a, expr.b) \
            and operand_dtypes[0] != torch.bool:
        kwargs["attn_mask"] = True
        expr = expr.b if expr.a == Operand(0) else expr.a
    elif isinstance(expr, Where) and expr.b == Const(-math.inf) and is_operand and expr.cond == Operand(0) \
            and operand_dtypes[0] == torch.bool:
        kwargs["attn_mask"] = True
        expr = expr.a
    elif isinstance(expr, Where) and not operand_dtypes and expr.cond == Binary("le", Index("k"), Index("q")) \
            and (expr.b == Const(-math.inf) or is_sentinel_fill_of(expr.b, expr.a)):
        # Every row sees key 0, so a finite sentinel fill (Hugging Face's finfo.min) adds exactly nothing.
        kwargs["is_causal"] = True
        expr = expr.a
    if operand_dtypes and "attn_mask" not in kwargs:
        return None
    if expr == SCORE:
        return {**kwargs, "scale": 1.0}
    if isinstance(expr, Binary) and expr.op == "mul" and SCORE in (expr.a, expr.b):
        other = expr.b if expr.a == SCORE else expr.a
        return {**kwargs, "scale": other.value} if isinstance(other, Const) else None
    if isinstance(expr, Binary) and expr.op == "div" and expr.a == SCORE and isinstance(expr.b, Const):
        return {**kwargs, "scale": 1.0 / expr.b.value}
    return None


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor],
                   program: str, backend: str) -> torch.Tensor:
    """``program``'s attention by ``scaled_dot_product_attention`` under the SDPA backend named ``backend``
    (a key of :func:`sdpa_backends`); ``program`` must be one that :func:`sdpa_arguments` accepts.
    Grouped key/value heads go in as they are (``enable_gqa``)."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    kwargs = sdpa_arguments(program, operands)
    q, k, v, group = align(q, k, v)
    with sdpa_kernel(sdpa_backends(q.device)[backend]):
        return scaled_dot_product_attention(q, k, v, **kwargs, **({"enable_gqa": True} if group > 1 else {}))


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

    interpret = q.device.type != "cuda"

    def triton_run(config: FlashConfig):
        def run(x):
            result = flash_forward(x[0], x[1], x[2], list(x[3]), program, config=config, interpret=interpret)
            return result[0] if isinstance(result, tuple) else result  # (out, lse) where lse is returned too
        return run

    configs = triton_configs(q, v, k.shape[-2], search, shared_memory_limit(q.device))
    found = [Candidate(f"triton {config_name(c)}", triton_run(c), c) for c in configs]
    if sdpa_arguments(program, operands) is None:
        return found

    def sdpa_run(backend: str):
        return lambda x: sdpa_attention(x[0], x[1], x[2], x[3], program, backend)

    return found + [Candidate(name, sdpa_run(name)) for name in sdpa_backends(q.device)]


def fits_sequences_bwd(t: BwdTiles, seq_q: int, seq_k: int) -> bool:
    """As :func:`fits_sequences` for a backward kernel, whose tiles span queries on one side and keys on the other."""
    longest = _pow2_at_least(max(seq_q, seq_k))
    smallest_r = min(x.resident for x in BWD_TILES_SPACE)
    smallest_s = min(x.streamed for x in BWD_TILES_SPACE)
    return t.resident <= max(longest, smallest_r) and t.streamed <= max(longest, smallest_s)


def backward_configs(q: torch.Tensor, v: torch.Tensor, seq_k: int, search: str, smem: int | None,
                     tuned_dkdv: BwdConfig | None = None) -> list[BwdConfig]:
    """The backward configs worth timing, the default first, pruned and searched as
    :func:`triton_configs` does for the forward. Without ``tuned_dkdv``: the dK/dV launches of
    :data:`BWD_TILES_SPACE`, with dQ at its default; with it: its dK/dV and the dQ launches."""
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    default = tuned_dkdv or default_bwd_config(q, head_dim_v, smem is None)

    def tiles(c: BwdConfig) -> BwdTiles:
        return c.dq if tuned_dkdv else c.dkdv

    space = [BwdConfig.of(default.dkdv, t) if tuned_dkdv else BwdConfig.of(t, default.dq) for t in BWD_TILES_SPACE]
    return _candidate_configs(
        default, space, search, smem,
        lambda c: bwd_tiles_keep(tiles(c), head_dim, head_dim_v, q.element_size(), smem),
        lambda c: fits_sequences_bwd(tiles(c), q.shape[-2], seq_k),
        lambda c: (tiles(c).resident, tiles(c).streamed), lambda c: tiles(c).num_stages)


def _candidate_configs(default, space, search: str, smem: int | None, fits_device: Callable, fits_lengths: Callable,
                       tile: Callable, stages: Callable = lambda c: c.num_stages) -> list:
    """``default``, then the configs of ``space`` worth timing: those that fit the device (unless
    interpreted) and the sequence lengths; a quick search keeps the default's pipeline depth, and the
    interpreter, which ignores warps and stages, keeps one config per ``tile`` shape."""
    interpret = smem is None
    found = [default]
    for c in space:
        if search == "quick" and not interpret and stages(c) != stages(default):
            continue
        if not interpret and not fits_device(c):
            continue
        if not fits_lengths(c):
            continue
        if interpret and any(tile(c) == tile(f) for f in found):
            continue
        if c not in found:
            found.append(c)
    return found


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


def rotated_inputs(inputs: tuple, rotated: int = 3) -> list[tuple]:
    """``inputs`` and copies of its first ``rotated`` tensors, enough that together they exceed twice
    the GPU's L2 cache (the rest, such as the operand list, is shared)."""
    if inputs[0].device.type != "cuda":
        return [inputs]
    l2 = torch.cuda.get_device_properties(inputs[0].device).L2_cache_size
    size = sum(t.numel() * t.element_size() for t in inputs[:rotated])
    count = max(1, min(MAX_ROTATIONS, math.ceil(2 * l2 / max(size, 1))))
    return [inputs] + [(*(t.clone() for t in inputs[:rotated]), *inputs[rotated:]) for _ in range(count - 1)]


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

    def check(candidate: Candidate) -> str | None:
        return accuracy_problem(candidate.run(problem), exact, own)

    times = _check_and_time(key, found, check, rotated_inputs(inputs), timer, progress)
    kernels = {c: t for c, t in times.items() if c.config is not None}
    if not kernels:
        raise TuningError(f"no Triton config ran correctly for {key}")
    best = min(kernels, key=kernels.get)
    baselines = {c: t for c, t in times.items() if c.config is None}
    baseline = min(baselines, key=baselines.get) if baselines else None
    winner = baseline.name if baseline is not None and baselines[baseline] < kernels[best] else "triton"
    return Entry(best.config, kernels[best], search, sum(c.config is not None for c in found),
                 baseline.name if baseline else None, baselines[baseline] if baseline else None, winner)


def tune_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor], program: str,
                  zero_empty_rows: bool = False, search: str = "quick", timer: Timer | None = None,
                  progress: Progress | None = None) -> BackwardEntry:
    """Time every backward config for this call's bucket and return the fastest (not stored).

    Each candidate's ``(dq, dk, dv)`` on the reduced problem is first compared with the reference
    gradients (at most 2× PyTorch's own error, as for the forward). The forward's ``out`` and
    ``lse`` come from the default Triton forward, the output gradient from a fixed seed.
    """
    from attncompiler.codegen.flash import flash_forward
    from attncompiler.codegen.flash_bwd import flash_backward

    interpret = q.device.type != "cuda"
    key = bucket_key(q, k, v, operands, program)
    generator = torch.Generator(q.device).manual_seed(0)

    def with_forward(x: Inputs) -> tuple:
        out, lse = flash_forward(x[0], x[1], x[2], list(x[3]), program, interpret=interpret,
                                 zero_empty_rows=zero_empty_rows)
        grad_out = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return x[0], x[1], x[2], out, lse, grad_out, list(x[3])

    def run_with(config: BwdConfig):
        return lambda x: flash_backward(*x[:6], x[6], program, zero_empty_rows, config=config, interpret=interpret)

    problem = with_forward(reduced_problem((q, k, v, list(operands))))
    exact, own = reference_gradients(problem, program, zero_empty_rows)

    def check(candidate: Candidate) -> str | None:
        for name, got, want, theirs in zip(("dq", "dk", "dv"), candidate.run(problem), exact, own):
            trouble = accuracy_problem(got, want, theirs)
            if trouble is not None:
                return f"{name}: {trouble}"
        return None

    rotations = rotated_inputs(with_forward((q, k, v, list(operands))), 6)
    smem = shared_memory_limit(q.device)
    best, tried = None, 0
    for stage in ("dkdv", "dq"):  # dK/dV with dQ at its default, then dQ with the fastest dK/dV
        configs = backward_configs(q, v, k.shape[-2], search, smem, tuned_dkdv=best.config if best else None)
        found = [Candidate(f"triton-bwd {config_name(c)}", run_with(c), c) for c in configs]
        times = _check_and_time(key, found, check, rotations, timer, progress)
        if not times:
            raise TuningError(f"no Triton backward config ran correctly for {key} ({stage} stage)")
        best = min(times, key=times.get)
        tried += len(found)
    return BackwardEntry(best.config, times[best], search, tried)


def reference_gradients(problem: tuple, program: str, zero_empty_rows: bool) -> tuple[list, list]:
    """``(fp32-or-wider reference gradients, PyTorch's own in the input dtype)`` of ``(dq, dk, dv)``
    for ``problem = (q, k, v, out, lse, grad_out, operands)``."""
    q, k, v, _, _, grad_out, operands = problem
    exact = attention_backward_reference(q, k, v, grad_out, operands, program, zero_empty_rows)
    own = attention_backward_reference(q, k, v, grad_out, operands, program, zero_empty_rows, compute_dtype=q.dtype)
    return list(exact), list(own)


def _check_and_time(key: str, found: list[Candidate], check: Callable[[Candidate], str | None],
                    rotations: list[tuple], timer: Timer | None, progress: Progress | None) -> dict[Candidate, float]:
    """Milliseconds of each candidate that ``check`` accepts; the others are dropped with a warning
    (an SDPA backend that cannot run this shape quietly)."""
    timer = timer or (cuda_event_timer if rotations[0][0].device.type == "cuda" else wall_clock_timer)
    times: dict[Candidate, float] = {}
    for i, candidate in enumerate(found):
        if progress:
            progress(i, len(found), candidate.name)
        try:
            problem_text = check(candidate)
            if problem_text is None:
                times[candidate] = timer(candidate, lambda r: candidate.run(rotations[r]), len(rotations))
        except Exception as e:  # a config that cannot compile or launch, a backend that cannot run
            problem_text = failure_text(e)
            if candidate.config is None:  # an SDPA backend without a kernel for this shape
                log.debug("attncompiler: %s skipped for %s (%s)", candidate.name, key, problem_text)
                continue
        if problem_text is not None:
            log.warning("attncompiler: tuning %s: dropped %s (%s)", key, candidate.name, problem_text)
    if progress:
        progress(len(found), len(found), "done")
    return times


# ----------------------------------------------------------------------------- run time

@dataclass(frozen=True)
class Policy:
    """How run-time lookups treat a bucket (from the ``tune``, ``cache_url`` and ``tune_sdpa`` options)."""

    mode: str = "cached"
    cache_url: str | None = None
    sdpa: bool = True  # buckets whose winner is an SDPA backend run it


_policy: Policy | None = None
_caches: dict[tuple, TuningCache] = {}
_failed: set[tuple] = set()
_progress: list[Progress] = []
_sdpa_forwards: dict[tuple, str | None] = {}  # (device, bucket, zero_empty_rows) → SDPA backend of its last forward


def configure(options: Options) -> None:
    """Set the process-wide policy from a compilation's options (the backend calls this)."""
    global _policy
    policy = Policy(options.tune, options.cache_url, options.tune_sdpa)
    if _policy is not None and policy.cache_url != _policy.cache_url:
        _caches.clear()
    _policy = policy


def current_policy() -> Policy:
    global _policy
    if _policy is None:
        options = Options.resolve()
        _policy = Policy(options.tune, options.cache_url, options.tune_sdpa)
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
    _sdpa_forwards.clear()


def sdpa_dispatch(entry: Entry | None, operands: Sequence[torch.Tensor], zero_empty_rows: bool, seq_k: int) -> str | None:
    """The SDPA backend a call runs instead of the Triton kernel, or None.

    Only a bucket whose winner is an SDPA backend has one; the tuner times SDPA only for programs it
    computes exactly (:func:`sdpa_arguments`: plain scale, a bias, a boolean mask or the top-left
    causal mask). What remains is the rule for rows that see no key: SDPA gives them 0, the site NaN
    unless it has ``zero_empty_rows``. Without operands no row can be empty (the top-left causal mask
    shows every row key 0, given one key), so SDPA runs there; a mask or bias can hide all of a row's
    keys, so SDPA runs there only for sites with ``zero_empty_rows``.
    """
    if entry is None or entry.winner == "triton" or not current_policy().sdpa or seq_k == 0:
        return None
    return entry.winner if zero_empty_rows or not operands else None


def select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor], program: str,
           zero_empty_rows: bool = False) -> tuple[FlashConfig | None, str | None]:
    """``(config, SDPA backend)`` to run this call with: an SDPA backend (a key of :func:`sdpa_backends`)
    where the bucket's winner is one that may run here (:func:`sdpa_dispatch`), else None and the Triton
    config (None: the kernel's default). Tunes only when the policy says so."""
    mode = current_policy().mode
    key = bucket_key(q, k, v, operands, program)
    if mode == "off":
        if report.collecting():
            report.record_choice(program, report.KernelChoice(key, "default"))
        _sdpa_forwards[(q.device.type, q.device.index, key, zero_empty_rows)] = None
        return None, None
    tuning = tuning_cache(q.device)
    entry, source = tuning.lookup(key), "cache"
    if _wants_tuning(entry, mode) and (q.device.type, key) not in _failed and not _capturing(q):
        tuned = _tune_and_store(tuning, key, (q, k, v, operands), program, SEARCH_OF_MODE[mode])
        if tuned is not None:
            entry, source = tuned, "tuned"
    backend = None if (q.device.type, key, "sdpa") in _failed else sdpa_dispatch(entry, operands, zero_empty_rows,
                                                                                 k.shape[-2])
    _sdpa_forwards[(q.device.type, q.device.index, key, zero_empty_rows)] = backend
    if report.collecting():
        choice = report.KernelChoice(key, "default") if entry is None else report.KernelChoice(
            key, source, config_name(entry.config), entry.ms, entry.baseline, entry.baseline_ms, backend or "triton")
        report.record_choice(program, choice)
    return (entry.config if entry is not None else None), backend


def sdpa_failed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor], program: str,
                zero_empty_rows: bool, error: Exception) -> None:
    """The SDPA backend :func:`select` chose could not run this call: log once; the bucket runs Triton from now on."""
    key = bucket_key(q, k, v, operands, program)
    _failed.add((q.device.type, key, "sdpa"))
    _sdpa_forwards[(q.device.type, q.device.index, key, zero_empty_rows)] = None
    log.warning("attncompiler: SDPA failed for %s (%s); using the Triton kernel", key, failure_text(error))


def select_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor],
                  program: str) -> FlashConfig | None:
    """The Triton config of this call's bucket (None: the kernel's default), as :func:`select` finds it."""
    return select(q, k, v, operands, program)[0]


def forward_ran_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor],
                     program: str, zero_empty_rows: bool) -> bool:
    """Whether the latest forward of this bucket and site kind ran SDPA (so wrote no logsumexp)."""
    key = bucket_key(q, k, v, operands, program)
    return _sdpa_forwards.get((q.device.type, q.device.index, key, zero_empty_rows)) is not None


def select_bwd_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: Sequence[torch.Tensor],
                      program: str, zero_empty_rows: bool = False) -> BwdConfig | None:
    """The backward config of this call's bucket (None: the default). Under "on-first-use" and
    "exhaustive" the first backward of a bucket whose forward is tuned tunes it."""
    mode = current_policy().mode
    if mode == "off":
        return None
    key = bucket_key(q, k, v, operands, program)
    tuning = tuning_cache(q.device)
    entry = tuning.lookup(key)
    if entry is None:
        return None
    if _wants_tuning(entry.backward, mode) and (q.device.type, key, "bwd") not in _failed and not _capturing(q):
        entry = _tune_backward_and_store(tuning, key, entry, (q, k, v, operands), program, zero_empty_rows,
                                         SEARCH_OF_MODE[mode]) or entry
    if report.collecting() and entry.backward is not None:
        report.record_backward(key, config_name(entry.backward.config))
    return entry.backward.config if entry.backward is not None else None


def _wants_tuning(result: Entry | BackwardEntry | None, mode: str) -> bool:
    if mode == "on-first-use":
        return result is None
    return mode == "exhaustive" and (result is None or result.search != "exhaustive")


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
        log.warning("attncompiler: tuning failed for %s (%s); using the default config", key, failure_text(e))
        return None
    log.info("attncompiler: tuned %s: %s %.4g ms%s%s", key, config_name(entry.config), entry.ms,
             f", {entry.speedup:.2f}x vs {entry.baseline}" if entry.speedup else "",
             f"; {entry.winner} wins" if entry.winner != "triton" else "")
    return tuning.lookup(key)


def _tune_backward_and_store(tuning: TuningCache, key: str, entry: Entry, inputs: Inputs, program: str,
                             zero_empty_rows: bool, search: str) -> Entry | None:
    """Tune one bucket's backward and store it in its entry; on failure log once and remember not to retry."""
    try:
        progress = _progress[-1] if _progress else None
        backward = tune_backward(*inputs, program, zero_empty_rows, search=search, progress=progress)
        tuning.store(key, replace(entry, backward=backward))
    except Exception as e:  # tuning must never fail training: fall back to the default backward config
        _failed.add((inputs[0].device.type, key, "bwd"))
        log.warning("attncompiler: backward tuning failed for %s (%s); using the default config", key,
                    failure_text(e))
        return None
    log.info("attncompiler: tuned the backward of %s: %s %.4g ms", key, config_name(backward.config), backward.ms)
    return tuning.lookup(key)


@contextlib.contextmanager
def reporting_progress(progress: Progress) -> Iterator[None]:
    """Within the block, run-time tuning reports each candidate to ``progress(done, total, label)``."""
    _progress.append(progress)
    try:
        yield
    finally:
        _progress.remove(progress)
