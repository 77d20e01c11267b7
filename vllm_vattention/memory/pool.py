"""Physical memory: the driver allocations of every block, all created up front, plus a zero page.

Block id b owns `handles(b)`: one allocation per contiguous chunk the block occupies in a row (one
for the interleaved layout, 2 x layers for per_layer), since cuMemMap maps an allocation whole
(its offset argument must be zero). Ownership never changes, so `num_blocks` is exactly the
physical KV budget. The pool also hands out block ids on
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
    def __init__(self, driver: Driver, num_blocks: int, chunks_per_block: int, chunk_bytes: int):
        g = driver.granularity
        block_bytes = chunks_per_block * chunk_bytes
        if num_blocks <= 0:
            raise OutOfPagesError(
                f"a KV budget of {num_blocks} blocks ({block_bytes} bytes each) is too small; "
                "raise --gpu-memory-utilization or lower --max-model-len")
        if chunk_bytes % g:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be a multiple of {g}")
        self.driver = driver
        self.num_blocks = num_blocks
        self.chunks_per_block = chunks_per_block
        self.chunk_bytes = chunk_bytes
        self._handles: list[int] = []  # block b's chunks at [b * chunks_per_block, (b + 1) * ...)
        self.zero_handle = None
        try:
            for _ in range(num_blocks * chunks_per_block):
                self._handles.append(driver.create(chunk_bytes))
            self.zero_handle = driver.create(chunk_bytes)
        except OutOfPagesError as e:
            created = len(self._handles) // chunks_per_block
            self._release_all()
            raise OutOfPagesError(
                f"could create only {created} of {num_blocks} KV blocks of {block_bytes >> 20} MiB: "
                f"{e}. Lower --gpu-memory-utilization's share taken by other processes or the KV budget") from e
        self._zero_fill(self._handles + [self.zero_handle], chunk_bytes)
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    def handles(self, block: int) -> list[int]:
        """Block `block`'s allocations, in the order of the layout's chunks."""
        self._check(block)
        c = self.chunks_per_block
        return self._handles[block * c:(block + 1) * c]

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
