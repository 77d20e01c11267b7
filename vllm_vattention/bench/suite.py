"""The A/B suite: stock vLLM against vAttention, every system of a workload in the same device call.

    vattn-bench --out benchmarks/results --max-seconds 540      # run (resumes where it stopped)
    vattn-bench --out benchmarks/results --report               # tables and plot from what is there

A job is one fresh engine (a subprocess) for one system and repetition, running every workload of
its group in turn: the offline workloads in one `LLM` (bench/offline.py), the serving workloads
against one `vllm serve` with `vllm bench serve` at each rate. One command may run at most 10
minutes on the device, so jobs come in rounds (each repetition of stock-fa3 with the default
vAttention system; the other systems one job per round), the suite starts a round only if it fits
in `--max-seconds`, and a later call resumes from the JSON it wrote. The baseline and the default
candidate of a repetition therefore always ran in the same call, minutes apart.
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

from . import procstat
from .env import engine_env, environment, header, pyplot, results_stem, save_figure, write_markdown

SYSTEMS: dict[str, dict] = {
    "stock-fa3": {"env": {}, "args": []},
    "stock-flashinfer": {"env": {}, "args": ["--attention-backend", "FLASHINFER"]},
    # the default configuration, whatever it is at the commit a result names: since benchmarks/NOTES.md
    # #29 with spare frames, since #58 with lent blocks too, since #114 with fa2-graphs' rule for mixed
    # steps (before it fa2's); results of earlier commits (c8909ba and before) without spares
    "vattn-fa2": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION"}, "args": []},
    # the default before NOTES.md #114: FA2 for every one-token query, FA3 for the rest, so two
    # attention ops per layer in a mixed step (decode-only steps run as with fa2-graphs)
    "vattn-fa2-two-ops": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa2"}, "args": []},
    "vattn-fa3": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa3"}, "args": []},
    # FA2 in decode-only steps (CUDA graphs), FA3 for all of a mixed batch: one attention op per layer
    # there (NOTES #89)
    "vattn-fa2-graphs": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa2-graphs"},
                         "args": []},
    "vattn-per-layer": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_LAYOUT": "per_layer"}, "args": []},
    # the default and fa2-graphs (the same since NOTES.md #114) with FA3's scheduler metadata computed
    # once per step for every layer, as stock vLLM does (VATTN_FA3_SCHEDULE=1; NOTES.md #91)
    "vattn-fa2-sched": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA3_SCHEDULE": "1"}, "args": []},
    "vattn-fa2-graphs-sched": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_DECODE_KERNEL": "fa2-graphs",
                                       "VATTN_FA3_SCHEDULE": "1"}, "args": []},
    # named settings, so that a run keeps its meaning when the default changes: stream mode with the
    # clipped FA3 view and no spare frames (the default from benchmarks/NOTES.md #21 to #29), the
    # native thread joined before each step, and the former default before that (mapping on the
    # engine thread, a guard page behind every FA3 row)
    "vattn-stream-clipped": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_BACKGROUND_MAP": "stream",
                                     "VATTN_FA3_GUARD": "clipped", "VATTN_SPARE_BLOCKS": "0",
                                     "VATTN_LEND_BLOCKS": "0"}, "args": []},
    "vattn-bg-clipped": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_BACKGROUND_MAP": "1",
                                 "VATTN_FA3_GUARD": "clipped"}, "args": []},
    "vattn-sync": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_BACKGROUND_MAP": "0",
                           "VATTN_FA3_GUARD": "always"}, "args": []},
    # 1024 spare frames (2 GiB for Llama-3-8B: one 16K-token step of new requests' fresh blocks) warmed
    # ahead of time (NOTES.md #23); the default's auto gives the same count there since #29
    "vattn-spare": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_SPARE_BLOCKS": "1024",
                            "VATTN_LEND_BLOCKS": "0"}, "args": []},
    # the default with spares kept in running requests' growth slots (NOTES.md #61)
    "vattn-growth": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_GROWTH_AHEAD": "1"}, "args": []},
    # FA3's guards kept for their requests' lives, as before NOTES.md #62 (the default's decode kernel,
    # fa2-graphs, keeps them since #114, so this system is the default there; with fa2 it is not)
    "vattn-keep-guards": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_KEEP_GUARDS": "1"}, "args": []},
    # rows in FIFO order only: a request with prefix hits gets a warm row and maps every hit (the
    # default before benchmarks/NOTES.md #71)
    "vattn-fifo-rows": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_PREFIX_ROWS": "0"}, "args": []},
    # warm() plans after every step, prefill chunks or not (the default before NOTES.md #100)
    "vattn-warm-now": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_WARM_DEFER": "0"}, "args": []},
    # a full alias scan bounded to what the rows warm() stopped at need (NOTES #118; the default since #120,
    # named for the runs before it)
    "vattn-bounded-scan": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_BOUNDED_SCAN": "1"}, "args": []},
    # the alias scan before NOTES #120 made the bounded one the default: every spare outside the rows warm() reached
    "vattn-full-scan": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_BOUNDED_SCAN": "0"}, "args": []},
    "vattn-row-drain": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_ROW_DRAIN": "1"}, "args": []},
    # the stale frames in a prefix row's guard left in place (the default before NOTES #126)
    "vattn-stale-guards-kept": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_STALE_GUARDS": "0"},
                                "args": []},
    # decode-only steps with 450K tokens of context or more run FA3 over the rows outside a full CUDA graph
    # (NOTES #128: 8192-in-256-out's decode steps, 64 x ~8.3K; not 16K decode's 24 x ~16.4K, where FA2 is faster);
    # the default since NOTES #133, named for the runs before it
    "vattn-fa3-long-decode": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA3_DECODE_TOKENS": "450000"},
                              "args": []},
    # every decode-only step in FA2 (full CUDA graphs), long or not: the default before NOTES #133
    "vattn-fa2-long-decode": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA3_DECODE_TOKENS": "0"},
                              "args": []},
    # the default without its per-request condition on long decode steps (VATTN_FA3_DECODE_ROW_TOKENS=0,
    # NOTES #134): mixed-64-4096-in's 450K-token decode batches of 64-4,600-token rows run FA3 too (NOTES #137)
    "vattn-fa3-mixed-decode": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA3_DECODE_ROW_TOKENS": "0"},
                               "args": []},
    # FA2 decode over the batch sorted longest first (VATTN_FA2_ORDER=longest-first; NOTES #138)
    "vattn-fa2-longest-first": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA2_ORDER": "longest-first"},
                                "args": []},
    # the default with hazard waits on host words the GPU writes, not CUDA events (NOTES #124)
    "vattn-value-fence": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FENCE": "value"}, "args": []},
    # the default from NOTES.md #29 to #57: spare frames, no lent blocks
    "vattn-no-lend": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_LEND_BLOCKS": "0"}, "args": []},
    # the frames of never-used blocks lent as spares (NOTES.md #47): one step's fresh blocks more, with
    # no memory taken from the KV budget; the default does the same since #58
    "vattn-lend": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_LEND_BLOCKS": "auto"}, "args": []},
    # the default with FA2 decode's keys split in 4 (NOTES.md #48; on an H100 vattn-kbench found no count
    # better than FA2's heuristic over the default's rows, #53)
    "vattn-split4": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_FA2_SPLITS": "4"}, "args": []},
    # per_layer rows with FA2 decode's keys split in 4: vattn-kbench's best count for per_layer rows
    # at 64 x 4K, 24 x 16K and 8 x 32K on an H100, where FA2's heuristic lost 13-15% (NOTES.md #53)
    "vattn-per-layer-s4": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION", "VATTN_LAYOUT": "per_layer",
                                   "VATTN_FA2_SPLITS": "4"}, "args": []},
    # 32-token blocks: each block one 4 MiB allocation, mapped with one call each (NOTES.md #49, #52)
    "vattn-bs32": {"env": {"VLLM_ATTENTION_BACKEND": "VATTENTION"}, "args": ["--block-size", "32"]},
}
# Every variable that selects a system: cleared from the caller's environment before a system's own
# are set, so that one engine's settings never leak into another's.
SYSTEM_VARS = tuple(sorted({k for spec in SYSTEMS.values() for k in spec["env"]}))
BASELINE = "stock-fa3"
DEFAULT_CANDIDATE = "vattn-fa2"
METRICS = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
           "tpot_p50_ms", "tpot_p99_ms", "max_concurrent_requests")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "offline" (LLM.generate), "serve" (vllm bench serve at request_rate), "capacity" (KV budget)
    input_len: int
    output_len: int
    num_prompts: int
    request_rate: float | None = None
    # offline only: lengths drawn per request from [input_min, input_len] and [output_min, output_len]
    input_min: int | None = None
    output_min: int | None = None
    # serve only: "random" (`vllm bench serve --dataset-name random`: over this repository's 536-token
    # tokenizer its prompts share prefixes, so many blocks are prefix-cache hits, NOTES #71) or
    # "distinct" (prompts of random words, no two sharing a block: a custom dataset written per run)
    dataset: str = "random"

    def spec(self) -> list:
        """bench/offline.py's --workloads entry."""
        base = [self.name, self.input_len, self.output_len, self.num_prompts]
        return base if self.input_min is None else base + [self.input_min, self.output_min]


