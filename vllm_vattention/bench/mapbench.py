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
    d.unmap(va, pages * PAGE_SIZE)
    out["release_us"] = _per_call_us(d.release, hs)
    d.free_reservation(va, pages * PAGE_SIZE)
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--pages", type=int, default=1024)
    args = ap.parse_args(argv)
    torch.empty(1, device="cuda")
    d = CudaDriver(torch.cuda.current_device())
    env = environment()
    res = {**env, "driver_per_page": driver_costs(d, args.pages),
           "manager": manager_costs(d, rows=32, blocks_per_row=64),
           "step_loop": [step_loop(d, bg, steps=60, batch=32, cpu_work_s=0.004) for bg in (False, True)]}
    os.makedirs(args.out, exist_ok=True)
    stem = results_stem(args.out, env, "-mapbench")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    dp, mg = res["driver_per_page"], res["manager"]
    lines = ["# Mapper micro-benchmark", "", header(env), "",
             "| driver call (2 MiB page) | us |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in dp.items()]
    lines += ["", "| manager (Llama-3-8B KV, 16-token blocks) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in mg.items()]
    lines += ["", "| step loop (32 blocks/step, 4 ms CPU work) | blocked ms/step (median) | p90 | wall ms/step |",
              "|---|---|---|---|"]
    for r in res["step_loop"]:
        lines.append(f"| {'native background' if r['background'] else 'foreground'} thread | "
                     f"{r['blocked_ms_per_step_median']:.3f} | {r['blocked_ms_per_step_p90']:.3f} | {r['wall_ms_per_step']:.2f} |")
    write_markdown(stem, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
