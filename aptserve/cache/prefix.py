"""Content keys of full cache blocks, for prefix caching: a block's key is a digest chained over the token ids of
the block and of every block before it, rooted in a salt (whatever else changes the rows: the model, the dtype).
Two requests whose first n blocks hold the same tokens get the same n keys, and no other request does."""
from __future__ import annotations

import hashlib
from array import array


def root_key(salt: str) -> bytes:
    return hashlib.blake2b(salt.encode(), digest_size=16).digest()


def chain_keys(token_ids: list[int], block_size: int, keys: list[bytes], root: bytes) -> None:
    """Extend `keys` (the keys of the first len(keys) blocks) with those of every further full block."""
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = keys[-1] if keys else root
        block = array("q", token_ids[start:start + block_size]).tobytes()
        keys.append(hashlib.blake2b(parent + block, digest_size=16).digest())
