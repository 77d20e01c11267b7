"""Opt-in prefix-cache eviction order for vLLM's scheduler: `VATTN_PREFIX_EVICTION=discard-lru`,
`second-chance` or `adaptive`.

vLLM keeps the KV of finished requests as a prefix cache and evicts free cached blocks in LRU order
(its free-block queue). With `discard-lru`, each freed cached block carries a one-bit prediction,
"discard" (not reused soon) or "keep", and discard blocks are evicted before every kept one, the
oldest discarded first. The predictor is what the scheduler can compute online: a block is kept if
at least `VATTN_PREFIX_MIN_USERS` requests (default 2: it was reused at least once) have used it,
discarded otherwise. Measured with vLLM's own scheduler on the CPU (`bench/sched_replay.py`,
Mooncake conversation trace; benchmarks/results/*-sched-replay-threshold.md): 0.81-0.92x of LRU's
cached prompt tokens over 3000 requests at one H200's budget; the gains it showed over shorter runs
(up to 1.46x) came from its first-pass rule (below), not from the bit: without the rule, 0.58-0.95x.
m=2 was never worse than m=5 or 10. Off by default. (The paper-model simulator,
`vllm_vattention/evict/`, had preferred m=5; its cache holds no running requests.)

`second-chance` trusts the same bit less: the queue stays LRU, and a "keep" block that reaches the
front is moved to the back once (CLOCK with the prediction as reference bit), so a wrong bit costs
at most one extra trip through the queue, and a first turn whose continuation comes later is kept
as long as LRU would keep it (what discard-lru gets wrong at large budgets).

`adaptive` learns how far to trust the bit, as ARC learns recency against frequency: free cached
blocks form two LRU lists by the bit, the victim comes from the "discard" list while that list
holds more than a target share, and misses on recently evicted hashes (ghost lists) move the
target: up (protect single-use blocks) when evicted "discard" blocks are asked for again, down
(discard-first) when evicted "keep" blocks are (class `_Adaptive`). second-chance and adaptive
measured 1.00-1.05x of LRU at every point of the replay: safe, small gains.

This is independent of the vAttention attention backend (it changes only which cached blocks the
scheduler reuses) and off by default: with `lru` nothing is patched.

Monkeypatch (the only one outside worker.py):
- Why: vLLM 0.25 has no eviction-policy hook; the order lives in BlockPool.free_blocks.
- What: `BlockPool.get_new_blocks` and `touch` are wrapped to count the requests using each block
  (a new allocation is the first user, a prefix hit by another request one more); `free_blocks` is
  replaced by a version that mirrors vLLM 0.25's (reference counts, blocks without a hash first)
  and keeps discard-predicted cached blocks in a segment at the front of the queue, newest at the
  segment's end (linked in after the segment's last block, as FreeKVCacheBlockQueue links blocks),
  after the first pass over the pool (while never-used blocks remain, vLLM's order is kept:
  evicting a cached block while an empty one is free would only lose); with second-chance,
  `get_new_blocks` first moves the "keep" blocks it meets at the front to the back, once each
  (`_pass_over_kept`); with adaptive, it first moves the chosen victims right behind the
  never-cached blocks at the front (`_choose_victims`), and `get_cached_block` is wrapped to see
  lookup misses (ghost hits). Installed once per process (idempotent; a second install may change the
  mode and threshold), from the
  `vllm.general_plugins` entry point, which vLLM runs in the engine-core process too.
- When it can go: when vLLM exposes an eviction policy interface for its block pool (our draft:
  patches/vllm-block-pool-eviction-policy.diff).
"""

from __future__ import annotations

MODES = ("lru", "discard-lru", "second-chance", "adaptive")
DEFAULT_MIN_USERS = 2
ACTIVE_LOG = "vAttention prefix eviction:"  # logged once per process where a policy is installed
_STATE_ATTR = "_vattn_prefix_eviction"


