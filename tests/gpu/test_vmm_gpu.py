"""The real CUDA driver and the manager on a GPU: mapping, aliasing, remapping, views, no leaks."""

import pytest
import torch

from vllm_vattention.errors import OutOfAddressSpaceError
from vllm_vattention.memory import PAGE_SIZE
from vllm_vattention.memory.views import flat_tensor, layer_views


def test_granularity_is_2mib(driver):
    assert driver.granularity == PAGE_SIZE


def test_tensor_over_mapped_pages_reads_and_writes_across_page_boundaries(driver, cuda):
    n = 3
    va = driver.reserve(2 * n * PAGE_SIZE)
    handles = [driver.create(PAGE_SIZE) for _ in range(n)]
    try:
        for i, h in enumerate(handles):  # pages at [0, n) and the same pages again at [n, 2n)
            for base in (0, n):
                driver.map(va + (base + i) * PAGE_SIZE, PAGE_SIZE, h)
        driver.set_access(va, 2 * n * PAGE_SIZE)
        t = flat_tensor(va, 2 * n * PAGE_SIZE, torch.float32, cuda)
        first, second = t[: t.numel() // 2], t[t.numel() // 2:]
        data = torch.randn(first.numel(), device=cuda)
        first.copy_(data)
        torch.cuda.synchronize()
        assert torch.equal(second, data)  # aliasing: the same bytes at two addresses
        edge = PAGE_SIZE // 4  # floats per page
        assert torch.equal(first[edge - 7: edge + 9], data[edge - 7: edge + 9])
    finally:
        torch.cuda.synchronize()
        driver.unmap(va, 2 * n * PAGE_SIZE)
        for h in handles:
            driver.release(h)
        driver.free_reservation(va, 2 * n * PAGE_SIZE)


@pytest.mark.parametrize("background", [False, True, "stream"])
def test_manager_alias_and_remap_show_the_right_bytes(manager_factory, cuda, background):
    # True/"stream": libcuda called from the native thread
    m = manager_factory(background=background)
    views = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)
    bs = m.layout.block_size
    a, b = m.acquire_row(), m.acquire_row()
    m.set_blocks(a, [1, 2, 3])
    m.set_blocks(b, [1, 7])  # block 1 shared
    m.sync()
    k_a, k_b = views[5][0][a], views[5][0][b]
    data = torch.randn(3 * bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k_a[: 3 * bs].copy_(data)
    torch.cuda.synchronize()
    assert torch.equal(k_b[:bs], data[:bs])  # shared prefix block
    assert torch.equal(k_b[bs: 2 * bs], torch.zeros_like(data[:bs]))  # block 7: zeroed at creation
    m.set_blocks(b, [2], start=1)  # remap slot 1 of b to block 2
    m.sync()
    torch.cuda.synchronize()
    assert torch.equal(k_b[bs: 2 * bs], data[bs: 2 * bs])
    # Other layers of the same tokens live in the same pages (interleaved) and were untouched.
    assert torch.equal(views[4][1][a][: 3 * bs], torch.zeros_like(data))


def test_close_returns_device_memory(driver, manager_factory):
    torch.cuda.synchronize()
    free_before, _ = driver.mem_info()
    m = manager_factory(num_blocks=256)  # 512 MiB
    free_during, _ = driver.mem_info()
    assert free_before - free_during >= 256 * PAGE_SIZE
    r = m.acquire_row()
    m.set_blocks(r, list(range(100)))
    m.ensure_readable(r, 4096)
    m.close()
    free_after, _ = driver.mem_info()
    assert free_after >= free_before - 4 * PAGE_SIZE


def test_address_space_we_allow_can_be_reserved(driver):
    from vllm_vattention.selection import MAX_RESERVATION_BYTES
    va = driver.reserve(MAX_RESERVATION_BYTES)
    driver.free_reservation(va, MAX_RESERVATION_BYTES)


def test_impossible_reservation_is_a_typed_error(driver):
    try:
        driver.reserve(1 << 60)
    except OutOfAddressSpaceError as e:
        assert "lower --max-model-len or --max-num-seqs" in str(e)
    else:
        raise AssertionError("reserving 2^60 bytes should fail")


class Fence:  # a CUDA event, as the worker's EventFence
    def __init__(self, stream):
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def done(self):
        return self.event.query()

    def wait(self):
        self.event.synchronize()

    @property
    def native_handle(self):
        return self.event.cuda_event


def wait_for(m, fence, seq, what):
    """Bounded: a stream that never runs on becomes a failure saying whether the native thread signalled."""
    import time
    deadline = time.monotonic() + 20
    while not fence.done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: stream still blocked after 20 s; host flag {m.flag_value()}, "
                                 f"waiting for {seq} ({'signalled: the GPU does not see it' if m.flag_value() >= seq else 'the native thread has not signalled: its driver calls block while the stream waits'})")
        time.sleep(0.001)


