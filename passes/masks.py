"""Masks understood from the graph: the subgraph that builds a mask, as a predicate on positions.

Models build attention masks from ``arange`` positions, comparisons, ``&``/``|``/``~``, index
placement (``x[None, :, None]``, ``unsqueeze``), ``expand``, ``where``/``masked_fill`` with
constant fills, and per-batch padding gathered from the user's ``attention_mask``. Hugging Face
models without an ``attention_mask`` gather position ids with index tensors
(``positions[batch_idx, q_idx]``) and compare packed-sequence ids made with ``diff`` and
``cumsum``: those are read too, when the positions are an ``arange``. This module
evaluates such a subgraph symbolically with sympy: axis positions become the symbols ``q`` (the
score's second-to-last dim) and ``k`` (its last dim), and any small tensor it cannot see through
(one that is not ``Sq × Sk``, such as padding ``[B, 1, 1, Sk]``) becomes an opaque atom. When the
result depends only on ``q``, ``k``, the sequence lengths and atoms, the mask operand of the score
program is replaced by that expression: the kernel computes the mask from indices and loads only
the atoms, and a causal or windowed bound lets it skip whole key blocks.

Anything else leaves the operand as it was (loaded per tile): a mask the analysis cannot read is
still exact.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import sympy
import torch
from torch.fx import Node

from . import normalize as nz
from .score_mod import SCORE, Binary, Const, Expr, Index, Operand, Unary, Where, leaves

K = sympy.Symbol("k", integer=True, nonnegative=True)   # index along the score's last dim
Q = sympy.Symbol("q", integer=True, nonnegative=True)   # index along the score's second-to-last dim
SQ = sympy.Symbol("Sq", integer=True, positive=True)
SK = sympy.Symbol("Sk", integer=True, positive=True)


def _axis(j: int) -> sympy.Symbol:
    """The index symbol of the ``j``-th dim from the right."""
    return (K, Q)[j] if j < 2 else sympy.Symbol(f"axis{j}", integer=True, nonnegative=True)


class Unreadable(Exception):
    """The subgraph uses something the analysis does not model."""


@dataclass(frozen=True)
class Value:
    """A tensor as a function of its positions: ``expr`` over the axis symbols, and its rank."""

    expr: sympy.Basic
    rank: int


@dataclass(frozen=True)
class Understood:
    """The analysed mask: an expression in the score-program IR and the atoms it loads."""

    expr: Expr
    atoms: list[Node]
    kinds: list[str]


COMPARE = {
    "le": ((operator.le, torch.le, torch.Tensor.le), ("le", "__le__"), sympy.Le),
    "lt": ((operator.lt, torch.lt, torch.Tensor.lt), ("lt", "__lt__"), sympy.Lt),
    "ge": ((operator.ge, torch.ge, torch.Tensor.ge), ("ge", "__ge__"), sympy.Ge),
    "gt": ((operator.gt, torch.gt, torch.Tensor.gt), ("gt", "__gt__"), sympy.Gt),
    "eq": ((operator.eq, torch.eq, torch.Tensor.eq), ("eq", "__eq__"), sympy.Eq),
    "ne": ((operator.ne, torch.ne, torch.Tensor.ne), ("ne", "__ne__"), sympy.Ne),
}
LOGIC = {
    "and": ((operator.and_, torch.logical_and, torch.bitwise_and), ("__and__", "logical_and", "bitwise_and"),
            sympy.And),
    "or": ((operator.or_, torch.logical_or, torch.bitwise_or), ("__or__", "logical_or", "bitwise_or"), sympy.Or),
}


def _out_of_place(op: str) -> tuple[tuple, tuple]:
    """:data:`normalize.ELEMENTWISE`'s spellings of ``op`` without the in-place ones: a mask built by
    mutation is not a pure function of its inputs, so it stays a tensor."""
    functions, methods = nz.ELEMENTWISE[op]
    in_place = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
    return tuple(f for f in functions if f not in in_place), tuple(m for m in methods if not m.endswith("_"))


ARITH = {
    "add": (*_out_of_place("add"), lambda a, b: a + b),
    "sub": (*_out_of_place("sub"), lambda a, b: a - b),
    "mul": (*_out_of_place("mul"), lambda a, b: a * b),
}
NEG = _out_of_place("neg")
MASKED_FILL = _out_of_place("masked_fill")
WHERE = _out_of_place("where")
NOT = ((operator.invert, torch.logical_not, torch.bitwise_not), ("__invert__", "logical_not", "bitwise_not"))
SAME_VALUE = ((), ("contiguous", "clone"))
EXPANDS = ((torch.broadcast_to,), ("expand", "expand_as", "broadcast_to"))


class MaskAnalysis:
    """Symbolic evaluation of one mask subgraph, for scores of shape ``score_shape``."""

    def __init__(self, score_shape: torch.Size):
        self.score_shape = score_shape
        self.atoms: dict[sympy.Symbol, Node] = {}
        self._memo: dict[Node, Value] = {}

    def understand(self, node: Node, negate: bool = False) -> Understood | None:
        """``node``'s value (or its negation) as a predicate/fill expression, or None when it cannot be read."""
        try:
            value = self.value(node)
            if negate:
                value = Value(sympy.Not(_as_bool(value.expr)), value.rank)
        except Unreadable:
            return None
        extra = value.expr.free_symbols - {K, Q, SQ, SK} - set(self.atoms)
        if extra or self.atoms.get(value.expr) is node or value.expr in (sympy.true, sympy.false):
            return None
        symbols = sorted(set(self.atoms) & value.expr.free_symbols, key=lambda s: s.name)  # the atoms it uses
        try:
            expr = to_ir(value.expr, {s: i for i, s in enumerate(symbols)})
        except Unreadable:
            return None
        return Understood(expr, [self.atoms[s] for s in symbols], classify(value.expr, symbols))

    def value(self, node) -> Value:
        if not isinstance(node, Node):
            return Value(self._number(node), 0)
        if node not in self._memo:
            try:
                self._memo[node] = self._evaluate(node)
            except Unreadable:
                self._memo[node] = self._atom(node)
        return self._memo[node]

    # --- node handlers ---------------------------------------------------------------

    def _evaluate(self, node: Node) -> Value:
        t = nz.tensor(node)
        if t is None:
            raise Unreadable(node.name)
        c = nz.constant_scalar(node)
        if c is not None:
            return Value(sympy.Float(c) if not float(c).is_integer() else sympy.Integer(int(c)), 0)
        if node.op == "call_function" and node.target is torch.arange:
            return self._arange(node)
        if _is_constant_fill(node):
            return Value(_fill_value(node), t.dim())
        if nz._is(node, *SAME_VALUE):
            return self.value(node.args[0])
        if nz._is(node, (torch.Tensor.to,), ("to", "type", "bool", "float", "half", "bfloat16", "long", "int")):
            return self._cast(node)
        if nz._is(node, (torch.tril, torch.triu), ("tril", "triu")):
            return self._triangle(node)
        if nz._is(node, *EXPANDS):
            return Value(self.value(node.args[0]).expr, t.dim())
        if nz._is(node, (torch.unsqueeze,), ("unsqueeze",)):
            x = self.value(node.args[0])
            return _unsqueeze(x, nz._dim(nz._arg(node, 1, "dim"), x.rank + 1))
        if node.op == "call_function" and node.target is operator.getitem:
            return self._getitem(node)
        if nz._is(node, (torch.diff,), ("diff",)):
            return self._diff(node)
        if nz._is(node, (torch.cumsum,), ("cumsum",)):
            return self._cumsum(node)
        if nz._is(node, *NEG):
            return Value(-self.value(node.args[0]).expr, t.dim())
        if nz._is(node, *NOT):
            return Value(sympy.Not(self._boolean(node.args[0])), t.dim())
        for table in (COMPARE, LOGIC, ARITH):
            for functions, methods, build in table.values():
                if nz._is(node, functions, methods):
                    a, b = (self.value(x) for x in node.args[:2])
                    if node.kwargs:
                        raise Unreadable(node.name)
                    if table is LOGIC:
                        return Value(build(_as_bool(a.expr), _as_bool(b.expr)), t.dim())
                    return Value(build(a.expr, b.expr), t.dim())
        if nz._is(node, *WHERE) and len(node.args) == 3:
            cond, a, b = self._boolean(node.args[0]), self.value(node.args[1]), self.value(node.args[2])
            return Value(sympy.Piecewise((a.expr, cond), (b.expr, True)), t.dim())
        if nz._is(node, *MASKED_FILL):
            x, cond = self.value(node.args[0]), self._boolean(node.args[1])
            fill = self.value(nz._arg(node, 2, "value"))
            return Value(sympy.Piecewise((fill.expr, cond), (x.expr, True)), t.dim())
        raise Unreadable(node.name)

    def _arange(self, node: Node) -> Value:
        args = list(node.args)
        if len(args) == 1:
            start, step = 0, 1
        else:
            start, step = args[0], args[2] if len(args) > 2 else node.kwargs.get("step", 1)
        if step != 1 or node.kwargs.get("dtype", torch.int64) in (torch.float32, torch.float16, torch.bfloat16):
            raise Unreadable(node.name)
        return Value(_axis(0) + self._number(start), 1)

    def _cast(self, node: Node) -> Value:
        """Device moves keep the value; casts to bool test for non-zero, from bool give 0/1."""
        before, after = nz.tensor(node.args[0]), nz.tensor(node)
        x = self.value(node.args[0])
        if before.dtype == after.dtype:
            return x
        if after.dtype == torch.bool:
            return Value(_as_bool(x.expr) if before.dtype == torch.bool else sympy.Ne(x.expr, 0), x.rank)
        if before.dtype == torch.bool:
            return Value(sympy.Piecewise((sympy.Integer(1), _as_bool(x.expr)), (sympy.Integer(0), True)), x.rank)
        if not after.is_floating_point() and before.is_floating_point():
            raise Unreadable(node.name)  # truncation
        return x

    def _triangle(self, node: Node) -> Value:
        """``tril``/``triu``: the value where ``k - q`` is at most/at least the diagonal, else 0."""
        x = self.value(node.args[0])
        diagonal = self._number(nz._arg(node, 1, "diagonal", 0))
        lower = node.target in (torch.tril, "tril")
        keep = sympy.Le(K, Q + diagonal) if lower else sympy.Ge(K, Q + diagonal)
        if nz.tensor(node).dtype == torch.bool:
            return Value(sympy.And(_as_bool(x.expr), keep), x.rank)
        return Value(sympy.Piecewise((x.expr, keep), (sympy.Integer(0), True)), x.rank)

    def _getitem(self, node: Node) -> Value:
        x_node, index = node.args
        x = self.value(x_node)
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, Node) for i in index):
            return self._gather(node, x, index)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = x.rank - sum(1 for i in index if i is not None and i is not Ellipsis)
            index = index[:at] + (slice(None),) * fill + index[at + 1:]
        if sum(1 for i in index if i is not None) != x.rank:
            index = index + (slice(None),) * (x.rank - sum(1 for i in index if i is not None))
        value, position = x, 0
        for i in index:
            if i is None:
                value = _unsqueeze(value, position)
            elif isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1):
                pass  # keeps positions: index j is still j
            else:
                raise Unreadable(node.name)
            position += 1
        return value

    def _gather(self, node: Node, x: Value, index: tuple) -> Value:
        """``x[i0, i1, ...]`` with one integer index tensor per dim: ``x``'s expression at the indices.

        Only for a known ``x`` (no atoms) and indices provably non-negative (no wrap-around);
        anything else is an atom if small."""
        if len(index) != x.rank or x.expr.free_symbols & set(self.atoms):
            raise Unreadable(node.name)
        at = {}
        for d, i in enumerate(index):
            t = nz.tensor(i)
            if t is None or t.dtype in (torch.bool, torch.uint8) or t.is_floating_point():
                raise Unreadable(node.name)
            position = self.value(i).expr
            if position.free_symbols & set(self.atoms) or not position.is_nonnegative:
                raise Unreadable(node.name)
            at[_axis(x.rank - 1 - d)] = position
        return Value(x.expr.xreplace(at), nz.tensor(node).dim())

    def _diff(self, node: Node) -> Value:
        """``diff(x, dim=d, prepend=p)`` (first differences; ``p`` one element long along ``d``, or none)."""
        x = self.value(node.args[0])
        n, dim = nz._arg(node, 1, "n", 1), nz._dim(nz._arg(node, 2, "dim", -1), x.rank)
        prepend, append = nz._arg(node, 3, "prepend"), nz._arg(node, 4, "append")
        if n != 1 or append is not None:
            raise Unreadable(node.name)
        axis = _axis(x.rank - 1 - dim)
        if prepend is None:
            return Value(sympy.expand(x.expr.subs(axis, axis + 1) - x.expr), x.rank)
        p = nz.tensor(prepend)
        if p is None or p.dim() != x.rank or p.shape[dim] != 1:
            raise Unreadable(node.name)
        inner = sympy.expand(x.expr - x.expr.subs(axis, axis - 1))
        first = sympy.expand(x.expr.subs(axis, 0) - self.value(prepend).expr.subs(axis, 0))
        if sympy.simplify(inner.subs(axis, 0) - first) == 0:
            return Value(inner, x.rank)  # one formula for every position
        return Value(sympy.Piecewise((inner, sympy.Ge(axis, 1)), (first, True)), x.rank)

    def _cumsum(self, node: Node) -> Value:
        """``cumsum`` along a dim the value does not vary on: the value times the position + 1."""
        x = self.value(node.args[0])
        axis = _axis(x.rank - 1 - nz._dim(nz._arg(node, 1, "dim"), x.rank))
        if axis in x.expr.free_symbols or x.expr.free_symbols & set(self.atoms):
            raise Unreadable(node.name)
        expr = _as_bool(x.expr)
        if expr == sympy.false:
            return Value(sympy.Integer(0), x.rank)
        if expr == sympy.true:
            return Value(axis + 1, x.rank)
        if isinstance(expr, sympy.logic.boolalg.Boolean):
            expr = sympy.Piecewise((sympy.Integer(1), expr), (sympy.Integer(0), True))
        return Value(expr * (axis + 1), x.rank)

    def _atom(self, node: Node) -> Value:
        """A tensor read as is: allowed when loading it per tile is cheap (not ``Sq × Sk``)."""
        t = nz.tensor(node)
        if t is None or t.dim() > len(self.score_shape) or (t.dim() >= 2 and t.shape[-1] != 1 and t.shape[-2] != 1):
            raise Unreadable(node.name)
        try:
            torch.broadcast_shapes(tuple(t.shape), tuple(self.score_shape))
        except RuntimeError:
            raise Unreadable(node.name) from None
        symbol = next((s for s, n in self.atoms.items() if n is node), None)
        if symbol is None:
            symbol = sympy.Symbol(f"atom{len(self.atoms)}")
            self.atoms[symbol] = node
        return Value(symbol, t.dim())

    def _boolean(self, arg) -> sympy.Basic:
        return _as_bool(self.value(arg).expr)

    def _number(self, x) -> sympy.Basic:
        """A Python number, or a SymInt written in the score's lengths ``Sq`` and ``Sk``."""
        if isinstance(x, bool):
            return sympy.true if x else sympy.false
        if isinstance(x, int):
            return sympy.Integer(x)
        if isinstance(x, float):
            return sympy.Float(x)
        v = nz.value(x)
        if isinstance(v, torch.SymInt):
            return self._length_expression(v)
        if isinstance(v, int):
            return sympy.Integer(v)
        raise Unreadable(str(x))

    def _length_expression(self, v: torch.SymInt) -> sympy.Basic:
        """``v`` as ``c``, ``Sk - Sq + c``, ``Sq + c`` or ``Sk + c`` (proved with the shape symbols)."""
        sq, sk = (d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d) for d in self.score_shape[-2:])
        target = v.node.expr
        for form, concrete in ((sympy.Integer(0), sympy.Integer(0)), (SK - SQ, sk - sq), (SQ, sq), (SK, sk)):
            rest = sympy.simplify(target - concrete)
            if rest.is_Integer:
                return form + rest
        raise Unreadable(f"length {target}")


