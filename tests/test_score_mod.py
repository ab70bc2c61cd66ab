"""The score-program IR: text round trip, PyTorch evaluation, Triton emission, scale extraction."""

import math

import pytest
import torch

from attncompiler.passes.score_mod import (SCORE, Binary, Const, Operand, Unary, Where, evaluate, factor_scale,
                                           operand_indices, parse, scale_of, to_triton)

EXPRS = [
    SCORE,
    Const(0.125),
    Const(-2.0),
    Const(1e-30),
    Const(-math.inf),
    Const(math.inf),
    Operand(0),
    Operand(12),
    Unary("neg", SCORE),
    Unary("neg", Const(-2.0)),
    *(Binary(op, SCORE, Const(3.5)) for op in ("add", "sub", "mul", "div")),
    Where(Operand(0), Binary("mul", SCORE, Const(0.125)), Const(-math.inf)),
    Binary("add", Where(Operand(0), Unary("neg", Binary("div", Const(8.0), SCORE)), Const(math.inf)),
           Binary("sub", Operand(1), Const(-3.4028234663852886e38))),
]


@pytest.mark.parametrize("expr", EXPRS, ids=str)
def test_round_trip(expr):
    """parse(str(e)) rebuilds the same tree, and printing it again gives the same text."""
    assert parse(str(expr)) == expr
    assert str(parse(str(expr))) == str(expr)


def test_round_trip_nan():
    """NaN constants survive the round trip (compared by text and isnan, since nan != nan)."""
    expr = Where(Operand(0), SCORE, Const(math.nan))
    assert str(expr) == "(where $0 s nan)"
    back = parse(str(expr))
    assert isinstance(back, Where) and math.isnan(back.b.value) and str(back) == str(expr)


def test_parse_text_form():
    """Hand-written text with odd spacing and integer constants parses to the expected tree."""
    assert parse(" ( where  $0 (mul s 1) -inf )") == Where(Operand(0), Binary("mul", SCORE, Const(1.0)),
                                                            Const(-math.inf))
    assert str(parse("(div s 8)")) == "(div s 8.0)"


@pytest.mark.parametrize("text", ["(pow s 2)", "(exp s)", "(where2 $0 s 1.0)"])
def test_parse_rejects_unknown_ops(text):
    with pytest.raises(ValueError, match="unknown operation"):
        parse(text)


@pytest.mark.parametrize("text", ["s s", "(mul s 2) )", "(neg s) 1.0", "$0 (add s 1)"])
def test_parse_rejects_trailing_tokens(text):
    with pytest.raises(ValueError, match="trailing tokens"):
        parse(text)


def test_operand_indices():
    assert operand_indices(EXPRS[-1]) == {0, 1}
    assert operand_indices(Unary("neg", SCORE)) == set()


def test_evaluate_matches_handwritten_torch():
    """evaluate() agrees exactly with the same formula written with torch ops."""
    s = torch.randn(2, 3, 5, 7)
    mask = torch.rand(5, 7) < 0.5
    bias = torch.randn(1, 3, 5, 7, dtype=torch.float16)
    cases = {
        "(where $0 (mul s 0.125) -inf)": torch.where(mask, s * 0.125, -math.inf),
        "(add (div s 8.0) $1)": s / 8.0 + bias.float(),
        "(neg (sub s $1))": -(s - bias.float()),
        "(where $0 (mul 2.0 s) nan)": torch.where(mask, 2.0 * s, math.nan),
        "(mul s $2)": s * 0.3,
    }
    for text, expected in cases.items():
        got = evaluate(parse(text), s, [mask, bias, torch.tensor(0.3)])
        assert got.dtype == torch.float32, text
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=text)


def test_evaluate_uses_the_scores_dtype():
    """Constants and float operands take the scores' dtype; boolean operands stay boolean."""
    s = torch.randn(4, 4, dtype=torch.float64)
    bias = torch.randn(4, 4, dtype=torch.float16)
    assert evaluate(parse("(add s $0)"), s, [bias]).dtype == torch.float64
    assert evaluate(parse("0.1"), s, []).item() == 0.1
    assert evaluate(parse("$0"), s, [bias > 0]).dtype == torch.bool


