"""Physical memory: the driver allocations of every block, all created up front, plus a zero page.

Memory comes in frames: one allocation per contiguous chunk a block occupies in a row (one for
the interleaved layout, 2 x layers for per_layer), since cuMemMap maps an allocation whole (its
offset argument must be zero); `handles(frame)` gives them. Block id b's content lives in frame
`frame(b)`; at first block b owns frame b, so `num_blocks` frames are exactly the physical KV budget.
With `spares` > 0 there are that many more frames, owned by no block; `swap(b, f)` gives block b
the spare frame f and makes b's former frame a spare. That is only correct when b's content is
dead (a block vLLM has just handed out for tokens not computed yet): the mapper uses it so that a
fresh block lands in a frame already mapped where it is needed, with no driver call.

`lend(blocks)` makes the frames of blocks that were never handed out spares too, for as long as the
blocks stay unused: such a block owns no frame (`frame(b)` is None) until it is handed out, and then
`swap` gives it a spare (its content is dead: it never had any). The spare count grows by the blocks
lent, and the KV budget stays whole: vLLM still owns every block. The pool also
hands out block ids on
its own (`allocate`/`free`) for users without vLLM's scheduler (tests, benchmarks); under vLLM the
scheduler's BlockPool decides which ids are in use and this allocator is not used.

Fresh driver memory is not guaranteed to be zero. Kernels may read stale tokens past a sequence's
end (masked, but 0 * NaN is NaN), so every page is zeroed once at creation, as vLLM zeroes its
own KV cache.
"""

from __future__ import annotations

from collections import deque

from ..errors import OutOfPagesError
from .driver import Driver

_ZERO_BATCH_BYTES = 1 << 30  # how much to map at once while zeroing new pages


