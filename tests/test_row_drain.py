"""DRAIN_ROW (VATTN_ROW_DRAIN, NOTES #143): a step that changes a row with background ops still
queued runs that row's only, not every op queued before them.

On an H200 a serving step's 3-op batch ran 36.9 ms (its slowest op 2 ms: the rest was queued
background work its DRAIN ran), and the GPU waited that long at the mapping flag. These tests drive the native thread
(csrc/mapper.cpp) through the fake driver's table: the order the driver sees the calls in, the
count of background ops a batch's drains ran, and the cases that must keep the queue's order.
"""

import threading

import pytest

from vllm_vattention.config import ConfigError, VattnConfig
from vllm_vattention.memory.executor import ACCESS_RW, DRAIN, DRAIN_ROW, MAP, UNMAP, WAIT_EVENT
from vllm_vattention.memory.native import NativeExecutor

from helpers import PAGE, FakeFence, make_manager

ROWS, ROW_PAGES = 3, 4


class Gate:
    """The first map into `row` blocks until open(): the native thread is busy with one background
    op while the test submits what it wants queued behind it. Maps and set_access calls are logged
    as (kind, row)."""

    def __init__(self, driver, base, row_bytes, row):
        self.entered, self._open = threading.Event(), threading.Event()
        self.log: list[tuple[str, int]] = []
        real_map, real_access = driver.map, driver.set_access
        row_of = lambda va: (va - base) // row_bytes  # noqa: E731

        def map_(va, size, handle, offset=0):
            if row_of(va) == row and not self.entered.is_set():
                self.entered.set()
                assert self._open.wait(10)
            self.log.append(("map", row_of(va)))
            return real_map(va, size, handle, offset)

        def set_access(va, size, writable=True):
            self.log.append(("access", row_of(va)))
            return real_access(va, size, writable)
        driver.map, driver.set_access = map_, set_access  # (the fake's table binds unmap when built)

    def open(self):
        self._open.set()


def _setup(driver, rows_known=True):
    row_bytes = ROW_PAGES * PAGE
    base = driver.reserve(ROWS * row_bytes)
    handles = [driver.create(PAGE) for _ in range(ROWS * ROW_PAGES)]
    ex = NativeExecutor(*driver.native_table())
    if rows_known:
        ex.set_rows(base, 1, ROWS * row_bytes, row_bytes, ROWS)
    return ex, base, row_bytes, handles


def _warm(row, base, row_bytes, handles, pages=ROW_PAGES):
    """What warm() queues for a row: a map per page, then one set_access over them."""
    va = base + row * row_bytes
    return ([(MAP, va + i * PAGE, PAGE, handles[row * ROW_PAGES + i]) for i in range(pages)]
            + [(ACCESS_RW, va, pages * PAGE, 0)])


def _teardown(ex, driver, base, row_bytes, handles):
    ex.wait()
    for r in range(ROWS):
        for i in range(ROW_PAGES):
            if driver.mapping_at(base + r * row_bytes + i * PAGE) is not None:
                driver.unmap(base + r * row_bytes + i * PAGE, PAGE)
    ex.close()
    for h in handles:
        driver.release(h)
    driver.free_reservation(base, ROWS * row_bytes)
    assert driver.native_errors == [] and driver.leaks() == []


@pytest.mark.parametrize("kind", ["row", "fifo"])
def test_a_row_drain_runs_the_rows_own_background_ops_ahead_of_other_rows(driver, kind):
    ex, base, row_bytes, handles = _setup(driver)
    gate = Gate(driver, base, row_bytes, row=0)
    ex.run_background(_warm(0, base, row_bytes, handles))  # row 0's warming, queued first
    assert gate.entered.wait(10)  # the native thread is inside row 0's first map
    upto = ex.run_background(_warm(2, base, row_bytes, handles))  # then row 2's
    ex.stats(reset=True)
    ex.run([(DRAIN_ROW, 0, 2, upto) if kind == "row" else (DRAIN, 0, 0, upto)])  # a step admits into row 2
    gate.open()
    ex.wait()
    first_of_row0_after = gate.log.index(("map", 0), 1) if gate.log.count(("map", 0)) > 1 else None
    row2 = [i for i, (_, r) in enumerate(gate.log) if r == 2]
    batch = ex.stats()["native_slowest_batches"][0]
    if kind == "row":  # row 2's five ops ran before row 0's other four: the step waited for its own only
        assert first_of_row0_after is not None and max(row2) < first_of_row0_after
        assert batch[12] == 5
    else:  # FIFO: row 0's rest first, then row 2's; the step waited for all nine
        assert min(row2) > max(i for i, (_, r) in enumerate(gate.log) if r == 0)
        assert batch[12] == 9
    assert [k for k, r in gate.log if r == 2] == ["map"] * 4 + ["access"]  # a row's own order is kept
    _teardown(ex, driver, base, row_bytes, handles)


def test_an_op_of_no_row_among_them_keeps_the_queue_in_order(driver):
    """A background op without an address in a row (a wait for a step in flight) may order what
    follows it: a row drain behind one runs everything up to the row's last op, as DRAIN does."""
    ex, base, row_bytes, handles = _setup(driver)
    gate = Gate(driver, base, row_bytes, row=0)
    ex.run_background(_warm(0, base, row_bytes, handles))
    assert gate.entered.wait(10)
    fence = FakeFence()
    fence.complete()
    ex.run_background([(WAIT_EVENT, 0, 0, driver.register_event(fence))])
    upto = ex.run_background(_warm(1, base, row_bytes, handles))
    ex.run([(DRAIN_ROW, 0, 1, upto)])
    gate.open()
    ex.wait()
    rows = [r for _, r in gate.log]
    assert rows == [0] * 5 + [1] * 5
    _teardown(ex, driver, base, row_bytes, handles)


