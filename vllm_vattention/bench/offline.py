"""One engine, several offline workloads: the suite's offline job (run as a subprocess).

    python3 -m vllm_vattention.bench.offline --model M --workloads '[[name, in, out, n], ...]' --out r.json

The engine starts once (fresh process), runs a short untimed warm-up, then each workload in turn
with `LLM.generate` on random token ids (fixed lengths, ignore_eos, temperature 1 as `vllm bench
throughput` does). With vAttention, the mapper's counters are read and reset after each workload
through the worker method `vattn_report`, so each workload gets its own mapping statistics. For
every system alike, the worker's `execute_model` and `sample_tokens` calls are timed (count and
seconds per workload; a wrapper on the worker instance, installed by this benchmark only), so the
CPU time per step of stock vLLM and of vAttention can be compared. The same wrapper keeps when each
`execute_model` call (one per engine step) started and ended, and `step_phases` splits the
workload's wall time at those instants: before the first step, the steps in spans of doubling
length (0, 1, 2-3, 4-7, ...), after the last. Two systems run the same steps in the same order, so
the difference per span says where in the run one of them loses its time (admission, steady
decode, the tail).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

TIMED = ("execute_model", "sample_tokens")


def install_step_timer(worker) -> bool:
    """In the worker process (via collective_rpc): time `TIMED` calls on this worker instance, and
    keep each `execute_model` call's (start, end) on `time.monotonic()` (CLOCK_MONOTONIC on Linux,
    one clock for every process, so the spans line up with the caller's own instants)."""
    if getattr(worker, "_bench_timer", None) is not None:
        return True
    timer: dict[str, list] = {}
    worker._bench_timer = timer
    worker._bench_spans = spans = []
    for name in TIMED:
        fn = getattr(worker, name, None)
        if fn is None:
            continue

        def timed(*a, _fn=fn, _name=name, **kw):
            t = time.monotonic()
            try:
                return _fn(*a, **kw)
            finally:
                end = time.monotonic()
                entry = timer.setdefault(_name, [0, 0.0])
                entry[0] += 1
                entry[1] += end - t
                if _name == "execute_model":
                    spans.append((t, end))
        setattr(worker, name, timed)
    return True


def read_step_timer(worker, reset: bool = True) -> dict:
    """{method: {"calls", "seconds", "ms_per_call"}} since the last reset."""
    timer = getattr(worker, "_bench_timer", None) or {}
    out = {k: {"calls": c, "seconds": round(sec, 4), "ms_per_call": round(1e3 * sec / c, 4) if c else None}
           for k, (c, sec) in timer.items()}
    if reset:
        timer.clear()
    return out


def read_step_spans(worker, reset: bool = True) -> list[list[float]]:
    """Each `execute_model` call's [start, end] since the last reset, in call order (plain lists of
    floats: what vLLM's utility-result encoding carries back from the engine process as sent)."""
    spans = getattr(worker, "_bench_spans", None)
    if spans is None:
        return []
    out = [list(s) for s in spans]
    if reset:
        spans.clear()
    return out


def step_phases(spans: list, t0: float, t1: float) -> dict:
    """A workload's wall time [t0, t1) split at its steps: `head_ms` before the first step starts,
    then per span of steps [lo, hi) (lo = 0, 1, 2, 4, 8, ...; the last ends at the step count) the
    time from step lo's start to step hi's (the last step: to its end), then `tail_ms` after the
    last step ends. The parts add up to t1 - t0."""
    starts = [a for a, _ in spans]
    if not starts:
        return {"steps": 0, "head_ms": 1e3 * (t1 - t0), "tail_ms": 0.0, "buckets": []}
    n = len(starts)
    edges = [0] + [1 << k for k in range(n.bit_length()) if (1 << k) < n] + [n]
    stops = starts[1:] + [spans[-1][1]]  # where each step's period ends
    buckets = [[lo, hi, 1e3 * (stops[hi - 1] - starts[lo])] for lo, hi in zip(edges, edges[1:])]
    return {"steps": n, "head_ms": 1e3 * (starts[0] - t0), "tail_ms": 1e3 * (t1 - spans[-1][1]), "buckets": buckets}


def token_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def lengths(spec: list, seed: int) -> tuple[list[int], list[int]]:
    """Per request input and output lengths of a workload [name, input_len, output_len, n] (all
    alike) or [name, input_len, output_len, n, input_min, output_min] (each drawn uniformly from
    [min, len], seeded: mixed lengths, as a serving mix has)."""
    _, in_len, out_len, n, *mins = spec
    if not mins:
        return [in_len] * n, [out_len] * n
    rng = random.Random(1000 + seed)
    in_min, out_min = mins
    return [rng.randint(in_min, in_len) for _ in range(n)], [rng.randint(out_min, out_len) for _ in range(n)]


CLOCK_MARK = "vattn_clock "  # bench.timeline finds this annotation to place CLOCK_MONOTONIC instants


