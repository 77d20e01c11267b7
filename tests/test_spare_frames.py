"""Spare frames (VATTN_SPARE_BLOCKS): rows warmed ahead of time, fresh blocks moved into them.

Checked against the fake driver: what a block's tokens hold is what any row that maps the block
reads, however often blocks moved between frames; a fresh block put in a warmed slot costs no driver
call; and the background queue never lets a step see a slot before its mapping ran.
"""

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from helpers import PAGE, SMALL, BlockingFence, FakeStream, ManagerMachineBase, machine_settings, make_manager
from vllm_vattention.memory import ZERO, FakeDriver, KVMemoryManager, make_layout
from vllm_vattention.errors import MappingError
from vllm_vattention.memory.pool import PagePool


def test_pool_swap_moves_a_block_into_a_spare_and_frees_its_old_frame(driver):
    pool = PagePool(driver, 4, 1, PAGE, spares=2)
    assert pool.num_frames == 6 and pool.spare_frames == {4, 5}
    assert [pool.frame(b) for b in range(4)] == [0, 1, 2, 3]
    assert pool.swap(2, 5) == 2
    assert pool.frame(2) == 5 and pool.spare_frames == {2, 4}
    assert pool.respared == [2]  # what became a spare, for warm()'s next alias scan
    with pytest.raises(ValueError, match="frame 3 is not a spare"):
        pool.swap(1, 3)
    with pytest.raises(IndexError, match="block id 4"):
        pool.frame(4)  # frames past num_blocks are not blocks
    pool.close()
    assert driver.leaks() == []


def test_pool_lend_makes_unused_blocks_frames_spares_until_the_blocks_are_handed_out(driver):
    pool = PagePool(driver, 4, 1, PAGE, spares=1)
    assert pool.lend([3, 2]) == 2
    assert pool.lent == 2 and pool.frame(3) is None and pool.spare_frames == {2, 3, 4}
    assert pool.respared == [3, 2]
    with pytest.raises(ValueError, match="block 3 is lent already"):
        pool.lend([1, 3])
    assert pool.frame(1) == 1  # (the failed call lent nothing)
    assert pool.swap(3, 4) is None  # handed out: it takes a spare and gives none back
    assert pool.respared == [3, 2]
    assert pool.lent == 1 and pool.frame(3) == 4 and pool.spare_frames == {2, 3}
    assert pool.frames([0, 2]) == [0, None] and pool.max_seen == 2
    pool.close()
    assert driver.leaks() == []


@pytest.mark.parametrize("background", [False, "stream"])
def test_lent_blocks_warm_more_rows_and_take_a_spare_when_handed_out(driver, background):
    """lend_unused lends the highest ids never handed out whose frames are mapped nowhere; their
    frames warm rows like spares; a lent block handed out takes the spare its slot maps (no driver
    call) or, where none is mapped, a spare mapped nowhere, mapped like any block's frame."""
    mgr = make_manager(driver, rows=5, num_blocks=16, spare_blocks=2, background=background)
    bs = mgr.layout.block_size
    r0 = mgr.acquire_row()
    mgr.set_blocks(r0, [0, 1, 13], fresh_from=0)  # ids up to 13 were handed out
    mgr.release_row(r0)
    assert mgr.lend_unused(5) == 2  # only 14 and 15 were never handed out
    assert mgr.pool.frame(14) is None and mgr.stats()["lent_blocks"] == 2
    assert mgr.stats()["num_blocks"] == 16 and mgr.stats()["spare_frames"] == 4
    assert mgr.warm() == 4  # 2 spares + 2 lent frames: the next row three deep, the one after it one
    mgr.sync()
    before = _driver_calls(driver)
    row = mgr.acquire_row()
    mgr.set_blocks(row, [14, 2, 15], fresh_from=0)  # two lent blocks and a plain one, all into spares
    mgr.sync()
    assert _driver_calls(driver) == before
    assert mgr.pool.lent == 0 and mgr.stats()["lent_taken"] == 2 and mgr.stats()["spare_frames"] == 2
    for j, b in enumerate((14, 2, 15)):
        driver.write(mgr.address(row, j * bs, 0, 0), bytes([b]) * 8)
    # a request that has a lent block where no spare is mapped
    mgr.lend_unused(1)  # (nothing left above 15)
    assert mgr.pool.lent == 0
    mgr.mapper.check_invariants()
    frames = [mgr.pool.frame(b) for b in range(16)]
    assert len(set(frames)) == 16 and mgr.pool.spare_frames == set(range(18)) - set(frames)
    for j, b in enumerate((14, 2, 15)):
        assert driver.read(mgr.address(row, j * bs, 0, 0), 8) == bytes([b]) * 8
    mgr.close()
    assert driver.leaks() == []


def test_a_lent_block_where_no_spare_is_mapped_takes_one_mapped_nowhere_first(driver):
    mgr = make_manager(driver, rows=4, num_blocks=8, spare_blocks=0, background="stream")
    assert mgr.lend_unused(3) == 3  # blocks 7, 6, 5: their frames are the only spares
    row = mgr.acquire_row()
    mgr.set_blocks(row, [0, 7], fresh_from=0)  # nothing warm: block 7 takes a spare mapped nowhere
    mgr.publish()
    mgr.sync()
    f7 = mgr.pool.frame(7)
    assert f7 in (5, 6, 7) and mgr.mapper.slots[row][1] == f7 and mgr.pool.lent == 2
    assert mgr.stats()["block_maps"] == 2
    # all spares mapped somewhere (a guard): the next lent block takes one of those, and the guard
    # slot keeps the frame as a stale alias until the row grows there (then it is remapped)
    mgr.ensure_readable(row, 4 * mgr.layout.block_size)
    mgr.publish()
    mgr.sync()
    guards = set(mgr.mapper.slots[row][2:4])
    assert guards <= mgr.pool.spare_frames and len(guards) == 2
    other = mgr.acquire_row()
    mgr.set_blocks(other, [6], fresh_from=0)
    mgr.set_blocks(row, [5], start=2, fresh_from=0)  # the row grows into its first guard slot
    mgr.publish()
    mgr.sync()
    assert mgr.pool.lent == 0 and mgr.pool.spare_frames == set()
    assert mgr.mapper.slots[other][0] == mgr.pool.frame(6) and mgr.mapper.slots[row][2] == mgr.pool.frame(5)
    assert mgr.pool.frame(6) != mgr.pool.frame(5)
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_a_lent_block_with_no_spare_mapped_nowhere_takes_a_warm_rows_before_a_running_rows_guard(driver):
    mgr = make_manager(driver, rows=4, num_blocks=10, spare_blocks=0, background="stream")
    bs = mgr.layout.block_size
    assert mgr.lend_unused(4) == 4  # blocks 9, 8, 7, 6: their frames are the spares
    a = mgr.acquire_row()
    mgr.set_blocks(a, [0], fresh_from=0)
    mgr.ensure_readable(a, 3 * bs)  # a guard of two spares behind the running row
    mgr.publish()
    assert mgr.warm() == 2  # the next two rows, one slot deep (the fresh blocks seen so far)
    mgr.sync()
    guards, warm_row = mgr.mapper.slots[a][1:3], mgr.mapper.slots[2][0]
    assert set(guards) | {warm_row, mgr.mapper.slots[1][0]} == mgr.pool.spare_frames  # none mapped nowhere
    b = mgr.acquire_row()  # row 1, warm at slot 0
    mgr.set_blocks(b, [9, 8], fresh_from=0)
    mgr.publish()
    mgr.sync()
    assert mgr.stats()["swaps"] == 1 and mgr.stats()["lent_taken"] == 2
    assert mgr.pool.frame(8) == warm_row  # the idle row's spare, not the running row's guard
    assert mgr.mapper.slots[a][1:3] == guards and set(guards) <= mgr.pool.spare_frames
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def _driver_calls(driver):
    c = driver.stats.calls
    return c.get("map", 0) + c.get("unmap", 0) + c.get("set_access_calls", 0)


@pytest.mark.parametrize("background", [False, "stream"])
def test_a_warmed_row_takes_a_new_requests_fresh_blocks_without_a_driver_call(driver, background):
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=8, background=background)
    bs = mgr.layout.block_size
    # a first request teaches the manager how deep to warm (3 fresh blocks), then leaves
    r0 = mgr.acquire_row()
    mgr.set_blocks(r0, [0, 1, 2], fresh_from=0)
    mgr.release_row(r0)
    assert mgr.warm() == 3 + 3 + 2  # the next free rows 3 deep, until the 8 spares run out
    mgr.sync()
    before = _driver_calls(driver)
    row = mgr.acquire_row()
    mgr.set_blocks(row, [5, 6, 7], fresh_from=0)
    mgr.sync()
    assert _driver_calls(driver) == before  # no map, unmap or set_access
    assert mgr.stats()["swaps"] == 3 and mgr.stats()["warm_maps"] == 8
    # per admission: the first request's row was cold (3 maps), this one's warm (3 swaps, nothing mapped)
    st = mgr.stats()
    assert (st["admissions"], st["admit_swaps"], st["admit_maps"], st["admit_unmaps"]) == (2, 3, 3, 0)
    assert st["admit_trace"] == [[r0, 3, 3, 0, 0, 3, 0], [row, 3, 3, 3, 3, 0, 0]]
    assert mgr.stats()["spare_frames"] == 8  # swaps trade frames; the number of spares stays
    assert {mgr.pool.frame(b) for b in (5, 6, 7)} <= set(range(16, 24))  # spares now hold them
    assert {5, 6, 7} <= mgr.pool.spare_frames  # and their former frames are spares
    for j, b in enumerate((5, 6, 7)):  # the row writes and reads the blocks where it maps them
        driver.write(mgr.address(row, j * bs, 0, 0), bytes([b]) * 8)
        assert driver.read(mgr.address(row, j * bs, 0, 0), 8) == bytes([b]) * 8
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_a_warmed_rows_background_maps_run_before_the_signal_of_the_step_that_uses_it(driver):
    """The native thread runs background ops only while no step's ops wait; a step whose row was
    warmed carries a DRAIN, so its signal (the GPU's go) comes after that row's mappings."""
    from vllm_vattention.memory.executor import WAIT_EVENT
    mgr = make_manager(driver, rows=4, num_blocks=8, spare_blocks=4, background="stream")
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    mgr.release_row(r)
    mgr.publish()
    mgr.sync()
    running = BlockingFence(driver)  # holds the native thread, so what follows queues up behind it
    mgr.mapper.executor.run([(WAIT_EVENT, 0, 0, running.native_handle)])
    flag_at_map = []
    real_map = driver.map
    driver.map = lambda *a, **k: (flag_at_map.append(mgr.flag_value()), real_map(*a, **k))[1]
    assert mgr.warm() == 4  # background: two rows, two slots each
    row = mgr.acquire_row()
    mgr.set_blocks(row, [4, 5], fresh_from=0)  # both swapped into the warm slots: no map of its own
    seq = mgr.publish()
    running.release()
    mgr.sync()
    assert mgr.stats()["swaps"] == 2 and len(flag_at_map) == 4
    assert flag_at_map[:2] == [seq - 1] * 2  # this row's maps ran before the step's signal...
    assert flag_at_map[2:] == [seq] * 2  # ...the other row's after it, in the background
    mgr.close()
    assert driver.leaks() == []


