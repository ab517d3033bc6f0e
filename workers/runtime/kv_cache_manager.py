"""KV-cache blocks for the engine: one pool sized once, handed out incrementally, shared by prefix hash.

vLLM v1's design at a tenth of the size. Every block has a reference count. A request holds its blocks
in sequence order and asks for more only as its tokens grow (`allocate_slots`), which answers False,
changing nothing, when the pool cannot give them: the scheduler then preempts. A full block is
identified by a hash chained over (parent block's hash, its token ids, the cache key: model and
adapter), so a request whose prompt starts with the same tokens shares those blocks instead of
computing them again. A block whose count falls to zero keeps its hash and waits in the free queue
(least recently freed first); it is evicted only when allocation pops it for reuse, never while in use.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from workers.runtime.kv_cache import blocks_for


@dataclass
class Block:
    """One block of block_size token slots in every layer's K and V pools."""

    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered for reuse


def block_hash(parent: bytes | None, token_ids: list[int], cache_key: str) -> bytes:
    """The prefix hash of a full block: blake2b over (parent hash, token ids, model/adapter key)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root:" + cache_key.encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """The blocks, their free queue (LRU eviction order) and the hash -> block map of cached blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # head: evicted first
        self._cached: dict[bytes, Block] = {}
        self.evictions = 0  # cached blocks reused for other tokens

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks with no holder, cached or not: what allocation can take."""
        return len(self._free)

    def lookup(self, hash_: bytes) -> Block | None:
        return self._cached.get(hash_)

    def take(self, n: int) -> list[Block]:
        """n blocks off the head of the free queue, each with one reference; caller checked num_free."""
        out = []
        for _ in range(n):
            block = self.blocks[self._free.popitem(last=False)[0]]
            if block.hash is not None:  # evict: its old tokens are about to be overwritten
                del self._cached[block.hash]
                block.hash = None
                self.evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def share(self, blocks: list[Block]) -> None:
        """One more reference to each of blocks (a prefix hit); an idle cached block leaves the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.id]
            block.ref_count += 1

    def release(self, blocks: list[Block]) -> None:
        """Drops one reference to each; blocks nobody holds go to the free queue's tail, a sequence's last
        block first, so that its first blocks (the likeliest to be shared) are evicted last."""
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.id] = None

    def register(self, block: Block, hash_: bytes) -> None:
        """Makes a full block findable by its hash (unless another block already holds those tokens)."""
        if block.hash is None and hash_ not in self._cached:
            block.hash = hash_
            self._cached[hash_] = block


@dataclass
class PrefixHit:
    """Cached blocks at the start of a request's tokens."""

    blocks: list[Block]
    num_tokens: int  # len(blocks) * block_size
    query_tokens: int  # tokens looked up (the request's whole length)


class KVCacheManager:
    """Which blocks each request holds, growing them step by step; prefix lookups and their hit rate."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks: dict[str, list[Block]] = {}  # request id -> its blocks, in sequence order
        self._hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its full blocks so far
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, found cached

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def usage(self) -> float:
        """Share of the pool held by requests."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_of(self, request_id: str) -> list[int]:
        return [b.id for b in self._blocks.get(request_id, ())]

    def _full_block_hashes(self, request_id: str, token_ids: list[int], cache_key: str, upto: int) -> list[bytes]:
        """Hashes of the request's first `upto` full blocks, extending what was computed before."""
        hashes = self._hashes.setdefault(request_id, [])
        bs = self.block_size
        while len(hashes) < upto:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs], cache_key))
        return hashes

    def find_prefix(self, request_id: str, token_ids: list[int], cache_key: str) -> PrefixHit:
        """The longest cached run of full blocks at the start of token_ids, leaving at least the last token
        to compute (its logits draw the next token). Counted in the hit rate once allocated."""
        if not self.enable_prefix_caching:
            return PrefixHit([], 0, len(token_ids))
        hashes = self._full_block_hashes(request_id, token_ids, cache_key, (len(token_ids) - 1) // self.block_size)
        hit = []
        for hash_ in hashes:
            block = self.pool.lookup(hash_)
            if block is None:
                break
            hit.append(block)
        return PrefixHit(hit, len(hit) * self.block_size, len(token_ids))

    def allocate_slots(self, request_id: str, num_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Makes the request hold blocks for its first num_tokens tokens (taking the prefix hit's blocks first);
        False, with nothing changed, when the pool has too few free blocks."""
        held = self._blocks.get(request_id, [])
        shared = prefix.blocks if prefix else []
        need = blocks_for(num_tokens, self.block_size) - len(held) - len(shared)
        idle_shared = sum(1 for b in shared if b.ref_count == 0)  # sharing takes these off the free queue
        if need > self.pool.num_free - idle_shared:
            return False
        self.pool.share(shared)
        self._blocks[request_id] = held + shared + self.pool.take(max(0, need))
        if prefix is not None:
            self.query_tokens += prefix.query_tokens
            self.hit_tokens += prefix.num_tokens
        return True

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed: int, cache_key: str) -> None:
        """Registers the blocks whose every slot now holds computed K/V, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        blocks = self._blocks[request_id]
        full = min(num_computed // self.block_size, len(blocks))
        hashes = self._full_block_hashes(request_id, token_ids, cache_key, full)  # may hold more (lookups)
        for block, hash_ in zip(blocks[:full], hashes[:full], strict=True):
            self.pool.register(block, hash_)

    def free(self, request_id: str) -> None:
        """Gives back every block of the request (cached ones stay findable until evicted)."""
        self.pool.release(self._blocks.pop(request_id, []))
        self._hashes.pop(request_id, None)