WORKLOADS = [
    Workload("1024-in-128-out", "offline", 1024, 128, 300),
    Workload("8192-in-256-out", "offline", 8192, 256, 64),
    Workload("512-in-1024-out", "offline", 512, 1024, 256),
    Workload("16k-context-decode", "offline", 16384, 1024, 24),
    # mixed lengths, as a serving mix has: every prefill row but the longest gets FA3's guard
    # (benchmarks/NOTES.md #62); inputs 64-4,096 and outputs 32-512 tokens, drawn per request (seeded)
    Workload("mixed-64-4096-in", "offline", 4096, 512, 300, input_min=64, output_min=32),
    Workload("serve-rate-4", "serve", 1024, 128, 120, request_rate=4.0),
    Workload("serve-rate-16", "serve", 1024, 128, 240, request_rate=16.0),
    # the same rates without prefix hits (typical random traffic; a real tokenizer's random prompts
    # would rarely share a block either)
    Workload("serve-rate-4-distinct", "serve", 1024, 128, 120, request_rate=4.0, dataset="distinct"),
    Workload("serve-rate-16-distinct", "serve", 1024, 128, 240, request_rate=16.0, dataset="distinct"),
    # How many 300-token requests fit at once in the KV budget vLLM's profiling gives each system
    # (read from the offline engine's start-up log: same GPU, same --gpu-memory-utilization).
    Workload("capacity-300-tokens", "capacity", 280, 20, 0),
]
# A job is one fresh engine running every chosen workload of its group in turn.
GROUP_OF = {"offline": "offline", "capacity": "offline", "serve": "serve"}
# A job's expected seconds: an engine start, then each workload (H200: 121-156 s for the five offline
# workloads; H100: 109-162 s for three, the longest a fresh machine's first engine with the FA2 JIT
# cache restored; a server's start and stop ~150 s (torch.compile, CUDA graphs), ~30 s per serving
# rate: 233 s for stock's two rates, 172 s for one), so that a call with fewer workloads plans for
# fewer seconds. Not included: the first FA2 engine on a fresh Hopper machine without the JIT cache
# compiles FA2's PTX (README, "First start"; +100-130 s), so run an offline job first there.
START_SECONDS = {"offline": 90, "serve": 150}
WORKLOAD_SECONDS = {"offline": 22, "capacity": 22, "serve": 40}


def job_seconds(workloads: list[Workload]) -> float:
    """Expected seconds of one job (one fresh engine) running `workloads`, all of one group."""
    return START_SECONDS[GROUP_OF[workloads[0].kind]] + sum(WORKLOAD_SECONDS[w.kind] for w in workloads)


def planned_seconds(results: list[dict], workloads: list[Workload], system: str, first: bool = True) -> float:
    """Seconds to plan for one job: job_seconds(), or what this system took for these workloads in
    the results so far if longer: the longest for a call's first round (the machine may be fresh,
    and a fresh machine's first engine is the slowest), the median for later ones. On an H100 the
    fixed estimate of the time (111 s for three offline workloads) was short of what jobs took
    (109-162 s): twice a round began that the call's limit then cut off, and what it had run was lost."""
    names = {w.name for w in workloads}
    jobs: dict[tuple, tuple[set, float]] = {}  # (rep, call) -> (its workloads, job_seconds): a job's rows share both
    for r in results:
        if r.get("system") == system and not r.get("partial") and r.get("job_seconds") is not None:
            jobs.setdefault((r.get("rep"), r.get("call")), (set(), float(r["job_seconds"])))[0].add(r.get("workload"))
    # only jobs that ran exactly these workloads: a job of more (or fewer) says little about this one
    took = [secs for ran, secs in jobs.values() if ran == names]
    if not took:
        return job_seconds(workloads)
    return max(job_seconds(workloads), max(took) if first else statistics.median(took))


@dataclass
class Suite:
    model: str
    workloads: list[Workload]
    systems: list[str]
    reps: int  # for the baseline and the default candidate
    extra_reps: int = 1  # for the other systems
    results: list[dict] = field(default_factory=list)
    tp: int = 1  # --tensor-parallel-size of every engine
    paired: tuple[str, ...] = (DEFAULT_CANDIDATE,)  # run `reps` times, each time with the baseline

    def reps_of(self, system: str) -> int:
        return self.reps if system == BASELINE or system in self.paired else min(self.extra_reps, self.reps)

    def rounds(self) -> list[list[tuple[str, str, int]]]:
        """Jobs (group, system, rep) in rounds that must share a device call: each repetition of the
        baseline with the default candidate, then the other systems one per round."""
        out = []
        for group in dict.fromkeys(GROUP_OF[w.kind] for w in self.workloads):
            main = [s for s in self.systems if s == BASELINE or s in self.paired]
            for rep in range(self.reps):
                out.append([(group, s, rep) for s in main])
            for s in self.systems:
                if s not in main:
                    out += [[(group, s, rep)] for rep in range(self.reps_of(s))]
        return [r for r in out if r]

    def group_workloads(self, group: str) -> list[Workload]:
        return [w for w in self.workloads if GROUP_OF[w.kind] == group]

    def done(self, group: str, system: str, rep: int) -> bool:
        """Every workload of the job has its row (rows a killed job left, marked partial, do not count:
        the job runs again and replaces them)."""
        have = {x["workload"] for x in self.results
                if x["system"] == system and x["rep"] == rep and not x.get("partial")}
        return all(w.name in have for w in self.group_workloads(group))


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


def _mapper_stats(log: str) -> dict | None:
    """The last 'vAttention mapper stats' line an engine logged at shutdown."""
    found = re.findall(r"vAttention mapper stats: (\{.*?\})\s*$", log, re.M)
    if not found:
        return None
    import ast
    return ast.literal_eval(found[-1])


def run_job(model: str, group: str, workloads: list[Workload], system: str, out_dir: str, timeout: int,
            tp: int = 1, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One fresh engine runs `workloads` in turn. Returns one row per workload (issue 4's schema,
    None where a metric does not apply). A serving job hands each row to `on_row` as its rate
    completes, so that a job cut off by the call's time limit keeps what it measured."""
    env = engine_env(SYSTEMS[system]["env"], SYSTEM_VARS)
    raw = os.path.join(out_dir, f"raw-{group}-{system}-{int(time.time())}.json")
    cli = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    rows = []
    if group == "offline":
        timed = [w for w in workloads if w.kind == "offline"]
        spec = [w.spec() for w in timed] or [["smoke", 64, 16, 4]]
        cmd = [sys.executable, "-m", "vllm_vattention.bench.offline", "--model", model, "--workloads",
               json.dumps(spec), "--out", raw, "--tensor-parallel-size", str(tp)]
        cmd += SYSTEMS[system]["args"]  # engine flags, as `vllm serve` takes them (offline.py takes these)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        log = p.stdout + p.stderr
        with open(os.path.join(out_dir, f"log-{group}-{system}.txt"), "w") as f:
            f.write(log)
        if p.returncode != 0:
            raise RuntimeError(f"{system} offline job failed:\n{log[-3000:]}")
        data = json.load(open(raw))
        by_name = {r["workload"]: r for r in data["results"]}
        for w in workloads:
            row = {k: None for k in METRICS}
            if w.kind == "offline":
                r = by_name[w.name]
                row.update({k: r[k] for k in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")})
                row["elapsed_s"] = r.get("elapsed_s")
                row["mapper"] = r.get("mapper")
                row["worker_calls"] = r.get("worker_calls")
                row["step_phases"] = r.get("step_phases")
            row["max_concurrent_requests"] = _kv_capacity(log, w.input_len + w.output_len, _block_size(log))
            rows.append({"workload": w.name, **row})
    else:
        rows = _run_serve(cli, model, workloads, system, env, raw, timeout, tp, on_row)
    if os.path.exists(raw):
        os.remove(raw)
    return rows


def http_get(port: int, path: str, timeout: float) -> tuple[int, str]:
    """GET `path` from the server on this machine's `port`: (status, body). OSError when it does not answer."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        resp = c.getresponse()
        return resp.status, resp.read().decode()
    finally:
        c.close()


def wait_healthy(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if http_get(port, "/health", timeout=2)[0] == 200:
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


class RunningServer:
    """`with RunningServer(cmd, env, port, start_timeout, log_path) as s:` - `vllm serve` (cmd) started
    and healthy on `port` inside the block, stopped after it; `s.log` then holds its output, also when
    start-up or the block failed. The output goes to a file as it is written (`log_path`, else a
    temporary one), never to a pipe: nobody reads a pipe while the block runs, and a server that
    logs more than the pipe holds (64 KiB: vLLM logs every request) would block on its next write."""

    def __init__(self, cmd: list[str], env: dict, port: int, start_timeout: float, log_path: str | None = None):
        self.cmd, self.env, self.port, self.start_timeout, self.log_path = cmd, env, port, start_timeout, log_path
        self.log = ""
        self._proc: subprocess.Popen | None = None
        self._file = None

    def __enter__(self) -> "RunningServer":
        import tempfile
        self._file = open(self.log_path, "w+") if self.log_path else tempfile.TemporaryFile("w+")
        try:
            self._proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._file, stderr=subprocess.STDOUT, text=True)
        except BaseException:
            self._file.close()
            raise
        try:
            wait_healthy(self.port, self._proc, self.start_timeout)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    @property
    def pid(self) -> int:
        """The server process's pid (the API server; the engine runs in a process below it)."""
        return self._proc.pid

    def _stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._file.seek(0)
        self.log = self._file.read()
        self._file.close()


def free_port() -> int:
    """A TCP port no one listens on now: servers of two suites running side by side (one per GPU,
    device_checks.sh suite_pair) must not both take a fixed one."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distinct_prompts(model: str, w: Workload, path: str) -> str:
    """Writes `w.num_prompts` prompts of `w.input_len` tokens of random words (seeded by the
    workload's name), no two alike in their first block, as a JSONL file for `vllm bench serve
    --dataset-name custom`. Returns `path`."""
    import random
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(w.name)
    words = [t for t in (tok.decode([i]).strip() for i in range(min(tok.vocab_size, 4096))) if t.isalpha()]
    with open(path, "w") as f:
        for _ in range(w.num_prompts):
            text = " ".join(rng.choice(words) for _ in range(2 * w.input_len))
            ids = tok(text, add_special_tokens=False).input_ids[:w.input_len]
            f.write(json.dumps({"prompt": tok.decode(ids)}) + "\n")
    return path


def per_request(d: dict) -> dict | None:
    """Each request's TTFT and TPOT (ms) from `vllm bench serve --save-detailed`'s result, in the
    order the client sent them (by start time, which is the dataset's order at a fixed rate), with
    its start (s after the first), prompt length and how many chunks its tokens were streamed in;
    None without the per-request lists. Lets a later analysis split TTFT by what each request was
    (e.g. its prefix hits: NOTES #73).

    TPOT is vLLM's own definition, (latency - TTFT) / (output tokens - 1), with the output length
    from `output_lens`. Until NOTES #106 it was the mean of the request's inter-chunk latencies,
    which is a different number once the server streams several tokens in one chunk (a busy API
    server does: at 16 req/s the two differed by up to 5x for the same run)."""
    starts, ttfts, itls, lens = (d.get(k) for k in ("start_times", "ttfts", "itls", "input_lens"))
    if not (starts and ttfts and itls and lens) or not len(starts) == len(ttfts) == len(itls) == len(lens):
        return None
    outs = d.get("output_lens")
    if not outs or len(outs) != len(starts):
        return None
    t0 = min(starts)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    return {"t0": t0,  # time.perf_counter of the first request: the server's step trace uses the same clock
            "start_s": [round(starts[i] - t0, 4) for i in order],
            "ttft_ms": [round(ttfts[i] * 1e3, 3) for i in order],
            "tpot_ms": [round(sum(itls[i]) / (outs[i] - 1) * 1e3, 3) if outs[i] > 1 and itls[i] else None
                        for i in order],
            "chunks": [len(itls[i]) + 1 for i in order],  # fewer than the tokens: the server coalesced
            "input_len": [lens[i] for i in order]}


def _dataset_args(model: str, w: Workload, raw: str) -> list[str]:
    """`vllm bench serve`'s dataset flags for workload `w`."""
    if w.dataset == "distinct":
        path = distinct_prompts(model, w, f"{raw}.{w.name}.jsonl")
        return ["--dataset-name", "custom", "--dataset-path", path, "--custom-output-len", str(w.output_len),
                "--skip-chat-template"]
    return ["--dataset-name", "random", "--random-input-len", str(w.input_len), "--random-output-len", str(w.output_len)]


SERVER_SHUTDOWN_S = 30  # seconds a stopping server gives its engine to shut down (it needs ~1)


# The server's own latency histograms (vLLM's /metrics), whose means split a request's TTFT into
# where it went (NOTES #107): the API server's TTFT runs from the request's arrival there to its
# first token's output there; the engine's queue time from the engine queueing it to first
# scheduling it; its prefill time from then to the first token.
SERVER_HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "queue": "vllm:request_queue_time_seconds",
                     "prefill": "vllm:request_prefill_time_seconds", "itl": "vllm:inter_token_latency_seconds"}


_PROM_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)", re.M)


def parse_histograms(text: str) -> dict[str, tuple[float, float]]:
    """Prometheus text: each of SERVER_HISTOGRAMS' (sum, count), summed over its label sets."""
    out = {k: [0.0, 0.0] for k in SERVER_HISTOGRAMS}
    names = {v: k for k, v in SERVER_HISTOGRAMS.items()}
    for m in _PROM_SAMPLE.finditer(text):
        name, value = m.group(1), m.group(2)
        for suffix, i in (("_sum", 0), ("_count", 1)):
            key = names.get(name[: -len(suffix)]) if name.endswith(suffix) else None
            if key:
                out[key][i] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def scrape_histograms(port: int) -> dict[str, tuple[float, float]] | None:
    """The running server's histograms now; None when /metrics does not answer (then the row has no
    split: a failed scrape must not cost the run)."""
    try:
        status, text = http_get(port, "/metrics", timeout=10)
    except OSError:
        return None
    return parse_histograms(text) if status == 200 else None


def _scrape_after(port: int, before: dict | None, requests: int, wait_s: float = 3.0) -> dict | None:
    """The histograms once the run's requests are all in them: vLLM records the queue and prefill
    times when a request finishes, in the API server's output loop, which can trail the client's
    last token by a step or two; polled for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        after = scrape_histograms(port)
        if (after is None or before is None or after["queue"][1] - before["queue"][1] >= requests
                or time.monotonic() > deadline):
            return after
        time.sleep(0.1)


def histogram_means(before: dict | None, after: dict | None) -> dict | None:
    """Mean ms of each histogram over what one workload's run added (its requests, and the one test
    request `vllm bench serve` sends first), with how many requests the server saw finish."""
    if not before or not after:
        return None
    out: dict = {}
    for k in SERVER_HISTOGRAMS:
        total, n = after[k][0] - before[k][0], after[k][1] - before[k][1]
        out[f"{k}_ms_mean"] = round(total / n * 1e3, 3) if n > 0 else None
    out["requests"] = int(after["queue"][1] - before["queue"][1])
    return out


def _children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children so far (the `vllm bench serve` clients)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_serve(cli, model: str, workloads: list[Workload], system: str, env, raw, timeout, tp: int = 1,
               on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One server; `vllm bench serve` at each workload's request rate in turn."""
    port = free_port()
    max_len = max(w.input_len + w.output_len for w in workloads) + 64
    # --shutdown-timeout: at vLLM's default (0) a stopping server kills its engine process at once, and
    # the engine's shutdown log (the mapper stats) and step trace were lost or cut off (NOTES #81)
    cmd = cli + ["serve", model, "--load-format", "dummy", "--max-model-len", str(max_len),
                 "--port", str(port), "--tensor-parallel-size", str(tp),
                 "--shutdown-timeout", str(SERVER_SHUTDOWN_S), *SYSTEMS[system]["args"]]
    results = []
    # each step's timing (worker.StepTrace; for stock, vLLM's own runner with only that: worker.TracedWorker)
    trace = os.path.join(os.path.dirname(raw), f"steps-{system}-{int(time.time())}.json")
    env = {**(env or {}), "VATTN_STEP_TRACE": trace}
    server = RunningServer(cmd, env, port, timeout / 2, os.path.join(os.path.dirname(raw), f"log-serve-{system}.txt"))
    with server:
        for w in workloads:
            before = scrape_histograms(port)
            client = cli + ["bench", "serve", "--model", model, "--port", str(port), *_dataset_args(model, w, raw),
                            "--num-prompts", str(w.num_prompts), "--request-rate", str(w.request_rate),
                            "--ignore-eos", "--save-result", "--save-detailed", "--result-filename", raw]
            cpu_before, client_before = procstat.snapshot(server.pid), _children_cpu_s()
            try:
                p = subprocess.run(client, env=env, capture_output=True, text=True, timeout=timeout)
            finally:
                if w.dataset == "distinct" and os.path.exists(f"{raw}.{w.name}.jsonl"):
                    os.remove(f"{raw}.{w.name}.jsonl")
            cpu = {**procstat.between(cpu_before, procstat.snapshot(server.pid)),
                   "client_cpu_s": round(_children_cpu_s() - client_before, 3)}
            if p.returncode != 0:
                raise RuntimeError(f"bench serve failed:\n{(p.stdout + p.stderr)[-3000:]}")
            d = json.load(open(raw))
            results.append({"workload": w.name, "requests_per_s": d.get("request_throughput"),
                            "output_tokens_per_s": d.get("output_throughput"),
                            "total_tokens_per_s": d.get("total_token_throughput"),
                            "ttft_p50_ms": d.get("median_ttft_ms"), "ttft_p99_ms": d.get("p99_ttft_ms"),
                            "tpot_p50_ms": d.get("median_tpot_ms"), "tpot_p99_ms": d.get("p99_tpot_ms"),
                            "ttft_mean_ms": d.get("mean_ttft_ms"), "tpot_mean_ms": d.get("mean_tpot_ms"),
                            "server": histogram_means(before, _scrape_after(port, before, w.num_prompts)),
                            "per_request": per_request(d), "cpu": cpu})
            if on_row:
                on_row(dict(results[-1]))
    log = server.log
    mapper = _mapper_stats(log)  # the server's whole run, both rates
    for r, w in zip(results, workloads):
        r["max_concurrent_requests"] = _kv_capacity(log, w.input_len + w.output_len, _block_size(log))
        r["mapper"] = mapper
        r["step_trace"] = os.path.basename(trace) if trace and os.path.exists(trace) else None
    return results


def run(suite: Suite, path: str, max_seconds: float, job: Callable = run_job, env: dict | None = None,
        clock: Callable[[], float] = time.monotonic, log=print) -> int:
    """Run the rounds not yet in `path` while they fit in `max_seconds`. Returns jobs left."""
    env = env or environment()
    start = clock()
    call = int(time.time())  # rows of one call share it: a repetition's baseline and candidates pair by it
    todo = [[j for j in r if not suite.done(*j)] for r in suite.rounds()]
    todo = [r for r in todo if r]
    for i, rnd in enumerate(todo):
        est = sum(planned_seconds(suite.results, suite.group_workloads(g), s, first=i == 0) for g, s, _ in rnd)
        if clock() - start + est > max_seconds:
            left = sum(len(r) for r in todo[i:])
            # (say why: a round's systems run in one call, so a round estimated past a whole call's
            # time never starts; fewer systems per round is then the way, NOTES #105)
            log(f"[suite] stopping: {left} job(s) left for the next call (the next round, {len(rnd)} job(s), "
                f"is estimated at {est:.0f} s; {max(0.0, max_seconds - (clock() - start)):.0f} s left)")
            if est > max_seconds:
                log(f"[suite] that round is longer than a whole call of {max_seconds:.0f} s: "
                    "run fewer systems at once")
            return left
        for group, system, rep in rnd:
            log(f"[suite] round {i + 1}/{len(todo)}: {group} / {system} / rep {rep} ...")
            t = clock()
            ws = suite.group_workloads(group)
            # rows of an earlier, cut-off run of this job go; rows this run completes are saved at once
            # (marked partial), so that a call cut off by its time limit keeps what it measured
            suite.results = [x for x in suite.results if not (x["system"] == system and x["rep"] == rep
                                                               and x["workload"] in {w.name for w in ws})]
            completed: list[dict] = []

            def on_row(row: dict, system=system, rep=rep, t=t) -> None:
                completed.append(row)
                secs = round(clock() - t, 1)
                save(suite, path, env, [_result(r, system, rep, call, secs, partial=True) for r in completed])

            errors: dict[str, str] = {}
            try:
                rows = job(suite.model, group, ws, system, os.path.dirname(path) or ".", int(max_seconds),
                           tp=suite.tp, on_row=on_row)
            except Exception as e:  # noqa: BLE001 - a failed system is recorded, the suite goes on
                got = {r["workload"] for r in completed}  # what it measured before it failed stays
                errors = {w.name: str(e)[-2000:] for w in ws if w.name not in got}
                rows = completed + [{"workload": w} for w in errors]
            secs = round(clock() - t, 1)
            for r in rows:
                suite.results.append(_result(r, system, rep, call, secs, errors.get(r["workload"])))
                log(f"[suite]   {r['workload']}: {r.get('requests_per_s')} req/s")
            save(suite, path, env)
            if errors:
                log(f"[suite]   ERROR {next(iter(errors.values()))[-300:]}")
    return 0


def _result(r: dict, system: str, rep: int, call: int, secs: float, error: str | None = None,
            partial: bool = False) -> dict:
    """One row of the JSON: issue 4's metrics (None where not measured) and where the run came from."""
    row = {**{k: None for k in METRICS}, **r, "system": system, "rep": rep, "call": call, "job_seconds": secs,
           "error": error}
    return {**row, "partial": True} if partial else row


def save(suite: Suite, path: str, env: dict, partial: list[dict] = ()) -> None:
    """The suite's results, and the rows of a job still running (`partial`), to `path`."""
    doc = {"gpu": env.get("gpu"), "driver": env.get("driver"), "commit": env.get("commit"),
           "vllm": env.get("vllm"), "torch": env.get("torch"), "date": env.get("date"), "model": suite.model,
           "tensor_parallel_size": suite.tp, "results": suite.results + list(partial)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def summarize(results: list[dict], metric: str = "requests_per_s") -> list[dict]:
    """Per workload and system: median over repetitions, spread (min, max), ratio to stock-fa3, and
    whether the ratio lies outside both systems' spread (only then does it count). Also the paired
    ratios: each repetition against the baseline's run of the same repetition and call (the suite
    runs them minutes apart on one machine), which machine-to-machine drift does not blur."""
    rows = []
    by_w: dict[str, dict[str, list[float]]] = {}
    runs: dict[tuple, float] = {}  # (workload, system, rep, call) -> value
    for r in results:
        if r.get(metric) is not None and not r.get("error"):
            by_w.setdefault(r["workload"], {}).setdefault(r["system"], []).append(r[metric])
            runs[(r["workload"], r["system"], r.get("rep"), r.get("call"))] = r[metric]
    for w, systems in by_w.items():
        base = systems.get(BASELINE)
        for s, vals in systems.items():
            med = statistics.median(vals)
            row = {"workload": w, "system": s, "n": len(vals), "median": med, "min": min(vals), "max": max(vals),
                   "ratio": None, "significant": None, "paired": []}
            if base:
                bmed = statistics.median(base)
                row["ratio"] = med / bmed
                # one run has no spread: nothing can be said to lie outside it
                if len(vals) > 1 and len(base) > 1:
                    row["significant"] = min(vals) > max(base) or max(vals) < min(base)
                if s != BASELINE:
                    row["paired"] = [v / runs[(w, BASELINE, rep, call)] for (ww, ss, rep, call), v in runs.items()
                                     if ww == w and ss == s and runs.get((w, BASELINE, rep, call))]
            rows.append(row)
    return rows


def _paired(r: dict) -> str:
    p = r.get("paired")
    if not p:
        return "-"
    if len(p) == 1:
        return f"{p[0]:.3f}x (1)"
    return f"{statistics.median(p):.3f}x ({min(p):.3f}-{max(p):.3f}, {len(p)})"


def _table(rows: list[dict], title: str, fmt: str = "{:.2f}") -> list[str]:
    lines = [f"| workload | system | runs | {title} median | min | max | vs stock-fa3 | outside spread | "
             "paired per call: median (min-max, pairs) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}x" if r["ratio"] is not None else "-"
        sig = {True: "yes", False: "no", None: "-"}[r["significant"]]
        lines.append(f"| {r['workload']} | {r['system']} | {r['n']} | {fmt.format(r['median'])} | "
                     f"{fmt.format(r['min'])} | {fmt.format(r['max'])} | {ratio} | {sig} | {_paired(r)} |")
    return lines


def _grouped(results: list[dict], pick) -> dict[tuple[str, str], list[dict]]:
    """Runs without an error, grouped by (workload, system), each as `pick(run)`; a run for which
    it gives None is left out."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        v = None if r.get("error") else pick(r)
        if v is not None:
            by.setdefault((r["workload"], r["system"]), []).append(v)
    return by


def _mapper(r: dict) -> dict:
    """A run's mapper report ({} for stock)."""
    return r["mapper"] if isinstance(r.get("mapper"), dict) else {}


def mapping_rows(results: list[dict]) -> list[dict]:
    """Per workload and vAttention system: median share of execute_model time spent on mapping,
    and median driver seconds, over repetitions."""
    def pick(r: dict) -> dict | None:
        m = _mapper(r)
        if m.get("map_share") is None:
            return None
        flag, elapsed = m.get("gpu_flag_wait_seconds"), _elapsed(r)
        # issue 4's "< 1% of step time": in stream mode the engine thread never waits for
        # mapping; the GPU does, at the flag, for this share of the run's wall time
        return {**m, "flag_share": flag / elapsed if flag is not None and elapsed else None}
    by = _grouped(results, pick)
    return [{"workload": w, "system": s, "n": len(ms),
             "map_share": statistics.median(m["map_share"] for m in ms),
             "driver_seconds": statistics.median(m["driver_seconds"] for m in ms),
             "execute_seconds": statistics.median(m["execute_seconds"] for m in ms),
             "block_maps": statistics.median(m["block_maps"] for m in ms),
             "zero_maps": statistics.median(m["zero_maps"] for m in ms),
             "hazard_waits": max(m["hazard_waits"] for m in ms),
             # stream mode: the GPU's time blocked at the mapping flag (None for the other modes)
             "gpu_flag_wait": _median_of(ms, "gpu_flag_wait_seconds"),
             "flag_share": _median_of(ms, "flag_share"),
             # background modes: the native thread's own time in driver calls and in hazard waits
             "native_driver": _median_of(ms, "native_driver_seconds"),
             "native_event_wait": _median_of(ms, "native_event_wait_seconds")} for (w, s), ms in by.items()]


def _elapsed(r: dict) -> float | None:
    """A timed run's wall time: recorded by newer runs; for older ones, its requests over its rate."""
    if r.get("elapsed_s"):
        return r["elapsed_s"]
    w = next((w for w in WORKLOADS if w.name == r["workload"] and w.kind == "offline"), None)
    return w.num_prompts / r["requests_per_s"] if w and r.get("requests_per_s") else None


def _median_of(ms: list[dict], key: str) -> float | None:
    """Median of one counter over repetitions, None where a repetition lacks it (another mode)."""
    return statistics.median(m[key] for m in ms) if all(m.get(key) is not None for m in ms) else None


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def step_rows(results: list[dict]) -> list[dict]:
    """Per workload and system: median worker time per execute_model / sample_tokens call."""
    def pick(r: dict) -> dict | None:
        w = r.get("worker_calls")
        if not (isinstance(w, dict) and w.get("execute_model")):
            return None
        m = _mapper(r)
        steps = m.get("steps") or 0
        # vAttention's own hooks inside execute_model, per step (None for stock, or older runs)
        ours = {k: 1e3 * m[f"{k}_seconds"] / steps if steps and m.get(f"{k}_seconds") is not None else None
                for k in ("prepare_attn", "metadata_build")}
        return {**w, **ours}
    by = _grouped(results, pick)
    nan = float("nan")
    return [{"workload": wl, "system": s, "n": len(ws),
             "calls": statistics.median(w["execute_model"]["calls"] for w in ws),
             "execute_ms": statistics.median(w["execute_model"]["ms_per_call"] for w in ws),
             "sample_ms": statistics.median((w.get("sample_tokens") or {}).get("ms_per_call") or nan for w in ws),
             "prepare_ms": _median_of(ws, "prepare_attn"), "build_ms": _median_of(ws, "metadata_build")}
            for (wl, s), ws in by.items()]


def _span_label(lo: int, hi: int) -> str:
    return f"step {lo}" if hi - lo == 1 else f"steps {lo}-{hi - 1}"


def phase_rows(results: list[dict]) -> list[dict]:
    """Per workload and vAttention system: where in the run its wall time differs from stock's, as
    ms of (candidate - baseline) per phase of the run, each repetition paired with the baseline's
    run of the same repetition and call (offline.step_phases: before the first step, spans of
    steps 0, 1, 2-3, 4-7, ..., after the last), medians over pairs. A span is compared only when
    both runs have it whole (same start, same end); the last span ends at each run's own step
    count, so it is compared only when the counts are equal."""
    runs = {(r["workload"], r["system"], r.get("rep"), r.get("call")): r["step_phases"] for r in results
            if not r.get("error") and isinstance(r.get("step_phases"), dict) and r["step_phases"].get("steps")}

    def total(p: dict) -> float:
        return p["head_ms"] + p["tail_ms"] + sum(b[2] for b in p["buckets"])

    diffs: dict[tuple[str, str], list[dict]] = {}
    for (w, s, rep, call), ph in runs.items():
        base = runs.get((w, BASELINE, rep, call))
        if s == BASELINE or base is None:
            continue
        spans = {(lo, hi): ms for lo, hi, ms in base["buckets"]}
        d = {"before first step": ph["head_ms"] - base["head_ms"]}
        for lo, hi, ms in ph["buckets"]:
            if (lo, hi) in spans:
                d[_span_label(lo, hi)] = ms - spans[(lo, hi)]
        d["after last step"] = ph["tail_ms"] - base["tail_ms"]
        d["whole run"] = total(ph) - total(base)
        diffs.setdefault((w, s), []).append({"d": d, "steps": (ph["steps"], base["steps"])})
    out = []
    for (w, s), ps in diffs.items():
        keys = [k for k in ps[0]["d"] if all(k in p["d"] for p in ps)]
        out.append({"workload": w, "system": s, "n": len(ps),
                    "steps": "/".join(f"{statistics.median(p['steps'][i] for p in ps):.0f}" for i in (0, 1)),
                    "ms": {k: statistics.median(p["d"][k] for p in ps) for k in keys}})
    return out


SPARE_COUNTERS = ("swaps", "warm_maps", "pad_maps", "warm_calls", "warm_stopped_in_flight", "warm_stopped_no_spare",
                  "lent_taken")


def spare_rows(results: list[dict]) -> list[dict]:
    """Per workload and system: how spare frames worked (medians of the counters), the most steps
    in flight and the longest stall at the flag over repetitions; runs without the counters (stock,
    older runs) are left out."""
    def pick(r: dict) -> dict | None:
        m = _mapper(r)
        return m if m.get("spare_frames") and "warm_calls" in m else None
    by = _grouped(results, pick)
    # (spares at the end of the run: the dedicated ones and the lent blocks not handed out, VATTN_LEND_BLOCKS)
    return [{"workload": w, "system": s, "n": len(ms), "spares": statistics.median(m["spare_frames"] for m in ms),
             **{k: statistics.median(m.get(k, 0) for m in ms) for k in SPARE_COUNTERS},
             "inflight_max": max(m.get("inflight_max", 0) for m in ms),
             "longest_stall_ms": _longest_stall(ms)[0],
             "spares_at": _spares_at(ms)}
            for (w, s), ms in by.items()]


def mixed_rule_rows(results: list[dict]) -> list[dict]:
    """Per workload and system (fa2-graphs): its mixed steps by the rule they ran (NOTES #110), one
    FA3 launch per layer or fa2's two (a decode row's guard not in place), and guard extensions
    skipped over the spares' share; medians over repetitions. Runs without the counters are left out."""
    def pick(r: dict) -> dict | None:
        m = _mapper(r)
        one, two = m.get("mixed_steps_one_launch"), m.get("mixed_steps_two_launches")
        return m if one is not None and one + two > 0 else None
    by = _grouped(results, pick)
    rows = []
    for (w, s), ms in by.items():
        one = statistics.median(m["mixed_steps_one_launch"] for m in ms)
        two = statistics.median(m["mixed_steps_two_launches"] for m in ms)
        rows.append({"workload": w, "system": s, "n": len(ms), "one": one, "two": two,
                     "share": one / (one + two) if one + two else None,
                     "over_budget": statistics.median(m.get("warm_guards_over_budget", 0) for m in ms)})
    return rows


def admit_rows(results: list[dict]) -> list[dict]:
    """Per workload and system: how new requests' blocks got into place (manager.admit_counts),
    per admission, medians over repetitions: moved into spares warmed ahead (no driver call), or
    mapped while their step waited, after unmapping what a slot held; and the step changes that
    waited for background ops (DRAIN). Runs without the counters (stock, older runs) are left out."""
    def pick(r: dict) -> dict | None:
        m = _mapper(r)
        n = m.get("admissions")
        return {"admissions": n, **{k: m[f"admit_{k}"] / n for k in ("swaps", "maps", "unmaps")},
                "drains": m.get("drains"), "drains_skipped": m.get("drains_skipped")} if n else None
    by = _grouped(results, pick)
    return [{"workload": w, "system": s, "n": len(ms), **{k: statistics.median(m[k] for m in ms)
                                                          for k in ("admissions", "swaps", "maps", "unmaps")},
             "drains": _median_of(ms, "drains"), "drains_skipped": _median_of(ms, "drains_skipped")}
            for (w, s), ms in by.items()]


def hazard_rows(results: list[dict]) -> list[dict]:
    """Per workload and system: unmaps that waited for a step in flight (hazard waits), the native
    thread's time in those waits, the stale guard frames replaced by spares (VATTN_STALE_GUARDS,
    NOTES #126: first growth slots at admission, rows by guard extension), and how running requests'
    new blocks got into place (moved into spares, mapped, unmapped first); medians over repetitions.
    Runs without the stale-guard counters (stock, runs before #126) are left out."""
    def pick(r: dict) -> dict | None:
        m = _mapper(r)
        return m if "admit_stale_replaced" in m else None
    by = _grouped(results, pick)
    return [{"workload": w, "system": s, "n": len(ms),
             **{k: statistics.median(m.get(k, 0) for m in ms)
                for k in ("hazard_waits", "native_event_wait_seconds", "admit_stale_replaced", "warm_stale_guards",
                          "grow_swaps", "grow_maps", "grow_unmaps")}}
            for (w, s), ms in by.items()]


LONG_DECODE_COUNTERS = ("long_decode_steps_fa3", "long_decode_steps_fa2", "long_decode_steps_mapped", "zero_maps",
                        "guard_ahead_maps", "warm_guards_clipped", "warm_guard_spares_freed", "hazard_waits",
                        "gpu_flag_wait_seconds")


def long_decode_rows(results: list[dict]) -> list[dict]:
    """Per workload and system: its long decode steps (VATTN_FA3_DECODE_TOKENS, NOTES #130-#135) by the
    kernel they ran and those that mapped guard slots on their path, beside what the guards cost: zero-page
    slots, guard slots mapped in the background, warm() calls that clipped the guards, hazard waits and
    the GPU's wait at the flag; medians over repetitions. Runs with no long decode step are left out."""
    def pick(r: dict) -> dict | None:
        m = _mapper(r)
        return m if m.get("long_decode_steps_fa3", 0) + m.get("long_decode_steps_fa2", 0) > 0 else None
    by = _grouped(results, pick)
    return [{"workload": w, "system": s, "n": len(ms),
             **{k: statistics.median(m.get(k, 0) for m in ms) for k in LONG_DECODE_COUNTERS}}
            for (w, s), ms in by.items()]


def _longest_stall(ms: list[dict]) -> list:
    """The longest flag stall over the runs' mapper reports: [ms, index of its wait]; [0, None] if none."""
    return max(((m.get("flag_longest_ms") or [[0, None]])[0] for m in ms), key=lambda x: x[0] or 0)


SPARE_PLACES = ("running", "warm", "idle", "free", "zero_row")


def _spares_at(ms: list[dict]) -> str:
    """Where the spares were at the end of the runs (manager.spares_at; medians), as
    running/warm/idle/free/dummy row; "-" for runs from before the report had it."""
    have = [m["spares_at"] for m in ms if m.get("spares_at")]
    if not have:
        return "-"
    return "/".join(f"{statistics.median(a.get(k, 0) for a in have):.0f}" for k in SPARE_PLACES)


def slow_batch_rows(results: list[dict]) -> list[dict]:
    """Per workload and system: the native thread's slowest batch over the repetitions (the
    mapper's native_slowest_batches: latency, queued, running, slowest op ms, its kind, ops, index),
    with the longest flag stall beside it, to tell a slow driver call from a batch that waited."""
    def pick(r: dict) -> dict | None:
        m = _mapper(r)
        return m if m.get("native_slowest_batches") else None
    by = _grouped(results, pick)
    rows = []
    for (w, s), ms in by.items():
        worst = max((m["native_slowest_batches"][0] for m in ms), key=lambda b: b[0])
        rows.append({"workload": w, "system": s, "n": len(ms), "batch": worst, "stall": _longest_stall(ms)})
    return rows


def batch_times(batch: list) -> tuple | None:
    """Where a kept native batch's running time went (its values 8-11, NOTES #141): CPU ms, run-queue
    ms (None: unknown), voluntary and involuntary context switches; None for batches from before the
    native thread measured them (fewer values)."""
    return tuple(batch[8:12]) if len(batch) >= 12 else None


def drained_by(batch: list) -> int | None:
    """A kept native batch's background ops that its DRAIN / DRAIN_ROW ops ran (value 12, NOTES
    #143); None for batches from before the native thread counted them."""
    return batch[12] if len(batch) >= 13 else None


def _drained_cell(batch: list) -> int | str:
    """drained_by as a table cell ("-" where not counted)."""
    drained = drained_by(batch)
    return "-" if drained is None else drained


def _where_time_went(batch: list) -> list[str]:
    """batch_times as table cells ("-" where not measured)."""
    times = batch_times(batch)
    if times is None:
        return ["-", "-", "-"]
    cpu, runq, vol, invol = times
    return [f"{cpu:.1f}", "-" if runq is None else f"{runq:.1f}", f"{vol} / {invol}"]


def hook_rows(results: list[dict]) -> list[dict]:
    """Per workload and system: median ms per step of each part of our hooks (the worker's
    hook_seconds; runs without it, stock's or older ones, are left out)."""
    def pick(r: dict) -> dict | None:
        parts, steps = _mapper(r).get("hook_seconds"), _mapper(r).get("steps")
        return {k: 1e3 * v / steps for k, v in parts.items()} if parts and steps else None
    by = _grouped(results, pick)
    return [{"workload": wl, "system": s, "n": len(ps), "ms": {k: statistics.median(p[k] for p in ps) for k in ps[0]}}
            for (wl, s), ps in by.items()]


def server_rows(res: list[dict]) -> list[dict]:
    """Per workload and system with the server's histograms: the client's mean TTFT beside the API
    server's and the engine's parts (medians over repetitions). 'outside' (client minus API server)
    is the HTTP hop and the client's own loop; 'frontend' (API server minus the engine's queue +
    prefill) what the API server and the hop to the engine add (tokenizing, IPC, output processing)."""
    def parts(r: dict) -> dict:
        sv, client = r["server"], r.get("ttft_mean_ms")
        ttft, queue, prefill = sv.get("ttft_ms_mean"), sv.get("queue_ms_mean"), sv.get("prefill_ms_mean")
        return {"client": client, "ttft": ttft, "queue": queue, "prefill": prefill, "itl": sv.get("itl_ms_mean"),
                "outside": None if None in (client, ttft) else client - ttft,
                "frontend": None if None in (ttft, queue, prefill) else ttft - queue - prefill}

    return [{"workload": w, "system": sy, "n": len(ps), **_medians(ps, ps[0])}
            for (w, sy), ps in _grouped(res, lambda r: parts(r) if r.get("server") else None).items()]


def _medians(parts: list[dict], keys) -> dict:
    """Per key, the median over repetitions of the values they have (None where none has one)."""
    out = {}
    for k in keys:
        xs = [p[k] for p in parts if p[k] is not None]
        out[k] = statistics.median(xs) if xs else None
    return out


MAPPER_THREAD = "vattn-mapper"  # the native mapping thread's name (csrc/mapper.cpp)


def cpu_rows(res: list[dict]) -> list[dict]:
    """Per serving workload and system: the CPU its processes used over the client's run (NOTES #149;
    medians over repetitions): the API server (the server's own process) and its busiest thread's
    share of the wall time (1.0: an event loop that never waited), the engine (the busiest process
    below it) likewise, of it the native mapping thread's CPU (0 for stock), the server's other
    processes, the client, and the machine's busy CPUs."""
    def parts(r: dict) -> dict:
        c = r["cpu"]
        api = next((p for p in c["procs"] if p["root"]), None)
        below = sorted((p for p in c["procs"] if not p["root"]), key=lambda p: -p["cpu_s"])
        engine = below[0] if below else None
        return {"wall_s": c["wall_s"], "api_s": api and api["cpu_s"], "api_thread": api and api["busiest_thread_share"],
                "engine_s": engine and engine["cpu_s"], "engine_thread": engine and engine["busiest_thread_share"],
                "engine_name": engine and engine["name"], "others_s": sum(p["cpu_s"] for p in below[1:]),
                # the native mapping thread (csrc/mapper.cpp names it), in whichever process runs it
                "mapper_s": sum(p.get("threads_by_name", {}).get(MAPPER_THREAD, 0.0) for p in c["procs"]),
                "client_s": c.get("client_cpu_s"), "machine": c.get("machine_busy_cpus"), "cpus": c.get("cpus")}

    return [{"workload": w, "system": sy, "n": len(ps), "engine_name": ps[0]["engine_name"], "cpus": ps[0]["cpus"],
             **_medians(ps, ("wall_s", "api_s", "api_thread", "engine_s", "engine_thread", "mapper_s", "others_s",
                             "client_s", "machine"))}
            for (w, sy), ps in _grouped(res, lambda r: parts(r) if r.get("cpu") else None).items()]


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _section(title: str, columns: list[str], rows: list[list]) -> list[str]:
    """A markdown section: heading, then a table of `rows` (cells already formatted)."""
    return (["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def markdown(doc: dict) -> str:
    env = {k: doc.get(k) for k in ("gpu", "driver", "torch", "vllm", "commit", "date")}
    res = doc["results"]
    lines = ["# vAttention A/B suite", "", header(env), "", f"Model: `{doc.get('model')}`", "",
             "## Throughput (requests/s; higher is better)", ""]
    rows = summarize(res)
    lines += _table(rows, "req/s")
    lines.append("")
    for system in dict.fromkeys(r["system"] for r in rows if r["system"] != BASELINE):
        ratios = [r["ratio"] for r in rows if r["system"] == system and r["ratio"]]
        if ratios:
            geo = statistics.geometric_mean(ratios)
            lines.append(f"Geometric mean of {system} / {BASELINE} over {len(ratios)} workload(s): {geo:.3f}x  ")
    for metric, title in (("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
                          ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms"),
                          # at 16 req/s the p50 falls between two populations, prefix hits and the
                          # rest, and moves with the mix; the mean does not (NOTES #112)
                          ("tpot_mean_ms", "TPOT mean ms")):
        rows = summarize(res, metric)
        if rows:
            lines += ["", f"## {title} (lower is better)", ""] + _table(rows, title)
    cap = [r for r in summarize(res, "max_concurrent_requests") if r["workload"].startswith("capacity")]
    if cap:
        lines += ["", "## Capacity: requests that fit in the KV budget at once (higher is better)", ""]
        lines += _table(cap, "requests", "{:.0f}")
    split = server_rows(res)
    if split:
        lines += _section("Where TTFT went: the server's own histograms (means in ms, medians over repetitions; "
                          "NOTES #107)",
                          ["workload", "system", "runs", "client TTFT", "API server TTFT", "engine queue",
                           "engine prefill", "client minus API server", "API server minus engine",
                           "inter-token (server)"],
                          [[m["workload"], m["system"], m["n"]] + [_ms(m[k]) for k in
                           ("client", "ttft", "queue", "prefill", "outside", "frontend", "itl")] for m in split])
    cpu = cpu_rows(res)
    if cpu:
        share = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        lines += _section("CPU over each serving run (CPU seconds; a thread's share of the wall time; medians over "
                          "repetitions; NOTES #149)",
                          ["workload", "system", "runs", "wall s", "API server", "its busiest thread",
                           "engine process", "its busiest thread", "of it the mapping thread", "other server processes",
                           "client",
                           "machine: busy CPUs (of)"],
                          [[c["workload"], c["system"], c["n"], _ms(c["wall_s"]), _ms(c["api_s"]), share(c["api_thread"]),
                            f"{_ms(c['engine_s'])} ({c['engine_name'] or '-'})", share(c["engine_thread"]), _ms(c["mapper_s"]),
                            _ms(c["others_s"]), _ms(c["client_s"]),
                            f"{'-' if c['machine'] is None else format(c['machine'], '.1f')} ({c['cpus']})"] for c in cpu])
    maps = mapping_rows(res)
    if maps:
        lines += _section("Page mapping on the engine thread (medians over repetitions)",
                          ["workload", "system", "runs", "mapping / execute_model time", "driver s", "execute_model s",
                           "block maps", "zero-page maps", "max hazard waits", "GPU blocked at flag s",
                           "flag / run time", "native thread: driver s", "native thread: hazard wait s"],
                          [[m["workload"], m["system"], m["n"], f"{100 * m['map_share']:.2f}%", f"{m['driver_seconds']:.3f}",
                            f"{m['execute_seconds']:.2f}", f"{m['block_maps']:.0f}", f"{m['zero_maps']:.0f}",
                            m["hazard_waits"], _secs(m["gpu_flag_wait"]),
                            "-" if m["flag_share"] is None else f"{100 * m['flag_share']:.2f}%", _secs(m["native_driver"]),
                            _secs(m["native_event_wait"])]
                           for m in maps])
    steps = step_rows(res)
    if steps:
        lines += _section("Worker time per call (CPU side of a step; medians over repetitions)",
                          ["workload", "system", "runs", "execute_model calls", "execute_model ms/call",
                           "sample_tokens ms/call", "our prepare_attn ms/step", "our metadata build ms/step"],
                          [[m["workload"], m["system"], m["n"], f"{m['calls']:.0f}", f"{m['execute_ms']:.3f}",
                            f"{m['sample_ms']:.3f}", _secs(m["prepare_ms"]), _secs(m["build_ms"])] for m in steps])
    phases = phase_rows(res)
    for w in dict.fromkeys(p["workload"] for p in phases):
        ps = [p for p in phases if p["workload"] == w]
        names = list(dict.fromkeys(k for p in ps for k in p["ms"]))
        lines += _section(f"{w}: where the run's time differs from {BASELINE}'s (ms, system minus {BASELINE}, "
                          "each run paired with the baseline's of its call; medians over pairs; by engine step)",
                          ["system", "pairs", "steps (its/stock)"] + names,
                          [[p["system"], p["n"], p["steps"]] + [f"{p['ms'][k]:+.1f}" if k in p["ms"] else "-"
                                                                for k in names] for p in ps])
    spares = spare_rows(res)
    if spares:
        lines += _section("Spare frames (medians over repetitions; steps in flight and the longest flag stall: the most)",
                          ["workload", "system", "runs", "spares", "swaps", "warm maps", "guard spares",
                           "warm() planning calls", "stopped: row in flight", "stopped: no spare",
                           "lent blocks handed out", "steps in flight",
                           "longest flag stall ms", "at the end: running/warm/idle/free/dummy row"],
                          [[m["workload"], m["system"], m["n"], f"{m['spares']:.0f}"]
                           + [f"{m[k]:.0f}" for k in SPARE_COUNTERS]
                           + [m["inflight_max"], f"{m['longest_stall_ms']:.1f}", m["spares_at"]] for m in spares])
    mixed = mixed_rule_rows(res)
    if mixed:
        lines += _section("fa2-graphs' mixed steps (medians over repetitions; NOTES #110)",
                          ["workload", "system", "runs", "one FA3 launch", "two launches (a guard not in place)",
                           "one-launch share", "guard extensions skipped (over the spares' share)"],
                          [[m["workload"], m["system"], m["n"], f"{m['one']:.0f}", f"{m['two']:.0f}",
                            "-" if m["share"] is None else f"{100 * m['share']:.0f}%", f"{m['over_budget']:.0f}"]
                           for m in mixed])
    admits = admit_rows(res)
    if admits:
        lines += _section("New requests' blocks, per admission (medians over repetitions)",
                          ["workload", "system", "runs", "admissions", "moved into a spare", "mapped while the step waited",
                           "unmapped first", "steps that waited for background ops (DRAIN)", "DRAINs not needed"],
                          [[m["workload"], m["system"], m["n"], f"{m['admissions']:.0f}", f"{m['swaps']:.1f}",
                            f"{m['maps']:.1f}", f"{m['unmaps']:.1f}", "-" if m["drains"] is None else f"{m['drains']:.0f}",
                            "-" if m["drains_skipped"] is None else f"{m['drains_skipped']:.0f}"] for m in admits])
    hazards = hazard_rows(res)
    if hazards:
        lines += _section("Unmaps that waited for a step in flight, and stale guard frames replaced (medians over "
                          "repetitions; NOTES #124, #126)",
                          ["workload", "system", "runs", "hazard waits", "native thread in them s",
                           "first growth slots replaced at admission", "rows' stale guards replaced in the background",
                           "growth: moved into a spare / mapped / unmapped first"],
                          [[m["workload"], m["system"], m["n"], f"{m['hazard_waits']:.0f}",
                            f"{m['native_event_wait_seconds']:.3f}", f"{m['admit_stale_replaced']:.0f}",
                            f"{m['warm_stale_guards']:.0f}",
                            f"{m['grow_swaps']:.0f} / {m['grow_maps']:.0f} / {m['grow_unmaps']:.0f}"] for m in hazards])
    longs = long_decode_rows(res)
    if longs:
        lines += _section("Long decode steps in FA3 and their guards (medians over repetitions; NOTES #130-#135)",
                          ["workload", "system", "runs", "long steps: FA3 / FA2", "that mapped guard slots on their path",
                           "zero-page slots", "guard slots mapped in the background", "warm() calls with clipped guards",
                           "spares freed from free rows for them", "hazard waits", "GPU at the flag s"],
                          [[m["workload"], m["system"], m["n"],
                            f"{m['long_decode_steps_fa3']:.0f} / {m['long_decode_steps_fa2']:.0f}",
                            f"{m['long_decode_steps_mapped']:.0f}", f"{m['zero_maps']:.0f}", f"{m['guard_ahead_maps']:.0f}",
                            f"{m['warm_guards_clipped']:.0f}", f"{m['warm_guard_spares_freed']:.0f}",
                            f"{m['hazard_waits']:.0f}",
                            f"{m['gpu_flag_wait_seconds']:.3f}"] for m in longs])
    slow = slow_batch_rows(res)
    if slow:
        lines += _section("The native thread's slowest batch (submission to done; the most over repetitions)",
                          ["workload", "system", "runs", "latency ms", "queued ms", "running ms", "slowest op",
                           "ops", "background ops its drains ran", "batch index", "its CPU ms", "waiting for a CPU ms",
                           "switches: voluntary / involuntary", "longest flag stall ms (step)"],
                          [[m["workload"], m["system"], m["n"], f"{m['batch'][0]:.1f}", f"{m['batch'][1]:.1f}",
                            f"{m['batch'][2]:.1f}", f"{m['batch'][4]} {m['batch'][3]:.1f} ms", m["batch"][5],
                            _drained_cell(m["batch"]), m["batch"][6], *_where_time_went(m["batch"]),
                            f"{m['stall'][0]:.1f} ({m['stall'][1]})"]
                           for m in slow])
    parts = hook_rows(res)
    if parts:
        names = list(parts[0]["ms"])
        lines += _section("Our hooks on the engine thread, part by part (ms per step; medians over repetitions)",
                          ["workload", "system", "runs"] + names + ["total"],
                          [[p["workload"], p["system"], p["n"]] + [f"{p['ms'][k]:.3f}" for k in names]
                           + [f"{sum(p['ms'].values()):.3f}"] for p in parts])
    errors = [r for r in res if r.get("error")]
    if errors:
        lines += ["", "Failed runs:"] + [f"- {r['workload']} / {r['system']}: {r['error'][:300]!r}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(doc: dict, png: str) -> bool:
    plt = pyplot()
    if plt is None:
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
    save_figure(fig, png)
    return True


def merge(docs: list[dict], sources: list[str]) -> dict:
    """Runs of one suite made side by side (e.g. one per GPU of a host) as one results document: the
    same GPU model, vLLM, commit and TP; repetitions renumbered so that each keeps its own baseline
    (a repetition's systems always ran on one GPU in one call); each row says which file it came from."""
    keys = ("gpu", "vllm", "commit", "tensor_parallel_size", "model")
    for d, src in zip(docs[1:], sources[1:]):
        diff = [k for k in keys if d.get(k) != docs[0].get(k)]
        if diff:
            raise ValueError(f"{src} differs from {sources[0]} in {diff}: not one experiment")
    out = {k: v for k, v in docs[0].items() if k != "results"}
    out["results"], offset = [], 0
    for d, src in zip(docs, sources):
        reps = [r["rep"] for r in d["results"]]
        out["results"] += [{**r, "rep": r["rep"] + offset, "source": os.path.basename(src)} for r in d["results"]]
        offset += max(reps) + 1 if reps else 0
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/llama-3.1-8b")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--reps", type=int, default=3, help="repetitions of stock-fa3 and the --paired systems")
    ap.add_argument("--paired", default=DEFAULT_CANDIDATE,
                    help="systems run in every repetition, each in the same call as the baseline")
    ap.add_argument("--tag", default="", help="appended to the results file's name (a separate experiment)")
    ap.add_argument("--extra-reps", type=int, default=1, help="repetitions of the other systems")
    ap.add_argument("--max-seconds", type=float, default=540)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only write the table and plot")
    ap.add_argument("--json", default=None, help="with --report: the results file (default: today's, this GPU's)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only merge these results files of one experiment (e.g. one per GPU) into --out/<date>-<gpu>[-tag]")
    args = ap.parse_args(argv)
    unknown = (set(args.systems.split(",")) | set(args.paired.split(","))) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown system(s) {sorted(unknown)}; choose from {list(SYSTEMS)}")
    chosen = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    tp_tag = f"-tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    stem = results_stem(args.out, env, tp_tag + (f"-{args.tag}" if args.tag else ""))
    if args.merge:
        doc = merge([json.load(open(p)) for p in args.merge], args.merge)
        tp = doc.get("tensor_parallel_size") or 1
        stem = results_stem(args.out, doc, (f"-tp{tp}" if tp > 1 else "") + (f"-{args.tag}" if args.tag else ""))
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        args.report, args.json = True, stem + ".json"
    if args.report and args.json:
        stem = args.json[:-len(".json")] if args.json.endswith(".json") else args.json
    path = stem + ".json"
    suite = Suite(args.model, chosen, args.systems.split(","), args.reps, args.extra_reps,
                  tp=args.tensor_parallel_size, paired=tuple(args.paired.split(",")))
    if os.path.exists(path):
        suite.results = json.load(open(path))["results"]
    if not args.report:
        left = run(suite, path, args.max_seconds, env=env)
        print(f"[suite] {left} job(s) left" if left else "[suite] all jobs done")
    doc = json.load(open(path)) if os.path.exists(path) else {**env, "results": []}
    write_markdown(stem, markdown(doc))
    plotted = plot(doc, stem + ".png")
    print(f"[suite] wrote {stem}.json, .md" + (", .png" if plotted else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
