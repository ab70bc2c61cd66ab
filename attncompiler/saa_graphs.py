"""CUDA-graph replay of SAA calls: one graph launch in place of a call's dozen kernels and tensor ops.

An SAA call issues about a dozen kernels and small tensor ops (pooling, centroids, the shortlist,
the router, the attend pass, the block bounds). With few heads at 8K tokens the host takes longer
to issue them than the GPU takes to run them, so short calls are bound by the host. A
:class:`GraphedCalls` captures a call once per *layout* (the inputs' shapes, strides, dtypes and
device, and the op's other arguments), on that layout's second call, and from then on copies the
inputs into the graph's own buffers, replays the graph and returns a copy of its output. The
graphs of at most ``capacity`` layouts are kept (the least recently used goes, with its memory: a
copy of its inputs and the call's intermediates). The copies cost GPU time, so where the GPU, not
the host, bounds a call, a graph is slower: the caller times both and drops the graph there
(:meth:`GraphedCalls.drop`). Calls made while the stream is being captured (a model run inside a
CUDA graph of its own) run as they are, and so does every call of a layout whose graph was dropped
or whose capture raised (logged once).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from .failures import failure_text

log = logging.getLogger("attncompiler")


@dataclass
class _Graph:
    inputs: tuple[torch.Tensor, ...]  # the graph's own copies of the inputs
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor                 # the graph's output, overwritten by each replay


def layout(*tensors: torch.Tensor) -> tuple:
    """What a graph of a call on ``tensors`` depends on: their shapes, strides, dtypes and devices."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def capture_graph(fn: Callable[[], torch.Tensor], warmups: int = 1) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn()`` (CUDA work on the current device) captured in a CUDA graph after ``warmups`` calls on a side
    stream (which compile and settle whatever a first call does lazily): the graph and its output."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphedCalls:
    """Calls ``run(*inputs)`` by layout key: the first as it is, the second captured into a CUDA graph,
    later ones replayed from it. ``replays`` counts the replayed calls."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.replays = 0
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._seen: set[Hashable] = set()
        self._eager: set[Hashable] = set()
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Drops every graph (and its memory) and what was seen."""
        with self._lock:
            self._graphs.clear()
            self._seen.clear()
            self._eager.clear()
            self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable, inputs: tuple[torch.Tensor, ...],
                 run: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``run(*inputs)`` (a function of its inputs alone, issuing only CUDA work that a graph can
        hold), replayed from the graph of ``(key, layout(*inputs))`` where there is one."""
        key = _graph_key(key, inputs)
        if key is None:
            return run(*inputs)
        with self._lock:
            graphed = self._graphs.get(key)
            if graphed is not None:
                self._graphs.move_to_end(key)
            capture = graphed is None and key in self._seen and key not in self._eager
            self._seen.add(key)
        if capture:
            graphed = self._capture(key, inputs, run)
        if graphed is None:
            return run(*inputs)
        with torch.cuda.device(inputs[0].device):  # (the graph's device, whichever is current)
            for own, given in zip(graphed.inputs, inputs):
                own.copy_(given)
            graphed.graph.replay()
        with self._lock:
            self.replays += 1
        return graphed.out.clone()

    def prepare(self, key: Hashable, inputs: tuple[torch.Tensor, ...], run: Callable[..., torch.Tensor]) -> None:
        """Captures the graph of ``(key, layout(*inputs))`` now, where it has none (on a GPU, outside a capture),
        so that the next call replays."""
        key = _graph_key(key, inputs)
        if key is None:
            return
        with self._lock:
            known = key in self._graphs or key in self._eager
            self._seen.add(key)
        if not known:
            self._capture(key, inputs, run)

    def drop(self, key: Hashable, inputs: tuple[torch.Tensor, ...]) -> None:
        """Drops the graph of ``(key, layout(*inputs))``: calls of that layout run as they are from now on."""
        key = (key, layout(*inputs))
        with self._lock:
            self._graphs.pop(key, None)
            self._eager.add(key)

    def _capture(self, key: Hashable, inputs: tuple[torch.Tensor, ...], run) -> _Graph | None:
        """The graph of ``run`` on copies of ``inputs`` (after one warm-up call on a side stream), kept
        under ``key``; None, logged and remembered, where capturing raised."""
        try:
            with torch.cuda.device(inputs[0].device):
                own = tuple(torch.empty_like(t) for t in inputs)
                for o, t in zip(own, inputs):
                    o.copy_(t)
                graph, out = capture_graph(lambda: run(*own))
        except Exception as e:  # a call a graph cannot hold: it runs as it is from now on
            with self._lock:
                self._eager.add(key)
            log.warning("attncompiler: SAA calls of layout %s run without a CUDA graph: capturing raised %s",
                        key[1], failure_text(e))
            return None
        graphed = _Graph(own, graph, out)
        with self._lock:
            self._graphs[key] = graphed
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
        return graphed


def _graph_key(key: Hashable, inputs: tuple[torch.Tensor, ...]) -> Hashable | None:
    """``(key, layout(*inputs))``, or None where a call on ``inputs`` cannot have a graph (not on a GPU, or
    inside a capture)."""
    if inputs[0].device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return key, layout(*inputs)
