"""Replace matched regions with one ``attncompiler::attention`` call each.

With option ``saa`` set, a site whose score program SAA computes (a scale, optionally causal), with
no mask or bias operand and no input requiring grad, gets one ``attncompiler::saa_attention`` call
instead (approximate, behind its error gate); the report says why any other site stays dense.

Graph surgery happens on a copy of the graph; the copy replaces the original only when it
lints. Each site is handled inside its own guard: any failure removes what was inserted for
that site, leaves the region as it was and records the reason.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from attncompiler.options import Options
from attncompiler.spec import group_of, output_shape
from attncompiler.report import Site

from . import normalize as nz
from .masks import understand_masks
from .match import Input, Match, NearMiss, find_sdpa, find_softmaxes, match_sdpa, match_softmax
from .score_mod import scale_of

log = logging.getLogger("attncompiler")

def candidate_sites(graph: Graph) -> list[Node]:
    """Every softmax and every SDPA call, in graph order."""
    found = set(find_softmaxes(graph)) | set(find_sdpa(graph))
    return [n for n in graph.nodes if n in found]


def rewrite_attention(gm: GraphModule, options: Options, graph_index: int) -> list[Site]:
    """Rewrite every matched site of ``gm`` in place; return one :class:`Site` per candidate."""
    from attncompiler.ops import resolve_kernel  # also registers the op

    work = _working_copy(gm)
    sites = []
    for node in candidate_sites(work):
        site = Site(graph=graph_index, node=node.name, rewritten=False)
        sites.append(site)
        try:
            match = match_sdpa(node) if nz.as_sdpa(node) else match_softmax(node)
            _understand_masks(match)
            site.summary = summarize(match)
            if not options.rewrite:
                raise NearMiss("rewriting is disabled (option rewrite=False)")
            q = nz.tensor(match.q.node)
            kernel = resolve_kernel(options.kernel, q.device, q.dtype)
            prepared = _prepare_kernel(kernel, str(match.program), q.device)  # also the SAA gate's dense fallback
            saa = None
            if options.saa is not None:
                site.saa_reason = saa_blocker(match)
                if site.saa_reason is None:
                    saa = (options.saa.to_json(), f"graph{graph_index}:{node.name}")
            _replace(work, match, kernel, saa)
            site.kernel, site.source = prepared
            if saa is not None:
                site.kernel, site.saa_site = f"saa:{kernel}", saa[1]
            site.rewritten = True
        except NearMiss as e:
            site.reason = str(e)
        except Exception as e:  # never fail the user's model: leave the site as it was
            site.reason = f"{type(e).__name__} while rewriting: {e}"
            site.kernel = None
            log.warning("attncompiler: site %s left as it was: %s", node.name, site.reason)
    if any(s.rewritten for s in sites):
        work.lint()
        gm.graph = work
        gm.recompile()
    return sites


def _understand_masks(match: Match) -> None:
    """Compute the masks that positions determine inside the kernel instead of loading them."""
    q, k = match.q.shape(), match.k.shape()
    scores = (*output_shape(q, k, k)[:-1], k[-2])
    match.program, match.operands, understood = understand_masks(
        match.program, match.operands, scores, keep=set(match.operand_leads))
    match.notes.extend(understood)


def _working_copy(gm: GraphModule) -> Graph:
    """A copy of ``gm.graph`` whose placeholders keep the ``_dynamo_source`` that AOTAutograd reads."""
    work = Graph(owning_module=gm)
    copies: dict[Node, Node] = {}
    work.output(work.graph_copy(gm.graph, copies))
    for node, copy in copies.items():
        if hasattr(node, "_dynamo_source"):
            copy._dynamo_source = node._dynamo_source
    return work


def _prepare_kernel(kernel: str, program: str, device: torch.device) -> tuple[str, str | None]:
    """Generate (and load) the Triton kernel now, so codegen errors surface at compile time: the
    form that runs by default on ``device`` (the TMA form on Hopper and later, where the tensors'
    layout allows it at run time; the pointer form otherwise)."""
    if kernel != "triton":
        return "reference", None
    from attncompiler.codegen.common import kernel_dir
    from attncompiler.codegen.flash import load_kernel, tma_supported

    name, _ = load_kernel(program)
    if tma_supported(device):
        name, _ = load_kernel(program, tma=True)
    return f"triton:{name}", str(kernel_dir() / f"{name}.py")


def saa_blocker(match: Match) -> str | None:
    """Why SAA may not stand in for this site's attention, or None when it may."""
    from attncompiler.saa import saa_applicable

    if match.operands:
        return (f"the score program reads {len(match.operands)} mask/bias tensor(s) (e.g. padding), which "
                "SAA's routing and centroids do not apply")
    program = str(match.program)
    if not saa_applicable(program):
        return f"score program {program} is not a scale or a causal scale"
    if any(t is not None and t.requires_grad for t in (nz.tensor(x.node) for x in (match.q, match.k, match.v))):
        return "q, k or v requires grad and SAA has no backward (compile under torch.no_grad() to use SAA)"
    return None


