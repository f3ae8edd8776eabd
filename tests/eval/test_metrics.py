"""pass@k and avg@k against numbers computed by hand."""

import pytest

from delta_megatron.eval import avg_at_k, mean_pass_at_k, pass_at_k, weighted_average


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, 0.9),          # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (10, 3, 1, 0.3),         # pass@1 = c/n
    (16, 1, 16, 1.0),        # one correct among all drawn
    (16, 0, 16, 0.0),
    (16, 2, 4, 0.45),        # 1 - C(14,4)/C(16,4) = 1 - 1001/1820
    (4, 2, 2, 5 / 6),        # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (3, 3, 1, 1.0),
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(4, 5, 2), (4, 1, 5), (4, 1, 0), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_avg_and_means():
    assert avg_at_k([1, 0, 0, 1]) == 0.5
    assert avg_at_k([True, False, False, False]) == 0.25
    assert mean_pass_at_k([(4, 1), (4, 4), (4, 0)], 2) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        avg_at_k([])


def test_weighted_average_by_question_count():
    assert weighted_average({"aime24": 0.5, "math500": 0.25}, {"aime24": 30, "math500": 10}) == 0.4375
    assert weighted_average({"a": 0.2}, {"a": 30, "b": 5}) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no weight"):
        weighted_average({"a": 0.2}, {"b": 5})
