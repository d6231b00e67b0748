"""CacheManager: per-request unit tables for the two cache kinds over one UnitPool, and the prefix cache.

A request's table is a flat list of unit ids, `units_per_block(kind)` units per logical block of
`block_size` tokens, in block order:
  KV:     [k0, v0, k1, v1, ...]            (2 units per block: the K half and the V half)
  HIDDEN: [h0_0 .. h0_{u-1}, h1_0, ...]    (u = ceil(hidden_size / kv_dim) units per block; the hidden
                                            row of a token split across them, column slices of kv_dim)

Prefix caching (on unless the manager is built without it): once every token of a block is computed, the block is
registered under its content key (cache/prefix.py: the kind and the chained digest of its tokens) and its units
pass from the request to the cache. A later request of the same kind whose prompt starts with the same blocks takes
them into its table instead of computing them (at least its last prompt token is always computed, for its logits).
A registered block counts its readers; with none left it stays cached, and is evicted (least recently released
first) only when an allocation finds the pool's free list short. Shared blocks are full and never written again, so
sharing needs no copy; freeing, preempting or converting a request only drops its references.

The recompute scratch (the one-layer buffer into which the runner re-projects hidden requests' K/V) borrows
`num_scratch_units` units of the pool while any request holds a hidden table, and gives them back with the last one:
a pool whose requests are all KV is the whole pool, so the hybrid cache costs no memory until it is used. Taking
the first hidden table therefore needs those units too (`num_scratch_units_to_take`).
"""
from __future__ import annotations

from collections import OrderedDict

from aptserve.cache.geometry import KV_UNITS_PER_BLOCK, cdiv
from aptserve.cache.invariants import check_manager
from aptserve.cache.pool import UnitPool
from aptserve.cache.tables import CACHE_OWNER, SCRATCH_OWNER, CachedBlock, CacheKind, RequestTable
from aptserve.config import CacheConfig


