"""The CacheManager's invariants, counted from its tables, blocks and pool (CacheManager.check_invariants: the
scheduler's check and the property tests; the manager itself keeps only running counts). It reads the manager's
private state on purpose: this module is the manager's own check, kept apart so the manager reads in one sitting."""
from __future__ import annotations

from aptserve.cache.tables import CACHE_OWNER, SCRATCH_OWNER, CacheKind


def count_usage(manager) -> dict[str, int]:
    """CacheManager.usage() counted from the tables and blocks."""
    used = {kind.value: 0 for kind in CacheKind}
    for table in manager._tables.values():
        upb = manager._units_per_block[table.kind]
        used[table.kind.value] += upb * sum(block is None for block in table.blocks)
    for (kind, _), block in manager._cached.items():
        if block.ref_count:
            used[kind.value] += len(block.unit_ids)
    used["scratch"] = len(manager.scratch_unit_ids)
    used["cached"] = manager._num_evictable_units
    used["free"] = manager.pool.num_free
    return used


def check_manager(manager) -> None:
    """Assert the manager's invariants: tables of whole blocks of units their requests own, cached blocks whose
    reference counts equal their readers and that are evictable iff unread, the scratch lent exactly while a hidden
    table exists, own + cached + scratch + free == capacity, and usage() as counted here."""
    manager.pool.check_invariants()
    own_units = 0
    readers: dict[int, int] = {}
    for request_id, table in manager._tables.items():
        upb = manager._units_per_block[table.kind]
        assert len(table.unit_ids) % upb == 0, f"{request_id}: table is not whole blocks"
        assert len(table.blocks) * upb == len(table.unit_ids), f"{request_id}: blocks and units disagree"
        for index, block in enumerate(table.blocks):
            unit_ids = table.unit_ids[index * upb:(index + 1) * upb]
            if block is None:
                for unit_id in unit_ids:
                    assert manager.pool.owner_of(unit_id) == request_id, f"{request_id}: unit {unit_id} not owned"
                own_units += upb
            else:
                assert block.key[0] == table.kind and block.unit_ids == unit_ids, f"{request_id}: bad block"
                assert manager._cached.get(block.key) is block, f"{request_id}: reads an uncached block"
                readers[id(block)] = readers.get(id(block), 0) + 1
    cached_units = 0
    for key, block in manager._cached.items():
        assert block.key == key and block.ref_count == readers.get(id(block), 0), f"{key}: reference count"
        assert (block.ref_count == 0) == (key in manager._evictable), f"{key}: evictable iff unread"
        for unit_id in block.unit_ids:
            assert manager.pool.owner_of(unit_id) == CACHE_OWNER, f"{key}: unit {unit_id} not the cache's"
        cached_units += len(block.unit_ids)
    assert len(manager._evictable) <= len(manager._cached)
    assert manager._num_evictable_units == sum(len(b.unit_ids) for b in manager._evictable.values())
    num_hidden = sum(table.kind == CacheKind.HIDDEN for table in manager._tables.values())
    assert manager._num_hidden_tables == num_hidden, "the hidden table count drifted"
    assert len(manager.scratch_unit_ids) == (manager.num_scratch_units if num_hidden else 0), "scratch lent iff hidden"
    for unit_id in manager.scratch_unit_ids:
        assert manager.pool.owner_of(unit_id) == SCRATCH_OWNER, f"scratch unit {unit_id} not the scratch's"
    assert (own_units + cached_units + len(manager.scratch_unit_ids) + manager.pool.num_free
            == manager.pool.capacity), "owned + cached + scratch + free != capacity"
    assert manager.usage() == count_usage(manager), "the usage counts drifted from the tables"
