"""The mapper micro-benchmark's driver work, on the fake driver (the benchmark itself needs a GPU)."""

import pytest

from helpers import PAGE
from vllm_vattention.bench.mapbench import map_cycle_ops
from vllm_vattention.memory import FakeDriver, FakeDriverError
from vllm_vattention.memory.native import NativeExecutor


def test_the_contention_phase_maps_and_unmaps_cleanly_many_times_over():
    d = FakeDriver(PAGE, capacity=1 << 24)
    va = d.reserve(8 * PAGE)
    hs = [d.create(PAGE) for _ in range(8)]
    ex = NativeExecutor(*d.native_table())
    ops = map_cycle_ops(va, hs, PAGE)
    assert len(ops) == 3 * 8
    for _ in range(4):  # as contention() queues them: rounds back to back
        ex.run(ops)
    ex.wait()
    s = ex.stats()
    ex.close()
    assert d.native_errors == []  # the fake rejects double maps, unmaps of unmapped memory, ...
    assert s["native_driver_calls"] == 4 * 3 * 8
    with pytest.raises(FakeDriverError, match="unmapped"):
        d.write(va, b"x")  # nothing is mapped any more
    for h in hs:
        d.release(h)
    d.free_reservation(va, 8 * PAGE)
    assert d.leaks() == []


def test_the_thread_scaling_phase_maps_every_page_once_per_trial_and_leaves_nothing():
    from vllm_vattention.bench.mapbench import parallel_driver
    from vllm_vattention.memory import PAGE_SIZE
    d = FakeDriver(PAGE_SIZE, capacity=64 * PAGE_SIZE)
    rows = parallel_driver(d, pages=16, threads=(1, 2, 4))
    assert [r["threads"] for r in rows] == [1, 2, 4]
    assert rows[0]["speedup_map_and_access"] == 1.0
    assert all(r["set_access_us_per_page"] > 0 and r["map_and_access_us_per_page"] > 0 for r in rows)
    # per trial: 16 maps before the set_access phase, 16 more in the map + set_access phase
    assert d.stats.calls["map"] == 3 * 32 and d.stats.calls["set_access_calls"] == 3 * 32
    assert d.leaks() == []


def test_the_allocation_size_phase_maps_the_same_bytes_in_fewer_larger_allocations():
    from vllm_vattention.bench.mapbench import alloc_size_costs
    from vllm_vattention.memory import PAGE_SIZE
    d = FakeDriver(PAGE_SIZE, capacity=64 * PAGE_SIZE)
    rows = alloc_size_costs(d, total_bytes=32 * PAGE_SIZE, sizes_mib=(2, 8, 64, 3))
    # 64 MiB: one allocation; 3 MiB: not a whole number of pages, skipped
    assert [(r["alloc_mib"], r["allocations"]) for r in rows] == [(2, 32), (8, 8), (64, 1)]
    assert d.stats.calls["map"] == 3 * 32  # the same 32 pages each time (counted in pages)...
    assert d.stats.calls["set_access_calls"] == 32 + 8 + 1  # ...in one call per allocation
    assert all(r["set_access_us_per_2mib"] > 0 for r in rows)
    assert d.leaks() == []


def test_driver_costs_time_one_unmap_over_many_mappings_and_leave_nothing():
    """driver_costs unmaps every page's own mapping in one call (is unmap charged per mapping, as
    set_access is?): the fake driver, like the real one, takes a range over whole mappings."""
    from vllm_vattention.bench.mapbench import driver_costs
    from vllm_vattention.memory import PAGE_SIZE
    d = FakeDriver(PAGE_SIZE, capacity=16 * PAGE_SIZE)
    out = driver_costs(d, pages=8)
    assert {"unmap_us", "unmap_range_us_per_page", "set_access_range_us_per_page"} <= set(out)
    assert d.stats.calls["unmap"] == 2 * 8  # one page at a time, then all 8 in one call
    assert d.leaks() == []


def test_an_unknown_section_is_refused_before_any_gpu_work(capsys):
    from vllm_vattention.bench import mapbench
    with pytest.raises(SystemExit):
        mapbench.main(["--sections", "driver_per_page,tlb"])
    assert "unknown ['tlb']" in capsys.readouterr().err


def _driver_waiting_for_a_busy_gpu(gpu_ms):
    """A fake driver whose set_access waits for a 'GPU' busy until a deadline (what the engine's 21-38
    ms cuMemSetAccess calls may be, NOTES #139), and a load that makes it busy for 5 ms from now; the
    load's wait returns gpu_ms (None: a load with no GPU time, as host_launches)."""
    import time

    from vllm_vattention.memory import PAGE_SIZE

    busy_until = [0.0]

    class WaitsForTheGpu(FakeDriver):
        def set_access(self, va, size, writable=True):
            left = busy_until[0] - time.perf_counter()
            if left > 0:
                time.sleep(left)
            super().set_access(va, size, writable)

    def load():
        busy_until[0] = time.perf_counter() + 0.005
        return lambda: gpu_ms

    return WaitsForTheGpu(PAGE_SIZE, capacity=8 * PAGE_SIZE), load


