"""Find attention regions: QKᵀ → score program → softmax → [casts, eval dropout] → ·V.

Every softmax in the graph is a candidate. :func:`match_softmax` either returns a
:class:`Match` that describes an exact replacement, or raises :class:`NearMiss` naming the
check that failed and the node where it failed. Matching never changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from attncompiler.spec import output_shape

from . import normalize as nz
from .score_mod import SCORE, UNARY, Binary, Const, Expr, Index, Operand, Unary, Where


class NearMiss(Exception):
    """A candidate that is not rewritten; the message says which check failed and where."""


@dataclass(frozen=True)
class Input:
    """A kernel input taken from the graph: ``node``, its dim 0 split by ``lead`` (if any), then
    ``permute`` (if any), then a last-two swap."""

    node: Node
    permute: tuple[int, ...] | None = None
    swap_last2: bool = False
    lead: nz.Unflatten | None = None

    def shape(self) -> tuple:
        shape = tuple(nz.tensor(self.node).shape)
        if self.lead is not None:
            shape = tuple(self.lead.shape) + shape[1:]
        if self.permute is not None:
            shape = tuple(shape[i] for i in self.permute)
        if self.swap_last2:
            shape = shape[:-2] + (shape[-1], shape[-2])
        return shape


@dataclass
class Match:
    softmax: Node
    qk: Node
    pv: Node
    q: Input
    k: Input
    v: Input
    program: Expr
    operands: list[Node]
    region: list[Node]  # every node the op replaces, in graph order, ``pv`` last
    out_permute: tuple[int, ...] | None = None
    out_flatten: int = 0  # leading dims of the kernel output merged back into one, as the region did
    operand_leads: dict[Node, nz.Unflatten] = field(default_factory=dict)  # operands given before a split
    zero_empty_rows: bool = False  # SDPA's rule: a query row with no visible key gives 0, not NaN
    notes: list[str] = field(default_factory=list)


def name(node: Node) -> str:
    return f"node {node.name}"


def find_softmaxes(graph: torch.fx.Graph) -> list[Node]:
    return [n for n in graph.nodes if nz.as_softmax(n) is not None]


def match_softmax(sm: Node) -> Match:
    """Match the attention region around softmax node ``sm`` or raise :class:`NearMiss`."""
    soft = nz.as_softmax(sm)
    scores = nz.tensor(soft.input)
    if scores is None or scores.dim() < 2:
        raise NearMiss(f"softmax input of {name(sm)} is not a matrix")
    if not isinstance(soft.dim, int) or soft.dim not in (-1, scores.dim() - 1):
        raise NearMiss(f"softmax over dim {soft.dim} at {name(sm)}, not the last dim")

    builder = _ScoreProgram(scores.shape)
    program = builder.build(soft.input, sm)
    q, k = (_with_lead(x, builder.lead) for x in _qk_inputs(builder.qk))
    post, pv, flattened = _probability_chain(sm)
    v, out_permute = _pv_inputs(pv, scores.dim() - 1 if flattened else scores.dim())
    if flattened:
        lead = builder.lead or _static_lead(scores.shape[:-2], pv)
        v = _with_lead(v, lead)  # a flattened product is a matmul: no output permute
    if tuple(scores.shape[:-2]) != tuple(output_shape(q.shape(), k.shape(), k.shape())[:-2]):
        raise NearMiss(f"score batch dims at {name(builder.qk)} are not those of q and k")
    region = [n for n in sm.graph.nodes if n in set(builder.nodes) | set(post) | {sm, pv}]
    return Match(sm, builder.qk, pv, q, k, v, program, builder.operands, region, out_permute,
                 out_flatten=scores.dim() - 2 if flattened else 0, operand_leads=builder.operand_leads)


def _with_lead(x: Input, lead: nz.Unflatten | None) -> Input:
    """``x`` with its dim 0 split as the scores' leading dims were (for ``[B·H, S, D]`` inputs)."""
    if lead is None:
        return x
    if x.permute is not None or nz.tensor(x.node).dim() != 3:
        raise NearMiss(f"{name(x.node)} is not a [N, S, D] input that the scores' view splits")
    return Input(x.node, None, x.swap_last2, lead)


