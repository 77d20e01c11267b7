"""Multi-turn LLM traces as page requests.

A request is a list of block hashes (Mooncake: 512 tokens per block, equal ids = the same prefix
KV). At a finer granularity g, block h splits into 512/g pages (h, 0), (h, 1), ...; the last block
of a request holds only the tokens the request has, so it has fewer pages. Page ids are ints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

BLOCK_TOKENS = 512


@dataclass
class Request:
    t_ms: int
    input_len: int
    output_len: int
    blocks: list[int]  # block hashes, BLOCK_TOKENS tokens each (the last may be partial)


@dataclass
class PagedRequest:
    index: int
    t_ms: int
    pages: list[int]
    page_tokens: list[int]  # tokens held by each page


def load_jsonl(path: str, limit: int | None = None) -> list[Request]:
    out = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            out.append(Request(int(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
                               list(d["hash_ids"])))
            if limit and len(out) >= limit:
                break
    return out


def paged(requests: list[Request], granularity: int = BLOCK_TOKENS) -> list[PagedRequest]:
    if granularity <= 0 or BLOCK_TOKENS % granularity:
        raise ValueError(f"granularity {granularity} must divide {BLOCK_TOKENS}")
    per_block = BLOCK_TOKENS // granularity
    out = []
    for i, r in enumerate(requests):
        pages, toks = [], []
        n = len(r.blocks)
        for j, h in enumerate(r.blocks):
            tokens = BLOCK_TOKENS if j < n - 1 else max(1, min(BLOCK_TOKENS, r.input_len - BLOCK_TOKENS * (n - 1)))
            for s in range(-(-tokens // granularity)):
                pages.append(h * per_block + s)
                toks.append(min(granularity, tokens - s * granularity))
        out.append(PagedRequest(i, r.t_ms, pages, toks))
    return out


def flatten(reqs: list[PagedRequest]) -> tuple[list[int], list[int]]:
    """(page sequence, request index of each position)."""
    seq, owner = [], []
    for r in reqs:
        seq.extend(r.pages)
        owner.extend([r.index] * len(r.pages))
    return seq, owner


def parents(requests: list[Request], min_blocks: int = 2) -> list[int]:
    """For each request, the latest earlier request it continues (-1 if none): the earlier
    request's full blocks (all but a partial last one) are a prefix of this one, at least
    `min_blocks` long (so that a shared system prompt alone does not make a conversation).
    The trace has no session ids; this is how a conversation shows up in it."""
    by_last_full: dict[int, int] = {}  # hash of a request's last full block -> latest such request
    out = []
    for i, r in enumerate(requests):
        best = -1
        for j in range(len(r.blocks) - 1, min_blocks - 2, -1):
            q = by_last_full.get(r.blocks[j])
            if q is not None and requests[q].blocks[:j + 1] == r.blocks[:j + 1]:
                best = q
                break
        out.append(best)
        nfull = len(r.blocks) if r.input_len % BLOCK_TOKENS == 0 else len(r.blocks) - 1
        if nfull >= min_blocks:
            by_last_full[r.blocks[nfull - 1]] = i
    return out


def synthetic(num_conversations: int = 40, turns: int = 4, shared_prefix: int = 2, seed: int = 0,
              block_range: tuple[int, int] = (2, 6)) -> list[Request]:
    """A small multi-turn trace for tests: conversations that share a system prompt, each turn
    extending the previous one; arrivals interleaved at random."""
    import random
    rng = random.Random(seed)
    next_id = shared_prefix
    convs = []
    for _ in range(num_conversations):
        blocks = list(range(shared_prefix))
        conv = []
        for _ in range(rng.randint(1, turns)):
            add = rng.randint(*block_range)
            blocks = blocks + list(range(next_id, next_id + add))
            next_id += add
            conv.append(list(blocks))
        convs.append(conv)
    events = []
    for c, conv in enumerate(convs):
        t = rng.randint(0, 10_000)
        for blocks in conv:
            events.append((t, c, blocks))
            t += rng.randint(500, 5_000)
    events.sort()
    return [Request(t, BLOCK_TOKENS * len(b) - rng.randint(0, 300), 100, b) for t, _, b in events]
