"""Serving TTFT split by each request's prefix-cache hits (NOTES #73).

`vllm bench serve --dataset-name random` over the repository's 536-token tokenizer sends prompts that
share prefixes (NOTES #71). The suite keeps each request's TTFT and TPOT (`per_request`, in the order
sent); this rebuilds the prompts the client sent (vLLM's RandomDataset, seed 0, as the server
tokenizes them), replays the server's prefix cache over one server's workloads in order (each
workload's first prompt is sent once before the run, as a test; no eviction: the suite's budget
holds every block these runs write), and reports TTFT and TPOT p50 per
class of request: no hit, some leading blocks hit, or (nearly) the whole prompt hit. With the
servers' step traces (VATTN_STEP_TRACE, which the suite sets for every server it starts) it also tells
what the steps did while each request waited for its first token, and how each server's steps
split by what they scheduled (step_kinds). For any serving workload
(distinct prompts too) it also splits each run's requests into slices in send order (by_time).

    python3 -m vllm_vattention.bench.serve_hits benchmarks/results/<date>-<gpu>-serve.json
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gzip
import os
import statistics
import sys
from typing import Callable

from .suite import WORKLOADS, batch_times, drained_by

WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}

CLASSES = ("no hit", "some hits", "whole prompt")


def bench_serve_prompts(model: str, n: int, input_len: int, output_len: int) -> list[list[int]]:
    """The token ids `vllm bench serve --dataset-name random` sends (its RandomDataset, seed 0), as
    the server tokenizes them with `model`'s tokenizer."""
    from transformers import AutoTokenizer
    from vllm.benchmarks.datasets.datasets import RandomDataset
    tok = AutoTokenizer.from_pretrained(model)
    reqs = RandomDataset(random_seed=0).sample(tokenizer=tok, num_requests=n, input_len=input_len,
                                               output_len=output_len, range_ratio=0.0, prefix_len=0)
    return [tok(r.prompt).input_ids for r in reqs]


