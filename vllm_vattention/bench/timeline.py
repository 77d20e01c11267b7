"""Where the GPU sat idle in a torch.profiler trace, and whether the CPU or a wait kept it idle.

    python3 -m vllm_vattention.bench.timeline TRACE.json[.gz] ... --out timeline.md

Reads the Chrome-trace JSON that torch.profiler writes (vLLM's worker profiler included:
`offline.py --timeline DIR`). GPU activity (kernels, memcpy, memset) is merged into busy intervals;
every gap between two of them is classified by the launch of the work that ended it (matched by
CUPTI's correlation id):

- `cpu_late`: the launch call began after the GPU went idle, so the GPU waited for the CPU (the
  engine thread was still preparing the step, or blocked somewhere);
- `gpu_waited`: the work had been launched before the GPU went idle, so something on the GPU held
  it back: a stream wait (vAttention's cuStreamWaitValue32 on the mapping flag) or an event;
- `unknown`: no launch with that correlation id in the trace.

For the longest gaps it also names the CPU ops the launching thread was inside when the gap began
(what the CPU was doing while the GPU waited). Per engine step (vLLM's `execute_context_...`
annotations): the GPU's span, busy time and the idle time before the step, and for the first two
traces a step-by-step comparison (which steps a system loses time in). Nsight Systems is not usable on the device machines
(.library/device/KINDS.md), CUPTI through torch.profiler is.

It also lists the trace's memory-management API calls (device and pinned host allocations, host
registration, VMM calls where CUPTI recorded them) by name and thread, and the longest of them with
the step they fell in: on an H200, another thread pinning 64-256 MiB of host memory made the
native thread's VMM calls take up to 34 ms (benchmarks/NOTES.md #141), the length of the engine's
slow cuMemSetAccess calls. With `--batches OFFLINE_JSON` (a run with `--timeline-delay 0`, whose
worker marked CLOCK_MONOTONIC in the trace) it places the native thread's slowest batches in the
trace, with every thread's API calls while each ran (NOTES #143).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os

from vllm_vattention.bench.offline import CLOCK_MARK  # the clock annotation (offline.clock_marker)
from vllm_vattention.bench.suite import batch_times, drained_by  # (a kept native batch's later values)

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
CPU_CATS = ("cpu_op", "python_function", "user_annotation")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def _corr(e: dict):
    args = e.get("args") or {}
    return args.get("correlation", args.get("External id"))


def _merged(spans: list[tuple]) -> list[list]:
    """(start, end, item) spans with overlapping (or touching) ones merged: [start, end, the first
    item] in time order."""
    out: list[list] = []
    for s, t, item in sorted(spans, key=lambda x: x[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t)
        else:
            out.append([s, t, item])
    return out


def analyze(events: list[dict], top: int = 10, min_gap_us: float = 0.0) -> dict:
    """Busy time, idle gaps by cause, and the `top` longest gaps (times in ms)."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        raise ValueError("no GPU activity in the trace (was CUDA activity profiled?)")
    launches = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATS and _corr(e) is not None:
            launches[_corr(e)] = e
    busy_spans = _merged([(e["ts"], e["ts"] + e["dur"], e) for e in gpu])
    busy = sum(t - s for s, t, _ in busy_spans)
    # an idle gap ends where the next busy span begins: its first work is what the GPU waited for
    gaps = [(prev[1], s, e) for prev, (s, _, e) in zip(busy_spans, busy_spans[1:]) if s - prev[1] > min_gap_us]
    span = busy_spans[-1][1] - gpu[0]["ts"]
    by_cause = {"cpu_late": 0.0, "gpu_waited": 0.0, "unknown": 0.0}
    rows = []
    for g0, g1, nxt in gaps:
        launch = launches.get(_corr(nxt))
        if launch is None:
            cause = "unknown"
        elif launch["ts"] <= g0:
            cause = "gpu_waited"
        else:
            cause = "cpu_late"
        by_cause[cause] += g1 - g0
        rows.append((g1 - g0, g0, cause, nxt, launch))
    rows.sort(key=lambda r: -r[0])
    cpu_by_thread: dict = {}
    for e in events:
        if e.get("cat") in CPU_CATS:
            cpu_by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in cpu_by_thread.values():
        evs.sort(key=lambda e: e["ts"])
    t0 = gpu[0]["ts"]
    longest = []
    for length, g0, cause, nxt, launch in rows[:top]:
        inside = []
        if launch is not None:
            evs = cpu_by_thread.get((launch.get("pid"), launch.get("tid")), [])
            i = bisect.bisect_right([e["ts"] for e in evs], g0)
            inside = [e["name"] for e in evs[:i] if e["ts"] + e["dur"] >= g0][-4:]  # innermost last
        longest.append({"at_ms": round((g0 - t0) / 1e3, 3), "gap_ms": round(length / 1e3, 3), "cause": cause,
                        "next": nxt.get("name", "")[:60], "launch": (launch or {}).get("name", ""),
                        "cpu_inside": inside})
    return {"span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
            "busy_share": round(busy / span, 4) if span else None, "gaps": len(gaps),
            "idle_ms": {k: round(v / 1e3, 3) for k, v in by_cause.items()}, "longest": longest}