def _as_bool(expr: sympy.Basic) -> sympy.Basic:
    if expr in (sympy.Integer(1), sympy.true):
        return sympy.true
    if expr in (sympy.Integer(0), sympy.false):
        return sympy.false
    return expr


def _unsqueeze(x: Value, dim: int) -> Value:
    """Insert a size-1 dim at position ``dim`` of the new rank: axes at or left of it move one left."""
    new = x.rank + 1
    at = new - 1 - dim  # its position from the right
    moved = {_axis(j): _axis(j + 1) for j in range(at, x.rank)}
    return Value(x.expr.xreplace(moved), new)


FILLS = {torch.zeros: 0, torch.ones: 1, "new_zeros": 0, "new_ones": 1}


def _is_constant_fill(node: Node) -> bool:
    if node.target in FILLS and node.op in ("call_function", "call_method"):
        return True
    full = (node.op == "call_function" and node.target is torch.full) or (node.op == "call_method" and node.target == "new_full")
    return full and isinstance(node.args[-1], (int, float, bool))


def _fill_value(node: Node) -> sympy.Basic:
    if node.target in FILLS:
        value = FILLS[node.target]
        if nz.tensor(node).dtype == torch.bool:
            return sympy.true if value else sympy.false
        return sympy.Integer(value)
    fill = node.args[-1]
    if isinstance(fill, bool):
        return sympy.true if fill else sympy.false
    return sympy.Float(fill) if isinstance(fill, float) and not fill.is_integer() else sympy.Integer(int(fill))


