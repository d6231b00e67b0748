"""What the cache manager keeps per request and per shared block, and the pool owners that are not requests."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class CacheKind(str, enum.Enum):
    KV = "kv"
    HIDDEN = "hidden"


CACHE_OWNER = "<prefix-cache>"  # the pool's owner of every registered block's units
SCRATCH_OWNER = "<hidden-scratch>"  # ... and of the units lent to the recompute scratch


@dataclass(eq=False)
class CachedBlock:
    key: tuple[CacheKind, bytes]
    unit_ids: list[int]
    ref_count: int = 0


@dataclass
class RequestTable:
    kind: CacheKind
    unit_ids: list[int] = field(default_factory=list)
    # Per block: the cached block it is (shared, or registered by this request), or None (units of its own).
    blocks: list[CachedBlock | None] = field(default_factory=list)
    num_blocks_checked: int = 0  # blocks register() has already looked at
