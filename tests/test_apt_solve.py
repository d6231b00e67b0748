"""The Apt-Serve greedy against brute force: never over budget, always at least half the optimum."""
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from aptserve.sched.apt import KnapsackItem, solve, total_units, total_value


def brute_force(items, budget):
    best = 0.0
    options = [[None, "kv"] + (["hidden"] if it.hidden_units is not None else []) for it in items]
    for combo in itertools.product(*options):
        choices = {it.id: c for it, c in zip(items, combo)}
        if total_units(items, choices) <= budget:
            best = max(best, total_value(items, choices))
    return best


@st.composite
def instances(draw):
    items = []
    for i in range(draw(st.integers(0, 6))):
        kv_units = draw(st.integers(1, 30))
        kv_value = draw(st.floats(0.01, 100, allow_nan=False))
        if draw(st.booleans()) and kv_units > 1:
            hidden_units = draw(st.integers(1, kv_units - 1))
            hidden_value = draw(st.floats(0.0, kv_value, allow_nan=False))
            items.append(KnapsackItem(i, kv_units, kv_value, hidden_units, hidden_value))
        else:
            items.append(KnapsackItem(i, kv_units, kv_value))
    return items, draw(st.integers(0, 60))


@given(instances())
@settings(max_examples=3000, deadline=None)
def test_never_over_budget_and_at_least_half_of_optimum(instance):
    items, budget = instance
    choices = solve(items, budget)
    assert set(choices) == {it.id for it in items}
    assert total_units(items, choices) <= budget
    assert total_value(items, choices) >= brute_force(items, budget) / 2 - 1e-9


def test_hidden_refused_when_its_gain_is_below_direct_kv():
    # hidden: 4 / 5 = 0.8 per unit < kv: 10 / 10 = 1 per unit -> offered as KV only.
    items = [KnapsackItem("a", 10, 10.0, 5, 4.0)]
    assert solve(items, 10) == {"a": "kv"}
    # With KV out of reach of the budget altogether, hidden is the only option left, and it is taken.
    assert solve(items, 9) == {"a": "hidden"}
    items.append(KnapsackItem("b", 5, 4.5))
    assert solve(items, 15) == {"a": "kv", "b": "kv"}
    assert solve(items, 14) == {"a": "kv", "b": None}  # a's refused hidden never displaces b


def test_hidden_then_upgrade_when_memory_allows():
    items = [KnapsackItem("a", 10, 10.0, 5, 9.0), KnapsackItem("b", 10, 10.0, 5, 9.0)]
    assert solve(items, 20) == {"a": "kv", "b": "kv"}  # both hidden, then both upgraded
    assert solve(items, 15) == {"a": "kv", "b": "hidden"}  # both hidden, one upgrade fits
    assert solve(items, 10) == {"a": "hidden", "b": "hidden"}  # hidden doubles the batch


def test_violators_go_last():
    items = [KnapsackItem("late", 4, 1e-6), KnapsackItem("urgent", 4, 5.0), KnapsackItem("ok", 4, 2.0)]
    assert solve(items, 8) == {"late": None, "urgent": "kv", "ok": "kv"}


def test_double_check_takes_the_big_request_alone():
    # The small one sorts first (higher value per unit) and then blocks the big one, worth far more.
    items = [KnapsackItem("small", 1, 2.0), KnapsackItem("big", 10, 15.0)]
    assert solve(items, 10) == {"small": None, "big": "kv"}


def test_options_larger_than_the_budget_are_dropped():
    items = [KnapsackItem("a", 12, 10.0, 6, 9.0)]
    assert solve(items, 8) == {"a": "hidden"}
    assert solve(items, 5) == {"a": None}


def test_an_upgrade_never_ranks_before_its_own_hidden_step():
    # Hidden and KV are worth the same per unit (0.005): (0.025 - 0.02) / 1 rounds above 0.02 / 4, and the walk once
    # took the upgrade first, serving item 0 as KV for one unit (8 units chosen against a budget of 5).
    items = [KnapsackItem(0, 5, 0.025, 4, 0.02), KnapsackItem(1, 1, 1.0), KnapsackItem(2, 1, 1.0),
             KnapsackItem(3, 1, 1.0)]
    choices = solve(items, 5)
    assert total_units(items, choices) <= 5 and total_value(items, choices) == 3.0
