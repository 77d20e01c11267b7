import pytest

from helpers import PAGE, SMALL, BlockingFence, FakeFence, FakeStream, make_manager
from vllm_vattention.errors import MappingError, OutOfAddressSpaceError, OutOfPagesError
from vllm_vattention.memory import ZERO, FakeDriver, FakeDriverError, KVMemoryManager, make_layout


def token_bytes(mgr, row, tok, layer=0, kv=0, head=0):
    return mgr.address(row, tok, layer, kv, head)


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_writes_cross_block_boundaries_and_alias(driver, layout):
    mgr = make_manager(driver, layout)
    bs = mgr.layout.block_size
    r0, r1 = mgr.acquire_row(), mgr.acquire_row()
    mgr.set_blocks(r0, [3, 5, 7])
    mgr.set_blocks(r1, [3, 9])  # block 3 shared: a common prefix
    for tok in range(3 * bs):
        for layer in range(SMALL.num_layers):
            for kv in (0, 1):
                driver.write(mgr.address(r0, tok, layer, kv, 1), bytes([tok % 251, layer, kv]))
    for tok in range(bs):  # the shared block shows the same bytes in both rows
        for layer in range(SMALL.num_layers):
            assert driver.read(mgr.address(r1, tok, layer, 1, 1), 3) == bytes([tok % 251, layer, 1])
    assert driver.read(mgr.address(r1, bs, 0, 0, 1), 3) == bytes(3)  # block 9 is fresh: zeroed
    assert mgr.mapper.where[3] == {(r0, 0), (r1, 0)}
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_remap_shows_the_new_blocks_data_and_only_changes_are_mapped(driver):
    mgr = make_manager(driver)
    a, b = mgr.acquire_row(), mgr.acquire_row()
    mgr.set_blocks(a, [1])
    mgr.set_blocks(b, [2])
    driver.write(mgr.address(a, 0, 0, 0), b"AAAA")
    driver.write(mgr.address(b, 0, 0, 0), b"BBBB")
    maps = mgr.mapper.stats.block_maps
    mgr.set_blocks(a, [1])  # unchanged: no driver call
    assert mgr.mapper.stats.block_maps == maps
    mgr.set_blocks(a, [2])
    assert driver.read(mgr.address(a, 0, 0, 0), 4) == b"BBBB"
    assert mgr.mapper.stats.block_unmaps == 1
    mgr.close()


def test_zero_page_guard_is_readable_zero_and_read_only(driver):
    mgr = make_manager(driver)
    r = mgr.acquire_row()
    bs = mgr.layout.block_size
    mgr.set_blocks(r, [4])
    mgr.ensure_readable(r, 3 * bs)
    assert mgr.mapper.slots[r][:4] == [4, ZERO, ZERO, None]
    assert driver.read(mgr.address(r, 2 * bs + 1, 1, 1), 16) == bytes(16)
    with pytest.raises(FakeDriverError, match="illegal write"):
        driver.write(mgr.address(r, bs, 0, 0), b"x")
    with pytest.raises(FakeDriverError, match="illegal read"):
        driver.read(mgr.address(r, 3 * bs, 0, 0), 1)
    mgr.set_blocks(r, [4, 6])  # growth replaces the guard with a real block
    driver.write(mgr.address(r, bs, 0, 0), b"ok")
    mgr.close()
    assert driver.leaks() == []


def test_unmap_waits_for_steps_in_flight_that_read_the_slot(driver):
    mgr = make_manager(driver)
    bs = mgr.layout.block_size
    r = mgr.acquire_row()
    mgr.set_blocks(r, [1])
    mgr.ensure_readable(r, 3 * bs)
    reading_guard, unrelated = FakeFence(), FakeFence()
    mgr.record_reads(reading_guard, {r: 3 * bs})  # e.g. FA3 over-reading two blocks past the end
    mgr.record_reads(unrelated, {})
    mgr.set_blocks(r, [1], start=0)  # nothing changes: nothing to wait for
    assert reading_guard.waited == 0
    mgr.set_blocks(r, [1, 2])  # replaces a guard slot the step may be reading
    assert reading_guard.waited == 1 and mgr.mapper.stats.hazard_waits == 1
    assert unrelated.waited == 0
    mgr.set_blocks(r, [1, 2, 3])  # the reader finished: no more waiting
    assert mgr.mapper.stats.hazard_waits == 1
    mgr.close()