def clock_marker(worker) -> float:
    """In the worker process (via collective_rpc) while its profiler traces: an empty annotation
    named CLOCK_MARK + this instant of CLOCK_MONOTONIC (time.monotonic on Linux, the clock of the
    native thread's batch times). bench.timeline reads the two clocks' offset from it, to place the
    native thread's slowest batches among the trace's API calls (NOTES #143)."""
    import torch
    t = time.monotonic()
    with torch.profiler.record_function(f"{CLOCK_MARK}{t:.9f}"):
        pass
    return t


def timeline_profiler(trace_dir: str, delay: int, steps: int, with_stack: bool = False):
    """vLLM's worker profiler (torch.profiler: CPU ops and CUDA activity) over engine steps
    [delay, delay + steps) after start_profile(); traces go to `trace_dir` (bench.timeline).
    with_stack: each op's Python stack too (slower steps; to find who calls an op that blocks)."""
    from vllm.config import ProfilerConfig
    return ProfilerConfig(profiler="torch", torch_profiler_dir=trace_dir, torch_profiler_with_stack=with_stack,
                          ignore_frontend=True, delay_iterations=delay, max_iterations=steps)


def parser() -> argparse.ArgumentParser:
    """The flags; the suite appends a system's engine flags (SYSTEMS[...]["args"]) to them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workloads", required=True,
                    help="JSON list of [name, input_len, output_len, num_prompts] or, for lengths drawn per "
                         "request, [name, input_len, output_len, num_prompts, input_min, output_min]")
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=None, help="vLLM's --block-size (default: the backend's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeline", default=None, metavar="DIR",
                    help="torch.profiler trace of the engine process over the first workload's steps "
                         "[--timeline-delay, + --timeline-steps) into DIR (bench.timeline reads it); "
                         "the profiler slows those steps, so the run's throughput is not a measurement")
    ap.add_argument("--timeline-delay", type=int, default=200)
    ap.add_argument("--timeline-steps", type=int, default=30)
    ap.add_argument("--timeline-stack", action="store_true",
                    help="record each op's Python stack in the trace (NOTES #145: who blocks the engine thread)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    workloads = json.loads(args.workloads)
    max_len = max(w[1] + w[2] for w in workloads) + 64
    kw = dict(model=args.model, load_format="dummy", seed=0, max_model_len=max_len,
              tensor_parallel_size=args.tensor_parallel_size)
    if args.attention_backend:
        kw["attention_config"] = {"backend": args.attention_backend}
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.timeline:
        kw["profiler_config"] = timeline_profiler(args.timeline, args.timeline_delay, args.timeline_steps,
                                                  args.timeline_stack)
    # the step timer is a function sent to the workers (pickled by reference to this module)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    t = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t
    vattn = "CUSTOM" in str(llm.llm_engine.vllm_config.attention_config.backend)
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def report() -> dict | None:
        return llm.collective_rpc("vattn_report", kwargs={"reset": True})[0] if vattn else None

    warm = token_prompts(16, 64, vocab, seed=99)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in warm],
                 SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    report()
    llm.collective_rpc(install_step_timer)
    results = []
    for k, spec in enumerate(workloads):
        name, n = spec[0], spec[3]
        ins, outs_len = lengths(spec, k)
        rng = random.Random(k)
        ps = [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab) for _ in range(i)]) for i in ins]
        sp = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=o, ignore_eos=True) for o in outs_len]
        profiled = bool(args.timeline) and k == 0
        if profiled:
            llm.start_profile()  # the worker starts tracing --timeline-delay steps later
            if not args.timeline_delay:  # tracing already: mark the clocks (bench.timeline --batches)
                llm.collective_rpc(clock_marker)
        llm.collective_rpc(read_step_spans)  # a reset: only this generate call's steps are counted
        t = time.monotonic()
        outs = llm.generate(ps, sp, use_tqdm=False)
        t_end = time.monotonic()
        elapsed = t_end - t
        if profiled:
            llm.stop_profile()
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if out_tokens != sum(outs_len):
            raise RuntimeError(f"{name}: {out_tokens} output tokens, expected {sum(outs_len)}")
        results.append({"workload": name, "profiled": profiled, "elapsed_s": elapsed, "requests_per_s": n / elapsed,
                        "output_tokens_per_s": out_tokens / elapsed,
                        "total_tokens_per_s": (out_tokens + sum(ins)) / elapsed, "mapper": report(),
                        "worker_calls": llm.collective_rpc(read_step_timer)[0],
                        "step_phases": step_phases(llm.collective_rpc(read_step_spans)[0], t, t_end)})
        print(f"[offline] {name}: {n / elapsed:.2f} req/s", flush=True)
    with open(args.out, "w") as f:
        json.dump({"start_s": start_s, "attention_backend": str(llm.llm_engine.vllm_config.attention_config.backend),
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