STEP_PREFIX = "execute_context"  # vLLM's annotation of each step's launch ("execute_context_N(..)_generation_M(..)")


def per_step(events: list[dict]) -> list[dict]:
    """The GPU work of each engine step: work launched from the start of a step's annotation until
    the next one's (its sampling included) belongs to it. Per step: the GPU's span from its first
    work to its last, its busy time, and the idle time before its first work (since the previous
    step's last), in ms; the annotation's CPU time."""
    steps = sorted((e for e in events if e.get("cat") in CPU_CATS and e.get("name", "").startswith(STEP_PREFIX)),
                   key=lambda e: e["ts"])
    if not steps:
        return []
    starts = [e["ts"] for e in steps]
    launches = {_corr(e): e for e in events if e.get("cat") in LAUNCH_CATS and _corr(e) is not None}
    work: list[list[tuple[float, float]]] = [[] for _ in steps]
    for e in events:
        if e.get("cat") not in GPU_CATS:
            continue
        launch = launches.get(_corr(e))
        i = bisect.bisect_right(starts, launch["ts"]) - 1 if launch is not None else -1
        if i >= 0:
            work[i].append((e["ts"], e["ts"] + e["dur"]))
    t0 = min((w[0][0] for w in work if w), default=0.0)
    out, prev_end = [], None
    for ann, w in zip(steps, work):
        if not w:
            continue
        first, last = min(s for s, _ in w), max(t for _, t in w)
        out.append({"step": len(out), "name": ann["name"][:60], "cpu_ms": round(ann["dur"] / 1e3, 3),
                    "gpu_start_ms": round((first - t0) / 1e3, 3), "gpu_span_ms": round((last - first) / 1e3, 3),
                    "busy_ms": round(sum(t - s for s, t, _ in _merged([(s, t, None) for s, t in w])) / 1e3, 3),
                    "idle_before_ms": round((first - prev_end) / 1e3, 3) if prev_end is not None else None})
        prev_end = last if prev_end is None else max(prev_end, last)
    return out


def _origin(events: list[dict]) -> float:
    """The trace's first GPU work (or first event): where the report's `at_ms` count from."""
    gpu = [e["ts"] for e in events if e.get("cat") in GPU_CATS]
    return min(gpu) if gpu else min((e["ts"] for e in events), default=0.0)


def _step_finder(events: list[dict]):
    """ts -> the index of the engine step (STEP_PREFIX annotation) it fell in, None outside them all."""
    steps = sorted((e for e in events if e.get("cat") in CPU_CATS and e.get("name", "").startswith(STEP_PREFIX)),
                   key=lambda e: e["ts"])
    starts = [e["ts"] for e in steps]

    def step_of(ts: float):
        i = bisect.bisect_right(starts, ts) - 1
        return i if i >= 0 and ts <= steps[i]["ts"] + steps[i]["dur"] else None
    return step_of


