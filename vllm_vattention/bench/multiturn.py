"""Multi-turn serving workload from a prefix-hash trace (Mooncake format): prefix hit rate and TTFT.

    python3 -m vllm_vattention.bench.multiturn --trace ../shared/traces/mooncake_conversation_trace.jsonl \\
        --model models/llama-3.1-8b --systems lru,discard-lru --num-requests 800 --out benchmarks/results

Each trace request becomes a prompt of token ids: block hash h always expands to the same 512
tokens (drawn from a generator seeded by h), so requests that share hash prefixes share token
prefixes and vLLM's prefix cache sees the trace's reuse. Prompts are cut to `--max-input-tokens`
whole blocks; arrivals keep the trace's order and gaps, compressed by `--time-scale`. For each
system a fresh `vllm serve` (prefix caching on, KV budget set with `--num-gpu-blocks`) replays the
same requests with streaming completions; reported: prefix cache hit rate (from the server's
Prometheus counters), TTFT p50/p99, request throughput. Systems: `lru` (vLLM's eviction order) and
`discard-lru` (VATTN_PREFIX_EVICTION=discard-lru), each optionally with vAttention (`+vattn`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time

from ..evict.trace import BLOCK_TOKENS, load_jsonl
from .env import engine_env, environment, header, nearest_rank, results_stem, write_markdown

VOCAB_LOW, VOCAB_HIGH = 1000, 30000


def block_tokens(h: int, n: int = BLOCK_TOKENS) -> list[int]:
    """The tokens of block hash h (its first n of BLOCK_TOKENS): the same for every request."""
    rng = random.Random(h * 1_000_003 + 17)
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(BLOCK_TOKENS)][:n]


def build_requests(trace_path: str, num_requests: int, max_input_tokens: int, max_output_tokens: int,
                   time_scale: float) -> list[dict]:
    """[{"t": seconds after start, "prompt": token ids, "max_tokens": n, "blocks": hash ids used}]."""
    out = []
    reqs = load_jsonl(trace_path, num_requests)
    t0 = reqs[0].t_ms if reqs else 0
    max_blocks = max(1, max_input_tokens // BLOCK_TOKENS)
    for r in reqs:
        blocks = r.blocks[:max_blocks]
        last = r.input_len - BLOCK_TOKENS * (len(r.blocks) - 1) if len(blocks) == len(r.blocks) else BLOCK_TOKENS
        prompt = []
        for j, h in enumerate(blocks):
            prompt += block_tokens(h, last if j == len(blocks) - 1 else BLOCK_TOKENS)
        out.append({"t": (r.t_ms - t0) / 1000.0 / time_scale, "prompt": prompt,
                    "max_tokens": max(1, min(r.output_len, max_output_tokens)), "blocks": blocks})
    return out


COUNTERS = {  # our name: vLLM's Prometheus counter (summed over label sets)
    "prefix_hits": "vllm:prefix_cache_hits_total",  # tokens, counted at every scheduling attempt
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "prompt_tokens": "vllm:prompt_tokens_total",  # per request, once
    "prompt_tokens_cached": "vllm:prompt_tokens_cached_total",
    "preemptions": "vllm:num_preemptions_total",
    "prefill_kv_computed": "vllm:request_prefill_kv_computed_tokens_sum",  # new KV, cached excluded
}


def counters(metrics_text: str) -> dict[str, float]:
    """vLLM's counters (COUNTERS) from its /metrics text; 0 where absent."""
    def total(name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", metrics_text, re.M))
    return {k: total(v) for k, v in COUNTERS.items()}


async def _replay(port: int, model: str, requests: list[dict]) -> list[dict]:
    import asyncio

    import aiohttp
    url = f"http://127.0.0.1:{port}/v1/completions"
    results: list[dict] = []

    async def one(session, req):
        await asyncio.sleep(req["t"])
        body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "stream": True,
                "ignore_eos": True, "temperature": 0.0}
        start = time.perf_counter()
        ttft = None
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                results.append({"error": resp.status})
                return
            async for line in resp.content:
                if ttft is None and line.startswith(b"data: ") and b"[DONE]" not in line:
                    ttft = time.perf_counter() - start
        results.append({"ttft_s": ttft, "latency_s": time.perf_counter() - start})

    async def progress():
        t0 = time.perf_counter()
        while True:
            await asyncio.sleep(20)
            print(f"[multiturn]   {len(results)}/{len(requests)} done after {time.perf_counter() - t0:.0f} s", flush=True)

    timeout = aiohttp.ClientTimeout(total=None)
    # limit=0: aiohttp's default pool of 100 connections would hold later arrivals back on the client
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        ticker = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(one(session, r) for r in requests))
        finally:
            ticker.cancel()
    return results


