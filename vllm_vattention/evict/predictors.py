"""One-bit predictions for each position of a page sequence.

- `discard_oracle(seq, k)`: 1 iff Belady (cache k) evicts the page before its next request, or the
  page is never requested again: exactly the discard bit of the paper's first setup.
- `phase_oracle(seq, k)`: 1 iff the page is requested in the next marking phase (phases: maximal
  segments of k distinct pages), the paper's second setup.
- `noisy(bits, rate, seed)`: each bit flipped independently with probability `rate`.
- `online_reuse(...)`: what a server can compute without the future: a page is predicted to be
  reused ("keep") if it is shared by at least m conversations so far, or if its conversation is
  likely to continue (the continuation rate of conversations at the same turn depth, estimated from
  conversations old enough for their outcome to be known). Returned as discard bits (1 = not kept)
  or phase bits (1 = kept).
"""

from __future__ import annotations

import random

from .policies import Belady, next_uses


def discard_oracle(seq: list[int], k: int, nxt: list[float] | None = None) -> tuple[list[int], int]:
    """(bits, OPT's number of faults)."""
    nxt = nxt if nxt is not None else next_uses(seq)
    opt = Belady(k, nxt)
    for t, p in enumerate(seq):
        opt.access(p, t)
    return discard_bits(opt), opt.faults


def discard_bits(opt: Belady) -> list[int]:
    """The discard bit of every position, from a Belady run over the whole sequence."""
    bits = [1 if n == float("inf") else 0 for n in opt.nxt]
    for t in opt.evicted_last:
        bits[t] = 1
    return bits


def phases(seq: list[int], k: int) -> list[int]:
    """The marking phase of each position: a phase ends just before its (k+1)-th distinct page."""
    out, seen, ph = [], set(), 0
    for p in seq:
        if p not in seen and len(seen) == k:
            ph += 1
            seen = set()
        seen.add(p)
        out.append(ph)
    return out


def phase_oracle(seq: list[int], k: int) -> list[int]:
    ph = phases(seq, k)
    pages_in: dict[int, set[int]] = {}
    for p, f in zip(seq, ph):
        pages_in.setdefault(f, set()).add(p)
    return [1 if p in pages_in.get(f + 1, ()) else 0 for p, f in zip(seq, ph)]


def noisy(bits: list[int], rate: float, seed: int = 0) -> tuple[list[int], int]:
    """(bits with each flipped with probability rate, number flipped)."""
    rng = random.Random(seed)
    out, flipped = [], 0
    for b in bits:
        if rng.random() < rate:
            out.append(1 - b)
            flipped += 1
        else:
            out.append(b)
    return out, flipped


def online_reuse(requests, paged_requests, parent: list[int], min_shared: int = 2, horizon_ms: int = 600_000,
                 max_depth: int = 6, continuation: bool = True) -> list[int]:
    """Keep-bits (1 = predicted reused) for every page position, computed online in arrival order.

    Shared: the page appeared in >= min_shared earlier requests (of different conversations or turns).
    Continuation: P(a request at turn depth d gets a follow-up turn), estimated from earlier requests
    that arrived more than horizon_ms ago (their outcome is known by then); predicted if >= 0.5.
    continuation=False: the shared rule alone (what the vLLM hook computes from block hit counts).
    """
    depth: list[int] = []
    children: list[int] = [0] * len(requests)
    seen: dict[int, int] = {}
    stats = [[0, 0] for _ in range(max_depth + 1)]  # depth -> [resolved, continued]
    resolved_upto = 0
    child_time: list[int | None] = [None] * len(requests)
    keep: list[int] = []
    for i, (r, pr) in enumerate(zip(requests, paged_requests)):
        d = 0 if parent[i] < 0 else min(max_depth, depth[parent[i]] + 1)
        depth.append(d)
        if parent[i] >= 0:
            children[parent[i]] += 1
            if child_time[parent[i]] is None:
                child_time[parent[i]] = r.t_ms
        while resolved_upto < i and requests[resolved_upto].t_ms < r.t_ms - horizon_ms:
            q = resolved_upto
            ct = child_time[q]
            stats[depth[q]][0] += 1
            if ct is not None and ct - requests[q].t_ms <= horizon_ms:
                stats[depth[q]][1] += 1
            resolved_upto += 1
        n, c = stats[d]
        continues = continuation and n > 0 and c / n >= 0.5
        for page in pr.pages:
            cnt = seen.get(page, 0) + 1
            seen[page] = cnt
            keep.append(1 if (continues or cnt >= min_shared) else 0)
    return keep