MEMORY_CALLS = ("cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaHostRegister", "cudaHostUnregister", "cuMemAlloc",
                "cuMemFree", "cuMemHost", "cuMemCreate", "cuMemMap", "cuMemUnmap", "cuMemSetAccess", "cuMemRelease",
                "cuMemAddress")  # name prefixes (cudaFreeHost, cudaMallocHost, cuMemHostAlloc, ..._v2 included)


def memory_calls(events: list[dict], top: int = 10) -> dict:
    """The trace's memory-management API calls (MEMORY_CALLS): per name, calls, total and longest ms
    and the threads that made them; and the `top` longest, with their start (ms from the trace's
    first GPU work, or first event), thread and the engine step whose annotation they fell in (None
    outside every step)."""
    calls = [e for e in events if e.get("cat") in LAUNCH_CATS and e.get("name", "").startswith(MEMORY_CALLS)]
    t0, step_of = _origin(events), _step_finder(events)
    by_name: dict[str, dict] = {}
    for e in calls:
        b = by_name.setdefault(e["name"], {"name": e["name"], "calls": 0, "total_ms": 0.0, "max_ms": 0.0, "threads": set()})
        b["calls"] += 1
        b["total_ms"] += e["dur"] / 1e3
        b["max_ms"] = max(b["max_ms"], e["dur"] / 1e3)
        b["threads"].add(e.get("tid"))
    rows = sorted(by_name.values(), key=lambda b: -b["total_ms"])
    for b in rows:
        b["total_ms"], b["max_ms"] = round(b["total_ms"], 3), round(b["max_ms"], 3)
        b["threads"] = sorted(b["threads"], key=str)
    longest = [{"at_ms": round((e["ts"] - t0) / 1e3, 3), "ms": round(e["dur"] / 1e3, 3), "name": e["name"],
                "tid": e.get("tid"), "step": step_of(e["ts"])} for e in sorted(calls, key=lambda e: -e["dur"])[:top]]
    return {"by_name": rows, "longest": longest}


def beside_batches(events: list[dict], batches: list[list], top: int = 4) -> list[dict] | None:
    """The native thread's slowest batches (its stats' `native_slowest_batches` rows: latency,
    queued, running ms, ..., submission in CLOCK_MONOTONIC seconds at [7], CPU ms at [8], voluntary
    switches at [10], background ops its drains ran at [12]) placed in the trace through its
    CLOCK_MARK annotation, with every thread's traced API calls (CUPTI runtime and driver) while
    each batch ran: per call name, the calls, their time inside the batch's running span and their
    threads, the `top` by that time. The native thread's own driver calls are not in it (CUPTI does
    not record them), so what shows is who else used the driver meanwhile (NOTES #141: another
    thread pinning host memory slows VMM calls; #143: the engine pins none of note). None without
    the annotation (the trace began later than the mark)."""
    mark = next((e for e in events if e.get("name", "").startswith(CLOCK_MARK)), None)
    if mark is None:
        return None
    offset = mark["ts"] - 1e6 * float(mark["name"][len(CLOCK_MARK):])  # trace us - monotonic us
    t0, step_of = _origin(events), _step_finder(events)
    end = max(e["ts"] + e["dur"] for e in events)
    calls = sorted((e for e in events if e.get("cat") in LAUNCH_CATS), key=lambda e: e["ts"])
    call_starts = [e["ts"] for e in calls]
    longest = max((e["dur"] for e in calls), default=0.0)
    out = []
    for b in batches:
        lat, queued, run, submitted = b[0], b[1], b[2], b[7]
        s = offset + 1e6 * submitted + 1e3 * queued
        t = s + 1e3 * run
        times = batch_times(b)
        row = {"latency_ms": lat, "run_ms": run, "cpu_ms": times[0] if times else None,
               "voluntary": times[2] if times else None, "drained": drained_by(b), "at_ms": round((s - t0) / 1e3, 3),
               "in_trace": mark["ts"] <= s <= end, "step": step_of(s), "calls": []}
        by: dict[str, dict] = {}
        lo = bisect.bisect_left(call_starts, s - longest)
        for e in calls[lo:bisect.bisect_right(call_starts, t)]:
            inside = min(t, e["ts"] + e["dur"]) - max(s, e["ts"])
            if inside <= 0:
                continue
            c = by.setdefault(e["name"], {"name": e["name"], "calls": 0, "inside_ms": 0.0, "threads": set()})
            c["calls"] += 1
            c["inside_ms"] += inside / 1e3
            c["threads"].add(e.get("tid"))
        for c in sorted(by.values(), key=lambda c: -c["inside_ms"])[:top]:
            row["calls"].append({**c, "inside_ms": round(c["inside_ms"], 3), "threads": sorted(c["threads"], key=str)})
        out.append(row)
    return out


