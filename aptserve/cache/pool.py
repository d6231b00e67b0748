"""UnitPool: all-or-nothing allocation of equal cache units, with an owner per unit."""
from __future__ import annotations

from collections import deque


class UnitPool:
    """A unit is `block_size` tokens x `kv_dim` values in every layer: half a KV block."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._free: deque[int] = deque(range(capacity))
        self._owner: list[str | None] = [None] * capacity

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, num_units: int, owner: str) -> list[int] | None:
        """Take `num_units` units for `owner`, or none at all (returns None) if too few are free."""
        if num_units < 0:
            raise ValueError(f"num_units must be >= 0, got {num_units}")
        if num_units > len(self._free):
            return None
        unit_ids = [self._free.popleft() for _ in range(num_units)]
        for unit_id in unit_ids:
            self._owner[unit_id] = owner
        return unit_ids

    def free(self, unit_ids: list[int], owner: str) -> None:
        """Return units to the pool; freeing a unit twice (or one the owner does not hold) is a bug."""
        for unit_id in unit_ids:
            if self._owner[unit_id] != owner:
                raise RuntimeError(f"unit {unit_id} is owned by {self._owner[unit_id]!r}, not {owner!r}")
            self._owner[unit_id] = None
        # Tail blocks go back first so they are reused first (they were touched last).
        self._free.extendleft(reversed(unit_ids))

    def transfer(self, unit_ids: list[int], owner: str, new_owner: str) -> None:
        """Hand units from one owner to another (a request's full block to the prefix cache)."""
        for unit_id in unit_ids:
            if self._owner[unit_id] != owner:
                raise RuntimeError(f"unit {unit_id} is owned by {self._owner[unit_id]!r}, not {owner!r}")
            self._owner[unit_id] = new_owner

    def owner_of(self, unit_id: int) -> str | None:
        return self._owner[unit_id]

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a unit is on the free list twice"
        for unit_id, owner in enumerate(self._owner):
            assert (owner is None) == (unit_id in free), f"unit {unit_id}: owner {owner!r} vs free list"
