"""Paging policies over a cache of k pages. `access(page, t, bit)` serves the request at position t
(bringing the page in on a miss) and returns whether it was a hit. `bit` is the one-bit
prediction that came with the request (ignored by policies without predictions).

- LRU: what vLLM's free-block queue does for cached blocks.
- Belady: the offline optimum (evict the page requested furthest in the future); needs next-use times.
- Marking: the classical randomized marking algorithm (O(log k)-competitive), the robust baseline.
- DiscardMarking: discard predictions (bit 1 = "safe to evict": the page is not needed again before
  an optimal algorithm would evict it). A page that arrives with bit 1 is dropped right after it is
  served; with correct bits the cache then only ever holds pages an optimal algorithm also holds, so
  no other eviction is needed (cost = OPT exactly; a test checks it). When wrong bits fill the cache,
  the fallback is randomized marking: an unmarked page chosen uniformly at random is evicted. Each
  wrong "1" costs at most one extra fault. Not reproduced: a guard that caps what adversarially
  wrong "1" bits can cost relative to marking (an earlier variant that kept a page dropped twice in
  one phase broke consistency on the trace: 1.009 x OPT), so robustness here is measured, not proven.
- DiscardLRU: discard predictions applied lazily, as vllm_vattention/prefix_eviction.py does to
  vLLM's free-block queue: pages whose latest bit is 1 are evicted first (oldest dropped first, as
  the hook's discard segment; drop_order="mru" evicts the newest dropped first, as a plain prepend
  to vLLM's queue would), then the rest in LRU order. No marking, so no
  worst-case guarantee beyond LRU's; with all bits 0 it is LRU.
- PhaseMarking: phase predictions (bit 1 = "requested again in the next phase", phases being the
  marking phases of the request sequence). Marking; on a fault with a full cache, evict an unmarked
  page whose latest bit says it is not requested in the next phase, uniformly at random among them,
  else a uniformly random unmarked page.

The two prediction setups are those of Antoniadis et al., "Paging with Succinct Predictions"
(ICML 2023); the algorithms here are written from the setups' definitions and the marking
structure the paper builds on (see benchmarks/NOTES.md for what could and could not be checked
against the paper's text).
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict


class IndexedSet:
    """A set with O(1) add, remove and uniform random choice."""

    def __init__(self):
        self.items: list[int] = []
        self.pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, x) -> bool:
        return x in self.pos

    def add(self, x: int) -> None:
        if x not in self.pos:
            self.pos[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: int) -> None:
        i = self.pos.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i

    def choice(self, rng: random.Random) -> int:
        return self.items[rng.randrange(len(self.items))]

    def clear(self) -> None:
        self.items.clear()
        self.pos.clear()


class Policy:
    name = "policy"
    uses = None  # which bits: None, "discard" or "phase"

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"cache size k={k} must be >= 1")
        self.k = k
        self.faults = 0

    def access(self, page: int, t: int, bit: int = 0) -> bool:
        raise NotImplementedError


class LRU(Policy):
    name = "LRU"

    def __init__(self, k: int):
        super().__init__(k)
        self.cache: OrderedDict[int, None] = OrderedDict()

    def access(self, page, t, bit=0):
        if page in self.cache:
            self.cache.move_to_end(page)
            return True
        self.faults += 1
        if len(self.cache) >= self.k:
            self.cache.popitem(last=False)
        self.cache[page] = None
        return False


INF = float("inf")


def next_uses(seq: list[int]) -> list[float]:
    nxt: list[float] = [INF] * len(seq)
    last: dict[int, int] = {}
    for t in range(len(seq) - 1, -1, -1):
        nxt[t] = last.get(seq[t], INF)
        last[seq[t]] = t
    return nxt


class Belady(Policy):
    """Offline optimum. `evicted_at[t]` records, for the request at t, whether the page was evicted
    before its next request (the oracle's discard bit)."""

    name = "Belady"

    def __init__(self, k: int, nxt: list[float]):
        super().__init__(k)
        self.nxt = nxt
        self.cache: dict[int, float] = {}  # page -> its next use
        self.last: dict[int, int] = {}  # page -> position of its latest request
        self.heap: list[tuple[float, int]] = []
        self.evicted_last: list[int] = []  # positions whose page was evicted before its next use

    def access(self, page, t, bit=0):
        hit = page in self.cache
        if not hit:
            self.faults += 1
            if len(self.cache) >= self.k:
                while True:
                    neg, victim = heapq.heappop(self.heap)
                    if self.cache.get(victim) == -neg:
                        break
                del self.cache[victim]
                self.evicted_last.append(self.last[victim])
        self.cache[page] = self.nxt[t]
        self.last[page] = t
        heapq.heappush(self.heap, (-self.nxt[t], page))
        return hit


class Marking(Policy):
    name = "Marking"

    def __init__(self, k: int, seed: int = 0):
        super().__init__(k)
        self.rng = random.Random(seed)
        self.cache: set[int] = set()
        self.unmarked = IndexedSet()
        self.phases = 0

    def _new_phase(self) -> None:
        self.phases += 1
        for p in self.cache:
            self.unmarked.add(p)

    def _victim(self) -> int:
        return self.unmarked.choice(self.rng)

    def _evict(self, victim: int) -> None:
        self.cache.discard(victim)
        self.unmarked.discard(victim)

    def access(self, page, t, bit=0):
        if page in self.cache:
            self.unmarked.discard(page)  # mark
            self._served(page, bit, True)
            return True
        self.faults += 1
        if len(self.cache) >= self.k:
            if not self.unmarked:
                self._new_phase()
            self._evict(self._victim())
        self.cache.add(page)
        self._served(page, bit, False)
        return False

    def _served(self, page: int, bit: int, hit: bool) -> None:
        pass


class DiscardMarking(Marking):
    name = "Discard-Marking"
    uses = "discard"

    def _served(self, page, bit, hit):
        if bit:
            self.cache.discard(page)
            self.unmarked.discard(page)


class PhaseMarking(Marking):
    name = "Phase-Marking"
    uses = "phase"

    def __init__(self, k: int, seed: int = 0):
        super().__init__(k, seed)
        self.not_next = IndexedSet()  # unmarked pages predicted absent from the next phase
        self.bit: dict[int, int] = {}

    def _new_phase(self) -> None:
        super()._new_phase()
        self.not_next.clear()
        for p in self.cache:
            if not self.bit.get(p, 0):
                self.not_next.add(p)

    def _victim(self):
        if self.not_next:
            return self.not_next.choice(self.rng)
        return super()._victim()

    def _evict(self, victim):
        super()._evict(victim)
        self.not_next.discard(victim)

    def _served(self, page, bit, hit):
        self.bit[page] = bit
        self.not_next.discard(page)  # marked now


class DiscardLRU(Policy):
    name = "Discard-LRU"
    uses = "discard"

    def __init__(self, k: int, seed: int = 0, drop_order: str = "lru"):
        super().__init__(k)
        if drop_order not in ("mru", "lru"):
            raise ValueError(f"drop_order={drop_order!r}; use 'mru' (vLLM's prepend) or 'lru'")
        self.newest_first = drop_order == "mru"
        self.drop: OrderedDict[int, None] = OrderedDict()
        self.keep: OrderedDict[int, None] = OrderedDict()

    def access(self, page, t, bit=0):
        hit = page in self.drop or page in self.keep
        if hit:
            self.drop.pop(page, None)
            self.keep.pop(page, None)
        else:
            self.faults += 1
            if len(self.drop) + len(self.keep) >= self.k:
                if self.drop:
                    self.drop.popitem(last=self.newest_first)  # mru: the front of vLLM's queue
                else:
                    self.keep.popitem(last=False)
        (self.drop if bit else self.keep)[page] = None
        return hit


POLICIES = {p.name: p for p in (LRU, Marking, DiscardMarking, DiscardLRU, PhaseMarking)}