LAZY_LOAD = "Lazy Function Loading"  # CUPTI's overhead record of a CUDA module loaded on a kernel's first use


def gpu_waits(events: list[dict], min_ms: float = 5.0, top: int = 10, slack_ms: float = 1.0) -> dict:
    """CPU ops that waited for the GPU: ops of at least `min_ms` that began while GPU work launched
    before them was still pending and ended within `slack_ms` of the last of it finishing (a sync,
    wherever it hides: no synchronizing API call need show in the trace). Only the innermost such op
    is counted (aten::linear > matmul > mm counts mm). Per op name: how many, the total ms, and how
    many had a CUDA lazy module load inside (CUPTI's "Lazy Function Loading" overhead: loading a
    kernel's module on its first use waits for the device); and the `top` longest, with the Python
    function around each where the trace has stacks (torch_profiler_with_stack; `offline.py
    --timeline-stack`). NOTES #145: in both stock and vAttention, the lm_head's aten::mm waited for
    the step's forward in every prefill step with a new number of requests, each time for a lazy
    load of the GEMM kernel for that shape."""
    gpu = {}
    for e in events:
        if e.get("cat") in GPU_CATS and _corr(e) is not None:
            gpu[_corr(e)] = e["ts"] + e["dur"]
    done = sorted((e["ts"], gpu[_corr(e)]) for e in events if e.get("cat") in LAUNCH_CATS and _corr(e) in gpu)
    starts, prefix_end, m = [ts for ts, _ in done], [], float("-inf")
    for _, end in done:
        m = max(m, end)
        prefix_end.append(m)  # the last GPU end of the work launched so far

    def waited(op: dict) -> bool:
        i = bisect.bisect_left(starts, op["ts"])
        if i == 0:
            return False
        last = prefix_end[i - 1]
        end = op["ts"] + op["dur"]
        return op["ts"] < last <= end and end - last <= 1e3 * slack_ms
    long_ops = [e for e in events if e.get("cat") == "cpu_op" and e["dur"] >= 1e3 * min_ms]
    hits = [e for e in long_ops if waited(e)]
    by_tid: dict = {}
    for e in hits:
        by_tid.setdefault(e.get("tid"), []).append(e)
    inner = []
    for evs in by_tid.values():  # drop an op that holds another hit of its thread (keep the innermost)
        for e in evs:
            if not any(o is not e and o["ts"] >= e["ts"] and o["ts"] + o["dur"] <= e["ts"] + e["dur"]
                       and o["dur"] < e["dur"] for o in evs):
                inner.append(e)
    lazy = sorted(e["ts"] for e in events if e.get("name", "").startswith(LAZY_LOAD))

    def loaded_inside(op: dict) -> bool:
        i = bisect.bisect_left(lazy, op["ts"])
        return i < len(lazy) and lazy[i] <= op["ts"] + op["dur"]
    py = sorted((e for e in events if e.get("cat") == "python_function"), key=lambda e: e["ts"])
    py_starts = [e["ts"] for e in py]

    def caller(op: dict) -> str | None:
        """The innermost Python function of the op's thread that holds it (begun at most 1 s before)."""
        best = None
        for i in range(bisect.bisect_right(py_starts, op["ts"]) - 1, -1, -1):
            e = py[i]
            if op["ts"] - e["ts"] > 1e6:
                break
            if e.get("tid") == op.get("tid") and e["ts"] + e["dur"] >= op["ts"] + op["dur"]:
                if best is None or e["dur"] < best["dur"]:
                    best = e
        return best["name"][:120] if best else None
    by_name: dict[str, list] = {}
    for e in inner:
        by_name.setdefault(e["name"], []).append((e["dur"] / 1e3, loaded_inside(e)))
    t0 = _origin(events)
    return {"by_name": sorted(({"name": n, "ops": len(d), "total_ms": round(sum(ms for ms, _ in d), 3),
                                "lazy_loads": sum(lz for _, lz in d)} for n, d in by_name.items()),
                              key=lambda r: -r["total_ms"]),
            "lazy_loads_in_trace": len(lazy),
            "longest": [{"at_ms": round((e["ts"] - t0) / 1e3, 3), "ms": round(e["dur"] / 1e3, 3), "name": e["name"],
                         "tid": e.get("tid"), "lazy_load": loaded_inside(e), "caller": caller(e)}
                        for e in sorted(inner, key=lambda e: -e["dur"])[:top]]}


