"""Offline A/B on one prompt set: the same model and dummy weights under stock vLLM and vAttention.

    python3 examples/offline_ab.py --model models/tiny-llama-kv8b --out ab.json

Each system runs in its own process (a fresh engine); the parent compares greedy tokens and the
logprobs of the tokens both chose. Prompt lengths are spread over block boundaries on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    lens = [1, 15, 16, 17, 31, 33, 100, 255, 256, 257, 700, 1025, 2000]
    return [[rng.randrange(3, 500) for _ in range(lens[i % len(lens)] + i // len(lens))] for i in range(n)]


def randomize_weights(worker) -> int:
    """Gaussian weights scaled to keep activations O(1), the same on every system (seeded).

    vLLM's dummy weights are tiny, so every logit is ~0 and every logprob is -log(vocab): a
    comparison of logprobs would then say nothing about attention.
    """
    import torch
    g = torch.Generator(device="cuda").manual_seed(1234)
    model = worker.model_runner.model
    n = 0
    for _, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if p.dim() >= 2:
            p.data.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
                         .mul_(p.shape[-1] ** -0.5).to(p.dtype))
        else:
            p.data.fill_(1.0)
        n += 1
    return n


def close_prompts(n: int, length: int, seed: int = 2) -> list[list[int]]:
    """n prompts of `length` to `length` + 7 tokens: a batch of close lengths, as an offline run of one
    prompt length has (long decode steps' guards then reach only a few slots past each row)."""
    import random
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length + i % 8)] for i in range(n)]


def shared_prefix_prompts(n: int, prefix_len: int = 300, seed: int = 1) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, 500) for _ in range(5 + 7 * i)] for i in range(n)]