def _get(port: int, path: str) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def run_system(system: str, args, requests: list[dict]) -> dict:
    import asyncio

    from .suite import RunningServer
    policy, _, backend = system.partition("+")
    overrides = {"VATTN_PREFIX_EVICTION": policy, **({"VLLM_ATTENTION_BACKEND": "VATTENTION"} if backend == "vattn" else {})}
    env = engine_env(overrides, ("VLLM_ATTENTION_BACKEND", "VATTN_PREFIX_EVICTION"))
    port = args.port
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--load-format", "dummy",
           "--port", str(port), "--max-model-len", str(args.max_input_tokens + args.max_output_tokens + 64),
           "--enable-prefix-caching", "--num-gpu-blocks-override", str(args.num_gpu_blocks)]
    os.makedirs(args.out, exist_ok=True)
    with RunningServer(cmd, env, port, 600, os.path.join(args.out, f"server-{system}.log")) as server:
        c0 = counters(_get(port, "/metrics"))
        t = time.perf_counter()
        res = asyncio.run(_replay(port, args.model, requests))
        elapsed = time.perf_counter() - t
        c1 = counters(_get(port, "/metrics"))
        d = {k: c1[k] - c0[k] for k in COUNTERS}
    log = server.log
    from ..prefix_eviction import ACTIVE_LOG
    if (f"{ACTIVE_LOG} {policy}" in log) != (policy != "lru"):
        raise RuntimeError(f"{system}: the server's log does not show prefix eviction {policy!r} "
                           f"as {'active' if policy != 'lru' else 'inactive'}:\n{log[-2000:]}")
    ok = [r for r in res if r.get("ttft_s") is not None]
    ttfts = sorted(r["ttft_s"] * 1e3 for r in ok)
    return {"system": system, "requests": len(requests), "completed": len(ok),
            "errors": len(res) - len(ok),
            # per scheduling attempt (a request that waits or is preempted queries again)
            "prefix_hit_rate": d["prefix_hits"] / d["prefix_queries"] if d["prefix_queries"] else None,
            # per request: share of the prompts' tokens served from the cache
            "cached_prompt_share": d["prompt_tokens_cached"] / d["prompt_tokens"] if d["prompt_tokens"] else None,
            "prefix_hit_tokens": d["prefix_hits"], "prefix_query_tokens": d["prefix_queries"],
            "prompt_tokens": d["prompt_tokens"], "prompt_tokens_cached": d["prompt_tokens_cached"],
            "prefill_kv_computed_tokens": d["prefill_kv_computed"], "preemptions": d["preemptions"],
            "ttft_p50_ms": statistics.median(ttfts) if ttfts else None,
            "ttft_p99_ms": nearest_rank(ttfts, 0.99) if ttfts else None,
            "requests_per_s": len(ok) / elapsed, "elapsed_s": elapsed,
            "backend_log_tail": log[-1500:] if len(ok) < len(requests) else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace")
    ap.add_argument("--model", default="models/llama-3.1-8b")
    ap.add_argument("--systems", default="lru,discard-lru")
    ap.add_argument("--num-requests", type=int, default=800)
    ap.add_argument("--max-input-tokens", type=int, default=8192)
    ap.add_argument("--max-output-tokens", type=int, default=64)
    ap.add_argument("--time-scale", type=float, default=3.0, help="trace seconds per replay second")
    ap.add_argument("--num-gpu-blocks", type=int, default=4096, help="KV budget (16-token blocks)")
    ap.add_argument("--port", type=int, default=8191)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="appended to the results file's name")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine results files of the same replay (e.g. one per GPU) into one report")
    args = ap.parse_args(argv)
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        doc = merge([json.load(open(p)) for p in args.merge])
        write_report(_stem(args.out, doc, args.tag), doc)
        return
    if not args.trace:
        ap.error("--trace is required (or --merge)")
    requests = build_requests(args.trace, args.num_requests, args.max_input_tokens, args.max_output_tokens,
                              args.time_scale)
    distinct = len({h for r in requests for h in r["blocks"]})
    doc = {**env, "trace": os.path.basename(args.trace), "args": vars(args), "distinct_blocks": distinct,
           "kv_share_of_working_set": args.num_gpu_blocks * 16 / (distinct * BLOCK_TOKENS), "results": []}
    stem = _stem(args.out, doc, args.tag)
    for system in args.systems.split(","):
        print(f"[multiturn] {system} ...", flush=True)
        row = run_system(system, args, requests)
        row["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        doc["results"].append(row)
        print(f"[multiturn]   {json.dumps({k: v for k, v in row.items() if k != 'backend_log_tail'})}", flush=True)
        write_report(stem, doc)  # after every system: a cut-off call keeps what ran


# arguments that may differ between runs of one replay
_RUN_ARGS = ("systems", "port", "out", "tag", "merge")


def merge(docs: list[dict]) -> dict:
    """One document from several runs of the same replay (same trace, requests, budget and GPU model)."""
    def same(d):
        return ({k: v for k, v in d["args"].items() if k not in _RUN_ARGS}, d["gpu"], d["trace"])
    for d in docs[1:]:
        if same(d) != same(docs[0]):
            raise ValueError(f"cannot merge different replays: {same(d)} vs {same(docs[0])}")
    out = {**docs[0], "results": [r for d in docs for r in d["results"]]}
    out["commit"] = ",".join(dict.fromkeys(d["commit"] for d in docs))
    out["args"] = {**docs[0]["args"], "systems": ",".join(dict.fromkeys(r["system"] for r in out["results"]))}
    return out


def _stem(out_dir: str, doc: dict, tag: str) -> str:
    return results_stem(out_dir, doc, "-multiturn" + (f"-{tag}" if tag else ""))


def write_report(stem: str, doc: dict) -> None:
    args = doc["args"]
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    env = {k: doc.get(k) for k in ("gpu", "driver", "torch", "vllm", "commit", "date")}
    lines = ["# Multi-turn replay: prefix-cache eviction order", "", header(env), "",
             f"Trace `{doc['trace']}`, first {args['num_requests']} requests, prompts cut to "
             f"{args['max_input_tokens']} tokens, KV budget {args['num_gpu_blocks']} blocks = "
             f"{100 * doc['kv_share_of_working_set']:.1f}% of the {doc['distinct_blocks']} distinct 512-token blocks "
             f"replayed, time x{args['time_scale']}." + (f" {doc['placement']}." if doc.get("placement") else ""), "",
             "| system | GPU | prefix hit rate (per query) | cached prompt share | prefill tokens computed | preemptions "
             "| TTFT p50 ms | TTFT p99 ms | req/s | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(f"| {r['system']} | {r.get('cuda_visible_devices') or '-'} | {fmt(r['prefix_hit_rate'], '{:.3f}')} | "
                     f"{fmt(r.get('cached_prompt_share'), '{:.3f}')} | "
                     f"{fmt(r.get('prefill_kv_computed_tokens'), '{:.0f}')} | {fmt(r.get('preemptions'), '{:.0f}')} | "
                     f"{fmt(r['ttft_p50_ms'], '{:.1f}')} | "
                     f"{fmt(r['ttft_p99_ms'], '{:.1f}')} | {r['requests_per_s']:.2f} | {r['errors']} |")
    write_markdown(stem, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
