"""Engine-thread time of vAttention's per-step bookkeeping, on a CPU (NOTES #23, #24).

`--workload decode` (default): a 512/1024-like decode: 256 rows of Llama-3-8B's KV geometry, 16 of
them growing by a block per step, stream mode. `--executor native`: the native thread calling the
fake driver (its callbacks take the GIL, so this overstates what a GPU's libcuda costs); `null`:
Python planning alone.

`--workload spares`: 8 new requests of 64 fresh blocks per step with 1024 spare frames, requests
leaving after 25 steps and their blocks handed out again (every fresh block's former frame is still
mapped somewhere): set_blocks and warm() per step, planning alone, and how many fresh blocks were
swapped rather than mapped.

`--workload prefill`: an 8192/256-like prefill: each step admits 2 requests of 8192 tokens (512
fresh blocks each: one 16,384-token step), FA3 reads them with its guard (ensure_readable), stream
mode; requests leave after 8 steps, so rows are reused (deferred reclamation remaps their slots).

    python3 benchmarks/cpu_step_overhead.py --executor null
    python3 benchmarks/cpu_step_overhead.py --workload spares
    python3 benchmarks/cpu_step_overhead.py --workload prefill --executor null
"""

import argparse
import time
from collections import deque

import numpy as np

from vllm_vattention.attention import ops
from vllm_vattention.memory import FakeDriver, KVGeometry, KVMemoryManager, make_layout

LLAMA3_8B = KVGeometry(num_layers=32, num_kv_heads=8, head_size=128, dtype_bytes=2)
PAGE = 2 << 20


class _NoZeroing(FakeDriver):
    def memset_zero(self, va, size):  # 20,000 blocks of 2 MiB: skip writing 40 GiB of zeros
        pass


class _NullExecutor:
    background_submitted = 0

    def run(self, ops): pass
    def run_background(self, ops): return 0
    def set_rows(self, *where): pass
    def wait(self): pass
    def poll(self): pass
    def close(self): pass


class _DoneFence:
    native_handle = 0

    def done(self): return True
    def wait(self): pass


def spares(steps: int) -> None:
    import random
    lay = make_layout("interleaved", LLAMA3_8B, PAGE, rows=512, min_row_tokens=2048 + 256)
    num_blocks = 20000
    m = KVMemoryManager(_NoZeroing(PAGE, capacity=1 << 50), lay, num_blocks, spare_blocks=1024)
    m.mapper.executor = _NullExecutor()  # planning alone: nothing is mapped, the manager is not closed
    order = list(range(num_blocks))
    random.Random(0).shuffle(order)
    free = deque(order)  # (a list's pop(0) cost 0.5 ms of the 1.04 ms/step once measured as set_blocks)
    active, t_set, t_warm = [], 0.0, 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(8):
            if len(active) >= 200:
                row, blocks = active.pop(0)
                m.release_row(row)
                free.extend(blocks)
            row, blocks = m.acquire_row(), [free.popleft() for _ in range(64)]
            m.set_blocks(row, blocks, fresh_from=0)
            active.append((row, blocks))
        t1 = time.perf_counter()
        m.warm()
        t_warm += time.perf_counter() - t1
        t_set += t1 - t0
    s = m.stats()
    print(f"set_blocks {1e3 * t_set / steps:.2f} ms/step, warm {1e3 * t_warm / steps:.2f} ms/step; "
          f"{s['swaps']} of {s['swaps'] + s['block_maps']} fresh blocks swapped, {s['warm_maps']} warm maps")


def prefill(steps: int, executor: str) -> None:
    lay = make_layout("interleaved", LLAMA3_8B, PAGE, rows=513, min_row_tokens=8192 + 256 + 256)
    num_blocks = 20000
    m = KVMemoryManager(_NoZeroing(PAGE, capacity=1 << 50), lay, num_blocks, background="stream")
    if executor == "null":
        m.mapper.executor = _NullExecutor()
    free = deque(range(num_blocks))
    active = []
    t = dict.fromkeys(("admit", "ensure_readable", "publish", "release"), 0.0)
    for step in range(steps):
        t0 = time.perf_counter()
        new = []
        for _ in range(2):
            row, blocks = m.acquire_row(), [free.popleft() for _ in range(512)]
            m.set_blocks(row, blocks, fresh_from=0)
            new.append((row, blocks))
        t1 = time.perf_counter()
        seq = np.full(2, 8192, dtype=np.int64)
        fa3, ext = ops.read_extents(seq, seq, "fa2", 256, lay.row_tokens, clip_to_view=True)
        for (row, _), e in zip(new, ext.tolist()):
            m.ensure_readable(row, e)
        t2 = time.perf_counter()
        m.publish()
        m.record_reads(_DoneFence(), {row: e for (row, _), e in zip(new, ext.tolist())})
        t3 = time.perf_counter()
        active += new
        while len(active) > 16:
            row, blocks = active.pop(0)
            m.release_row(row)
            free.extend(blocks)
        t4 = time.perf_counter()
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[k] += dt
        if executor != "null" and step % 10 == 0:
            m.sync()
    s = m.stats()
    print(" ".join(f"{k} {1e3 * v / steps:.2f}" for k, v in t.items()),
          f"| total {1e3 * sum(t.values()) / steps:.2f} ms/step ({executor} executor); "
          f"{s['block_maps']} block maps, {s['block_unmaps']} unmaps, {s['zero_maps']} zero maps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("decode", "spares", "prefill"), default="decode")
    ap.add_argument("--executor", choices=("native", "null"), default="native")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    if args.workload == "spares":
        return spares(args.steps)
    if args.workload == "prefill":
        return prefill(args.steps, args.executor)
    lay = make_layout("interleaved", LLAMA3_8B, PAGE, rows=513, min_row_tokens=2048 + 256)
    m = KVMemoryManager(_NoZeroing(PAGE, capacity=1 << 50), lay, 20000, background="stream")
    rows = np.array([m.acquire_row() for _ in range(256)], dtype=np.int32)
    have, nxt = {}, 0
    for r in rows.tolist():
        m.set_blocks(r, list(range(nxt, nxt + 32)), fresh_from=0)
        have[r], nxt = 32, nxt + 32
    m.publish()
    m.sync()
    if args.executor == "null":  # from here on nothing is mapped: the manager is not closed
        m.mapper.executor = _NullExecutor()
    seq, qlen = np.full(256, 512, dtype=np.int32), np.ones(256, dtype=np.int32)
    t = dict.fromkeys(("set_blocks", "read_extents", "reads", "publish", "record_reads"), 0.0)
    for step in range(args.steps):
        seq += 1
        t0 = time.perf_counter()
        for i in range(16):
            r = int(rows[(step * 16 + i) % 256])
            m.set_blocks(r, [nxt], start=have[r], fresh_from=0)
            have[r], nxt = have[r] + 1, (nxt + 1) % 20000
        t1 = time.perf_counter()
        _, ext = ops.read_extents(seq, qlen, "fa2", 256, lay.row_tokens, clip_to_view=True)
        t2 = time.perf_counter()
        reads = dict(zip(rows.tolist(), ext.tolist()))
        t3 = time.perf_counter()
        m.publish()
        t4 = time.perf_counter()
        m.record_reads(_DoneFence(), reads)
        t5 = time.perf_counter()
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            t[k] += dt
        if step % 50 == 0:
            m.sync()
    print(" ".join(f"{k} {1e6 * v / args.steps:.0f}" for k, v in t.items()),
          f"| total {1e6 * sum(t.values()) / args.steps:.0f} us/step ({args.executor} executor)")


if __name__ == "__main__":
    main()
