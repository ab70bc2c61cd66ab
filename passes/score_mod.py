"""Score programs: the elementwise work between QKᵀ and softmax as a small expression IR.

A program is a tree over the raw score ``s = q·kᵀ`` (fp32), constants and *operands*
(tensors broadcastable to the score shape, e.g. a bias or a boolean mask). It is carried
through the custom op as a compact s-expression string, evaluated with PyTorch by the
reference and emitted as Triton code into the kernel's inner loop.

Text form::

    s                score            1.25, -inf      constant
    $0               operand 0        (mul a b)       binary op (see BINARY)
    (neg a)          unary op         (where c a b)   select
    q, k             query / key index of the score   Sq, Sk    sequence lengths

Index leaves make masks such as causal (``(where (le k q) (mul s 0.125) -inf)``) computable
from positions inside the kernel, with no mask tensor read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

BINARY: dict[str, tuple[Callable, str]] = {
    # name: (torch function, Triton format string)
    "add": (torch.add, "({a} + {b})"),
    "sub": (torch.sub, "({a} - {b})"),
    "mul": (torch.mul, "({a} * {b})"),
    "div": (torch.div, "({a} / {b})"),
    "le": (torch.le, "({a} <= {b})"),
    "lt": (torch.lt, "({a} < {b})"),
    "ge": (torch.ge, "({a} >= {b})"),
    "gt": (torch.gt, "({a} > {b})"),
    "eq": (torch.eq, "({a} == {b})"),
    "ne": (torch.ne, "({a} != {b})"),
    "and": (torch.logical_and, "({a} & {b})"),
    "or": (torch.logical_or, "({a} | {b})"),
}
UNARY: dict[str, tuple[Callable, str]] = {
    "neg": (torch.neg, "(-{a})"),
    "not": (torch.logical_not, "({a} == 0)"),
    "tanh": (torch.tanh, "(2.0 * tl.sigmoid(2.0 * {a}) - 1.0)"),
}
INDEX_NAMES = ("q", "k", "Sq", "Sk")


class Expr:
    """Base class of program nodes."""


@dataclass(frozen=True)
class Score(Expr):
    def __str__(self) -> str:
        return "s"


@dataclass(frozen=True)
class Const(Expr):
    value: float

    def __str__(self) -> str:
        return repr(float(self.value))


@dataclass(frozen=True)
class Operand(Expr):
    index: int

    def __str__(self) -> str:
        return f"${self.index}"


@dataclass(frozen=True)
class Index(Expr):
    """A position of the score element: query index ``q``, key index ``k``, or a length ``Sq``/``Sk``."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Unary(Expr):
    op: str
    a: Expr

    def __str__(self) -> str:
        return f"({self.op} {self.a})"


@dataclass(frozen=True)
class Binary(Expr):
    op: str
    a: Expr
    b: Expr

    def __str__(self) -> str:
        return f"({self.op} {self.a} {self.b})"


@dataclass(frozen=True)
class Where(Expr):
    cond: Expr
    a: Expr
    b: Expr

    def __str__(self) -> str:
        return f"(where {self.cond} {self.a} {self.b})"


SCORE = Score()


def parse(text: str) -> Expr:
    """Parse the text form back into an expression tree."""
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def atom(tok: str) -> Expr:
        if tok == "s":
            return SCORE
        if tok.startswith("$"):
            return Operand(int(tok[1:]))
        if tok in INDEX_NAMES:
            return Index(tok)
        return Const(float(tok))

    def read() -> Expr:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok != "(":
            return atom(tok)
        head = tokens[pos]
        pos += 1
        args = []
        while tokens[pos] != ")":
            args.append(read())
        pos += 1
        if head == "where":
            return Where(*args)
        if head in BINARY:
            return Binary(head, *args)
        if head in UNARY:
            return Unary(head, *args)
        raise ValueError(f"unknown operation {head!r} in score program {text!r}")

    try:
        expr = read()
    except (IndexError, TypeError) as e:
        raise ValueError(f"malformed score program {text!r}") from e
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in score program {text!r}")
    return expr


def operand_indices(expr: Expr) -> set[int]:
    """Indices of the operands an expression reads."""
    if isinstance(expr, Operand):
        return {expr.index}
    children = [getattr(expr, f) for f in ("a", "b", "cond") if hasattr(expr, f)]
    return set().union(*(operand_indices(c) for c in children)) if children else set()


def evaluate(expr: Expr, scores: torch.Tensor, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Evaluate with PyTorch; ``scores`` and float operands are used in their given dtype."""
    if isinstance(expr, Score):
        return scores
    if isinstance(expr, Const):
        return torch.tensor(expr.value, dtype=scores.dtype, device=scores.device)
    if isinstance(expr, Operand):
        t = operands[expr.index]
        return t if t.dtype == torch.bool else t.to(scores.dtype)
    if isinstance(expr, Index):
        return _index_tensor(expr.name, scores)
    if isinstance(expr, Unary):
        return UNARY[expr.op][0](evaluate(expr.a, scores, operands))
    if isinstance(expr, Binary):
        return BINARY[expr.op][0](evaluate(expr.a, scores, operands), evaluate(expr.b, scores, operands))
    if isinstance(expr, Where):
        cond = evaluate(expr.cond, scores, operands)
        return torch.where(cond, evaluate(expr.a, scores, operands), evaluate(expr.b, scores, operands))
    raise TypeError(f"not a score expression: {expr!r}")


def _index_tensor(name: str, scores: torch.Tensor) -> torch.Tensor:
    seq_q, seq_k = scores.shape[-2:]
    if name in ("Sq", "Sk"):
        return torch.tensor(seq_q if name == "Sq" else seq_k, device=scores.device)
    if name == "q":
        return torch.arange(seq_q, device=scores.device)[:, None]
    return torch.arange(seq_k, device=scores.device)[None, :]


TRITON_INDEX = {"q": "offs_m[:, None]", "k": "offs_n[None, :]", "Sq": "SEQ_Q", "Sk": "SEQ_K"}


def to_triton(expr: Expr, score: str = "s", operand: str = "t{}", index: dict[str, str] | None = None) -> str:
    """Emit a Triton expression; operand ``i`` is the already loaded tile named ``operand.format(i)``,
    index leaves are spelled as in ``index`` (default: the forward kernel's tile offsets)."""
    index = TRITON_INDEX if index is None else index
    if isinstance(expr, Index):
        return index[expr.name]
    if isinstance(expr, Score):
        return score
    if isinstance(expr, Const):
        v = float(expr.value)
        if math.isnan(v):
            return 'float("nan")'
        if math.isinf(v):
            return 'float("inf")' if v > 0 else '(-float("inf"))'
        return repr(v)
    if isinstance(expr, Operand):
        return operand.format(expr.index)
    if isinstance(expr, Unary):
        return UNARY[expr.op][1].format(a=to_triton(expr.a, score, operand, index))
    if isinstance(expr, Binary):
        return BINARY[expr.op][1].format(a=to_triton(expr.a, score, operand, index),
                                         b=to_triton(expr.b, score, operand, index))
    if isinstance(expr, Where):
        parts = (to_triton(e, score, operand, index) for e in (expr.cond, expr.a, expr.b))
        return "tl.where({}, {}, {})".format(*parts)
    raise TypeError(f"not a score expression: {expr!r}")


def scale_of(expr: Expr) -> float | None:
    """The constant factor applied directly to the raw score (``s·c`` or ``s/c``), 1.0 if none, for reports."""
    if isinstance(expr, Binary) and expr.op in ("mul", "div"):
        pair = (expr.a, expr.b) if isinstance(expr.a, Score) else (expr.b, expr.a)
        if isinstance(pair[0], Score) and isinstance(pair[1], Const):
            c = pair[1].value
            return c if expr.op == "mul" else (1.0 / c if expr.a is pair[0] else None)
    children = [getattr(expr, f) for f in ("a", "b", "cond") if hasattr(expr, f)]
    found = [f for f in (scale_of(c) for c in children) if f is not None and f != 1.0]
    return found[0] if found else 1.0


def factor_scale(expr: Expr) -> tuple[float, Expr] | None:
    """``(c, raw)`` with ``expr ≡ c·raw`` for a constant ``c > 0``, when ``raw`` is the raw score under
    ``-inf`` selects only (``s``, or ``(where cond raw -inf)`` with ``cond`` free of the score).

    Kernels then fold ``c·log2(e)`` into the exponent (one FMA per score), track row maxima on the
    raw scores, and never see a finite sentinel. None for any other program."""
    if isinstance(expr, Where):
        inner = factor_scale(expr.a)
        if inner is None or not _is_neg_inf(expr.b) or SCORE in leaves(expr.cond):
            return None
        return inner[0], Where(expr.cond, inner[1], expr.b)
    if expr == SCORE:
        return 1.0, SCORE
    if isinstance(expr, Binary) and expr.op in ("mul", "div") and SCORE in (expr.a, expr.b):
        other = expr.b if expr.a == SCORE else expr.a
        if not isinstance(other, Const) or (expr.op == "div" and expr.a != SCORE):
            return None
        c = other.value if expr.op == "mul" else 1.0 / other.value
        return (c, SCORE) if 0.0 < c < math.inf else None
    return None


def leaves(expr: Expr) -> set[Expr]:
    children = [getattr(expr, f) for f in ("cond", "a", "b") if hasattr(expr, f)]
    return set().union(*(leaves(c) for c in children)) if children else {expr}


SENTINEL_FILL = -1.0e30  # fills at or below this (finfo.min) hide a key from any row with a visible one


def key_limit(expr: Expr, finite_fill: bool = False) -> tuple[Expr, bool] | None:
    """``(bound, inclusive)`` when every key beyond ``bound`` (a function of ``q`` and lengths only)
    is masked to ``-inf`` by the outermost select: ``(where (... and (le k bound) ...) x -inf)``.
    Such keys contribute nothing, so a query block may stop at the bound of its last row.

    With ``finite_fill`` the masked value may also be a sentinel such as ``finfo.min`` (or
    ``x + finfo.min``): those keys contribute nothing to a row that sees any key, but a row that
    sees none averages over every key, which a caller that stops early must still do."""
    if not isinstance(expr, Where) or not (_is_neg_inf(expr.b) or (finite_fill and is_sentinel_fill(expr.b))):
        return None
    allowed = {Index("q"), Index("Sq"), Index("Sk")}
    for term in _conjuncts(expr.cond):
        if isinstance(term, Binary) and term.op in ("le", "lt") and term.a == Index("k"):
            bound_leaves = leaves(term.b)
            if all(isinstance(x, Const) or x in allowed for x in bound_leaves) and bound_leaves & allowed:
                return term.b, term.op == "le"
    return None


def _is_neg_inf(expr: Expr) -> bool:
    return isinstance(expr, Const) and expr.value == -math.inf


def is_sentinel_fill(expr: Expr) -> bool:
    """A finite masked value: a constant at or below :data:`SENTINEL_FILL`, or ``x +`` one."""
    if isinstance(expr, Binary) and expr.op == "add":
        expr = expr.b if isinstance(expr.b, Const) else expr.a
    return isinstance(expr, Const) and -math.inf < expr.value <= SENTINEL_FILL


def is_sentinel_fill_of(masked: Expr, kept: Expr) -> bool:
    """``masked`` is a sentinel constant, or ``kept +`` one: what a ``finfo.min`` mask puts where
    ``kept`` is hidden (any other ``x +`` sentinel is not the masked form of ``kept``)."""
    if isinstance(masked, Binary) and masked.op == "add" and kept not in (masked.a, masked.b):
        return False
    return is_sentinel_fill(masked)


def _conjuncts(expr: Expr) -> list[Expr]:
    if isinstance(expr, Binary) and expr.op == "and":
        return _conjuncts(expr.a) + _conjuncts(expr.b)
    return [expr]


def without_key_limit(expr: Expr, finite_fill: bool = False) -> Expr:
    """``expr`` as it reads for keys inside its :func:`key_limit`, where the bounding term is true:
    that term leaves the outer select's condition, and the select goes when nothing else is left."""
    limit = key_limit(expr, finite_fill)
    if limit is None:
        return expr
    bound, inclusive = limit
    term = Binary("le" if inclusive else "lt", Index("k"), bound)
    rest = [c for c in _conjuncts(expr.cond) if c != term]
    if not rest:
        return expr.a
    cond = rest[0]
    for c in rest[1:]:
        cond = Binary("and", cond, c)
    return Where(cond, expr.a, expr.b)


# f'(a) for each unary op f, as an expression of its argument a.
UNARY_DERIVATIVES: dict[str, Callable[[Expr], Expr]] = {
    "neg": lambda a: Const(-1.0),
    "tanh": lambda a: _sub(ONE, _mul(Unary("tanh", a), Unary("tanh", a))),
}
# Comparisons and logic are piecewise constant in the score: their derivative is 0.
PIECEWISE_CONSTANT = {"le", "lt", "ge", "gt", "eq", "ne", "and", "or", "not"}
ZERO, ONE = Const(0.0), Const(1.0)


def score_derivative(expr: Expr) -> Expr:
    """∂expr/∂s as an expression over the same leaves (constants folded), for the backward kernel.

    A select differentiates branch-wise. Raises ValueError for a unary op without a rule in
    :data:`UNARY_DERIVATIVES`.
    """
    if SCORE not in leaves(expr):
        return ZERO
    if isinstance(expr, Score):
        return ONE
    if isinstance(expr, Where):
        da, db = score_derivative(expr.a), score_derivative(expr.b)
        return da if da == db else Where(expr.cond, da, db)
    if isinstance(expr, Unary):
        if expr.op in PIECEWISE_CONSTANT:
            return ZERO
        if expr.op not in UNARY_DERIVATIVES:
            raise ValueError(f"score program {expr} has no derivative rule for {expr.op!r}")
        return _mul(UNARY_DERIVATIVES[expr.op](expr.a), score_derivative(expr.a))
    if isinstance(expr, Binary):
        if expr.op in PIECEWISE_CONSTANT:
            return ZERO
        a, b = expr.a, expr.b
        da, db = score_derivative(a), score_derivative(b)
        if expr.op == "add":
            return _add(da, db)
        if expr.op == "sub":
            return _sub(da, db)
        if expr.op == "mul":
            return _add(_mul(da, b), _mul(a, db))
        if expr.op == "div":
            if db == ZERO:
                return _div(da, b)
            return _div(_sub(_mul(da, b), _mul(a, db)), _mul(b, b))
        raise ValueError(f"score program {expr} has no derivative rule for {expr.op!r}")
    raise TypeError(f"not a score expression: {expr!r}")


def _add(a: Expr, b: Expr) -> Expr:
    if a == ZERO:
        return b
    if b == ZERO:
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value + b.value)
    return Binary("add", a, b)


def _sub(a: Expr, b: Expr) -> Expr:
    if b == ZERO:
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value - b.value)
    return Unary("neg", b) if a == ZERO else Binary("sub", a, b)


def _mul(a: Expr, b: Expr) -> Expr:
    if ZERO in (a, b):
        return ZERO
    if a == ONE:
        return b
    if b == ONE:
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value * b.value)
    return Binary("mul", a, b)


def _div(a: Expr, b: Expr) -> Expr:
    if a == ZERO or b == ONE:
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value / b.value)
    return Binary("div", a, b)
