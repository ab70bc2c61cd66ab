"""Spellings: recognizers that map the many ways a model writes one operation to one meaning.

Dynamo records what the user wrote: ``q @ k.mT`` is ``operator.matmul`` on a ``getattr``,
``scores.softmax(-1)`` a ``call_method``, ``nn.Softmax`` an inlined ``F.softmax``. Each
``as_*`` function here answers "is this node operation X, and on what?" for every spelling
we know, so the matcher reasons about meanings only. The spelling tables are data.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node


def value(arg: Any) -> Any:
    """The example value (FakeTensor, SymInt, ...) Dynamo recorded for a node, or the constant itself."""
    if isinstance(arg, Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def tensor(arg: Any) -> torch.Tensor | None:
    v = value(arg)
    return v if isinstance(v, torch.Tensor) else None


def _is(node: Any, functions: tuple, methods: tuple) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --- matrix products -------------------------------------------------------------------

MATMUL = ((torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul), ("matmul", "bmm", "__matmul__"))


def as_matmul(node: Any) -> tuple[Node, Node] | None:
    """``(a, b)`` of a batched matrix product ``a @ b`` with both operands of rank ≥ 2."""
    if not _is(node, *MATMUL):
        return None
    a, b = node.args[0], node.args[1]
    ta, tb = tensor(a), tensor(b)
    if ta is None or tb is None or ta.dim() < 2 or tb.dim() < 2:
        return None
    return a, b


def as_baddbmm(node: Any) -> tuple[Node, Node, Node, Any, Any] | None:
    """``(input, a, b, beta, alpha)`` of ``beta·input + alpha·(a @ b)`` written with ``baddbmm``."""
    if not _is(node, (torch.baddbmm, torch.Tensor.baddbmm), ("baddbmm",)):
        return None
    bias, a, b = (_arg(node, i, n) for i, n in enumerate(("input", "batch1", "batch2")))
    if tensor(a) is None or tensor(b) is None:
        return None
    return bias, a, b, node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)


def as_einsum(node: Any) -> tuple[str, Node, Node] | None:
    """``(equation, a, b)`` of a two-operand ``torch.einsum`` with no spaces in the equation."""
    if not _is(node, (torch.einsum, torch.functional.einsum), ()):
        return None
    args = node.args
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args = (args[0], *args[1])
    if len(args) != 3 or not isinstance(args[0], str):
        return None
    return args[0].replace(" ", ""), args[1], args[2]


# --- views ---------------------------------------------------------------------------

def as_transpose_last2(node: Any) -> Node | None:
    """The input ``x`` if ``node`` is ``x`` with its last two dims swapped (and nothing else)."""
    if not isinstance(node, Node):
        return None
    x = node.args[0] if node.args else None
    t = tensor(x)
    if t is None or t.dim() < 2:
        return None
    rank = t.dim()
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return x
    if _is(node, (torch.transpose, torch.swapaxes, torch.swapdims), ("transpose", "swapaxes", "swapdims")):
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if isinstance(d0, int) and isinstance(d1, int):
            return x if {_dim(d0, rank), _dim(d1, rank)} == {rank - 2, rank - 1} else None
    if _is(node, (torch.permute,), ("permute",)):
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if all(isinstance(d, int) for d in dims):
            want = list(range(rank - 2)) + [rank - 1, rank - 2]
            return x if [_dim(d, rank) for d in dims] == want else None
    if _is(node, (torch.t,), ("t",)) and rank == 2:
        return x
    return None


@dataclass(frozen=True)
class Unflatten:
    """Dim 0 split into leading dims: ``args`` for the graph (ints or SymInt nodes), ``shape`` their sizes."""

    args: tuple
    shape: tuple


_RESHAPES = ((torch.reshape,), ("view", "reshape"))


def _reshape_target(node: Node) -> tuple | None:
    if not _is(node, *_RESHAPES) or len(node.args) < 2:
        return None
    shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = tuple(shape[0])
    return tuple(shape)


def as_unflatten_leading(node: Any) -> tuple[Node, Unflatten] | None:
    """``(x, how)`` when ``node`` views a ``[N, m, n]`` tensor ``x`` as ``[*lead, m, n]`` (prod(lead) = N)."""
    if not isinstance(node, Node):
        return None
    target = _reshape_target(node)
    x = node.args[0] if node.args else None
    before, after = tensor(x), tensor(node)
    if target is None or before is None or after is None or before.dim() != 3 or after.dim() < 4:
        return None
    if tuple(after.shape[-2:]) != tuple(before.shape[-2:]) or len(target) != after.dim():
        return None
    lead = tuple(after.shape[:-2])
    args = tuple(a if not (isinstance(a, int) and a < 0) else lead[i] for i, a in enumerate(target[:-2]))
    if any(isinstance(a, int) and a < 0 for a in args):
        return None
    return x, Unflatten(args, lead)


def as_flatten_leading(node: Any) -> Node | None:
    """``x`` when ``node`` views ``x [*lead, m, n]`` (two or more leading dims) as ``[prod(lead), m, n]``."""
    if not isinstance(node, Node):
        return None
    x = node.args[0] if node.args else None
    before, after = tensor(x), tensor(node)
    if _reshape_target(node) is None or before is None or after is None:
        return None
    if after.dim() != 3 or before.dim() < 4 or tuple(after.shape[-2:]) != tuple(before.shape[-2:]):
        return None
    return x


# --- dtype casts and no-ops ---------------------------------------------------------

_CAST_METHODS = ("to", "type", "type_as", "half", "float", "bfloat16", "double")


def as_cast(node: Any) -> Node | None:
    """The input if ``node`` only changes the floating dtype (or is a no-op such as ``contiguous``)."""
    if not isinstance(node, Node) or not node.args:
        return None
    if not (_is(node, (), _CAST_METHODS + ("contiguous",)) or _is(node, (torch.Tensor.to,), ())):
        return None
    x = node.args[0]
    before, after = tensor(x), tensor(node)
    if before is None or after is None:
        return None
    same_place = before.shape == after.shape and before.device == after.device
    return x if same_place and before.is_floating_point() and after.is_floating_point() else None


# --- softmax and dropout --------------------------------------------------------------

@dataclass(frozen=True)
class Softmax:
    input: Node
    dim: int | None
    dtype: torch.dtype | None


def as_softmax(node: Any) -> Softmax | None:
    if not _is(node, (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax), ("softmax",)):
        return None
    return Softmax(node.args[0], _arg(node, 1, "dim"), _arg(node, 3 if node.target is F.softmax else 2, "dtype"))


@dataclass(frozen=True)
class Dropout:
    input: Node
    p: Any
    training: Any

    @property
    def is_identity(self) -> bool:
        return self.training is False or self.p == 0


def as_dropout(node: Any) -> Dropout | None:
    if _is(node, (F.dropout,), ()):
        return Dropout(node.args[0], _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True))
    if _is(node, (torch.dropout, torch.nn.functional.dropout1d), ("dropout",)):
        return Dropout(node.args[0], _arg(node, 1, "p"), _arg(node, 2, "train"))
    return None


# --- elementwise ops on scores --------------------------------------------------------

ELEMENTWISE = {
    # meaning: (functions, methods)
    "add": ((operator.add, operator.iadd, torch.add, torch.Tensor.add), ("add", "add_", "__add__", "__radd__")),
    "sub": ((operator.sub, operator.isub, torch.sub, torch.Tensor.sub), ("sub", "sub_", "__sub__")),
    "mul": ((operator.mul, operator.imul, torch.mul, torch.Tensor.mul), ("mul", "mul_", "__mul__", "__rmul__")),
    "div": ((operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.Tensor.div),
            ("div", "div_", "true_divide", "__truediv__")),
    "neg": ((operator.neg, torch.neg), ("neg", "__neg__")),
    "tanh": ((torch.tanh, torch.Tensor.tanh, F.tanh), ("tanh",)),
    "masked_fill": ((torch.masked_fill, torch.Tensor.masked_fill), ("masked_fill", "masked_fill_")),
    "where": ((torch.where,), ()),
}


@dataclass(frozen=True)
class Elementwise:
    op: str
    args: tuple


def as_elementwise(node: Any) -> Elementwise | None:
    """The meaning and operands of a supported elementwise op, or None (including unsupported kwargs)."""
    for op, spelling in ELEMENTWISE.items():
        if not _is(node, *spelling):
            continue
        kwargs = dict(node.kwargs)
        if op in ("add", "sub") and kwargs.pop("alpha", 1) != 1:
            return None
        if op == "div" and kwargs.pop("rounding_mode", None) is not None:
            return None
        if op == "masked_fill" and "value" in kwargs:
            return Elementwise(op, (*node.args, kwargs.pop("value")))
        if kwargs:
            return None
        arity = {"neg": 1, "tanh": 1, "masked_fill": 3, "where": 3}.get(op, 2)
        return Elementwise(op, tuple(node.args)) if len(node.args) == arity else None
    return None


def constant_scalar(arg: Any) -> float | None:
    """A Python number, or a 0-d tensor built from constants only (e.g. ``torch.full([], 8.0)``)."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, Node) or arg.op != "call_function":
        return None
    t = tensor(arg)
    if t is None or t.dim() != 0:
        return None
    if arg.target is torch.full and list(arg.args[0]) == []:
        fill = arg.args[1]
        return float(fill) if isinstance(fill, (int, float)) and not isinstance(fill, bool) else None
    if arg.target in (torch.tensor, torch.scalar_tensor, torch.as_tensor):
        data = arg.args[0]
        return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None
    return None


