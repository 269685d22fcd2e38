"""Tests for modkd_jax.metrics on hand-made accuracy matrices."""

import doctest
import json

import numpy as np
import pytest

from modkd_jax import metrics

R3 = np.array(
    [
        [0.9, 0.1, 0.1],
        [0.7, 0.95, 0.2],
        [0.6, 0.8, 0.9],
    ]
)


def test_module_docstring_example_runs():
    assert doctest.testmod(metrics).failed == 0


def test_average_accuracy():
    assert metrics.average_accuracy(R3) == pytest.approx((0.6 + 0.8 + 0.9) / 3)
    assert metrics.average_accuracy(R3, 0) == pytest.approx(0.9)
    assert metrics.average_accuracy(R3, 1) == pytest.approx((0.7 + 0.95) / 2)
    assert metrics.average_accuracy(R3, -1) == pytest.approx((0.6 + 0.8 + 0.9) / 3)
    with pytest.raises(IndexError):
        metrics.average_accuracy(R3, 3)


def test_forgetting_and_bwt():
    np.testing.assert_allclose(metrics.forgetting_per_task(R3), [0.9 - 0.6, 0.95 - 0.8])
    assert metrics.forgetting(R3) == pytest.approx(0.225)
    assert metrics.backward_transfer(R3) == pytest.approx(((0.6 - 0.9) + (0.8 - 0.95)) / 2)


def test_forgetting_uses_max_previous_accuracy_not_diagonal():
    # Task 0 keeps improving after it was trained (0.5 -> 0.8), then drops to 0.4.
    R = np.array(
        [
            [0.5, 0.0, 0.0, 0.0],
            [0.8, 0.9, 0.0, 0.0],
            [0.7, 0.6, 0.95, 0.0],
            [0.4, 0.7, 0.9, 0.85],
        ]
    )
    np.testing.assert_allclose(metrics.forgetting_per_task(R), [0.8 - 0.4, 0.9 - 0.7, 0.95 - 0.9])
    assert metrics.forgetting(R) == pytest.approx((0.4 + 0.2 + 0.05) / 3)
    # BWT still compares against the diagonal.
    assert metrics.backward_transfer(R) == pytest.approx(((0.4 - 0.5) + (0.7 - 0.9) + (0.9 - 0.95)) / 3)


def test_forward_transfer():
    baseline = np.array([0.1, 0.05, 0.15])
    expected = ((0.1 - 0.05) + (0.2 - 0.15)) / 2
    assert metrics.forward_transfer(R3, baseline) == pytest.approx(expected)
    with pytest.raises(ValueError):
        metrics.forward_transfer(R3, [0.1, 0.1])


def test_single_task():
    R = np.array([[0.8]])
    assert metrics.average_accuracy(R) == pytest.approx(0.8)
    assert metrics.forgetting(R) == 0.0
    assert metrics.forgetting_per_task(R).shape == (0,)
    assert metrics.backward_transfer(R) == 0.0
    assert metrics.forward_transfer(R, [0.1]) == 0.0


def test_nan_rows_do_not_affect_earlier_rows():
    R = R3.copy()
    R[2] = np.nan
    assert metrics.average_accuracy(R, 1) == pytest.approx((0.7 + 0.95) / 2)
    assert np.isnan(metrics.average_accuracy(R))


def test_accuracy():
    assert metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        metrics.accuracy([0, 1], [0, 1, 2])


def test_summarize_is_json_serialisable():
    s = metrics.summarize(R3)
    assert set(s) == {"average_accuracy", "forgetting", "bwt", "final_row"}
    assert s["average_accuracy"] == pytest.approx(2.3 / 3)
    assert s["forgetting"] == pytest.approx(0.225)
    assert s["bwt"] == pytest.approx(-0.225)
    assert s["final_row"] == pytest.approx([0.6, 0.8, 0.9])
    assert json.loads(json.dumps(s)) == s


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 3)), np.zeros(3), np.zeros((2, 2, 2)), np.zeros((0, 0)), 0.5]
)
def test_bad_shapes_raise(bad):
    for fn in (metrics.average_accuracy, metrics.forgetting, metrics.forgetting_per_task,
               metrics.backward_transfer, metrics.summarize):
        with pytest.raises(ValueError, match="square 2-D"):
            fn(bad)
