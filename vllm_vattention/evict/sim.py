"""Run a policy over a paged trace: page faults (the paper's cost) and vLLM's prefix semantics.

vLLM reuses a request's cached blocks only up to its first missing block (a block's hash covers its
whole prefix), so prefix hits are the hits before the first miss of each request, and every token
after it is recomputed in prefill. Every page of a request is still brought into the cache.
Simplifications: requests are served one at a time in arrival order; output tokens are not cached
(a conversation's next turn brings the previous answer back as new prompt blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from .policies import Policy


@dataclass
class Result:
    policy: str
    k: int
    page_requests: int
    faults: int
    page_hit_rate: float
    prefix_hit_tokens: int
    input_tokens: int
    prefix_hit_rate: float
    recomputed_tokens: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def simulate(paged_requests, policy: Policy, bits: list[int] | None = None, name: str | None = None) -> Result:
    t = 0
    hits = prefix_tokens = total_tokens = 0
    for r in paged_requests:
        in_prefix = True
        for page, tokens in zip(r.pages, r.page_tokens):
            hit = policy.access(page, t, bits[t] if bits is not None else 0)
            t += 1
            total_tokens += tokens
            if hit:
                hits += 1
                if in_prefix:
                    prefix_tokens += tokens
            else:
                in_prefix = False
    return Result(name or policy.name, policy.k, t, policy.faults, hits / max(t, 1), prefix_tokens, total_tokens,
                  prefix_tokens / max(total_tokens, 1), total_tokens - prefix_tokens)
