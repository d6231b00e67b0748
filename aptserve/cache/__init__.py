"""The paged cache pool: pure bookkeeping of fixed-size units (the runner owns the tensors)."""
from aptserve.cache.manager import CacheManager
from aptserve.cache.pool import UnitPool
from aptserve.cache.tables import CacheKind

__all__ = ["CacheKind", "CacheManager", "UnitPool"]
