"""Who runs the mapper's driver calls: the calling thread, or a native thread without the GIL.

The mapper plans a list of operations per request (bookkeeping, fence waits and checks happen
while planning, in Python) and hands it to an executor:
- `SyncExecutor` runs them at once on the calling thread (the default).
- `NativeExecutor` (native.py) queues them to a C++ thread that calls the driver without the GIL;
  `wait()` joins before the step that needs the mappings is launched.
"""

from __future__ import annotations

from typing import Sequence

MAP, UNMAP, ACCESS_RW, ACCESS_RO = 0, 1, 2, 3  # the kinds in csrc/mapper.cpp

Op = tuple[int, int, int, int]  # (kind, va, size, handle)


class SyncExecutor:
    def __init__(self, driver):
        self.driver = driver

    def run(self, ops: Sequence[Op]) -> None:
        d = self.driver
        for kind, va, size, handle in ops:
            if kind == MAP:
                d.map(va, size, handle)
            elif kind == UNMAP:
                d.unmap(va, size)
            else:
                d.set_access(va, size, kind == ACCESS_RW)

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass
