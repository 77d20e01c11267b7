import os

import pytest

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from vllm_vattention.memory import ZERO, FakeDriver, KVGeometry, KVMemoryManager, make_layout

# Llama-3-8B's KV geometry, scaled down so the fake driver's pages stay small: with 4 KiB pages a
# token of 2 layers x 2 heads x 64 dims x 2 bytes x (K, V) = 1 KiB, so 4 tokens fill a page, just as
# 16 tokens of Llama-3-8B fill a 2 MiB page.
SMALL = KVGeometry(num_layers=2, num_kv_heads=2, head_size=64, dtype_bytes=2)
PAGE = 4096


class FakeStream:
    """Steps complete in launch order, as on one CUDA stream."""

    def __init__(self):
        self.launched = 0
        self.finished = 0

    def fence(self) -> "FakeFence":
        self.launched += 1
        return FakeFence(self, self.launched)


class FakeFence:
    """A CUDA event stand-in: `wait()` (like cudaEventSynchronize) finishes it and every earlier step."""

    def __init__(self, stream: FakeStream | None = None, seq: int = 1):
        self.stream = stream or FakeStream()
        self.seq = seq
        self.waited = 0

    @property
    def completed(self) -> bool:
        return self.stream.finished >= self.seq

    def done(self):
        return self.completed

    def wait(self):
        self.waited += 1
        self.complete()

    def complete(self):
        self.stream.finished = max(self.stream.finished, self.seq)


class BlockingFence:
    """A step still running on the GPU: wait() blocks until release() (another thread)."""

    def __init__(self, driver):
        import threading
        self._done = threading.Event()
        self.native_handle = driver.register_event(self)
        self.waiters = []

    def done(self):
        return self._done.is_set()

    def wait(self):
        import threading
        self.waiters.append(threading.current_thread().name)
        self._done.wait(timeout=10)

    def release(self):
        self._done.set()


@pytest.fixture
def driver():
    d = FakeDriver(granularity=PAGE)
    yield d


def make_manager(driver, layout="interleaved", rows=4, max_tokens=64, num_blocks=16, **kw):
    lay = make_layout(layout, SMALL, PAGE, rows=rows, min_row_tokens=max_tokens)
    return KVMemoryManager(driver, lay, num_blocks, **kw)


def machine_settings():
    """Hypothesis settings of the manager state machines (VATTN_HYPOTHESIS_EXAMPLES; derandomized on CI)."""
    from hypothesis import HealthCheck, settings
    return settings(max_examples=int(os.environ.get("VATTN_HYPOTHESIS_EXAMPLES", "150")), stateful_step_count=40,
                    deadline=None, derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow])


class ManagerMachineBase(RuleBasedStateMachine):
    """What the manager state machines share: self.mgr on self.driver with steps on self.stream and
    the rows requests hold in self.active (row -> blocks); a step launch, the GPU finishing steps, a
    request leaving, the page-table check, and release of everything at the end."""

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def release(self, data):
        row = data.draw(st.sampled_from(sorted(self.active)))
        self.mgr.release_row(row)
        del self.active[row]

    def launch(self, reads: dict[int, int]) -> "FakeFence":
        """A step that reads tokens [0, reads[row]) of each row is launched (after publish in stream mode)."""
        f = self.stream.fence()
        if self.mgr.stream_mode:
            f.native_handle = self.driver.register_event(f)
            self.mgr.publish()
        self.mgr.record_reads(f, reads)
        return f

    @precondition(lambda self: self.stream.finished < self.stream.launched)
    @rule()
    def finish_oldest_step(self):
        self.stream.finished += 1

    def check_page_table(self) -> None:
        """After the executor ran everything: the driver's page table is what the slots say."""
        m = self.mgr
        m.sync()
        m.mapper.check_invariants()
        for row, slots in enumerate(m.mapper.slots):
            for slot, target in enumerate(slots):
                for i, off in enumerate(m.layout.chunks(row, slot)):
                    got = self.driver.mapping_at(m.base_va + off)
                    assert got == (None if target is None else (m.pool.zero_handle, 0, 1) if target == ZERO
                                   else (m.pool.handles(target)[i], 0, 3)), (row, slot)

    def teardown(self):
        if hasattr(self, "mgr"):
            self.mgr.close()
            assert self.driver.leaks() == []
