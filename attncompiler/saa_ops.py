"""The ``attncompiler::saa_attention`` custom op: SAA within an error budget, else dense attention.

``saa_attention(q, k, v, program, config, site, kernel, zero_empty_rows)`` computes attention for a score
program that SAA applies to (:func:`attncompiler.saa.saa_applicable`) at the operating point ``config``
(:meth:`SAAConfig.to_json` text); rows that see no key are NaN, or zeros with ``zero_empty_rows`` (as in
:mod:`attncompiler.ops`). Calls in which, under a ``finfo.min``-like fill, some row sees no key
(:meth:`attncompiler.saa.SAAProgram.averages_empty_rows`) run dense attention, and so do calls with fewer than
the operating point's ``min_keys`` keys (decoding steps, short prompts). The first call for a ``site`` also
computes dense attention and measures SAA's relative error against it (Frobenius norm); above the budget
``max_error`` the site tries the operating point's denser points (:meth:`SAAConfig.denser_points`) on the same
inputs and runs the first within the budget from then on. Where none is, or if SAA fails, the site runs dense
attention from then on and the reason is logged once. On a GPU the first call also times one more SAA call and
one more dense call (host included, as a model runs them) for the report's speedup: where SAA was the slower,
a site at a denser point runs dense attention from then on, and one at the given point warns. Later calls on
a GPU replay, per input layout, a CUDA graph of the whole SAA call (:data:`GRAPHED`; the operating point's
``graphs``), so that a short call costs the host one launch rather than a dozen; where the first call's replay
took longer than the host took to issue the call without a graph (the GPU bounds the call, and the graph's
input copies add to it), that layout runs without one. Per-site measurements are kept in :data:`SAA_SITES`
(short calls in :data:`SHORT_CALLS`), and every call is counted in :data:`SAA_CALLS` as "saa" or "dense".
Forward only: SAA sites are for inference.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from . import ops  # noqa: F401  (registers attncompiler::attention, the dense path)
from .failures import failure_text
from .saa import saa_forward, saa_program
from .saa_config import SAAConfig
from .saa_graphs import GraphedCalls
from .spec import output_shape

log = logging.getLogger("attncompiler")

SAA_CALLS: Counter = Counter()
# Devices on which a site's first call times SAA against dense attention (on CPU the kernels are
# interpreted or in PyTorch: their speed says nothing).
TIMED_DEVICES = ("cuda",)


@dataclass
class SiteRecord:
    """What the first call measured at one site, and why it fell back to dense (None: it did not)."""

    density: float | None = None
    error: float | None = None
    fallback: str | None = None
    saa_ms: float | None = None    # one warm SAA call, host included (on TIMED_DEVICES)
    dense_ms: float | None = None  # one warm dense call, the same way
    graphed: bool | None = None    # whether later calls replay a CUDA graph (None: not for this device or config)
    point: str | None = None       # the denser operating point (SAAConfig JSON) the site runs, if not the given one
    given_error: float | None = None  # the given operating point's error, where the site runs a denser one

    @property
    def speedup(self) -> float | None:
        """Dense attention's time over SAA's, as the first call measured them (None: not timed)."""
        return self.dense_ms / self.saa_ms if self.saa_ms and self.dense_ms else None

    def describe(self) -> str:
        """What the gate measured and decided: "saa: density …, error …[, speedup …x (CUDA graph)]", "saa at the
        denser top_k …, tau … (the given point's error …): density …", or "dense after fallback: reason (what was
        measured)"."""
        measured = ", ".join(f"{name} {value:.3g}" for name, value in
                             (("density", self.density), ("error", self.error)) if value is not None)
        if self.speedup is not None:
            measured += f", speedup {self.speedup:.2f}x" + (" (CUDA graph)" if self.graphed else "")
        if self.fallback is not None:
            return f"dense after fallback: {self.fallback}" + (f" ({measured})" if measured else "")
        if self.point is not None:
            return (f"saa at the denser {_config(self.point).routing()} (the given point's error "
                    f"{self.given_error:.3g}): {measured}")
        return f"saa: {measured}"