def stalled_stream(m, driver, k, bs, first):
    """A stream that waits for `first`, writes 1.0 into slot 0 of row view `k`, stays busy, then waits
    for `first + 1` and writes 2.0 into slot 1. Returns (stream, fence, sum of slots 0-1)."""
    stream = torch.cuda.Stream()
    # Allocate on `stream` once before any wait: torch's caching allocator then reuses these blocks.
    # A cudaMalloc made by this (the only) thread while the stream is blocked on a flag that this
    # thread has yet to publish can block for good (the driver may wait for the stream). In the
    # engine the flag is signalled by the native thread, not by the thread that allocates.
    # (Not through `k`: its slots are mapped by the native thread, slot 1 not at all yet.)
    with torch.cuda.stream(stream):
        torch.zeros_like(k[: 2 * bs]).float().sum().clone()
    stream.synchronize()
    with torch.cuda.stream(stream):
        driver.stream_wait(stream.cuda_stream, m.flag_device_address, first)
        k[:bs].fill_(1.0)  # slot 0
        torch.cuda._sleep(50_000_000)  # keep the stream busy (~25-50 ms)
        driver.stream_wait(stream.cuda_stream, m.flag_device_address, first + 1)
        k[bs: 2 * bs].fill_(2.0)  # slot 1: its block is mapped only after this is enqueued
        out = k[: 2 * bs].float().sum().clone()
    return stream, Fence(stream), out


def test_stream_mode_gpu_waits_for_mappings_made_after_its_kernels_were_enqueued(manager_factory, driver, cuda):
    """VATTN_BACKGROUND_MAP=stream: a kernel enqueued behind cuStreamWaitValue32 writes into a slot
    that is only mapped (by the native thread) 200 ms later, while the stream is busy; without the
    wait it would touch unmapped memory (illegal address). It must see the mapping and write the bytes."""
    import time

    m = manager_factory(background="stream")
    views = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)
    bs = m.layout.block_size
    row = m.acquire_row()
    m.set_blocks(row, [3])
    first = m.publish()
    k = views[7][0][row]
    stream, fence, out = stalled_stream(m, driver, k, bs, first)
    time.sleep(0.2)
    assert not fence.done()  # the GPU is waiting for the flag
    m.set_blocks(row, [9], start=1)
    assert m.publish() == first + 1
    wait_for(m, fence, first + 1, "after publish()")
    assert out.item() == bs * 8 * 128 * (1.0 + 2.0)
    # and the hazard path: remap slot 0 while a step that reads it is in flight
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        busy = Fence(stream)
    m.record_reads(busy, {row: 2 * bs})
    m.set_blocks(row, [5], start=0)  # the native thread waits for `busy` before unmapping
    seq = m.publish()
    m.sync()
    assert busy.done() and m.flag_value() == seq and m.stats()["hazard_waits"] == 1
    torch.cuda.synchronize()
    assert torch.count_nonzero(k[:bs]).item() == 0  # block 5 is fresh


