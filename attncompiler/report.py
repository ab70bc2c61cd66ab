"""What the backend found and did: per-site records, per-graph code, and the printed report."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator


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

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.summary.items())


@dataclass
class GraphRecord:
    index: int
    before: str
    after: str


@dataclass
class Report:
    sites: list[Site] = field(default_factory=list)
    graphs: list[GraphRecord] = field(default_factory=list)
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
        rows = [("graph", "node", "rewritten", "kernel", "what / why not")]
        for s in self.sites:
            what = s.describe() if s.rewritten else (s.reason or "")
            rows.append((str(s.graph), s.node, "yes" if s.rewritten else "no", s.kernel or "-", what))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
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


@contextlib.contextmanager
def collect() -> Iterator[Report]:
    """Collect what every graph compiled by the backend inside the block found and did."""
    report = Report()
    _active.append(report)
    try:
        yield report
    finally:
        _active.remove(report)