class PagePool:
    def __init__(self, driver: Driver, num_blocks: int, chunks_per_block: int, chunk_bytes: int, spares: int = 0):
        g = driver.granularity
        block_bytes = chunks_per_block * chunk_bytes
        if num_blocks <= 0:
            raise OutOfPagesError(
                f"a KV budget of {num_blocks} blocks ({block_bytes} bytes each) is too small; "
                "raise --gpu-memory-utilization or lower --max-model-len")
        if chunk_bytes % g:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be a multiple of {g}")
        if spares < 0:
            raise ValueError(f"spares={spares} must be >= 0")
        self.driver = driver
        self.num_blocks = num_blocks
        self.num_frames = num_blocks + spares
        self.chunks_per_block = chunks_per_block
        self.chunk_bytes = chunk_bytes
        self._handles: list[int] = []  # frame f's chunks at [f * chunks_per_block, (f + 1) * ...)
        self.zero_handle = None
        try:
            for _ in range(self.num_frames * chunks_per_block):
                self._handles.append(driver.create(chunk_bytes))
            self.zero_handle = driver.create(chunk_bytes)
        except OutOfPagesError as e:
            created = len(self._handles) // chunks_per_block
            self._release_all()
            raise OutOfPagesError(
                f"could create only {created} of {self.num_frames} KV blocks of {block_bytes >> 20} MiB"
                f"{f' ({spares} of them spare)' if spares else ''}: "
                f"{e}. Lower --gpu-memory-utilization's share taken by other processes or the KV budget") from e
        self._zero_fill(self._handles + [self.zero_handle], chunk_bytes)
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks
        self._frame_of: list[int | None] = list(range(num_blocks))  # block -> frame (None: lent)
        self.spare_frames: set[int] = set(range(num_blocks, self.num_frames))  # owned by no block
        self.respared: list[int] = []  # frames that became spares (swap, lend) since a reader cleared it
        self.new_spares: set[int] = set()  # the same, since the mapper last took them (take_new_spares)
        self.lent = 0  # blocks whose frame is lent out as a spare (lend()), not handed out since
        self.max_seen = -1  # the highest block id frames() was asked for: ids above were never handed out

    def handles(self, frame: int) -> list[int]:
        """Frame `frame`'s allocations, in the order of the layout's chunks."""
        if not 0 <= frame < self.num_frames:
            raise IndexError(f"frame {frame} outside the pool of {self.num_frames} frames")
        c = self.chunks_per_block
        return self._handles[frame * c:(frame + 1) * c]

    @property
    def single_chunk_handles(self) -> list[int] | None:
        """With one chunk per block (the interleaved layout): frame f's one allocation is item f of
        this list (frames were checked when they were handed out); None otherwise."""
        return self._handles if self.chunks_per_block == 1 else None

    def frame(self, block: int) -> int | None:
        """The frame that holds block `block`'s content (None: a lent block, which has none)."""
        self._check(block)
        return self._frame_of[block]

    def frames(self, blocks) -> list[int | None]:
        """frame(b) for each of `blocks`, every id checked first (None for a lent block)."""
        if blocks:
            hi = max(blocks)
            if min(blocks) < 0 or hi >= self.num_blocks:
                bad = next(b for b in blocks if not 0 <= b < self.num_blocks)
                self._check(bad)
            if hi > self.max_seen:
                self.max_seen = hi
        fo = self._frame_of
        return [fo[b] for b in blocks]

    def swap(self, block: int, spare: int) -> int | None:
        """Block `block` (whose content is dead) moves to frame `spare`; returns its former frame,
        now a spare (None if the block was lent: it had no frame, and the spares shrink by one)."""
        if spare not in self.spare_frames:
            raise ValueError(f"frame {spare} is not a spare")
        old = self.frame(block)
        self._frame_of[block] = spare
        self.spare_frames.remove(spare)
        if old is None:
            self.lent -= 1
        else:
            self.spare_frames.add(old)
            self.respared.append(old)
            self.new_spares.add(old)
        return old

    def lend(self, blocks) -> int:
        """The frames of `blocks` become spares until the blocks are handed out (`swap` then gives
        each one a spare). Only for blocks that were never handed out and whose frames are mapped
        nowhere: the caller checks both (KVMemoryManager.lend_unused). Returns how many."""
        fo = self._frame_of
        for b in blocks:
            self._check(b)
            if fo[b] is None:
                raise ValueError(f"block {b} is lent already")
        for b in blocks:
            self.spare_frames.add(fo[b])
            self.respared.append(fo[b])
            self.new_spares.add(fo[b])
            fo[b] = None
        self.lent += len(blocks)
        return len(blocks)

    def take_new_spares(self) -> set[int]:
        """The frames that became spares since the last call (each at most once), and forget them."""
        new, self.new_spares = self.new_spares, set()
        return new

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block id {block} outside the pool of {self.num_blocks} blocks")

    # -- standalone allocator ------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfPagesError(f"all {self.num_blocks} KV blocks are in use")
        b = self._free.popleft()
        self._is_free[b] = False
        return b

    def free(self, block: int) -> None:
        self._check(block)
        if self._is_free[block]:
            raise ValueError(f"block {block} is already free")
        self._is_free[block] = True
        self._free.append(block)

    # -- lifecycle -----------------------------------------------------------------------------
    def _zero_fill(self, handles: list[int], size: int) -> None:
        """Map handles into a scratch range a batch at a time, zero it, unmap."""
        d = self.driver
        per_batch = max(1, _ZERO_BATCH_BYTES // size)
        for i in range(0, len(handles), per_batch):
            batch = handles[i:i + per_batch]
            total = len(batch) * size
            va = d.reserve(total)
            mapped = 0
            try:
                for h in batch:
                    d.map(va + mapped, size, h)
                    mapped += size
                d.set_access(va, total)
                d.memset_zero(va, total)
            finally:
                if mapped:
                    d.unmap(va, mapped)
                d.free_reservation(va, total)

    def _release_all(self) -> None:
        for h in self._handles:
            self.driver.release(h)
        self._handles = []
        if self.zero_handle is not None:
            self.driver.release(self.zero_handle)
            self.zero_handle = None

    def close(self) -> None:
        """Release every allocation; the caller must have unmapped them all."""
        self._release_all()