def test_value_fence_gpu_writes_the_steps_number_after_its_work_and_the_native_thread_waits_for_it(
        manager_factory, driver, cuda):
    """VATTN_FENCE=value on libcuda: cuStreamWriteValue32 stores the step's number into the host
    word only once the stream's earlier work is done (a ~25-50 ms sleep kernel here), and the
    native thread's WAIT_VALUE holds the unmap of a slot that step reads until then; the slot is
    remapped after it, and no cuEventSynchronize ran."""
    import time

    m = manager_factory(background="stream", value_fences=True)
    views = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)
    bs = m.layout.block_size
    row = m.acquire_row()
    m.set_blocks(row, [3])
    m.sync()
    k = views[4][0][row]
    k[:bs].fill_(1.0)
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(50_000_000)  # the step still running
    fence = m.step_fence(stream.cuda_stream)
    assert not fence.done()  # the sleep kernel is still running
    m.record_reads(fence, {row: bs})
    m.set_blocks(row, [5], start=0)  # slot 0 changes: the native thread waits for the word
    t0 = time.perf_counter()
    seq = m.publish()
    m.sync()
    waited = time.perf_counter() - t0
    assert fence.done() and m.flag_value() == seq and m.stats()["hazard_waits"] == 1
    assert m.stats()["native_event_waits"] == 1 and m.stats()["native_event_wait_seconds"] > 0
    torch.cuda.synchronize()
    assert torch.count_nonzero(k[:bs]).item() == 0  # block 5 is fresh: the unmap ran after the step
    assert waited < 5, f"the native thread waited {waited:.1f} s for a ~50 ms step"


def test_stream_mode_gpu_replaces_a_guard_page_while_the_stream_waits(manager_factory, driver, cuda):
    """The engine's common stream-mode case: slot 1 holds the shared zero page (the guard behind a
    sequence end) when the step that grows into it is enqueued; the native thread unmaps the zero
    page and maps the real block while the stream waits. cuMemUnmap must not wait for that stream
    (it would deadlock), and the write must land in the new block, never in the shared zero page."""
    import time

    m = manager_factory(background="stream")
    views = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)
    bs = m.layout.block_size
    row, other = m.acquire_row(), m.acquire_row()
    m.set_blocks(row, [3])
    m.ensure_readable(row, 2 * bs)  # slot 1: the zero page
    m.ensure_readable(other, bs)  # a second reader of the zero page
    first = m.publish()
    k = views[7][0][row]
    stream, fence, out = stalled_stream(m, driver, k, bs, first)
    time.sleep(0.2)
    assert not fence.done()  # the GPU is waiting for the flag
    m.set_blocks(row, [9], start=1)  # unmap the zero page, map block 9, while the stream waits
    assert m.publish() == first + 1
    wait_for(m, fence, first + 1, "after the guard's remap was published")
    assert out.item() == bs * 8 * 128 * (1.0 + 2.0)
    torch.cuda.synchronize()
    assert torch.all(k[bs: 2 * bs] == 2.0)  # block 9 holds the write
    assert torch.count_nonzero(views[7][0][other][:bs]).item() == 0  # the zero page is still zero
    assert m.stats()["zero_maps"] >= 2


def stream_spare_manager(manager_factory, driver, cuda, layer: int, kv: int, row_drains: bool = False):
    """A stream-mode manager with 8 spare frames, one layer's K or V rows as a tensor, and step():
    publish the mappings planned so far and make the current stream wait for them. row_drains
    (VATTN_ROW_DRAIN, NOTES #143): DRAIN_ROW, with background ops held until a drain asks for them,
    so that a step whose row was not drained reads memory not mapped yet."""
    m = manager_factory(background="stream", spare_blocks=8, row_drains=row_drains)
    if row_drains:
        m.mapper.executor.hold_background(True)
    rows = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)[layer][kv]
    stream = torch.cuda.current_stream()

    def step():
        driver.stream_wait(stream.cuda_stream, m.flag_device_address, m.publish())
    return m, rows, step