def test_without_rows_a_row_drain_is_a_drain(driver):
    ex, base, row_bytes, handles = _setup(driver, rows_known=False)
    gate = Gate(driver, base, row_bytes, row=0)
    ex.run_background(_warm(0, base, row_bytes, handles))
    assert gate.entered.wait(10)
    upto = ex.run_background(_warm(1, base, row_bytes, handles))
    ex.run([(DRAIN_ROW, 0, 1, upto)])
    gate.open()
    ex.wait()
    assert [r for _, r in gate.log] == [0] * 5 + [1] * 5
    _teardown(ex, driver, base, row_bytes, handles)


def test_a_row_drain_leaves_the_rows_ops_queued_after_its_mark(driver):
    """Ops of the row queued after the step's own change (numbered past the drain's mark) wait: the
    row's order is its ops before the step, the step's, then those after."""
    ex, base, row_bytes, handles = _setup(driver)
    ex.hold_background(True)  # nothing runs in idle time
    upto = ex.run_background(_warm(1, base, row_bytes, handles, pages=2))
    va = base + row_bytes
    ex.run_background([(UNMAP, va, PAGE, 0)])  # later: numbered past `upto`
    log = Gate(driver, base, row_bytes, row=-1).log
    ex.run([(DRAIN_ROW, 0, 1, upto)])
    import time
    deadline = time.monotonic() + 10
    while len(log) < 3 and time.monotonic() < deadline:
        time.sleep(1e-3)
    time.sleep(0.05)  # (the held unmap must not follow)
    assert log == [("map", 1), ("map", 1), ("access", 1)] and driver.mapping_at(va) is not None
    ex.wait()  # a caller waiting runs what is held
    assert driver.mapping_at(va) is None
    ex.hold_background(False)
    _teardown(ex, driver, base, row_bytes, handles)


def test_set_rows_refuses_rows_that_do_not_fit_their_region(driver):
    ex = NativeExecutor(*driver.native_table())
    with pytest.raises(ValueError, match="cannot hold 4 rows of 4096 bytes"):
        ex.set_rows(0x1000_0000, 1, 3 * 4096, 4096, 4)
    ex.close()


def test_the_manager_sends_row_drains_with_its_layouts_rows(driver):
    """VATTN_ROW_DRAIN: the manager tells the native thread where its rows lie (both layouts) and a
    new request in a warm row drains that row only; without the native thread it is refused."""
    for layout in ("interleaved", "per_layer"):
        mgr = make_manager(driver, layout=layout, rows=4, num_blocks=16, spare_blocks=4, background="stream",
                           row_drains=True)
        assert mgr.mapper.row_drains
        regions, region_bytes, row_bytes = mgr.layout.row_regions()
        assert regions * region_bytes == mgr.layout.total_bytes and region_bytes == 4 * row_bytes
        for row in range(4):  # every chunk of a row's slot lies in that row of its region
            for slot in range(mgr.layout.blocks_per_row):
                assert {(off % region_bytes) // row_bytes for off in mgr.layout.chunks(row, slot)} == {row}
        r = mgr.acquire_row()
        mgr.set_blocks(r, [0], fresh_from=0)
        mgr.release_row(r)  # a request taught warm() a depth of one block
        mgr.warm()
        ops = []
        real = mgr.mapper.executor.run
        mgr.mapper.executor.run = lambda o: (ops.extend(o), real(o))[1]
        row = mgr.acquire_row()
        mgr.set_blocks(row, [1], fresh_from=0)  # moves into the warm spare: waits for the row's warming
        mgr.publish()
        mgr.sync()
        (drain,) = [op for op in ops if op[0] in (DRAIN, DRAIN_ROW)]
        # up to the row's last background op (warm() queued other rows' after it)
        assert drain[:3] == (DRAIN_ROW, 0, row) and 0 < drain[3] < mgr.mapper.executor.background_submitted
        mgr.close()
    assert driver.leaks() == []
    with pytest.raises(ConfigError, match="VATTN_ROW_DRAIN=1 needs the native mapping thread"):
        VattnConfig.from_env({"VATTN_ROW_DRAIN": "1", "VATTN_BACKGROUND_MAP": "0"})
    assert VattnConfig.from_env({"VATTN_ROW_DRAIN": "1"}).row_drains and not VattnConfig.from_env({}).row_drains


def test_an_op_of_no_row_after_the_rows_last_one_does_not_hold_it(driver):
    ex, base, row_bytes, handles = _setup(driver)
    gate = Gate(driver, base, row_bytes, row=0)
    ex.run_background(_warm(0, base, row_bytes, handles))
    assert gate.entered.wait(10)
    ex.run_background(_warm(1, base, row_bytes, handles))
    fence = FakeFence()
    fence.complete()
    upto = ex.run_background([(WAIT_EVENT, 0, 0, driver.register_event(fence))])  # after row 1's ops
    ex.run([(DRAIN_ROW, 0, 1, upto)])
    gate.open()
    ex.wait()
    rows = [r for _, r in gate.log]
    assert rows == [0] + [1] * 5 + [0] * 4  # row 1's ran first: the wait orders only what follows it
    _teardown(ex, driver, base, row_bytes, handles)