def leading_hits(prompts: list[list[int]], block_size: int, seen: set) -> list[int]:
    """For each prompt in order, how many of its leading full blocks an earlier prompt (or one in
    `seen`, updated here) had already written: vLLM's prefix cache, whose block hash chains the
    parent's."""
    out = []
    for p in prompts:
        key, hits, missed = None, 0, False
        for j in range(len(p) // block_size):
            key = hash((key, tuple(p[j * block_size:(j + 1) * block_size])))
            if key in seen and not missed:
                hits += 1
            else:
                missed = True
            seen.add(key)
        out.append(hits)
    return out


def hit_class(hits: int, prompt_len: int, block_size: int) -> str:
    """'no hit', 'some hits', or 'whole prompt' (every full block hit: vLLM recomputes at most the
    last block's tokens)."""
    if hits == 0:
        return CLASSES[0]
    return CLASSES[2] if hits >= prompt_len // block_size else CLASSES[1]


def classify(results: list[dict], prompts_for: Callable[[str, int, int, int], list[list[int]]],
             block_size: int = 16, load_trace: Callable[[str], dict | None] | None = None) -> list[dict]:
    """One row per request of every random-prompt serving result that kept `per_request`: workload,
    system, rep, class, TTFT and TPOT, and with `load_trace` (a result's step_trace file name ->
    the trace, or None) what the server's steps did in its TTFT window (ttft_windows). A server's
    workloads ran in the suite's order, sharing one prefix cache, so each (system, rep, call)
    replays them in that order."""
    known = WORKLOAD_BY_NAME
    serve = [r for r in results if r.get("per_request") and r["workload"] in known
             and known[r["workload"]].kind == "serve" and known[r["workload"]].dataset == "random"]
    order = [w.name for w in WORKLOADS]
    prompts: dict[str, list[list[int]]] = {}
    rows = []
    servers: dict[tuple, list[dict]] = {}
    for r in serve:
        servers.setdefault((r["system"], r.get("rep"), r.get("call")), []).append(r)
    for (system, rep, _), runs in servers.items():
        seen: set = set()
        for r in sorted(runs, key=lambda x: order.index(x["workload"])):
            w = known[r["workload"]]
            if w.name not in prompts:
                prompts[w.name] = prompts_for(w.name, w.num_prompts, w.input_len, w.output_len)
            ps = prompts[w.name]
            leading_hits(ps[:1], block_size, seen)  # the client's "initial single prompt test run" sends the first
            hits = leading_hits(ps, block_size, seen)
            per = r["per_request"]
            if len(per["ttft_ms"]) != len(ps):
                raise ValueError(f"{w.name} / {system}: {len(per['ttft_ms'])} requests measured, "
                                 f"{len(ps)} prompts rebuilt; was it run with another dataset or count?")
            trace = load_trace(r["step_trace"]) if load_trace and r.get("step_trace") and "t0" in per else None
            windows = ttft_windows(per, trace) if trace else [None] * len(ps)
            for h, p, ttft, tpot, win in zip(hits, ps, per["ttft_ms"], per["tpot_ms"], windows):
                rows.append({"workload": w.name, "system": system, "rep": rep, "hits": h,
                             "class": hit_class(h, len(p), block_size), "ttft_ms": ttft, "tpot_ms": tpot,
                             "window": win})
    return rows


def markdown(rows: list[dict], baseline: str = "stock-fa3") -> str:
    """TTFT and TPOT p50 per workload, class and system (every repetition's requests pooled), and
    each candidate's ratio to the baseline's."""
    lines = ["| workload | class | requests per run | system | TTFT p50 ms | vs stock | TPOT p50 ms | vs stock |",
             "|---|---|---|---|---|---|---|---|"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    systems.sort(key=lambda s: s != baseline)

    def ratio(x: float | None, b: float | None) -> str:
        return f"{x / b:.3f}x" if x is not None and b else "-"

    def p50(xs: list) -> float | None:
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    for w in workloads:
        for c in CLASSES:
            base = None
            for s in systems:
                mine = [r for r in rows if (r["workload"], r["class"], r["system"]) == (w, c, s)]
                if not mine:
                    continue
                runs = len({r["rep"] for r in mine})
                ttft, tpot = p50([r["ttft_ms"] for r in mine]), p50([r["tpot_ms"] for r in mine])
                if s == baseline:
                    base = (ttft, tpot)
                cells = [f"{ttft:.2f}", ratio(ttft, base[0] if base else None),
                         f"{tpot:.2f}" if tpot is not None else "-", ratio(tpot, base[1] if base else None)]
                lines.append(f"| {w} | {c} | {len(mine) / runs:.0f} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ttft_windows(per: dict, trace: dict) -> list[dict]:
    """For each request (per_request, in the order sent), what the server's steps did between its
    arrival and its first token (worker.StepTrace, the same clock): steps begun in that window,
    their execute_model time, the GPU's wait at the mapping flag they enqueued, the block maps and
    DRAINs on their path, and the wait from arrival to the first step begun after it."""
    fields = list(trace["fields"])
    i_start, i_ms, i_maps, i_drains, i_wait = (fields.index(k) for k in ("start_s", "ms", "block_maps", "drains",
                                                                         "flag_wait"))
    steps = trace["steps"]
    starts = [trace["t0"] + st[i_start] for st in steps]
    waits = trace.get("flag_waits_ms") or []
    out = []
    for start, ttft in zip(per["start_s"], per["ttft_ms"]):
        a = per["t0"] + start
        lo, hi = bisect.bisect_left(starts, a), bisect.bisect_right(starts, a + ttft / 1e3)
        mine = steps[lo:hi]
        out.append({"steps": len(mine), "execute_ms": sum(st[i_ms] for st in mine),
                    "flag_ms": sum(waits[st[i_wait]] for st in mine if 0 <= st[i_wait] < len(waits)),
                    "block_maps": sum(st[i_maps] for st in mine), "drains": sum(st[i_drains] for st in mine),
                    "to_first_step_ms": (starts[lo] - a) * 1e3 if lo < len(starts) else None})
    return out


def window_markdown(rows: list[dict]) -> str:
    """Per workload, class and system (requests with a step trace only): means of ttft_windows()."""
    keys = ("steps", "execute_ms", "flag_ms", "block_maps", "drains", "to_first_step_ms")
    lines = ["| workload | class | system | requests | TTFT p50 ms | steps in the window | execute_model ms | "
             "GPU at the flag ms | block maps | DRAINs | arrival to next step ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in dict.fromkeys(r["workload"] for r in rows):
        for c in CLASSES:
            for s in dict.fromkeys(r["system"] for r in rows):
                mine = [r for r in rows if (r["workload"], r["class"], r["system"]) == (w, c, s) and r.get("window")]
                if not mine:
                    continue
                means = []
                for k in keys:
                    xs = [r["window"][k] for r in mine if r["window"][k] is not None]
                    means.append(f"{statistics.fmean(xs):.2f}" if xs else "-")
                ttft = statistics.median(r["ttft_ms"] for r in mine)
                lines.append(f"| {w} | {c} | {s} | {len(mine)} | {ttft:.2f} | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def by_time(results: list[dict], parts: int = 4, baseline: str = "stock-fa3") -> str:
    """TTFT and TPOT p50 per slice of each serving run, its requests cut into `parts` equal slices in
    the order they were sent (same arrivals for every system: the client's seed), with each
    candidate's ratio to the baseline's same slice; every repetition's requests pooled. Any dataset:
    where in a run a system loses (e.g. a server's first requests, or one rate's phase of prefix
    hits) without rebuilding prompts."""
    runs: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("per_request"):
            runs.setdefault((r["workload"], r["system"]), []).append(r["per_request"])
    lines = ["| workload | requests (in send order) | system | TTFT p50 ms | vs stock | TPOT p50 ms | vs stock |",
             "|---|---|---|---|---|---|---|"]
    for w in dict.fromkeys(k[0] for k in runs):
        systems = sorted((k[1] for k in runs if k[0] == w), key=lambda x: x != baseline)
        n = min(len(per["ttft_ms"]) for k in runs if k[0] == w for per in runs[k])
        cuts = [round(i * n / parts) for i in range(parts + 1)]
        for lo, hi in zip(cuts, cuts[1:]):
            if lo == hi:  # (fewer requests than slices)
                continue
            base = None
            for sy in systems:
                ttft = statistics.median(x for per in runs[(w, sy)] for x in per["ttft_ms"][lo:hi])
                tp = [x for per in runs[(w, sy)] for x in per["tpot_ms"][lo:hi] if x is not None]
                tpot = statistics.median(tp) if tp else None
                if sy == baseline:
                    base = (ttft, tpot)
                rt = f"{ttft / base[0]:.3f}x" if base else "-"
                rp = f"{tpot / base[1]:.3f}x" if base and tpot and base[1] else "-"
                lines.append(f"| {w} | {lo}-{hi - 1} | {sy} | {ttft:.2f} | {rt} | "
                             f"{f'{tpot:.2f}' if tpot is not None else '-'} | {rp} |")
    return "\n".join(lines) + "\n"


STEP_KINDS = ("no new request", "new, < 256 tokens", "new, >= 256 tokens")


def step_kind(new_reqs: int, tokens: int) -> str:
    """A step by what it scheduled: decodes only (and chunks of earlier prompts), a new request with
    a short prefill (most of its prompt a prefix-cache hit), or a new request's prefill."""
    return STEP_KINDS[0] if not new_reqs else STEP_KINDS[1] if tokens < 256 else STEP_KINDS[2]


def traced_runs(results: list[dict], load_trace: Callable[[str], dict | None]):
    """Each serving result with per-request times on the trace's clock and a step trace that loads:
    (result, its per_request, its trace)."""
    for r in results:
        per, name = r.get("per_request"), r.get("step_trace")
        trace = load_trace(name) if per and name and "t0" in per else None
        if trace:
            yield r, per, trace


def step_kinds(results: list[dict], load_trace: Callable[[str], dict | None]) -> list[dict]:
    """Per serving run with a step trace (every system's, NOTES #85): its steps during the run (from
    the first request's arrival to the last one's last token), by step_kind: how many, execute_model
    ms (median), and the time to the next step's start (median, and the sum: where the run's time went)."""
    out = []
    for r, per, trace in traced_runs(results, load_trace):
        w = WORKLOAD_BY_NAME.get(r["workload"])
        out_len = w.output_len if w else 1
        ends = [s + (t + (p or 0) * (out_len - 1)) / 1e3
                for s, t, p in zip(per["start_s"], per["ttft_ms"], per["tpot_ms"])]
        lo, hi = per["t0"] + min(per["start_s"]), per["t0"] + max(ends)
        fields = list(trace["fields"])
        i_start, i_ms, i_new, i_tok = (fields.index(k) for k in ("start_s", "ms", "new_reqs", "tokens"))
        i_hooks = fields.index("hooks_ms") if "hooks_ms" in fields else None  # (traces before NOTES #88 have none)
        # each step's hooks part by part (traces before NOTES #93 have none, those before #98 only for
        # admitting steps; stock's are null)
        i_parts = fields.index("hook_parts_ms") if "hook_parts_ms" in fields else None
        steps = [st for st in trace["steps"] if lo <= trace["t0"] + st[i_start] <= hi]
        by: dict[str, list[tuple]] = {k: [] for k in STEP_KINDS}
        for a, b in zip(steps, steps[1:]):
            by[step_kind(a[i_new], a[i_tok])].append((a[i_ms], (b[i_start] - a[i_start]) * 1e3,
                                                      a[i_hooks] if i_hooks is not None else None,
                                                      a[i_parts] if i_parts is not None else None))
        admitted = [st[i_new] for st in steps]
        backlog = {"max_admitted": max(admitted, default=0), "steps_admitting_3": sum(a >= 3 for a in admitted)}
        for kind, xs in by.items():
            if xs:
                parts = [x[3] for x in xs if x[3]]
                out.append({"workload": r["workload"], "system": r["system"], "rep": r.get("rep"), "kind": kind,
                            **backlog,
                            "steps": len(xs), "execute_ms_p50": statistics.median(x[0] for x in xs),
                            "hooks_ms_p50": statistics.median(x[2] for x in xs) if i_hooks is not None else None,
                            "hooks_ms_p90": p90([x[2] for x in xs]) if i_hooks is not None else None,
                            "hook_parts_ms_p50": dict(zip(trace.get("hook_parts", ()),
                                                          (statistics.median(c) for c in zip(*parts))))
                            if parts else None,
                            "to_next_ms_p50": statistics.median(x[1] for x in xs),
                            "to_next_s_sum": sum(x[1] for x in xs) / 1e3, "window_s": hi - lo})
    return out


def flag_stalls(results: list[dict], load_trace: Callable[[str], dict | None], n: int = 3,
                before: int = 2) -> list[dict]:
    """Per traced server (one trace serves its workloads: reported once), its `n` longest waits of
    the GPU at the mapping flag, each with the step that enqueued it and the `before` steps ahead of
    it (what they scheduled, the block maps and DRAINs on their path, our hooks and warm()'s part of
    them: a DRAIN behind a large background batch shows as a long wait after a long warm(), NOTES
    #117), and the server's slowest native-thread batches from its mapper stats, to read against
    them (a batch queued behind another, or one slow driver call)."""
    out, seen = [], set()
    for r, _, trace in traced_runs(results, load_trace):
        if r["step_trace"] in seen or not trace.get("flag_waits_ms"):
            continue
        seen.add(r["step_trace"])
        fields, parts = list(trace["fields"]), list(trace.get("hook_parts") or ())
        col = {k: fields.index(k) for k in ("start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait")}
        i_hooks = fields.index("hooks_ms") if "hooks_ms" in fields else None
        i_parts = fields.index("hook_parts_ms") if "hook_parts_ms" in fields and "warm" in parts else None
        i_warm = parts.index("warm") if i_parts is not None else None
        steps, waits = trace["steps"], trace["flag_waits_ms"]
        at = {st[col["flag_wait"]]: k for k, st in enumerate(steps) if st[col["flag_wait"]] >= 0}
        longest = sorted((w for w in range(len(waits)) if w in at), key=lambda w: -waits[w])[:n]
        slowest = ((r.get("mapper") or {}).get("native_slowest_batches") or [])[:n]
        starts = [st[col["start_s"]] for st in steps]
        placed = [place_batch(b, trace.get("t0"), starts, [st[col["flag_wait"]] for st in steps], waits)
                  for b in slowest]
        for w in longest:
            k = at[w]
            for j in range(max(0, k - before), k + 1):
                st = steps[j]
                warm = st[i_parts][i_warm] if i_parts is not None and st[i_parts] else None
                out.append({"server": r["step_trace"], "wait": w, "wait_ms": waits[w], "step": j, "own": j == k,
                            **{key: st[c] for key, c in col.items() if key != "flag_wait"},
                            "hooks_ms": st[i_hooks] if i_hooks is not None else None, "warm_ms": warm,
                            "slowest": slowest, "slowest_at": placed})
    return out


def place_batch(batch: list, t0: float | None, starts: list[float], flag_at: list[int],
                waits: list[float]) -> tuple | None:
    """Where a native batch (native_slowest_batches' entry) was submitted in a step trace: (seconds
    into the trace, the step then running, that step's wait at the mapping flag in ms or None). The
    8th value is the submission on CLOCK_MONOTONIC, the trace's clock; older entries have 7: None."""
    if len(batch) < 8 or t0 is None:
        return None
    t = batch[7] - t0
    k = bisect.bisect_right(starts, t) - 1
    if k < 0:
        return (round(t, 4), None, None)
    return (round(t, 4), k, waits[flag_at[k]] if flag_at[k] >= 0 else None)


def flag_stalls_markdown(rows: list[dict]) -> str:
    lines = ["| server | wait (ms) | step | s into the trace | execute_model ms | new requests | tokens | block maps | "
             "DRAINs | our hooks ms | of it warm() ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in rows:
        wait = f"**{r['wait_ms']:.1f}**" if r["own"] else ""
        lines.append(f"| {r['server']} | {wait} | {r['step']} | {r['start_s']:.3f} | {r['ms']:.2f} | {r['new_reqs']} | "
                     f"{r['tokens']} | {r['block_maps']} | {r['drains']} | {fmt(r['hooks_ms'])} | {fmt(r['warm_ms'])} |")
    slow = {r["server"]: list(zip(r["slowest"], r.get("slowest_at") or [None] * len(r["slowest"])))
            for r in rows if r["slowest"]}
    if slow:
        lines += ["", "The native thread's slowest batches (latency, queued, running, slowest op ms, its kind, ops, "
                      "batch index), and where each was submitted: s into the trace, the step then running and "
                      "its wait at the mapping flag; where measured, the thread's CPU ms, ms waiting for a CPU and "
                      "voluntary / involuntary context switches while it ran (NOTES #141), and the background "
                      "ops its drains ran (NOTES #143):", ""]
        lines += [f"- {server}: " + "; ".join(str(b[:7]) + _placed(p) + _went(b) for b, p in batches)
                  for server, batches in slow.items()]
    return "\n".join(lines) + "\n"


def _went(b: list) -> str:
    times = batch_times(b)
    if times is None:
        return ""
    cpu, runq, vol, invol = times
    drained = drained_by(b)
    return (f" [CPU {cpu:.1f} ms, waiting for a CPU {'?' if runq is None else f'{runq:.1f}'} ms, switches {vol} / {invol}"
            + ("" if drained is None else f", drained {drained} background ops") + "]")


def _placed(p: tuple | None) -> str:
    if p is None:
        return ""
    t, step, wait = p
    if step is None:
        return f" at {t:.3f} s, before the first step"
    return f" at {t:.3f} s, step {step}" + (f" (flag wait {wait:.1f} ms)" if wait is not None else "")


BATCH_TOKENS = 8192  # vLLM 0.25's max_num_batched_tokens for `vllm serve` on these GPUs (its start-up log says)
FRONTEND_S = 0.010  # allowance for the API server and the hop to the engine before a step can admit a request


def admission(results: list[dict], load_trace: Callable[[str], dict | None],
              batch_tokens: int = BATCH_TOKENS) -> list[dict]:
    """Per traced serving run: how long each request waited from the client's send to the start of
    the step that admitted it, and how many steps before that had room for it (started more than
    FRONTEND_S after the send and scheduled few enough tokens to take its prompt too: vLLM admits
    waiting requests in arrival order while the step's token budget lasts). A request admitted
    after such steps had not reached the engine's queue yet: it was held upstream (the client, the
    API server, the hop to the engine), where no KV-cache manager acts (NOTES #107).

    The k-th request admitted in the run's window is taken to be the k-th sent (vLLM's scheduler is
    first come, first served): an estimate, exact when requests reach the engine in the order sent.
    Also the streaming: chunks per request against its tokens (from suites since NOTES #106)."""
    out = []
    for r, per, trace in traced_runs(results, load_trace):
        fields = list(trace["fields"])
        i_start, i_new, i_tok = (fields.index(k) for k in ("start_s", "new_reqs", "tokens"))
        base = per["t0"] - trace["t0"]  # the run's first send on the trace's clock
        last = base + max(per["start_s"]) + 5.0
        steps = [st for st in trace["steps"] if base - 0.002 <= st[i_start] <= last]
        admitted = [i for i, st in enumerate(steps) for _ in range(st[i_new])]
        waits, room = [], []
        for k, i in enumerate(admitted[:len(per["start_s"])]):
            sent = base + per["start_s"][k]
            waits.append((steps[i][i_start] - sent) * 1e3)
            need = per["input_len"][k]
            room.append(sum(1 for st in steps[:i] if st[i_start] > sent + FRONTEND_S
                            and st[i_tok] + need <= batch_tokens))
        if not waits:
            continue
        w = WORKLOAD_BY_NAME.get(r["workload"])
        chunks = per.get("chunks")
        out.append({"workload": r["workload"], "system": r["system"], "rep": r.get("rep"), "requests": len(waits),
                    "wait_ms_p50": statistics.median(waits), "wait_ms_p90": p90(waits),
                    "room_steps_p50": statistics.median(room), "room_steps_p90": p90(room),
                    "held_upstream": sum(x >= 2 for x in room) / len(room),
                    "chunks_per_token": (statistics.median(c / w.output_len for c in chunks)
                                         if chunks and w else None)})
    return out


def admission_markdown(rows: list[dict]) -> str:
    lines = ["| workload | system | rep | requests | send to admitting step ms p50 | p90 | "
             "steps with room before it p50 | p90 | held upstream (>= 2 such steps) | streamed chunks per token p50 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ch = "-" if r["chunks_per_token"] is None else f"{r['chunks_per_token']:.2f}"
        lines.append(f"| {r['workload']} | {r['system']} | {r['rep']} | {r['requests']} | {r['wait_ms_p50']:.1f} | "
                     f"{r['wait_ms_p90']:.1f} | {r['room_steps_p50']:g} | {r['room_steps_p90']:g} | "
                     f"{100 * r['held_upstream']:.0f}% | {ch} |")
    return "\n".join(lines) + "\n"


def p90(xs: list[float]) -> float:
    """The 90th percentile by nearest rank (the tail a step kind's hooks have: NOTES #99; the CPU
    harness's too)."""
    return sorted(xs)[max(0, -(-9 * len(xs) // 10) - 1)]


def step_kinds_markdown(rows: list[dict]) -> str:
    """The step kinds per run, then per run the signs of a prefill backlog (NOTES #85: at 16 req/s
    either system can fall into one, and then admits several queued requests in one step)."""
    lines = ["| workload | system | rep | step | steps | execute_model ms p50 | of it our hooks ms p50 | "
             "our hooks ms p90 | to next step ms p50 | to next step, total s | share of the run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hooks, hooks90 = ("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("hooks_ms_p50", "hooks_ms_p90"))
        lines.append(f"| {r['workload']} | {r['system']} | {r['rep']} | {r['kind']} | {r['steps']} | "
                     f"{r['execute_ms_p50']:.2f} | {hooks} | {hooks90} | {r['to_next_ms_p50']:.2f} | {r['to_next_s_sum']:.2f} | "
                     f"{100 * r['to_next_s_sum'] / r['window_s']:.0f}% |")
    runs = {(r["workload"], r["system"], r["rep"]): r for r in rows if "max_admitted" in r}
    if runs:
        lines += ["", "| workload | system | rep | most requests admitted in one step | steps admitting 3 or more |",
                  "|---|---|---|---|---|"]
        lines += [f"| {w} | {sy} | {rep} | {r['max_admitted']} | {r['steps_admitting_3']} |"
                  for (w, sy, rep), r in runs.items()]
    parted = [r for r in rows if r.get("hook_parts_ms_p50")]
    if parted:  # which of our hooks each kind of step's share is (the parts' medians need not add up to it)
        names = list(parted[0]["hook_parts_ms_p50"])
        lines += ["", "Our hooks part by part, by step kind (ms, median over the kind's steps):",
                  "", "| workload | system | rep | step | " + " | ".join(names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]
        lines += [f"| {r['workload']} | {r['system']} | {r['rep']} | {r['kind']} | "
                  + " | ".join(f"{r['hook_parts_ms_p50'].get(n, 0):.3f}" for n in names) + " |" for r in parted]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import json
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="a suite JSON with serving results (per_request kept)")
    ap.add_argument("--model", default=os.path.join("models", "llama-3.1-8b"), help="whose tokenizer the client used")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--traces", default=None, help="folder of the servers' step traces (default: the result's)")
    ap.add_argument("--parts", type=int, default=4, help="slices of each run for the by-time table")
    ap.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                    help="the server's max_num_batched_tokens (its start-up log says)")
    args = ap.parse_args(argv)
    res = json.load(open(args.result))
    folder = args.traces or os.path.dirname(os.path.abspath(args.result))

    @functools.lru_cache(maxsize=None)  # one server's trace serves its workloads and both tables: read once
    def load_trace(name: str) -> dict | None:
        path = os.path.join(folder, name)
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
            path += ".gz"  # (committed traces are kept compressed: ~1 MB each with hooks part by part)
        if not os.path.exists(path):
            return None
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
                return json.load(f)
        except ValueError as e:  # cut off: an engine killed while writing it (before the suite's
            # --shutdown-timeout); the per-class table is still right without it
            print(f"{path}: not a whole trace ({e}); its server's requests are reported without step windows",
                  file=sys.stderr)
            return None
    rows = classify(res["results"], lambda name, n, i, o: bench_serve_prompts(args.model, n, i, o), args.block_size,
                    load_trace)
    if not any(r.get("per_request") for r in res["results"]):
        raise SystemExit(f"{args.result}: no serving result with per-request times (suites before NOTES #73 kept none)")
    if any(r.get("per_request") and "chunks" not in r["per_request"] for r in res["results"]):
        print("Note: this suite predates NOTES #106: its per-request TPOT is the mean gap between streamed "
              "chunks, not vLLM's TPOT; the two part once the server streams several tokens per chunk "
              "(at 16 req/s). The result's own tpot_p50_ms is vLLM's. The step-kind windows below end by "
              "that TPOT, so their 'share of the run' can be low.\n")
    if rows:  # (random prompts only: the -distinct workloads have no hit classes)
        print(markdown(rows))
    print(f"By time: each run's requests in {args.parts} slices, in the order sent:\n")
    print(by_time(res["results"], args.parts))
    if any(r["window"] for r in rows):
        print("What the server's steps did between each request's arrival and its first token (means):\n")
        print(window_markdown(rows))
    adm = admission(res["results"], load_trace, args.batch_tokens)
    if adm:
        print("From each request's send to the step that admitted it (NOTES #107; the k-th admitted is taken "
              "as the k-th sent):\n")
        print(admission_markdown(adm))
    kinds = step_kinds(res["results"], load_trace)
    if kinds:
        print("Each traced server's steps during each run, by what they scheduled:\n")
        print(step_kinds_markdown(kinds))
    stalls = flag_stalls(res["results"], load_trace)
    if stalls:
        print("Each traced server's longest waits at the mapping flag, with the steps before them (NOTES #117):\n")
        print(flag_stalls_markdown(stalls))


if __name__ == "__main__":
    main()
