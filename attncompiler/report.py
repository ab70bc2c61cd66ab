"""What the backend found and did: per-site records, per-graph code, and the printed report."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class KernelChoice:
    """The kernel config an attention call ran with, for its shape bucket, and where it came from."""

    bucket: str
    source: str  # "tuned" (in this run), "cache", or "default" (untuned)
    config: str | None = None
    ms: float | None = None
    baseline: str | None = None  # the fastest SDPA backend when tuned
    baseline_ms: float | None = None
    kernel: str = "triton"  # what ran: "triton", or the SDPA backend that won the bucket ("sdpa-cudnn")
    backward: str | None = None  # the tuned backward config, once a training call looked it up

    @property
    def speedup(self) -> float | None:
        return self.baseline_ms / self.ms if self.baseline_ms and self.ms else None

    def describe(self) -> str:
        if self.config is None:
            return "config default (untuned)"
        if self.kernel != "triton":
            return f"{self.kernel} ({self.source}, {self.baseline_ms:.3g} ms; Triton {self.config} {self.ms:.3g} ms)"
        text = f"config {self.config} ({self.source}, {self.ms:.3g} ms"
        text += f", {self.speedup:.2f}x vs {self.baseline})" if self.speedup else ")"
        return text + (f"; backward {self.backward}" if self.backward else "")


@dataclass
class Site:
    """One candidate attention site: a softmax or a ``scaled_dot_product_attention`` call."""

    graph: int
    node: str
    rewritten: bool
    reason: str | None = None
    kernel: str | None = None
    summary: dict = field(default_factory=dict)
    source: str | None = None  # generated kernel file, when a generated kernel runs
    choice: KernelChoice | None = None  # the config it ran with, once it has run
    saa_site: str | None = None  # the SAA error gate's id for this site, when it runs SAA
    saa_reason: str | None = None  # why the site runs dense attention although SAA was allowed

    def describe(self) -> str:
        what = ", ".join(f"{k}={v}" for k, v in self.summary.items())
        return f"{what}; {self.choice.describe()}" if self.choice else what

    @property
    def saa(self) -> Any:
        """The SAA gate's :class:`~attncompiler.saa_ops.SiteRecord` (density, error, fallback, speedup) once
        the site has run, else None."""
        if self.saa_site is None:
            return None
        from .saa_ops import SAA_SITES

        return SAA_SITES.get(self.saa_site)

    def describe_saa(self) -> str:
        """What SAA did here: density and measured error, why it fell back, or why it is not used."""
        if self.saa_reason is not None:
            return f"dense: {self.saa_reason}"
        if self.saa_site is None:
            return "-"
        record = self.saa
        if record is None:
            from .saa_ops import SHORT_CALLS

            short = SHORT_CALLS[self.saa_site]
            calls = f"{short} call" + ("s" if short != 1 else "")
            return f"saa (not run yet: {calls} below min_keys ran dense)" if short else "saa (not run yet)"
        return record.describe()


@dataclass
class GraphRecord:
    index: int
    before: str
    after: str


@dataclass
class Report:
    sites: list[Site] = field(default_factory=list)
    graphs: list[GraphRecord] = field(default_factory=list)
    choices: list[KernelChoice] = field(default_factory=list)  # one per shape bucket that ran
    output: Any = field(default=None, repr=False)  # what the call returned, for explain()

    @property
    def num_rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def graph_before(self) -> str:
        return "\n".join(g.before for g in self.graphs)

    @property
    def graph_after(self) -> str:
        return "\n".join(g.after for g in self.graphs)

    def table(self) -> str:
        """One row per site; an ``saa`` column appears when SAA was allowed at some site."""
        with_saa = any(s.saa_site is not None or s.saa_reason is not None for s in self.sites)
        rows = [("graph", "node", "rewritten", "kernel", *(("saa",) if with_saa else ()), "what / why not")]
        for s in self.sites:
            what = s.describe() if s.rewritten else (s.reason or "")
            saa = (s.describe_saa(),) if with_saa else ()
            rows.append((str(s.graph), s.node, "yes" if s.rewritten else "no", s.kernel or "-", *saa, what))
        padded = len(rows[0]) - 1
        widths = [max(len(r[i]) for r in rows) for i in range(padded)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:padded], widths)) + "  " + r[padded] for r in rows]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])

    def __str__(self) -> str:
        head = (f"attncompiler: {self.num_rewritten} of {len(self.sites)} attention sites rewritten "
                f"in {len(self.graphs)} graph(s)")
        parts = [head, "", self.table()]
        for g in self.graphs:
            parts += ["", f"--- graph {g.index} after rewriting ---", g.after.strip()]
        return "\n".join(parts)


_active: list[Report] = []
_graph_counter = 0


def next_graph_index() -> int:
    global _graph_counter
    _graph_counter += 1
    return _graph_counter - 1


def publish(record: GraphRecord, sites: list[Site]) -> None:
    """Hand one compiled graph's record to every active :func:`collect` block."""
    for report in _active:
        report.graphs.append(record)
        report.sites.extend(sites)


def collecting() -> bool:
    """Whether any :func:`collect` block is active (so that run-time choices are worth recording)."""
    return bool(_active)


def record_choice(program: str, choice: KernelChoice) -> None:
    """Note the config chosen for a call of score program ``program``: on each active report, once
    per bucket, and on the rewritten sites of that program that have no choice yet (whose kernel
    column then names the SDPA backend where one ran)."""
    for report in _active:
        if all(c.bucket != choice.bucket for c in report.choices):
            report.choices.append(choice)
        for site in report.sites:
            if site.rewritten and site.choice is None and site.summary.get("program") == program:
                site.choice = choice
                if choice.kernel != "triton":
                    site.kernel = choice.kernel


def record_backward(bucket: str, config: str) -> None:
    """Note the backward config of shape bucket ``bucket`` on its choices in every active report."""
    for report in _active:
        for choice in report.choices:
            if choice.bucket == bucket:
                choice.backward = config


@contextlib.contextmanager
def collect() -> Iterator[Report]:
    """Collect what every graph compiled by the backend inside the block found and did."""
    report = Report()
    _active.append(report)
    try:
        yield report
    finally:
        _active.remove(report)