class CacheManager:
    def __init__(self, num_units: int, block_size: int, units_per_hidden_block: int = 2,
                 enable_prefix_caching: bool = False, num_scratch_units: int = 0) -> None:
        self.pool = UnitPool(num_units)
        self.num_scratch_units = num_scratch_units
        self.scratch_unit_ids: tuple[int, ...] = ()  # lent while _num_hidden_tables > 0
        self._num_hidden_tables = 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._units_per_block = {CacheKind.KV: KV_UNITS_PER_BLOCK, CacheKind.HIDDEN: units_per_hidden_block}
        self._tables: dict[str, RequestTable] = {}
        self._cached: dict[tuple[CacheKind, bytes], CachedBlock] = {}
        self._evictable: OrderedDict[tuple[CacheKind, bytes], CachedBlock] = OrderedDict()  # no readers, LRU first
        self._num_evictable_units = 0
        # Units in use per kind (own units and read cached blocks), kept as they change: usage() is read every step.
        self._num_used_units = {kind: 0 for kind in CacheKind}
        self.num_evicted_blocks = 0
        self.num_cache_changes = 0  # blocks registered or evicted: a lookup made before is still valid if unchanged

    @classmethod
    def from_config(cls, cache: CacheConfig) -> CacheManager:
        """The manager of the pool `cache` describes (its units, kinds, prefix caching and scratch)."""
        return cls(cache.num_units, cache.block_size, cache.units_per_hidden_block, cache.enable_prefix_caching,
                   cache.num_scratch_units)

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_units(self) -> int:
        return self.pool.capacity

    @property
    def num_free_units(self) -> int:
        """Units an allocation can have: the free list and the cached blocks nobody reads."""
        return self.pool.num_free + self._num_evictable_units

    @property
    def num_scratch_units_to_take(self) -> int:
        """Units the first hidden table takes besides its own: the scratch's, unless it is lent already."""
        return 0 if self.scratch_unit_ids else self.num_scratch_units

    def _scratch_to_take(self, kind: CacheKind) -> int:
        return self.num_scratch_units_to_take if kind == CacheKind.HIDDEN else 0

    def units_per_block(self, kind: CacheKind) -> int:
        return self._units_per_block[kind]

    def num_blocks(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_units_for(self, kind: CacheKind, num_tokens: int) -> int:
        return self.num_blocks(num_tokens) * self._units_per_block[kind]

    def num_new_units(self, request_id: str, kind: CacheKind, num_tokens: int,
                      prefix: list[CachedBlock] = ()) -> int:
        """Units that `allocate(request_id, kind, num_tokens, prefix)` would take from `num_free_units`: new ones,
        and those of prefix blocks that nobody reads now (taking them stops them being evictable)."""
        table = self._tables.get(request_id)
        held = len(table.unit_ids) if table is not None and table.kind == kind else 0
        if table is None and prefix:
            held = sum(len(block.unit_ids) for block in prefix if block.ref_count > 0)
        return max(0, self.num_units_for(kind, num_tokens) - held)

    # --- the prefix cache ----------------------------------------------------------------------
    def cached_prefix(self, kind: CacheKind, keys: list[bytes], num_tokens: int) -> list[CachedBlock]:
        """The cached `kind` blocks a request starting with blocks `keys` can take: the longest run from its first
        block, leaving at least its last token (of `num_tokens`) to compute."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for key in keys[:(num_tokens - 1) // self.block_size]:
            block = self._cached.get((kind, key))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, request_id: str, keys: list[bytes], num_computed_tokens: int) -> None:
        """Register the request's blocks whose tokens are all computed (`keys`: their content keys), unless a block
        with the same content is cached already (then this one stays the request's own)."""
        table = self._tables.get(request_id)
        if not self.enable_prefix_caching or table is None:
            return
        upb = self._units_per_block[table.kind]
        num_full = min(num_computed_tokens // self.block_size, len(keys), len(table.blocks))
        for index in range(table.num_blocks_checked, num_full):
            key = (table.kind, keys[index])
            if table.blocks[index] is None and key not in self._cached:
                unit_ids = table.unit_ids[index * upb:(index + 1) * upb]
                self.pool.transfer(unit_ids, request_id, CACHE_OWNER)
                table.blocks[index] = self._cached[key] = CachedBlock(key, unit_ids, ref_count=1)
                self.num_cache_changes += 1
        table.num_blocks_checked = max(table.num_blocks_checked, num_full)

    def _acquire(self, block: CachedBlock) -> None:
        if block.ref_count == 0:
            del self._evictable[block.key]
            self._num_evictable_units -= len(block.unit_ids)
            self._num_used_units[block.key[0]] += len(block.unit_ids)
        block.ref_count += 1

    def _release(self, block: CachedBlock) -> None:
        block.ref_count -= 1
        if block.ref_count == 0:
            self._evictable[block.key] = block
            self._num_evictable_units += len(block.unit_ids)
            self._num_used_units[block.key[0]] -= len(block.unit_ids)

    def _take(self, num_units: int, owner: str) -> list[int] | None:
        """`num_units` units from the free list, evicting unread cached blocks (least recently released first) if
        it is short; None (nothing changed) if even that is not enough."""
        if num_units > self.num_free_units:
            return None
        while self.pool.num_free < num_units:
            _, block = self._evictable.popitem(last=False)
            del self._cached[block.key]
            self._num_evictable_units -= len(block.unit_ids)
            self.pool.free(block.unit_ids, CACHE_OWNER)
            self.num_evicted_blocks += 1
            self.num_cache_changes += 1
        return self.pool.allocate(num_units, owner)

    # --- allocation --------------------------------------------------------------------------
    def can_allocate(self, request_id: str, kind: CacheKind, num_tokens: int, reserve: int = 0,
                     prefix: list[CachedBlock] = ()) -> bool:
        """Whether `allocate` would succeed with `reserve` units left over (the scratch counted if it must be lent)."""
        return (self.num_new_units(request_id, kind, num_tokens, prefix) + self._scratch_to_take(kind) + reserve
                <= self.num_free_units)

    def allocate(self, request_id: str, kind: CacheKind, num_tokens: int, prefix: list[CachedBlock] = ()) -> bool:
        """Grow the request's table to cover `num_tokens` tokens; all or nothing. A request without a table starts
        it with the cached `prefix` blocks (from cached_prefix; its caller then skips their tokens)."""
        table = self._tables.get(request_id)
        if table is not None and table.kind != kind:
            raise RuntimeError(f"request {request_id} holds a {table.kind.value} table; convert it first")
        if table is not None and len(table.unit_ids) >= self.num_units_for(kind, num_tokens):
            return True  # most decode steps: the last block has room
        if table is not None or not prefix:
            prefix = []
        if not self.can_allocate(request_id, kind, num_tokens, prefix=prefix):
            return False
        for block in prefix:  # before taking new units, so that eviction cannot take these
            self._acquire(block)
        held = len(table.unit_ids) if table is not None else sum(len(block.unit_ids) for block in prefix)
        new_ids = self._take(max(0, self.num_units_for(kind, num_tokens) - held), request_id)
        assert new_ids is not None  # can_allocate counted every unit _take may use
        self._num_used_units[kind] += len(new_ids)
        if table is None:
            self._open_table(kind)
            table = self._tables[request_id] = RequestTable(kind)
            for block in prefix:
                table.unit_ids.extend(block.unit_ids)
                table.blocks.append(block)
        table.unit_ids.extend(new_ids)
        table.blocks.extend([None] * (len(new_ids) // self._units_per_block[kind]))
        return True

    def convert(self, request_id: str, new_kind: CacheKind, num_tokens: int) -> tuple[list[int], list[int]] | None:
        """Give the request a `new_kind` table for `num_tokens` tokens and drop its old table.

        Returns (old unit ids, new unit ids), or None (nothing changed) if the new table does not fit
        while the old one is still held: the rows are copied from old to new, so both exist at once.
        Blocks of the old table that are cached stay cached (others may read them); its own units are freed.
        """
        table = self._tables[request_id]
        if table.kind == new_kind:
            raise RuntimeError(f"request {request_id} already holds a {new_kind.value} table")
        num_new = self.num_units_for(new_kind, num_tokens)
        if num_new + self._scratch_to_take(new_kind) > self.num_free_units:
            return None
        new_ids = self._take(num_new, request_id)
        self._num_used_units[new_kind] += len(new_ids)
        old_ids = list(table.unit_ids)
        self._drop(request_id, table)
        self._open_table(new_kind)
        self._tables[request_id] = RequestTable(new_kind, new_ids, [None] * (len(new_ids) // self._units_per_block[
            new_kind]))
        return old_ids, new_ids

    def demote(self, request_id: str, num_tokens: int) -> tuple[list[int], list[int]] | None:
        """The request's KV table as hidden rows of `num_tokens` tokens in place (where hidden blocks are smaller): a
        block of its own keeps its first units, a shared one loses this reader and its rows get new units. Returns
        (old unit ids, new ones), overlapping (the runner reads all K/V rows before it writes), or None (nothing
        changed) where the new units and the scratch do not fit even with what it frees."""
        table, num_blocks = self._tables[request_id], self.num_blocks(num_tokens)
        kv_upb, hidden_upb = self._units_per_block[CacheKind.KV], self._units_per_block[CacheKind.HIDDEN]
        if table.kind != CacheKind.KV or hidden_upb >= kv_upb:
            raise RuntimeError(f"{request_id}: only a KV table demotes, and only where hidden blocks are smaller")
        units = [table.unit_ids[i * kv_upb:(i + 1) * kv_upb] for i in range(len(table.blocks))]
        kept = [u[:hidden_upb] if block is None else None for u, block in zip(units[:num_blocks], table.blocks)]
        to_free = [unit for i, (u, block) in enumerate(zip(units, table.blocks)) if block is None
                   for unit in (u[hidden_upb:] if i < num_blocks else u)]
        shared = [block for block in table.blocks if block is not None]
        num_new, num_kept = hidden_upb * kept.count(None), hidden_upb * (len(kept) - kept.count(None))
        unread = sum(len(block.unit_ids) for block in shared if block.ref_count == 1)  # evictable once released
        if num_new + self._scratch_to_take(CacheKind.HIDDEN) > self.num_free_units + len(to_free) + unread:
            return None
        del self._tables[request_id]
        self.pool.free(to_free, request_id)
        self._num_used_units[CacheKind.KV] -= num_kept + len(to_free)
        self._num_used_units[CacheKind.HIDDEN] += num_kept + num_new
        for block in reversed(shared):  # the tail first, as _drop
            self._release(block)
        taken = iter(self._take(num_new, request_id))
        new_ids = [unit for u in kept for unit in (u if u is not None else [next(taken) for _ in range(hidden_upb)])]
        self._open_table(CacheKind.HIDDEN)
        self._tables[request_id] = RequestTable(CacheKind.HIDDEN, new_ids, [None] * num_blocks)
        return [unit for u in units for unit in u], new_ids

    def free(self, request_id: str) -> None:
        """Drop the request's table: its own units return to the pool, its cached blocks lose a reader; a second
        call does nothing."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            self._drop(request_id, table)

    def _drop(self, request_id: str, table: RequestTable) -> None:
        upb = self._units_per_block[table.kind]
        own = [unit for index, block in enumerate(table.blocks) if block is None
               for unit in table.unit_ids[index * upb:(index + 1) * upb]]
        self.pool.free(own, request_id)
        self._num_used_units[table.kind] -= len(own)
        for block in reversed(table.blocks):  # the tail first: evicted before the prefix it extends
            if block is not None:
                self._release(block)
        if table.kind == CacheKind.HIDDEN:
            self._num_hidden_tables -= 1
            if self._num_hidden_tables == 0 and self.scratch_unit_ids:
                self.pool.free(list(self.scratch_unit_ids), SCRATCH_OWNER)
                self.scratch_unit_ids = ()

    def _open_table(self, kind: CacheKind) -> None:
        """Count a new table; the first hidden one borrows the scratch's units (its caller checked they fit)."""
        if kind != CacheKind.HIDDEN:
            return
        self._num_hidden_tables += 1
        if not self.scratch_unit_ids and self.num_scratch_units:
            unit_ids = self._take(self.num_scratch_units, SCRATCH_OWNER)
            assert unit_ids is not None
            self.scratch_unit_ids = tuple(unit_ids)

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
        """Units in use per kind (a shared block once), `scratch`: lent to the recompute scratch, `cached`: blocks
        nobody reads (reusable, evictable), and free."""
        used = {kind.value: num for kind, num in self._num_used_units.items()}
        used["scratch"] = len(self.scratch_unit_ids)
        used["cached"] = self._num_evictable_units
        used["free"] = self.pool.num_free
        return used

    def check_invariants(self) -> None:
        """Every count kept as it changes agrees with the tables, blocks and pool (cache/invariants.py)."""
        check_manager(self)
