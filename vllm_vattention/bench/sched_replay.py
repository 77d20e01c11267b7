"""Multi-turn replay through vLLM's own scheduler, on the CPU: what an eviction order does to prefix
hits at a given KV budget, with the running requests competing for the same blocks.

    python3 -m vllm_vattention.bench.sched_replay --trace ../shared/traces/mooncake_conversation_trace.jsonl \\
        --num-requests 300 --time-scale 1.5 --budgets 2560,4096,8192,16384 --policies lru,discard-lru

The simulator in `vllm_vattention/evict/` models the paper's cache (k blocks, requests one at a
time). A server differs: its KV budget holds the running requests' blocks and, in what is left, the
prefix cache; requests wait, are chunked and preempted. Here vLLM 0.25's real `Scheduler` (its
KVCacheManager, BlockPool and free-block queue, patched by `VATTN_PREFIX_EVICTION`'s hook for
`discard-lru`) serves the trace's requests (prompts built as in `bench/multiturn.py`, so block
hashes become shared token prefixes). The model is not run: each scheduled request that completes
its prompt gets one token per step, and a virtual clock advances by a step-time model,
`step_s = --step-base-s + --step-token-s * scheduled tokens` (defaults fitted to an 8B model on one
H200: ~6 ms per step plus ~18 us per token). Requests arrive at their trace times (/ --time-scale).

Reported per budget and policy: cached share of prompt tokens at first scheduling (per request, as
vLLM's `prompt_tokens_cached` counts), prefill tokens computed (recomputation after preemption
included), preemptions, and TTFT p50/p99 in the clock's seconds. What the device run must then
confirm is the TTFT; the hit counts here come from vLLM's own code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

from .env import environment, nearest_rank, write_markdown
from .multiturn import build_requests


@dataclass
class StepModel:
    base_s: float = 0.006
    token_s: float = 1.8e-5

    def __call__(self, tokens: int) -> float:
        return self.base_s + self.token_s * tokens


def make_scheduler(model: str, num_blocks: int, max_model_len: int, max_num_batched_tokens: int = 8192,
                   max_num_seqs: int = 1024, block_size: int = 16):
    """vLLM's scheduler with prefix caching, on the CPU, and the request block hasher the engine uses."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    mc = ModelConfig(model=model, tokenizer=model, dtype="bfloat16", max_model_len=max_model_len,
                     skip_tokenizer_init=True)
    cc = CacheConfig(block_size=block_size, enable_prefix_caching=True)
    cc.num_gpu_blocks = num_blocks
    sc = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                         max_model_len=max_model_len, is_encoder_decoder=False)
    vc = VllmConfig(model_config=mc, cache_config=cc, scheduler_config=sc, device_config=DeviceConfig(device="cpu"))
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=mc.get_num_kv_heads(vc.parallel_config),
                             head_size=mc.get_head_size(), dtype=torch.bfloat16)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["attn"], spec)])
    sched = Scheduler(vllm_config=vc, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vc),
                      block_size=block_size, log_stats=True)
    hash_fn = get_hash_fn_by_name(cc.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return sched, get_request_block_hasher(block_size, hash_fn)


def replay(sched, hasher, requests: list[dict], step: StepModel, max_steps: int = 10_000_000) -> dict:
    """Serve `requests` ({"t", "prompt", "max_tokens"}) through `sched`; returns the metrics."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    pending = sorted(range(len(requests)), key=lambda i: requests[i]["t"])
    live: dict[str, Request] = {}
    first_token: dict[str, float] = {}
    cached: dict[str, int] = {}
    clock, nxt, steps, scheduled, produced = 0.0, 0, 0, 0, 0
    sched_s = 0.0  # real CPU time in schedule() + update_from_output(), where the eviction policy runs
    while nxt < len(pending) or sched.has_requests():
        while nxt < len(pending) and requests[pending[nxt]]["t"] <= clock:
            i = pending[nxt]
            r = requests[i]
            sp = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0)
            req = Request(str(i), list(r["prompt"]), sp, None, arrival_time=r["t"], block_hasher=hasher)
            live[req.request_id] = req
            sched.add_request(req)
            nxt += 1
        if not sched.has_requests():
            clock = requests[pending[nxt]]["t"]
            continue
        t0 = time.perf_counter()
        out = sched.schedule()
        sched_s += time.perf_counter() - t0
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"replay did not finish in {max_steps} steps")
        n = out.total_num_scheduled_tokens
        scheduled += n
        clock += step(n)
        ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            req = live[rid]
            ps = req.prefill_stats  # set at first scheduling (not after a preemption), taken at first token
            if rid not in cached and ps is not None and ps.num_prompt_tokens:
                cached[rid] = ps.num_local_cached_tokens
            # schedule() has advanced num_computed_tokens: a request whose every token is computed
            # samples one; a partial prefill chunk samples nothing (as the GPU runner discards it)
            done = req.num_computed_tokens >= req.num_tokens
            sampled.append([100] if done else [])
            if done:
                produced += 1
                first_token.setdefault(rid, clock)
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)}, sampled_token_ids=sampled)
        t0 = time.perf_counter()
        sched.update_from_output(out, mro)  # frees finished requests' blocks: the eviction hook runs here too
        sched_s += time.perf_counter() - t0
    prompt_tokens = sum(len(r["prompt"]) for r in requests)
    ttft = sorted(first_token[str(i)] - requests[i]["t"] for i in range(len(requests)))
    return {"requests": len(requests), "steps": steps, "prompt_tokens": prompt_tokens,
            "prompt_tokens_cached": sum(cached.values()),
            "cached_prompt_share": sum(cached.values()) / prompt_tokens if prompt_tokens else None,
            # every scheduled token is prefill work except one per sampled token after the first of a request
            "prefill_tokens_computed": scheduled - (produced - len(first_token)),
            "preemptions": sum(r.num_preemptions for r in live.values()),
            "cached_tokens_by_request": [cached.get(str(i), 0) for i in range(len(requests))],
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": nearest_rank(ttft, 0.99),
            "makespan_s": clock,
            # measured, not modelled: what the policy adds to the scheduler's CPU time per step
            "scheduler_ms_per_step": 1e3 * sched_s / steps if steps else None}


def run(requests: list[dict], model: str, budget: int, policy: str, step: StepModel, min_users: int | None = None,
        max_num_batched_tokens: int = 8192, passes: int = 1) -> dict:
    from .. import prefix_eviction
    max_len = max(len(r["prompt"]) + r["max_tokens"] for r in requests) + 64
    prefix_eviction.uninstall()
    try:
        if policy != "lru":
            prefix_eviction.install(policy, min_users or prefix_eviction.DEFAULT_MIN_USERS, passes)
        sched, hasher = make_scheduler(model, budget, max_len, max_num_batched_tokens)
        return {"policy": policy, "num_gpu_blocks": budget, **replay(sched, hasher, requests, step)}
    finally:
        prefix_eviction.uninstall()


def markdown(doc: dict) -> str:
    a = doc["args"]
    lines = ["# Multi-turn replay through vLLM's scheduler (CPU, modelled step time)", "",
             f"CPU only | vLLM {doc['vllm']} | commit {doc.get('commit', '?')} | {doc.get('date', '?')} | trace `{os.path.basename(a['trace'])}`, first {a['num_requests']} requests, "
             f"prompts cut to {a['max_input_tokens']} tokens, time x{a['time_scale']}, "
             f"{doc['distinct_blocks']} distinct 512-token blocks (= {32 * doc['distinct_blocks']} 16-token blocks); "
             f"step = {a['step_base_s'] * 1e3:.1f} ms + {a['step_token_s'] * 1e6:.1f} us/token; "
             f"max_num_batched_tokens {a['max_num_batched_tokens']}.", "",
             "| KV budget (blocks) | policy | cached prompt share | vs lru | prefill tokens computed | preemptions "
             "| TTFT p50 s | TTFT p99 s | makespan s | scheduler CPU ms/step (measured) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["num_gpu_blocks"]: r for r in doc["results"] if r["policy"] == "lru"}
    for r in doc["results"]:
        b = base.get(r["num_gpu_blocks"])
        ratio = f"{r['cached_prompt_share'] / b['cached_prompt_share']:.2f}x" if b and b["cached_prompt_share"] else "-"
        lines.append(f"| {r['num_gpu_blocks']} | {r['policy']} | {r['cached_prompt_share']:.3f} | {ratio} | "
                     f"{r['prefill_tokens_computed']} | {r['preemptions']} | {r['ttft_p50_s']:.2f} | "
                     f"{r['ttft_p99_s']:.2f} | {r['makespan_s']:.1f} | "
                     + ("-" if r.get("scheduler_ms_per_step") is None else f"{r['scheduler_ms_per_step']:.3f}") + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--model", default="models/llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--max-input-tokens", type=int, default=8192)
    ap.add_argument("--max-output-tokens", type=int, default=64)
    ap.add_argument("--time-scale", type=float, default=1.5)
    ap.add_argument("--budgets", default="2560,4096,8192,16384", help="KV budgets, 16-token blocks")
    ap.add_argument("--policies", default="lru,discard-lru")
    ap.add_argument("--min-users", type=int, default=None, help="discard-lru's threshold (default: the hook's)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--passes", type=int, default=1, help="second-chance: extra passes a kept block gets")
    ap.add_argument("--step-base-s", type=float, default=StepModel.base_s)
    ap.add_argument("--step-token-s", type=float, default=StepModel.token_s)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    import vllm

    requests = build_requests(args.trace, args.num_requests, args.max_input_tokens, args.max_output_tokens,
                              args.time_scale)
    step = StepModel(args.step_base_s, args.step_token_s)
    doc = {**environment(), "gpu": None, "driver": None, "vllm": vllm.__version__, "args": vars(args), "results": [],
           "distinct_blocks": len({h for r in requests for h in r["blocks"]})}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"sched-replay{('-' + args.tag) if args.tag else ''}")
    for budget in (int(b) for b in args.budgets.split(",")):
        for policy in args.policies.split(","):
            r = run(requests, args.model, budget, policy, step, args.min_users, args.max_num_batched_tokens,
                    args.passes)
            doc["results"].append(r)
            print(f"[sched-replay] {json.dumps(r)}", flush=True)
            with open(stem + ".json", "w") as f:
                json.dump(doc, f, indent=1)
    write_markdown(stem, markdown(doc))


if __name__ == "__main__":
    main()
