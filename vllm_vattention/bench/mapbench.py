"""Mapper micro-benchmark on the GPU: driver cost per page, map vs remap per block and per token,
and how long the launching thread is blocked with foreground mapping vs the native mapping thread.

    vattn-mapbench --out benchmarks/results/   (writes <date>-<gpu>-mapbench.json and .md)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ..memory import PAGE_SIZE, CudaDriver, KVGeometry, KVMemoryManager, make_layout
from .env import environment, header, results_stem, write_markdown

SECTIONS = ("driver_per_page", "manager", "step_loop", "contention", "parallel", "alloc_sizes", "under_load", "host_ops",
            "at_scale", "first_launch")
LLAMA3_8B = KVGeometry(num_layers=32, num_kv_heads=8, head_size=128, dtype_bytes=2)


def _per_call_us(fn, items) -> float:
    t = time.perf_counter()
    for x in items:
        fn(x)
    return (time.perf_counter() - t) / len(items) * 1e6


def driver_costs(d: CudaDriver, pages: int) -> dict:
    va = d.reserve(pages * PAGE_SIZE)
    addrs = [va + i * PAGE_SIZE for i in range(pages)]
    hs: list[int] = []
    out = {"create_us": _per_call_us(lambda _: hs.append(d.create(PAGE_SIZE)), range(pages))}
    pairs = list(zip(addrs, hs))
    out["map_us"] = _per_call_us(lambda p: d.map(p[0], PAGE_SIZE, p[1]), pairs)
    out["set_access_us"] = _per_call_us(lambda a: d.set_access(a, PAGE_SIZE), addrs)
    out["unmap_us"] = _per_call_us(lambda a: d.unmap(a, PAGE_SIZE), addrs)
    for a, h in pairs:  # one call over the whole range, for comparison
        d.map(a, PAGE_SIZE, h)
    t = time.perf_counter()
    d.set_access(va, pages * PAGE_SIZE)
    out["set_access_range_us_per_page"] = (time.perf_counter() - t) / pages * 1e6
    t = time.perf_counter()  # one call over every page's own mapping: is unmap, too, charged per mapping?
    d.unmap(va, pages * PAGE_SIZE)
    out["unmap_range_us_per_page"] = (time.perf_counter() - t) / pages * 1e6
    out["release_us"] = _per_call_us(d.release, hs)
    d.free_reservation(va, pages * PAGE_SIZE)
    return out


def _take_pages(d, pages: int) -> tuple[int, list[int]]:
    """A reservation of `pages` 2 MiB pages and as many 2 MiB allocations, nothing mapped: (va, handles)."""
    return d.reserve(pages * PAGE_SIZE), [d.create(PAGE_SIZE) for _ in range(pages)]


def _give_back_pages(d, va: int, hs: list[int]) -> None:
    """_take_pages' allocations and reservation given back (every page unmapped already)."""
    for h in hs:
        d.release(h)
    d.free_reservation(va, len(hs) * PAGE_SIZE)