# --- to the score-program IR ----------------------------------------------------------

_RELATIONS = {relation: op for op, (_, _, relation) in COMPARE.items()}


def to_ir(expr: sympy.Basic, atoms: dict[sympy.Symbol, int]) -> Expr:
    """The IR form of a sympy mask expression; atoms become operands numbered by ``atoms``."""
    if expr in atoms:
        return Operand(atoms[expr])
    if expr == K or expr == Q:
        return Index(expr.name)
    if expr == SQ or expr == SK:
        return Index(expr.name)
    if expr.is_Number:
        return Const(float(expr))
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        op = "add" if isinstance(expr, sympy.Add) else "mul"
        terms = [to_ir(a, atoms) for a in sorted(expr.args, key=lambda a: a.is_Number)]
        out = terms[0]
        for term in terms[1:]:
            out = Binary(op, out, term)
        return out
    for relation, op in _RELATIONS.items():
        if isinstance(expr, relation):
            lhs, rhs, op = _key_on_the_left(expr.lhs, expr.rhs, op)
            return Binary(op, to_ir(lhs, atoms), to_ir(rhs, atoms))
    if isinstance(expr, (sympy.And, sympy.Or)):
        op = "and" if isinstance(expr, sympy.And) else "or"
        terms = [to_ir(a, atoms) for a in sorted(expr.args, key=str)]
        out = terms[0]
        for term in terms[1:]:
            out = Binary(op, out, term)
        return out
    if isinstance(expr, sympy.Not):
        return Unary("not", to_ir(expr.args[0], atoms))
    if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2 and expr.args[1].cond == sympy.true:
        (a, cond), (b, _) = expr.args
        return Where(to_ir(cond, atoms), to_ir(a, atoms), to_ir(b, atoms))
    raise Unreadable(str(expr))


