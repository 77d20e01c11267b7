"""A list-scheduling model of FA2 decode's grid order (benchmarks/NOTES.md #138): how far the order in
which FA2 launches its blocks puts a decode batch from a perfect balance, as drawn and sorted longest first.

FA2's decode kernel (fwd_kvcache: the split-KV kernel, GQA packed, one block per sequence and KV head
per split) launches a grid of (1, batch, KV heads) with one split, heads slowest, and of
(1, splits, batch x KV heads) with more, the batch slowest. The model hands blocks in that order to
`slots` places (blocks resident at once over the GPU), each to the place free first; a block's time is
its sequence's length plus a fixed part. It prints each order's finish over the perfect balance
(total time / slots). A model, not a measurement: kbench --longest-first measures the kernel.

    python3 benchmarks/fa2_order_model.py
"""

from __future__ import annotations

import heapq
import random

KV_HEADS = 8
FIXED = 60  # tokens' worth of a block's fixed cost (a guess)


def finish(times: list[float], slots: int) -> float:
    """List scheduling: each time goes to the place free first; the last place's end."""
    free = [0.0] * slots
    for t in times:
        heapq.heappush(free, heapq.heappop(free) + t)
    return max(free)


def orders(lens: list[int]) -> dict[str, list[float]]:
    """Blocks' times in launch order: one split as drawn and sorted (heads slowest), and a sequence's
    heads together sorted (the several-split grid's order, or heads folded into the batch)."""
    srt = sorted(lens, reverse=True)
    return {"as drawn": [n + FIXED for _ in range(KV_HEADS) for n in lens],
            "longest first, heads slowest": [n + FIXED for _ in range(KV_HEADS) for n in srt],
            "longest first, heads together": [n + FIXED for n in srt for _ in range(KV_HEADS)]}


def main() -> None:
    rng = random.Random(1)
    batches = [("mixed-64-4096-in", 128, 65, 4608), ("mixed-64-4096-in", 192, 65, 4608),
               ("512-in-1024-out", 256, 512, 1536), ("1024-in-128-out", 256, 1024, 1152),
               ("8192-in-256-out", 64, 8192, 8448)]
    print("| batch | sequences | lengths | blocks at once | " + " | ".join(orders([1])) + " |")
    print("|---|---|---|---|---|---|---|")
    for name, b, lo, hi in batches:
        lens = [rng.randint(lo, hi) for _ in range(b)]
        for slots in (264, 396):
            by = orders(lens)
            ideal = sum(by["as drawn"]) / slots
            cells = " | ".join(f"{finish(t, slots) / ideal:.3f}x" for t in by.values())
            print(f"| {name} | {b} | {lo}-{hi} | {slots} | {cells} |")


if __name__ == "__main__":
    main()
