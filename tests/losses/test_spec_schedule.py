"""Loss spec parsing and the schedules, value by value."""

from __future__ import annotations

import math

import pytest

from segpipe.losses import Schedule, parse_loss_spec, parse_schedule
from segpipe.losses.spec import Term


@pytest.mark.parametrize(
    "text, terms",
    [
        ("dice+boundary", [("dice", 1.0), ("boundary", 1.0)]),
        ("dice+ce+boundary", [("dice", 1.0), ("ce", 1.0), ("boundary", 1.0)]),
        ("0.5*ce+dice+boundary", [("ce", 0.5), ("dice", 1.0), ("boundary", 1.0)]),
        ("focal + boundary", [("focal", 1.0), ("boundary", 1.0)]),
        ("2*gdl+1e-1*boundary", [("gdl", 2.0), ("boundary", 0.1)]),
        ("bitempered", [("bitempered", 1.0)]),
    ],
)
def test_parse(text, terms):
    spec = parse_loss_spec(text)
    assert [(t.name, t.weight) for t in spec.terms] == terms


def test_groups_and_round_trip():
    spec = parse_loss_spec("0.5*ce+dice+boundary")
    assert spec.boundary == Term("boundary") and [t.name for t in spec.regional] == ["ce", "dice"]
    assert str(spec) == "0.5*ce+dice+boundary"
    assert parse_loss_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "expected terms joined by '+'"),
        ("   ", "expected terms joined by '+'"),
        ("dice+", "empty term"),
        ("dcie+boundary", "unknown term 'dcie' (did you mean 'dice'?); valid terms: dice, gdl, ce, focal, bitempered, boundary"),
        ("x*dice", "weight 'x' of term 'dice' is not a number"),
        ("__import__('os')*dice", "is not a number"),
        ("0*dice", "must be a positive number"),
        ("dice+dice", "appears twice"),
    ],
)
def test_parse_errors(text, needle):
    with pytest.raises(ValueError) as info:
        parse_loss_spec(text)
    assert needle in str(info.value)


def test_rebalance_value_by_value():
    s = Schedule("rebalance")
    for epoch in range(100):
        alpha = max(1.0 - 0.01 * epoch, 0.01)
        r, b = s.weights(epoch)
        assert r == pytest.approx(alpha, abs=1e-12) and b == pytest.approx(1 - alpha, abs=1e-12)
    assert s.weights(99) == pytest.approx((0.01, 0.99)) and s.weights(500) == pytest.approx((0.01, 0.99))
    custom = parse_schedule("rebalance:step=0.05,floor=0.2")
    assert [round(custom.weights(e)[0], 10) for e in (0, 1, 10, 16, 17, 100)] == [1.0, 0.95, 0.5, 0.2, 0.2, 0.2]


def test_increase_value_by_value():
    s = Schedule("increase")
    for epoch in range(100):
        r, b = s.weights(epoch)
        assert r == 1.0 and b == pytest.approx(0.01 + 0.01 * epoch, abs=1e-12)
    capped = parse_schedule("increase:cap=0.5")
    assert capped.weights(10)[1] == pytest.approx(0.11) and capped.weights(99)[1] == 0.5


def test_constant():
    assert [Schedule("constant").weights(e) for e in (0, 50, 99)] == [(1.0, 1.0)] * 3
    assert parse_schedule("constant:weight=0.3").weights(7) == (1.0, 0.3)


def test_json_round_trip_keeps_values():
    for text in ("rebalance:step=0.02", "increase", "increase:cap=2", "constant:weight=0.5"):
        s = parse_schedule(text)
        back = Schedule.from_json(s.to_json())
        assert back == s and [back.weights(e) for e in range(0, 100, 7)] == [s.weights(e) for e in range(0, 100, 7)]
    assert Schedule("increase").to_json()["params"]["cap"] is None  # JSON has no infinity
    assert math.isinf(Schedule.from_json(Schedule("increase").to_json()).params["cap"])


@pytest.mark.parametrize(
    "text, needle",
    [
        ("rebalance:step=-0.01", "'step' expected a number >= 0"),
        ("rebalance:floor=1.5", "'floor' expected a number in [0, 1]"),
        ("rebalance:floor=-0.1", "'floor' expected a number in [0, 1]"),
        ("rebalance:stpe=0.1", "unknown parameter 'stpe' (did you mean 'step'?)"),
        ("rebalance:step=abc", "'step' expected a number, got 'abc'"),
        ("rebalance:step", "expected key=value"),
        ("increase:cap=0.001", "'cap' (0.001) must not be below 'start'"),
        ("rebalanse", "unknown name 'rebalanse' (did you mean 'rebalance'?)"),
        ("", "expected NAME"),
    ],
)
def test_schedule_errors(text, needle):
    with pytest.raises(ValueError) as info:
        parse_schedule(text)
    assert needle in str(info.value)


def test_epoch_must_be_a_whole_number():
    with pytest.raises(ValueError, match="epoch"):
        Schedule().weights(-1)
    with pytest.raises(ValueError, match="epoch"):
        Schedule().weights(1.5)
