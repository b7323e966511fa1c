import pytest

from dlq.budget import Budget
from pipeline.errors import BudgetExceeded
from pipeline.settings import DlqBudget


def test_consecutive_dead_letters_trip_at_the_limit_and_stay_tripped():
    budget = Budget("parse", DlqBudget(max_consecutive=3, min_records=1000))
    budget.check([True, True, False, True, True])  # runs of 2: fine
    with pytest.raises(BudgetExceeded, match="3 consecutive dead letters"):
        budget.check([True, False])
    with pytest.raises(BudgetExceeded):
        budget.check([False])  # tripped for good


def test_ratio_over_the_sliding_window_needs_min_records():
    limits = DlqBudget(window_records=10, min_records=10, max_ratio=0.5, max_consecutive=100)
    budget = Budget("enrich", limits)
    budget.check([True, False] * 4 + [True])  # 5 of 9, but fewer than min_records
    with pytest.raises(BudgetExceeded, match=r"6 of the last 10 records"):
        budget.check([True])


def test_old_outcomes_leave_the_window():
    limits = DlqBudget(window_records=4, min_records=4, max_ratio=0.5, max_consecutive=100)
    budget = Budget("enrich", limits)
    budget.check([True, True, False, False])  # 2 of 4 = 50 %: not more than the limit
    budget.check([False, False, True, True])  # the first two left: still 2 of 4
    assert budget.ratio == 0.5
    with pytest.raises(BudgetExceeded):
        budget.check([True])  # 3 of 4


def test_a_disabled_budget_never_trips():
    budget = Budget("parse", DlqBudget(enabled=False, max_consecutive=1))
    budget.check([True] * 1000)
    assert budget.tripped is None


def _tripped(method, *args) -> bool:  # type: ignore[no-untyped-def]
    from pipeline.errors import BudgetExceeded

    try:
        method(*args)
    except BudgetExceeded:
        return True
    return False


def test_a_clean_batch_counts_as_a_batch_of_good_outcomes():
    """check_clean(n) is check([False] * n), outcome for outcome (random streams)."""
    import random

    for seed in range(60):
        rng = random.Random(seed)
        limits = DlqBudget(
            window_records=rng.choice([5, 20, 50]),
            min_records=rng.choice([3, 10, 30]),
            max_ratio=rng.choice([0.2, 0.5]),
            max_consecutive=rng.choice([4, 12, 100]),
        )
        slow, fast = Budget("s", limits), Budget("s", limits)
        for _ in range(30):
            if rng.random() < 0.6:
                n = rng.randrange(0, 40)
                assert _tripped(slow.check, [False] * n) == _tripped(fast.check_clean, n)
            else:
                batch = [rng.random() < 0.3 for _ in range(rng.randrange(1, 20))]
                assert _tripped(slow.check, batch) == _tripped(fast.check, batch)
            if slow.tripped:
                break
            assert (slow.consecutive, slow._dead_in_window, list(slow._window)) == (
                fast.consecutive,
                fast._dead_in_window,
                list(fast._window),
            )