@pytest.mark.parametrize("row_drains", [False, True], ids=["drain", "row-drain-held"])
def test_stream_mode_spare_frames_on_libcuda(manager_factory, driver, cuda, row_drains):
    """VATTN_SPARE_BLOCKS: rows warmed by the native thread in the background; a new request's fresh
    blocks move into the warm slots (no driver call), its prefix hit keeps its own frame, and a later
    row that shares a moved block reads what was written through the first."""
    m, k, step = stream_spare_manager(manager_factory, driver, cuda, layer=5, kv=0, row_drains=row_drains)
    bs = m.layout.block_size

    a = m.acquire_row()
    m.set_blocks(a, [1, 2, 3], fresh_from=0)
    step()
    data = torch.randn(3 * bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k[a][: 3 * bs].copy_(data)
    m.release_row(a)  # blocks 1-3 stay cached
    assert m.warm() == 8  # the next free rows, 3 slots deep, until the 8 spares run out
    b = m.acquire_row()
    m.set_blocks(b, [1, 10, 11], fresh_from=1)  # block 1: a prefix hit; 10 and 11 fresh
    step()
    new = torch.randn(2 * bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k[b][bs: 3 * bs].copy_(new)
    c = m.acquire_row()
    m.set_blocks(c, [10], fresh_from=1)  # shares block 10, wherever it lives now
    step()
    torch.cuda.synchronize()
    assert m.stats()["swaps"] == 2 and m.pool.frame(10) >= 160
    assert torch.equal(k[b][:bs], data[:bs])
    assert torch.equal(k[b][bs: 3 * bs], new)
    assert torch.equal(k[c][:bs], new[:bs])


@pytest.mark.parametrize("row_drains", [False, True], ids=["drain", "row-drain-held"])
def test_stream_mode_lent_blocks_on_libcuda(manager_factory, driver, cuda, row_drains):
    """VATTN_LEND_BLOCKS: the frames of never-used blocks warm rows beside the spares; lent blocks
    handed out move into the warm slots (no driver call), and a later row that hits them reads what
    was written through the rows that computed them."""
    m, k, step = stream_spare_manager(manager_factory, driver, cuda, layer=7, kv=1, row_drains=row_drains)
    bs = m.layout.block_size
    a = m.acquire_row()
    m.set_blocks(a, [1, 2, 3, 4], fresh_from=0)  # teaches the warm depth (4); ids up to 4 handed out
    step()
    m.release_row(a)
    assert m.lend_unused(8) == 8  # blocks 159-152 (the manager's 160 blocks)
    assert m.warm() == 16  # 8 spares + 8 lent frames: the next four rows, 4 slots deep
    b, c = m.acquire_row(), m.acquire_row()
    m.set_blocks(b, [159, 158, 157, 156], fresh_from=0)  # lent, into warm slots
    m.set_blocks(c, [155, 5, 154, 153], fresh_from=0)  # lent and a plain fresh block
    step()
    data_b = torch.randn(4 * bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    data_c = torch.randn(4 * bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k[b][: 4 * bs].copy_(data_b)
    k[c][: 4 * bs].copy_(data_c)
    d = m.acquire_row()
    m.set_blocks(d, [158, 5], fresh_from=2)  # prefix hits on a lent block and a plain one
    step()
    torch.cuda.synchronize()
    s = m.stats()
    assert s["swaps"] == 8 and s["lent_taken"] == 7 and s["lent_blocks"] == 1
    assert torch.equal(k[d][:bs], data_b[bs: 2 * bs])
    assert torch.equal(k[d][bs: 2 * bs], data_c[bs: 2 * bs])


def test_stream_mode_growth_slots_on_libcuda(manager_factory, driver, cuda):
    """VATTN_GROWTH_AHEAD: the native thread maps a spare, in the background, into the slot past a
    running request's blocks while a step reads the row; the request's next block moves into it
    (no driver call), what was written before stays, and the next growth slot follows."""
    m = manager_factory(background="stream", spare_blocks=8, growth_ahead=True)
    k = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)[9][0]
    stream = torch.cuda.current_stream()

    def step():
        driver.stream_wait(stream.cuda_stream, m.flag_device_address, m.publish())
    bs = m.layout.block_size
    a = m.acquire_row()
    m.set_blocks(a, [1, 2], fresh_from=0)
    step()
    data = torch.randn(2 * bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k[a][: 2 * bs].copy_(data)
    total = k[a][: 2 * bs].float().sum()  # a step that reads the row while the growth slot is mapped
    m.warm()
    assert m.stats()["growth_maps"] == 1 and m.mapper.slots[a][2] in m.pool.spare_frames
    calls = m.stats()["block_maps"]
    m.set_blocks(a, [7], start=2, fresh_from=0)  # the request crosses into its third block
    step()
    more = torch.randn(bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k[a][2 * bs: 3 * bs].copy_(more)
    m.warm()
    step()
    torch.cuda.synchronize()
    s = m.stats()
    assert s["block_maps"] == calls and s["swaps"] >= 1 and s["growth_maps"] == 2
    assert m.mapper.slots[a][2] == m.pool.frame(7) and m.mapper.slots[a][3] in m.pool.spare_frames
    assert torch.allclose(total, data.float().sum())
    assert torch.equal(k[a][: 2 * bs], data) and torch.equal(k[a][2 * bs: 3 * bs], more)
    b = m.acquire_row()
    m.set_blocks(b, [1, 2, 7], fresh_from=3)  # prefix hits on all three: the same KV through another row
    step()
    torch.cuda.synchronize()
    assert torch.equal(k[b][: 3 * bs], k[a][: 3 * bs])


def test_stream_mode_spare_frames_same_step_hit_on_libcuda(manager_factory, driver, cuda):
    """A block hit in the step it is fresh for a running request (vLLM caches it when it schedules
    the tokens that fill it; the runner sets up the new request first): the block keeps its frame,
    and what the running request writes through its row, the hit reads through its own
    (NOTES #28; the CPU regression test is tests/test_spare_frames.py)."""
    m, k, step = stream_spare_manager(manager_factory, driver, cuda, layer=3, kv=1)
    bs = m.layout.block_size

    teach = m.acquire_row()  # teaches the warm depth (4 fresh blocks), then leaves
    m.set_blocks(teach, [12, 13, 14, 15], fresh_from=0)
    step()
    m.release_row(teach)
    m.warm()
    running = m.acquire_row()  # a warm row
    m.set_blocks(running, [0, 1, 2], fresh_from=0)
    step()
    first = torch.randn(3 * bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k[running][: 3 * bs].copy_(first)
    swaps = m.stats()["swaps"]
    hit = m.acquire_row()
    m.set_blocks(hit, [0, 1, 2, 3], fresh_from=4)  # the new request first...
    m.set_blocks(running, [3], start=3, fresh_from=0)  # ...then the running one's fresh block 3
    step()
    fourth = torch.randn(bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    k[running][3 * bs: 4 * bs].copy_(fourth)
    torch.cuda.synchronize()
    assert m.stats()["swaps"] == swaps  # block 3 kept its frame
    assert torch.equal(k[hit][: 3 * bs], first)
    assert torch.equal(k[hit][3 * bs: 4 * bs], fourth)


def test_mapbench_under_load_runs_each_gpu_load_for_its_time_and_frees_what_it_used(driver, cuda):
    """mapbench's under_load phases on libcuda (NOTES #140): the spin kernel and the GEMMs take about
    the time asked, the stream blocked at the host flag is released by its timer (no hang), every call
    kind is timed in every phase, the native thread's version runs the same loads and another thread's
    launches, and the pages and flag are given back."""
    from vllm_vattention.bench.mapbench import gpu_loads, host_launches, native_under_load, under_load
    # cuBLAS's first GEMM loads its kernels and workspace into the context (~190 MiB on an H200) for good:
    # do it before the baseline so that the check below sees only what the loads and pages hold
    a = torch.ones(256, 256, device=cuda, dtype=torch.bfloat16)
    (a @ a).sum().item()
    del a
    torch.cuda.empty_cache()
    free_before = driver.mem_info()[0]
    loads, free_flag = gpu_loads(driver, ms=20.0)
    try:
        rows = under_load(driver, loads, pages=8, rounds=2)
        native = native_under_load(driver, {**loads, "launches": host_launches}, pages=8, rounds=2)
    finally:
        free_flag()
    assert [r["phase"] for r in native] == list(loads) + ["launches"]
    assert all(len(r["rounds_slowest_ms"]) == 2 and r["set_access_us"] > 0 for r in native)
    torch.cuda.synchronize()
    assert len(rows) == 4 * 3 and all(r["calls"] == 2 * 8 for r in rows)
    by_phase = {r["phase"]: r["load_gpu_ms"] for r in rows}
    assert by_phase.pop("idle") is None
    spin, flag, gemms = by_phase.values()
    assert 15.0 < spin < 40.0 and 15.0 < gemms < 60.0
    assert flag >= 15.0  # the GPU waited at the flag until the timer set it
    del loads
    torch.cuda.empty_cache()  # the GEMMs' operands and outputs, cached by torch
    assert abs(driver.mem_info()[0] - free_before) < 16 << 20


def test_mapbench_first_launch_times_each_rounds_call_beside_the_native_threads_batch(driver, cuda):
    """mapbench's first_launch phases on libcuda (NOTES #146): in another thread, a spin kernel then a
    launch, one per round, each timed on the host while the native thread runs its batch. The
    control's launch (a kernel already loaded) is asynchronous, so it returns long before its spin
    ends; the first launches run (a cast and cummax over a dtype each round); nothing is left
    mapped."""
    from vllm_vattention.bench.mapbench import first_launch_loads, native_under_load

    loads = first_launch_loads(ms=20.0, rounds=2)
    control, first = native_under_load(driver, loads, pages=8, rounds=2)
    torch.cuda.synchronize()
    assert [control["phase"], first["phase"]] == list(loads)
    assert "loaded kernel" in control["phase"] and "first launch" in first["phase"]
    assert all(len(r["load_ms"]) == 2 and len(r["rounds_slowest_ms"]) == 2 and r["set_access_us"] > 0
               for r in (control, first))
    assert all(ms < 15.0 for ms in control["load_ms"])  # a launch does not wait for the kernel before it
    assert all(ms > 0 for ms in first["load_ms"])


def test_mapbench_host_ops_and_at_scale_run_on_libcuda_and_keep_nothing(driver, cuda):
    """mapbench's host_ops loads (NOTES #141: another thread allocating and freeing device and pinned
    memory, waiting for a kernel, copying to the host, replaying a CUDA graph, pinning and unpinning
    host memory) each run beside the native thread's batches without error, and at_scale maps its
    pages first, runs its reading kernels over them, and gives them back. A first pass loads the kernels and graph machinery into
    the context (which keeps them); the second must keep nothing more."""
    from vllm_vattention.bench.mapbench import at_scale, host_loads, native_under_load, reading_loads

    def both():
        loads = host_loads(driver, ms=2.0)
        rows = native_under_load(driver, loads, pages=8, rounds=2)
        scale = at_scale(driver, mapped=(0, 512), pages=8, rounds=2, loads_for=reading_loads(ms=2.0))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return loads, rows, scale

    both()
    free_before = driver.mem_info()[0]
    loads, rows, scale = both()
    assert abs(driver.mem_info()[0] - free_before) < 16 << 20
    assert [r["phase"] for r in rows] == list(loads) and len(rows) == 8
    assert all(len(r["rounds_slowest_ms"]) == 2 and r["set_access_us"] > 0 and r["map_us"] > 0 for r in rows)
    assert all(0 < r["cpu_of_running"] <= 1.05 for r in rows)
    assert [(r["mapped_pages"], r["phase"].split(", ", 1)[1]) for r in scale] == [
        (0, "idle"), (512, "idle"), (512, "streaming reads of the mapped pages"), (512, "4 KiB of every mapped page, shuffled")]
    assert scale[1]["setup_s"] > 0
