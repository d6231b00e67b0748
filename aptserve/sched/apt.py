"""The Apt-Serve greedy (the paper's Algorithm 1) for the per-iteration multiple-choice knapsack.

Each item (a request) may be left out, served with the hidden cache (fewer units, lower value: the
recompute costs time that every request in the batch pays), or served with the KV cache. The greedy
walks "steps" in order of marginal value per unit of memory: admit-as-KV (p/m), admit-as-hidden
(hidden_value / hidden_units) and upgrade-hidden-to-KV ((kv_value - hidden_value) / extra units). Hidden
is offered only when its step is worth at least the direct KV step, which makes each item's steps
concave (hidden before upgrade), so the sorted walk is the optimum of the LP relaxation. At the first
step that does not fit, the greedy stops and compares its value V with that one request served alone
("the double check"); max(V, alone) >= OPT / 2.

Options worth less than nothing are dropped. Options worth exactly nothing (a request that arrived this
instant) are kept: their gain per unit is 0, so they come last and take only memory nobody else wants,
which keeps the engine work-conserving without changing the value of the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from aptserve.cache.tables import CacheKind

KV, HIDDEN = CacheKind.KV, CacheKind.HIDDEN


# Not frozen: items and steps are built per waiting candidate every step, and a frozen dataclass's __init__ costs
# about three times as much (each field set through object.__setattr__).
@dataclass(slots=True)
class KnapsackItem:
    id: Hashable
    kv_units: int
    kv_value: float
    hidden_units: int | None = None
    hidden_value: float | None = None


@dataclass(slots=True)
class _Step:
    gain_per_unit: float
    order: int  # tie-break: input order, then hidden before its own upgrade
    item_index: int
    units: int
    choice: CacheKind  # the item's choice once this step is applied
    alone_choice: CacheKind  # best way to serve this item alone if the step breaks the walk
    alone_value: float


def _options(item: KnapsackItem, budget: int) -> tuple[tuple[int, float] | None, tuple[int, float] | None]:
    return options(item.kv_units, item.kv_value, item.hidden_units, item.hidden_value, budget)


def options(kv_units: int, kv_value: float, hidden_units: int | None, hidden_value: float | None, budget: int,
            ) -> tuple[tuple[int, float] | None, tuple[int, float] | None]:
    """An item's (units, value) for KV and for hidden, dropping options that cannot help."""
    kv = (kv_units, kv_value) if 0 < kv_units <= budget and kv_value >= 0 else None
    hidden = None
    if hidden_units is not None and hidden_value is not None and 0 < hidden_units <= budget and hidden_value >= 0:
        hidden = (hidden_units, hidden_value)
    if kv and hidden and (hidden[0] >= kv[0] or hidden[1] >= kv[1]):
        # Hidden that is no smaller is useless; hidden worth as much as KV makes KV useless.
        return (kv, None) if hidden[0] >= kv[0] else (None, hidden)
    return kv, hidden


def _gain(value: float, units: int) -> float:
    return value / units


def first_gain(kv: tuple[int, float] | None, hidden: tuple[int, float] | None) -> float | None:
    """Gain per unit of an item's first step in the walk, from its `options` (None: it has none); its other step,
    if any, comes later, so an item ranks among the others by this."""
    if hidden and (kv is None or _gain(hidden[1], hidden[0]) >= _gain(kv[1], kv[0])):
        return _gain(hidden[1], hidden[0])
    return _gain(kv[1], kv[0]) if kv else None


def _steps(items: list[KnapsackItem], budget: int) -> list[_Step]:
    steps: list[_Step] = []
    for index, item in enumerate(items):
        kv, hidden = _options(item, budget)
        order = 2 * index
        if hidden and (kv is None or _gain(hidden[1], hidden[0]) >= _gain(kv[1], kv[0])):
            alone = (KV, kv[1]) if kv else (HIDDEN, hidden[1])
            hidden_gain = _gain(hidden[1], hidden[0])
            steps.append(_Step(hidden_gain, order, index, hidden[0], HIDDEN, HIDDEN, hidden[1]))
            if kv:
                # At most the hidden step's gain (concavity): where the two tie, rounding could otherwise rank the
                # upgrade first and the walk take it alone, an item served as KV for the upgrade's units only.
                gain = min(hidden_gain, _gain(kv[1] - hidden[1], kv[0] - hidden[0]))
                steps.append(_Step(gain, order + 1, index, kv[0] - hidden[0], KV, *alone))
        elif kv:
            steps.append(_Step(_gain(kv[1], kv[0]), order, index, kv[0], KV, KV, kv[1]))
    steps.sort(key=lambda s: (-s.gain_per_unit, s.order))
    return steps


def solve(items, budget: int) -> dict[Hashable, CacheKind | None]:
    """Choose CacheKind.KV, CacheKind.HIDDEN or None per item id; total units never exceed `budget`; the value
    chosen is at least half the best choice among `items`. The apt policies pass at most a bounded set of waiting
    requests (apt_candidates.py): the bound is then over those, and the same as over the whole queue whenever
    memory stops the walk inside them. Step time is a second constraint kept outside this knapsack: the policies
    offer a hidden option only where its re-projection fits the step time, and when the chosen hidden rows do not
    fit together they call solve again offering only those kept (apt_scheduler.StepTime). The bound is then
    against the best choice over the options of that last call: a restriction of the two-constraint problem,
    whose own optimum can be higher. The first hidden row also makes the pool lend the recompute scratch its
    units, a cost shared by all hidden rows: the policies then call solve KV only over `budget` and with the hidden
    options over `budget` less the scratch, and keep the better, which is within 2x of the better optimum."""
    items = list(items)
    choices: dict[Hashable, CacheKind | None] = {item.id: None for item in items}
    used, value = 0, 0.0
    for step in _steps(items, budget):
        if used + step.units > budget:
            if step.alone_value > value:
                choices = {item.id: None for item in items}
                choices[items[step.item_index].id] = step.alone_choice
            break
        used += step.units
        value += step.gain_per_unit * step.units
        choices[items[step.item_index].id] = step.choice
    return choices


def total_units(items, choices: dict[Hashable, CacheKind | None]) -> int:
    by_id = {item.id: item for item in items}
    return sum(by_id[i].kv_units if c == KV else by_id[i].hidden_units for i, c in choices.items() if c)


def total_value(items, choices: dict[Hashable, CacheKind | None]) -> float:
    by_id = {item.id: item for item in items}
    return sum(by_id[i].kv_value if c == KV else by_id[i].hidden_value for i, c in choices.items() if c)