def run_one(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    kw = dict(model=args.model, load_format="dummy", seed=0, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching,
              disable_log_stats=False, tensor_parallel_size=args.tensor_parallel_size)
    if args.num_gpu_blocks:
        kw["num_gpu_blocks_override"] = args.num_gpu_blocks
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.attention_backend:
        kw["attention_config"] = {"backend": args.attention_backend}
        if args.flash_attn_version:
            kw["attention_config"]["flash_attn_version"] = args.flash_attn_version
    t = time.time()
    llm = LLM(**kw)
    start = time.time() - t
    llm.collective_rpc(randomize_weights)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=0, ignore_eos=True, n=1)
    ps = (shared_prefix_prompts(args.num_prompts) if args.shared_prefix
          else close_prompts(args.num_prompts, args.close_prompts) if args.close_prompts else prompts(args.num_prompts))
    t = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp)
    gen = time.time() - t
    res = {"start_s": start, "generate_s": gen, "outputs": [],
           "attention_backend": str(llm.llm_engine.vllm_config.attention_config.backend),
           "flash_attn_version": llm.llm_engine.vllm_config.attention_config.flash_attn_version,
           "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs)}
    for o in outs:
        c = o.outputs[0]
        res["outputs"].append({"tokens": list(c.token_ids),
                               "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    if args.parallel_n > 1:  # parallel sampling: n samples share the prompt's blocks
        spn = SamplingParams(temperature=1.0, max_tokens=16, n=args.parallel_n, seed=7, ignore_eos=True)
        outn = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps[:4]], spn)
        res["parallel_n_lengths"] = [[len(c.token_ids) for c in o.outputs] for o in outn]
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    res["num_preemptions"] = metrics.get("vllm:num_preemptions")
    if "CUSTOM" in res["attention_backend"]:  # vAttention's mapper counters (rank 0)
        res["mapper"] = llm.collective_rpc("vattn_report")[0]
    with open(args.child_out, "w") as f:
        json.dump(res, f)


def compare(a: dict, b: dict) -> dict:
    agree = total = 0
    diffs = []
    for x, y in zip(a["outputs"], b["outputs"]):
        for i, (tx, ty) in enumerate(zip(x["tokens"], y["tokens"])):
            total += 1
            if tx != ty:
                break  # after the first divergence the contexts differ
            agree += 1
            diffs.append(abs(x["logprobs"][i] - y["logprobs"][i]))
    diffs.sort()
    return {"greedy_prefix_agreement": agree / max(total, 1), "tokens_compared": len(diffs),
            "logprob_absdiff_max": diffs[-1] if diffs else None,
            "logprob_absdiff_p99": diffs[int(0.99 * (len(diffs) - 1))] if diffs else None,
            "logprob_absdiff_mean": sum(diffs) / len(diffs) if diffs else None}


# vAttention systems selected by environment: the default (mapping waited for by the GPU stream, FA3's
# view clipped, spare frames for one step's blocks; benchmarks/NOTES.md #10, #16, #21, #29), and the
# former default (mapping on the engine thread, a guard page behind every FA3 row), which keeps the
# synchronous path checked end to end
VATTN_SYSTEMS = {
    "vattention": {"VLLM_ATTENTION_BACKEND": "VATTENTION"},
    "vattention-sync": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_BACKGROUND_MAP": "0",
                        "VATTN_FA3_GUARD": "always",
                        # no mapping thread, so nothing to drain: a VATTN_ROW_DRAIN=1 set for the other
                        # vAttention systems of a run would be refused here (ConfigError)
                        "VATTN_ROW_DRAIN": "0"},
    # few spare frames (benchmarks/NOTES.md #23) and no lent ones: rows run out of warm slots, so both paths mix
    "vattention-spare": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_SPARE_BLOCKS": "64", "VATTN_LEND_BLOCKS": "0"},
    # stream mode without spares (the default before NOTES.md #29): every fresh block is mapped
    "vattention-no-spare": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_SPARE_BLOCKS": "0",
                            "VATTN_LEND_BLOCKS": "0"},
    # spares kept in running requests' growth slots (benchmarks/NOTES.md #61)
    "vattention-growth": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_GROWTH_AHEAD": "1"},
    # FA2 in decode-only (CUDA-graph) steps, FA3 for the whole of a mixed batch (benchmarks/NOTES.md #89;
    # the default since #114)
    "vattention-fa2-graphs": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa2-graphs"},
    # the default before #114: FA2 for every one-token query, so two attention ops per layer in a mixed step
    "vattention-fa2-two-ops": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa2"},
    # FA3's scheduler metadata once per step for every layer (benchmarks/NOTES.md #91), with each decode kernel
    "vattention-sched": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA3_SCHEDULE": "1"},
    "vattention-fa2-graphs-sched": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa2-graphs",
                                    "VATTN_FA3_SCHEDULE": "1"},
    # never-used blocks' frames lent as spares (benchmarks/NOTES.md #47); a tight budget hands them out
    "vattention-lend": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_LEND_BLOCKS": "auto"},
    # hazard waits on a host word each step's stream writes, not CUDA events (benchmarks/NOTES.md #124)
    "vattention-value-fence": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FENCE": "value"},
    # a prefix row's stale guard frames left in place (the default before benchmarks/NOTES.md #126)
    "vattention-stale-guards-kept": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_STALE_GUARDS": "0"},
    # every decode-only step runs FA3 over the rows outside a full CUDA graph, its missing guard slots
    # mapped on its path (VATTN_FA3_DECODE_TOKENS at 1 token, no average: the path under test; benchmarks/NOTES.md #128, #130)
    "vattention-fa3-decode": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA3_DECODE_TOKENS": "1",
                              "VATTN_FA3_DECODE_ROW_TOKENS": "0"},
    # the same with 128 spare frames and none lent: 26 rows' whole guards (17 slots each) are over half the
    # spares, their clipped guards (with --close-prompts, one or two slots each) are not, so warm() clips
    # them after each long decode step (benchmarks/NOTES.md #135)
    "vattention-fa3-decode-clipped": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA3_DECODE_TOKENS": "1",
                                      "VATTN_FA3_DECODE_ROW_TOKENS": "0", "VATTN_SPARE_BLOCKS": "128",
                                      "VATTN_LEND_BLOCKS": "0"},
    # FA2 decode over the batch sorted longest first (benchmarks/NOTES.md #138)
    "vattention-fa2-longest-first": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA2_ORDER": "longest-first"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "models", "tiny-llama-kv8b"))
    ap.add_argument("--num-prompts", type=int, default=26)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--systems", default="stock,vattention")
    ap.add_argument("--out", default="ab.json")
    ap.add_argument("--child", default=None)
    ap.add_argument("--child-out", default=None)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--flash-attn-version", type=int, default=None)
    ap.add_argument("--num-gpu-blocks", type=int, default=0, help="KV budget override (forces preemption)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=0,
                    help="vLLM's token budget per step (0: its default); small: prefills chunked beside decodes")
    ap.add_argument("--block-size", type=int, default=0, help="vLLM's block size for every system (0: its default)")
    ap.add_argument("--shared-prefix", action="store_true", help="prompts share a 300-token prefix")
    ap.add_argument("--close-prompts", type=int, default=0,
                    help="prompts of this many tokens to 7 more (0: the default mix of lengths 1 to 2,000)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--parallel-n", type=int, default=1)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        return run_one(args)
    results = {}
    for system in args.systems.split(","):
        # the caller's VATTN_* options apply to every system (e.g. VATTN_LAYOUT=per_layer); a system's own override them
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ATTENTION_BACKEND"}
        extra = []
        if system in VATTN_SYSTEMS:
            env.update(VATTN_SYSTEMS[system])
        elif system == "vattention-flag":
            extra = ["--attention-backend", "CUSTOM"]
        elif system == "stock-fa2":
            # vLLM 0.25 takes the version from attention_config (VLLM_FLASH_ATTN_VERSION is ignored)
            extra = ["--attention-backend", "FLASH_ATTN", "--flash-attn-version", "2"]
        child_out = f"{args.out}.{system}.json"
        cmd = [sys.executable, __file__, "--child", system, "--child-out", child_out, "--model", args.model,
               "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens),
               "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + extra
        for flag in ("enforce_eager", "shared_prefix", "no_prefix_caching"):
            if getattr(args, flag):
                cmd.append("--" + flag.replace("_", "-"))
        cmd += ["--num-gpu-blocks", str(args.num_gpu_blocks), "--block-size", str(args.block_size),
                "--close-prompts", str(args.close_prompts),
                "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                "--parallel-n", str(args.parallel_n), "--tensor-parallel-size", str(args.tensor_parallel_size)]
        print("running", system, flush=True)
        subprocess.run(cmd, env=env, check=True)
        results[system] = json.load(open(child_out))
    names = list(results)
    summary = {n: {k: v for k, v in results[n].items() if k != "outputs"} for n in names}
    for other in names[1:]:
        summary[f"{names[0]}_vs_{other}"] = compare(results[names[0]], results[other])
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
