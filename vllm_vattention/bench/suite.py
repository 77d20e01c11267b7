"""The A/B suite: stock vLLM against vAttention, every system of a workload in the same device call.

    vattn-bench --out benchmarks/results --max-seconds 540      # run (resumes where it stopped)
    vattn-bench --out benchmarks/results --report               # tables and plot from what is there

Each (workload, system, repetition) is one job in a fresh engine (a `vllm bench` subprocess). One
command may run at most 10 minutes on the device, so the suite stops starting jobs when the next
would not fit in `--max-seconds`, and a later call resumes from the JSON it wrote. Jobs run
workload by workload, systems interleaved within a repetition, so each ratio compares runs made
on the same machine minutes apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from .env import environment, header

SYSTEMS: dict[str, dict] = {
    "stock-fa3": {"env": {}, "args": []},
    "stock-flashinfer": {"env": {}, "args": ["--attention-backend", "FLASHINFER"]},
    "vattn-fa2": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION"}, "args": []},
    "vattn-fa3": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa3"}, "args": []},
    "vattn-per-layer": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_LAYOUT": "per_layer"}, "args": []},
}
BASELINE = "stock-fa3"
DEFAULT_CANDIDATE = "vattn-fa2"
METRICS = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
           "tpot_p50_ms", "tpot_p99_ms", "max_concurrent_requests")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "throughput" (vllm bench throughput) or "serve" (vllm bench serve at a request rate)
    input_len: int
    output_len: int
    num_prompts: int
    request_rate: float | None = None
    est_seconds: int = 150  # one job, engine start included, on an H100 (planning only)


WORKLOADS = [
    Workload("1024-in-128-out", "throughput", 1024, 128, 300),
    Workload("8192-in-256-out", "throughput", 8192, 256, 100, est_seconds=180),
    Workload("512-in-1024-out", "throughput", 512, 1024, 300, est_seconds=180),
    Workload("24k-context-decode", "throughput", 24576, 512, 32, est_seconds=200),
    Workload("serve-rate-4", "serve", 1024, 128, 200, request_rate=4.0, est_seconds=170),
    Workload("serve-rate-16", "serve", 1024, 128, 400, request_rate=16.0, est_seconds=170),
    Workload("capacity-300-tokens", "throughput", 280, 20, 2000, est_seconds=150),
]


@dataclass
class Suite:
    model: str
    workloads: list[Workload]
    systems: list[str]
    reps: int
    results: list[dict] = field(default_factory=list)

    def jobs(self) -> list[tuple[Workload, str, int]]:
        return [(w, s, r) for w in self.workloads for r in range(self.reps) for s in self.systems]

    def done(self, w: Workload, system: str, rep: int) -> bool:
        return any(x["workload"] == w.name and x["system"] == system and x["rep"] == rep for x in self.results)


def _kv_capacity(log: str, tokens_per_request: int, block_size: int) -> int | None:
    """Requests of `tokens_per_request` that fit the KV budget at once, from vLLM's start-up log."""
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", log)
    if not m:
        return None
    blocks = int(m.group(1).replace(",", "")) // block_size
    return blocks // -(-tokens_per_request // block_size)


def _block_size(log: str) -> int:
    m = re.search(r"vAttention KV: \d+ blocks of (\d+) tokens", log)
    return int(m.group(1)) if m else 16


def run_job(model: str, w: Workload, system: str, out_dir: str, timeout: int) -> dict:
    """One engine, one measurement. Returns the metrics of issue 4's schema (None where n/a)."""
    spec = SYSTEMS[system]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ATTENTION_BACKEND", "VATTN_DECODE_KERNEL", "VATTN_LAYOUT")}
    env.update(spec["env"])
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    tag = f"{w.name}-{system}-{int(time.time())}"
    raw = os.path.join(out_dir, f"raw-{tag}.json")
    max_len = w.input_len + w.output_len + 64
    cli = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    common = ["--model", model, "--load-format", "dummy", "--max-model-len", str(max_len)]
    res = {k: None for k in METRICS}
    if w.kind == "throughput":
        cmd = cli + ["bench", "throughput", *common, "--input-len", str(w.input_len), "--output-len",
                     str(w.output_len), "--num-prompts", str(w.num_prompts), "--output-json", raw, *spec["args"]]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        log = p.stdout + p.stderr
        if p.returncode != 0:
            raise RuntimeError(f"{system} on {w.name} failed:\n{log[-3000:]}")
        data = json.load(open(raw))
        res["requests_per_s"] = data["requests_per_second"]
        res["total_tokens_per_s"] = data["tokens_per_second"]
        res["output_tokens_per_s"] = data["requests_per_second"] * w.output_len
    else:
        res.update(_run_serve(cli, common, w, spec, env, raw, timeout))
        log = res.pop("_log")
    res["max_concurrent_requests"] = _kv_capacity(log, w.input_len + w.output_len, _block_size(log))
    stats = re.search(r"vAttention mapper stats: (\{.*?\})", log)
    res["mapper"] = stats.group(1) if stats else None
    if os.path.exists(raw):
        os.remove(raw)
    return res


