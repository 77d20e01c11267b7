"""Where a step's time goes: GPU kernel time by kernel, GPU busy share and wall time per step.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 -m vllm_vattention.bench.profile --out prof.json [--system vattn]

The engine runs in this process (so torch.profiler sees its kernels) and is stepped by hand. For
each phase (decode at short and long context, prefill), requests are added, the engine is stepped
until the phase's steady state, then `--steps` steps are profiled. Reported per phase: wall ms per
step, GPU kernel ms per step, their ratio (GPU busy share), the attention kernels' share of kernel
time, and the top kernels. Stock and vAttention are run one after the other by the caller.
"""

from __future__ import annotations

import argparse
import json
import random
import time

PHASES = [  # name, prompts, input_len, steps before profiling
    ("decode-256x512", 256, 512, 40),
    ("decode-24x16k", 24, 16384, 30),
    ("prefill-8x8k", 8, 8192, 0),
]
ATTENTION_MARKERS = ("flash", "fmha", "attn", "Flash")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/llama-3.1-8b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, load_format="dummy", seed=0, max_model_len=16384 + 1024 + 64)
    engine = llm.llm_engine
    backend = str(engine.vllm_config.attention_config.backend)
    rng = random.Random(0)
    report = {"attention_backend": backend, "phases": []}
    for name, n, in_len, warm in PHASES:
        sp = SamplingParams(max_tokens=1024, ignore_eos=True, temperature=1.0)
        ids = [engine.add_request(f"{name}-{i}", TokensPrompt(
            prompt_token_ids=[rng.randrange(10, 30000) for _ in range(in_len)]), sp) for i in range(n)]
        for _ in range(warm):
            engine.step()
        torch.cuda.synchronize()
        steps = args.steps if warm else 6
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        kernels = {}
        for e in prof.key_averages():
            dt = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if dt > 0:
                kernels[e.key] = kernels.get(e.key, 0.0) + dt / 1e3  # ms
        total = sum(kernels.values())
        attn = sum(v for k, v in kernels.items() if any(m in k for m in ATTENTION_MARKERS))
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
        phase = {"phase": name, "steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
                 "gpu_ms_per_step": total / steps, "gpu_busy": total / (1e3 * wall),
                 "attention_ms_per_step": attn / steps, "attention_share_of_gpu": attn / total if total else None,
                 "top_kernels_ms_per_step": [(k[:120], round(v / steps, 4)) for k, v in top]}
        report["phases"].append(phase)
        print(json.dumps({k: v for k, v in phase.items() if k != "top_kernels_ms_per_step"}), flush=True)
        engine.abort_request(ids, internal=True)
        for _ in range(3):
            engine.step()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
