"""A thread that runs mapping work while the caller prepares and launches the next step.

The driver calls it makes drop the GIL (ctypes), so they overlap with Python on the main thread.
`submit` queues work; `sync` waits until all queued work has run and re-raises its first error.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable


class MappingThread:
    def __init__(self, name: str = "vattn-mapper"):
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, drop work until sync() reports it
                    item()
            except BaseException as e:  # noqa: BLE001 - handed to the caller in sync()
                self._error = e
            finally:
                self._q.task_done()

    def submit(self, fn: Callable[[], object]) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the mapping thread has stopped")
        self._q.put(fn)

    def sync(self) -> None:
        self._q.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