_FLIPPED = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt", "eq": "eq", "ne": "ne"}


def _key_on_the_left(lhs: sympy.Basic, rhs: sympy.Basic, op: str) -> tuple[sympy.Basic, sympy.Basic, str]:
    """``lhs op rhs`` rewritten as ``k op' bound`` when it is linear in ``k`` with unit coefficient
    (the form whose bound lets the kernel stop early), else unchanged."""
    diff = sympy.expand(lhs - rhs)
    c = diff.coeff(K)
    if c not in (1, -1) or K in (diff - c * K).free_symbols:
        return lhs, rhs, op
    bound = sympy.expand(-(diff - c * K) / c)
    return K, bound, op if c == 1 else _FLIPPED[op]


def classify(expr: sympy.Basic, atoms: list[sympy.Symbol]) -> list[str]:
    """Names for what a mask keeps, for reports: causal (with offset), sliding window, padding."""
    if not expr.free_symbols:
        return [f"constant {expr}"]
    cond = expr.args[0].cond if isinstance(expr, sympy.Piecewise) else expr
    terms = cond.args if isinstance(cond, sympy.And) else (cond,)
    kinds = []
    for term in terms:
        relation = next((op for r, op in _RELATIONS.items() if isinstance(term, r)), None)
        if term in atoms or (relation and term.free_symbols & set(atoms)):
            kinds.append("padding" if term in atoms else f"tensor predicate ({term})")
            continue
        if relation is None:
            kinds.append(f"predicate ({term})")
            continue
        lhs, bound, op = _key_on_the_left(term.lhs, term.rhs, relation)
        offset = sympy.expand(bound - Q)
        if lhs != K or Q in offset.free_symbols or K in offset.free_symbols:
            kinds.append(f"predicate ({term})")
        elif op in ("le", "lt"):
            kinds.append("causal" if (op, offset) == ("le", 0) else f"causal (k {_SYMBOL[op]} {bound})")
        elif op in ("ge", "gt"):
            kinds.append(f"sliding window (k {_SYMBOL[op]} {bound})")
        else:
            kinds.append(f"predicate ({term})")
    return kinds


_SYMBOL = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">"}


# --- applying it to a matched site ----------------------------------------------------

def understand_masks(program: Expr, operands: list[Node], score_shape: torch.Size,
                     keep: set[Node] = frozenset()) -> tuple[Expr, list[Node], list[str]]:
    """Replace each mask operand that can be read as positions (except those in ``keep``) by its
    expression; returns the new program, its operands and what was understood."""
    replacements: dict[int, Expr] = {}
    new_operands: list[Node] = []
    notes: list[str] = []
    masked_first = _masked_branch_first(program)
    for i, node in enumerate(operands):
        negate = masked_first == i  # (where m -inf x) reads better, and bounds keys, as (where ~m x -inf)
        found = None if node in keep else MaskAnalysis(score_shape).understand(node, negate)
        if found is None:
            replacements[i] = Operand(_index_of(node, new_operands))
            continue
        renumber = {j: Operand(_index_of(atom, new_operands)) for j, atom in enumerate(found.atoms)}
        replacements[i] = substitute(found.expr, renumber)
        notes.append(" + ".join(found.kinds) + f" from {node.name}")
        if negate:
            program = Where(program.cond, program.b, program.a)
    return select_additive_mask(substitute(program, replacements)), new_operands, notes


def select_additive_mask(program: Expr) -> Expr:
    """``x + where(p, 0, m)`` as ``where(p, x, x + m)``: the same values (``x + 0`` is ``x``), with the
    predicate outermost, where the kernel can read a key bound from it."""
    if not (isinstance(program, Binary) and program.op == "add"):
        return program
    for x, mask in ((program.a, program.b), (program.b, program.a)):
        if (isinstance(mask, Where) and mask.a == Const(0.0) and isinstance(mask.b, Const)
                and SCORE in leaves(x)):
            return Where(mask.cond, x, Binary("add", x, mask.b))
    return program


def _masked_branch_first(program: Expr) -> int | None:
    """Operand ``i`` when the program is ``(where $i -inf x)``."""
    if (isinstance(program, Where) and isinstance(program.cond, Operand) and isinstance(program.a, Const)
            and program.a.value == -math.inf):
        return program.cond.index
    return None


def _index_of(node: Node, operands: list[Node]) -> int:
    if node not in operands:
        operands.append(node)
    return operands.index(node)


def substitute(expr: Expr, operands: dict[int, Expr]) -> Expr:
    """``expr`` with operand ``i`` replaced by ``operands[i]``."""
    if isinstance(expr, Operand):
        return operands[expr.index]
    if isinstance(expr, Unary):
        return Unary(expr.op, substitute(expr.a, operands))
    if isinstance(expr, Binary):
        return Binary(expr.op, substitute(expr.a, operands), substitute(expr.b, operands))
    if isinstance(expr, Where):
        return Where(*(substitute(e, operands) for e in (expr.cond, expr.a, expr.b)))
    return expr
