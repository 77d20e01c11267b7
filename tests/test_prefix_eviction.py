"""The opt-in eviction order on vLLM's real BlockPool (CPU): blocks used by one request are
evicted before blocks several requests shared, only after the first pass over the pool; vLLM's
order is untouched when the mode is lru; installing twice does not stack the patch."""

import pytest
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

from vllm_vattention import prefix_eviction as PE
from vllm_vattention.config import VattnConfig
from vllm_vattention.errors import ConfigError


@pytest.fixture
def patched():
    assert PE.install("discard-lru", min_users=2)
    yield
    PE.uninstall()


def cache(pool, blocks, tag):
    for i, b in enumerate(blocks):
        b.set_block_hash(make_block_hash_with_group_id(f"{tag}{i}".encode(), 0))


def reused_block(pool, tag):
    """A cached block two requests used (allocated, hit by a second request, freed by both)."""
    b = pool.get_new_blocks(1)
    cache(pool, b, tag)
    pool.touch(b)
    pool.free_blocks(b)
    pool.free_blocks(b)
    return b


def cycle(pool):
    """Hand out every block once (the first pass), then give them back without hashes."""
    blocks = pool.get_new_blocks(pool.get_num_free_blocks())
    pool.free_blocks(blocks)


def test_lru_mode_patches_nothing():
    original = BlockPool.free_blocks
    assert PE.install("lru") is False
    assert BlockPool.free_blocks is original
    with pytest.raises(ValueError, match="mode 'mru'"):
        PE.install("mru")


def test_install_is_idempotent(patched):
    patched_free = BlockPool.free_blocks
    assert PE.install("discard-lru", min_users=3)
    assert BlockPool.free_blocks is patched_free  # not wrapped twice
    PE.uninstall()
    assert BlockPool.free_blocks is not patched_free
    PE.install("discard-lru", min_users=2)


def test_single_use_blocks_are_evicted_before_shared_ones(patched):
    pool = BlockPool(num_gpu_blocks=9, enable_caching=True, hash_block_size=16)
    cycle(pool)
    a = pool.get_new_blocks(2)  # request A: a shared prefix block and one of its own
    cache(pool, a, "a")
    b = pool.get_new_blocks(1)  # request B hits A's first block and adds one of its own
    pool.touch([a[0]])
    cache(pool, b, "b")
    pool.free_blocks(reversed(a))  # A finishes (tail first, as vLLM frees)
    pool.free_blocks(reversed([a[0]] + b))  # B finishes
    order = [blk.block_id for blk in pool.free_block_queue.get_all_free_blocks()]
    # single-user cached blocks come first, oldest first (a[1], then b[0]), the shared a[0] last;
    # vLLM's LRU would put all three at the tail: a[1], b[0], a[0]
    assert order[:2] == [a[1].block_id, b[0].block_id]
    assert order[-1] == a[0].block_id
    assert len(order) == pool.free_block_queue.num_free_blocks
    assert pool._vattn_uses.discarded == 2 and pool._vattn_uses.kept == 1
    nxt = pool.get_new_blocks(2)  # the next allocations evict the single-user blocks
    assert {x.block_id for x in nxt} == {a[1].block_id, b[0].block_id}


def test_vllm_order_is_kept_during_the_first_pass(patched):
    pool = BlockPool(num_gpu_blocks=9, enable_caching=True, hash_block_size=16)
    a = pool.get_new_blocks(2)
    cache(pool, a, "a")
    pool.free_blocks(reversed(a))
    order = [blk.block_id for blk in pool.free_block_queue.get_all_free_blocks()]
    assert order[-2:] == [a[1].block_id, a[0].block_id]  # appended at the tail, as vLLM does
    assert pool._vattn_uses.discarded == 0


def test_config_reads_the_mode_and_threshold():
    c = VattnConfig.from_env({"VATTN_PREFIX_EVICTION": "discard-lru", "VATTN_PREFIX_MIN_USERS": "3"})
    assert (c.prefix_eviction, c.prefix_min_users) == ("discard-lru", 3)
    assert VattnConfig.from_env({}).prefix_eviction == "lru"
    with pytest.raises(ConfigError, match="VATTN_PREFIX_EVICTION='lfu' .* lru, discard-lru"):
        VattnConfig.from_env({"VATTN_PREFIX_EVICTION": "lfu"})
    with pytest.raises(ConfigError, match="VATTN_PREFIX_MIN_USERS=1 is below 2"):
        VattnConfig.from_env({"VATTN_PREFIX_MIN_USERS": "1"})


