"""CUDA-graph replay of SAA calls: which calls replay, what they return, and the op's use of it."""

import pytest
import torch

from attncompiler import saa_ops
from attncompiler.report import Site
from attncompiler.saa import saa_forward
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_graphs import GraphedCalls, layout
from attncompiler.saa_ops import GRAPHED, SAA_CALLS, SAA_SITES, SHORT_CALLS, SiteRecord

PROGRAM = "(where (le k q) (mul s 0.125) -inf)"
SMALL = dict(block_m=16, block_n=16, min_keys=0, top_k=2, tau=None, max_error=1.0)


class Counted:
    """A call that counts how often it ran (a replay does not run it)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *inputs):
        self.calls += 1
        return self.fn(*inputs)


def test_layout_tells_shapes_strides_and_dtypes_apart():
    x = torch.zeros(2, 3, 4)
    assert layout(x) == layout(torch.ones(2, 3, 4))
    assert layout(x) != layout(x.transpose(1, 2).contiguous().transpose(1, 2))  # same shape, other strides
    assert layout(x) != layout(x.half()) != layout(torch.zeros(2, 3, 5))


def test_cpu_calls_run_as_they_are():
    graphs = GraphedCalls()
    run = Counted(lambda a, b: a + b)
    a, b = torch.ones(3), torch.arange(3.0)
    for _ in range(3):
        assert torch.equal(graphs("add", (a, b), run), a + b)
    assert run.calls == 3 and graphs.replays == 0 and len(graphs) == 0


@pytest.mark.parametrize("replay_ms, kept", [(0.2, True), (1.25, False)])
def test_the_gate_keeps_a_graph_where_its_replay_beats_issuing_the_call(monkeypatch, replay_ms, kept):
    """Issuing the call without a graph takes the host 0.6 ms (1.3 to its end): a replay of 0.2 ms keeps the
    layout's graph and is the site's time; one of 1.25 (the GPU bounds the call) drops it."""
    dropped = []
    monkeypatch.setattr(saa_ops, "_issue_milliseconds", lambda call, device: (0.6, 1.3))
    monkeypatch.setattr(saa_ops, "_milliseconds", lambda call, device: replay_ms)
    monkeypatch.setattr(saa_ops.GRAPHED, "prepare", lambda key, inputs, run: None)
    monkeypatch.setattr(saa_ops.GRAPHED, "drop", lambda key, inputs: dropped.append(key))
    graph = ("layout", (torch.zeros(1),), lambda x: x)
    assert saa_ops._saa_milliseconds(lambda: None, graph, torch.device("cuda")) == (0.2 if kept else 1.3, kept)
    assert dropped == ([] if kept else ["layout"])


def test_the_report_says_where_a_site_replays_a_graph():
    site = Site(0, "attention", True, saa_site="graph0:site")
    SAA_SITES["graph0:site"] = SiteRecord(density=0.3, error=0.05, saa_ms=0.25, dense_ms=0.5, graphed=True)
    try:
        assert site.describe_saa() == "saa: density 0.3, error 0.05, speedup 2.00x (CUDA graph)"
        SAA_SITES["graph0:site"].graphed = False
        assert site.describe_saa() == "saa: density 0.3, error 0.05, speedup 2.00x"
    finally:
        SAA_SITES.clear()


def test_graphs_are_an_operating_point_field():
    assert SAAConfig().graphs is True
    assert SAAConfig.from_json(SAAConfig(graphs=False).to_json()).graphs is False


cuda = pytest.mark.gpu


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v


@cuda
def test_second_call_of_a_layout_captures_and_later_calls_replay():
    graphs = GraphedCalls()
    run = Counted(_attention)
    outs = []
    for _ in range(4):
        q, k, v = (torch.randn(2, 4, 64, 32, device="cuda") for _ in range(3))
        outs.append((graphs("attention", (q, k, v), run), _attention(q, k, v)))
    # the first call runs; the second warms up and is captured (two runs), then replays; then replays
    assert run.calls == 3 and graphs.replays == 3 and len(graphs) == 1
    for got, want in outs:  # every output is its own call's, not overwritten by a later replay
        torch.testing.assert_close(got, want)
    assert outs[1][0].data_ptr() != outs[2][0].data_ptr()


@cuda
def test_layouts_have_their_own_graphs_and_the_least_recent_goes():
    graphs = GraphedCalls(capacity=1)
    run = Counted(_attention)
    short = [torch.randn(1, 2, 32, 16, device="cuda") for _ in range(3)]
    long = [torch.randn(1, 2, 48, 16, device="cuda") for _ in range(3)]
    for inputs in (short, short, long, long):
        torch.testing.assert_close(graphs("attention", tuple(inputs), run), _attention(*inputs))
    assert len(graphs) == 1 and graphs.replays == 2 and run.calls == 6
    # the short layout's graph went when the long one's came; seen before, it is captured again at once
    torch.testing.assert_close(graphs("attention", tuple(short), run), _attention(*short))
    assert len(graphs) == 1 and graphs.replays == 3 and run.calls == 8


@cuda
def test_a_dropped_layout_runs_as_it_is_from_then_on():
    graphs = GraphedCalls()
    run = Counted(_attention)
    q, k, v = (torch.randn(1, 2, 32, 16, device="cuda") for _ in range(3))
    graphs.prepare("attention", (q, k, v), run)  # captured at once: the next call replays
    graphs("attention", (q, k, v), run)
    assert (run.calls, graphs.replays, len(graphs)) == (2, 1, 1)
    graphs.drop("attention", (q, k, v))
    for _ in range(2):
        torch.testing.assert_close(graphs("attention", (q, k, v), run), _attention(q, k, v))
    assert (run.calls, graphs.replays, len(graphs)) == (4, 1, 0)


@cuda
def test_calls_inside_a_capture_run_as_they_are():
    graphs = GraphedCalls()
    run = Counted(_attention)
    q, k, v = (torch.randn(1, 2, 32, 16, device="cuda") for _ in range(3))
    graphs("attention", (q, k, v), run)
    outer = torch.cuda.CUDAGraph()
    with torch.cuda.graph(outer):
        out = graphs("attention", (q, k, v), run)
    outer.replay()
    torch.testing.assert_close(out, _attention(q, k, v))
    assert len(graphs) == 0 and graphs.replays == 0


@pytest.fixture
def gate():
    for state in (SAA_SITES, SAA_CALLS, SHORT_CALLS, GRAPHED):
        state.clear()
    yield
    for state in (SAA_SITES, GRAPHED):
        state.clear()


@cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_the_op_replays_sites_of_one_layout_from_one_graph(gate, graphs):
    """Three sites of one layout (layers of a model): each first call is the gate's, which times SAA
    without and with the layout's graph (the first site's captures it; at this size the host bounds
    the call, so the graph stays); every later call replays it, with the same output as SAA run
    directly."""
    config = SAAConfig(**SMALL, graphs=graphs)
    op = torch.ops.attncompiler.saa_attention
    for call in range(3):
        for site in ("layer0", "layer1", "layer2"):
            q = torch.randn(1, 4, 80, 64, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, 2, 80, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            got = op(q, k, v, PROGRAM, config.to_json(), site, "auto")
            want = saa_forward(q, k, v, 0.125, True, config, kernel="triton")[0]
            assert torch.equal(got, want)
    assert SAA_CALLS["saa"] == 9 and all(SAA_SITES[s].fallback is None for s in ("layer0", "layer1", "layer2"))
    assert (GRAPHED.replays, len(GRAPHED)) == ((3 + 6, 1) if graphs else (0, 0))  # 3 timed, 6 later calls