def parallel_driver(d, pages: int = 1024, threads: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """Do the driver's VMM calls scale over threads? A step that admits requests maps up to one
    step's blocks (1024 at 1024-in/128-out) while the GPU waits (NOTES #40), one mapping thread,
    ~75 us a page. For each thread count: wall time per page of cuMemSetAccess alone (pages mapped
    beforehand) and of cuMemMap + cuMemSetAccess, each thread one page per call on its own slice
    (ctypes releases the GIL around driver calls, so Python threads stand in for native ones)."""
    import threading
    va, hs = _take_pages(d, pages)
    pairs = [(va + i * PAGE_SIZE, h) for i, h in enumerate(hs)]

    def timed(n: int, work) -> float:
        """Seconds for n threads to run work(slice) over their slices of `pairs`, started together."""
        slices = [pairs[k::n] for k in range(n)]
        ready = threading.Barrier(n + 1)
        errors: list[BaseException] = []

        def run(sl):
            ready.wait()
            try:
                work(sl)
            except BaseException as e:  # surfaced below, in the caller's thread
                errors.append(e)
        ts = [threading.Thread(target=run, args=(sl,)) for sl in slices]
        for t in ts:
            t.start()
        ready.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return dt

    def access(sl):
        for a, _ in sl:
            d.set_access(a, PAGE_SIZE)

    def map_and_access(sl):
        for a, h in sl:
            d.map(a, PAGE_SIZE, h)
            d.set_access(a, PAGE_SIZE)

    out = []
    try:
        for n in threads:
            for a, h in pairs:
                d.map(a, PAGE_SIZE, h)
            t_access = timed(n, access)
            d.unmap(va, pages * PAGE_SIZE)
            t_both = timed(n, map_and_access)
            d.unmap(va, pages * PAGE_SIZE)
            out.append({"threads": n, "set_access_us_per_page": t_access / pages * 1e6,
                        "map_and_access_us_per_page": t_both / pages * 1e6})
    finally:
        _give_back_pages(d, va, hs)
    base = out[0]
    for r in out:
        r["speedup_map_and_access"] = base["map_and_access_us_per_page"] / r["map_and_access_us_per_page"]
    return out


def alloc_size_costs(d, total_bytes: int = 1 << 30, sizes_mib: tuple[int, ...] = (2, 4, 8, 16, 32)) -> list[dict]:
    """Does one allocation of several 2 MiB pages map and get its access set for less per byte than
    as many 2 MiB allocations? (`total_bytes` in allocations of each size: cuMemMap and cuMemSetAccess
    per allocation, then cuMemUnmap; us per 2 MiB of each call.) If so, a vAttention block of several
    pages in one allocation (a larger --block-size) cuts the native thread's driver time, which slows
    GEMMs while it runs (NOTES #35, #49)."""
    out = []
    page = d.granularity
    for mib in sizes_mib:
        size = mib << 20
        if size % page or total_bytes % size:
            continue
        n = total_bytes // size
        va = d.reserve(total_bytes)
        hs = [d.create(size) for _ in range(n)]
        addrs = [va + i * size for i in range(n)]
        units = mib / 2  # 2 MiB pages per allocation
        map_us = _per_call_us(lambda p: d.map(p[0], size, p[1]), list(zip(addrs, hs)))
        access_us = _per_call_us(lambda a: d.set_access(a, size), addrs)
        unmap_us = _per_call_us(lambda a: d.unmap(a, size), addrs)
        for h in hs:
            d.release(h)
        d.free_reservation(va, total_bytes)
        out.append({"alloc_mib": mib, "allocations": n, "map_us_per_2mib": map_us / units,
                    "set_access_us_per_2mib": access_us / units, "unmap_us_per_2mib": unmap_us / units})
    return out


def manager_costs(d: CudaDriver, rows: int, blocks_per_row: int) -> dict:
    lay = make_layout("interleaved", LLAMA3_8B, PAGE_SIZE, rows=rows, min_row_tokens=blocks_per_row * 16)
    m = KVMemoryManager(d, lay, 2 * rows * blocks_per_row)
    try:
        rs = [m.acquire_row() for _ in range(rows)]
        t = time.perf_counter()
        for i, r in enumerate(rs):
            m.set_blocks(r, range(i * blocks_per_row, (i + 1) * blocks_per_row))
        fresh = time.perf_counter() - t
        off = rows * blocks_per_row
        t = time.perf_counter()
        for i, r in enumerate(rs):
            m.set_blocks(r, range(off + i * blocks_per_row, off + (i + 1) * blocks_per_row))
        remap = time.perf_counter() - t
        t = time.perf_counter()
        for i, r in enumerate(rs):  # unchanged: the deferred-reclamation fast path
            m.set_blocks(r, range(off + i * blocks_per_row, off + (i + 1) * blocks_per_row))
        same = time.perf_counter() - t
    finally:
        m.close()
    n = rows * blocks_per_row
    tokens = n * lay.block_size
    return {
        "blocks": n, "pages_per_block": lay.pages_per_block, "tokens_per_block": lay.block_size,
        "map_us_per_block": fresh / n * 1e6, "map_pages_per_s": n * lay.pages_per_block / fresh,
        "map_us_per_token": fresh / tokens * 1e6,
        "remap_us_per_block": remap / n * 1e6, "remap_us_per_token": remap / tokens * 1e6,
        "unchanged_us_per_block": same / n * 1e6,
    }


def step_loop(d: CudaDriver, background: bool, steps: int, batch: int, cpu_work_s: float) -> dict:
    """Decode-like steps: each step `batch` rows cross into a new block while the launching thread
    does `cpu_work_s` of other work (a stand-in for input preparation). Reports the time the
    launching thread spends in the mapper (blocked) per step."""
    lay = make_layout("interleaved", LLAMA3_8B, PAGE_SIZE, rows=batch, min_row_tokens=(steps + 1) * 16)
    m = KVMemoryManager(d, lay, batch * (steps + 1), background=background)
    try:
        rs = [m.acquire_row() for _ in range(batch)]
        blocked = []
        nxt = 0
        t_all = time.perf_counter()
        for s in range(steps):
            t = time.perf_counter()
            for r in rs:
                m.set_blocks(r, [nxt], start=s)
                nxt += 1
            spent = time.perf_counter() - t
            end = time.perf_counter() + cpu_work_s
            while time.perf_counter() < end:  # busy CPU work holding the GIL, like input preparation
                pass
            t = time.perf_counter()
            m.sync()
            blocked.append(spent + time.perf_counter() - t)
        total = time.perf_counter() - t_all
    finally:
        m.close()
    return {"background": background, "steps": steps, "blocks_per_step": batch,
            "blocked_ms_per_step_median": statistics.median(blocked) * 1e3,
            "blocked_ms_per_step_p90": sorted(blocked)[int(0.9 * len(blocked))] * 1e3,
            "cpu_work_ms_per_step": cpu_work_s * 1e3, "wall_ms_per_step": total / steps * 1e3}


def map_cycle_ops(va: int, handles: list[int], page: int) -> list:
    """Native-thread ops that map each handle at va + i * page, make it readable and writable, and
    unmap them all again (what warming a row and unmapping an alias cost the driver)."""
    from ..memory.executor import ACCESS_RW, MAP, UNMAP

    ops = []
    for i, h in enumerate(handles):
        ops += [(MAP, va + i * page, page, h), (ACCESS_RW, va + i * page, page, 0)]
    return ops + [(UNMAP, va + i * page, page, 0) for i in range(len(handles))]


def contention(d, pages: int = 256, rounds: int = 16, launches: int = 3000, gemms: int = 60) -> dict:
    """Does the native thread's mapping slow the engine thread's launches or the GPU's kernels?
    (Serving at 4 req/s measured TTFT +13% and TPOT +3% against stock with spare frames, whose warm
    maps run on the native thread while steps run: benchmarks/NOTES.md #30.) Each phase runs once
    with the native thread idle and once while it maps, sets access on and unmaps `pages` pages,
    `rounds` times. Phases: tiny kernel launches (CPU us per launch; the launch-bound part of a
    decode step), bf16 GEMMs (GPU ms per GEMM, timed by events; a stand-in for a step's kernels),
    and the engine thread's other per-step CUDA calls (CPU us each): a fence (new event, record,
    query), a satisfied cuStreamWaitValue32, a 1 KiB pinned host-to-device copy. Does the driver
    make them wait for the native thread's VMM calls (a lock they share)?"""
    from ..memory.native import NativeExecutor

    va, hs = _take_pages(d, pages)
    ex = NativeExecutor(*d.native_table())
    ops = map_cycle_ops(va, hs, PAGE_SIZE)
    x = torch.zeros(16, device="cuda")

    def per_call_us(call, n: int = 2000) -> float:
        """CPU microseconds per call(), from an idle GPU queue."""
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            call()
        dt = time.perf_counter() - t
        torch.cuda.synchronize()
        return dt / n * 1e6

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def gemm_ms() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(gemms):
            a @ a
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / gemms

    host_flag, dev_flag = d.host_flag()  # zero: a wait for 0 is satisfied at once
    pinned = torch.zeros(256, dtype=torch.int32).pin_memory()
    dst = torch.zeros(256, dtype=torch.int32, device="cuda")

    def fence():  # what a step's fence costs the engine thread: a new event, recorded, queried
        e = torch.cuda.Event()
        e.record()
        e.query()

    stream = torch.cuda.current_stream().cuda_stream
    phases = (("launch_us", lambda: per_call_us(lambda: x.add_(1.0), launches)), ("gemm_ms", gemm_ms),
              ("event_us", lambda: per_call_us(fence)),
              ("stream_wait_us", lambda: per_call_us(lambda: d.stream_wait(stream, dev_flag, 0))),
              ("h2d_copy_us", lambda: per_call_us(lambda: dst.copy_(pinned, non_blocking=True))))
    out: dict = {"pages": pages, "rounds": rounds}
    try:
        for _, fn in phases:  # warm-up
            fn()
        for phase, fn in phases:
            out[f"{phase}_idle"] = statistics.median(fn() for _ in range(3))
            ex.stats(reset=True)
            for _ in range(rounds):
                ex.run(ops)  # queued: the thread maps while this thread launches
            busy = [fn() for _ in range(3)]
            out[f"{phase}_mapping"] = statistics.median(busy)
            out[f"{phase}_native_driver_s"] = ex.stats()["native_driver_seconds"]
            ex.wait()
            out[f"{phase}_native_driver_s_total"] = ex.stats()["native_driver_seconds"]
    finally:
        ex.wait()
        ex.close()
        d.free_host_flag(host_flag)
        _give_back_pages(d, va, hs)
    return out


def under_load(d, loads: dict, pages: int = 64, rounds: int = 8, slow_ms: float = 1.0) -> list[dict]:
    """Do VMM calls wait for the GPU's work? In the engine a single cuMemSetAccess has taken 21-38 ms
    now and then, and the GPU waited at the mapping flag behind it (benchmarks/NOTES.md #139); a
    step's kernels run 20-40 ms. `loads` maps a phase name to None (GPU idle) or to a function that
    queues GPU work and returns a function that waits for it and returns the work's GPU ms. For each
    phase, `rounds` times: start the load, then map, set access on and unmap `pages` pages one call
    at a time, each call timed on the host, then wait for the load. Per phase and call kind: the
    median, p99 and slowest call in us, the slowest first call of a round (a call that waited for
    the GPU would be the first), and how many calls took longer than `slow_ms`."""
    va, hs = _take_pages(d, pages)
    addrs = [va + i * PAGE_SIZE for i in range(pages)]
    out = []
    try:
        for phase, load in loads.items():
            us: dict[str, list[float]] = {"map": [], "set_access": [], "unmap": []}
            first: dict[str, float] = {k: 0.0 for k in us}
            load_ms = []
            for _ in range(rounds):
                done = load() if load is not None else None
                for kind, calls in (("map", [lambda a=a, h=h: d.map(a, PAGE_SIZE, h) for a, h in zip(addrs, hs)]),
                                    ("set_access", [lambda a=a: d.set_access(a, PAGE_SIZE) for a in addrs]),
                                    ("unmap", [lambda a=a: d.unmap(a, PAGE_SIZE) for a in addrs])):
                    for i, call in enumerate(calls):
                        t = time.perf_counter()
                        call()
                        dt = (time.perf_counter() - t) * 1e6
                        us[kind].append(dt)
                        if i == 0:
                            first[kind] = max(first[kind], dt)
                if done is not None:
                    ms = done()
                    if ms is not None:
                        load_ms.append(ms)
            for kind, xs in us.items():
                xs.sort()
                out.append({"phase": phase, "call": kind, "calls": len(xs), "p50_us": xs[len(xs) // 2],
                            "p99_us": xs[min(len(xs) - 1, int(0.99 * len(xs)))], "max_us": xs[-1],
                            "first_call_max_us": first[kind], "over_slow_ms": sum(x > slow_ms * 1e3 for x in xs),
                            "load_gpu_ms": statistics.median(load_ms) if load_ms else None})
    finally:
        _give_back_pages(d, va, hs)
    return out


def native_under_load(d, loads: dict, pages: int = 64, rounds: int = 8, where: tuple | None = None) -> list[dict]:
    """under_load's question with the calls made by the native mapping thread, as in the engine, and
    timed there: no GIL in the measurement, so a load may be another Python thread (the engine
    thread's launches: does a thread making CUDA calls slow the native thread's VMM calls?). Each
    round is one batch of `pages` maps, set-accesses and unmaps (map_cycle_ops). Per phase: the
    mean us per call of each kind (the thread's own timing), each round's slowest call, in ms, with
    its kind, the share of the batches' running time the thread spent on a CPU (a slow call
    that spins in the driver, against one that sleeps), and what each round's load wait returned
    (`load_ms`: its GPU ms, or the host ms of once_in_a_thread's call; None if nothing). `where`:
    (va, handles) of the pages to use, unmapped, kept by the caller; default: `pages` pages of their own."""
    from ..memory.native import NativeExecutor

    if rounds > NativeExecutor.SLOWEST:
        raise ValueError(f"rounds={rounds}: the native thread keeps its {NativeExecutor.SLOWEST} slowest batches, "
                         f"so at most {NativeExecutor.SLOWEST} rounds")
    va, hs = where if where is not None else _take_pages(d, pages)
    ops = map_cycle_ops(va, hs, PAGE_SIZE)
    ex = NativeExecutor(*d.native_table())
    out = []
    try:
        for phase, load in loads.items():
            ex.stats(reset=True)
            waited = []
            for _ in range(rounds):
                done = load() if load is not None else None
                ex.run(ops)
                ex.wait()
                if done is not None:
                    waited.append(done())
            st = ex.stats(reset=True)
            n = len(hs) * rounds
            waited = [ms for ms in waited if ms is not None]
            slowest = sorted(st["native_slowest_batches"], key=lambda b: -b[3])
            running = sum(b[2] for b in slowest)
            out.append({"phase": phase, "calls": 3 * n,
                        "map_us": st["native_map_seconds"] / n * 1e6, "set_access_us": st["native_access_seconds"] / n * 1e6,
                        "unmap_us": st["native_unmap_seconds"] / n * 1e6,
                        "rounds_slowest_ms": [[b[3], b[4]] for b in slowest],
                        "cpu_of_running": sum(b[8] for b in slowest) / running if running > 0 else None,
                        "load_ms": waited or None})
    finally:
        ex.wait()
        ex.close()
        if where is None:
            _give_back_pages(d, va, hs)
    return out


def in_a_thread(body, setup=None, sync=None):
    """A load for native_under_load: another Python thread running `body()` back to back until the
    round ends (what the engine's threads do beside the native thread); `setup()`, if given, runs on
    this thread first and its result is passed to body. The load's wait stops and joins the thread,
    raises what body raised, then calls `sync` (default: synchronize the device), and returns None
    (no GPU ms)."""
    import threading

    def load():
        arg = setup() if setup is not None else None
        stop = threading.Event()
        errors: list[BaseException] = []

        def loop():
            try:
                while not stop.is_set():
                    body(arg) if setup is not None else body()
            except BaseException as e:  # noqa: BLE001 - raised by wait() on the caller's thread
                errors.append(e)
        t = threading.Thread(target=loop, daemon=True)
        t.start()

        def wait():
            stop.set()
            t.join()
            if errors:
                raise errors[0]
            (sync or torch.cuda.synchronize)()
        return wait
    return load


def once_in_a_thread(call, before=None, sync=None, lead_s: float = 0.002):
    """A load for native_under_load that makes one call per round in another thread, timed there:
    `before()` first if given (queue GPU work), then `call()`. load() returns once that thread is
    about to make the call, `lead_s` later, so the round's batch runs while the call is under way (a
    call that waits for the GPU keeps the batch beside it). The wait joins the thread, raises what it
    raised, calls `sync` (default: synchronize the device) and returns the call's host ms."""
    import threading

    def load():
        about = threading.Event()
        out: dict = {}

        def run():
            try:
                if before is not None:
                    before()
                about.set()
                t = time.perf_counter()
                call()
                out["ms"] = (time.perf_counter() - t) * 1e3
            except BaseException as e:  # noqa: BLE001 - raised by wait() on the caller's thread
                out["error"] = e
            finally:
                about.set()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        about.wait()
        time.sleep(lead_s)

        def wait() -> float:
            t.join()
            if "error" in out:
                raise out["error"]
            (sync or torch.cuda.synchronize)()
            return out["ms"]
        return wait
    return load


# dtypes for first_launch_loads' fresh kernels: each is one more instantiation of a kernel template that
# the process has not launched (cummax over it, and the cast to it)
FRESH_DTYPES = ("float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8")


def first_launch_loads(ms: float = 30.0, rounds: int = 8) -> dict:
    """native_under_load's loads for NOTES #145/#146's question: CUDA's lazy module loading (the
    default since 12.2) loads a kernel at its first launch, and in the engine that waited for the
    device (the lm_head GEMM of each new batch size returned only when the step's forward ended).
    Does a lazy load also hold up the native thread's VMM calls (the engine's 20-30 ms set_access
    calls that sleep in the driver)? Two phases, in another thread, one call per round: a spin
    kernel of `ms`, then a kernel already loaded (an add; the control); the same spin, then a
    kernel never launched before in this process (cummax over the next of FRESH_DTYPES, after a
    cast to it). The phases' load_ms is that call's host ms: about `ms` where the launch waited for
    the spin, well under 1 ms where it did not."""
    if rounds > len(FRESH_DTYPES):
        raise ValueError(f"rounds={rounds}: first_launch_loads has {len(FRESH_DTYPES)} fresh kernels, one per round")
    spin = _spin_cycles(ms)
    x = torch.rand(4096, device="cuda")
    torch.add(x, 1.0)  # the control's kernel: loaded before its phase
    torch.cuda.synchronize()
    fresh = iter(FRESH_DTYPES)

    def first_launch():
        torch.cummax(x.to(getattr(torch, next(fresh))), 0)
    queue_spin = lambda: torch.cuda._sleep(spin)  # noqa: E731
    return {f"another thread: a {ms:.0f} ms kernel, then a loaded kernel's launch": once_in_a_thread(
                lambda: torch.add(x, 1.0), before=queue_spin),
            f"another thread: a {ms:.0f} ms kernel, then a kernel's first launch (lazy module load)": once_in_a_thread(
                first_launch, before=queue_spin)}


def _tiny():
    return torch.zeros(16, device="cuda")


host_launches = in_a_thread(lambda x: x.add_(1.0), _tiny)  # tiny kernel launches (an eager or piecewise step)


def host_loads(d, ms: float = 5.0) -> dict:
    """native_under_load's loads of the engine process's other CUDA calls (NOTES #141: the engine's
    21-38 ms cuMemSetAccess calls wait neither for the GPU's work nor for another thread's
    launches): another thread, back to back, doing one of: torch's allocator taking and giving back
    256 MiB (cudaMalloc + cudaFree, which synchronizes the device); pinned host memory allocated and
    freed (cuMemHostAlloc / cuMemFreeHost, as vLLM's pinned buffers); a kernel of `ms` then a wait for
    it (the engine thread in sample_tokens); a 4-byte device-to-host copy after a tiny kernel
    (.item()); replays of a CUDA graph of 500 tiny kernels (a full-graph decode step); host memory
    of 4, 64 and 256 MiB pinned and unpinned (cudaHostRegister / cudaHostUnregister: on an H200 the
    64 and 256 MiB loads made the native thread's calls 0.5-4 ms each, the slowest 27-34 ms, asleep
    most of that time: NOTES #141)."""
    import numpy as np

    spin = _spin_cycles(ms)

    def alloc_free():
        torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        torch.cuda.empty_cache()

    def pinned():
        host, _ = d.host_flag()
        d.free_host_flag(host)

    def graph():
        x = _tiny()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x.add_(1.0)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(500):
                x.add_(1.0)
        return g

    return {"another thread: cudaMalloc + cudaFree of 256 MiB": in_a_thread(alloc_free),
            "another thread: pinned host alloc + free": in_a_thread(pinned),
            f"another thread: a {ms:.0f} ms kernel, then synchronize": in_a_thread(
                lambda: (torch.cuda._sleep(spin), torch.cuda.synchronize())),
            "another thread: .item() after a tiny kernel": in_a_thread(lambda x: x.add_(1.0).sum().item(), _tiny),
            "another thread: replaying a CUDA graph of 500 kernels": in_a_thread(lambda g: g.replay(), graph),
            **{f"another thread: cudaHostRegister + unregister of {mib} MiB": in_a_thread(
                _register_unregister, lambda mib=mib: np.ones(mib << 20, dtype=np.uint8)) for mib in (4, 64, 256)}}


def _register_unregister(buf) -> None:
    """Pin `buf` (a numpy array) for the GPU and unpin it: what torch's pin_memory() and vLLM's pinned
    buffers cost the driver, without keeping the memory."""
    rt = torch.cuda.cudart()
    ptr = buf.ctypes.data
    err = rt.cudaHostRegister(ptr, buf.nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {buf.nbytes} bytes returned {err}")
    err = rt.cudaHostUnregister(ptr)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostUnregister returned {err}")


def _event_timed(work, after=None):
    """A GPU load for under_load / native_under_load: go() queues `work` between two timing events and
    returns wait(), which waits for it, runs `after` if given, and returns its GPU ms."""
    def go():
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        work()
        t1.record()

        def wait() -> float:
            t1.synchronize()
            if after is not None:
                after()
            return t0.elapsed_time(t1)
        return wait
    return go


def _repeats_in(ms: float, work, sample: int = 1) -> int:
    """How many runs of `work` back to back take about `ms` of GPU time (at least 1), from `sample`
    runs timed by events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(sample):
        work()
    end.record()
    end.synchronize()
    return max(1, int(ms / max(start.elapsed_time(end) / sample, 1e-3)))


def _spin_cycles(ms: float) -> int:
    """torch.cuda._sleep's cycles for a kernel of about `ms` (its first call outside the calibration)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * ms / start.elapsed_time(end))


def at_scale(d, mapped: tuple[int, ...] = (0, 16384, 49152), pages: int = 64, rounds: int = 8,
             loads_for=None, release=None) -> list[dict]:
    """Do VMM calls get slower with many pages mapped, or while kernels read them? The engine maps
    tens of thousands of 2 MiB pages (its whole KV budget) in one reservation and its attention
    kernels read them while the native thread maps more; mapbench's other sections map at most a
    few thousand, and their GPU loads touch none. For each count in `mapped` (cut to what fits in
    90% of the memory free then, less 1 GiB for the loads' temporaries; `release()`, if given, runs
    first: torch's cached blocks are not free to the driver): one reservation of count + `pages`
    pages, the first `count` mapped and given access, then native_under_load's batches on the last
    `pages` (fresh pages in the same reservation, as the engine's), idle and under each load of
    `loads_for(va, count)` (a dict as gpu_loads'; None: idle only); then everything is given back. Per count and load: the
    native_under_load row, with the count and the seconds mapping it took."""
    out = []
    for n in mapped:
        if release is not None:
            release()
        n = max(0, min(n, int(0.9 * d.mem_info()[0] / PAGE_SIZE) - pages - (1 << 30) // PAGE_SIZE))
        va, hs = _take_pages(d, n + pages)
        t = time.perf_counter()
        try:
            for i in range(n):
                d.map(va + i * PAGE_SIZE, PAGE_SIZE, hs[i])
            if n:
                d.set_access(va, n * PAGE_SIZE)
            setup_s = time.perf_counter() - t
            loads = {"idle": None, **(loads_for(va, n) if loads_for is not None and n else {})}
            rows = native_under_load(d, loads, rounds=rounds, where=(va + n * PAGE_SIZE, hs[n:]))
            out += [{**row, "phase": f"{n} pages mapped, {row['phase']}", "mapped_pages": n, "setup_s": setup_s}
                    for row in rows]
            del loads  # the reading loads' views and temporaries, before the next count's free memory
        finally:
            for i in range(n):
                d.unmap(va + i * PAGE_SIZE, PAGE_SIZE)
            _give_back_pages(d, va, hs)
    return out


def reading_loads(ms: float = 30.0):
    """at_scale's loads on the GPU: kernels reading the `n` pages mapped at `va` while the native
    thread maps beside them, as the engine's attention reads its KV. Streaming: the maximum over the
    whole range (each page read once, in order; amax allocates nothing the size of the range),
    repeated for about `ms`. Scattered: 4 KiB of every page, pages in a shuffled order (a TLB miss
    per read), repeated for about `ms`."""
    from ..memory.views import flat_tensor

    def loads_for(va: int, n: int) -> dict:
        dev = torch.device("cuda", torch.cuda.current_device())
        flat = flat_tensor(va, n * PAGE_SIZE, torch.int16, dev)
        per_page = flat.view(n, PAGE_SIZE // 2)
        order = torch.randperm(n, device=dev)

        def timed_repeat(work):
            times = _repeats_in(ms, work)

            def repeated():
                for _ in range(times):
                    work()
            return _event_timed(repeated)

        return {"streaming reads of the mapped pages": timed_repeat(lambda: flat.amax()),
                "4 KiB of every mapped page, shuffled": timed_repeat(lambda: per_page[order, :2048].amax())}
    return loads_for


def gpu_loads(d, ms: float = 30.0):
    """under_load's phases on the GPU, and a function that frees what they use: idle; one spin kernel
    of `ms` (a step's kernels running); the stream blocked at a host flag that a timer sets `ms`
    after the start (a step queued behind the mapping flag, as in the engine; the timer also bounds
    the wait if the calls needed the GPU idle); 4096^2 bf16 GEMMs back to back for about `ms`
    (kernels that move memory). Each load's GPU ms is timed by events around it."""
    import ctypes
    import threading

    stream = torch.cuda.current_stream()
    cycles = _spin_cycles(ms)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    a @ a  # cuBLAS's first call sets itself up: not part of the calibration
    gemms = _repeats_in(ms, lambda: a @ a, sample=10)
    host, dev = d.host_flag()
    word = ctypes.c_uint32.from_address(host)
    timers: list = []

    def blocked_at_flag():
        v = word.value + 1
        timer = threading.Timer(ms / 1e3, lambda: setattr(word, "value", v))
        d.stream_wait(stream.cuda_stream, dev, v)
        torch.cuda._sleep(1000)
        timer.start()
        timers.append(timer)

    loads = {"idle": None,
             f"a spin kernel of {ms:.0f} ms": _event_timed(lambda: torch.cuda._sleep(cycles)),
             f"blocked at a host flag set after {ms:.0f} ms": _event_timed(blocked_at_flag,
                                                                           after=lambda: timers.pop().join()),
             f"{gemms} bf16 GEMMs of 4096^2": _event_timed(lambda: [a @ a for _ in range(gemms)])}

    def free():  # a flag still waited on (a round that raised) is set by its timer before it goes
        while timers:
            timers.pop().join()
        torch.cuda.synchronize()
        d.free_host_flag(host)
    return loads, free


def _under_load_on_gpu(d) -> dict:
    """The calls timed on this thread under the GPU's loads, and by the native thread under those
    and under another thread's launches (which would confound this thread's timing with the GIL)."""
    loads, free = gpu_loads(d)
    try:
        return {"host_timed": under_load(d, loads),
                "native": native_under_load(d, {**loads, "another thread launching tiny kernels": host_launches})}
    finally:
        free()


def _native_table(rows: list[dict], title: str, load_ms: str | None = None) -> list[str]:
    """native_under_load's rows as a markdown table; with `load_ms` (its heading), a column of each
    round's load_ms."""
    cpu = lambda r: "-" if r.get("cpu_of_running") is None else f"{100 * r['cpu_of_running']:.0f}%"  # noqa: E731
    extra = lambda r: "" if load_ms is None else " " + (  # noqa: E731
        "-" if not r.get("load_ms") else ", ".join(f"{ms:.2f}" for ms in r["load_ms"])) + " |"
    return ["", f"| {title} | map us | set_access us | unmap us | on a CPU, of the batches' time | "
                "each round's slowest call, ms |" + ("" if load_ms is None else f" {load_ms} |"),
            "|---|---|---|---|---|---|" + ("" if load_ms is None else "---|")] + [
        f"| {r['phase']} | {r['map_us']:.1f} | {r['set_access_us']:.1f} | {r['unmap_us']:.1f} | {cpu(r)} | "
        f"{', '.join(f'{ms:.2f} ({kind})' for ms, kind in r['rounds_slowest_ms'])} |{extra(r)}" for r in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; ~3 min on an H200)")
    ap.add_argument("--tag", default="mapbench")
    args = ap.parse_args(argv)
    wanted = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    torch.empty(1, device="cuda")
    d = CudaDriver(torch.cuda.current_device())
    env = environment()
    runs = {"driver_per_page": lambda: driver_costs(d, args.pages),
            "manager": lambda: manager_costs(d, rows=32, blocks_per_row=64),
            "step_loop": lambda: [step_loop(d, bg, steps=60, batch=32, cpu_work_s=0.004) for bg in (False, True)],
            "contention": lambda: contention(d), "parallel": lambda: parallel_driver(d, args.pages),
            "alloc_sizes": lambda: alloc_size_costs(d), "under_load": lambda: _under_load_on_gpu(d),
            "host_ops": lambda: native_under_load(d, host_loads(d)),
            "at_scale": lambda: at_scale(d, loads_for=reading_loads(), release=torch.cuda.empty_cache),
            "first_launch": lambda: native_under_load(d, first_launch_loads())}
    res = {**env, **{name: runs[name]() for name in SECTIONS if name in wanted}}
    os.makedirs(args.out, exist_ok=True)
    stem = results_stem(args.out, env, f"-{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = ["# Mapper micro-benchmark", "", header(env)]
    if "driver_per_page" in res:
        lines += ["", "| driver call (2 MiB page) | us |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in res["driver_per_page"].items()]
    if "manager" in res:
        lines += ["", "| manager (Llama-3-8B KV, 16-token blocks) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res["manager"].items()]
    if "step_loop" in res:
        lines += ["", "| step loop (32 blocks/step, 4 ms CPU work) | blocked ms/step (median) | p90 | wall ms/step |",
                  "|---|---|---|---|"]
        for r in res["step_loop"]:
            lines.append(f"| {'native background' if r['background'] else 'foreground'} thread | "
                         f"{r['blocked_ms_per_step_median']:.3f} | {r['blocked_ms_per_step_p90']:.3f} | {r['wall_ms_per_step']:.2f} |")
    if "contention" in res:
        c = res["contention"]
        lines += ["", f"| native thread mapping {c['pages']} pages x {c['rounds']} meanwhile? | idle | mapping | "
                  "native driver s while measured |", "|---|---|---|---|"]
        for key, what, fmt in (("launch_us", "tiny kernel launch, CPU us", ".2f"), ("gemm_ms", "4096^2 bf16 GEMM, GPU ms", ".3f"),
                               ("event_us", "fence: new event, record, query, CPU us", ".2f"),
                               ("stream_wait_us", "satisfied cuStreamWaitValue32, CPU us", ".2f"),
                               ("h2d_copy_us", "1 KiB pinned H2D copy, CPU us", ".2f")):
            if f"{key}_idle" in c:
                lines.append(f"| {what} | {c[f'{key}_idle']:{fmt}} | {c[f'{key}_mapping']:{fmt}} | "
                             f"{c[f'{key}_native_driver_s']:.3f} |")
    if "parallel" in res:
        lines += ["", f"| driver calls over threads ({args.pages} pages, wall time) | set_access us/page | "
                  "map + set_access us/page | speedup |", "|---|---|---|---|"]
        lines += [f"| {r['threads']} thread(s) | {r['set_access_us_per_page']:.1f} | {r['map_and_access_us_per_page']:.1f} | "
                  f"{r['speedup_map_and_access']:.2f}x |" for r in res["parallel"]]
    if "alloc_sizes" in res:
        lines += ["", "| one allocation of (1 GiB in all) | map us per 2 MiB | set_access us per 2 MiB | unmap us per 2 MiB |",
                  "|---|---|---|---|"]
        lines += [f"| {r['alloc_mib']} MiB x {r['allocations']} | {r['map_us_per_2mib']:.1f} | "
                  f"{r['set_access_us_per_2mib']:.1f} | {r['unmap_us_per_2mib']:.1f} |" for r in res["alloc_sizes"]]
    if "under_load" in res:
        lines += ["", "| GPU meanwhile (2 MiB pages, one call each) | call | calls | p50 us | p99 us | slowest us | "
                  "slowest first call us | over 1 ms | the load's GPU ms |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['call']} | {r['calls']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['max_us']:.1f} | "
                  f"{r['first_call_max_us']:.1f} | {r['over_slow_ms']} | "
                  f"{'-' if r['load_gpu_ms'] is None else format(r['load_gpu_ms'], '.1f')} |"
                  for r in res["under_load"]["host_timed"]]
        lines += _native_table(res["under_load"]["native"],
                               "the native thread's calls (one batch of map, set_access, unmap per round), meanwhile")
    if "host_ops" in res:
        lines += _native_table(res["host_ops"], "the native thread's calls (one batch per round), meanwhile")
    if "at_scale" in res:
        lines += _native_table(res["at_scale"], "the native thread's calls on fresh pages (one batch per round), with")
        setup = {r["mapped_pages"]: r["setup_s"] for r in res["at_scale"]}  # (one per count; its rows share it)
        lines += ["", "Mapping the pages beforehand took: " + ", ".join(
            f"{n} pages {s:.2f} s" for n, s in setup.items())]
    if "first_launch" in res:
        lines += _native_table(res["first_launch"], "the native thread's calls (one batch per round), meanwhile",
                               load_ms="the other thread's call, host ms per round")
    write_markdown(stem, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
