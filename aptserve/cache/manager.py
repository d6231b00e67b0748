"""CacheManager: per-request unit tables for the two cache kinds over one UnitPool.

A request's table is a flat list of unit ids, `units_per_block(kind)` units per logical block of
`block_size` tokens, in block order:
  KV:     [k0, v0, k1, v1, ...]            (2 units per block: the K half and the V half)
  HIDDEN: [h0_0 .. h0_{u-1}, h1_0, ...]    (u = ceil(hidden_size / kv_dim) units per block; the hidden
                                            row of a token is split across them, column slices of kv_dim)
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from aptserve.cache.geometry import KV_UNITS_PER_BLOCK, cdiv
from aptserve.cache.pool import UnitPool


class CacheKind(str, enum.Enum):
    KV = "kv"
    HIDDEN = "hidden"


@dataclass
class RequestTable:
    kind: CacheKind
    unit_ids: list[int] = field(default_factory=list)


class CacheManager:
    def __init__(self, num_units: int, block_size: int, units_per_hidden_block: int = 2) -> None:
        self.pool = UnitPool(num_units)
        self.block_size = block_size
        self._units_per_block = {CacheKind.KV: KV_UNITS_PER_BLOCK, CacheKind.HIDDEN: units_per_hidden_block}
        self._tables: dict[str, RequestTable] = {}

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_units(self) -> int:
        return self.pool.capacity

    @property
    def num_free_units(self) -> int:
        return self.pool.num_free

    def units_per_block(self, kind: CacheKind) -> int:
        return self._units_per_block[kind]

    def num_blocks(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_units_for(self, kind: CacheKind, num_tokens: int) -> int:
        return self.num_blocks(num_tokens) * self._units_per_block[kind]

    def max_tokens(self, kind: CacheKind = CacheKind.KV) -> int:
        """Tokens the whole pool holds when every request uses `kind`."""
        return self.num_units // self._units_per_block[kind] * self.block_size

    def num_new_units(self, request_id: str, kind: CacheKind, num_tokens: int) -> int:
        """Units that `allocate(request_id, kind, num_tokens)` would take from the pool."""
        table = self._tables.get(request_id)
        held = len(table.unit_ids) if table is not None and table.kind == kind else 0
        return max(0, self.num_units_for(kind, num_tokens) - held)

    # --- allocation --------------------------------------------------------------------------
    def can_allocate(self, request_id: str, kind: CacheKind, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_new_units(request_id, kind, num_tokens) + reserve <= self.pool.num_free

    def allocate(self, request_id: str, kind: CacheKind, num_tokens: int) -> bool:
        """Grow the request's table to cover `num_tokens` tokens; all or nothing."""
        table = self._tables.get(request_id)
        if table is not None and table.kind != kind:
            raise RuntimeError(f"request {request_id} holds a {table.kind.value} table; convert it first")
        need = self.num_new_units(request_id, kind, num_tokens)
        new_ids = self.pool.allocate(need, request_id)
        if new_ids is None:
            return False
        if table is None:
            table = self._tables[request_id] = RequestTable(kind)
        table.unit_ids.extend(new_ids)
        return True

    def convert(self, request_id: str, new_kind: CacheKind, num_tokens: int) -> tuple[list[int], list[int]] | None:
        """Give the request a `new_kind` table for `num_tokens` tokens and free its old table.

        Returns (old unit ids, new unit ids), or None (nothing changed) if the new table does not fit
        while the old one is still held: the rows are copied from old to new, so both exist at once.
        """
        table = self._tables[request_id]
        if table.kind == new_kind:
            raise RuntimeError(f"request {request_id} already holds a {new_kind.value} table")
        new_ids = self.pool.allocate(self.num_units_for(new_kind, num_tokens), request_id)
        if new_ids is None:
            return None
        old_ids = table.unit_ids
        self.pool.free(old_ids, request_id)
        self._tables[request_id] = RequestTable(new_kind, new_ids)
        return old_ids, new_ids

    def free(self, request_id: str) -> None:
        """Return every unit of the request; a second call does nothing."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            self.pool.free(table.unit_ids, request_id)

    # --- views -------------------------------------------------------------------------------
    def has_table(self, request_id: str) -> bool:
        return request_id in self._tables

    def kind_of(self, request_id: str) -> CacheKind | None:
        table = self._tables.get(request_id)
        return table.kind if table is not None else None

    def unit_ids(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        return list(table.unit_ids) if table is not None else []

    def num_units_held(self, request_id: str) -> int:
        table = self._tables.get(request_id)
        return len(table.unit_ids) if table is not None else 0

    def usage(self) -> dict[str, int]:
        """Units used per kind, plus free."""
        used = {kind.value: 0 for kind in CacheKind}
        for table in self._tables.values():
            used[table.kind.value] += len(table.unit_ids)
        used["free"] = self.pool.num_free
        return used

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owned = 0
        for request_id, table in self._tables.items():
            upb = self._units_per_block[table.kind]
            assert len(table.unit_ids) % upb == 0, f"{request_id}: table is not whole blocks"
            for unit_id in table.unit_ids:
                assert self.pool.owner_of(unit_id) == request_id, f"{request_id}: unit {unit_id} not owned"
            owned += len(table.unit_ids)
        assert owned + self.pool.num_free == self.pool.capacity, "owned + free != capacity"