def test_under_load_times_every_call_and_finds_the_calls_that_waited_for_the_load():
    """With set_access waiting for a busy 'GPU', under_load must put those waits in the loaded
    phase's set_access row, as the first call of each round, and none in the idle phase."""
    from vllm_vattention.bench.mapbench import under_load

    d, load = _driver_waiting_for_a_busy_gpu(5.0)
    rows = under_load(d, {"idle": None, "busy": load}, pages=4, rounds=3)
    by = {(r["phase"], r["call"]): r for r in rows}
    assert set(by) == {(p, c) for p in ("idle", "busy") for c in ("map", "set_access", "unmap")}
    assert all(r["calls"] == 3 * 4 for r in rows)
    assert d.stats.calls["map"] == 2 * 3 * 4 and d.stats.calls["unmap"] == 2 * 3 * 4
    busy = by[("busy", "set_access")]
    assert busy["over_slow_ms"] == 3  # the first set_access of each round waited; the rest did not
    assert busy["max_us"] >= 1000 and busy["first_call_max_us"] == busy["max_us"]
    assert busy["p50_us"] < 1000 and busy["load_gpu_ms"] == 5.0
    # maps happen before set_access in a round (the load's deadline may catch only the first)
    assert by[("idle", "set_access")]["over_slow_ms"] == 0 and by[("idle", "set_access")]["load_gpu_ms"] is None
    assert d.leaks() == []


def test_native_under_load_reports_each_rounds_slowest_call_as_the_native_thread_timed_it():
    """The same waiting set_access, called by the native mapping thread: each loaded round's slowest
    call is a set_access of >= the wait, the idle rounds have none, and the means are per call."""
    from vllm_vattention.bench.mapbench import native_under_load

    d, load = _driver_waiting_for_a_busy_gpu(None)
    idle, busy = native_under_load(d, {"idle": None, "busy": load}, pages=4, rounds=3)
    assert d.native_errors == [] and d.leaks() == []
    assert (idle["phase"], busy["phase"], busy["calls"]) == ("idle", "busy", 3 * 3 * 4)
    assert len(busy["rounds_slowest_ms"]) == 3
    assert all(ms >= 4.0 and kind == "access_rw" for ms, kind in busy["rounds_slowest_ms"])
    assert all(ms < 4.0 for ms, _ in idle["rounds_slowest_ms"])
    # the wait falls on one set_access of the 4 in each round: their mean is about 5 ms / 4
    assert busy["set_access_us"] >= 1000 and idle["set_access_us"] < busy["set_access_us"] / 4
    with pytest.raises(ValueError, match="at most 8 rounds"):
        native_under_load(d, {"idle": None}, pages=1, rounds=9)


def test_a_load_in_another_thread_runs_until_its_round_ends_and_raises_what_went_wrong():
    """host_loads' loads (NOTES #141) run the engine's other CUDA calls in another Python thread
    while the native thread maps: the body runs again and again until the round's wait, its setup
    once per round on the caller's thread, and an error in the body reaches the caller."""
    import threading

    from vllm_vattention.bench.mapbench import in_a_thread, native_under_load
    from vllm_vattention.memory import PAGE_SIZE

    seen = {"calls": 0, "threads": set(), "setups": 0, "synced": 0}

    def setup():
        seen["setups"] += 1
        return seen

    def body(arg):
        arg["calls"] += 1
        arg["threads"].add(threading.get_ident())

    d = FakeDriver(PAGE_SIZE, capacity=8 * PAGE_SIZE)
    load = in_a_thread(body, setup, sync=lambda: seen.__setitem__("synced", seen["synced"] + 1))
    (row,) = native_under_load(d, {"busy": load}, pages=4, rounds=3)
    assert row["calls"] == 3 * 3 * 4 and d.leaks() == []
    assert seen["setups"] == 3 and seen["synced"] == 3 and seen["calls"] >= 3
    assert threading.get_ident() not in seen["threads"]

    def fails():
        raise RuntimeError("cudaMalloc failed")
    with pytest.raises(RuntimeError, match="cudaMalloc failed"):
        in_a_thread(fails, sync=lambda: None)()()