def test_finished_fences_cost_nothing(driver):
    mgr = make_manager(driver)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [1])
    f = FakeFence()
    mgr.record_reads(f, {r: 64})
    f.complete()
    mgr.set_blocks(r, [2])
    assert f.waited == 0 and mgr.mapper.stats.hazard_waits == 0
    mgr.close()


def test_deferred_reclaim_keeps_mappings_for_the_next_user_eager_unmaps(driver):
    mgr = make_manager(driver, rows=1)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [1, 2])
    mgr.release_row(r)
    r2 = mgr.acquire_row()
    assert r2 == r and mgr.mapper.slots[r][:2] == [1, 2]
    before = mgr.mapper.stats.block_maps
    mgr.set_blocks(r2, [1, 2])  # e.g. a prefix-cache hit on the same blocks: free
    assert mgr.mapper.stats.block_maps == before
    mgr.close()

    d2 = FakeDriver(PAGE)
    eager = make_manager(d2, rows=1, reclaim="eager")
    r = eager.acquire_row()
    eager.set_blocks(r, [1, 2])
    f = FakeFence()
    eager.record_reads(f, {r: 8})
    eager.release_row(r)
    assert f.waited == 1  # the unmap waited for the step reading the row
    assert list(eager.mapper.mapped_slots(r)) == []
    eager.close()
    assert d2.leaks() == []


def test_rows_and_blocks_are_bounded(driver):
    mgr = make_manager(driver, rows=2, max_tokens=8, num_blocks=4)
    a, _ = mgr.acquire_row(), mgr.acquire_row()
    with pytest.raises(MappingError, match="all 2 rows are in use"):
        mgr.acquire_row()
    with pytest.raises(MappingError, match="longer than max_model_len"):
        mgr.set_blocks(a, [0, 1, 2])
    with pytest.raises(IndexError, match="block id 4"):
        mgr.set_blocks(a, [4])
    with pytest.raises(IndexError, match="block id -1"):
        mgr.set_blocks(a, [0, -1])
    assert mgr.mapper.slots[a] == [None, None] and mgr.mapper.where == {}  # nothing changed
    with pytest.raises(MappingError, match="not in use"):
        mgr.release_row(3)
    for _ in range(4):
        mgr.pool.allocate()
    with pytest.raises(OutOfPagesError, match="all 4 KV blocks"):
        mgr.pool.allocate()
    mgr.close()
    assert driver.leaks() == []


def test_out_of_device_memory_and_address_space_are_typed_and_leak_nothing():
    d = FakeDriver(PAGE, capacity=6 * PAGE)
    with pytest.raises(OutOfPagesError, match="could create only"):
        make_manager(d, num_blocks=8)
    assert d.leaks() == []
    d = FakeDriver(PAGE, va_limit=(1 << 32) + 1024 * PAGE)
    with pytest.raises(OutOfAddressSpaceError, match="--max-num-seqs or --max-model-len"):
        make_manager(d, rows=64, max_tokens=4096)
    assert d.leaks() == []


def test_native_thread_gives_the_same_mappings_and_reports_driver_errors(driver):
    """The C++ mapping thread (csrc/mapper.cpp) calling the fake driver through its table."""
    fg = make_manager(FakeDriver(PAGE))
    bg = make_manager(driver, background=True)
    for m in (fg, bg):
        r = m.acquire_row()
        m.set_blocks(r, [2, 3])
        m.ensure_readable(r, 40)
        m.set_blocks(r, [2, 5], start=1)
        m.sync()
    assert fg.mapper.slots == bg.mapper.slots
    for m in (fg, bg):
        for s, t in bg.mapper.mapped_slots(0):
            off = m.layout.chunks(0, s)[0]
            got = m.driver.mapping_at(m.base_va + off)
            assert got[0] == (m.pool.zero_handle if t == ZERO else m.pool.handles(t)[0])
    assert bg.mapper.executor.ops_done > 0
    fg.close()
    bg.close()
    assert driver.leaks() == []


def test_native_thread_times_its_own_driver_calls(driver):
    """stats() carries what the native thread spent (the mapping work a stream may wait for)."""
    m = make_manager(driver, background=True)
    m.sync()
    m.reset_stats()
    before = dict(driver.stats.calls)
    r = m.acquire_row()
    m.set_blocks(r, [2, 3, 4])
    m.ensure_readable(r, 40)
    m.set_blocks(r, [5], start=1)  # a remap: one unmap, one map, one set_access
    m.sync()
    delta = {k: driver.stats.calls.get(k, 0) - before.get(k, 0) for k in ("map", "unmap", "set_access_calls")}
    s = m.stats()
    assert delta["unmap"] == 1 and delta["map"] >= 4
    assert s["native_driver_calls"] == delta["map"] + delta["unmap"] + delta["set_access_calls"]
    assert s["native_driver_seconds"] > 0
    assert s["native_driver_seconds"] == pytest.approx(
        s["native_map_seconds"] + s["native_unmap_seconds"] + s["native_access_seconds"], abs=3e-6)
    assert s["native_event_waits"] == 0
    m.reset_stats()
    assert m.stats()["native_driver_calls"] == 0 and m.stats()["native_driver_seconds"] == 0
    assert "native_driver_calls" not in make_manager(FakeDriver(PAGE)).stats()  # foreground: no thread
    m.close()


def test_native_thread_failure_surfaces_at_sync_as_a_driver_error():
    from vllm_vattention.errors import DriverError
    d = FakeDriver(PAGE)
    m = make_manager(d, background=True)
    r = m.acquire_row()
    squatter = d.create(PAGE)
    d.map(m.base_va + m.layout.chunks(r, 0)[0], PAGE, squatter)  # something else sits in slot 0
    m.set_blocks(r, [1])
    with pytest.raises(DriverError, match="native mapping thread"):
        m.sync()
    assert isinstance(d.native_errors[0], FakeDriverError) and "double map" in str(d.native_errors[0])
    m.sync()  # the error was reported once; the thread keeps serving


def test_close_is_idempotent_and_releases_everything(driver):
    mgr = make_manager(driver)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1])
    mgr.ensure_readable(r, 64)
    f = FakeFence()
    mgr.record_reads(f, {r: 64})
    mgr.close()
    mgr.close()
    assert f.waited == 1  # shutdown waited for the step in flight before unmapping
    assert driver.leaks() == []


def test_page_size_must_match_driver_granularity():
    lay = make_layout("interleaved", SMALL, PAGE, rows=1, min_row_tokens=8)
    with pytest.raises(ValueError, match="granularity"):
        KVMemoryManager(FakeDriver(granularity=8192), lay, 4)


def test_contiguous_new_slots_get_one_set_access_call(driver):
    mgr = make_manager(driver)
    r = mgr.acquire_row()
    before = driver.stats.calls.get("set_access_calls", 0)
    mgr.set_blocks(r, [5, 6, 7, 8])  # four adjacent slots of one row: one range
    assert driver.stats.calls["set_access_calls"] - before == 1
    mgr.ensure_readable(r, 8 * mgr.layout.block_size)  # four zero slots after them: read-only, one more
    assert driver.stats.calls["set_access_calls"] - before == 2
    assert driver.mapping_at(mgr.address(r, 5 * mgr.layout.block_size, 0, 0))[2] == 1
    mgr.close()


def test_reset_stats_starts_the_counters_again_but_keeps_the_mappings(driver):
    mgr = make_manager(driver)
    row = mgr.acquire_row()
    mgr.set_blocks(row, [1, 2])
    mgr.ensure_readable(row, 3 * mgr.layout.block_size)
    assert mgr.stats()["block_maps"] == 2 and mgr.stats()["zero_maps"] == 1
    mgr.reset_stats()
    assert mgr.stats()["block_maps"] == 0 and mgr.stats()["zero_maps"] == 0
    mgr.set_blocks(row, [1, 2])
    assert mgr.stats()["block_maps"] == 0  # still mapped: nothing to do
    mgr.set_blocks(row, [5], start=2)  # replaces the zero page
    assert mgr.stats()["block_maps"] == 1 and mgr.stats()["block_unmaps"] == 0
    mgr.close()
    assert driver.leaks() == []


def test_stream_mode_moves_hazard_waits_off_the_calling_thread(driver):
    import threading
    mgr = make_manager(driver, background="stream")
    row = mgr.acquire_row()
    mgr.set_blocks(row, [1])
    assert mgr.publish() == 1
    mgr.sync()
    assert mgr.flag_value() == 1
    driver.write(mgr.address(row, 0, 0, 0), b"old!")
    fence = BlockingFence(driver)
    mgr.record_reads(fence, {row: mgr.layout.block_size})  # a step in flight reads slot 0
    mgr.set_blocks(row, [2])  # needs slot 0 unmapped: the native thread waits, not us
    seq = mgr.publish()
    assert seq == 2 and mgr.flag_value() == 1  # the GPU would still be waiting
    assert threading.current_thread().name not in fence.waiters  # we did not wait
    assert driver.read(mgr.address(row, 0, 0, 0), 4) == b"old!"  # still mapped for the running step
    fence.release()
    mgr.sync()
    assert mgr.flag_value() == 2 and threading.current_thread().name not in fence.waiters
    assert driver.read(mgr.address(row, 0, 0, 0), 4) == bytes(4)  # block 2, fresh
    assert driver.stats.calls["event_sync"] == 1 and mgr.stats()["hazard_waits"] == 1
    assert mgr.stats()["native_event_waits"] == 1 and mgr.stats()["native_event_wait_seconds"] > 0
    mgr.close()
    assert driver.leaks() == []


def test_stream_mode_signals_even_after_a_failed_mapping_and_reports_it(driver):
    import time

    from vllm_vattention.errors import DriverError
    from vllm_vattention.memory.executor import MAP, SIGNAL
    mgr = make_manager(driver, background="stream")
    # a map outside any reservation (the fake refuses it), then the step's signal
    mgr.mapper.executor.run([(MAP, 1 << 20, PAGE, 12345), (SIGNAL, mgr._flag_host, 0, 7)])
    for _ in range(500):
        if mgr.flag_value() == 7:
            break
        time.sleep(0.01)
    assert mgr.flag_value() == 7  # the GPU would not wait forever
    with pytest.raises(DriverError, match="native mapping thread"):
        mgr.publish()  # the error surfaces at the next step, without waiting
    assert driver.native_errors
    mgr.close()
    assert driver.leaks() == []


def test_publish_outside_stream_mode_is_an_error(driver):
    mgr = make_manager(driver)
    with pytest.raises(MappingError, match="VATTN_BACKGROUND_MAP=stream"):
        mgr.publish()
    mgr.close()


def test_finished_steps_are_forgotten_even_when_nothing_is_unmapped(driver):
    """A long decode unmaps nothing; the list of steps in flight must not grow with it."""
    mgr = make_manager(driver)
    row = mgr.acquire_row()
    mgr.set_blocks(row, [1, 2])
    stream = FakeStream()
    for _ in range(1000):
        mgr.record_reads(stream.fence(), {row: 8})
        stream.finished = stream.launched - 2  # two steps in flight at any time
    assert len(mgr.mapper._inflight) == 3  # the new one and the two unfinished before it
    mgr.close()
    assert driver.leaks() == []


def test_request_rows_admit_extend_remove(driver):
    from vllm_vattention.memory import RequestRows
    mgr = make_manager(driver, rows=3, max_tokens=64, spare_blocks=0)
    rows = RequestRows(mgr)
    bs = mgr.layout.block_size
    r = rows.admit("a", [1, 2], num_computed_tokens=bs + 1)  # block 1 partly computed: not fresh
    assert mgr._recent_fresh[-1] == 0  # ceil((bs + 1) / bs) = 2 blocks hold content
    assert rows.extend("a", [3]) == r and mgr.mapper.slots[r][:3] == [1, 2, 3]
    with pytest.raises(MappingError, match="request 'a' already holds row"):
        rows.admit("a", [4], 0)
    free = mgr.num_free_rows
    with pytest.raises(MappingError, match="longer than max_model_len"):
        rows.admit("b", list(range(mgr.layout.blocks_per_row + 1)), 0)
    assert mgr.num_free_rows == free and len(rows) == 1  # the failed admission gave its row back
    assert rows.remove("a") == r and rows.remove("a") is None and len(rows) == 0
    mgr.close()
    assert driver.leaks() == []


def _voluntary_gil_releases(calls) -> int:
    """How often a spinning Python thread got the GIL while `calls()` ran on this thread, with the
    interpreter's forced switches pushed out to 0.3 s: only a call that releases the GIL lets it run
    (each such release then costs this thread up to 0.3 s: keep the calls that release few)."""
    import sys
    import threading

    # vLLM's dependency `humming` compiles in the background at import and waits for each compiler on
    # a thread of its own; one that wakes while calls() runs asks for the GIL and lets the spinner in
    # (a flake seen ~1 run in 8): let those finish first
    for other in threading.enumerate():
        if other.name == "humming-bg-build-reaper":
            other.join(timeout=120)
    counter, stop, started = [0], [False], threading.Event()

    def spin():
        started.set()
        while not stop[0]:
            counter[0] += 1

    old = sys.getswitchinterval()
    t = threading.Thread(target=spin)
    sys.setswitchinterval(0.3)
    try:
        t.start()
        started.wait()
        while counter[0] == 0:  # the spinner has the GIL once; from here on we hold it
            pass
        before = counter[0]
        calls()
        return counter[0] - before
    finally:
        stop[0] = True
        sys.setswitchinterval(old)
        t.join()


def test_the_per_step_native_calls_keep_the_gil(driver):
    """submit, poll and stats run on the engine thread every step; they must not hand the GIL to
    another Python thread (vLLM's output serializer) and wait for it back (NOTES.md #31); the
    blocking join (wait) and the thread's start and stop still release it."""
    import ctypes
    import time

    from vllm_vattention.memory.native import NativeExecutor, load_library, load_library_keeping_gil

    assert type(load_library()) is ctypes.CDLL and type(load_library_keeping_gil()) is ctypes.PyDLL
    ex = NativeExecutor(*driver.native_table())
    try:
        def per_step():
            for _ in range(50):
                ex.run([])
                ex.run_background([])
                ex.poll()
                ex.stats()
        assert _voluntary_gil_releases(per_step) == 0
        assert _voluntary_gil_releases(lambda: time.sleep(0.002)) > 0  # the check sees a release
    finally:
        ex.wait()
        ex.close()


def test_publish_signals_only_when_a_step_planned_something(driver):
    """Most decode steps map nothing: publish() then queues no signal and returns the last number
    (the stream already waited for it). Ops planned since, or handed to the native thread without a
    signal (warm() flushes a step's ops before its background ones), get a new signal."""
    from vllm_vattention.memory.executor import SIGNAL

    mgr = make_manager(driver, background="stream")
    submitted = []
    run = mgr.mapper.executor.run
    mgr.mapper.executor.run = lambda ops: (submitted.extend(ops), run(ops))
    signals = lambda: sum(op[0] == SIGNAL for op in submitted)  # noqa: E731
    row = mgr.acquire_row()
    mgr.set_blocks(row, [1])
    assert mgr.publish() == 1 and signals() == 1
    assert mgr.publish() == 1 and signals() == 1  # nothing new: no signal, the same number
    mgr.set_blocks(row, [1])  # already there: nothing planned
    assert mgr.publish() == 1 and signals() == 1
    mgr.set_blocks(row, [1, 2])  # a new block
    assert mgr.publish() == 2 and signals() == 2
    mgr.ensure_readable(row, 3 * mgr.layout.block_size)  # the zero page behind the end
    mgr.mapper.flush()  # handed over without a signal (as warm() does)
    assert mgr.publish() == 3 and signals() == 3
    mgr.sync()
    assert mgr.flag_value() == 3
    mgr.close()
    assert driver.leaks() == []


def test_ops_reach_the_native_thread_byte_for_byte():
    """NativeExecutor hands ops over packed (native.pack) into bytes that must be csrc/mapper.cpp's
    vattn_op (int32 kind, int32 pad, three uint64); read back through the ctypes struct."""
    import ctypes

    from vllm_vattention.memory.executor import ACCESS_RO, MAP, SIGNAL, UNMAP
    from vllm_vattention.memory.native import _COp, pack

    ops = [(MAP, 0x7F00_0000_0000, 2 << 20, 2**64 - 1), (UNMAP, 1, 2, 0), (ACCESS_RO, 2**47, 4 << 20, 0),
           (SIGNAL, 0xDEAD_BEEF_0000, 0, 2**32 - 1)]
    words = pack(ops)
    c = (_COp * len(ops)).from_buffer(words)
    assert [(o.kind, o.pad, o.va, o.size, o.handle) for o in c] == [(k, 0, va, s, h) for k, va, s, h in ops]
    assert len(words) * words.itemsize == len(ops) * ctypes.sizeof(_COp)


def test_a_fence_that_never_reports_done_does_not_keep_later_steps_in_flight(driver):
    """Fences complete in launch order, so once the newest of more than RETIRE_NEWEST_FROM is done,
    all are: a step whose fence never said so must not keep every later step's rows in flight."""
    from vllm_vattention.memory.mapper import RowMapper
    mgr = make_manager(driver, rows=8)
    stuck = FakeFence(seq=1)
    stuck.done = lambda: False
    mgr.record_reads(stuck, {1: 16})
    later = [FakeFence(seq=i) for i in range(2, 2 + RowMapper.RETIRE_NEWEST_FROM + 1)]
    for i, f in enumerate(later):
        mgr.record_reads(f, {2 + i % 5: 16})
    assert mgr.mapper.rows_in_flight()  # nothing finished yet
    later[-1].complete()
    assert mgr.mapper.rows_in_flight() == set()
    assert mgr.stats()["inflight_max"] == len(later) + 1
    mgr.close()


def test_the_slowest_batches_tell_a_slow_driver_call_from_a_batch_queued_behind_one(driver):
    """A step's signal late by tens of ms (seen mid-run at 512/1024 on the H200, NOTES #44) is either
    a slow call in its own batch or a wait behind an earlier batch: native_slowest_batches keeps the
    batches with the longest submission-to-done time, split into queued and running time, with
    their slowest op."""
    import time
    mgr = make_manager(driver, rows=4, num_blocks=16, background="stream")
    mgr.sync()
    mgr.reset_stats()
    real = driver.set_access
    slow = {"left": 1}

    def set_access(*a, **k):
        if slow["left"]:
            slow["left"] -= 1
            time.sleep(0.06)
        return real(*a, **k)

    driver.set_access = set_access
    r, q = mgr.acquire_row(), mgr.acquire_row()
    mgr.set_blocks(r, [1, 2])
    t0 = time.perf_counter()
    mgr.publish()  # batch 0: its set_access takes 60 ms
    t1 = time.perf_counter()
    mgr.set_blocks(q, [3])
    mgr.publish()  # batch 1: queued behind it
    mgr.sync()
    rows = mgr.stats()["native_slowest_batches"]
    first, second = sorted(rows, key=lambda b: b[6])[:2]
    assert first[4] == "access_rw" and first[3] >= 50 and first[2] >= 50 and first[6] == 0
    assert second[1] >= 40 and second[2] < 40 and second[6] == 1  # it waited, then ran fast
    # each batch's submission, on time.perf_counter's clock (a step trace's): during its publish()
    assert t0 - 1e-5 <= first[7] <= t1 + 1e-5 and t1 - 1e-5 <= second[7] <= time.perf_counter()
    assert rows[0][0] == max(b[0] for b in rows)  # longest first
    mgr.reset_stats()
    assert mgr.stats()["native_slowest_batches"] == []
    mgr.close()
    assert driver.leaks() == []


def test_a_slow_batch_says_whether_its_driver_call_spun_on_the_cpu_or_slept(driver):
    """NOTES #141: the engine's 21-38 ms cuMemSetAccess calls wait neither for the GPU's work nor for
    another thread's launches (mapbench under_load on an H200). Each kept batch now carries the
    native thread's CPU time, its run-queue wait and its context switches while it ran: a call that
    spins is CPU time; one that sleeps (a lock, an ioctl) is voluntary switches with little CPU."""
    import sys
    import time
    mgr = make_manager(driver, rows=4, num_blocks=16, background="stream")
    mgr.sync()
    mgr.reset_stats()
    real = driver.set_access
    how = {"mode": None}

    def set_access(*a, **k):
        mode, how["mode"] = how["mode"], None
        if mode == "spin":
            t = time.perf_counter()
            while time.perf_counter() - t < 0.05:
                pass
        elif mode == "sleep":
            time.sleep(0.05)
        return real(*a, **k)

    driver.set_access = set_access
    r, q = mgr.acquire_row(), mgr.acquire_row()
    how["mode"] = "spin"
    mgr.set_blocks(r, [1, 2])
    mgr.publish()  # batch 0: one call spins 50 ms
    mgr.sync()
    how["mode"] = "sleep"
    mgr.set_blocks(q, [3])
    mgr.publish()  # batch 1: one call sleeps 50 ms
    mgr.sync()
    spun, slept = sorted(mgr.stats()["native_slowest_batches"], key=lambda b: b[6])[:2]
    assert len(spun) == 13 and spun[2] >= 45 and slept[2] >= 45
    assert spun[12] == slept[12] == 0  # no DRAIN ran background ops in them (NOTES #143)
    cpu, runq, voluntary = 8, 9, 10
    assert spun[cpu] >= 40 and spun[cpu] <= spun[2] + 1
    assert slept[cpu] < 20 and slept[voluntary] >= 1
    assert all(isinstance(b[11], int) and b[11] >= 0 for b in (spun, slept))
    if sys.platform.startswith("linux"):  # schedstat: the run-queue wait is known, and at most the running time
        assert all(b[runq] is not None and 0 <= b[runq] <= b[2] + 1 for b in (spun, slept))
    mgr.close()
    assert driver.leaks() == []