class _UseCounts:
    """Per block pool: requests that used each block since it was last allocated, and which blocks
    were ever handed out (the first pass over the pool)."""

    def __init__(self, num_blocks: int):
        self.uses = [0] * num_blocks
        self.seen = bytearray(num_blocks)
        self.fresh_left = num_blocks - 1  # block 0 is vLLM's null block, never handed out
        self.in_drop = bytearray(num_blocks)  # block is in the discard segment of the free queue
        self.chance = bytearray(num_blocks)  # second-chance: extra passes left to a kept block
        self.drop_tail = None  # the segment's last (newest) block
        self.discarded = 0
        self.kept = 0

    def leave_drop(self, block) -> None:
        """`block` is about to leave the free queue (allocated or hit)."""
        if not self.in_drop[block.block_id]:
            return
        self.in_drop[block.block_id] = 0
        if block is self.drop_tail:
            prev = block.prev_free_block  # the queue's fake head has block_id -1
            keep_prev = prev is not None and prev.block_id >= 0 and self.in_drop[prev.block_id]
            self.drop_tail = prev if keep_prev else None

    def tail_linked(self):
        t = self.drop_tail
        if t is None or not self.in_drop[t.block_id] or t.prev_free_block is None or t.next_free_block is None:
            self.drop_tail = None
        return self.drop_tail


class _Adaptive:
    """adaptive (ARC's adaptation over the one bit): free cached blocks form two LRU lists by the
    bit, T1 ("discard": used by fewer than m requests) and T2 ("keep"); the victim is T1's oldest
    while T1 holds more than a target p of the free cached blocks, else T2's oldest. Evicted
    hashes are remembered in two ghost lists; a later lookup that misses on a ghost says which
    choice was wrong: a T1 ghost (the bit said discard, a request wanted it) raises p (evict T1
    less), a T2 ghost lowers it (evict T1 first, as discard-lru does)."""

    def __init__(self, num_blocks: int):
        from collections import OrderedDict, deque
        self.cls = bytearray(num_blocks)  # 0: not a free cached block; 1: in T1; 2: in T2
        self.stamp = [0] * num_blocks  # lazy deletion from the lists
        self.lists = (None, deque(), deque())
        self.count = [0, 0, 0]
        self.ghosts = (None, OrderedDict(), OrderedDict())
        self.capacity = num_blocks
        self.p = 0.0
        self.ghost_hits = [0, 0, 0]

    def enter(self, block, k: int) -> None:
        i = block.block_id
        self.cls[i] = k
        self.stamp[i] += 1
        self.count[k] += 1
        lst = self.lists[k]
        lst.append((i, self.stamp[i]))
        if len(lst) > 4 * self.capacity:  # drop stale entries now and then
            live = [(j, st) for j, st in lst if self.cls[j] == k and self.stamp[j] == st]
            lst.clear()
            lst.extend(live)

    def leave(self, block) -> None:
        k = self.cls[block.block_id]
        if k:
            self.cls[block.block_id] = 0
            self.count[k] -= 1

    def victim(self) -> tuple[int, int]:
        """(block id, list) to evict next (a free cached block exists); it leaves its list."""
        k = 1 if self.count[1] and (self.count[1] > self.p or not self.count[2]) else 2
        lst = self.lists[k]
        while True:
            i, st = lst.popleft()
            if self.cls[i] == k and self.stamp[i] == st:
                self.cls[i] = 0
                self.count[k] -= 1
                return i, k

    def remember(self, block_hash, k: int) -> None:
        g = self.ghosts[k]
        g[block_hash] = None
        if len(g) > self.capacity:
            g.popitem(last=False)

    def missed(self, key) -> None:
        """A lookup missed `key` (a block hash with its group id)."""
        g1, g2 = self.ghosts[1], self.ghosts[2]
        if key in g1:
            del g1[key]
            self.ghost_hits[1] += 1
            self.p = min(self.capacity, self.p + max(1.0, len(g2) / max(1, len(g1))))
        elif key in g2:
            del g2[key]
            self.ghost_hits[2] += 1
            self.p = max(0.0, self.p - max(1.0, len(g1) / max(1, len(g2))))


