"""Who runs the mapper's driver calls: the calling thread, or a native thread without the GIL.

The mapper plans a list of operations per request (bookkeeping, fence waits and checks happen
while planning, in Python) and hands it to an executor:
- `SyncExecutor` runs them at once on the calling thread (the default).
- `NativeExecutor` (native.py) queues them to a C++ thread that calls the driver without the GIL;
  `wait()` joins before the step that needs the mappings is launched, or, in stream mode, a SIGNAL
  op at the end of a step's work sets a host flag that the GPU stream waits on (the CPU never joins).

Four op kinds are not driver calls: WAIT_EVENT (block until a fence completes: a step in flight
still reads what the next UNMAP removes), WAIT_VALUE (the same for a fence the GPU reports in a
host word, polled without a driver call: manager.HostWordFence), SIGNAL (store a sequence number
into a 32-bit host word once every earlier op has run), DRAIN (run the first `handle`
background ops first) and DRAIN_ROW (of those, only row `size`'s: NativeExecutor.set_rows).

Background ops (`run_background`, e.g. warming rows no request holds yet) run on the native thread
only while no step's ops are queued; `run_background` returns how many have been submitted in all,
the number a later DRAIN waits for. `SyncExecutor` runs them at once.
"""

from __future__ import annotations

from typing import Sequence

MAP, UNMAP, ACCESS_RW, ACCESS_RO, SIGNAL, WAIT_EVENT, DRAIN, WAIT_VALUE, DRAIN_ROW = range(9)  # csrc/mapper.cpp's kinds

Op = tuple[int, int, int, int]  # (kind, va, size, handle)


class SyncExecutor:
    def __init__(self, driver):
        self.driver = driver
        self.background_submitted = 0

    def run_background(self, ops: Sequence[Op]) -> int:
        self.run(ops)
        self.background_submitted += len(ops)
        return self.background_submitted

    def run(self, ops: Sequence[Op]) -> None:
        d = self.driver
        for kind, va, size, handle in ops:
            if kind in (DRAIN, DRAIN_ROW):
                continue  # background ops already ran
            if kind == MAP:
                d.map(va, size, handle)
            elif kind == UNMAP:
                d.unmap(va, size)
            elif kind in (ACCESS_RW, ACCESS_RO):
                d.set_access(va, size, kind == ACCESS_RW)
            else:
                raise ValueError(f"op kind {kind} needs the native executor (VATTN_BACKGROUND_MAP=stream)")

    def set_rows(self, base: int, regions: int, region_bytes: int, row_bytes: int, rows: int) -> None:
        pass  # (background ops run at once: a DRAIN_ROW has nothing to pick)

    def wait(self) -> None:
        pass

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass
