"""Engine-thread time of vAttention's hooks per step under vLLM 0.25's real Scheduler, on a CPU.

The suite's offline workloads (fixed lengths, ignore_eos) are scheduled by vLLM's own Scheduler
(prefix caching on, 16-token blocks unless --block-size, 16,384 batched tokens, 1,024 sequences)
with the KV budget of the suite's H200 engine; each step goes through what the model runner does (worker.py):
`_remove_request` -> RequestRows.remove, `add_requests` -> admit, `update_requests` -> extend,
`prepare_attn`'s mapping part (read_extents, publish), `execute_model`'s record_reads and warm().
The model is not run and nothing is mapped (a null executor: planning alone; a fence done two steps after its own, whose done() calls are
counted: an event query each on a GPU),
so this is the Python the engine thread runs for us, without the GPU's driver and event calls.

    python3 benchmarks/cpu_sched_overhead.py --workload 512-in-1024-out [--profile]
"""

import argparse
import cProfile
import gc
import os
import pstats
import time
from collections import deque

import numpy as np

from cpu_step_overhead import LLAMA3_8B, PAGE, _NoZeroing, _NullExecutor  # this script's neighbour
from vllm_vattention.attention import ops
from vllm_vattention.bench import sched_replay as S
from vllm_vattention.bench import serve_hits
from vllm_vattention.config import DECODE_KERNELS, VattnConfig
from vllm_vattention.memory import KVMemoryManager, RequestRows, make_layout
from vllm_vattention.memory.executor import ACCESS_RO, ACCESS_RW, DRAIN, DRAIN_ROW, MAP, UNMAP
from vllm_vattention.memory.native import NativeExecutor, null_table
from vllm_vattention.worker import has_prefill

DEFAULT_KERNEL = VattnConfig().decode_kernel  # the plugin's default, fa2-graphs since NOTES #114
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {"1024-in-128-out": (1024, 128, 300), "8192-in-256-out": (8192, 256, 64),
             "512-in-1024-out": (512, 1024, 256), "16k-context-decode": (16384, 1024, 24),
             # lengths drawn per request (seeded): input 64 to 4,096, output 32 to 512 (the most of each here)
             "mixed-64-4096-in": (4096, 512, 300),
             # the suite's serving workloads: Poisson arrivals at these rates (seeded), as `vllm bench serve`'s
             "serve-rate-4": (1024, 128, 120), "serve-rate-16": (1024, 128, 240)}
MIXED = {"mixed-64-4096-in": ((64, 4096), (32, 512))}
SERVE = {"serve-rate-4": 4.0, "serve-rate-16": 16.0}
# serving (--rate): a step's simulated milliseconds, fixed + per scheduled token: H200, Llama-3-8B,
# stock's TPOT p50 at 4 requests/s (5.4 ms) and its TTFT p50 for 1,024-token prompts (~40 ms)
STEP_MODEL = (5.4, 0.034)
IDLE_S = 5.0  # --timed: seconds between one drive's last step and the next one's start (server start-up, the client's test request)
PHASES = ("remove", "admit", "extend", "read_extents", "publish", "record_reads", "warm")


# the H200's driver cost per op (vattn-mapbench, sixteenth session, NOTES #82): cuMemMap 4.7 us,
# cuMemUnmap 27.2 us a mapping, cuMemSetAccess 28.1 us a page over a range
MAP_US, UNMAP_US, ACCESS_US_PER_PAGE = 4.7, 27.2, 28.1