def _static_lead(lead: tuple, at: Node) -> nz.Unflatten:
    if not all(isinstance(d, int) for d in lead):
        raise NearMiss(f"probabilities are flattened before {name(at)} with symbolic leading dims")
    return nz.Unflatten(tuple(lead), tuple(lead))


class _ScoreProgram:
    """Walks back from the softmax input to the QKᵀ product, translating each op into the IR."""

    def __init__(self, shape: torch.Size):
        self.shape = shape
        self.qk: Node | None = None
        self.nodes: list[Node] = []
        self.operands: list[Node] = []
        self.lead: nz.Unflatten | None = None  # set below a view that splits the scores' dim 0
        self.operand_leads: dict[Node, nz.Unflatten] = {}

    def _state(self) -> tuple:
        return self.qk, list(self.nodes), list(self.operands), self.lead, self.shape, dict(self.operand_leads)

    def _restore(self, state: tuple) -> None:
        self.qk, self.nodes, self.operands, self.lead, self.shape, self.operand_leads = state

    def build(self, node: Node, user: Node) -> Expr:
        others = [u for u in node.users if u is not user]
        if others:
            raise NearMiss(f"scores at {name(node)} also used by {name(others[0])}")
        t = nz.tensor(node)
        split = nz.as_unflatten_leading(node)
        if split is not None and self.lead is None and t is not None and tuple(t.shape) == tuple(self.shape):
            self.nodes.append(node)
            self.lead, self.shape = split[1], nz.tensor(split[0]).shape
            return self.build(split[0], node)
        if t is None or tuple(t.shape) != tuple(self.shape) or not t.is_floating_point():
            raise NearMiss(f"{name(node)} changes the shape or dtype kind of the scores")
        if nz.as_matmul(node) or nz.as_einsum(node):
            self.qk = node
            self.nodes.append(node)
            return SCORE
        fused = nz.as_baddbmm(node)
        if fused is not None:
            self.qk = node
            self.nodes.append(node)
            bias, _, _, beta, alpha = fused
            beta, alpha = nz.constant_scalar(beta), nz.constant_scalar(alpha)
            if beta is None or alpha is None:
                raise NearMiss(f"baddbmm at {name(node)} has a non-constant beta or alpha")
            score = SCORE if alpha == 1 else Binary("mul", SCORE, Const(alpha))
            if beta == 0:
                return score
            term = self._side(bias, node, False, self.shape, self.lead)
            return Binary("add", score, term if beta == 1 else Binary("mul", term, Const(beta)))
        inner = nz.as_cast(node)
        if inner is not None:
            self.nodes.append(node)
            return self.build(inner, node)
        ew = nz.as_elementwise(node)
        if ew is None:
            raise NearMiss(f"scores come from {name(node)} ({node.target}), not a matmul")
        return self._elementwise(node, ew)

    def _elementwise(self, node: Node, ew: nz.Elementwise) -> Expr:
        """Try each argument that could carry the scores; the others become constants or operands."""
        candidates = [i for i, a in enumerate(ew.args) if self._could_be_scores(a)]
        if ew.op == "masked_fill":
            candidates = [i for i in candidates if i == 0]
        if ew.op == "where":
            candidates = [i for i in candidates if i > 0]
        if not candidates:
            raise NearMiss(f"no argument of {name(node)} carries the scores")
        failure = None
        here = (self.shape, self.lead)  # the scores' space at this node, for the side operands
        for i in candidates:
            saved = self._state()
            try:
                score = self.build(ew.args[i], node)
            except NearMiss as e:
                failure = failure or e
                self._restore(saved)
                continue
            self.nodes.append(node)
            args = [score if j == i else self._side(a, node, self._is_condition(ew.op, j), *here)
                    for j, a in enumerate(ew.args)]
            return self._combine(ew.op, args)
        raise failure

    def _could_be_scores(self, arg) -> bool:
        t = nz.tensor(arg)
        return isinstance(arg, Node) and t is not None and t.is_floating_point() and tuple(t.shape) == tuple(self.shape)

    @staticmethod
    def _is_condition(op: str, index: int) -> bool:
        return (op == "masked_fill" and index == 1) or (op == "where" and index == 0)

    def _side(self, arg, at: Node, boolean: bool, shape: torch.Size, lead: nz.Unflatten | None) -> Expr:
        c = nz.constant_scalar(arg)
        if c is not None and not boolean:
            return Const(c)
        t = nz.tensor(arg)
        if t is None:
            raise NearMiss(f"{name(at)} combines the scores with {arg!r}, which is not a tensor or constant")
        if (t.dtype == torch.bool) != boolean:
            raise NearMiss(f"{name(at)} uses a {t.dtype} tensor where a {'boolean' if boolean else 'number'} is expected")
        try:
            fits = tuple(torch.broadcast_shapes(tuple(t.shape), tuple(shape))) == tuple(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise NearMiss(f"operand {arg} of {name(at)} does not broadcast to the score shape")
        if lead is not None and t.dim() == len(shape):
            if self.operand_leads.get(arg, lead) != lead:
                raise NearMiss(f"operand {arg} of {name(at)} is used on both sides of a view of the scores")
            self.operand_leads[arg] = lead
        if arg not in self.operands:
            self.operands.append(arg)
        return Operand(self.operands.index(arg))

    @staticmethod
    def _combine(op: str, args: list[Expr]) -> Expr:
        if op in UNARY:
            return Unary(op, args[0])
        if op == "masked_fill":
            return Where(args[1], args[2], args[0])
        if op == "where":
            return Where(*args)
        return Binary(op, *args)


def _qk_inputs(qk: Node) -> tuple[Input, Input]:
    fused = nz.as_baddbmm(qk)
    mm = nz.as_matmul(qk) or (fused[1:3] if fused is not None else None)
    if mm is not None:
        a, b = mm
        k = nz.as_transpose_last2(b)
        return Input(a), (Input(_unrepeated(k)) if k is not None else Input(b, swap_last2=True))
    equation, a, b = nz.as_einsum(qk)
    (sa, sb), out = _einsum_terms(equation, a, b, qk)
    d = set(sa) & set(sb) - set(out)
    batch, (lq, lk) = out[:-2], out[-2:]
    if len(d) != 1 or lq not in sa or lq in sb or lk not in sb or lk in sa:
        raise NearMiss(f"einsum {equation!r} at {name(qk)} is not a query-key product ending in (q, k)")
    (ld,) = d
    if set(sa) != set(batch) | {lq, ld} or set(sb) != set(batch) | {lk, ld}:
        raise NearMiss(f"einsum {equation!r} at {name(qk)} broadcasts a batch dim")
    return _permuted(a, sa, batch + lq + ld), _permuted(b, sb, batch + lk + ld)


def _probability_chain(sm: Node) -> tuple[list[Node], Node, bool]:
    """Casts, eval-mode dropout and a view merging the leading dims after the softmax, then the P·V
    product; also whether the view was there."""
    post: list[Node] = []
    cur = sm
    flattened = False
    while True:
        users = list(cur.users)
        if len(users) != 1:
            raise NearMiss(f"probabilities at {name(cur)} have {len(users)} users" +
                           (f", e.g. {name(users[1])}" if len(users) > 1 else ""))
        (user,) = users
        drop = nz.as_dropout(user)
        if nz.as_cast(user) is cur or (drop is not None and drop.input is cur and drop.is_identity):
            post.append(user)
            cur = user
            continue
        if not flattened and nz.as_flatten_leading(user) is cur:
            post.append(user)
            cur, flattened = user, True
            continue
        if drop is not None:
            raise NearMiss(f"dropout in training mode (p={drop.p}) at {name(user)}")
        mm = nz.as_matmul(user)
        if mm is not None and mm[0] is cur and mm[1] is not cur:
            return post, user, flattened
        es = nz.as_einsum(user)
        if es is not None and es[1] is cur and es[2] is not cur and not flattened:
            return post, user, flattened
        raise NearMiss(f"probabilities at {name(cur)} are used by {name(user)} ({user.target}), not a P·V product")


def _pv_inputs(pv: Node, rank: int) -> tuple[Input, tuple[int, ...] | None]:
    mm = nz.as_matmul(pv)
    if mm is not None:
        if nz.tensor(pv).dtype != nz.tensor(mm[1]).dtype:
            raise NearMiss(f"P·V at {name(pv)} changes dtype")
        return Input(_unrepeated(mm[1])), None
    equation, p, v = nz.as_einsum(pv)
    (sp, sv), out = _einsum_terms(equation, p, v, pv)
    batch, (lq, lk) = sp[:-2], sp[-2:]
    d = set(sv) - set(sp)
    if len(sp) != rank or len(d) != 1 or lk in out or lq in sv or set(sv) != set(batch) | {lk} | d:
        raise NearMiss(f"einsum {equation!r} at {name(pv)} is not a probability-value product")
    (ld,) = d
    canonical = batch + lq + ld
    if sorted(out) != sorted(canonical):
        raise NearMiss(f"einsum {equation!r} at {name(pv)} reduces or adds a dim")
    perm = tuple(canonical.index(c) for c in out)
    return _permuted(v, sv, batch + lk + ld), (None if perm == tuple(range(len(perm))) else perm)


def _einsum_terms(equation: str, a: Node, b: Node, at: Node) -> tuple[tuple[str, str], str]:
    """Operand and output subscripts with any ellipsis spelled out as fresh letters."""
    if "->" not in equation or equation.count(",") != 1:
        raise NearMiss(f"einsum {equation!r} at {name(at)} has no explicit output")
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    unused = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    ranks = [nz.tensor(a).dim(), nz.tensor(b).dim()]
    ell = ""
    for i, term in enumerate(terms):
        if "..." in term:
            n = ranks[i] - (len(term) - 3)
            ell = "".join(unused[:n]) if len(ell) < n else ell
            terms[i] = term.replace("...", ell[len(ell) - n:])
    out = out.replace("...", ell)
    if any(len(set(t)) != len(t) for t in (*terms, out)):
        raise NearMiss(f"einsum {equation!r} at {name(at)} repeats a subscript")
    return (terms[0], terms[1]), out


def _unrepeated(node: Node) -> Node:
    """The source of repeated key/value heads (the kernel indexes the shared head), else ``node``."""
    repeated = nz.as_repeated_heads(node)
    return repeated[0] if repeated is not None else node


def _permuted(node: Node, have: str, want: str) -> Input:
    perm = tuple(have.index(c) for c in want)
    return Input(node, None if perm == tuple(range(len(perm))) else perm)


def find_sdpa(graph: torch.fx.Graph) -> list[Node]:
    return [n for n in graph.nodes if nz.as_sdpa(n) is not None]


def match_sdpa(node: Node) -> Match:
    """An existing ``scaled_dot_product_attention`` call as a Match (its region is the call itself)."""
    call = nz.as_sdpa(node)
    if call.dropout_p not in (0, 0.0):
        raise NearMiss(f"scaled_dot_product_attention at {name(node)} uses dropout_p={call.dropout_p}")
    if call.is_causal not in (True, False) or call.enable_gqa not in (True, False):
        raise NearMiss(f"scaled_dot_product_attention at {name(node)} has a non-constant is_causal/enable_gqa")
    q, k = nz.tensor(call.query), nz.tensor(call.key)
    if q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3] != 1 and not call.enable_gqa:
        raise NearMiss(f"scaled_dot_product_attention at {name(node)} has {q.shape[-3]} query and "
                       f"{k.shape[-3]} key heads without enable_gqa")
    if call.scale is None:
        scale = 1.0 / float(q.shape[-1]) ** 0.5
    else:
        scale = nz.constant_scalar(call.scale)
        if scale is None:
            raise NearMiss(f"scaled_dot_product_attention at {name(node)} has a non-constant scale")
    program: Expr = Binary("mul", SCORE, Const(scale))
    operands: list[Node] = []
    if call.is_causal:  # top-left aligned, as torch defines it: key k is visible to query q when k <= q
        program = Where(Binary("le", Index("k"), Index("q")), program, Const(float("-inf")))
    if call.attn_mask is not None:
        mask = nz.tensor(call.attn_mask)
        if mask is None:
            raise NearMiss(f"attn_mask of {name(node)} is not a tensor")
        operands = [call.attn_mask]
        if mask.dtype == torch.bool:
            program = Where(Operand(0), program, Const(float("-inf")))
        else:
            program = Binary("add", program, Operand(0))
    return Match(node, node, node, Input(call.query), Input(call.key), Input(call.value), program, operands,
                 [node], zero_empty_rows=True)