def label(path: str) -> str:
    """A trace's name in the report: its folder and the file name's first part (vLLM names the
    worker's traces alike in every run, so the folder tells the systems apart)."""
    path = os.path.abspath(path)
    return f"{os.path.basename(os.path.dirname(path))}:{os.path.basename(path).split('.')[0]}"


def markdown(reports: dict[str, dict]) -> str:
    lines = ["| trace | span ms | GPU busy ms | busy | gaps | idle: CPU late ms | idle: GPU waited ms | idle: unknown ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        i = r["idle_ms"]
        lines.append(f"| {name} | {r['span_ms']:.1f} | {r['busy_ms']:.1f} | {100 * r['busy_share']:.1f}% | "
                     f"{r['gaps']} | {i['cpu_late']:.1f} | {i['gpu_waited']:.1f} | {i['unknown']:.1f} |")
    named = [(n, r) for n, r in reports.items() if r.get("steps")]
    if len(named) >= 2:  # the first two traces step by step (the same workload in two systems)
        (a, ra), (b, rb) = named[:2]
        lines += ["", f"Per step, {a} (A) against {b} (B): GPU span from a step's first work to its last, and "
                  "the idle time before it (ms)", "",
                  "| step | A step | A span | B span | B - A | A idle before | B idle before |", "|---|---|---|---|---|---|---|"]
        for x, y in zip(ra["steps"], rb["steps"]):
            lines.append(f"| {x['step']} | {x['name']} | {x['gpu_span_ms']:.3f} | {y['gpu_span_ms']:.3f} | "
                         f"{y['gpu_span_ms'] - x['gpu_span_ms']:+.3f} | {x['idle_before_ms'] if x['idle_before_ms'] is not None else '-'} | "
                         f"{y['idle_before_ms'] if y['idle_before_ms'] is not None else '-'} |")
    for name, r in reports.items():
        lines += ["", f"Longest gaps, {name}:", "", "| at ms | gap ms | cause | next GPU work | its launch | CPU inside |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {g['at_ms']} | {g['gap_ms']} | {g['cause']} | `{g['next']}` | {g['launch']} | "
                  f"{' > '.join(g['cpu_inside']) or '-'} |" for g in r["longest"]]
    for name, r in reports.items():
        mem = r.get("memory_calls")
        if not mem or not mem["by_name"]:
            continue
        lines += ["", f"Memory-management API calls, {name}:", "", "| call | calls | total ms | longest ms | threads |",
                  "|---|---|---|---|---|"]
        lines += [f"| {b['name']} | {b['calls']} | {b['total_ms']:.3f} | {b['max_ms']:.3f} | "
                  f"{', '.join(str(t) for t in b['threads'])} |" for b in mem["by_name"]]
        lines += ["", "| at ms | ms | call | thread | step |", "|---|---|---|---|---|"]
        lines += [f"| {c['at_ms']} | {c['ms']} | {c['name']} | {c['tid']} | {'-' if c['step'] is None else c['step']} |"
                  for c in mem["longest"]]
    for name, r in reports.items():
        waits = r.get("gpu_waits")
        if not waits or not waits["by_name"]:
            continue
        lines += ["", f"CPU ops that waited for the GPU (ended as the work launched before them finished), {name}; "
                  f"CUDA lazy module loads in the trace: {waits['lazy_loads_in_trace']}:",
                  "", "| op | ops | total ms | with a lazy module load inside |", "|---|---|---|---|"]
        lines += [f"| {w['name']} | {w['ops']} | {w['total_ms']:.1f} | {w['lazy_loads']} |" for w in waits["by_name"]]
        lines += ["", "| at ms | ms | op | thread | lazy load | Python caller |", "|---|---|---|---|---|---|"]
        lines += [f"| {w['at_ms']} | {w['ms']} | {w['name']} | {w['tid']} | {'yes' if w['lazy_load'] else 'no'} | "
                  f"{w['caller'] or '-'} |" for w in waits["longest"]]
    for name, r in reports.items():
        near = r.get("native_batches")
        if not near:
            continue
        lines += ["", f"The native thread's slowest batches and the traced API calls of every thread while each ran, {name}:",
                  "", "| at ms | step | batch ms | running ms | CPU ms | sleeps | background ops its drains ran | "
                  "calls meanwhile: ms inside (calls, threads) |", "|---|---|---|---|---|---|---|---|"]
        for b in near:
            seen = "; ".join(f"{c['name']} {c['inside_ms']} ({c['calls']}, {', '.join(str(t) for t in c['threads'])})"
                             for c in b["calls"]) or "none"
            lines.append(f"| {b['at_ms'] if b['in_trace'] else 'outside the trace'} | "
                         f"{'-' if b['step'] is None else b['step']} | {b['latency_ms']} | {b['run_ms']} | "
                         f"{'-' if b['cpu_ms'] is None else b['cpu_ms']} | {'-' if b['voluntary'] is None else b['voluntary']} | "
                         f"{'-' if b['drained'] is None else b['drained']} | {seen} |")
    return "\n".join(lines) + "\n"


def batches_of(path: str) -> list[list]:
    """The native thread's slowest batches from bench.offline's JSON (its profiled workload's mapper
    report), [] where it has none (stock)."""
    with open(path) as f:
        doc = json.load(f)
    for r in doc.get("results", []):
        if r.get("profiled"):
            return (r.get("mapper") or {}).get("native_slowest_batches") or []
    return []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", help="torch.profiler Chrome traces (.json or .json.gz)")
    ap.add_argument("--out", required=True, help="markdown report (a .json beside it holds the numbers)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--batches", default=None, metavar="OFFLINE_JSON",
                    help="bench.offline's JSON of the run that wrote the traces (--timeline-delay 0): place "
                         "the native thread's slowest batches in the traces of the folder named as the JSON "
                         "(tl-vattn.json: tl-vattn/)")
    args = ap.parse_args(argv)
    batches = batches_of(args.batches) if args.batches else []
    run = os.path.splitext(os.path.basename(args.batches))[0] if args.batches else None
    reports = {}
    for p in args.traces:
        events = load(p)
        mine = batches and os.path.basename(os.path.dirname(os.path.abspath(p))) == run  # tl-vattn.json: tl-vattn/
        reports[label(p)] = {**analyze(events, top=args.top), "steps": per_step(events),
                             "memory_calls": memory_calls(events, top=args.top),
                             "gpu_waits": gpu_waits(events, top=args.top),
                             "native_batches": beside_batches(events, batches) if mine else None}
    with open(args.out, "w") as f:
        f.write(markdown(reports))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(reports, f, indent=1)
    print(markdown(reports))


if __name__ == "__main__":
    main()