def test_the_discard_segment_survives_hits_and_allocations(patched):
    pool = BlockPool(num_gpu_blocks=12, enable_caching=True, hash_block_size=16)
    cycle(pool)
    reqs = [pool.get_new_blocks(1) for _ in range(4)]
    for i, r in enumerate(reqs):
        cache(pool, r, f"r{i}")
    for r in reqs:
        pool.free_blocks(r)  # four single-user cached blocks: a segment of four, oldest first
    ids = [r[0].block_id for r in reqs]
    order = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    assert order[:4] == ids
    pool.touch([reqs[3][0]])  # a prefix hit on the newest (the segment's tail) takes it out
    assert pool._vattn_uses.drop_tail is reqs[2][0]
    pool.free_blocks([reqs[3][0]])  # now used by 2 requests: kept, at the tail
    order = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    assert order[:3] == ids[:3] and order[-1] == ids[3]
    got = pool.get_new_blocks(3)  # the whole segment, oldest first
    assert [b.block_id for b in got] == ids[:3] and pool._vattn_uses.drop_tail is None
    new = pool.get_new_blocks(1)
    cache(pool, new, "n")
    pool.free_blocks(new)  # a new segment starts at the front
    assert pool.free_block_queue.get_all_free_blocks()[0].block_id == new[0].block_id
    assert len(pool.free_block_queue.get_all_free_blocks()) == pool.free_block_queue.num_free_blocks


@pytest.mark.parametrize("seed", range(8))
def test_random_use_keeps_vllms_free_queue_consistent(patched, seed):
    """Random allocations, prefix hits and frees through the patched pool: the free list is a
    proper list holding exactly the free blocks, and the discard segment sits at its front."""
    import random
    rng = random.Random(seed)
    pool = BlockPool(num_gpu_blocks=40, enable_caching=True, hash_block_size=16)
    live: list[list] = []  # blocks held by running requests
    cached: list = []  # blocks with a hash (candidates for prefix hits)
    tag = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.45 and pool.get_num_free_blocks() >= 3:
            blocks = pool.get_new_blocks(rng.randint(1, 3))
            for b in blocks:
                if rng.random() < 0.8:
                    tag += 1
                    b.set_block_hash(make_block_hash_with_group_id(f"h{tag}".encode(), 0))
                    cached.append(b)
            live.append(blocks)
        elif op < 0.65 and cached:
            b = rng.choice(cached)
            if b.block_hash is not None and b.ref_cnt == 0 and b.prev_free_block is not None:
                pool.touch([b])  # a prefix hit on a free cached block
                live.append([b])
        elif live:
            blocks = live.pop(rng.randrange(len(live)))
            pool.free_blocks(reversed(blocks))
        q = pool.free_block_queue
        order = q.get_all_free_blocks()
        assert len(order) == q.num_free_blocks == pool.get_num_free_blocks()
        assert len({b.block_id for b in order}) == len(order)
        assert all(b.ref_cnt == 0 for b in order)
        held = {b.block_id for blocks in live for b in blocks}
        assert held.isdisjoint(b.block_id for b in order)
        c = PE._counts(pool)
        in_seg = [bool(c.in_drop[b.block_id]) for b in order]
        assert sum(c.in_drop) == sum(in_seg)  # flags only on queued blocks
        if any(in_seg):  # the segment is contiguous, and its tail is the newest discarded block
            first = in_seg.index(True)
            last = len(in_seg) - 1 - in_seg[::-1].index(True)
            assert all(in_seg[first:last + 1])
            assert order[last] is c.drop_tail
        cached = [b for b in cached if b.block_hash is not None]
    assert PE._counts(pool).discarded > 0 and PE._counts(pool).kept > 0  # both paths were exercised


def test_second_chance_passes_over_a_reused_block_once():
    assert PE.install("second-chance", min_users=2)
    try:
        pool = BlockPool(num_gpu_blocks=6, enable_caching=True, hash_block_size=16)
        cycle(pool)
        a = reused_block(pool, "a")  # used by two requests: kept
        b = pool.get_new_blocks(1)  # used by one request
        cache(pool, b, "b")
        pool.free_blocks(b)
        # free queue: 3 empty blocks at the front (vLLM prefers them), then a, then b
        empty = pool.get_new_blocks(3)
        assert a[0].block_id not in {x.block_id for x in empty}
        got = pool.get_new_blocks(1)  # LRU would evict a; a is passed over once, b goes
        assert got[0].block_id == b[0].block_id and a[0].block_hash is not None
        order = [x.block_id for x in pool.free_block_queue.get_all_free_blocks()]
        assert order == [a[0].block_id]
        cache(pool, got, "c")
        pool.free_blocks(got)  # a new single-use cached block, behind a
        got2 = pool.get_new_blocks(1)  # a had its pass: now it is evicted, as LRU would
        assert got2[0].block_id == a[0].block_id and a[0].block_hash is None
    finally:
        PE.uninstall()


def test_switching_mode_in_a_process_takes_effect():
    try:
        assert PE.install("discard-lru", min_users=2) and PE.install("second-chance", min_users=3)
        assert getattr(BlockPool, PE._STATE_ATTR)["mode"] == "second-chance"
        assert getattr(BlockPool, PE._STATE_ATTR)["min_users"] == 3
    finally:
        PE.uninstall()


