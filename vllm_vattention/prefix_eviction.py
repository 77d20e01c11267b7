"""Opt-in prefix-cache eviction order for vLLM's scheduler: `VATTN_PREFIX_EVICTION=discard-lru`.

vLLM keeps the KV of finished requests as a prefix cache and evicts free cached blocks in LRU order
(its free-block queue). With `discard-lru`, each freed cached block carries a one-bit prediction,
"discard" (not reused soon) or "keep", and discard blocks are evicted before every kept one. The
predictor is what the scheduler can compute online: a block is kept if at least
`VATTN_PREFIX_MIN_USERS` requests (default 2) have used it (a shared system prompt, a document
several conversations read), discarded otherwise. The simulator (`vllm_vattention/evict/`,
policy "Discard-LRU" with predictor "online-shared") measures the same rule on a trace.

This is independent of the vAttention attention backend (it changes only which cached blocks the
scheduler reuses) and off by default: with `lru` nothing is patched.

Monkeypatch (the only one outside worker.py):
- Why: vLLM 0.25 has no eviction-policy hook; the order lives in BlockPool.free_blocks.
- What: `BlockPool.get_new_blocks` and `touch` are wrapped to count the requests using each block
  (a new allocation is the first user, a prefix hit by another request one more); `free_blocks` is
  replaced by a version that mirrors vLLM 0.25's (reference counts, blocks without a hash first)
  and puts discard-predicted cached blocks at the front of the queue, after the first pass over
  the pool (while never-used blocks remain, vLLM's order is kept: evicting a cached block while an
  empty one is free would only lose). Installed once per process (idempotent), from the
  `vllm.general_plugins` entry point, which vLLM runs in the engine-core process too.
- When it can go: when vLLM exposes an eviction policy interface for its block pool.
"""

from __future__ import annotations

MODES = ("lru", "discard-lru")
_STATE_ATTR = "_vattn_prefix_eviction"


class _UseCounts:
    """Per block pool: requests that used each block since it was last allocated, and which blocks
    were ever handed out (the first pass over the pool)."""

    def __init__(self, num_blocks: int):
        self.uses = [0] * num_blocks
        self.seen = bytearray(num_blocks)
        self.fresh_left = num_blocks - 1  # block 0 is vLLM's null block, never handed out
        self.discarded = 0
        self.kept = 0


def _counts(pool) -> _UseCounts:
    c = pool.__dict__.get("_vattn_uses")
    if c is None:
        c = pool._vattn_uses = _UseCounts(len(pool.blocks))
    return c


def install(mode: str, min_users: int = 2) -> bool:
    """Patch vLLM's BlockPool for `mode` (no-op for "lru"). Returns whether a policy is active."""
    if mode not in MODES:
        raise ValueError(f"prefix eviction mode {mode!r}; use one of {MODES}")
    from vllm.v1.core.block_pool import BlockPool
    state = getattr(BlockPool, _STATE_ATTR, None)
    if mode == "lru":
        return False
    if state is not None:  # already installed in this process: only the threshold may change
        state["min_users"] = min_users
        return True
    state = {"min_users": min_users, "originals": (BlockPool.get_new_blocks, BlockPool.touch, BlockPool.free_blocks)}
    orig_new, orig_touch, _ = state["originals"]

    def get_new_blocks(self, num_blocks):
        blocks = orig_new(self, num_blocks)
        c = _counts(self)
        for b in blocks:
            c.uses[b.block_id] = 1
            if not c.seen[b.block_id]:
                c.seen[b.block_id] = 1
                c.fresh_left -= 1
        return blocks

    def touch(self, blocks):
        c = _counts(self)
        for b in blocks:
            if not b.is_null:
                c.uses[b.block_id] += 1
        return orig_touch(self, blocks)

    def free_blocks(self, ordered_blocks):
        # vLLM 0.25's free_blocks, with the discard-predicted cached blocks moved to the front.
        c = _counts(self)
        reorder = c.fresh_left <= 0
        no_hash, discard, keep = [], [], []
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and not block.is_null:
                if block.block_hash is None:
                    no_hash.append(block)
                elif reorder and c.uses[block.block_id] < state["min_users"]:
                    discard.append(block)
                else:
                    keep.append(block)
        c.discarded += len(discard)
        c.kept += len(keep)
        self.free_block_queue.prepend_n(no_hash + discard)  # evicted first, in the order given
        self.free_block_queue.append_n(keep)

    BlockPool.get_new_blocks = get_new_blocks
    BlockPool.touch = touch
    BlockPool.free_blocks = free_blocks
    setattr(BlockPool, _STATE_ATTR, state)
    return True


def uninstall() -> None:
    """Restore vLLM's BlockPool (tests)."""
    from vllm.v1.core.block_pool import BlockPool
    state = getattr(BlockPool, _STATE_ATTR, None)
    if state is not None:
        BlockPool.get_new_blocks, BlockPool.touch, BlockPool.free_blocks = state["originals"]
        delattr(BlockPool, _STATE_ATTR)
