"""The paged cache pool: pure bookkeeping of fixed-size units (the runner owns the tensors)."""
from aptserve.cache.manager import CacheKind, CacheManager
from aptserve.cache.pool import UnitPool

__all__ = ["CacheKind", "CacheManager", "UnitPool"]
