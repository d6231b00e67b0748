"""The prefix cache as the scheduler reads it: each request's block keys, chained over its tokens and extended as
they come, and the cached blocks a waiting request can start from. Lookups are kept while no block is registered
or evicted, since the apt policies price every waiting request every step."""
from __future__ import annotations

from aptserve.cache.manager import CacheManager
from aptserve.cache.tables import CachedBlock, CacheKind
from aptserve.cache.prefix import chain_keys, root_key
from aptserve.request import Request


class PrefixLookup:
    def __init__(self, cache: CacheManager, root: str) -> None:
        """`root`: whatever else makes two blocks of the same tokens hold different rows (model, dtype)."""
        self.cache = cache
        self._root = root_key(root)
        self._lookups: dict[tuple[str, CacheKind, int], list[CachedBlock]] = {}
        self._lookups_at = -1  # the cache's change count they were made at

    def block_keys(self, request: Request) -> list[bytes]:
        if len(request.block_keys) < request.num_tokens // self.cache.block_size:
            chain_keys(request.all_token_ids, self.cache.block_size, request.block_keys, self._root)
        return request.block_keys

    def cached_prefix(self, request: Request, kind: CacheKind) -> list[CachedBlock]:
        """The cached `kind` blocks a waiting request can start from (none with prefix caching off, nor for a
        request that wants its prompt's log probabilities: they come from computing every prompt token, as vLLM)."""
        if not self.cache.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        if self._lookups_at != self.cache.num_cache_changes:
            self._lookups, self._lookups_at = {}, self.cache.num_cache_changes
        key = (request.request_id, kind, request.num_tokens)
        if key not in self._lookups:
            self._lookups[key] = self.cache.cached_prefix(kind, self.block_keys(request), request.num_tokens)
        return self._lookups[key]