@pytest.mark.parametrize("background", [False, "stream"])
def test_a_block_hit_in_the_step_it_is_fresh_for_another_request_keeps_its_frame(driver, background):
    """vLLM caches a running request's block when it schedules the tokens that fill it, so a request
    admitted in the same step can hit that block before the running request's own set_blocks (the
    runner adds new requests before it extends running ones). The block is fresh for the running
    request, and its slot there maps a spare, but moving the block into that spare would leave the
    new request's row mapping the block's former frame: what one writes, the other never reads.
    (Found by test_scheduler_in_the_loop's random workloads, seed 141.)"""
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=8, background=background)
    bs = mgr.layout.block_size
    teach = mgr.acquire_row()  # a first request teaches the warm depth (4 fresh blocks), then leaves
    mgr.set_blocks(teach, [12, 13, 14, 15], fresh_from=0)
    mgr.release_row(teach)
    mgr.warm()
    mgr.sync()
    running = mgr.acquire_row()  # a warm row: its slots 0-3 map spares
    mgr.set_blocks(running, [0, 1, 2], fresh_from=0)
    assert mgr.stats()["swaps"] == 3 and mgr.mapper.slots[running][3] in mgr.pool.spare_frames
    # the next step: block 3 is handed to the running request (fresh: its tokens are computed in this
    # step) and, in the same step, a new request hits blocks 0-3 (it is added first)
    hit = mgr.acquire_row()
    mgr.set_blocks(hit, [0, 1, 2, 3], fresh_from=4)
    mgr.set_blocks(running, [3], start=3, fresh_from=0)
    assert mgr.stats()["swaps"] == 3  # block 3 kept its frame
    if mgr.stream_mode:
        mgr.publish()
    mgr.sync()
    assert mgr.mapper.slots[running][3] == mgr.mapper.slots[hit][3] == mgr.pool.frame(3)
    driver.write(mgr.address(running, 3 * bs, 0, 0), b"computed")  # the running request writes it...
    assert driver.read(mgr.address(hit, 3 * bs, 0, 0), 8) == b"computed"  # ...the hit reads it
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def _admit_then_warm(driver, ready_rows: int, defer: bool):
    """Two admissions (fresh blocks into warm rows), warm() after each; the second asked to defer."""
    mgr = make_manager(driver, rows=7, num_blocks=16, spare_blocks=8)
    mgr.DEFER_READY_ROWS = ready_rows
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    assert mgr.warm() == 8  # the next four rows, two deep
    r2 = mgr.acquire_row()
    mgr.set_blocks(r2, [2, 3], fresh_from=0)  # into r2's spares: their former frames are spares now
    calls = mgr.mapper.executor.background_submitted
    return mgr, mgr.warm(defer=defer), calls


def test_warm_defers_while_the_next_rows_are_warm_and_plans_at_the_next_call(driver):
    """VATTN_WARM_DEFER: in a step with prefill chunks warm(defer=True) plans nothing while the next
    DEFER_READY_ROWS rows are warm to the depth; the next call without defer plans what the
    deferred one would have (same slots, same spares)."""
    now, got_now, _ = _admit_then_warm(FakeDriver(granularity=PAGE), 3, defer=False)
    assert got_now == 8  # the three rows still warm, and the next one with the two freed spares
    mgr, got, calls = _admit_then_warm(driver, 3, defer=True)
    assert got == 0 and mgr.stats()["warm_deferred"] == 1
    assert mgr.mapper.executor.background_submitted == calls  # nothing planned
    assert mgr.warm(defer=True) == 0 and mgr.stats()["warm_deferred"] == 2  # still ready: deferred again
    assert mgr.warm() == got_now and mgr.mapper.executor.background_submitted > calls
    assert mgr.mapper.slots == now.mapper.slots and mgr.pool.spare_frames == now.pool.spare_frames
    assert mgr.warm(defer=True) == 0 and mgr.stats()["warm_deferred"] == 2  # nothing changed: not a deferral
    for m in (mgr, now):
        m.mapper.check_invariants()
        m.close()
    assert driver.leaks() == []


def test_warm_plans_despite_defer_when_fewer_rows_than_ready_rows_are_warm(driver):
    """Only three rows are warm after the second admission; with DEFER_READY_ROWS 4 a burst could
    find a cold row, so warm(defer=True) plans as warm() does."""
    mgr, got, calls = _admit_then_warm(driver, 4, defer=True)
    assert got == 8 and mgr.stats()["warm_deferred"] == 0 and mgr.mapper.executor.background_submitted > calls
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_warm_defer_waits_for_as_many_warm_rows_as_a_recent_step_took(driver):
    """A step that took more rows than DEFER_READY_ROWS (offline: 16 new requests a step) makes
    warm(defer=True) plan unless that many next rows are warm: deferring with fewer left the rest
    of the next burst to be mapped while its step waited (NOTES #115). The rule relaxes once
    BURST_HISTORY calls passed without such a burst, and never asks for more than WARM_ROWS."""
    def admit(mgr, first_block, n):
        for i in range(n):
            r = mgr.acquire_row()
            mgr.set_blocks(r, [first_block + 2 * i, first_block + 2 * i + 1], fresh_from=0)

    def run(ready_rows):
        mgr = make_manager(driver, rows=12, num_blocks=24, spare_blocks=8)
        mgr.DEFER_READY_ROWS = ready_rows
        admit(mgr, 0, 1)
        assert mgr.warm() == 8  # four rows, two slots deep
        admit(mgr, 2, 3)  # a burst of three rows
        assert mgr.warm() == 8  # the fourth row still warm, and the next three with the freed spares
        admit(mgr, 8, 2)
        return mgr, mgr.warm(defer=True)  # the next two rows warm, the third cold

    mgr, got = run(2)
    assert got > 0 and mgr.stats()["warm_deferred"] == 0  # three rows were taken at once: plans
    assert all(mgr.mapper.holds_spares(r, 2) for r in list(mgr._free_rows)[:3])
    for _ in range(mgr.BURST_HISTORY - 2):  # calls that take no row: the burst of three ages out
        mgr.warm()
    assert mgr._defer_rows() == 3
    mgr.warm()
    assert mgr._defer_rows() == 2
    admit(mgr, 12, 2)  # as DEFER_READY_ROWS allows for: the next two rows warm, so it defers
    assert mgr.warm(defer=True) == 0 and mgr.stats()["warm_deferred"] == 1
    mgr._bursts.append(1000)
    assert mgr._defer_rows() == mgr.WARM_ROWS
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_warm_defer_config_and_the_steps_that_defer():
    """VATTN_WARM_DEFER (default on; 0 for A/B runs, suite system vattn-warm-now), and which steps
    ask to defer: those that schedule prompt tokens (worker.has_prefill), not decode-only steps,
    speculative tokens included."""
    from types import SimpleNamespace

    from vllm_vattention.config import ConfigError, VattnConfig
    from vllm_vattention.worker import has_prefill

    assert VattnConfig.from_env({}).warm_defer is True
    assert VattnConfig.from_env({"VATTN_WARM_DEFER": "0"}).warm_defer is False
    with pytest.raises(ConfigError, match="VATTN_WARM_DEFER"):
        VattnConfig.from_env({"VATTN_WARM_DEFER": "later"})

    def step(tokens, spec=None):
        return SimpleNamespace(num_scheduled_tokens=tokens, total_num_scheduled_tokens=sum(tokens.values()),
                               scheduled_spec_decode_tokens=spec or {})

    assert not has_prefill(step({"a": 1, "b": 1}))
    assert has_prefill(step({"a": 1, "b": 1024}))
    assert not has_prefill(step({"a": 3, "b": 1}, {"a": [7, 8]}))  # two speculative tokens: a decode
    assert has_prefill(step({"a": 4, "b": 1}, {"a": [7, 8]}))


def test_warm_does_nothing_when_nothing_changed(driver):
    """A decode step acquires, releases and swaps nothing: warm() must not rescan the warm rows."""
    mgr = make_manager(driver, rows=6, num_blocks=16, spare_blocks=4)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    assert mgr.warm() == 4
    calls = mgr.mapper.executor.background_submitted
    assert mgr.warm() == 0 and mgr.mapper.executor.background_submitted == calls
    mgr.set_blocks(r, [2], start=2, fresh_from=0)  # growth into an unwarmed slot: no swap
    assert mgr.warm() == 0
    mgr.release_row(r)  # a change: warm() looks again (nothing new to map: spares are all placed)
    assert mgr.warm() == 4
    mgr.close()
    assert driver.leaks() == []


def test_a_failing_background_op_surfaces_at_the_next_step_and_signals_still_run(driver):
    import time

    from vllm_vattention.errors import DriverError
    from vllm_vattention.memory.executor import MAP
    mgr = make_manager(driver, spare_blocks=2, background="stream")
    mgr.mapper.executor.run_background([(MAP, 1 << 20, PAGE, 12345)])  # outside any reservation
    for _ in range(500):
        if driver.native_errors:
            break
        time.sleep(0.01)
    with pytest.raises(DriverError, match="native mapping thread"):
        mgr.publish()
    seq = mgr.publish()  # reported once; the next step goes on
    mgr.sync()
    assert mgr.flag_value() == seq
    mgr.close()
    assert driver.leaks() == []


def test_prefix_hits_keep_their_frames_and_only_the_rest_is_swapped(driver):
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=8)
    bs = mgr.layout.block_size
    a = mgr.acquire_row()
    mgr.set_blocks(a, [3, 4], fresh_from=0)
    driver.write(mgr.address(a, 0, 0, 0), b"prefix!!")
    mgr.release_row(a)  # block 3 stays cached with its content
    mgr.warm()
    b = mgr.acquire_row()
    mgr.set_blocks(b, [3, 9], fresh_from=1)  # block 3 is a hit, block 9 is fresh
    assert driver.read(mgr.address(b, 0, 0, 0), 8) == b"prefix!!"
    assert mgr.pool.frame(3) == 3 and mgr.pool.frame(9) >= 16
    assert mgr.stats()["swaps"] == 1
    driver.write(mgr.address(b, bs, 0, 0), b"fresh...")
    assert driver.read(mgr.address(b, bs, 0, 0), 8) == b"fresh..."
    mgr.close()
    assert driver.leaks() == []


def test_a_step_below_a_rows_pending_background_ops_does_not_wait_for_them(driver):
    """A running row's background ops (a growth slot, or stale slots past its end that the alias
    scan unmaps) touch only slots from some `lo` up; a step that changes and reads the row below
    `lo` plans no DRAIN, so its signal does not wait for the whole background queue ahead of them
    (NOTES #68). A step that reaches `lo` still drains first."""
    from vllm_vattention.memory.executor import WAIT_EVENT
    mgr = make_manager(driver, rows=4, num_blocks=8, spare_blocks=4, background="stream")
    bs = mgr.layout.block_size
    row = mgr.acquire_row()
    mgr.set_blocks(row, [0, 1])
    mgr.publish()
    mgr.sync()
    running = BlockingFence(driver)  # holds the native thread: what follows queues up behind it
    mgr.mapper.executor.run([(WAIT_EVENT, 0, 0, running.native_handle)])
    flag_at_map = []
    real_map = driver.map
    driver.map = lambda *a, **k: (flag_at_map.append(mgr.flag_value()), real_map(*a, **k))[1]
    assert mgr.mapper.map_ahead([(row, 3)], mgr._cold_spares()) == 1  # background, pending
    mgr.set_blocks(row, [2], start=2)  # slot 2: below slot 3
    seq = mgr.publish()
    running.release()
    mgr.sync()
    assert mgr.mapper.stats.drains == 0 and mgr.mapper.stats.drains_skipped == 1
    assert flag_at_map == [seq - 1, seq]  # block 2's map ran before the signal, the growth slot's after it
    mgr.set_blocks(row, [3], start=3, fresh_from=0)  # reaches slot 3: waits for its background map
    mgr.publish()
    mgr.sync()
    assert mgr.mapper.stats.drains == 1 and mgr.stats()["swaps"] == 1  # block 3 moved into the spare there
    for j in range(4):  # every slot reads back what was written through it
        driver.write(mgr.address(row, j * bs, 0, 0), bytes([j + 1]) * 8)
        assert driver.read(mgr.address(row, j * bs, 0, 0), 8) == bytes([j + 1]) * 8
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_spares_of_reused_blocks_are_unmapped_from_idle_rows_and_warm_again(driver):
    """Steady state: a fresh block's former frame is still mapped in the row that last used the
    block; warm() unmaps it there (in the background) and warms the next row with it in the same
    call (the unmap runs first: the background queue keeps order)."""
    mgr = make_manager(driver, rows=6, num_blocks=8, spare_blocks=2)
    mgr.WARM_ROWS = 2  # the released row lies past the rows warm() keeps warm, as with many rows
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)  # rows warm 2 deep; the 2 spares warm the next row
    mgr.release_row(r)
    mgr.warm()
    r1 = mgr.acquire_row()
    mgr.set_blocks(r1, [0, 1], fresh_from=0)  # blocks 0, 1 are handed out again, fresh
    assert mgr.stats()["swaps"] == 2
    assert mgr.pool.spare_frames == {0, 1}  # mapped in row r only, which no request holds
    assert mgr.mapper.where[0] == {(r, 0)}
    nxt = mgr._free_rows[0]
    assert mgr.warm() == 2  # no spare is mapped nowhere: unmap the aliases in the idle row, warm with them
    mgr.sync()
    assert mgr.mapper.where[0] == {(nxt, 0)} and mgr.mapper.where[1] == {(nxt, 1)}
    assert mgr.warm_trace[-1][-1] == 2  # freed
    r2 = mgr.acquire_row()
    assert r2 == nxt
    mgr.set_blocks(r2, [2, 3], fresh_from=0)
    assert mgr.stats()["swaps"] == 4
    mgr.sync()
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_a_row_is_not_warmed_while_a_step_in_flight_reads_it(driver):
    mgr = make_manager(driver, rows=3, num_blocks=8, spare_blocks=4)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    stream = FakeStream()
    mgr.record_reads(stream.fence(), {r: 2 * mgr.layout.block_size})
    mgr.release_row(r)
    rows = list(mgr._free_rows)
    assert rows[-1] == r
    mgr.warm()
    assert mgr.mapper.slots[r][:2] == [0, 1]  # stale, but read by the step: left alone
    assert all(mgr.mapper.slots[x][:2] != [0, 1] for x in rows[:-1])
    mgr.close()


def test_spare_frames_reach_the_manager_through_the_pool_size(driver):
    mgr = make_manager(driver, num_blocks=16, spare_blocks=5)
    assert mgr.pool.num_frames == 21
    assert mgr.stats()["num_blocks"] == 16  # vLLM's budget is unchanged by the spares
    mgr.close()
    assert driver.leaks() == []


NUM_BLOCKS, ROWS, SPARES = 10, 4, 4


class SpareMachine(ManagerMachineBase):
    """Requests come and go as under vLLM: a new request's first blocks may be prefix hits (cached
    blocks with content), the rest are fresh (free blocks, content dead); released requests' blocks
    stay cached until handed out fresh again. Each fresh block gets a unique tag written through
    its row; every row must read its blocks' tags."""

    @initialize(layout=st.sampled_from(["interleaved", "per_layer"]), background=st.sampled_from([False, "stream"]),
                zero_row=st.booleans(), growth=st.booleans(), keep_guards=st.booleans(),
                guard_ahead=st.sampled_from([0, 0, 1, 2]), stale_guards=st.booleans(),
                drains=st.sampled_from(["fifo", "row", "row-held", "fifo-held"]))
    def setup(self, layout, background, zero_row, growth, keep_guards, guard_ahead, stale_guards, drains):
        self.driver = FakeDriver(PAGE)
        lay = make_layout(layout, SMALL, PAGE, rows=ROWS + zero_row, min_row_tokens=24)
        # guard_ahead (fa2-graphs' background guard extension) comes with keep_guards, as in the engine;
        # drains (stream mode): DRAIN or DRAIN_ROW (VATTN_ROW_DRAIN), and "held": background ops run only
        # where a drain asks for them, so a step missing one reads or writes memory not mapped yet
        stream = background == "stream"
        self.mgr = KVMemoryManager(self.driver, lay, NUM_BLOCKS, background=background, spare_blocks=SPARES,
                                   growth_ahead=growth, keep_guards=keep_guards or bool(guard_ahead),
                                   guard_ahead=guard_ahead, stale_guards=stale_guards,
                                   row_drains=stream and drains.startswith("row"))
        self.held = stream and drains.endswith("held")
        if self.held:
            self.mgr.mapper.executor.hold_background(True)
        self.mgr.GROWTH_WARM_ROWS = 1  # (of 4 rows) so that growth slots also take warm rows' spares
        self.mgr.pad_reserve = 1  # (0 at 4 spares) so that guards also take spares while warm() runs
        self.mgr.DEFER_READY_ROWS = 1  # (with 4 rows and 3 usable spares, so that warm(defer=True) defers)
        self.zero_row = self.mgr.reserve_zero_row() if zero_row else None  # the worker's dummy row
        self.bs = lay.block_size
        self.active: dict[int, list[int]] = {}
        self.tag: dict[int, bytes] = {}  # block -> what its first token holds (cached or in use)
        self.next_tag = 0
        self.stream = FakeStream()

    def _in_use(self) -> set[int]:
        return {b for blocks in self.active.values() for b in blocks}

    def _fresh(self, row: int, blocks: list[int], start: int) -> None:
        self._launch()  # the GPU runs the step only once its mappings are done
        for j, b in enumerate(blocks):
            self.next_tag += 1
            self.tag[b] = self.next_tag.to_bytes(8, "little")
            self.driver.write(self.mgr.address(row, (start + j) * self.bs, 0, 0), self.tag[b])

    def _launch(self):
        """The GPU may run the step now: its flag is reached (stream mode; held: background ops a
        drain did not ask for are still queued), or every op has run."""
        if self.mgr.stream_mode:
            seq = self.mgr.publish()
            if self.held:
                self._wait_flag(seq)
                return
        self.mgr.sync()

    def _wait_flag(self, seq: int) -> None:
        import time
        deadline = time.monotonic() + 10
        while self.mgr.flag_value() < seq:
            assert time.monotonic() < deadline, "the native thread never signaled the step"
            time.sleep(1e-4)

    @precondition(lambda self: self.held)
    @rule()
    def settle(self):
        """Held: everything queued runs (as in idle time); the page table then says what the slots do."""
        self.check_page_table()

    @precondition(lambda self: self.mgr.num_free_rows > 1)
    @rule(data=st.data())
    def new_request(self, data):
        free = sorted(set(range(NUM_BLOCKS)) - self._in_use())
        cached = sorted(self.tag)
        hits = data.draw(st.lists(st.sampled_from(cached), unique=True, max_size=2)) if cached else []
        fresh = data.draw(st.lists(st.sampled_from([b for b in free if b not in hits] or [None]), unique=True,
                                   max_size=min(3, self.mgr.layout.blocks_per_row - len(hits))))
        fresh = [b for b in fresh if b is not None]
        if not hits and not fresh:
            return
        for b in fresh:
            self.tag.pop(b, None)  # handed out fresh: vLLM evicted what it cached
        row = self.mgr.acquire_row()
        self.mgr.set_blocks(row, hits + fresh, fresh_from=len(hits))
        self.active[row] = hits + fresh
        self._fresh(row, fresh, len(hits))

    def _growth(self, data):
        """A running request and a free block it grows by (vLLM evicts what the block cached), or
        None when the row is full or no block is free."""
        row = data.draw(st.sampled_from(sorted(self.active)))
        have = self.active[row]
        free = sorted(set(range(NUM_BLOCKS)) - self._in_use())
        if len(have) >= self.mgr.layout.blocks_per_row or not free:
            return None
        b = data.draw(st.sampled_from(free))
        self.tag.pop(b, None)
        return row, have, b

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def grow(self, data):
        picked = self._growth(data)
        if picked is None:
            return
        row, have, b = picked
        self.mgr.set_blocks(row, [b], start=len(have), fresh_from=0)
        have.append(b)
        self._fresh(row, [b], len(have) - 1)

    @precondition(lambda self: self.active and self.mgr.num_free_rows > 1)
    @rule(data=st.data())
    def hit_a_block_in_the_step_it_is_fresh(self, data):
        """A running request gets block b for tokens this step computes; vLLM caches b at once, and
        a request admitted in the same step (set up first, as the runner does) hits it."""
        picked = self._growth(data)
        if picked is None:
            return
        row, have, b = picked
        new = self.mgr.acquire_row()
        hits = have + [b]
        self.mgr.set_blocks(new, hits, fresh_from=len(hits))
        self.mgr.set_blocks(row, [b], start=len(have), fresh_from=0)
        have.append(b)
        self.active[new] = list(hits)
        self._fresh(row, [b], len(have) - 1)

    @precondition(lambda self: self.active)
    @rule(data=st.data(), extra=st.integers(1, 3))
    def guard(self, data, extra):
        """FA3's over-read guard behind a row's end: spare frames mapped nowhere while there are any
        (the row's next fresh blocks move into them), else the zero page."""
        row = data.draw(st.sampled_from(sorted(self.active)))
        slots = min(len(self.active[row]) + extra, self.mgr.layout.blocks_per_row)
        self.mgr.ensure_readable(row, slots * self.bs)
        self._launch()
        for s in range(slots):  # all of it readable now
            self.driver.read(self.mgr.address(row, s * self.bs, 0, 0), 1)

    @rule()
    def reclaim(self):
        """The end of start-up: spares left in rows no request holds are unmapped."""
        self.mgr.reclaim_spares()
        where = self.mgr.mapper.where
        for f in self.mgr.pool.spare_frames:  # a spare still mapped is mapped in a held row too
            assert not where.get(f) or any(r in self.active for r, _ in where[f]), f

    @rule(defer=st.booleans(), clip=st.booleans())
    def step_and_warm(self, defer, clip):
        """A step, then warm() (clip: after a long decode step, guards clipped to the longest row and
        spares freed for them from free rows: NOTES #135)."""
        reads = {r: len(b) * self.bs for r, b in self.active.items() if b}
        if reads:
            self.launch(reads)
        waits = self.mgr.mapper.stats.hazard_waits
        self.mgr.warm(defer=defer, clip_guards=clip)
        assert self.mgr.mapper.stats.hazard_waits == waits  # warm() unmaps only what no step in flight reads

    @rule(count=st.integers(1, 4))
    def lend(self, count):
        """VATTN_LEND_BLOCKS: frames of blocks never handed out become spares until handed out (the
        machine's requests pick any free block, so lent ones are handed out at random times)."""
        before = self.mgr.pool.lent
        lent = self.mgr.lend_unused(count)
        assert 0 <= lent <= count and self.mgr.pool.lent == before + lent

    @invariant()
    def rows_read_their_blocks_content(self):
        if not hasattr(self, "mgr"):
            return
        m = self.mgr
        if self.held:  # what a step launched now reads: no sync, the held background ops stay queued
            self._launch()
        else:
            self.check_page_table()
        frames = [m.pool.frame(b) for b in range(NUM_BLOCKS)]
        owned = [f for f in frames if f is not None]
        assert len(set(owned)) == len(owned)  # no two blocks share memory
        lent = {b for b, f in enumerate(frames) if f is None}
        assert len(lent) == m.pool.lent and not lent & (self._in_use() | set(self.tag))  # never handed out
        if self.zero_row is not None:  # the zero page in every slot, never a spare
            assert set(m.mapper.slots[self.zero_row]) == {ZERO}
        assert m.pool.spare_frames == set(range(NUM_BLOCKS + SPARES)) - set(owned)
        for row, blocks in self.active.items():
            assert m.mapper.slots[row][:len(blocks)] == [m.pool.frame(b) for b in blocks]
            # what was made readable (a guard) stays mapped while the request runs: warm() takes
            # spares back only past it
            assert None not in m.mapper.slots[row][:m._guard_end[row]], (row, m._guard_end[row])
            for j, b in enumerate(blocks):
                assert self.driver.read(m.address(row, j * self.bs, 0, 0), 8) == self.tag[b], (row, j, b)


SpareMachine.TestCase.settings = machine_settings()
TestSpareMachine = SpareMachine.TestCase


@pytest.mark.parametrize("background", [False, "stream"])
def test_guard_slots_take_spares_so_the_rows_growth_needs_no_wait_and_no_driver_call(driver, background):
    """FA3 over-reads past a prefill row's end (ensure_readable). With the zero page there, the row's
    next fresh block would first have to unmap it - after the step in flight that over-reads it (a
    hazard wait that held up the next step's signal on the H200, NOTES #38). A spare frame mapped
    nowhere is taken instead: the guard reads zeros (spares are zeroed at creation), and the fresh
    block then moves into it."""
    from helpers import FakeFence
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=4, background=background)
    bs = mgr.layout.block_size
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0], fresh_from=0)
    mgr.ensure_readable(r, 3 * bs)  # the guard: slots 1 and 2
    guard = mgr.mapper.slots[r][1:3]
    assert set(guard) <= mgr.pool.spare_frames and mgr.stats()["pad_maps"] == 2 and mgr.stats()["zero_maps"] == 0
    if mgr.stream_mode:
        mgr.publish()
    mgr.sync()
    assert driver.read(mgr.address(r, bs + 3, 1, 1), 16) == bytes(16)
    in_flight = FakeFence()
    mgr.record_reads(in_flight, {r: 3 * bs})  # the step that over-reads the guard is still running
    calls = _driver_calls(driver)
    mgr.set_blocks(r, [5, 6], start=1, fresh_from=0)  # the next chunk's blocks land on the guard
    if mgr.stream_mode:
        mgr.publish()
    mgr.sync()
    s = mgr.stats()
    assert s["swaps"] == 2 and s["hazard_waits"] == 0 and in_flight.waited == 0
    assert _driver_calls(driver) == calls  # no unmap, no map, no set_access
    assert [mgr.pool.frame(5), mgr.pool.frame(6)] == guard
    driver.write(mgr.address(r, 2 * bs, 0, 0), b"block 6!")
    assert driver.read(mgr.address(r, 2 * bs, 0, 0), 8) == b"block 6!"
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_guard_slots_fall_back_to_the_zero_page_and_warm_leaves_spares_for_them(driver):
    mgr = make_manager(driver, rows=6, max_tokens=512, num_blocks=400, spare_blocks=128)
    assert mgr.pad_reserve == 4  # 128 spares: 1/32 of them
    r0 = mgr.acquire_row()  # a first request teaches the warm depth (40 fresh blocks: 5 free rows take 200)
    mgr.set_blocks(r0, list(range(40)), fresh_from=0)
    mgr.release_row(r0)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [50], fresh_from=0)
    mgr.warm()
    cold = [f for f in mgr.pool.spare_frames if f not in mgr.mapper.where]
    assert len(cold) == mgr.pad_reserve  # warm() took every other spare mapped nowhere
    mgr.ensure_readable(r, 7 * mgr.layout.block_size)  # 6 guard slots: 4 spares, then the zero page
    assert set(mgr.mapper.slots[r][1:5]) == set(cold)
    assert mgr.mapper.slots[r][5:7] == [ZERO, ZERO]
    assert mgr.stats()["pad_maps"] == 4 and mgr.stats()["zero_maps"] == 2
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_reclaim_spares_frees_the_spares_guard_slots_left_in_released_rows(driver):
    """vLLM's warm-up (max_num_seqs 2-token prefills, each with FA3's guard) leaves spares in the
    guard slots of rows that acquire_row() hands out last; reclaim_spares() at the end of start-up
    unmaps them (after the steps in flight), so warm() can place every spare when serving starts."""
    from helpers import FakeFence
    mgr = make_manager(driver, rows=8, max_tokens=64, num_blocks=32, spare_blocks=8, background="stream")
    bs = mgr.layout.block_size
    steps = [FakeFence(seq=b + 1) for b in range(4)]
    for b, step in enumerate(steps):  # four warm-up requests, each with a 3-slot guard, then released
        r = mgr.acquire_row()
        mgr.set_blocks(r, [b], fresh_from=0)
        mgr.ensure_readable(r, 4 * bs)
        mgr.record_reads(step, {r: 4 * bs})
        mgr.release_row(r)
    mgr.publish()
    cold = lambda: sum(f not in mgr.mapper.where for f in mgr.pool.spare_frames)  # noqa: E731
    assert mgr.stats()["pad_maps"] == 8 and cold() == 0
    assert mgr.reclaim_spares() == 8
    assert all(step.waited for step in steps)  # it waited for the steps that over-read the guards
    assert cold() == 8 and mgr.stats()["block_unmaps"] == 8
    mgr.mapper.check_invariants()
    r = mgr.acquire_row()  # serving starts: a request teaches the depth, warm() places every spare
    mgr.set_blocks(r, [10, 11], fresh_from=0)
    assert mgr.warm() == 8
    mgr.close()
    assert driver.leaks() == []


def test_the_dummy_row_is_backed_by_the_zero_page_and_takes_no_spare(driver):
    """The worker's dummy row (dummy runs, CUDA-graph capture, padding) is read whole but never
    grows: a spare placed there would stay out of warm()'s reach for good. On the H100 the dummy
    row's guard took 548 of 572 spares and warm() found ~half the spares on the H200 (NOTES #42)."""
    mgr = make_manager(driver, rows=4, max_tokens=64, num_blocks=32, spare_blocks=8, background="stream")
    zero = mgr.reserve_zero_row()
    assert set(mgr.mapper.slots[zero]) == {ZERO}
    assert all(f not in mgr.mapper.where for f in mgr.pool.spare_frames)  # every spare still free
    assert mgr.stats()["pad_maps"] == 0 and mgr.stats()["zero_maps"] == mgr.layout.blocks_per_row
    assert driver.read(mgr.address(zero, mgr.layout.row_tokens - 1, 0, 0), 4) == bytes(4)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    mgr.release_row(r)
    assert mgr.warm() == 2 + 2 + 2  # 8 spares less the pad reserve (0 at 8 spares) over the free rows, 2 deep
    assert mgr.warm_counts["warm_stopped_no_spare"] == 0
    assert mgr.stats()["spares_at"] == {"zero_row": 0, "running": 0, "warm": 6, "idle": 0, "free": 2}
    mgr.close()
    # what the worker did before (a dummy row made readable like any row): the report shows the stranding
    old = make_manager(driver, rows=4, max_tokens=64, num_blocks=32, spare_blocks=8, background="stream")
    dummy = old.acquire_row()
    old.ensure_readable(dummy, old.layout.row_tokens)
    old._zero_rows.add(dummy)
    assert old.stats()["spares_at"]["zero_row"] == min(8, old.layout.blocks_per_row)
    old.close()
    assert driver.leaks() == []


def test_spares_warmed_deeper_than_a_request_needs_go_back_to_warm_the_next_rows(driver):
    """Rows warmed for long requests, taken by short ones (the suite's 8192/256 then 512/1024 in one
    engine): the spares past a running request's blocks, its guard and GROWTH_KEEP slots return to
    warm() in the same call that runs out (they were stuck for the request's life, NOTES #42);
    slots a step in flight reads are left alone."""
    mgr = make_manager(driver, rows=6, max_tokens=128, num_blocks=64, spare_blocks=12)
    bs, keep = mgr.layout.block_size, mgr.GROWTH_KEEP
    r0 = mgr.acquire_row()
    mgr.set_blocks(r0, list(range(12)), fresh_from=0)  # a long request teaches depth 12
    mgr.release_row(r0)
    assert mgr.warm() == 12  # the next row, 12 deep: every spare
    mgr.sync()
    mgr._recent_fresh.clear()
    short = mgr.acquire_row()
    mgr.set_blocks(short, [20, 21], fresh_from=0)  # a short request takes the warm row: 2 swaps
    mgr.ensure_readable(short, 5 * bs)  # and a guard 3 slots past its blocks
    stream = FakeStream()
    mgr.record_reads(stream.fence(), {short: 5 * bs})
    assert mgr.stats()["swaps"] == 2
    parked = [s for s, f in enumerate(mgr.mapper.slots[short]) if f in mgr.pool.spare_frames]
    assert parked == list(range(2, 12))
    got = mgr.warm()  # depth 2 now; the 2 spares swapped out are stale aliases in r0
    mgr.sync()
    kept = [s for s, f in enumerate(mgr.mapper.slots[short]) if f in mgr.pool.spare_frames]
    assert kept == list(range(2, max(2 + keep, 5)))  # growth and guard slots keep theirs
    freed = 10 - len(kept)
    # the 2 swapped-out frames were never mapped (free at once), the freed ones warm the next rows
    # in the same call, 2 deep
    assert mgr.warm_trace[-1][-1] == freed and got == 2 + freed
    assert None not in mgr.mapper.slots[short][:5]  # the guard the step in flight reads is mapped
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


@pytest.mark.parametrize("keep_guards", [False, True])
def test_a_guard_is_let_go_once_its_row_stops_getting_one(driver, keep_guards):
    """FA3's guard past a prefill row (spares, ensure_readable) is needed while FA3 reads the row.
    After a step without one (the request decodes with FA2, which reads only its tokens), warm()
    may take the guard's spares back for the free rows, once no step in flight reads them; before,
    they stayed in the guard for the request's life (NOTES #62: with mixed prompt lengths most spares),
    as they still do with keep_guards (VATTN_KEEP_GUARDS=1)."""
    from helpers import FakeFence
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=4, background="stream", keep_guards=keep_guards)
    bs = mgr.layout.block_size
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0], fresh_from=0)
    mgr.ensure_readable(r, 5 * bs)  # the prefill step's guard: slots 1-4, every spare
    mgr.publish()
    reading = FakeFence()
    mgr.record_reads(reading, {r: 5 * bs})
    assert mgr.warm() == 0  # the guard holds every spare, and is current
    mgr.ensure_readable(r, 5 * bs)  # the next prefill step: still current
    mgr.publish()
    assert mgr.warm() == 0 and set(mgr.mapper.slots[r][1:5]) <= mgr.pool.spare_frames
    mgr.publish()  # a decode step: no guard; the prefill step that read it is still in flight
    assert mgr.warm() == 0 and mgr._guard_end[r] == (5 if keep_guards else 1)
    assert set(mgr.mapper.slots[r][1:5]) <= mgr.pool.spare_frames  # read in flight: left alone
    reading.complete()
    mgr.publish()
    warm = mgr.warm()  # the guard's spares past the growth slots go to the next free rows
    mgr.sync()
    kept = [s for s in range(1, 5) if mgr.mapper.slots[r][s] in mgr.pool.spare_frames]
    if keep_guards:
        assert kept == [1, 2, 3, 4] and warm == 0
    else:
        assert kept == list(range(1, 1 + mgr.GROWTH_KEEP)) and warm == 4 - len(kept)
    assert mgr.mapper.stats.hazard_waits == 0
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_growth_ahead_maps_a_spare_past_each_running_request_so_its_next_block_needs_no_driver_call(driver):
    """growth_ahead: warm() maps a spare, in the background, into the slot past each running
    request's blocks that no step in flight reads; the request's next block (decode growth) then
    moves into it without a driver call, and the slot after it gets the next spare."""
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=4, background="stream", growth_ahead=True)
    bs = mgr.layout.block_size
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    mgr.publish()
    stream = FakeStream()
    mgr.record_reads(stream.fence(), {r: 2 * bs})  # the step reads slots 0-1 and is still running
    mgr.warm()
    assert mgr.mapper.slots[r][2] in mgr.pool.spare_frames and mgr.stats()["growth_maps"] == 1
    assert mgr.mapper.slots[r][3] is None  # one slot ahead, not more
    mgr.sync()
    stream.finished = stream.launched
    calls, maps = _driver_calls(driver), mgr.stats()["block_maps"]
    mgr.set_blocks(r, [5], start=2, fresh_from=0)  # the request crosses into its third block
    mgr.publish()
    mgr.sync()
    assert _driver_calls(driver) == calls and mgr.stats()["block_maps"] == maps and mgr.stats()["swaps"] == 1
    assert mgr.mapper.slots[r][2] == mgr.pool.frame(5)
    for j, b in enumerate((0, 1, 5)):
        driver.write(mgr.address(r, j * bs, 0, 0), bytes([b + 1]) * 8)
    mgr.warm()  # the next growth slot
    mgr.sync()
    assert mgr.mapper.slots[r][3] in mgr.pool.spare_frames and mgr.stats()["growth_maps"] == 2
    for j, b in enumerate((0, 1, 5)):
        assert driver.read(mgr.address(r, j * bs, 0, 0), 8) == bytes([b + 1]) * 8
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_growth_ahead_takes_the_spares_of_free_rows_past_the_first_when_short(driver):
    """With no spare mapped nowhere for a growth slot, warm() keeps GROWTH_WARM_ROWS free rows warm
    and frees the spares of the others (and stale aliases) for growth slots, which take them at the
    next call; until a new request takes a row, the rest stay for the next growth. Without
    growth_ahead the free rows keep them."""
    def run(growth):
        drv = FakeDriver(PAGE)
        mgr = make_manager(drv, rows=6, num_blocks=32, spare_blocks=6, background="stream", growth_ahead=growth)
        mgr.GROWTH_WARM_ROWS, mgr.pad_reserve = 1, 0
        r0 = mgr.acquire_row()
        mgr.set_blocks(r0, [0, 1], fresh_from=0)  # teaches depth 2, then leaves (its slots stay mapped)
        mgr.release_row(r0)
        mgr.warm()
        warm_rows = [x for x in mgr._free_rows if mgr.mapper.slots[x][0] in mgr.pool.spare_frames]
        assert len(warm_rows) == 3  # 2 deep: every spare
        a = mgr.acquire_row()
        assert a == warm_rows[0]
        mgr.set_blocks(a, [0, 1], fresh_from=0)  # fresh again: both swapped; frames 0 and 1, spares
        mgr.publish()  # now, stay mapped in r0 (stale aliases): no spare is mapped nowhere
        for _ in range(3):  # (the first finds the growth slot short and frees spares, the next uses one)
            mgr.warm()
        mgr.sync()
        spare = mgr.pool.spare_frames
        out = (mgr.mapper.slots[a][2] in spare, sum(mgr.mapper.slots[x][0] in spare for x in mgr._free_rows),
               sum(f not in mgr.mapper.where for f in spare))
        assert mgr.mapper.stats.hazard_waits == 0
        mgr.mapper.check_invariants()
        mgr.close()
        assert drv.leaks() == []
        return out

    assert run(growth=False) == (False, 3, 0)  # the aliases freed warm a third row again
    assert run(growth=True) == (True, 1, 3)  # growth slot; one free row warm; 3 kept for growth


def test_unmap_aliases_frees_a_spare_only_if_every_slot_that_maps_it_may_go(driver):
    """A block's former frame, now a spare, stays mapped where the block was (deferred
    reclamation), possibly in several rows (a prefix hit). unmap_aliases frees it only if the
    caller's slot_ok holds for every such slot, and then unmaps all of them; one that maps a single
    slot takes the same rule."""
    mgr = make_manager(driver, rows=5, num_blocks=8, spare_blocks=2, background=False)
    m, pool = mgr.mapper, mgr.pool
    r0, r1 = mgr.acquire_row(), mgr.acquire_row()
    mgr.set_blocks(r0, [0, 1], fresh_from=0)
    mgr.set_blocks(r1, [0])  # block 0 in both rows
    mgr.sync()
    shared, alone = pool.frame(0), pool.frame(1)
    s0, s1 = sorted(pool.spare_frames)
    assert pool.swap(0, s0) == shared and pool.swap(1, s1) == alone  # both blocks move: old frames spare
    assert m.where[shared] == {(r0, 0), (r1, 0)} and m.where[alone] == {(r0, 1)}
    with pytest.raises(ValueError, match="is not a spare"):
        m.unmap_aliases([s0], lambda r, s: True)
    assert m.unmap_aliases([shared, alone], lambda r, s: r == r1) == 0  # (r0, 0) and (r0, 1) must stay
    assert m.where[shared] == {(r0, 0), (r1, 0)} and m.where[alone] == {(r0, 1)}
    assert m.unmap_aliases([shared, alone], lambda r, s: s == 0) == 1  # the shared one: both its slots
    mgr.sync()
    assert shared not in m.where and m.where[alone] == {(r0, 1)}
    assert m.slots[r0][0] is None and m.slots[r1][0] is None
    assert driver.mapping_at(mgr.address(r0, 0, 0, 0)) is None and driver.mapping_at(mgr.address(r1, 0, 0, 0)) is None
    assert m.unmap_aliases([alone], lambda r, s: True) == 1
    mgr.sync()
    assert alone not in m.where and driver.mapping_at(mgr.address(r0, mgr.layout.block_size, 0, 0)) is None
    mgr.close()
    assert driver.leaks() == []


@pytest.mark.parametrize("background", [False, "stream"])
def test_a_request_with_prefix_hits_gets_the_free_row_that_still_maps_them(driver, background):
    """vllm bench serve's prompts share prefixes (NOTES #71): a hit block has content, so a warm
    row must map it (and unmap the spare its slot held) while the step waits. The row of the request
    that computed the blocks, released, still maps them at the same slots (deferred reclamation):
    the new request gets that row, and only what differs is mapped."""
    from vllm_vattention.memory import RequestRows
    mgr = make_manager(driver, rows=6, num_blocks=16, spare_blocks=4, background=background)
    bs = mgr.layout.block_size
    rows = RequestRows(mgr)

    def settle():  # the step's mappings in place (stream mode: published to the native thread first)
        if mgr.stream_mode:
            mgr.publish()
        mgr.sync()

    first = rows.admit("a", [0, 1, 2], 0)
    settle()
    for j, b in enumerate((0, 1, 2)):
        driver.write(mgr.address(first, j * bs, 0, 0), bytes([10 + b]) * 8)
    rows.remove("a")
    mgr.warm()
    settle()
    head = mgr._free_rows[0]
    assert head != first  # FIFO would hand out another row (the released one went to the back)
    before, maps = _driver_calls(driver), mgr.stats()["block_maps"]
    row = rows.admit("b", [0, 1, 5], 2 * bs)  # blocks 0 and 1 are hits, 5 is fresh
    settle()
    assert row == first and mgr.stats()["prefix_rows_taken"] == 1
    assert mgr.stats()["block_maps"] == maps + 1  # block 5 only (slot 2 held block 2: unmapped first)
    assert _driver_calls(driver) - before == 3  # unmap, map, set_access
    for j, b in enumerate((0, 1)):  # the hits read back what request a wrote
        assert driver.read(mgr.address(row, j * bs, 0, 0), 8) == bytes([10 + b]) * 8
    # few hits against many fresh blocks: a warm row costs fewer maps, FIFO stands
    rows.remove("b")
    row2 = rows.admit("c", [0, 6, 7, 8], bs)
    assert row2 != first and mgr.stats()["prefix_rows_taken"] == 1
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_a_prefix_row_a_step_in_flight_still_reads_is_not_taken(driver):
    from vllm_vattention.memory import RequestRows
    mgr = make_manager(driver, rows=6, num_blocks=16, spare_blocks=4)
    bs = mgr.layout.block_size
    rows = RequestRows(mgr)
    first = rows.admit("a", [0, 1, 2], 0)
    stream = FakeStream()
    mgr.record_reads(stream.fence(), {first: 3 * bs})  # a step still reads the row
    rows.remove("a")
    other = rows.admit("b", [0, 1, 5], 2 * bs)
    assert other != first
    assert mgr.stats()["prefix_rows_taken"] == 0 and mgr.stats()["hazard_waits"] == 0
    stream.finished = stream.launched  # the step is done: the row is free to take now
    rows.remove("b")  # (its row maps the hits too now)
    assert rows.admit("c", [0, 1, 7], 2 * bs) in (first, other) and mgr.stats()["prefix_rows_taken"] == 1
    mgr.close()


def test_eager_reclamation_has_no_prefix_row_to_offer(driver):
    from vllm_vattention.memory import RequestRows
    mgr = make_manager(driver, rows=6, num_blocks=16, reclaim="eager")
    rows = RequestRows(mgr)
    first = rows.admit("a", [0, 1, 2], 0)
    rows.remove("a")
    assert rows.admit("b", [0, 1, 5], 2 * mgr.layout.block_size) != first
    mgr.close()


def test_prefix_rows_off_keeps_fifo_order(driver):
    """VATTN_PREFIX_ROWS=0 (suite system vattn-fifo-rows): the rule before NOTES #71, for A/B runs."""
    from vllm_vattention.config import VattnConfig
    from vllm_vattention.memory import RequestRows
    assert VattnConfig.from_env({"VATTN_PREFIX_ROWS": "0"}).prefix_rows is False
    assert VattnConfig.from_env({}).prefix_rows is True
    mgr = make_manager(driver, rows=6, num_blocks=16, prefix_rows=False)
    rows = RequestRows(mgr)
    first = rows.admit("a", [0, 1, 2], 0)
    rows.remove("a")
    assert rows.admit("b", [0, 1, 5], 2 * mgr.layout.block_size) != first
    assert mgr.stats()["prefix_rows_taken"] == 0
    mgr.close()


def test_alias_scans_between_full_ones_look_only_at_spares_that_can_have_come_free(driver):
    """warm()'s alias scan looked at every spare each time (~1-2 ms of the engine thread with 2,048
    spares). Between full scans (every ALIAS_FULL_EVERY scans, or when the warm depth or window
    changed) it now looks only at frames that became spares since, spares in rows acquired or
    released, and those a step in flight kept last time: here it frees the same frames a full scan
    would, after the step that read one of them is done."""
    mgr = make_manager(driver, rows=8, num_blocks=8, spare_blocks=4)
    mgr.WARM_ROWS = 2
    looked = []
    real = mgr._alias_candidates  # None: every spare (a full scan)
    mgr._alias_candidates = lambda *a: (lambda frames: looked.append(frames and list(frames)) or frames)(real(*a))
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    mgr.release_row(r)
    mgr.warm()
    r1 = mgr.acquire_row()
    mgr.set_blocks(r1, [0, 1], fresh_from=0)  # 0 and 1 move into spares; their frames stay mapped in r
    mgr.release_row(r1)
    mgr.warm()  # the first scan: a full one
    assert looked == [None]
    r2 = mgr.acquire_row()
    mgr.set_blocks(r2, [0, 1], fresh_from=0)  # once more: r1's frames of 0 and 1 become spares too
    stream = FakeStream()
    mgr.record_reads(stream.fence(), {r1: 2 * mgr.layout.block_size})  # a step still reads r1
    assert mgr.pool.respared and not mgr.pool.spare_frames.isdisjoint(mgr.pool.respared)
    n_before = len(looked)
    mgr.warm()
    assert len(looked) == n_before + 1 and looked[-1] is not None  # a scan of some spares, not all
    assert 0 < len(looked[-1]) < len(mgr.pool.spare_frames) + 2
    kept = {f for f in mgr.pool.spare_frames if any(rr == r1 for rr, _ in mgr.mapper.where.get(f, ()))}
    assert kept and kept <= mgr._alias_retry  # read in flight: looked at again next time
    stream.finished = stream.launched  # the step is done
    mgr._warm_stale = mgr._scan_due = True
    mgr.warm()
    assert looked[-1] is not None and kept <= set(looked[-1])
    assert all(all(rr != r1 for rr, _ in mgr.mapper.where.get(f, ())) for f in kept)  # unmapped from r1 now
    mgr.sync()
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_an_alias_scan_frees_only_what_the_rows_it_stopped_at_need_the_furthest_first(driver, monkeypatch):
    """At 16 req/s on an H200 the alias scan freed every spare outside the rows warm() had reached:
    when whole-prompt prefix hits dropped the warm depth to 1 it unmapped ~1,855 warm spares past
    slot 1 to give a few rows one slot each, then re-warmed them when the depth came back, in
    background batches a step's DRAIN ran on its path (NOTES #117). It now frees as many as the rows
    it stopped at need, past the depth in the rows acquired last first: here 2 unmaps, not 6, and
    the next row keeps its 4 warm slots for the next request with 4 fresh blocks. The
    default since an H200 serving pair (NOTES #120); VATTN_BOUNDED_SCAN=0 keeps the old scan."""
    from vllm_vattention.config import VattnConfig
    assert VattnConfig.from_env({}).bounded_scan is True
    assert VattnConfig.from_env({"VATTN_BOUNDED_SCAN": "0"}).bounded_scan is False
    assert _depth_drop_unmaps(driver, monkeypatch, bounded_scan=False) == 6  # the old scan's
    assert _depth_drop_unmaps(driver, monkeypatch, bounded_scan=True) == 2


def test_a_bounded_alias_scan_moves_up_only_what_the_first_rows_lack_when_the_depth_rises(driver):
    """Three rows warm 4 deep hold all 12 spares; the depth rises to 5. The first two rows can take
    their fifth slot from the third row's deepest ones (the donor behind them), which the third
    row, the last to be handed out, does without: both scans end with rows 5, 5 and 2 deep, but the
    old scan unmapped all 8 spares of the rows behind the first and mapped them again (the move-up
    case of NOTES #117: 1,952 unmaps in one call on the H200's server), the bounded one 2. (The
    last row served only in part must not stop the rows before it from being served.)"""
    ends = {}
    for bounded in (False, True):
        mgr = make_manager(driver, rows=8, num_blocks=24, spare_blocks=12, bounded_scan=bounded)
        mgr.WARM_ROWS = 3
        for blocks in ([0, 1, 2, 3], [4, 5, 6, 7]):  # depth 4; the second leaves no spare cold
            r = mgr.acquire_row()
            mgr.set_blocks(r, blocks, fresh_from=0)
            mgr.release_row(r)
            mgr.warm()
            mgr.sync()
        window = list(mgr._free_rows)[:3]

        def depths():
            spare, slots = mgr.pool.spare_frames, mgr.mapper.slots
            return [sum(1 for f in slots[row][:8] if f is not None and f in spare) for row in window]

        assert depths() == [4, 4, 4] and next(iter(mgr._cold_spares()), None) is None
        mgr._recent_fresh.append(5)  # a request with 5 fresh blocks (the row it took is beside the point)
        mgr._warm_stale = mgr._scan_due = True
        unmaps = mgr.stats()["block_unmaps"]
        mgr.warm()
        mgr.sync()
        ends[bounded] = (depths(), mgr.stats()["block_unmaps"] - unmaps)
        mgr.mapper.check_invariants()
        mgr.close()
        assert driver.leaks() == []
    assert ends == {False: ([5, 5, 2], 8), True: ([5, 5, 2], 2)}


def _depth_drop_unmaps(driver, monkeypatch, bounded_scan: bool) -> int:
    """Two rows warm 4 deep, then a request with one fresh block drops the depth to 1: the unmaps
    of the scan that warms the next rows 1 deep (asserting where the spares end up when bounded)."""
    monkeypatch.setattr(KVMemoryManager, "WARM_HISTORY", 1)  # the depth follows the last request
    mgr = make_manager(driver, rows=8, num_blocks=16, spare_blocks=8, bounded_scan=bounded_scan)
    mgr.WARM_ROWS = 4
    assert mgr.stats()["bounded_scan"] == int(bounded_scan)
    assert mgr.pad_reserve == 0
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1, 2, 3], fresh_from=0)  # 4 fresh blocks: depth 4
    mgr.release_row(r)
    mgr.warm()
    mgr.sync()

    def spare_slots(row):
        return [s for s, f in enumerate(mgr.mapper.slots[row]) if f is not None and f in mgr.pool.spare_frames]

    first, second = list(mgr._free_rows)[:2]
    assert spare_slots(first) == spare_slots(second) == [0, 1, 2, 3]  # all 8 spares: two rows 4 deep
    b = mgr.acquire_row()
    assert b == first
    mgr.set_blocks(b, [4], fresh_from=0)  # one fresh block: depth 1; it moves into the row's slot-0 spare
    mgr.release_row(b)  # (to the back: slots 1-3 still hold spares)
    unmaps = mgr.stats()["block_unmaps"]
    mgr.warm()
    mgr.sync()
    window = list(mgr._free_rows)[:4]
    assert window[0] == second
    assert all(spare_slots(row)[:1] == [0] for row in window)  # warm to the depth either way
    if bounded_scan:
        assert spare_slots(second) == [0, 1, 2, 3]  # kept: the scan took what the others needed elsewhere
        assert all(spare_slots(row) == [0] for row in window[1:])
        assert spare_slots(b) == [1]  # the donor was the row acquired last, its deepest slots first
    else:
        assert spare_slots(second) == [0]  # stripped to the depth
    unmaps = mgr.stats()["block_unmaps"] - unmaps
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []
    return unmaps


def test_an_alias_scan_looks_at_every_spare_every_so_often_and_when_depth_or_window_change(driver):
    mgr = make_manager(driver, rows=8, num_blocks=8, spare_blocks=4)
    assert mgr._alias_candidates(2, 4) is None  # the first
    f = next(iter(mgr.pool.spare_frames))
    mgr.pool.respared.append(f)
    assert mgr._alias_candidates(2, 4) == [f]  # a frame that became a spare
    assert mgr.pool.respared == [] and mgr._touched == set()
    assert mgr._alias_candidates(3, 4) is None  # the depth changed
    assert mgr._alias_candidates(3, 2) is None  # the window changed
    for _ in range(mgr.ALIAS_FULL_EVERY):
        assert mgr._alias_candidates(3, 2) == []
    assert mgr._alias_candidates(3, 2) is None  # every ALIAS_FULL_EVERY + 1 scans
    assert mgr._alias_candidates(2, 2) is None  # changed back: full again
    mgr.close()


def test_guard_ahead_extends_a_growing_rows_guard_in_the_background(driver):
    """guard_ahead (VATTN_DECODE_KERNEL=fa2-graphs): after a running row's blocks grow, warm() maps
    the slots up to guard_ahead past them in the background, with spares, so that the next step
    that over-reads every row finds its guard in place (guards_ready): its ensure_readable plans no
    driver call for the step. Without keep_guards it is refused (the guard would be let go at once)."""
    with pytest.raises(ValueError, match="guard_ahead needs keep_guards"):
        make_manager(driver, guard_ahead=2)
    # (16 spares: the free rows' warming leaves enough cold ones for the guard, which is spares or nothing)
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=16, background="stream",
                       keep_guards=True, guard_ahead=2)
    bs = mgr.layout.block_size
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    mgr.ensure_readable(r, 4 * bs)  # a prefill's guard: slots 2 and 3, on the step's path
    mgr.publish()
    mgr.sync()
    mgr.set_blocks(r, [2], start=2, fresh_from=0)  # decode growth into slot 2
    mgr.publish()
    assert mgr.stats()["guard_ahead_maps"] == 0
    assert mgr.guards_ready([r], [4 * bs]) and not mgr.guards_ready([r], [4 * bs + 1])
    guard_end = mgr._guard_end[r]
    # a step with prefill chunks (warm(defer=True), NOTES #109): the extension waits for the next
    # call, the row still listed (free rows may still be warmed: their own rule) ...
    mgr.warm(defer=True)
    assert mgr.stats()["guard_ahead_maps"] == 0 and mgr._guard_end[r] == guard_end and r in mgr._ahead_rows
    # ... but not two calls in a row (offline, nearly every step carries prefill chunks): the next
    # extends, deferred or not. After the step's launch, in the background: slots 4 and 5 (held end
    # 3 + 2, and one more for the block the row gets in the step that reads past it)
    mgr.warm(defer=True)
    mgr.sync()
    s = mgr.stats()
    assert s["guard_ahead_maps"] == 2 and mgr._guard_end[r] == 6
    assert {mgr.mapper.slots[r][4], mgr.mapper.slots[r][5]} <= mgr.pool.spare_frames  # growth moves into them
    assert mgr.guards_ready(np.array([r]), np.array([6 * bs])) and not mgr.guards_ready([r], [6 * bs + 1])
    calls = _driver_calls(driver)
    mgr.set_blocks(r, [3], start=3, fresh_from=0)  # the row's next block (into the spare at slot 3) ...
    mgr.ensure_readable(r, 6 * bs)  # ... and a mixed step reads its guard up to slot 5: readable already
    mgr.publish()
    mgr.sync()
    assert _driver_calls(driver) == calls
    mgr.release_row(r)
    assert r not in mgr._ahead_rows
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_guard_ahead_takes_spares_only_and_within_its_share(driver):
    """NOTES #110: a guard extended ahead is spares or nothing (the zero page there would make the
    row's growth an unmap that waits for the steps over-reading it), a row short of spares keeps
    its guard and waits for a later call, and no guard is extended while the running rows' guards
    could not all be spares within GUARD_SPARE_SHARE of the spares (offline: hundreds of rows, whose
    spares then warm new requests' rows instead)."""
    mgr = make_manager(driver, rows=6, num_blocks=24, spare_blocks=6, background="stream",
                       keep_guards=True, guard_ahead=2)
    mgr.GUARD_SPARE_SHARE = 2.0  # (6 spares: two rows' guards of 2 + 1; within the share, three rows)
    mgr.pad_reserve = 0
    a, b = mgr.acquire_row(), mgr.acquire_row()
    mgr.set_blocks(a, [0, 1], fresh_from=2)
    mgr.set_blocks(b, [2, 3], fresh_from=2)
    mgr.publish()
    held_cold = list(mgr.mapper.cold_spares())
    assert len(held_cold) == 6
    mgr._extend_guards()
    mgr.sync()
    # both rows: slots 2, 3 and 4 hold spares
    assert all(mgr.mapper.slots[r][s] in mgr.pool.spare_frames for r in (a, b) for s in (2, 3, 4))
    assert mgr._ahead_rows == {} and mgr.stats()["zero_maps"] == 0
    # a third row finds no spare left: nothing mapped for it (no zero page), still listed
    c = mgr.acquire_row()
    mgr.set_blocks(c, [4, 5], fresh_from=2)
    mgr.publish()
    maps = mgr.stats()["guard_ahead_maps"]
    mgr._extend_guards()
    mgr.sync()
    assert mgr.mapper.slots[c][2] is None and c in mgr._ahead_rows
    assert mgr.stats()["guard_ahead_maps"] == maps and mgr.stats()["zero_maps"] == 0
    assert not mgr.guards_ready([c], [3 * mgr.layout.block_size])
    # over the share: 2 rows x 3 slots > 0.5 x 6 spares: the call extends nothing and says so
    mgr.GUARD_SPARE_SHARE = 0.5
    mgr.release_row(a)
    mgr.warm()  # (spares of a's guard become cold again: warm() may take them for free rows)
    before = mgr.stats()["warm_guards_over_budget"]
    mgr._extend_guards()
    assert mgr.stats()["warm_guards_over_budget"] == before + 1 and c in mgr._ahead_rows
    mgr.sync()
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


@pytest.mark.parametrize("share, kept", [(4.0, True), (0.5, False)])
def test_over_its_share_fa2_graphs_lets_prefill_guards_go(driver, share, kept):
    """With guard_ahead (fa2-graphs) guards are kept for a request's life while the running rows'
    guards fit GUARD_SPARE_SHARE of the spares; over it nothing is extended, mixed steps run fa2's
    two launches, and a prefill's guard is let go once a step passes without it, as without
    keep_guards (NOTES #110: mixed-64-4096-in's admission maps 29,874 -> 7,371 in the CPU harness)."""
    mgr = make_manager(driver, rows=6, num_blocks=16, spare_blocks=4, keep_guards=True, guard_ahead=2)
    mgr.GUARD_SPARE_SHARE = share  # (4 spares; a guard of 3 slots per running row)
    bs = mgr.layout.block_size
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1])
    mgr.ensure_readable(r, 4 * bs)  # a prefill chunk's guard: slots 2 and 3
    mgr.warm()
    assert mgr._guard_end[r] == (5 if kept else 4)  # guarded in this step: kept (in the share: extended)
    mgr.warm()  # a step without it (the request decodes)
    if kept:  # (and extended ahead: blocks 2 + 3 slots)
        assert mgr._guard_end[r] == 5
    else:  # let go: its slots are what warm() may take spares back from
        assert mgr._guard_end[r] == mgr._held_end[r] == 2 and r in mgr._touched
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_guards_ready_raises_a_readable_mark_an_unmap_left_low(driver):
    """A row that grows into a guard slot holding the zero page has it unmapped, which lowers its
    readable mark, then mapped with the block: readable again. guards_ready checks the slots up to
    what a step needs (no mapping) rather than trusting the low mark (NOTES #110: at 16 req/s most
    of fa2-graphs' two-launch mixed steps in the CPU harness were such rows)."""
    mgr = make_manager(driver, rows=4, num_blocks=16)  # (no spares: the guard is the zero page)
    bs = mgr.layout.block_size
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1])
    mgr.ensure_readable(r, 4 * bs)
    assert mgr.mapper._readable[r] == 4 and mgr.mapper.slots[r][2] == ZERO
    mgr.set_blocks(r, [2], start=2, fresh_from=0)  # growth into the zero page's slot: unmap, map
    assert mgr.mapper._readable[r] == 2 and mgr.mapper.slots[r][2] == 2
    assert mgr.guards_ready([r], [4 * bs]) and mgr.mapper._readable[r] == 4
    assert not mgr.guards_ready([r], [4 * bs + 1]) and mgr.mapper._readable[r] == 4  # slot 4: a hole
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_guards_fit_counts_a_steps_guard_slots_against_the_cold_spares(driver):
    """guards_fit (NOTES #112): could ensure_readable give these rows their slots with spares mapped
    nowhere alone? fa2-graphs asks it of a one-launch mixed step's prefill rows, whose guards the
    decodes lengthen (the clipped view ends at the launch's longest row). Offline at
    512-in-1024-out every spare was warm, so those guards were the zero page, and each row then
    grew into its guard with an unmap that waited for the step over-reading it. Asking maps nothing;
    what it says ensure_readable then does without the zero page."""
    mgr = make_manager(driver, rows=6, num_blocks=24, spare_blocks=3, background="stream")
    bs = mgr.layout.block_size
    a, b = mgr.acquire_row(), mgr.acquire_row()
    mgr.set_blocks(a, [0, 1], fresh_from=2)
    mgr.set_blocks(b, [2, 3], fresh_from=2)
    mgr.publish()
    mgr.sync()
    assert len(list(mgr.mapper.cold_spares())) == 3
    assert mgr.guards_fit([a, b], [2 * bs, 2 * bs])  # no slot to map: no spare needed
    assert mgr.mapper.holes(a, 4) == 2 and mgr.mapper.holes(a, 2) == 0
    calls = _driver_calls(driver)
    assert mgr.guards_fit(np.array([a, b]), np.array([3 * bs, 4 * bs]))  # 1 + 2 slots: 3 spares
    assert not mgr.guards_fit([a, b], [4 * bs, 4 * bs])  # 4 slots, 3 spares: one would be the zero page
    mgr.sync()
    assert _driver_calls(driver) == calls and mgr.stats()["pad_maps"] == mgr.stats()["zero_maps"] == 0
    mgr.ensure_readable(a, 3 * bs)
    mgr.ensure_readable(b, 4 * bs)
    assert mgr.stats()["pad_maps"] == 3 and mgr.stats()["zero_maps"] == 0
    assert mgr.guards_fit([a, b], [3 * bs, 4 * bs]) and not mgr.guards_fit([a], [4 * bs])  # spares all taken
    nospare = make_manager(driver, rows=4, num_blocks=16)
    r = nospare.acquire_row()
    nospare.set_blocks(r, [0])
    assert nospare.guards_fit([r], [bs]) and not nospare.guards_fit([r], [bs + 1])
    for m in (mgr, nospare):
        m.sync()
        m.mapper.check_invariants()
        m.close()
    assert driver.leaks() == []


def test_guard_ahead_puts_spares_where_a_released_rows_stale_frames_were(driver):
    """A row's guard region may hold the frames of its last user's blocks (deferred reclamation).
    The row grows into those slots while one-launch mixed steps over-read them, and a fresh block
    moves only into a spare (else its slot is unmapped after a wait for those steps), so guard_ahead
    replaces them with spares where no step in flight reads them yet (NOTES #110)."""
    mgr = make_manager(driver, rows=1, num_blocks=16, spare_blocks=16, keep_guards=True, guard_ahead=2)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1, 2, 3])
    mgr.release_row(r)
    assert mgr.acquire_row() == r  # (its slots still map blocks 0-3: nothing unmapped them)
    mgr.set_blocks(r, [4, 5])  # the new request's two blocks; slots 2 and 3 keep stale frames
    stale = [mgr.mapper.slots[r][s] for s in (2, 3)]
    assert not set(stale) & mgr.pool.spare_frames
    unmaps = mgr.stats()["block_unmaps"]
    mgr._extend_guards()
    assert all(mgr.mapper.slots[r][s] in mgr.pool.spare_frames for s in (2, 3, 4))
    assert mgr.stats()["block_unmaps"] == unmaps + 2 and mgr.mapper._readable[r] == 5
    mgr.set_blocks(r, [6], start=2, fresh_from=0)  # growth: moves into the spare, no driver call
    assert mgr.stats()["swaps"] >= 1 and mgr.mapper.slots[r][2] not in stale
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_warm_rows_leave_the_cold_spares_a_pending_guard_needs(driver):
    """NOTES #110: a guard extended ahead is spares or nothing, and in serving nearly every spare sits
    in a warm row; so while running rows' guards wait to be extended (and fit the share), warm()
    leaves them guard_ahead + 1 cold spares each. (Without that, the warming in the admitting step,
    whose extension waits a call, took all but one here, and the guard could not be extended.)"""
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=8, background="stream",
                       keep_guards=True, guard_ahead=2)
    mgr.GUARD_SPARE_SHARE = 1.0  # (8 spares: the row and the dummy row, 3 slots each, within it)
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)
    mgr.publish()
    mgr.warm(defer=True)  # the admitting step: free rows warmed, the guard's extension left to the next call
    assert r in mgr._ahead_rows and mgr.stats()["warm_calls"] == 1
    assert len(list(mgr.mapper.cold_spares())) >= 3
    mgr.warm(defer=True)
    mgr.sync()
    assert mgr.stats()["guard_ahead_maps"] == 3 and r not in mgr._ahead_rows
    assert all(mgr.mapper.slots[r][s] in mgr.pool.spare_frames for s in (2, 3, 4))
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_cold_spares_are_exactly_the_spares_mapped_nowhere_as_they_change_hands(driver):
    """mapper.cold_spares() keeps a set of candidates instead of scanning every spare per call: it
    must still yield every spare mapped nowhere, and only those, after swaps (a fresh block's former
    frame becomes a spare, mapped or not), unmaps of aliases, warming and lending."""
    mgr = make_manager(driver, rows=6, num_blocks=8, spare_blocks=3)
    mgr.WARM_ROWS = 2

    def cold_now():
        return {f for f in mgr.pool.spare_frames if f not in mgr.mapper.where}

    assert list(mgr.mapper.cold_spares()) == sorted(cold_now()) == [8, 9, 10]
    r = mgr.acquire_row()
    mgr.set_blocks(r, [0, 1], fresh_from=0)  # fresh blocks move into mapped spares or take cold ones
    assert set(mgr.mapper.cold_spares()) == cold_now()
    mgr.release_row(r)
    mgr.warm()
    mgr.sync()
    assert set(mgr.mapper.cold_spares()) == cold_now()
    r1 = mgr.acquire_row()
    mgr.set_blocks(r1, [0, 1], fresh_from=0)  # handed out fresh again: their frames become spares
    assert set(mgr.mapper.cold_spares()) == cold_now()
    mgr.warm()  # unmaps aliases in the idle row: those frames become cold, then warm the next row
    mgr.sync()
    assert set(mgr.mapper.cold_spares()) == cold_now()
    assert mgr.lend_unused(2) == 2  # never-handed-out blocks' frames become spares mapped nowhere
    lent = cold_now()
    assert len(lent) >= 2 and set(mgr.mapper.cold_spares()) == lent
    mgr.mapper.check_invariants()
    mgr.close()


def test_a_spare_mapped_nowhere_that_the_mapperlost_track_of_fails_the_invariants(driver):
    mgr = make_manager(driver, rows=4, num_blocks=8, spare_blocks=2)
    mgr.mapper.check_invariants()
    mgr.mapper._cold.discard(9)  # as if an unmap or a new spare had not been recorded
    with pytest.raises(MappingError, match=r"not tracked as cold: \[9\]"):
        mgr.mapper.check_invariants()
    mgr.close()


def test_cold_candidates_do_not_pile_up_when_callers_stop_early(driver):
    """Frames keep becoming spares while still mapped in some row (deferred reclamation: a block
    handed out fresh moves into a spare, its former frame stays mapped where it was used), and
    callers that find a cold spare early stop there, leaving the candidates after it unchecked.
    mapper.cold_spares() must keep its candidates within a constant of the spares mapped nowhere."""
    mgr = make_manager(driver, rows=10, max_tokens=32 * 16, num_blocks=400, spare_blocks=8)
    pool, mapper = mgr.pool, mgr.mapper
    assert mgr.layout.blocks_per_row >= 30
    for row in range(10):  # blocks 100..399 mapped, 30 to a row (mapper level: no requests)
        mapper.set_blocks(row, list(range(100 + 30 * row, 130 + 30 * row)))
    pool.swap(0, 400)  # block 0 (mapped nowhere) moves into a spare: frame 0, the lowest, is cold
    taken = 401
    for i in range(300):
        pool.swap(100 + i, taken)  # frame 100 + i becomes a spare, still mapped in its row
        taken = 100 + i
        assert next(mapper.cold_spares()) == 0  # a caller that needs one finds frame 0, and stops
        assert len(mapper._cold) <= 2 * 8 + 64 + 1, (i, len(mapper._cold))
    cold = {f for f in pool.spare_frames if f not in mapper.where}
    assert cold == {0, *range(402, 408)} and set(mapper.cold_spares()) == cold
    mgr.close()


def _prefix_row_with_a_stale_tail(driver, spares=6, stale_guards=True):
    """A stream-mode manager with fa2-graphs' guards (guard_ahead 2: guards of 3 slots) and a row
    whose last user held blocks 0-4; the new request hits blocks 0-1 and gets that row, whose slots
    2-4 still map the last user's blocks 2-4 (deferred reclamation)."""
    mgr = make_manager(driver, rows=4, num_blocks=16, spare_blocks=spares, background="stream",
                       keep_guards=True, guard_ahead=2, stale_guards=stale_guards)
    mgr.GUARD_SPARE_SHARE = 2.0
    old = mgr.acquire_row()
    mgr.set_blocks(old, [0, 1, 2, 3, 4], fresh_from=0)
    mgr.publish()
    mgr.sync()
    mgr.release_row(old)
    row = mgr.acquire_row([0, 1], cached=2)
    assert row == old and mgr.stats()["prefix_rows_taken"] == 1
    return mgr, row


def test_a_prefix_rows_first_growth_slot_gets_a_spare_at_admission(driver):
    """NOTES #124: a row taken for its prefix hits maps its last user's next block in the new
    request's first growth slot. Admission puts a spare there in the step's own ops, so that the
    request's first new block moves into it (no driver call) instead of unmapping a frame that the
    admitting step, still in flight, over-read (a hazard wait)."""
    mgr, row = _prefix_row_with_a_stale_tail(driver)
    mgr.set_blocks(row, [0, 1], fresh_from=2)  # both hits: nothing to map
    assert mgr.mapper.pending_step_ops()  # the replacement is the step's, not the background's
    mgr.publish()
    mgr.sync()
    slots = mgr.mapper.slots[row]
    assert slots[2] in mgr.pool.spare_frames and slots[3] == mgr.pool.frame(3)  # only the first slot
    assert mgr.stats()["admit_stale_replaced"] == 1
    step = BlockingFence(driver)  # the admitting step, still running, over-read slots 2-4
    mgr.record_reads(step, {row: 5 * mgr.layout.block_size})
    before = mgr.stats()
    mgr.set_blocks(row, [9], start=2, fresh_from=0)  # the request's first new block
    assert mgr.stats()["swaps"] == before["swaps"] + 1 and mgr.stats()["hazard_waits"] == 0
    mgr.publish()
    mgr.sync()  # (nothing waits for the step)
    step.release()
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_a_prefix_rows_first_growth_slot_keeps_its_frame_without_a_spare(driver):
    """No spare mapped nowhere: the stale frame stays (the growth will unmap it, as before)."""
    mgr, row = _prefix_row_with_a_stale_tail(driver, spares=0)
    assert not list(mgr.mapper.cold_spares())
    mgr.set_blocks(row, [0, 1], fresh_from=2)
    mgr.publish()
    mgr.sync()
    assert mgr.mapper.slots[row][2] == mgr.pool.frame(2) and mgr.stats()["admit_stale_replaced"] == 0
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_guard_extension_replaces_stale_frames_no_step_in_flight_reads(driver):
    """NOTES #124: the rest of a prefix row's stale tail inside the request's guard counts as
    readable, so the guard looked extended already and the row's growth into those slots unmapped
    them while steps over-read them. warm()'s guard extension now maps spares there, in the
    background, once no step in flight reads them (until then the row waits for a later call)."""
    mgr, row = _prefix_row_with_a_stale_tail(driver)
    bs = mgr.layout.block_size
    mgr.set_blocks(row, [0, 1], fresh_from=2)
    mgr.ensure_readable(row, 5 * bs)  # the admitting step's guard: slots 2-4, 3-4 still stale
    mgr.publish()
    mgr.sync()
    step = BlockingFence(driver)
    mgr.record_reads(step, {row: 5 * bs})
    mgr._extend_guards()
    slots = mgr.mapper.slots[row]
    assert slots[3:5] == [mgr.pool.frame(3), mgr.pool.frame(4)] and row in mgr._ahead_rows  # read: later
    assert mgr.stats()["warm_stale_guards"] == 0
    step.release()
    mgr._extend_guards()
    mgr.sync()
    assert all(slots[s] in mgr.pool.spare_frames for s in (2, 3, 4)) and row not in mgr._ahead_rows
    assert mgr.stats()["warm_stale_guards"] == 1 and mgr.stats()["hazard_waits"] == 0
    for s, b in ((2, 9), (3, 10), (4, 11)):  # the request grows through its guard: moves, no unmap
        mgr.set_blocks(row, [b], start=s, fresh_from=0)
    assert mgr.stats()["hazard_waits"] == 0 and mgr.stats()["swaps"] >= 3
    mgr.publish()
    mgr.sync()
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_stale_guards_off_leaves_a_prefix_rows_stale_tail_as_it_was(driver):
    """VATTN_STALE_GUARDS=0 (the behaviour before NOTES #126): neither admission nor guard
    extension touches the stale frames, and the growth into one waits for the step over-reading it."""
    mgr, row = _prefix_row_with_a_stale_tail(driver, stale_guards=False)
    bs = mgr.layout.block_size
    mgr.set_blocks(row, [0, 1], fresh_from=2)
    mgr.ensure_readable(row, 5 * bs)
    mgr.publish()
    mgr.sync()
    mgr._extend_guards()
    mgr.sync()
    assert mgr.mapper.slots[row][2:5] == [mgr.pool.frame(b) for b in (2, 3, 4)]
    assert mgr.stats()["admit_stale_replaced"] == 0 and mgr.stats()["warm_stale_guards"] == 0
    step = BlockingFence(driver)
    mgr.record_reads(step, {row: 5 * bs})
    mgr.set_blocks(row, [9], start=2, fresh_from=0)
    assert mgr.stats()["hazard_waits"] == 1
    mgr.publish()
    step.release()
    mgr.sync()
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_clipped_guards_reach_the_longest_row_with_spares_where_whole_ones_are_over_their_share(driver):
    """warm(clip_guards=True) (NOTES #135): after a long decode step, whose FA3 view ends at the longest
    row, the next steps read each running row only up to there. Whole guards over GUARD_SPARE_SHARE are
    not extended, but guards up to one past the longest row's blocks fit: spares, in the background, so
    the step maps none on its path (guards_ready) and a row's growth moves into a spare (no driver call,
    no unmap that waits for a step in flight: the zero page there did, 63 times at 8192/256 on an
    H200). The dummy row (reserve_zero_row) takes none."""
    mgr = make_manager(driver, rows=8, max_tokens=256, num_blocks=40, spare_blocks=8, background="stream",
                       keep_guards=True, guard_ahead=2)
    mgr.pad_reserve = 0
    mgr.GUARD_SPARE_SHARE = 1.0  # (8 spares)
    bs = mgr.layout.block_size
    zero = mgr.reserve_zero_row()
    rows = [mgr.acquire_row() for _ in range(3)]
    for r, blocks in zip(rows, ([0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13])):
        mgr.set_blocks(r, blocks, fresh_from=len(blocks))  # (prefilled: their content counts)
    mgr.publish()
    mgr.sync()
    z0 = mgr.stats()["zero_maps"]  # (the dummy row's)
    # whole guards: 3 rows (and the dummy) x 3 slots > 8 spares; clipped to slot 6 (5 blocks + 1): 2 + 1 + 1 fit
    a, b, c = rows
    mgr.warm(clip_guards=False)
    s = mgr.stats()
    assert s["warm_guards_over_budget"] == 1 and s["warm_guards_clipped"] == 0 and s["guard_ahead_maps"] == 0
    assert not mgr.guards_ready(rows, [6 * bs] * 3)
    mgr.reclaim_spares()  # (warm() put the spares in free rows for new requests: give them back)
    mgr.warm(clip_guards=True)
    mgr.sync()
    s = mgr.stats()
    assert s["warm_guards_clipped"] == 1 and s["guard_ahead_maps"] == 4 and s["zero_maps"] == z0
    spare, slots = mgr.pool.spare_frames, mgr.mapper.slots
    assert [mgr._guard_end[r] for r in rows] == [6, 6, 6]
    assert all(slots[r][k] in spare for r in rows for k in range(mgr._held_end[r], 6))
    assert all(slots[r][6] is None for r in rows)  # no further: the step reads no further
    assert all(f == ZERO for f in slots[zero])  # the dummy row keeps the zero page
    # the long decode step: every row read up to the longest's 6 slots, nothing to map on its path
    assert mgr.guards_ready(rows, [6 * bs] * 3)
    calls = _driver_calls(driver)
    assert sum(mgr.ensure_readable(r, 6 * bs) for r in rows) == 0
    mgr.set_blocks(a, [14], start=4, fresh_from=0)  # a's growth moves into the spare at slot 4
    mgr.publish()
    mgr.sync()
    assert _driver_calls(driver) == calls and mgr.stats()["hazard_waits"] == 0
    # the longest row grows into its guard slot (5): the cap moves to 7 (2 + 1 + 2 slots past the blocks
    # fit), each guard follows it, with the frames the two growths gave up and cold spares
    mgr.set_blocks(b, [15], start=5, fresh_from=0)
    mgr.publish()
    mgr.warm(clip_guards=True)
    mgr.sync()
    assert [mgr._guard_end[r] for r in rows] == [7, 7, 7]
    assert all(slots[r][k] in spare for r in rows for k in range(mgr._held_end[r], 7))
    assert mgr.stats()["zero_maps"] == z0
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


def test_clipped_guards_take_spares_from_the_free_rows_handed_out_last(driver):
    """Offline, warm rows hold nearly every spare (NOTES #132: 2,032 of 2,048), so clipped guards would
    find none and a long decode step would map the zero page on its path. warm(clip_guards=True) first
    unmaps (in the background) as many spares as the guards need from the free rows acquire_row() hands
    out last, deepest slot first; the rows handed out next keep theirs."""
    mgr = make_manager(driver, rows=8, max_tokens=256, num_blocks=40, spare_blocks=12, background="stream",
                       keep_guards=True, guard_ahead=2)
    mgr.pad_reserve = 0
    mgr.GUARD_SPARE_SHARE = 0.5  # (12 spares: 6 guard slots; whole guards, 3 rows x 3, are over it)
    bs = mgr.layout.block_size
    rows = [mgr.acquire_row() for _ in range(3)]
    for r, first in zip(rows, (0, 4, 8)):
        mgr.set_blocks(r, list(range(first, first + 4)), fresh_from=0)  # new requests: 4 fresh blocks each
    mgr.publish()
    mgr.warm()  # free rows warmed 4 deep with every spare: 3 rows of 4
    mgr.sync()
    spare, slots = mgr.pool.spare_frames, mgr.mapper.slots
    warm_rows = [r for r in mgr._free_rows if any(f in spare for f in slots[r])]
    assert len(warm_rows) == 3 and list(mgr.mapper.cold_spares()) == []
    assert not mgr.guards_ready(rows, [5 * bs] * 3)
    mgr.set_blocks(rows[0], [12], start=4, fresh_from=0)  # the longest row (5 blocks): the cap is slot 6
    mgr.publish()
    mgr.warm(clip_guards=True)
    mgr.sync()
    s = mgr.stats()
    # clipped guards: 1 + 2 + 2 slots; 5 spares freed from the last warm row (4) and the one before (1)
    assert s["warm_guards_clipped"] == 1 and s["warm_guard_spares_freed"] == 5 and s["guard_ahead_maps"] == 5
    assert all(slots[r][k] in spare for r in rows for k in range(mgr._held_end[r], 6))
    first, second, last = warm_rows
    assert all(slots[first][k] in spare for k in range(4))  # the next row a request gets keeps its spares
    assert all(f not in spare for f in slots[last][:4])
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []


@pytest.mark.parametrize("background", [False, "stream"])
def test_spare_guards_frees_spares_for_the_guard_slots_a_long_decode_step_maps(driver, background):
    """The first long decode step after the prefills finds its guards short (no warm() has clipped them
    yet) and the spares in warm rows: spare_guards() frees as many as the slots it will map, from the
    free rows handed out last, so ensure_readable maps spares there, not the zero page (whose unmap,
    when the row grows in, waits for the steps reading it; NOTES #135)."""
    mgr = make_manager(driver, rows=8, max_tokens=256, num_blocks=40, spare_blocks=12, background=background,
                       keep_guards=True, guard_ahead=2)
    mgr.pad_reserve = 0
    bs = mgr.layout.block_size
    rows = [mgr.acquire_row() for _ in range(3)]
    for r, first in zip(rows, (0, 4, 8)):
        mgr.set_blocks(r, list(range(first, first + 4)), fresh_from=0)
    if mgr.stream_mode:
        mgr.publish()
    mgr.warm()
    mgr.sync()
    assert list(mgr.mapper.cold_spares()) == []  # all 12 in warm rows
    zero = mgr.stats()["zero_maps"]
    extents = [6 * bs, 6 * bs, 5 * bs]  # the step reads 2, 2 and 1 slots past the rows' blocks
    assert mgr.spare_guards(rows, extents) == 5
    assert mgr.spare_guards(rows, extents) == 0  # (as many cold now as the slots need)
    for r, n in zip(rows, extents):
        mgr.ensure_readable(r, n)
    if mgr.stream_mode:
        mgr.publish()
    mgr.sync()
    spare, slots = mgr.pool.spare_frames, mgr.mapper.slots
    assert mgr.stats()["zero_maps"] == zero
    assert all(slots[r][k] in spare for r, n in zip(rows, extents) for k in range(4, n // bs))
    for r, n in zip(rows, extents):  # readable, and a row's growth moves into its spare: no driver call
        driver.read(mgr.address(r, n - 1, 0, 0), 1)
    calls = _driver_calls(driver)
    mgr.set_blocks(rows[0], [12], start=4, fresh_from=0)
    if mgr.stream_mode:
        mgr.publish()
    mgr.sync()
    assert _driver_calls(driver) == calls
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []
