"""The scheduler-in-the-loop replay on the CPU: vLLM 0.25's real Scheduler, KVCacheManager and
BlockPool serve hand-built request streams; the eviction hook changes which cached prefix
survives exactly where the one-bit rule says it should."""

import os

import pytest

from vllm_vattention.bench import sched_replay as S

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "llama-3.1-8b")


def toks(seed: int, n: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 104729) % 20000 for i in range(n)]


def req(t: float, prompt: list[int], max_tokens: int = 1) -> dict:
    return {"t": t, "prompt": prompt, "max_tokens": max_tokens}


def test_a_repeated_prompt_is_served_from_the_cache():
    p = toks(1, 64)
    r = S.run([req(0.0, p), req(1.0, p)], MODEL, budget=64, policy="lru", step=S.StepModel())
    # vLLM reuses whole cached blocks and always computes the last prompt token: 48 of 64
    assert r["cached_tokens_by_request"] == [0, 48]
    assert r["cached_prompt_share"] == 48 / 128 and r["preemptions"] == 0
    assert r["prefill_tokens_computed"] == 128 - 48
    assert r["steps"] >= 2 and r["scheduler_ms_per_step"] > 0  # measured around the real scheduler


def test_a_tight_budget_preempts_and_still_finishes_everything():
    reqs = [req(0.0, toks(10 + i, 64), max_tokens=64) for i in range(4)]
    r = S.run(reqs, MODEL, budget=20, policy="lru", step=S.StepModel())
    assert r["preemptions"] > 0
    assert r["requests"] == 4 and r["ttft_p99_s"] > 0
    assert r["prefill_tokens_computed"] > 4 * 64  # preempted requests recompute their KV


@pytest.mark.parametrize("policy, expected", [("lru", 0), ("discard-lru", 64), ("second-chance", 64), ("adaptive", 64)])
def test_discard_lru_keeps_a_prefix_many_requests_shared(policy, expected):
    shared = toks(99, 64)  # 4 blocks, used by 6 requests: kept by the one-bit rule (>= 5 users)
    reqs, t = [], 0.0
    for i in range(8):  # one pass over the 40-block pool first (the hook reorders only after it)
        reqs.append(req(t, toks(200 + i, 96)))
        t += 1.0
    for i in range(6):
        reqs.append(req(t, shared + toks(300 + i, 16)))
        t += 1.0
    for i in range(10):  # one-off prompts: 60 blocks, more than the pool holds
        reqs.append(req(t, toks(400 + i, 96)))
        t += 1.0
    reqs.append(req(t, shared + toks(500, 16)))
    r = S.run(reqs, MODEL, budget=40, policy=policy, step=S.StepModel())
    assert r["cached_tokens_by_request"][8 + 1: 8 + 6] == [64] * 5  # the shared prefix hits meanwhile
    assert r["cached_tokens_by_request"][-1] == expected  # LRU evicted it; discard-lru evicted the one-offs


def test_report_compares_each_policy_with_lru_at_the_same_budget():
    row = {"prefill_tokens_computed": 10, "preemptions": 0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "makespan_s": 1.0}
    doc = {"vllm": "0.25.0", "commit": "c", "date": "d", "distinct_blocks": 4,
           "args": {"trace": "t.jsonl", "num_requests": 2, "max_input_tokens": 64, "time_scale": 1.0,
                    "step_base_s": 0.006, "step_token_s": 1.8e-5, "max_num_batched_tokens": 8192},
           "results": [{"policy": "lru", "num_gpu_blocks": 8, "cached_prompt_share": 0.2, **row},
                       {"policy": "discard-lru", "num_gpu_blocks": 8, "cached_prompt_share": 0.3, **row,
                        "scheduler_ms_per_step": 0.25}]}
    md = S.markdown(doc)
    assert "| 8 | discard-lru | 0.300 | 1.50x |" in md and "commit c" in md
    assert md.count(" | 1.0 | 0.250 |") == 1 and md.count(" | 1.0 | - |") == 1  # absent in older runs