def test_a_steps_remaps_over_many_rows_run_in_order_before_its_signal(driver):
    """On the native thread each row's unmaps, maps and set_access stay in order (the fake rejects a
    map over a mapping, an unmap or set_access of nothing), and a step's signal comes after all of
    them."""
    mgr = make_manager(driver, rows=16, max_tokens=64, num_blocks=200, background="stream")
    rows = [mgr.acquire_row() for _ in range(12)]
    for i, r in enumerate(rows):  # one step: 12 rows, 4 blocks each
        mgr.set_blocks(r, range(4 * i, 4 * i + 4))
    seq = mgr.publish()
    mgr.sync()
    assert mgr.flag_value() == seq and driver.native_errors == []
    for i, r in enumerate(rows):  # the next step remaps two slots of every row: unmap, map, set_access
        mgr.set_blocks(r, [100 + 2 * i, 101 + 2 * i], start=1)
    seq = mgr.publish()
    mgr.sync()
    assert mgr.flag_value() == seq and driver.native_errors == []
    bs = mgr.layout.block_size
    for i, r in enumerate(rows):
        for j, b in enumerate((4 * i, 100 + 2 * i, 101 + 2 * i, 4 * i + 3)):
            assert driver.mapping_at(mgr.address(r, j * bs, 0, 0))[0] == mgr.pool.handles(b)[0]
            driver.write(mgr.address(r, j * bs, 0, 0), bytes([b]))  # writable: set_access ran after the map
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_start_mappings_hands_a_steps_ops_over_before_its_signal(driver):
    """Stream mode batches a step's ops until publish(); start_mappings() hands those planned so far
    (the new requests') to the native thread early, and publish() still signals after all of them."""
    mgr = make_manager(driver, background="stream")
    r = mgr.acquire_row()
    mgr.set_blocks(r, [1, 2])
    mgr.mapper.executor.wait()
    maps = driver.stats.calls.get("map", 0)
    assert mgr.mapper.pending_step_ops()  # planned, not handed over yet
    mgr.start_mappings()
    mgr.mapper.executor.wait()
    assert driver.stats.calls["map"] == maps + 2 and mgr.flag_value() == 0  # mapped, not signaled
    mgr.set_blocks(r, [3], start=2)  # the rest of the step (a running request grows)
    seq = mgr.publish()
    mgr.sync()
    assert mgr.flag_value() == seq == 1 and driver.stats.calls["map"] == maps + 3
    assert mgr.publish() == seq  # nothing new: no new signal
    mgr.start_mappings()  # nothing planned: nothing handed over, no signal owed
    assert not mgr.mapper.pending_step_ops()
    mgr.close()
    assert driver.leaks() == []


def test_value_fences_move_hazard_waits_to_a_host_word_with_no_driver_call(driver):
    """VATTN_FENCE=value: a step's fence is a number its stream writes into a host word once the
    step is done (held here, as a step still running would). An unmap that a step in flight must
    finish reading first waits on the native thread for that word, not in cuEventSynchronize: the
    step's signal comes only after the word is written, and no event is synchronized."""
    import time
    driver.hold_writes = True
    mgr = make_manager(driver, background="stream", value_fences=True)
    row = mgr.acquire_row()
    mgr.set_blocks(row, [1])
    assert mgr.publish() == 1
    mgr.sync()
    driver.write(mgr.address(row, 0, 0, 0), b"old!")
    fence = mgr.step_fence(stream=77)  # the step that reads slot 0 is launched on stream 77
    assert driver.writes == [(77, mgr._done_device, 1)] and not fence.done()
    mgr.record_reads(fence, {row: mgr.layout.block_size})
    mgr.set_blocks(row, [2])  # slot 0 changes: the native thread must wait for the step
    seq = mgr.publish()
    time.sleep(0.05)
    assert seq == 2 and mgr.flag_value() == 1  # still waiting: the step has not written its number
    assert driver.read(mgr.address(row, 0, 0, 0), 4) == b"old!"
    driver.release_writes()
    mgr.sync()
    assert fence.done() and mgr.flag_value() == 2
    assert driver.read(mgr.address(row, 0, 0, 0), 4) == bytes(4)  # block 2, fresh
    assert driver.stats.calls.get("event_sync", 0) == 0 and mgr.stats()["hazard_waits"] == 1
    assert mgr.stats()["native_event_waits"] == 1 and mgr.stats()["native_event_wait_seconds"] >= 0.04
    second = mgr.step_fence(stream=77)  # numbers go up
    assert second.value == 2 and not second.done()
    driver.release_writes()
    assert second.done()
    mgr.close()
    assert driver.leaks() == []


