"""The multi-turn replay's pure parts (CPU): prompts built from block hashes share exactly the
token prefixes their hashes share, lengths and caps follow the trace, and the prefix-cache
counters are read from vLLM's Prometheus text."""

import json

import pytest

from vllm_vattention.bench import multiturn as M


def write_trace(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_prompts_share_token_prefixes_exactly_where_hashes_do(tmp_path):
    p = tmp_path / "t.jsonl"
    write_trace(p, [
        {"timestamp": 0, "input_length": 1100, "output_length": 50, "hash_ids": [0, 1, 2]},
        {"timestamp": 2000, "input_length": 1600, "output_length": 500, "hash_ids": [0, 1, 5, 6]},
        {"timestamp": 3000, "input_length": 5000, "output_length": 10, "hash_ids": [0, 7, 8, 9, 10, 11, 12, 13, 14, 15]},
    ])
    reqs = M.build_requests(str(p), 10, max_input_tokens=2048, max_output_tokens=64, time_scale=2.0)
    a, b, c = (r["prompt"] for r in reqs)
    assert len(a) == 1100 and len(b) == 1600 and len(c) == 2048  # c is cut to 4 whole blocks
    assert a[:1024] == b[:1024] and a[1024:1100] != b[1024:1100]  # blocks 0, 1 shared; 2 vs 5 differ
    assert c[:512] == a[:512] and c[512:1024] != a[512:1024]
    assert [r["t"] for r in reqs] == [0.0, 1.0, 1.5]
    assert [r["max_tokens"] for r in reqs] == [50, 64, 10]
    assert reqs[2]["blocks"] == [0, 7, 8, 9]
    assert all(M.VOCAB_LOW <= t < M.VOCAB_HIGH for t in a)


def test_prefix_counters_from_prometheus_text():
    text = """# HELP vllm:prefix_cache_hits_total Prefix cache hits, in tokens.
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1536.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 4096.0
vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 2048.0
vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 512.0
vllm:request_prefill_kv_computed_tokens_sum{engine="0",model_name="m"} 1536.0
vllm:request_prefill_kv_computed_tokens_count{engine="0",model_name="m"} 2.0
"""
    c = M.counters(text)
    assert (c["prefix_hits"], c["prefix_queries"], c["preemptions"]) == (1536.0, 4096.0, 3.0)
    assert (c["prompt_tokens"], c["prompt_tokens_cached"], c["prefill_kv_computed"]) == (2048.0, 512.0, 1536.0)
    assert set(M.counters("").values()) == {0.0}


def _doc(system, gpu, **args):
    base = {"trace": "t.jsonl", "num_requests": 10, "max_input_tokens": 1024, "max_output_tokens": 8,
            "time_scale": 1.0, "num_gpu_blocks": 64, "systems": system, "port": 1, "out": "o", "tag": "", "merge": None}
    return {"date": "2026-11-27", "gpu": "G", "driver": "1", "torch": "t", "vllm": "0.25.0", "commit": "c",
            "trace": "t.jsonl", "distinct_blocks": 4, "kv_share_of_working_set": 0.5, "args": {**base, **args},
            "results": [{"system": system, "cuda_visible_devices": gpu, "prefix_hit_rate": 0.1, "ttft_p50_ms": 1.0,
                         "ttft_p99_ms": 2.0, "requests_per_s": 3.0, "errors": 0}]}


def test_merge_runs_of_one_replay_and_refuse_different_ones(tmp_path):
    doc = M.merge([_doc("lru", "0", port=1), _doc("discard-lru", "1", port=2)])
    assert [r["system"] for r in doc["results"]] == ["lru", "discard-lru"] and doc["args"]["systems"] == "lru,discard-lru"
    M.write_report(str(tmp_path / "r"), doc)
    md = (tmp_path / "r.md").read_text()
    assert "| lru | 0 | 0.100 |" in md and "| discard-lru | 1 | 0.100 |" in md
    with pytest.raises(ValueError, match="different replays"):
        M.merge([_doc("lru", "0"), _doc("discard-lru", "1", num_gpu_blocks=128)])


def test_replay_streams_every_request_without_a_client_side_connection_cap():
    # 150 requests arrive at once at a stand-in server that holds every stream open until all 150 are
    # in (at most 10 s): aiohttp's default pool of 100 would hold 50 back and skew their TTFT
    import asyncio

    from aiohttp import web

    from vllm_vattention.bench.multiturn import _replay

    state = {"inflight": 0, "max": 0, "bodies": []}
    everyone = asyncio.Event()

    async def completions(request):
        state["bodies"].append(await request.json())
        state["inflight"] += 1
        state["max"] = max(state["max"], state["inflight"])
        if state["inflight"] == 150:
            everyone.set()
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            await asyncio.wait_for(everyone.wait(), 10)
        except asyncio.TimeoutError:
            pass
        await resp.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        state["inflight"] -= 1
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            reqs = [{"t": 0.0, "prompt": [1, 2, 3], "max_tokens": 4} for _ in range(150)]
            return await _replay(port, "m", reqs)
        finally:
            await runner.cleanup()

    res = asyncio.run(main())
    assert len(res) == 150 and all(r["ttft_s"] is not None for r in res)
    assert state["max"] == 150
    assert all(b["stream"] and b["ignore_eos"] and b["max_tokens"] == 4 for b in state["bodies"])
