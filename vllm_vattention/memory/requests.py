"""Requests -> rows: which row each request holds and how many of its blocks are mapped there, with
the three things a model runner does per scheduler step, in vLLM-free terms. worker.py feeds it
vLLM's SchedulerOutput; tests/test_scheduler_in_the_loop.py feeds it vLLM's real Scheduler on a CPU.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import MappingError
from .manager import KVMemoryManager


class RequestRows:
    def __init__(self, manager: KVMemoryManager):
        self.manager = manager
        self._row: dict[str, int] = {}  # request id -> its row
        self._blocks: dict[str, int] = {}  # request id -> blocks mapped in its row

    def row(self, request_id: str) -> int:
        return self._row[request_id]

    def __len__(self) -> int:
        return len(self._row)

    def admit(self, request_id: str, blocks: Sequence[int], num_computed_tokens: int) -> int:
        """A request the runner adds (new, resumed after preemption, or re-added): a row and its
        block list. Blocks wholly past the computed tokens (the prefix-cache hit) hold nothing yet,
        so they are fresh (mapper.py: they may move into spare frames); a block only partly computed
        keeps its memory. Returns the row."""
        if request_id in self._row:
            raise MappingError(f"request {request_id!r} already holds row {self._row[request_id]}")
        m = self.manager
        fresh_from = -(-num_computed_tokens // m.layout.block_size)
        # the row that still maps the prefix-cache hits (wholly computed blocks), if one is free
        row = m.acquire_row(blocks, num_computed_tokens // m.layout.block_size)
        try:
            m.set_blocks(row, blocks, fresh_from=fresh_from)
        except BaseException:
            m.release_row(row)
            raise
        self._row[request_id] = row
        self._blocks[request_id] = len(blocks)
        return row

    def extend(self, request_id: str, blocks: Sequence[int], fresh: bool = True) -> int:
        """A running request's new blocks, appended; fresh unless the caller cannot vouch that they
        are for tokens not computed yet. Returns the row."""
        row = self._row[request_id]
        self.manager.set_blocks(row, blocks, start=self._blocks[request_id], fresh_from=0 if fresh else None)
        self._blocks[request_id] += len(blocks)
        return row

    def remove(self, request_id: str) -> int | None:
        """A finished or preempted request gives its row back. Returns it (None: held none)."""
        row = self._row.pop(request_id, None)
        if row is not None:
            del self._blocks[request_id]
            self.manager.release_row(row)
        return row
