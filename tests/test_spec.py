"""How the op's inputs line up (attncompiler.spec): the cached answers for concrete shapes."""

import pytest

from attncompiler import spec

CASES = [  # q, k, v shapes → output shape, group
    ((2, 8, 5, 16), (2, 2, 7, 16), (2, 2, 7, 32), (2, 8, 5, 32), 4),
    ((1, 8, 5, 16), (3, 8, 7, 16), (3, 8, 7, 16), (3, 8, 5, 16), 1),
    ((4, 5, 16), (4, 7, 16), (4, 7, 8), (4, 5, 8), 1),
    ((6, 5, 16), (2, 7, 16), (2, 7, 16), (6, 5, 16), 3),
    ((5, 16), (7, 16), (7, 16), (5, 16), 1),
    ((2, 3, 4, 5, 16), (3, 1, 7, 16), (3, 1, 7, 16), (2, 3, 4, 5, 16), 4),
]


@pytest.mark.parametrize("q, k, v, shape, group", CASES)
def test_concrete_shapes_are_answered_from_the_cache_as_the_general_rule_answers(q, k, v, shape, group):
    spec.output_shape.cached.cache_clear()
    for _ in range(2):
        assert spec.output_shape(q, k, v) == shape
        assert spec.group_of(q, k, v) == group
    assert spec.output_shape.cached.cache_info().hits == 1
    assert spec.output_shape.rule(q, k, v) == shape
    assert spec.group_of.rule(q, k, v) == group


def test_heads_that_do_not_group_raise_every_time():
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot be grouped"):
            spec.output_shape((2, 6, 5, 16), (2, 4, 7, 16), (2, 4, 7, 16))