SAA_SITES: dict[str, SiteRecord] = {}
SHORT_CALLS: Counter = Counter()  # per site: calls with fewer than min_keys keys, run dense before the gate
GRAPHED = GraphedCalls()  # CUDA graphs of SAA calls after each site's first, shared by sites of one layout
_sites_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _config(text: str) -> SAAConfig:
    return SAAConfig.from_json(text)


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖out − exact‖ / ‖exact‖`` (Frobenius) over the elements where ``exact`` is a number;
    infinite where ``out`` has NaN elsewhere, or misses one."""
    defined = ~torch.isnan(exact)
    if not torch.equal(torch.isnan(out), ~defined):
        return math.inf
    diff = (out.float() - exact.float())[defined].norm().item()
    norm = exact.float()[defined].norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _dense_attention(q, k, v, program: str, kernel: str, zero_empty_rows: bool) -> torch.Tensor:
    out, _ = torch.ops.attncompiler.attention(q, k, v, [], program, kernel, zero_empty_rows)
    return out


def _dense(q, k, v, program: str, kernel: str, zero_empty_rows: bool) -> torch.Tensor:
    SAA_CALLS["dense"] += 1
    return _dense_attention(q, k, v, program, kernel, zero_empty_rows)


def _issue_milliseconds(call, device: torch.device) -> tuple[float, float]:
    """Wall-clock milliseconds of one ``call()`` from an idle device: until the host has issued it, and
    until its end (host included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    issued = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (issued - start) * 1e3, (time.perf_counter() - start) * 1e3


def _milliseconds(call, device: torch.device) -> float:
    """Wall-clock milliseconds of one ``call()``, from an idle device to its end (host included)."""
    return _issue_milliseconds(call, device)[1]


def _saa_milliseconds(run_saa, graph: tuple | None, device: torch.device) -> tuple[float, bool | None]:
    """One warm SAA call, host included, as later calls will run it, and whether they replay a graph. With
    ``graph``, ``(layout key, inputs, output of inputs)`` on a GPU: from the layout's CUDA graph where its
    replay (input copies included) ends before the host has even issued the call without it; else the
    layout runs without a graph (the GPU bounds it, and in a model the host issues the next calls
    meanwhile)."""
    if graph is None:
        return _milliseconds(run_saa, device), None
    issue, eager = _issue_milliseconds(run_saa, device)
    GRAPHED.prepare(*graph)
    replayed = _milliseconds(lambda: GRAPHED(*graph), device)
    if replayed < issue:
        return replayed, True
    GRAPHED.drop(*graph[:2])
    return eager, False


def _time_against_dense(site: str, record: SiteRecord, saa_ms: float, run_dense, device: torch.device,
                        given: SAAConfig) -> None:
    """Records SAA's and one (warm) dense call's times in ``record``. Where SAA was the slower: a site at a
    denser point than the ``given`` one falls back to dense attention (the gate chose that point, and it
    does not pay); at the given point, a warning."""
    record.saa_ms, record.dense_ms = saa_ms, _milliseconds(run_dense, device)
    if record.speedup >= 1:
        return
    if record.point is not None:
        _fall_back(site, record, f"{_over_budget(record.given_error, given)}, and SAA within it, at the denser "
                                 f"{_config(record.point).routing()}, was slower than dense attention")
    else:
        log.warning("attncompiler: SAA site %s took %.3g ms against dense attention's %.3g on its first call "
                    "(%.2fx): at this length its launches cost more than it saves; raise min_keys or leave "
                    "SAA off here", site, record.saa_ms, record.dense_ms, record.speedup)


def _denser_point(record: SiteRecord, given: SAAConfig, run_at,
                  exact: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Where the ``given`` operating point exceeded its budget on a site's first call: the output at the first
    of its denser points within the budget, run by ``run_at(point)``, recorded in ``record`` (as the site's
    point from then on), or None where none is (``record`` keeps the given point's density and error); and
    the points tried over budget, as text for the fallback reason ("" where none was)."""
    over = []
    for point in given.denser_points():
        out, stats = run_at(point)
        error = relative_error(out, exact)
        if error <= given.max_error:
            record.point, record.given_error = point.to_json(), record.error
            record.density, record.error = stats.density, error
            return out, ""
        over.append(f"{point.routing()} (error {error:.3g}, density {stats.density:.2f})")
    return None, f", and so did the denser {' and '.join(over)}" if over else ""


def _over_budget(error: float, given: SAAConfig) -> str:
    """The fallback reason's opening: "relative error … exceeds max_error …"."""
    return f"relative error {error:.3g} exceeds max_error {given.max_error:.3g}"


def _fall_back(site: str, record: SiteRecord, reason: str) -> None:
    record.fallback = reason
    log.warning("attncompiler: SAA site %s runs dense attention: %s", site, reason)


@torch.library.custom_op("attncompiler::saa_attention", mutates_args=())
def saa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, program: str, config: str, site: str,
                  kernel: str, zero_empty_rows: bool = False) -> torch.Tensor:
    """SAA of q ``[..., Sq, D]``, k ``[..., Sk, D]``, v ``[..., Sk, Dv]``, or dense attention where it
    did not meet its error budget at ``site``."""
    form = saa_program(program)
    operating_point = _config(config)
    if form is not None and form.averages_empty_rows(q.shape[-2], k.shape[-2]):
        return _dense(q, k, v, program, kernel, zero_empty_rows)  # this shape only; the gate is untouched
    if k.shape[-2] < operating_point.min_keys:
        SHORT_CALLS[site] += 1
        return _dense(q, k, v, program, kernel, zero_empty_rows)  # too short to gain; the gate is untouched
    with _sites_lock:
        record = SAA_SITES.get(site)
        first = record is None
        if first:
            record = SAA_SITES[site] = SiteRecord()
    if record.fallback is not None:
        return _dense(q, k, v, program, kernel, zero_empty_rows)
    if form is None:
        _fall_back(site, record, f"score program {program} is not a scale or a causal scale")
        return _dense(q, k, v, program, kernel, zero_empty_rows)

    graphed = q.device.type == "cuda" and operating_point.graphs and kernel != "reference"

    def site_point() -> str:
        """The operating point the site runs (JSON): the denser one its first call chose, else the given one."""
        return record.point or config

    def layout_key() -> tuple:
        return program, site_point(), kernel, zero_empty_rows

    def run_saa(q=q, k=k, v=v, point=None):
        return saa_forward(q, k, v, form.scale, form.causal, point or _config(site_point()),
                           bottom_right=form.bottom_right, zero_empty_rows=zero_empty_rows, kernel=kernel)

    def saa_output(q, k, v):
        return run_saa(q, k, v)[0]

    try:
        if first or not graphed:
            out, stats = run_saa()
        else:
            out = GRAPHED(layout_key(), (q, k, v), saa_output)
    except Exception as e:  # a kernel that cannot compile or launch: keep the model running
        _fall_back(site, record, failure_text(e))
        return _dense(q, k, v, program, kernel, zero_empty_rows)
    if first:
        exact = _dense(q, k, v, program, kernel, zero_empty_rows)
        record.density, record.error = stats.density, relative_error(out, exact)
        if not record.error <= operating_point.max_error:
            try:
                out, tried = _denser_point(record, operating_point, lambda point: run_saa(point=point), exact)
            except Exception as e:
                _fall_back(site, record, f"{failure_text(e)} (at a denser point)")
                return exact
            if out is None:
                _fall_back(site, record, f"{_over_budget(record.error, operating_point)} "
                                         f"(density {record.density:.2f})" + tried)
                return exact
        if q.device.type in TIMED_DEVICES:
            saa_ms, record.graphed = _saa_milliseconds(run_saa, (layout_key(), (q, k, v), saa_output) if graphed
                                                       else None, q.device)
            _time_against_dense(site, record, saa_ms,
                                lambda: _dense_attention(q, k, v, program, kernel, zero_empty_rows), q.device,
                                operating_point)
        log.info("attncompiler: SAA site %s: density %.3f, relative error %.3g, %s", site, record.density,
                 record.error, f"speedup {record.speedup:.2f}x over dense" if record.speedup else "not timed")
    SAA_CALLS["saa"] += 1
    return out


@saa_attention.register_fake
def _(q, k, v, program, config, site, kernel, zero_empty_rows=False):
    return q.new_empty(output_shape(q.shape, k.shape, v.shape), dtype=v.dtype)