def wait_healthy(port: int, server: subprocess.Popen, timeout: float) -> None:
    import http.client
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def _run_serve(cli, common, w: Workload, spec, env, raw, timeout) -> dict:
    port = 8190
    model = common[1]
    server = subprocess.Popen(cli + ["serve", model, *common[2:], "--port", str(port), *spec["args"]],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(port, server, timeout / 2)
        client = cli + ["bench", "serve", "--model", model, "--port", str(port), "--dataset-name", "random",
                        "--random-input-len", str(w.input_len), "--random-output-len", str(w.output_len),
                        "--num-prompts", str(w.num_prompts), "--request-rate", str(w.request_rate),
                        "--ignore-eos", "--save-result", "--result-filename", raw]
        p = subprocess.run(client, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"bench serve failed:\n{(p.stdout + p.stderr)[-3000:]}")
        d = json.load(open(raw))
    finally:
        server.terminate()
        log, _ = server.communicate(timeout=120)
    return {"requests_per_s": d.get("request_throughput"), "output_tokens_per_s": d.get("output_throughput"),
            "total_tokens_per_s": d.get("total_token_throughput"), "ttft_p50_ms": d.get("median_ttft_ms"),
            "ttft_p99_ms": d.get("p99_ttft_ms"), "tpot_p50_ms": d.get("median_tpot_ms"),
            "tpot_p99_ms": d.get("p99_tpot_ms"), "_log": log}


def run(suite: Suite, path: str, max_seconds: float, job: Callable = run_job, env: dict | None = None,
        clock: Callable[[], float] = time.monotonic, log=print) -> int:
    """Run the jobs not yet in `path` while they fit in `max_seconds`. Returns how many are left."""
    env = env or environment()
    start = clock()
    todo = [j for j in suite.jobs() if not suite.done(*j)]
    for i, (w, system, rep) in enumerate(todo):
        if clock() - start + w.est_seconds > max_seconds:
            log(f"[suite] stopping: {len(todo) - i} job(s) left for the next call")
            return len(todo) - i
        log(f"[suite] {i + 1}/{len(todo)}: {w.name} / {system} / rep {rep} ...")
        t = clock()
        try:
            metrics = job(suite.model, w, system, os.path.dirname(path) or ".", int(max_seconds))
            error = None
        except Exception as e:  # noqa: BLE001 - a failed system is recorded, the suite goes on
            metrics, error = {k: None for k in METRICS}, str(e)[-2000:]
        suite.results.append({"workload": w.name, "system": system, "rep": rep, **metrics,
                              "seconds": round(clock() - t, 1), "error": error})
        save(suite, path, env)
        log(f"[suite]   {system}: {metrics.get('requests_per_s')} req/s" + (f"  ERROR {error[:200]}" if error else ""))
    return 0


def save(suite: Suite, path: str, env: dict) -> None:
    doc = {"gpu": env.get("gpu"), "driver": env.get("driver"), "commit": env.get("commit"),
           "vllm": env.get("vllm"), "torch": env.get("torch"), "date": env.get("date"), "model": suite.model,
           "results": suite.results}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def summarize(results: list[dict], metric: str = "requests_per_s") -> list[dict]:
    """Per workload and system: median over repetitions, spread (min, max), ratio to stock-fa3, and
    whether the ratio lies outside both systems' spread (only then does it count)."""
    rows = []
    by_w: dict[str, dict[str, list[float]]] = {}
    for r in results:
        if r.get(metric) is not None and not r.get("error"):
            by_w.setdefault(r["workload"], {}).setdefault(r["system"], []).append(r[metric])
    for w, systems in by_w.items():
        base = systems.get(BASELINE)
        for s, vals in systems.items():
            med = statistics.median(vals)
            row = {"workload": w, "system": s, "n": len(vals), "median": med, "min": min(vals), "max": max(vals),
                   "ratio": None, "significant": None}
            if base:
                bmed = statistics.median(base)
                row["ratio"] = med / bmed
                row["significant"] = min(vals) > max(base) or max(vals) < min(base)
            rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    env = {k: doc.get(k) for k in ("gpu", "driver", "torch", "vllm", "commit", "date")}
    lines = ["# vAttention A/B suite", "", header(env), "", f"Model: `{doc.get('model')}`", "",
             "| workload | system | runs | req/s median | min | max | vs stock-fa3 | outside spread |",
             "|---|---|---|---|---|---|---|---|"]
    rows = summarize(doc["results"])
    for r in rows:
        ratio = f"{r['ratio']:.3f}x" if r["ratio"] is not None else "-"
        sig = {True: "yes", False: "no", None: "-"}[r["significant"]]
        lines.append(f"| {r['workload']} | {r['system']} | {r['n']} | {r['median']:.2f} | {r['min']:.2f} | "
                     f"{r['max']:.2f} | {ratio} | {sig} |")
    ratios = [r["ratio"] for r in rows if r["system"] == DEFAULT_CANDIDATE and r["ratio"]]
    if ratios:
        geo = statistics.geometric_mean(ratios)
        lines += ["", f"Geometric mean of {DEFAULT_CANDIDATE} / {BASELINE} over {len(ratios)} workload(s): {geo:.3f}x"]
    errors = [r for r in doc["results"] if r.get("error")]
    if errors:
        lines += ["", "Failed runs:"] + [f"- {r['workload']} / {r['system']}: {r['error'][:300]!r}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(doc: dict, png: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summarize(doc["results"]) if r["ratio"] is not None]
    workloads = sorted({r["workload"] for r in rows})
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(workloads)), 4))
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        xs = [j + i * width for j, w in enumerate(workloads)]
        ys = [next((r["ratio"] for r in rows if r["workload"] == w and r["system"] == s), 0) for w in workloads]
        ax.bar(xs, ys, width, label=s)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads, rotation=20, ha="right")
    ax.set_ylabel("requests/s vs stock-fa3 (median)")
    ax.set_title(f"{doc.get('gpu')} @ {doc.get('commit')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/llama-3.1-8b")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=540)
    ap.add_argument("--report", action="store_true", help="only write the table and plot")
    args = ap.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown system(s) {sorted(unknown)}; choose from {list(SYSTEMS)}")
    chosen = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{env['date']}-{(env['gpu'] or 'cpu').replace(' ', '-')}")
    path = stem + ".json"
    suite = Suite(args.model, chosen, args.systems.split(","), args.reps)
    if os.path.exists(path):
        suite.results = json.load(open(path))["results"]
    if not args.report:
        left = run(suite, path, args.max_seconds, env=env)
        print(f"[suite] {left} job(s) left" if left else "[suite] all jobs done")
    doc = json.load(open(path)) if os.path.exists(path) else {**env, "results": []}
    with open(stem + ".md", "w") as f:
        f.write(markdown(doc))
    plotted = plot(doc, stem + ".png")
    print(markdown(doc))
    print(f"[suite] wrote {stem}.json, .md" + (", .png" if plotted else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
