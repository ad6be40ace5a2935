"""mergekit's parameter rules, written out by hand: gradients, filters, precedence, types.

The expected values below are computed from mergekit 0.1.5's documented rule (piecewise-linear
gradient over s = t (n - 1); first matching filter; source > slice > method-level), not by calling
our code twice. A 3,000-case differential run against mergekit's own evaluate_setting matched
exactly (see README, 'Coming from mergekit').
"""

from __future__ import annotations

import pytest

from surgery.errors import RecipeError
from surgery.mergekit.params import coerce, evaluate, resolve, slice_position

Q = "model.layers.3.self_attn.q_proj.weight"
UP = "model.layers.3.mlp.up_proj.weight"


@pytest.mark.parametrize(
    ("grad", "t", "want"),
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 0.5, 1.0, 0.0], 1 / 3, 0.5),  # lands on a knot
        ([0.0, 0.5, 1.0, 0.0], 0.5, 0.75),  # halfway between knots 1 and 2
        ([0.0, 0.5, 1.0, 0.0], 5 / 6, 0.5),  # halfway between knots 2 and 3
        ([0.7], 0.6, 0.7),  # a one-value gradient is a constant
    ],
)
def test_gradient_is_piecewise_linear_over_the_knots(grad, t, want):
    assert evaluate(grad, Q, t, "float", "w") == pytest.approx(want, abs=1e-15)


def test_gradient_matches_mergekit_float_expression_exactly():
    grad, t = [0.1, 0.3, 0.9], 0.3
    s = t * 2
    i0 = int(s)
    expect = (1 - (s - i0)) * grad[i0] + (s - i0) * grad[i0 + 1]
    assert evaluate(grad, Q, t, "float", "w") == expect


def test_boolean_gradient_picks_a_knot():
    assert evaluate([False, True, False], Q, 0.49, "bool", "n") is False  # int(0.98) = 0
    assert evaluate([False, True, False], Q, 0.5, "bool", "n") is True
    assert evaluate([False, True, False], Q, 1.0, "bool", "n") is False


def test_filters_first_match_wins_and_fall_through():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert evaluate(setting, Q, 0.5, "float", "t") == 0.1
    assert evaluate(setting, UP, 0.5, "float", "t") == 0.5  # the gradient inside the filter
    assert evaluate(setting, "model.norm.weight", 0.5, "float", "t") == 0.5  # the catch-all
    assert evaluate([{"filter": "mlp", "value": 1}], Q, 0.0, "float", "t") is None
    assert evaluate([{"filter": "*", "value": 2}], Q, 0.0, "float", "t") == 2.0
    assert evaluate({"filter": "q_proj", "value": 3}, Q, 0.0, "float", "t") == 3.0  # a single condition


def test_precedence_source_then_slice_then_method_then_default():
    source, slice_, method = {"weight": 1.0}, {"weight": 2.0, "density": 0.3}, {"weight": 3.0, "density": 0.4}
    assert resolve("weight", (source, slice_, method), Q, 0, "float", None) == 1.0
    assert resolve("density", (source, slice_, method), Q, 0, "float", None) == 0.3
    assert resolve("density", (source, None, method), Q, 0, "float", None) == 0.4
    assert resolve("gamma", (source, slice_, method), Q, 0, "float", 0.01) == 0.01


def test_a_filter_that_does_not_match_falls_to_the_next_scope():
    source = {"weight": [{"filter": "mlp", "value": 9.0}]}
    assert resolve("weight", (source, {"weight": 1.5}), Q, 0, "float", None) == 1.5
    assert resolve("weight", (source, {"weight": 1.5}), UP, 0, "float", None) == 9.0


def test_types_are_coerced_like_pydantic_lax_mode():
    assert coerce("1e-3", "float", "x") == 0.001
    assert coerce(2, "float", "x") == 2.0
    assert coerce("true", "bool", "x") is True
    assert coerce(0, "bool", "x") is False
    with pytest.raises(RecipeError, match="must be a number"):
        coerce("lots", "float", "density")
    with pytest.raises(RecipeError, match="true or false"):
        coerce("maybe", "bool", "normalize")
    with pytest.raises(RecipeError, match="finite"):
        coerce("nan", "float", "weight")


def test_slice_position():
    assert [slice_position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert slice_position(0, 1) == 1.0  # mergekit: a one-layer slice sits at t = 1
