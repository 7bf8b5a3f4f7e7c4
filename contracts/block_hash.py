"""Chained content hashes of full KV blocks, the key of every prefix cache in Tandem:

    root = H("tandem-prefix-v1" | model_id | cache_salt);  h[i] = H(h[i-1] | tokens of block i)

Torch-free and deterministic across processes, machines and Python versions (the router computes
the same hashes as the engines). Equal hashes mean equal KV; different cache salts give disjoint
chains, which keeps tenants from sharing cache entries.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes  # 16-byte digest
_DIGEST_BYTES = 16
_VERSION = b"tandem-prefix-v1"


def root_hash(model_id: str, cache_salt: str | None = None) -> BlockHash:
    """The seed of a hash chain: one per (model, tenant salt)."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    h.update(_VERSION)
    for part in (model_id, cache_salt or ""):
        encoded = part.encode("utf-8")
        h.update(struct.pack("<I", len(encoded)))
        h.update(encoded)
    return h.digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one full block given the hash of the block before it (or the root)."""
    h = hashlib.blake2b(parent, digest_size=_DIGEST_BYTES)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    parent: BlockHash,
    num_hashed_blocks: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` after the first `num_hashed_blocks`.

    `parent` is the hash of block `num_hashed_blocks - 1` (or the root when 0), so a sequence
    that grows can extend its chain without rehashing what it already hashed.
    """
    hashes: list[BlockHash] = []
    num_full_blocks = len(token_ids) // block_size
    for i in range(num_hashed_blocks, num_full_blocks):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def prompt_block_hashes(
    token_ids: Sequence[int], block_size: int, model_id: str, cache_salt: str | None = None
) -> list[BlockHash]:
    """All full-block hashes of a prompt, as the router and the engine both compute them."""
    return hash_blocks(token_ids, block_size, root_hash(model_id, cache_salt))