@pytest.mark.parametrize("expr, expected", [
    ("s", "s"),
    ("$3", "t3"),
    ("0.125", "0.125"),
    ("-inf", '(-float("inf"))'),
    ("inf", 'float("inf")'),
    ("nan", 'float("nan")'),
    ("(neg s)", "(-s)"),
    ("(add s $0)", "(s + t0)"),
    ("(sub s 1.5)", "(s - 1.5)"),
    ("(mul s 0.125)", "(s * 0.125)"),
    ("(div s 8)", "(s / 8.0)"),
    ("(where $0 (mul s 0.125) -inf)", 'tl.where(t0, (s * 0.125), (-float("inf")))'),
    ("(sub (neg s) (neg -2.0))", "((-s) - (--2.0))"),
])
def test_to_triton(expr, expected):
    assert to_triton(parse(expr)) == expected


def test_to_triton_names():
    """The score and operand tile names can be chosen."""
    assert to_triton(parse("(add (mul s 2.0) $1)"), score="qk", operand="bias_{}") == "((qk * 2.0) + bias_1)"


def test_to_triton_computes_what_evaluate_computes():
    """The emitted expression, run with torch standing in for tl, gives evaluate()'s result."""
    s = torch.randn(5, 7)
    operands = [torch.rand(5, 7) < 0.5, torch.randn(5, 7)]
    for expr in (e for e in EXPRS if isinstance(e, (Unary, Binary, Where))):
        text = to_triton(expr)
        names = {"s": s, "t0": operands[0], "t1": operands[1], "tl": torch}
        got = torch.as_tensor(eval(text, names))
        torch.testing.assert_close(got, evaluate(expr, s, operands), equal_nan=True, msg=text)


@pytest.mark.parametrize("text, scale", [
    ("(mul s 0.125)", 0.125),
    ("(mul 0.125 s)", 0.125),
    ("(div s 8)", 0.125),
    ("(where $0 (mul s 0.088) -inf)", 0.088),
    ("(add (div s 4.0) $0)", 0.25),
    ("(add s $0)", 1.0),
    ("s", 1.0),
    ("(mul s $0)", 1.0),
    ("(div 8.0 s)", None),
])
def test_scale_of(text, scale):
    assert scale_of(parse(text)) == scale


@pytest.mark.parametrize("text, factored", [
    ("(mul s 0.125)", (0.125, "s")),
    ("(mul 0.125 s)", (0.125, "s")),
    ("(div s 8.0)", (0.125, "s")),
    ("s", (1.0, "s")),
    ("(where (le k q) (mul s 0.125) -inf)", (0.125, "(where (le k q) s -inf)")),
    ("(where $0 (where (le k q) (div s 2.0) -inf) -inf)", (0.5, "(where $0 (where (le k q) s -inf) -inf)")),
    ("(mul s -0.5)", None),                                    # a negative scale flips the row maximum
    ("(div 8.0 s)", None),
    ("(mul s $0)", None),
    ("(add (mul s 0.125) $0)", None),                          # a bias
    ("(where (le k q) (mul s 0.125) -3.4028234663852886e+38)", None),  # a finite fill
    ("(where (gt s 0.0) (mul s 0.125) -inf)", None),           # a select that reads the score
    ("(tanh (mul s 0.125))", None),
])
def test_factor_scale(text, factored):
    """Programs that are a positive constant times -inf-masked raw scores, and the raw program."""
    got = factor_scale(parse(text))
    assert (got if got is None else (got[0], str(got[1]))) == factored
    if got is not None:
        s = torch.randn(4, 6, dtype=torch.float64)
        mask = torch.rand(4, 6) < 0.5
        torch.testing.assert_close(evaluate(parse(text), s, [mask]), got[0] * evaluate(got[1], s, [mask]))