class _TimedExecutor:
    """--timed: the native thread in the harness's simulated time. Background ops run one after
    another whenever the thread has nothing else (at the driver's cost per op, above); a step's
    batch runs after the op in progress, a DRAIN in it first runs the background queue up to its
    mark; a DRAIN_ROW (VATTN_ROW_DRAIN) only its row's ops up to the mark, as csrc/mapper.cpp does
    once set_rows has said where rows lie. Per step that handed over a batch: when its last op ran,
    against when the step was planned (the GPU reaches the step's flag between that time and one
    step later, as async scheduling plans a step while the GPU runs the one before)."""

    background_submitted = 0

    def __init__(self, clock: list):
        self.clock = clock  # [the step's planning time (s), ...], set by drive()
        self.queue: deque = deque()  # background ops: [cost (s), row (None: unknown), number, done]
        self.submitted = self.ran = 0  # background ops submitted, and run (in order or by a DRAIN_ROW)
        self.t = 0.0  # when the thread is next free
        self.critical_done = None  # when the current step's batch finished (None: it handed none over)
        self.drained = 0  # background ops the current step's DRAINs ran
        self._rows = None  # set_rows: (base, region_bytes, row_bytes, regions, rows)

    def set_rows(self, base: int, regions: int, region_bytes: int, row_bytes: int, rows: int) -> None:
        self._rows = (base, region_bytes, row_bytes, regions, rows)

    def _row_of(self, op):
        if self._rows is None or op[0] not in (MAP, UNMAP, ACCESS_RW, ACCESS_RO):
            return None
        base, region_bytes, row_bytes, regions, rows = self._rows
        off = op[1] - base
        if off < 0 or off // region_bytes >= regions:
            return None
        row = (off % region_bytes) // row_bytes
        return row if row < rows else None

    def _pop(self) -> float:
        """The next background op not yet run (by a DRAIN_ROW): its cost; 0.0 past the end."""
        while self.queue:
            cost, _, _, done = self.queue.popleft()
            if not done:
                self.ran += 1
                return cost
        return 0.0

    def _front(self):
        while self.queue and self.queue[0][3]:
            self.queue.popleft()
        return self.queue[0] if self.queue else None

    @staticmethod
    def cost(op) -> float:
        kind, _, size, _ = op
        if kind == MAP:
            return MAP_US * 1e-6
        if kind == UNMAP:
            return UNMAP_US * 1e-6
        if kind in (ACCESS_RW, ACCESS_RO):
            return ACCESS_US_PER_PAGE * 1e-6 * max(1, size // PAGE)
        return 0.0  # SIGNAL, DRAIN, WAIT_EVENT (a hazard wait, counted by the mapper, not timed here)

    def _catch_up(self, now: float) -> None:
        while self.t < now and self._front() is not None:
            self.t += self._pop()
        self.t = max(self.t, now)  # (an op still running at `now` keeps the thread busy past it)

    def run_background(self, ops) -> int:
        self._catch_up(self.clock[0])
        for op in ops:
            self.submitted += 1
            self.queue.append([self.cost(op), self._row_of(op), self.submitted, False])
        return self.submitted

    def _drain(self, mark: int) -> None:
        while (front := self._front()) is not None and front[2] <= mark:
            self.t += self._pop()
            self.drained += 1

    def _drain_row(self, row: int, mark: int) -> None:
        upto = [e for e in self.queue if e[2] <= mark and not e[3]]
        mine = [e for e in upto if e[1] == row]
        if not mine:
            return
        if any(e[1] is None for e in upto[:upto.index(mine[-1])]):
            self._drain(mark)  # an op of no row in the way: the queue's order
            return
        for e in mine:
            e[3] = True
            self.t += e[0]
            self.drained += 1
            self.ran += 1

    def run(self, ops) -> None:
        self._catch_up(self.clock[0])
        for op in ops:
            if op[0] == DRAIN:
                self._drain(op[3])
            elif op[0] == DRAIN_ROW:
                self._drain_row(op[2], op[3])
            else:
                self.t += self.cost(op)
        self.critical_done = self.t

    def wait(self): pass
    def poll(self): pass
    def close(self): pass


class _LaggingFence:
    """Done once the step two steps later has been launched (the GPU runs a step or two behind the
    engine thread). Counts done() calls: each is an event query on a GPU."""
    native_handle = 0
    step = 0
    queries = 0

    def __init__(self):
        self.at = _LaggingFence.step

    def done(self):
        _LaggingFence.queries += 1
        return _LaggingFence.step - self.at >= 2

    def wait(self): pass


def bench_serve_prompts(n: int, input_len: int, output_len: int) -> list[list[int]]:
    """The token ids `vllm bench serve --dataset-name random` sends, as the server tokenizes them
    with the repository's tokenizer (536 tokens: the prompts share prefixes, NOTES #71)."""
    return serve_hits.bench_serve_prompts(os.path.join(ROOT, "models", "llama-3.1-8b"), n, input_len, output_len)


def flag_model(timeline: list[tuple]) -> dict:
    """--timed: how long the GPU would wait at the mapping flag. A step's batch is planned while the
    GPU runs the step before, so the GPU waits between `late - the previous step's ms` (at least)
    and `late` (at most) for a batch that ran `late` ms past its planning. Totals, the longest, the
    steps that would wait over 1 ms, the background ops DRAINs ran, and the lower bound per quarter
    of the run's time (where in the run the waits fall)."""
    if not timeline:
        return {}
    t0 = timeline[0][0]
    span = timeline[-1][0] - t0 or 1.0
    lo, hi, drained, new = [], [], [], []
    quarters = [0.0] * 4
    prev_ms = 0.0
    for t, ms, n_new, late, d in timeline:
        if late is not None:
            wait = max(0.0, late - prev_ms)
            lo.append(wait)
            hi.append(late)
            drained.append(d)
            new.append(n_new)
            quarters[min(3, int(4 * (t - t0) / span))] += wait
        prev_ms = ms
    return {"steps_with_a_batch": len(lo), "wait_s_at_least": round(sum(lo) / 1e3, 4),
            "wait_s_at_most": round(sum(hi) / 1e3, 4), "longest_ms_at_least": round(max(lo, default=0), 2),
            "steps_over_1ms_at_least": sum(x > 1 for x in lo),
            "admitting_wait_s_at_least": round(sum(x for x, n in zip(lo, new) if n) / 1e3, 4),
            "drained_ops": sum(drained), "most_drained_in_a_step": max(drained, default=0),
            "wait_s_at_least_by_quarter": [round(q / 1e3, 4) for q in quarters]}


def run(workload: str, num_blocks: int, spares: int | None, max_num_seqs: int = 1024, warmup: bool = True,
        native: bool = False, chain: list[str] | None = None, lend: int | str = 0, block_size: int = 16,
        growth: bool = False, keep_guards: bool = False, decode_kernel: str = DEFAULT_KERNEL,
        serve_prompts: str = "bench", prefix_rows: bool = True, timed: bool = False,
        warm_defer: bool = True, bounded_scan: bool = True, stale_guards: bool = True,
        fa3_decode_tokens: int | None = None, fa3_decode_row_tokens: int | None = None,
        clip_guards: bool = True, row_drain: bool = False) -> dict | list[dict]:
    """One workload in a fresh scheduler and manager; or, with `chain`, the suite's sequence in one
    engine (offline.py): an untimed warm-up of 16 x 64-token prompts (16 out), then each workload of
    `chain` in turn, the counters reset before each (a list of results, one per workload). lend: the
    worker's lend_unused after start-up (VATTN_LEND_BLOCKS; "auto" as the engine's default). block_size: vLLM's (--block-size; 32 is
    one 4 MiB allocation per block for Llama-3-8B). growth: the manager's growth_ahead
    (VATTN_GROWTH_AHEAD). decode_kernel: VATTN_DECODE_KERNEL (fa3: decode rows get FA3's over-read
    guard too, as the worker gives them). serve_prompts: the serving workloads' prompts, "bench" (what
    `vllm bench serve` sends: prefix hits) or "distinct" (no two share a block). prefix_rows: the
    manager's (VATTN_PREFIX_ROWS). warm_defer: VATTN_WARM_DEFER (warm() in a step with prefill chunks
    defers, as the worker asks it to: worker.has_prefill). bounded_scan: VATTN_BOUNDED_SCAN. stale_guards:
    VATTN_STALE_GUARDS. fa3_decode_tokens, fa3_decode_row_tokens: VATTN_FA3_DECODE_TOKENS and _ROW_TOKENS (None: the
    plugin's defaults for decode_kernel; long decode-only steps planned by
    ops.plan_reads(long_decode=True), as the worker does; long_decode_steps_by_rule counts them by the
    rule they ran). clip_guards: after a long decode step, warm(clip_guards=True) as the worker calls it
    (False: as before NOTES #135). timed: the native thread in simulated time (_TimedExecutor): when each step's
    mappings were done (`flag_model`). row_drain: VATTN_ROW_DRAIN (DRAIN_ROW, NOTES #143)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    names = chain or [workload]
    max_len = (max(WORKLOADS[w][0] + WORKLOADS[w][1] for w in names) + 64 if chain
               else WORKLOADS[workload][0] + WORKLOADS[workload][1] + 16)
    if spares is None:  # auto: one step's blocks, at most 2% of the budget
        spares = VattnConfig(spare_blocks="auto").spare_blocks_for(16384, block_size, num_blocks)
    sched, hasher = S.make_scheduler(os.path.join(ROOT, "models", "llama-3.1-8b"), num_blocks - spares, max_len,
                                     max_num_batched_tokens=16384, max_num_seqs=max_num_seqs, block_size=block_size)
    sched.use_v2_model_runner = True
    lay = make_layout("interleaved", LLAMA3_8B, PAGE, rows=2 * max_num_seqs + 1, min_row_tokens=max_len + 256,
                      block_size=block_size)
    # the engine's guard rules (config.VattnConfig): fa2-graphs keeps guards unless told otherwise, and
    # extends them ahead
    cfg = VattnConfig(decode_kernel=decode_kernel, keep_guards=keep_guards or None)
    if fa3_decode_tokens is None:
        fa3_decode_tokens = cfg.fa3_decode_tokens
    if fa3_decode_row_tokens is None:
        fa3_decode_row_tokens = cfg.fa3_decode_row_tokens
    mgr = KVMemoryManager(_NoZeroing(PAGE, capacity=1 << 50), lay, num_blocks - spares, background="stream",
                          spare_blocks=spares, growth_ahead=growth, keep_guards=cfg.keep_guards,
                          guard_ahead=cfg.guard_ahead_slots(block_size), prefix_rows=prefix_rows,
                          bounded_scan=bounded_scan, stale_guards=stale_guards)
    mgr.mapper.executor.close()
    # native: the real native thread and hand-over, with driver calls that do nothing (null_table)
    clock = [0.0, 0.0]  # timed: [the step's planning time, the time the current drive() started at] (s)
    mgr.mapper.executor = (NativeExecutor(*null_table()) if native else _TimedExecutor(clock) if timed
                           else _NullExecutor())
    if row_drain:  # (as KVMemoryManager(row_drains=True) sets up its own executor)
        mgr.mapper.executor.set_rows(mgr.base_va, *lay.row_regions(), lay.rows)
        mgr.mapper.row_drains = True
    timeline: list[tuple] = []  # timed: per step (planned at s, modeled ms, new requests, ms its batch ran past planning, background ops drained)
    mgr.reserve_zero_row()  # the worker's dummy row
    rows = RequestRows(mgr)
    live = {}
    t = dict.fromkeys(PHASES, 0.0)
    first_step: dict[str, int] = {}  # the first step's critical-path maps and swaps (no earlier step hides them)
    # steps that admit requests: how many, the requests they admit, the block maps and DRAINs they plan
    admitting = dict.fromkeys(("steps", "requests", "block_maps", "drains"), 0)
    # the other steps (decode growth): their block maps, and the most in one step
    others = dict.fromkeys(("block_maps", "max_step_block_maps", "steps_with_maps", "drains"), 0)
    step_ms: dict[bool, list[float]] = {False: [], True: []}  # each step's hooks in all, by whether it admits
    # an admitting step's hooks part by part, by serve_hits.step_kind (as the step trace's hook_parts_ms)
    admit_parts: dict[str, list[tuple]] = {}
    other_parts: list[tuple] = []  # the other steps' (decode steps'), as the trace keeps them since NOTES #98
    mixed_rules: dict[str, int] = {}  # fa2-graphs' mixed steps by the rule they ran (ops.plan_reads, NOTES #110)
    long_rules: dict[str, int] = {}  # fa3_decode_tokens' long decode steps by the rule they ran (NOTES #130)

    def zero_counts() -> None:
        mgr.reset_stats()
        timeline.clear()
        t.update(dict.fromkeys(PHASES, 0.0))
        admitting.update(dict.fromkeys(admitting, 0))
        others.update(dict.fromkeys(others, 0))
        mixed_rules.clear()
        long_rules.clear()
    step_reads = ops.StepReads(lay.block_size)  # as the worker builds each step's reads

    def drive(prompts: list[list[int]], max_tokens: int | list[int], clip: bool = True,
              arrivals: list[float] | None = None) -> int:
        """Schedules the requests to the end through our hooks; returns the steps taken. arrivals:
        each request's arrival second (serving); the clock moves by STEP_MODEL per step, and jumps
        to the next arrival while nothing runs (no step, so no warm(), as in an idle server)."""
        steps = 0
        outs = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        waiting = []
        for prompt, out_len in zip(prompts, outs):
            req = Request(str(len(live)), prompt, SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0),
                          None, arrival_time=float(len(live)), block_hasher=hasher)
            live[req.request_id] = req
            waiting.append(req)
        at = list(arrivals) if arrivals is not None else [0.0] * len(waiting)
        now, nxt = 0.0, 0
        base_ms, per_token_ms = STEP_MODEL
        while nxt < len(waiting) or sched.has_requests():
            while nxt < len(waiting) and at[nxt] <= now:
                sched.add_request(waiting[nxt])
                nxt += 1
            if not sched.has_requests():
                now = at[nxt]
                continue
            out = sched.schedule()
            clock[0] = clock[1] + now
            step_s = (base_ms + per_token_ms * out.total_num_scheduled_tokens) / 1e3
            now += step_s
            steps += 1
            c0 = time.perf_counter()
            maps_before, drains_before = mgr.mapper.stats.block_maps, mgr.mapper.stats.drains
            for rid in out.finished_req_ids | (out.preempted_req_ids or set()):
                rows.remove(rid)
            c1 = time.perf_counter()
            for new in out.scheduled_new_reqs:
                rows.remove(new.req_id)
                rows.admit(new.req_id, new.block_ids[0], new.num_computed_tokens)
            if out.scheduled_new_reqs:
                mgr.start_mappings()  # as the worker does
            c2 = time.perf_counter()
            c = out.scheduled_cached_reqs
            for rid, new_ids in zip(c.req_ids, c.new_block_ids):
                if new_ids is not None and new_ids[0]:
                    rows.extend(rid, new_ids[0], fresh=rid not in c.resumed_req_ids)
            c3 = time.perf_counter()
            if steps == 1:
                first_step["block_maps"] = mgr.mapper.stats.block_maps
                first_step["swaps"] = mgr.mapper.stats.swaps
            if out.scheduled_new_reqs:  # a step that admits requests: its maps are the ones a GPU waits for most
                admitting["steps"] += 1
                admitting["requests"] += len(out.scheduled_new_reqs)
                admitting["block_maps"] += mgr.mapper.stats.block_maps - maps_before
                admitting["drains"] += mgr.mapper.stats.drains - drains_before
            else:
                n_maps = mgr.mapper.stats.block_maps - maps_before
                others["block_maps"] += n_maps
                others["max_step_block_maps"] = max(others["max_step_block_maps"], n_maps)
                others["steps_with_maps"] += n_maps > 0
                others["drains"] += mgr.mapper.stats.drains - drains_before
            ids = list(out.num_scheduled_tokens)
            row_of = np.array([rows.row(r) for r in ids], dtype=np.int64)
            seq = np.array([live[r].num_computed_tokens for r in ids], dtype=np.int64)
            q = np.array([out.num_scheduled_tokens[r] for r in ids], dtype=np.int64)
            c4 = time.perf_counter()
            long = ops.long_decode(q.tolist(), seq.tolist(), fa3_decode_tokens, fa3_decode_row_tokens)
            rule, fa3, ext = ops.plan_reads(seq, q, decode_kernel, 256, lay.row_tokens,
                                            row_of, mgr, clip_to_view=clip, long_decode=long)
            if long:
                long_rules[rule] = long_rules.get(rule, 0) + 1
            if decode_kernel == "fa2-graphs" and ops.is_mixed(q):
                mixed_rules[rule] = mixed_rules.get(rule, 0) + 1
            if long and rule == "fa3" and clip_guards:  # as the worker does (NOTES #135)
                mgr.spare_guards(row_of[fa3], ext[fa3])
            for row, e in zip(row_of[fa3].tolist(), ext[fa3].tolist()):
                mgr.ensure_readable(row, e)
            reads = step_reads(row_of, ext)
            c5 = time.perf_counter()
            mgr.publish()
            c6 = time.perf_counter()
            ex = mgr.mapper.executor
            if timed:
                late = None if ex.critical_done is None else 1e3 * (ex.critical_done - clock[0])
                timeline.append((clock[0], 1e3 * step_s, len(out.scheduled_new_reqs), late, ex.drained))
                ex.critical_done, ex.drained = None, 0
            _LaggingFence.step += 1
            mgr.record_read_slots(_LaggingFence(), reads)
            c7 = time.perf_counter()
            if spares or lent or mgr.guard_ahead:
                mgr.warm(defer=warm_defer and has_prefill(out), clip_guards=long and clip_guards)
            c8 = time.perf_counter()
            dts = (c1 - c0, c2 - c1, c3 - c2, c5 - c4, c6 - c5, c7 - c6, c8 - c7)  # in PHASES order
            for k, dt in zip(PHASES, dts):
                t[k] += dt
            # this step's hooks in all (the step trace's hooks_ms, without the driver's and the GPU's
            # calls): admitting steps apart, since a prefix hit's admission step is CPU-bound (NOTES #85)
            step_ms[bool(out.scheduled_new_reqs)].append(1e3 * (c8 - c0))
            if out.scheduled_new_reqs:
                kind = serve_hits.step_kind(len(out.scheduled_new_reqs), out.total_num_scheduled_tokens)
                admit_parts.setdefault(kind, []).append(dts)
            else:
                other_parts.append(dts)
            sampled = [[100] if live[r].num_computed_tokens >= live[r].num_tokens else [] for r in ids]
            sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                                                            sampled_token_ids=sampled))
        clock[1] += now + IDLE_S  # (timed) the next drive starts after a pause, as a server between runs
        return steps

    if warmup:  # vLLM's warm-up: max_num_seqs 2-token prefills through the runner (worker.py), not counted
        drive([[7, 8 + i % 1000] for i in range(max_num_seqs)], 1, clip=False)
        if spares:
            mgr.reclaim_spares()  # as the worker does at the end of start-up
    if lend == "auto":  # the engine's default (config.lend_blocks_for)
        lend = VattnConfig(lend_blocks="auto").lend_blocks_for(16384, block_size, mgr.pool.num_blocks)
    lent = mgr.lend_unused(int(lend))  # as the worker does next (VATTN_LEND_BLOCKS)
    if warmup:
        zero_counts()
    gc.collect()
    gc.freeze()  # as vLLM's EngineCore does once started (freeze_gc_heap): what start-up made is never scanned
    if chain:  # offline.py's untimed warm-up generate, then its report() resets the counters
        drive([[500 + (i * 31 + k * 17) % 9000 for k in range(64)] for i in range(16)], 16)
    results = []
    for w, name in enumerate(names):
        n_in, n_out, n_req = WORKLOADS[name]
        zero_counts()
        first_step.clear()
        _LaggingFence.queries = 0
        if name in MIXED:
            rng = np.random.default_rng(w)
            (lo_in, hi_in), (lo_out, hi_out) = MIXED[name]
            ins = rng.integers(lo_in, hi_in + 1, n_req).tolist()
            outs: int | list[int] = rng.integers(lo_out, hi_out + 1, n_req).tolist()
        else:
            ins, outs = [n_in] * n_req, n_out
        arrivals = None
        if name in SERVE:
            arrivals = np.random.default_rng(w).exponential(1 / SERVE[name], n_req).cumsum().tolist()
        if name in SERVE and serve_prompts == "bench":
            prompts = bench_serve_prompts(n_req, n_in, n_out)
        else:
            prompts = [[1000 + (i * 7919 + k * 104729 + w * 13) % 20000 for k in range(ins[i])] for i in range(n_req)]
        step_ms[False].clear()
        step_ms[True].clear()
        admit_parts.clear()
        other_parts.clear()
        steps = drive(prompts, outs, arrivals=arrivals)
        s = mgr.stats()
        per_step = {k: round(1e3 * v / steps, 4) for k, v in t.items()}
        results.append({
            "workload": name, "steps": steps, "spares": spares, "lent": lent, "lent_taken": s["lent_taken"],
            "ms_per_step": per_step,
            "total_ms_per_step": round(sum(per_step.values()), 4),
            "block_maps": s["block_maps"], "swaps": s["swaps"], "warm_maps": s["warm_maps"],
            "block_unmaps": s["block_unmaps"], "zero_maps": s["zero_maps"], "pad_maps": s["pad_maps"],
            "guard_ahead_maps": s["guard_ahead_maps"],
            "hazard_waits": s["hazard_waits"], "spares_at": s["spares_at"],
            # step changes that waited for a row's background ops (DRAIN), and those below every op pending
            "drains": s["drains"], "drains_skipped": s["drains_skipped"], "prefix_rows_taken": s["prefix_rows_taken"],
            # new requests' blocks: admissions, and how many of their blocks moved into spares or were mapped
            **{k: s[k] for k in ("admissions", "admit_swaps", "admit_maps", "admit_unmaps", "admit_stale_replaced")},
            # running requests' growth: moved into spares, mapped, and unmapped first (NOTES #126)
            **{k: s[k] for k in ("grow_swaps", "grow_maps", "grow_unmaps")},
            **{k: s[k] for k in s if k.startswith("warm_") and k != "warm_maps"},
            "event_queries_per_step": round(_LaggingFence.queries / steps, 2),
            **{f"first_step_{k}": v for k, v in first_step.items()},
            **{f"admitting_{k}": v for k, v in admitting.items()},
            "growth_maps": s["growth_maps"], **{f"other_steps_{k}": v for k, v in others.items()},
            **({"mixed_steps_by_rule": dict(mixed_rules)} if decode_kernel == "fa2-graphs" else {}),
            **({"long_decode_steps_by_rule": dict(long_rules)} if fa3_decode_tokens else {}),
            **{f"{kind}_hooks_ms_{name}": round(v, 4) for kind, xs in (("admitting", step_ms[True]),
                                                                      ("other_steps", step_ms[False]))
               for name, v in _p50_p90(xs).items()},
            "admitting_parts_ms_p50": {kind: {k: round(1e3 * float(np.median(c)), 4) for k, c in zip(PHASES, zip(*xs))}
                                       for kind, xs in sorted(admit_parts.items())},
            "other_steps_parts_ms_p50": ({k: round(1e3 * float(np.median(c)), 4) for k, c in zip(PHASES, zip(*other_parts))}
                                         if other_parts else None),
            **({"flag_model": flag_model(timeline)} if timed else {})})
    return results if chain else results[0]


def _p50_p90(xs: list[float]) -> dict[str, float]:
    """Median and 90th percentile (nearest rank) of a step's hooks in ms; zeros for no steps."""
    if not xs:
        return {"p50": 0.0, "p90": 0.0}
    return {"p50": sorted(xs)[len(xs) // 2], "p90": serve_hits.p90(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="512-in-1024-out")
    ap.add_argument("--num-blocks", type=int, default=57174, help="vLLM's blocks + spares (the suite's H200 engine)")
    ap.add_argument("--spares", type=int, default=None, help="default: auto (min(1024, 2%% of the budget))")
    ap.add_argument("--lend", default="auto",
                    help="blocks lent after start-up (VATTN_LEND_BLOCKS): a number, or auto as the engine's default "
                         "(1,024 at 16-token blocks here); 0 for the default before NOTES.md #58")
    ap.add_argument("--block-size", type=int, default=16, help="vLLM's block size (the suite's vattn-bs32: 32)")
    ap.add_argument("--profile", action="store_true", help="also the top functions by own time (cProfile)")
    ap.add_argument("--no-warmup", action="store_true", help="skip vLLM's warm-up requests (2-token prefills)")
    ap.add_argument("--chain", default="",
                    help="comma list of workloads run one after another in one engine, as the suite does: "
                         "offline 1024-in-128-out,8192-in-256-out,512-in-1024-out; serving "
                         "serve-rate-4,serve-rate-16 (one server for both rates). A fresh engine per "
                         "workload missed effects of the state an earlier one left: 512/1024's zero-page "
                         "guards and the 16 req/s two-launch steps (NOTES #112)")
    ap.add_argument("--native", action="store_true",
                    help="hand ops to the real native thread (driver calls that do nothing) instead of a stand-in")
    ap.add_argument("--growth", action="store_true",
                    help="the manager's growth_ahead (VATTN_GROWTH_AHEAD): spares in running requests' next slots")
    ap.add_argument("--keep-guards", action="store_true",
                    help="the manager's keep_guards (VATTN_KEEP_GUARDS=1): guards kept for their requests' lives")
    ap.add_argument("--decode-kernel", choices=DECODE_KERNELS, default=DEFAULT_KERNEL,
                    help=f"VATTN_DECODE_KERNEL (default: the plugin's, {DEFAULT_KERNEL}): fa2 is the default "
                         "before NOTES #114, fa3 gives decode rows FA3's over-read guard (suite system vattn-fa3)")
    ap.add_argument("--serve-prompts", choices=("bench", "distinct"), default="bench",
                    help="serving workloads: the prompts vllm bench serve sends (prefix hits), or distinct ones")
    ap.add_argument("--timed", action="store_true",
                    help="the native thread in simulated time at the H200's driver costs: the GPU's wait at the flag (flag_model)")
    ap.add_argument("--warm-now", action="store_true",
                    help="VATTN_WARM_DEFER=0: warm() plans after every step, prefill chunks or not")
    ap.add_argument("--fifo-rows", action="store_true",
                    help="VATTN_PREFIX_ROWS=0: rows in FIFO order only (prefix hits mapped into warm rows)")
    ap.add_argument("--row-drain", action="store_true",
                    help="VATTN_ROW_DRAIN: a row's change drains its own background ops only (NOTES #143)")
    ap.add_argument("--full-scan", action="store_true",
                    help="VATTN_BOUNDED_SCAN=0: a full alias scan frees every spare outside the rows warm() reached "
                         "(the default before NOTES #120)")
    ap.add_argument("--keep-stale-guards", action="store_true",
                    help="VATTN_STALE_GUARDS=0: a prefix row's stale frames stay in its request's guard "
                         "(the default before NOTES #126)")
    ap.add_argument("--fa3-decode-tokens", type=int, default=None,
                    help="VATTN_FA3_DECODE_TOKENS: decode-only steps with at least this many context tokens run "
                         "FA3 (default: the plugin's, 450000 with fa2-graphs since NOTES #133; 0: never)")
    ap.add_argument("--no-clip-guards", action="store_true",
                    help="warm() after a long decode step without clip_guards (before NOTES #135)")
    ap.add_argument("--fa3-decode-row-tokens", type=int, default=None,
                    help="VATTN_FA3_DECODE_ROW_TOKENS: ... and average at least this many per request (default: "
                         "the plugin's, 6144 with fa2-graphs, NOTES #134; 0: no such condition)")
    args = ap.parse_args()
    kw = dict(warmup=not args.no_warmup, native=args.native, lend=args.lend, block_size=args.block_size,
              fa3_decode_tokens=args.fa3_decode_tokens, fa3_decode_row_tokens=args.fa3_decode_row_tokens,
              clip_guards=not args.no_clip_guards, growth=args.growth, decode_kernel=args.decode_kernel, keep_guards=args.keep_guards,
              serve_prompts=args.serve_prompts, prefix_rows=not args.fifo_rows, timed=args.timed,
              warm_defer=not args.warm_now, bounded_scan=not args.full_scan, stale_guards=not args.keep_stale_guards,
              row_drain=args.row_drain)
    if args.profile:
        prof = cProfile.Profile()
        r = prof.runcall(run, args.workload, args.num_blocks, args.spares, **kw)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        r = run(args.workload, args.num_blocks, args.spares, chain=[w for w in args.chain.split(",") if w] or None, **kw)
    for one in (r if isinstance(r, list) else [r]):
        print(one)


if __name__ == "__main__":
    main()