def _pool_state(pool, attr: str, cls):
    """Our per-pool state (`cls(num_blocks)`), kept on the BlockPool instance, made on first use."""
    st = pool.__dict__.get(attr)
    if st is None:
        st = cls(len(pool.blocks))
        setattr(pool, attr, st)
    return st


def _adaptive(pool) -> _Adaptive:
    return _pool_state(pool, "_vattn_arc", _Adaptive)


def _choose_victims(pool, a: _Adaptive, n: int) -> None:
    """adaptive: put the blocks the rule evicts at the front of vLLM's free queue, so that its
    popleft_n(n) takes them (after the never-cached blocks, which vLLM keeps at the front)."""
    q = pool.free_block_queue
    node, empty = q.fake_free_list_head.next_free_block, 0
    while empty < n and node is not q.fake_free_list_tail and node.block_hash is None:
        empty, node = empty + 1, node.next_free_block
    victims = []
    for _ in range(n - empty):
        if not (a.count[1] or a.count[2]):
            break
        i, k = a.victim()
        block = pool.blocks[i]
        a.remember(block.block_hash, k)
        victims.append(block)
    for b in victims:
        q.remove(b)
    if victims:
        # behind the empty blocks: popleft_n(n) then takes the empty ones and exactly these
        anchor = q.fake_free_list_head
        for _ in range(empty):
            anchor = anchor.next_free_block
        _link_after(q, anchor, victims)


def _link_after(queue, anchor, blocks) -> None:
    """Link `blocks` (in order) right after `anchor` in vLLM's free-block list."""
    nxt = anchor.next_free_block
    prev = anchor
    for b in blocks:
        b.prev_free_block = prev
        prev.next_free_block = b
        prev = b
    prev.next_free_block = nxt
    nxt.prev_free_block = prev
    queue.num_free_blocks += len(blocks)


def _counts(pool) -> _UseCounts:
    return _pool_state(pool, "_vattn_uses", _UseCounts)