def test_second_chance_with_two_passes_keeps_a_reused_block_for_two_more_trips():
    assert PE.install("second-chance", min_users=2, passes=2)
    try:
        pool = BlockPool(num_gpu_blocks=4, enable_caching=True, hash_block_size=16)
        cycle(pool)
        a = reused_block(pool, "a")  # reused: two extra passes
        others = pool.get_new_blocks(2)  # the two empty blocks
        cache(pool, others, "o")
        pool.free_blocks(others)  # queue: a, o0, o1 (single use)
        for expected in (others[0], others[1]):  # a is passed over twice
            got = pool.get_new_blocks(1)
            assert got[0].block_id == expected.block_id
            cache(pool, got, f"x{expected.block_id}")
            pool.free_blocks(got)
        # queue: a, o0, o1: a is passed over a second time, then it has no pass left
        assert [b.block_id for b in pool.get_new_blocks(3)] == [others[0].block_id, others[1].block_id, a[0].block_id]
    finally:
        PE.uninstall()
    with pytest.raises(ValueError, match="passes=0"):
        PE.install("second-chance", passes=0)


def test_adaptive_evicts_by_the_bit_then_learns_from_ghost_hits():
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
    assert PE.install("adaptive", min_users=2)
    try:
        pool = BlockPool(num_gpu_blocks=5, enable_caching=True, hash_block_size=16)
        cycle(pool)
        keep = reused_block(pool, "k")  # reused: T2
        once = pool.get_new_blocks(3)  # the three empty blocks
        for i, b in enumerate(once):
            cache(pool, [b], f"o{i}")
        pool.free_blocks(once)  # single use: T1, newer than `keep`
        arc = pool._vattn_arc
        assert (arc.count[1], arc.count[2], arc.p) == (3, 1, 0.0)
        got = pool.get_new_blocks(1)  # p = 0: the oldest T1 goes, although `keep` is older (LRU's pick)
        assert got[0].block_id == once[0].block_id and keep[0].block_hash is not None
        # a request now asks for the evicted single-use block: a ghost hit in T1 raises p
        assert pool.get_cached_block(b"o00", [0]) is None
        assert arc.ghost_hits[1] == 1 and arc.p >= 1.0
        assert pool.get_cached_block(b"o00", [0]) is None and arc.ghost_hits[1] == 1  # counted once
        # with T1 (2 blocks) above p again the next victim is still T1; raise p past it: LRU's T2
        arc.p = 5.0
        got2 = pool.get_new_blocks(1)
        assert got2[0].block_id == keep[0].block_id
        assert make_block_hash_with_group_id(b"k0", 0) in arc.ghosts[2]
    finally:
        PE.uninstall()


@pytest.mark.parametrize("mode", ["discard-lru", "second-chance", "adaptive"])
@pytest.mark.parametrize("seed", range(4))
def test_random_use_under_every_mode_keeps_the_free_queue_consistent(mode, seed):
    """Random allocate / hit / free / lookup sequences (as vLLM's KV cache manager issues them):
    the free queue stays a list of exactly the free blocks, each once, whatever the mode does to it."""
    import random
    rng = random.Random(seed)
    assert PE.install(mode, min_users=2)
    try:
        pool = BlockPool(num_gpu_blocks=24, enable_caching=True, hash_block_size=16)
        held: list[list] = []  # blocks of running "requests"
        known: list[bytes] = []  # hashes handed out so far
        for step in range(600):
            op = rng.random()
            if op < 0.4 and pool.get_num_free_blocks() > 0:  # a request allocates 1-4 new blocks
                blocks = pool.get_new_blocks(rng.randint(1, min(4, pool.get_num_free_blocks())))
                for b in blocks:
                    h = f"h{seed}-{step}-{b.block_id}".encode()
                    if rng.random() < 0.8:  # full blocks get a hash; a partial last block does not
                        b.set_block_hash(make_block_hash_with_group_id(h, 0))
                        pool.cached_block_hash_to_block.insert(b.block_hash, b)
                        known.append(h)
                held.append(blocks)
            elif op < 0.6 and known:  # a request looks up a prefix and takes the hits
                found = pool.get_cached_block(rng.choice(known), [0])
                if found:
                    pool.touch(found)
                    held.append(list(found))
            elif held:  # a request finishes or is preempted: its blocks go back, tail first
                pool.free_blocks(reversed(held.pop(rng.randrange(len(held)))))
            free = pool.free_block_queue.get_all_free_blocks()
            ids = [b.block_id for b in free]
            assert len(ids) == len(set(ids)) == pool.free_block_queue.num_free_blocks
            assert set(ids) == {b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0}
            arc = pool.__dict__.get("_vattn_arc")  # made at the first free
            if arc is not None:
                assert arc.count[1] + arc.count[2] == sum(1 for b in free if arc.cls[b.block_id])
                assert all(b.block_hash is not None for b in free if arc.cls[b.block_id])
    finally:
        PE.uninstall()
