"""Where a step's time goes: GPU kernel time by kernel, GPU busy share and wall time per step.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 -m vllm_vattention.bench.profile --out prof.json [--system vattn]

The engine runs in this process (so torch.profiler sees its kernels) and is stepped by hand. For
each phase (decode at short and long context, prefill), requests are added, the engine is stepped
until the phase's steady state, then `--steps` steps are profiled. Reported per phase: wall ms per
step, GPU kernel ms per step, their ratio (GPU busy share), the attention kernels' share of kernel
time, and the top kernels. Stock and vAttention are run one after the other by the caller.

`--cpu-profile` also runs cProfile over the same steps (the engine thread: with
VLLM_ENABLE_V1_MULTIPROCESSING=0 the scheduler and execute_model run here) and keeps the functions
with the most own time per step, to say where the engine thread's extra time per step goes
(execute_model 2.5 -> 3.8 ms/call at 512/1024 and 2.7 -> 5.8 at 16K decode, NOTES #23). cProfile
slows Python code down, so compare its numbers between systems, not with the wall time.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import json
import os
import pstats
import random
import time

HIT = -1  # a late prompt's input_len meaning "a copy of an earlier prompt" (a whole prefix-cache hit)
PHASES = [  # name, prompts, input_len, steps before profiling, then prompts added, their input_len
    ("decode-256x512", 256, 512, 40, 0, 0),
    ("decode-24x16k", 24, 16384, 30, 0, 0),
    # 8192-in-256-out's decode steps, where FA2 decode lost 4-10% per step to paged FA3 on H200s and
    # FA3 over rows 2% (NOTES #122); opt-in: 64 x 8.8K tokens need ~75 GB of KV (--max-model-len 8768)
    ("decode-64x8k", 64, 8192, 70, 0, 0),
    ("prefill-8x8k", 8, 8192, 0, 0, 0),
    # decodes with prefill chunks in the same steps (most steps of the 1024-in-128-out workload)
    ("mixed-128x1k+chunks", 128, 1024, 20, 16, 2048),
    # serving (TPOT p50 1.001-1.087x of stock in all 13 serving pairs, NOTES #80): a
    # few decoding requests, alone and with one new 1,024-token prompt's prefill in their steps
    ("decode-4x1k", 4, 1024, 20, 0, 0),
    ("mixed-4x1k+1k", 4, 1024, 20, 1, 1024),
    # serving at 16 req/s (NOTES #85): ~16 decoding requests and a new one whose prompt is a whole
    # prefix-cache hit (a copy of a finished request's prompt), so its step carries a prefill of
    # only the tokens vLLM recomputes: the step kind that costs vAttention +2.1 ms on the engine thread
    ("mixed-16x1k+hit", 16, 1024, 20, 1, HIT),
]
OPT_IN = {"decode-64x8k"}  # phases run only when --phases names them
ATTENTION_MARKERS = ("flash", "fmha", "attn", "Flash")


def chosen_phases(phases: str) -> list[tuple]:
    """The PHASES a --phases value picks: those it names, or (empty) every one but the OPT_IN ones."""
    names = phases.split(",") if phases else []
    return [p for p in PHASES if p[0] in names] if names else [p for p in PHASES if p[0] not in OPT_IN]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/llama-3.1-8b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", default="", help="comma-separated subset of the phases (default: all but "
                                                   f"{sorted(OPT_IN)})")
    ap.add_argument("--max-model-len", type=int, default=16384 + 1024 + 64,
                    help="the engine's max_model_len: vAttention's rows are this long, and its decode CUDA "
                         "graphs run FA2 over whole rows (serving in the suite: 1216; `vllm serve`'s "
                         "default for this model: 131072)")
    ap.add_argument("--cpu-profile", action="store_true", help="also cProfile the engine thread over the same steps")
    ap.add_argument("--warm-passes", type=int, default=1,
                    help="unmeasured runs of each phase before the measured one (first-use costs: lazily loaded "
                         "kernels, FA2's JIT cache, new allocation sizes; results before NOTES #95 had none)")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="only write a markdown table comparing these runs (the first is the baseline) to --out")
    args = ap.parse_args(argv)
    if args.report:
        runs = {os.path.basename(p).rsplit(".", 1)[0]: json.load(open(p)) for p in args.report}
        with open(args.out, "w") as f:
            f.write(report_table(runs))
        print(report_table(runs))
        return

    check_fits(args.phases, args.steps, args.max_model_len)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, load_format="dummy", seed=0, max_model_len=args.max_model_len)
    engine = llm.llm_engine
    backend = str(engine.vllm_config.attention_config.backend)
    rng = random.Random(0)
    report = {"attention_backend": backend, "max_model_len": args.max_model_len, "phases": []}
    for name, n, in_len, warm, more, more_len in chosen_phases(args.phases):
        sp = SamplingParams(max_tokens=min(1024, args.max_model_len - max(in_len, more_len)), ignore_eos=True,
                            temperature=1.0)

        # warm passes: the phase run unmeasured first, so that first-use costs (kernels loaded lazily
        # or compiled from the JIT cache, new allocation sizes) fall outside the measured pass
        for pass_ in range(args.warm_passes + 1):
            first: list[list[int]] = []

            def add(tag, count, length, params=sp):
                prompts = make_prompts(rng, count, length, first)
                first.extend(prompts if not first else [])
                return [engine.add_request(f"{name}-p{pass_}-{tag}{i}", TokensPrompt(prompt_token_ids=p), params)
                        for i, p in enumerate(prompts)]
            ids = []
            if more_len == HIT:
                # the hit's original: a request that finishes after its prefill, so that its blocks stay
                # cached and its row is free (as the 4 req/s run's requests were when the 16 req/s run's
                # whole hits came); the late prompts copy it
                ids += add("seed-", more, in_len, SamplingParams(max_tokens=1, ignore_eos=True))
            ids += add("", n, in_len)
            for _ in range(warm):
                engine.step()
            ids += add("late-", more, more_len)  # their prefill chunks share the next steps with the decodes
            torch.cuda.synchronize()
            # a prefill phase: its first steps; a mixed one: the ~4 steps that carry the late prompts' chunks
            steps = 4 if more else (args.steps if warm else 6)
            if pass_ == args.warm_passes:  # the measured pass
                report["phases"].append(measure_steps(llm, name, steps, args.cpu_profile))
            else:
                for _ in range(steps):
                    engine.step()
            engine.abort_request(ids, internal=True)
            for _ in range(3):
                engine.step()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def measure_steps(llm, name: str, steps: int, cpu_profile: bool) -> dict:
    """The next `steps` engine steps of phase `name` under torch.profiler (CUDA kernels) and, with
    `cpu_profile`, cProfile: wall and kernel time per step, attention's share, the top kernels, our
    hooks' time (vAttention only) and the engine thread's top functions."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    engine = llm.llm_engine
    cpu = cProfile.Profile() if cpu_profile else None
    ours(llm, reset=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        with (cpu if cpu is not None else contextlib.nullcontext()):
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
    hooks = ours(llm)
    if hooks:
        # our hooks on the engine thread in this process, where no output thread competes for the
        # GIL (VLLM_ENABLE_V1_MULTIPROCESSING=0); the suite's numbers come from the engine process
        # (NOTES.md #31). Under --cpu-profile they include cProfile's overhead.
        phase["our_hooks_ms_per_step"] = {k: round(1e3 * hooks[k + "_seconds"] / max(hooks["steps"], 1), 4)
                                          for k in ("prepare_attn", "map", "metadata_build")}
        # VATTN_FA3_DECODE_TOKENS (NOTES #128, #130): the measured decode steps that ran FA3 (fa2: any that
        # did not), and those of them that mapped guard slots on their path
        phase["long_decode_steps"] = {k: hooks.get(f"long_decode_steps_{k}", 0) for k in ("fa3", "fa2", "mapped")}
    if cpu is not None:
        phase["cpu_top_functions_ms_per_step"] = top_functions(cpu, steps)
    print(json.dumps({k: v for k, v in phase.items() if not k.startswith(("top_", "cpu_top"))}), flush=True)
    return phase


def make_prompts(rng: random.Random, count: int, length: int, first: list[list[int]]) -> list[list[int]]:
    """`count` prompts of `length` random token ids, or with length HIT copies of the phase's first
    prompts (`first`, in turn): whole prefix-cache hits."""
    if length == HIT:
        if not first:
            raise ValueError("a HIT prompt copies the phase's first prompts; add those first")
        return [list(first[i % len(first)]) for i in range(count)]
    return [[rng.randrange(10, 30000) for _ in range(length)] for _ in range(count)]


def check_fits(phases: str, steps: int, max_model_len: int) -> None:
    """Every chosen phase's prompts and steps fit max_model_len (else its requests would stop early)."""
    chosen = chosen_phases(phases)
    unknown = set(phases.split(",")) - {p[0] for p in PHASES} if phases else set()
    if unknown:
        raise SystemExit(f"unknown --phases {sorted(unknown)}; choose from {[p[0] for p in PHASES]}")
    for name, _, in_len, warm, _, more_len in chosen:
        need = max(in_len, more_len) + warm + steps + 8
        if need > max_model_len:
            raise SystemExit(f"phase {name} needs {need} tokens per request, more than --max-model-len "
                             f"{max_model_len}; raise it or pick other --phases")


def ours(llm, reset: bool = False) -> dict | None:
    """vAttention's report (mapper counters, our hooks' seconds) since the last reset; None for stock."""
    if "CUSTOM" not in str(llm.llm_engine.vllm_config.attention_config.backend):
        return None
    return llm.collective_rpc("vattn_report", kwargs={"reset": reset})[0]


def top_functions(prof: cProfile.Profile, steps: int, top: int = 25) -> list[dict]:
    """The functions with the most own time, per step: [{"function", "self_ms", "cum_ms", "calls"}]
    ("file:line(name)", the file cut to its last three path parts)."""
    rows = []
    for (path, line, name), (_, calls, self_s, cum_s, _) in pstats.Stats(prof).stats.items():
        where = "/".join(path.split(os.sep)[-3:]) if path != "~" else "~"
        rows.append({"function": f"{where}:{line}({name})", "self_ms": 1e3 * self_s / steps,
                     "cum_ms": 1e3 * cum_s / steps, "calls": calls / steps})
    rows.sort(key=lambda r: -r["self_ms"])
    return [{**r, "self_ms": round(r["self_ms"], 4), "cum_ms": round(r["cum_ms"], 4), "calls": round(r["calls"], 2)}
            for r in rows[:top]]


def cpu_table(runs: dict[str, dict], top: int = 12) -> str:
    """Per phase and run: the functions with the most own time per step (under cProfile)."""
    lines = []
    for name, run in runs.items():
        for p in run["phases"]:
            fns = p.get("cpu_top_functions_ms_per_step")
            if not fns:
                continue
            lines += ["", f"### {p['phase']}, {name}: engine-thread functions by own time (ms per step, under cProfile)",
                      "", "| function | own ms/step | cumulative ms/step | calls/step |", "|---|---|---|---|"]
            lines += [f"| `{f['function']}` | {f['self_ms']:.3f} | {f['cum_ms']:.3f} | {f['calls']:.1f} |"
                      for f in fns[:top]]
    return "\n".join(lines) + ("\n" if lines else "")


def report_table(runs: dict[str, dict]) -> str:
    """Per phase, every run's wall and GPU kernel ms per step, GPU busy share and attention time,
    with ratios to the first run (the baseline)."""
    names = list(runs)
    base = {p["phase"]: p for p in runs[names[0]]["phases"]}
    lines = ["| phase | system | wall ms/step | GPU kernel ms/step | GPU busy | attention ms/step | "
             "attention share of GPU time |", "|---|---|---|---|---|---|---|"]
    for phase in base:
        rows = [(n, next((p for p in runs[n]["phases"] if p["phase"] == phase), None)) for n in names]
        for n, p in rows:
            if p:
                lines.append(f"| {phase} | {n} | {p['wall_ms_per_step']:.2f} | {p['gpu_ms_per_step']:.2f} | "
                             f"{100 * p['gpu_busy']:.0f}% | {p['attention_ms_per_step']:.2f} | "
                             f"{100 * (p['attention_share_of_gpu'] or 0):.1f}% |")
        b = base[phase]
        for n, p in rows[1:]:
            if p:
                lines.append(f"| {phase} | {n} / {names[0]} | {p['wall_ms_per_step'] / b['wall_ms_per_step']:.3f}x | "
                             f"{p['gpu_ms_per_step'] / b['gpu_ms_per_step']:.3f}x | | "
                             f"{p['attention_ms_per_step'] / b['attention_ms_per_step']:.3f}x | |")
    hooks = [(n, p) for n in names for p in runs[n]["phases"] if p.get("our_hooks_ms_per_step")]
    if hooks:
        lines += ["", "Our hooks on the engine thread (in-process engine: no output thread competes for the GIL)",
                  "", "| phase | system | prepare_attn ms/step | mapping ms/step | metadata build ms/step |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['phase']} | {n} | {p['our_hooks_ms_per_step']['prepare_attn']:.3f} | "
                  f"{p['our_hooks_ms_per_step']['map']:.3f} | {p['our_hooks_ms_per_step']['metadata_build']:.3f} |"
                  for n, p in hooks]
    return "\n".join(lines) + "\n" + cpu_table(runs)


if __name__ == "__main__":
    main()
