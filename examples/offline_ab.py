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


def run_one(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    kw = dict(model=args.model, load_format="dummy", seed=0, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              max_num_seqs=args.max_num_seqs)
    if args.attention_backend:
        kw["attention_config"] = {"backend": args.attention_backend}
    t = time.time()
    llm = LLM(**kw)
    start = time.time() - t
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=0, ignore_eos=True)
    t = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts(args.num_prompts)], sp)
    gen = time.time() - t
    res = {"start_s": start, "generate_s": gen, "outputs": []}
    for o in outs:
        c = o.outputs[0]
        res["outputs"].append({"tokens": list(c.token_ids),
                               "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
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
    args = ap.parse_args()
    if args.child:
        return run_one(args)
    results = {}
    for system in args.systems.split(","):
        env = dict(os.environ)
        env.pop("VLLM_ATTENTION_BACKEND", None)
        extra = []
        if system == "vattention":
            env["VLLM_ATTENTION_BACKEND"] = "VATTENTION"
        elif system == "vattention-flag":
            extra = ["--attention-backend", "CUSTOM"]
        elif system == "stock-fa2":
            extra = ["--attention-backend", "FLASH_ATTN"]
            env["VLLM_FLASH_ATTN_VERSION"] = "2"
        child_out = f"{args.out}.{system}.json"
        cmd = [sys.executable, __file__, "--child", system, "--child-out", child_out, "--model", args.model,
               "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens),
               "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + extra
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        print("running", system, flush=True)
        subprocess.run(cmd, env=env, check=True)
        results[system] = json.load(open(child_out))
    names = list(results)
    summary = {n: {"start_s": results[n]["start_s"], "generate_s": results[n]["generate_s"]} for n in names}
    for other in names[1:]:
        summary[f"{names[0]}_vs_{other}"] = compare(results[names[0]], results[other])
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
