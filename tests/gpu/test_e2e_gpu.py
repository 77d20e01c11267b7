"""End to end on the GPU: vLLM with vAttention against stock vLLM, each in a fresh engine
(examples/offline_ab.py runs each system in its own process with the same seeded weights)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AB = os.path.join(ROOT, "examples", "offline_ab.py")


def run_ab(tmp_path, *flags, **vattn_env):
    out = tmp_path / "ab.json"
    # collective_rpc ships randomize_weights (a function) to the engine process by pickle.
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **vattn_env}
    env.pop("VLLM_ATTENTION_BACKEND", None)
    subprocess.run([sys.executable, AB, "--out", str(out), *flags], check=True, env=env, timeout=900)
    return json.load(open(out))


def test_logprobs_match_stock_within_the_fa2_fa3_spread(cuda, tmp_path):
    """CUDA graphs on (vLLM's default). Prompts of lengths on and off 16-token block boundaries. The
    default configuration (stream mode, clipped FA3 view) and the former one (synchronous mapping,
    a guard page behind every FA3 row)."""
    s = run_ab(tmp_path, "--systems", "stock,stock-fa2,vattention,vattention-sync", "--num-prompts", "26",
               "--max-tokens", "32")
    assert "CUSTOM" not in s["stock"]["attention_backend"]
    assert s["stock-fa2"]["flash_attn_version"] == 2  # the spread really is FA2 against FA3
    spread = s["stock_vs_stock-fa2"]
    for system in ("vattention", "vattention-sync"):
        assert "CUSTOM" in s[system]["attention_backend"]
        ours = s[f"stock_vs_{system}"]
        print(json.dumps({"system": system, "fa2_vs_fa3_spread": spread, "stock_vs_ours": ours}, indent=1))
        assert ours["tokens_compared"] >= 26
        tol = max(2 * spread["logprob_absdiff_max"], 1e-2)
        assert ours["logprob_absdiff_max"] <= tol, (system, ours, spread)
        assert ours["greedy_prefix_agreement"] >= min(spread["greedy_prefix_agreement"], 0.9), system


def test_long_decode_steps_in_fa3_outside_full_graphs_match_stock(cuda, tmp_path):
    """VATTN_FA3_DECODE_TOKENS (NOTES #128, #129) at 1 token, CUDA graphs on: every decode-only step is
    dispatched to vLLM's piecewise graph and runs FA3 over the rows, its view clipped to the longest
    row, the guard slots not in place mapped on its path. Every such step took the FA3 path, and the
    output is stock's within the FA2/FA3 spread."""
    s = run_ab(tmp_path, "--systems", "stock,stock-fa2,vattention-fa3-decode", "--num-prompts", "26",
               "--max-tokens", "32")
    spread, ours = s["stock_vs_stock-fa2"], s["stock_vs_vattention-fa3-decode"]
    print(json.dumps({"fa2_vs_fa3_spread": spread, "stock_vs_ours": ours}, indent=1))
    assert ours["tokens_compared"] >= 26
    assert ours["logprob_absdiff_max"] <= max(2 * spread["logprob_absdiff_max"], 1e-2), (ours, spread)
    assert ours["greedy_prefix_agreement"] >= min(spread["greedy_prefix_agreement"], 0.9)
    m = s["vattention-fa3-decode"]["mapper"]
    assert m["long_decode_steps_fa3"] > 0 and m["long_decode_steps_fa2"] == 0, m


def test_long_decode_steps_with_clipped_guards_match_stock(cuda, tmp_path):
    """VATTN_FA3_DECODE_TOKENS at 1 token with 128 spares and prompts of close lengths (NOTES #135): whole
    guards are over their share of the spares, so after each long decode step warm() extends every
    row's guard only up to the longest row's end, with spares in the background. The steps all ran FA3,
    warm() clipped the guards, and the output is stock's within the FA2/FA3 spread."""
    s = run_ab(tmp_path, "--systems", "stock,stock-fa2,vattention-fa3-decode-clipped", "--num-prompts", "26",
               "--max-tokens", "32", "--close-prompts", "704")
    spread, ours = s["stock_vs_stock-fa2"], s["stock_vs_vattention-fa3-decode-clipped"]
    m = s["vattention-fa3-decode-clipped"]["mapper"]
    print(json.dumps({"fa2_vs_fa3_spread": spread, "stock_vs_ours": ours,
                      "mapper": {k: m.get(k) for k in ("long_decode_steps_fa3", "long_decode_steps_fa2",
                                                       "warm_guards_clipped", "guard_ahead_maps", "hazard_waits")}},
                     indent=1))
    assert ours["tokens_compared"] >= 26
    assert ours["logprob_absdiff_max"] <= max(2 * spread["logprob_absdiff_max"], 1e-2), (ours, spread)
    assert ours["greedy_prefix_agreement"] >= min(spread["greedy_prefix_agreement"], 0.9)
    assert m["long_decode_steps_fa3"] > 0 and m["long_decode_steps_fa2"] == 0, m
    assert m["warm_guards_clipped"] > 0 and m["guard_ahead_maps"] > 0, m


def test_fa2_longest_first_matches_stock(cuda, tmp_path):
    """VATTN_FA2_ORDER=longest-first (NOTES #138): decode-only steps replay full CUDA graphs that gather
    each layer's queries into the step's order (sorted by length before the replay, into the buffers the
    graph was captured over) and scatter FA2's output back; prompts of different lengths, so the order
    is not vLLM's. The output is stock's within the FA2/FA3 spread."""
    s = run_ab(tmp_path, "--systems", "stock,stock-fa2,vattention-fa2-longest-first", "--num-prompts", "26",
               "--max-tokens", "32")
    spread, ours = s["stock_vs_stock-fa2"], s["stock_vs_vattention-fa2-longest-first"]
    print(json.dumps({"fa2_vs_fa3_spread": spread, "stock_vs_ours": ours}, indent=1))
    assert "CUSTOM" in s["vattention-fa2-longest-first"]["attention_backend"]
    assert ours["tokens_compared"] >= 26
    assert ours["logprob_absdiff_max"] <= max(2 * spread["logprob_absdiff_max"], 1e-2), (ours, spread)
    assert ours["greedy_prefix_agreement"] >= min(spread["greedy_prefix_agreement"], 0.9)


# fa2-graphs (the default since NOTES.md #114), the former default's two ops per layer (VATTN_DECODE_KERNEL=fa2),
# and the default with VATTN_FA3_SCHEDULE=1
MIXED_SYSTEMS = ("vattention-fa2-graphs", "vattention-fa2-two-ops", "vattention-sched")


def test_mixed_steps_fa2_graphs_and_fa3_schedule_match_stock_within_the_fa2_fa3_spread(cuda, tmp_path):
    """VATTN_DECODE_KERNEL=fa2-graphs (NOTES.md #89), fa2 and VATTN_FA3_SCHEDULE=1 (#91) with CUDA
    graphs on: at most 8 requests at once and 256 tokens a step, so later prompts' prefill chunks
    share steps with earlier requests' decodes (with fa2-graphs those run FA3 over guarded rows, or
    FA2 where a row's guard is not in place yet; with fa2 always FA2; with the schedule every
    layer's FA3 call takes the metadata the step computed once); decode-only steps replay FA2 graphs."""
    s = run_ab(tmp_path, "--systems", ",".join(("stock", "stock-fa2") + MIXED_SYSTEMS), "--num-prompts", "26",
               "--max-tokens", "32", "--max-num-seqs", "8", "--max-num-batched-tokens", "256")
    spread = s["stock_vs_stock-fa2"]
    for system in MIXED_SYSTEMS:
        ours = s[f"stock_vs_{system}"]
        print(json.dumps({"system": system, "fa2_vs_fa3_spread": spread, "stock_vs_ours": ours}, indent=1))
        assert "CUSTOM" in s[system]["attention_backend"]
        assert ours["tokens_compared"] >= 26
        assert ours["logprob_absdiff_max"] <= max(2 * spread["logprob_absdiff_max"], 1e-2), (system, ours, spread)
        assert ours["greedy_prefix_agreement"] >= min(spread["greedy_prefix_agreement"], 0.9), system
        if system != "vattention-fa2-two-ops":  # (fa2-graphs, the default: vattention-sched too)
            # the one-launch rule ran under the comparison (NOTES #110: FA3 over guarded decode rows;
            # fa2's two launches where a row's guard was not in place yet are the default's path)
            m = s[system]["mapper"]
            assert m["mixed_steps_one_launch"] > 0, m
        else:  # fa2 never runs a mixed step as one launch (its decodes are FA2's)
            assert s[system]["mapper"]["mixed_steps_one_launch"] == 0


@pytest.mark.parametrize("system", ["vattention-flag", "vattention-sync"])
def test_preemption_under_memory_pressure_completes_every_request(cuda, tmp_path, system):
    """A KV budget of 80 blocks (1,280 tokens at the default layout's 16-token blocks) for 10 requests
    of 1-257 prompt tokens + 64 (1,621 tokens in all). Under VATTN_LAYOUT=per_layer a block holds
    1,024 tokens, so 80 blocks hold every request and nothing is preempted (NOTES #117)."""
    s = run_ab(tmp_path, "--systems", system, "--num-prompts", "10", "--max-tokens", "64",
               "--num-gpu-blocks", "80", "--max-model-len", "1024", "--enforce-eager")
    r = s[system]
    assert "CUSTOM" in r["attention_backend"]  # vattention-flag: selected by --attention-backend CUSTOM alone
    out = json.load(open(tmp_path / f"ab.json.{system}.json"))
    assert all(len(o["tokens"]) == 64 for o in out["outputs"])
    assert r["num_preemptions"] and r["num_preemptions"] > 0, r


# offline_ab's first 10 prompts (1-700 tokens) + 1,100 out in a budget of three 1,024-token blocks: vLLM's
# scheduler preempts 5 times on the CPU (tests/test_scheduler_in_the_loop.py -k per_layer_preemption)
PER_LAYER_PREEMPTION = ("--num-prompts", "10", "--max-tokens", "1100", "--num-gpu-blocks", "3",
                        "--max-model-len", "2048", "--enforce-eager")


def test_per_layer_preemption_under_memory_pressure_completes_every_request(cuda, tmp_path):
    """VATTN_LAYOUT=per_layer (a block is one 2 MiB page per layer and K/V: 1,024 tokens for this
    model) under a budget in its own blocks: requests grow past a block, so running ones are preempted
    and recomputed into rows whose pages were unmapped and mapped again; every request completes."""
    s = run_ab(tmp_path, "--systems", "vattention", *PER_LAYER_PREEMPTION, VATTN_LAYOUT="per_layer")
    r = s["vattention"]
    assert "CUSTOM" in r["attention_backend"]
    m = r["mapper"]
    assert m["block_size"] == 1024, m  # (the interleaved layout's blocks hold 16 tokens of this model)
    out = json.load(open(tmp_path / "ab.json.vattention.json"))
    assert [len(o["tokens"]) for o in out["outputs"]] == [1100] * 10
    assert r["num_preemptions"] and r["num_preemptions"] > 0, r


@pytest.mark.parametrize("system", ["vattention", "vattention-spare", "vattention-no-spare", "vattention-growth",
                                    "vattention-value-fence", "vattention-stale-guards-kept"])
def test_prefix_caching_and_parallel_sampling(cuda, tmp_path, system):
    """Shared prefixes and n=3 sampling share blocks between requests. With spare frames (the
    default: one step's blocks, 16384 batched tokens / 16-token blocks = 1024, capped at 2% of the
    KV budget; vattention-spare: 64) fresh blocks move into spare frames, prefix hits must not (their content
    would be lost); vattention-no-spare maps every fresh block; vattention-growth also keeps a spare
    in each running request's next slot. Prefix hits take the rows that still map them, so the
    default replaces those rows' stale guard frames (NOTES #126; vattention-stale-guards-kept: not),
    and vattention-value-fence waits for steps in flight on host words (NOTES #124)."""
    s = run_ab(tmp_path, "--systems", f"stock,{system}", "--num-prompts", "8", "--max-tokens", "16",
               "--shared-prefix", "--parallel-n", "3", "--enforce-eager")
    assert s[system]["cached_tokens"] > 0
    assert s[system]["cached_tokens"] == s["stock"]["cached_tokens"]
    assert s[system]["parallel_n_lengths"] == [[16, 16, 16]] * 4
    assert s[f"stock_vs_{system}"]["greedy_prefix_agreement"] >= 0.9
    m = s[system]["mapper"]
    # the pool's spare frames are the dedicated ones and the frames of lent blocks not yet handed out
    # (the default lends, NOTES.md #58; the other two systems do not)
    dedicated = m["spare_frames"] - m["lent_blocks"]
    # auto: one step's blocks, at most 2% of the budget's (0.5 of an H200's memory: the cap, ~700)
    auto = min(1024, int(0.02 * (m["num_blocks"] + dedicated)))
    spares = {"vattention-spare": 64, "vattention-no-spare": 0}.get(system, auto)
    assert dedicated == spares, m
    assert (m["lent_blocks"] + m["lent_taken"] > 0) == (system not in ("vattention-spare", "vattention-no-spare")), m
    assert (m["swaps"] > 0) == (spares > 0), m  # the spare path ran, or not
    if system != "vattention-growth":  # (with it, FA3's guard spares may already fill the growth slots here)
        assert m["growth_maps"] == 0, m


def test_32_token_blocks_match_stock_at_the_same_block_size(cuda, tmp_path):
    """--block-size 32 (README's throughput option: one 4 MiB allocation per block for this KV
    shape) against stock FA3 at 32 too: prefix hits as stock's, greedy output as stock's. (A tight
    budget with 32-token blocks, preemptions included, is checked on the CPU:
    test_scheduler_in_the_loop.py -k 32_token.)"""
    s = run_ab(tmp_path, "--systems", "stock,vattention", "--num-prompts", "8", "--max-tokens", "32",
               "--shared-prefix", "--block-size", "32")
    m = s["vattention"]["mapper"]
    assert m["block_size"] == 32 and m["pages_per_block"] == 2, m
    assert s["vattention"]["cached_tokens"] == s["stock"]["cached_tokens"] > 0
    assert s["stock_vs_vattention"]["greedy_prefix_agreement"] >= 0.9, s["stock_vs_vattention"]


def test_lent_blocks_handed_out_under_a_tight_budget_read_their_own_kv(cuda, tmp_path):
    """VATTN_LEND_BLOCKS=auto (at most a quarter of a 120-block budget: 30 blocks, the highest ids,
    lent after start-up; 4 sequences at once keep vLLM's warm-up requests on the lowest ids): 11
    requests (offline_ab's lengths 1 to 700, + 64 out) need 154 blocks, more than the 120 there are,
    so vLLM, which hands never-used blocks out first, hands every lent block out (each takes a spare
    frame), and greedy output agrees with stock's under the same budget. (10 requests need 106 blocks:
    on an H100 vLLM then handed out 8 of the 30 lent blocks, not all.)"""
    s = run_ab(tmp_path, "--systems", "stock,vattention-lend", "--num-prompts", "11", "--max-tokens", "64",
               "--num-gpu-blocks", "120", "--max-model-len", "1024", "--max-num-seqs", "4", "--enforce-eager")
    r = s["vattention-lend"]
    assert "CUSTOM" in r["attention_backend"]
    out = json.load(open(tmp_path / "ab.json.vattention-lend.json"))
    assert all(len(o["tokens"]) == 64 for o in out["outputs"])
    m = r["mapper"]
    assert m["lent_taken"] > 0 and m["lent_blocks"] == 0, m  # every lent block was handed out
    assert s["stock_vs_vattention-lend"]["greedy_prefix_agreement"] >= 0.9, s["stock_vs_vattention-lend"]