def _replace(graph: Graph, match: Match, kernel: str, saa: tuple[str, str] | None = None) -> None:
    """Put the op in place of the region; ``saa``: ``(operating point JSON, site id)`` for the SAA op."""
    inserted: list[Node] = []

    def add(op: str, target: Any, args: tuple) -> Node:
        with graph.inserting_before(match.pv):
            node = graph.create_node(op, target, args)
        inserted.append(node)
        _set_example_value(node)
        return node

    try:
        q, k, v = (_materialize(x, add) for x in (match.q, match.k, match.v))
        operands = [_materialize_operand(t, match.operand_leads.get(t), add) for t in match.operands]
        if saa is None:
            attention = add("call_function", torch.ops.attncompiler.attention.default,
                            (q, k, v, operands, str(match.program), kernel, match.zero_empty_rows))
            out = add("call_function", operator.getitem, (attention, 0))  # (out, lse): lse serves the backward
        else:
            from attncompiler import saa_ops  # noqa: F401  (registers attncompiler::saa_attention)

            out = add("call_function", torch.ops.attncompiler.saa_attention.default,
                      (q, k, v, str(match.program), *saa, kernel, match.zero_empty_rows))
        if match.out_permute is not None:
            out = add("call_method", "permute", (out, *match.out_permute))
        if match.out_flatten:
            out = add("call_method", "flatten", (out, 0, match.out_flatten - 1))
        expected, got = nz.tensor(match.pv), nz.tensor(out)
        if expected is not None and got is not None and (expected.shape != got.shape or expected.dtype != got.dtype):
            raise NearMiss(f"replacement would give {got.dtype}{list(got.shape)}, "
                           f"the region gives {expected.dtype}{list(expected.shape)}")
    except BaseException:
        for node in reversed(inserted):
            graph.erase_node(node)
        raise
    match.pv.replace_all_uses_with(out)
    inputs = {a for n in match.region for a in n.all_input_nodes} - set(match.region)
    for node in reversed(match.region):
        graph.erase_node(node)
    _erase_dead(graph, inputs)


def _erase_dead(graph: Graph, candidates: set[Node]) -> None:
    """Erase pure nodes left without users (e.g. a transpose of K, repeated K/V heads), transitively."""
    while candidates:
        node = candidates.pop()
        if node.users or node.op not in ("call_method", "call_function") or node.is_impure():
            continue
        candidates |= set(node.all_input_nodes)
        graph.erase_node(node)


def _materialize(x: Input, add) -> Node:
    node = x.node
    if x.lead is not None:
        node = add("call_method", "unflatten", (node, 0, x.lead.args))
    if x.permute is not None:
        node = add("call_method", "permute", (node, *x.permute))
    if x.swap_last2:
        node = add("call_method", "transpose", (node, -2, -1))
    return node


def _materialize_operand(node: Node, lead: nz.Unflatten | None, add) -> Node:
    """An operand given in the flattened ``[N, m, n]`` space, viewed in the split ``[*lead, m, n]`` one."""
    if lead is None:
        return node
    broadcast = nz.tensor(node).shape[0] == 1
    return add("call_method", "unflatten", (node, 0, (1,) * len(lead.args) if broadcast else lead.args))


def _set_example_value(node: Node) -> None:
    """Propagate fake values to an inserted node, so later sites and passes see its shape."""
    args = torch.fx.node.map_arg(node.args, nz.value)
    fake = next((a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None)
    mode = getattr(fake, "fake_mode", None)
    if mode is None:
        return
    with mode:
        if node.op == "call_method":
            node.meta["example_value"] = getattr(args[0], node.target)(*args[1:])
        else:
            node.meta["example_value"] = node.target(*args)


def summarize(match: Match) -> dict:
    """A readable account of what was matched: shapes, dtype, scale, mask/bias operands, program."""
    def shape(x: Input) -> str:
        return "[" + ", ".join(str(d) for d in x.shape()) + "]"

    operands = []
    for node in match.operands:
        t = nz.tensor(node)
        kind = "bool mask" if t.dtype == torch.bool else "bias" if t.is_floating_point() else "index tensor"
        operands.append(f"{kind} {str(t.dtype).replace('torch.', '')}[{', '.join(str(d) for d in t.shape)}]")
    scale = scale_of(match.program)
    return {
        "q": shape(match.q), "k": shape(match.k), "v": shape(match.v),
        "group": group_of(match.q.shape(), match.k.shape(), match.v.shape()),
        "dtype": str(nz.tensor(match.q.node).dtype).replace("torch.", ""),
        "scale": "-" if scale is None else f"{scale:.6g}",
        "mask": "; ".join(operands + [f"computed: {n}" for n in match.notes]) or "none",
        "program": str(match.program),
    }