# --- existing fused attention -------------------------------------------------------------

@dataclass(frozen=True)
class SDPA:
    query: Node
    key: Node
    value: Node
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def as_sdpa(node: Any) -> SDPA | None:
    if not _is(node, (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention), ()):
        return None
    return SDPA(*(_arg(node, i, p, d) for i, (p, d) in enumerate(zip(_SDPA_PARAMS, _SDPA_DEFAULTS))))


# --- repeated key/value heads (GQA written out) -----------------------------------------

def _full_slices(index: Any, none_at: int) -> bool:
    """``index`` is ``(:, :, None, :, ...)`` with the ``None`` at position ``none_at``."""
    if not isinstance(index, tuple) or len(index) <= none_at or index[none_at] is not None:
        return False
    rest = index[:none_at] + index[none_at + 1:]
    return all(isinstance(i, slice) and i == slice(None, None, None) for i in rest)


def as_repeated_heads(node: Any) -> tuple[Node, int] | None:
    """``(x, n)`` if ``node`` repeats each head of a ``[B, H, S, D]`` tensor ``x`` n times along dim 1.

    Spellings: Hugging Face's ``repeat_kv`` (``x[:, :, None].expand(B, H, n, S, D).reshape(B, H·n, S, D)``)
    and ``x.repeat_interleave(n, dim=1)``.
    """
    out = tensor(node)
    if out is None or out.dim() != 4:
        return None
    if _is(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        x, n, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        ok = isinstance(n, int) and dim in (1, -3) and tensor(x) is not None and tensor(x).dim() == 4
        return (x, n) if ok else None
    if not _is(node, (torch.reshape,), ("reshape", "view")):
        return None
    expanded = node.args[0]
    if not _is(expanded, (), ("expand",)):
        return None
    unsqueezed = expanded.args[0]
    if _is(unsqueezed, (operator.getitem,), ()) and _full_slices(unsqueezed.args[1], 2):
        x = unsqueezed.args[0]
    elif _is(unsqueezed, (torch.unsqueeze,), ("unsqueeze",)) and _arg(unsqueezed, 1, "dim") == 2:
        x = unsqueezed.args[0]
    else:
        return None
    tx, te = tensor(x), tensor(expanded)
    if tx is None or tx.dim() != 4 or te is None or te.dim() != 5:
        return None
    b, h, s, d = tx.shape
    n = te.shape[2]
    same = tuple(te.shape) == (b, h, n, s, d) and tuple(out.shape) == (b, h * n, s, d)
    return (x, n) if same else None