def install(mode: str, min_users: int = DEFAULT_MIN_USERS, passes: int = 1) -> bool:
    """Patch vLLM's BlockPool for `mode` (no-op for "lru"). Returns whether a policy is active."""
    if mode not in MODES:
        raise ValueError(f"prefix eviction mode {mode!r}; use one of {MODES}")
    if not 1 <= passes <= 255:
        raise ValueError(f"second-chance passes={passes}: use 1 to 255")
    from vllm.v1.core.block_pool import BlockPool
    state = getattr(BlockPool, _STATE_ATTR, None)
    if mode == "lru":
        return False
    if state is not None:  # already installed in this process: the mode and threshold may change
        state.update(mode=mode, min_users=min_users, passes=passes)
        return True
    state = {"mode": mode, "min_users": min_users, "passes": passes,
             "originals": (BlockPool.get_new_blocks, BlockPool.touch, BlockPool.free_blocks,
                           BlockPool.get_cached_block)}
    orig_new, orig_touch, _, orig_lookup = state["originals"]

    def get_new_blocks(self, num_blocks):
        c = _counts(self)
        if state["mode"] == "second-chance":
            _pass_over_kept(self.free_block_queue, c, num_blocks)
        elif state["mode"] == "adaptive":
            _choose_victims(self, _adaptive(self), num_blocks)
        if c.drop_tail is not None:
            # popleft_n takes from the front: blocks without a hash, then the segment, oldest first
            node, n = self.free_block_queue.fake_free_list_head.next_free_block, num_blocks
            while n and node is not None and node is not self.free_block_queue.fake_free_list_tail:
                c.leave_drop(node)
                node, n = node.next_free_block, n - 1
        blocks = orig_new(self, num_blocks)
        arc = self.__dict__.get("_vattn_arc")
        for b in blocks:
            c.uses[b.block_id] = 1
            c.chance[b.block_id] = 0
            if arc is not None:
                arc.leave(b)
            if not c.seen[b.block_id]:
                c.seen[b.block_id] = 1
                c.fresh_left -= 1
        return blocks

    def touch(self, blocks):
        c = _counts(self)
        for b in blocks:
            if not b.is_null:
                c.uses[b.block_id] += 1
                if b.ref_cnt == 0:
                    c.leave_drop(b)  # a prefix hit takes it out of the free queue
                    if state["mode"] == "adaptive":
                        _adaptive(self).leave(b)
        return orig_touch(self, blocks)

    def get_cached_block(self, block_hash, kv_cache_group_ids):
        found = orig_lookup(self, block_hash, kv_cache_group_ids)
        if found is None and state["mode"] == "adaptive":
            from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
            a = _adaptive(self)
            for gid in kv_cache_group_ids:
                a.missed(make_block_hash_with_group_id(block_hash, gid))
        return found

    def free_blocks(self, ordered_blocks):
        # vLLM 0.25's free_blocks, with the discard-predicted cached blocks moved to the front.
        c = _counts(self)
        second_chance = state["mode"] == "second-chance"
        adaptive = _adaptive(self) if state["mode"] == "adaptive" else None
        reorder = c.fresh_left <= 0 and state["mode"] == "discard-lru"
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
                    if second_chance:
                        c.chance[block.block_id] = state["passes"] if c.uses[block.block_id] >= state["min_users"] else 0
                    elif adaptive is not None:
                        adaptive.enter(block, 2 if c.uses[block.block_id] >= state["min_users"] else 1)
        c.discarded += len(discard)
        c.kept += len(keep)
        q = self.free_block_queue
        if discard:
            tail = c.tail_linked()
            if tail is not None:
                _link_after(q, tail, discard)  # behind older discarded blocks
            else:
                q.prepend_n(discard)
            for b in discard:
                c.in_drop[b.block_id] = 1
            c.drop_tail = discard[-1]
        q.prepend_n(no_hash)  # empty blocks are always used first, as in vLLM
        q.append_n(keep)

    BlockPool.get_new_blocks = get_new_blocks
    BlockPool.touch = touch
    BlockPool.free_blocks = free_blocks
    BlockPool.get_cached_block = get_cached_block
    setattr(BlockPool, _STATE_ATTR, state)
    import logging  # under vLLM's logger, so its handlers print us (a "vllm_vattention.*" logger is dropped)
    rule = {"discard-lru": "are evicted first", "second-chance": "get no second pass through the free queue",
            "adaptive": "form the list whose share of the free queue adapts to ghost hits"}[mode]
    logging.getLogger("vllm.vattention").info("%s %s: blocks used by fewer than %d requests %s",
                                              ACTIVE_LOG, mode, min_users, rule)
    return True


def _pass_over_kept(queue, c: _UseCounts, n: int) -> None:
    """second-chance: before vLLM takes `n` blocks from the front of its free queue, move each kept
    block met there (reused by >= min_users requests, not yet passed over) to the back, once: a
    kept block is evicted after one more trip through the queue, not never (CLOCK's reference bit,
    set by the one-bit prediction). Walks at most the queue's length; vLLM then pops the front."""
    tail = queue.fake_free_list_tail
    node, taken, budget = queue.fake_free_list_head.next_free_block, 0, queue.num_free_blocks
    while taken < n and budget > 0 and node is not tail:
        nxt = node.next_free_block
        if c.chance[node.block_id]:
            c.chance[node.block_id] -= 1
            queue.remove(node)
            queue.append(node)  # met again at the end of this walk, if it gets that far: then taken
        else:
            taken += 1
        node, budget = nxt, budget - 1


def uninstall() -> None:
    """Restore vLLM's BlockPool (tests)."""
    from vllm.v1.core.block_pool import BlockPool
    state = getattr(BlockPool, _STATE_ATTR, None)
    if state is not None:
        (BlockPool.get_new_blocks, BlockPool.touch, BlockPool.free_blocks,
         BlockPool.get_cached_block) = state["originals"]
        delattr(BlockPool, _STATE_ATTR)