def test_host_word_fences_count_across_the_32_bit_wrap():
    """A fence is done once the word has reached its number: sequence numbers, so 0 comes after
    0xFFFFFFFF. The native thread's WAIT_VALUE reads the word the same way."""
    import ctypes
    import time

    from vllm_vattention.memory.executor import SIGNAL, WAIT_VALUE
    from vllm_vattention.memory.mapper import HostWordFence
    from vllm_vattention.memory.native import NativeExecutor, null_table
    word, flag = (ctypes.c_uint32 * 16)(), (ctypes.c_uint32 * 16)()
    addr, flag_addr = ctypes.addressof(word), ctypes.addressof(flag)
    word[0] = 0xFFFFFFFE
    last, wrapped = HostWordFence(addr, 0xFFFFFFFF), HostWordFence(addr, 0x1_0000_0001)  # (kept to 32 bits)
    assert wrapped.value == 1 and not last.done() and not wrapped.done()
    word[0] = 0xFFFFFFFF
    assert last.done() and not wrapped.done()
    word[0] = 0  # wrapped
    assert last.done() and not wrapped.done()
    ex = NativeExecutor(*null_table())
    try:
        ex.run([wrapped.native_wait_op(), (SIGNAL, flag_addr, 0, 5)])
        assert wrapped.native_wait_op() == (WAIT_VALUE, addr, 0, 1)
        time.sleep(0.05)
        assert flag[0] == 0  # the native thread is still waiting for the word to reach 1
        word[0] = 3  # past it
        ex.wait()
        assert flag[0] == 5 and wrapped.done()
        assert ex.stats()["native_event_waits"] == 1
    finally:
        ex.close()


def test_a_host_word_fence_that_never_completes_raises_naming_the_step(monkeypatch):
    import ctypes

    from vllm_vattention.memory.mapper import HostWordFence
    word = (ctypes.c_uint32 * 16)()
    fence = HostWordFence(ctypes.addressof(word), 9)
    monkeypatch.setattr(HostWordFence, "TIMEOUT_S", 0.05)
    with pytest.raises(MappingError, match="did not report step 9 within .* is 0"):
        fence.wait()
    word[0] = 9
    fence.wait()  # done: returns at once


def test_value_fences_need_stream_mode(driver):
    with pytest.raises(ValueError, match="value_fences needs background='stream'"):
        make_manager(driver, background=True, value_fences=True)
    mgr = make_manager(driver, background="stream")
    with pytest.raises(MappingError, match="VATTN_FENCE=value"):
        mgr.step_fence(stream=1)
    mgr.close()
    assert driver.leaks() == []


def test_the_native_threads_wait_for_a_host_word_gives_up_with_an_error_naming_the_step():
    """WAIT_VALUE's limit (its size field in ms; 0: two minutes): a word the GPU never writes (a
    step that never finished) becomes an error Python raises, not a native thread stuck for good."""
    import ctypes

    from vllm_vattention.errors import DriverError
    from vllm_vattention.memory.executor import WAIT_VALUE
    from vllm_vattention.memory.native import NativeExecutor, null_table
    word = (ctypes.c_uint32 * 16)()
    ex = NativeExecutor(*null_table())
    try:
        ex.run([(WAIT_VALUE, ctypes.addressof(word), 20, 5)])
        with pytest.raises(DriverError, match=r"did not write step 5 into the host word .* within 20 ms \(it holds 0\)"):
            ex.wait()
        word[0] = 5
        ex.run([(WAIT_VALUE, ctypes.addressof(word), 20, 5)])
        ex.wait()  # reached: no error (the earlier one was seen and cleared)
    finally:
        ex.close()