def test_a_call_once_per_round_runs_beside_the_batch_and_its_host_time_is_reported():
    """first_launch_loads' phases (NOTES #146) make one call per round in another thread: a call that
    holds up the driver (here: holds the fake driver's lock that set_access takes, for 10 ms) must
    show in that round's slowest native call, its own host ms must come back as the round's
    load_ms, `before` runs first on that thread, and an error in the call reaches the caller."""
    import threading
    import time

    from vllm_vattention.bench.mapbench import native_under_load, once_in_a_thread
    from vllm_vattention.memory import PAGE_SIZE

    lock = threading.Lock()

    class LockedAccess(FakeDriver):
        def set_access(self, va, size, writable=True):
            with lock:
                super().set_access(va, size, writable)

    seen = {"before": [], "call": [], "synced": 0}

    def holds_the_lock():
        seen["call"].append(threading.get_ident())
        with lock:
            time.sleep(0.010)

    def quick():
        seen["call"].append(threading.get_ident())

    d = LockedAccess(PAGE_SIZE, capacity=8 * PAGE_SIZE)
    sync = lambda: seen.__setitem__("synced", seen["synced"] + 1)  # noqa: E731
    before = lambda: seen["before"].append(threading.get_ident())  # noqa: E731
    quiet, held = native_under_load(d, {"quick": once_in_a_thread(quick, before, sync),
                                        "holds": once_in_a_thread(holds_the_lock, before, sync)}, pages=4, rounds=3)
    assert d.native_errors == [] and d.leaks() == []
    assert seen["synced"] == 6 and seen["before"] == seen["call"] and threading.get_ident() not in seen["call"]
    assert len(held["load_ms"]) == 3 and all(ms >= 10.0 for ms in held["load_ms"])
    assert len(quiet["load_ms"]) == 3 and all(ms < 10.0 for ms in quiet["load_ms"])
    # the call took the lock ~2 ms before the batch began: its first set_access waited the rest
    assert all(ms >= 5.0 and kind == "access_rw" for ms, kind in held["rounds_slowest_ms"])
    assert max(ms for ms, _ in quiet["rounds_slowest_ms"]) < min(ms for ms, _ in held["rounds_slowest_ms"])
    # loads whose wait returns nothing leave load_ms out
    (idle,) = native_under_load(d, {"idle": None}, pages=1, rounds=1)
    assert idle["load_ms"] is None

    def fails():
        raise RuntimeError("cuModuleLoad failed")
    with pytest.raises(RuntimeError, match="cuModuleLoad failed"):
        once_in_a_thread(fails, sync=lambda: None)()()


def test_first_launch_loads_refuses_more_rounds_than_it_has_fresh_kernels_before_any_gpu_work():
    from vllm_vattention.bench.mapbench import FRESH_DTYPES, first_launch_loads
    with pytest.raises(ValueError, match=f"has {len(FRESH_DTYPES)} fresh kernels"):
        first_launch_loads(rounds=len(FRESH_DTYPES) + 1)


def test_at_scale_maps_each_count_first_caps_it_to_free_memory_and_gives_everything_back():
    """at_scale (NOTES #141): with that many pages mapped, the native thread's batches on fresh pages
    of the same reservation, idle and under each load that loads_for builds over the mapped pages; a
    count more than 90% of free memory holds is cut to fit."""
    from vllm_vattention.bench.mapbench import at_scale
    from vllm_vattention.memory import PAGE_SIZE

    d = FakeDriver(PAGE_SIZE, capacity=640 * PAGE_SIZE)  # 512 pages of it: the 1 GiB left for the loads
    asked, released = [], []

    def loads_for(va, n):
        d.read(va + (n - 1) * PAGE_SIZE, 1)  # every one of the n pages is mapped (the fake raises otherwise)
        asked.append(n)
        return {"reading": lambda: (lambda: 1.0)}

    rows = at_scale(d, mapped=(0, 16, 1000), pages=4, rounds=2, loads_for=loads_for, release=lambda: released.append(1))
    assert asked == [16, 60] and len(released) == 3  # no load over nothing mapped; 0.9 * 640 - 4 - 512 = 60
    assert [(r["mapped_pages"], r["phase"]) for r in rows] == [
        (0, "0 pages mapped, idle"), (16, "16 pages mapped, idle"), (16, "16 pages mapped, reading"),
        (60, "60 pages mapped, idle"), (60, "60 pages mapped, reading")]
    assert all(r["calls"] == 3 * 2 * 4 and len(r["rounds_slowest_ms"]) == 2 for r in rows)
    assert all(r["cpu_of_running"] is None or 0 <= r["cpu_of_running"] <= 1.5 for r in rows)
    assert d.stats.calls["map"] == 16 + 60 + 5 * 2 * 4
    assert d.native_errors == [] and d.leaks() == []
