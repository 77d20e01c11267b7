"""vLLM glue: the worker and model runner that put the KV cache in vAttention's virtual rows.

What changes against vLLM's V2 GPU model runner (everything else is inherited):
- `initialize_kv_cache`: the KV tensors are views over one virtual reservation whose physical
  pages are vLLM's blocks (num_blocks from vLLM's own memory profiling), instead of torch.zeros.
- request add / grow / remove: the scheduler's block ids become page mappings in the request's row
  (only changed slots are remapped); removed requests (finished or preempted) give their row back.
- `prepare_attn`: instead of gathering block tables, it writes the requests' rows into the first
  entries of vLLM's persistent block-table buffer (contiguous, as the kernels need) and row*row_len+position into its persistent slot-mapping
  buffer, the same tensors that CUDA graphs were captured with.
- after each step, a CUDA event tells the mapper which rows the step may still be reading.

Row 0 is reserved: fully backed by the read-only zero page, it is what dummy runs, CUDA-graph
capture and padded batch entries read.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import os
import time

import numpy as np
import torch
from vllm.v1.worker.gpu import model_runner as v2_model_runner
from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner
from vllm.v1.worker.gpu_worker import Worker

from .attention import ops
from .config import VattnConfig
from .errors import ConfigError
from .memory import PAGE_SIZE, CudaDriver, KVMemoryManager, RequestRows, make_layout
from .memory.views import flat_tensor
from .selection import first_start_note, geometry_of, kv_dtype_of

logger = logging.getLogger("vllm.vattention")  # under vLLM's logger, so its handlers print us

DUMMY_ROW = 0


class EventFence:
    """A CUDA event recorded after a step (memory.Fence)."""

    def __init__(self):
        self.event = torch.cuda.Event()
        self.event.record()

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()

    @property
    def native_handle(self) -> int:
        """The CUevent, for the native mapping thread to synchronize on (stream mode)."""
        return self.event.cuda_event


class StreamWaitTimer:
    """Stream mode: GPU time spent blocked at the mapping flag, i.e. the GPU idle time that mapping
    still costs once the CPU no longer waits for it. A pair of timing events brackets each
    cuStreamWaitValue32; pairs are read back (never synchronized) once their second event has
    completed. Events are reused. An upper bound on what mapping costs the GPU: when the GPU is
    ahead of the launching thread, part of a wait would have been spent waiting for launches anyway."""

    STALL_S = 50e-6  # a wait longer than this counts as a stall (an unblocked wait takes a few us)
    TOP = 8  # the longest stalls are reported with the index of their wait (where in the run they were)

    def __init__(self, make_event=lambda: torch.cuda.Event(enable_timing=True), keep_all: bool = False):
        self._make_event = make_event
        self._free: list = []
        self._pending: collections.deque = collections.deque()
        self.seconds = 0.0
        self.waits = 0
        self.stalls = 0
        self.longest: list[tuple[float, int]] = []  # the TOP longest waits: (seconds, index of the wait), a min-heap
        self.all_ms: list[float] | None = [] if keep_all else None  # every wait, by index (VATTN_STEP_TRACE)

    def around(self, stream, enqueue) -> None:
        """Run `enqueue()` (which enqueues the wait on `stream`) between two timing events."""
        start, end = (self._free.pop() if self._free else self._make_event() for _ in range(2))
        start.record(stream)
        enqueue()
        end.record(stream)
        self._pending.append((start, end))
        self.collect()

    @property
    def issued(self) -> int:
        """Waits enqueued so far (the next one's index): those read back and those pending."""
        return self.waits + len(self._pending)

    def collect(self, wait: bool = False) -> None:
        """Account every pair that has completed (with wait=True: every pair, synchronizing)."""
        while self._pending and (wait or self._pending[0][1].query()):
            start, end = self._pending.popleft()
            if wait:
                end.synchronize()
            dt = start.elapsed_time(end) / 1e3
            self.seconds += dt
            self.waits += 1
            self.stalls += dt > self.STALL_S
            if self.all_ms is not None:
                self.all_ms.append(round(dt * 1e3, 4))
            if dt > self.STALL_S:
                (heapq.heappush if len(self.longest) < self.TOP else heapq.heappushpop)(self.longest, (dt, self.waits - 1))
            self._free += (start, end)

    def report(self) -> dict:
        return {"gpu_flag_wait_seconds": round(self.seconds, 4), "flag_waits": self.waits, "flag_stalls": self.stalls,
                "flag_longest_ms": [[round(1e3 * dt, 3), i] for dt, i in sorted(self.longest, reverse=True)]}


# Our hooks' parts, timed on the engine thread (vattn_report's hook_seconds): requests leaving,
# admitted and growing (planning their mappings); prepare_attn's rows, read extents (with FA3's
# zero-page guard), publish (the step's ops and signal to the native thread), the GPU's stream
# wait (with its timing events), the rows/slots sent to the GPU; after the launch, the step's
# fence (an event and the reads it guards) and warming spare frames.
HOOK_PARTS = ("remove", "admit", "extend", "rows", "extents", "publish", "stream_wait", "stage", "fence", "warm")
# A traced step keeps its hooks part by part (the trace's hook_parts_ms): these, then the metadata build.
TRACE_PARTS = HOOK_PARTS + ("build",)
PREPARE_PARTS = ("rows", "extents", "publish", "stream_wait", "stage")  # timed inside prepare_attn


class StepTrace:
    """VATTN_STEP_TRACE=path: each serving step's timing on the engine thread, written as JSON at
    shutdown, to line a request's time to first token up with the steps that ran meanwhile
    (bench.serve_hits). Times are time.perf_counter, i.e. CLOCK_MONOTONIC on Linux, the clock
    `vllm bench serve` stamps its requests with on the same machine. Per step: its start (s after
    `t0`), execute_model's duration with our hooks (ms), new requests, scheduled tokens, block maps
    and DRAINs planned on the step's path, the index of the GPU's wait at the mapping flag it
    enqueued (-1: none; `flag_waits_ms` gives each wait's length), and how much of the step's time
    went to our hooks (prepare_attn, the metadata build, the fence and warm(); 0 for stock), and the
    same split by part (ms in TRACE_PARTS order; null for stock). Traces before NOTES #98 kept the
    parts only for steps that admit requests."""

    FIELDS = ("start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait", "hooks_ms",
              "hook_parts_ms")
    MAX_STEPS = 500_000  # ~65 MB at most (~130 bytes a step with its parts); later steps are counted, not kept

    def __init__(self, path: str, clock=time.perf_counter):
        self.path = path
        self.t0 = clock()
        self.steps: list[tuple] = []
        self.dropped = 0

    def add(self, start: float, end: float, new_reqs: int, tokens: int, block_maps: int, drains: int,
            flag_wait: int, hooks_s: float = 0.0, parts_s: list[float] | None = None) -> None:
        if len(self.steps) >= self.MAX_STEPS:
            self.dropped += 1
            return
        self.steps.append((round(start - self.t0, 6), round((end - start) * 1e3, 4), new_reqs, tokens,
                           block_maps, drains, flag_wait, round(hooks_s * 1e3, 4),
                           None if parts_s is None else [round(x * 1e3, 4) for x in parts_s]))

    def write(self, flag_waits_ms: list[float] | None) -> None:
        """Written beside `path` and renamed onto it, so that a process killed while writing leaves
        no truncated trace (a server stopped with vLLM's --shutdown-timeout 0 did)."""
        import json
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"clock": "time.perf_counter", "t0": self.t0, "fields": self.FIELDS,
                           "hook_parts": TRACE_PARTS, "steps": self.steps,
                           "dropped_steps": self.dropped, "flag_waits_ms": flag_waits_ms}, f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def _trace_path(path: str) -> str:
    """VATTN_STEP_TRACE's file for this process: one per worker under tensor parallelism."""
    if path and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        path += f".rank{torch.distributed.get_rank()}"
    return path


def _trace_step(trace: StepTrace, start: float, end: float, scheduler_output, block_maps: int = 0,
                drains: int = 0, flag_wait: int = -1, hooks_s: float = 0.0,
                parts_s: list[float] | None = None) -> None:
    so = scheduler_output  # (read defensively: a trace must never stop a step)
    new_reqs = len(getattr(so, "scheduled_new_reqs", ()) or ())
    trace.add(start, end, new_reqs, getattr(so, "total_num_scheduled_tokens", 0), block_maps, drains, flag_wait,
              hooks_s, parts_s)


def has_prefill(scheduler_output) -> bool:
    """The step schedules prompt tokens: more than one token per request beyond its speculative ones."""
    so = scheduler_output
    spec = sum(len(t) for t in so.scheduled_spec_decode_tokens.values())
    return so.total_num_scheduled_tokens > len(so.num_scheduled_tokens) + spec


def _dispatch_long_decodes_piecewise(runner) -> None:
    """VATTN_FA3_DECODE_TOKENS: the runner's CUDA-graph dispatch treats a long-context decode step
    (runner._fa3_decode, set in execute_model) as a batch of mixed lengths, so vLLM picks its
    piecewise graph, whose attention runs eagerly: the metadata builder then gives it FA3 (decode
    steps' full graphs were captured with FA2). Other steps are dispatched as before. Wraps the
    runner's cudagraph_manager.dispatch once (idempotent); vLLM 0.25's V2 runner calls it with
    (num_reqs, num_tokens, uniform_token_count, num_active_loras). It can go once vLLM lets an
    attention backend decline a full graph for a given batch."""
    manager = runner.cudagraph_manager
    if getattr(manager.dispatch, "_vattn_long_decodes", False):
        return
    dispatch = manager.dispatch

    def dispatch_long_decodes_piecewise(num_reqs, num_tokens, uniform_token_count, *args, **kwargs):
        if runner._fa3_decode:
            uniform_token_count = None  # (a full decode graph matches only uniform batches)
        return dispatch(num_reqs, num_tokens, uniform_token_count, *args, **kwargs)
    dispatch_long_decodes_piecewise._vattn_long_decodes = True
    manager.dispatch = dispatch_long_decodes_piecewise


def _write_trace(trace: StepTrace, flag_waits_ms: list[float] | None) -> None:
    try:
        trace.write(flag_waits_ms)
        logger.info("vAttention: %d steps traced to %s", len(trace.steps), trace.path)
    except OSError as e:
        logger.warning("vAttention: VATTN_STEP_TRACE=%s could not be written: %s", trace.path, e)


def _spare_blocks(cfg: VattnConfig, vllm_config, budget_blocks: int) -> int:
    """The spare frames VATTN_SPARE_BLOCKS asks for, resolved against this engine's step size and
    its KV budget (in blocks, before the spares are taken out of it)."""
    return cfg.spare_blocks_for(vllm_config.scheduler_config.max_num_batched_tokens,
                                vllm_config.cache_config.block_size, budget_blocks)


@contextlib.contextmanager
def _replace_init_kv_cache(fn):
    """Scoped monkeypatch of the V2 runner's module-level `init_kv_cache`.

    Why: GPUModelRunner.initialize_kv_cache allocates KV with torch.zeros through this function in
    its last lines; everything before it (attention groups, block tables, CUDA-graph manager) we
    want unchanged. What: for the duration of our call only, the name points at our allocator.
    When it can go: once vLLM lets a runner subclass provide the KV allocation (our upstream draft:
    patches/vllm-v2-runner-kv-allocation-hook.diff, a `GPUModelRunner.init_kv_cache_tensors` method).
    """
    original = v2_model_runner.init_kv_cache
    v2_model_runner.init_kv_cache = fn
    try:
        yield
    finally:
        v2_model_runner.init_kv_cache = original


class VattnModelRunner(V2ModelRunner):
    """vLLM's V2 runner with vAttention's KV; the worker swaps its runner's class to this one."""

    vattn: KVMemoryManager | None = None
    # class defaults: vLLM's profiling run calls execute_model before the KV cache exists
    map_seconds = 0.0
    prepare_seconds = 0.0
    execute_seconds = 0.0
    steps = 0
    hook_seconds: dict | None = None  # our per-step hooks, part by part (HOOK_PARTS)
    flag_timer: StreamWaitTimer | None = None
    step_trace: StepTrace | None = None  # VATTN_STEP_TRACE
    vattn_spare_blocks: int | None = None  # resolved by VattnWorker.determine_available_memory
    _fa3_decode = False  # VATTN_FA3_DECODE_TOKENS: this step is a long-context decode step (execute_model)

    # -- KV allocation ---------------------------------------------------------------------
    def initialize_kv_cache(self, kv_cache_config) -> None:
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ConfigError(f"vAttention needs one KV cache group; this model has "
                              f"{len(kv_cache_config.kv_cache_groups)} (hybrid or mixed attention)")
        if getattr(kv_cache_config, "needs_kv_cache_zeroing", False):
            raise ConfigError("this model needs vLLM's KV block zeroing, which vAttention does not support")
        with _replace_init_kv_cache(self._init_vattn_kv_cache):
            super().initialize_kv_cache(kv_cache_config)
        for builder in self._vattn_builders():
            builder.row_len = self.vattn.layout.row_tokens

    def _init_vattn_kv_cache(self, runner_kv_caches, forward_context, kv_cache_config, attn_groups,
                             device, cache_dtype, kernel_block_sizes, vllm_config):
        from vllm.v1.worker.utils import bind_kv_cache

        cfg = VattnConfig.from_env()
        self.vattn_cfg = cfg
        group = kv_cache_config.kv_cache_groups[0]
        geometry = geometry_of(vllm_config)
        if len(group.layer_names) != geometry.num_layers:
            raise ConfigError(f"expected {geometry.num_layers} attention layers, found {len(group.layer_names)}")
        rows = cfg.num_rows(self.max_num_reqs) + 1  # + the dummy row
        layout = make_layout(cfg.layout, geometry, PAGE_SIZE, rows=rows,
                             min_row_tokens=self.max_model_len + cfg.guard_tokens,
                             block_size=group.kv_cache_spec.block_size)
        driver = CudaDriver(device.index if device.index is not None else torch.cuda.current_device())
        self.vattn = KVMemoryManager(driver, layout, kv_cache_config.num_blocks, reclaim=cfg.reclaim,
                                     background=cfg.background_map, growth_ahead=cfg.growth_ahead,
                                     keep_guards=cfg.keep_guards, prefix_rows=cfg.prefix_rows,
                                     bounded_scan=cfg.bounded_scan, value_fences=cfg.fence == "value",
                                     stale_guards=cfg.stale_guards, row_drains=cfg.row_drains,
                                     guard_ahead=cfg.guard_ahead_slots(layout.block_size),
                                     spare_blocks=self._resolved_spares(cfg, vllm_config, kv_cache_config.num_blocks))
        dummy = self.vattn.reserve_zero_row()
        assert dummy == DUMMY_ROW

        dtype = kv_dtype_of(vllm_config)
        flat = flat_tensor(self.vattn.base_va, layout.total_bytes, dtype, device)
        es = flat.element_size()
        kv_caches = {}
        for i, name in enumerate(group.layer_names):
            k, v = layout.view(i, 0), layout.view(i, 1)
            kv_caches[name] = flat.as_strided(
                (2,) + k.shape, ((v.offset - k.offset) // es,) + k.strides, k.offset // es)
        bind_kv_cache(kv_caches, forward_context, runner_kv_caches)

        self._row_np = np.full(self.max_num_reqs, -1, dtype=np.int64)  # request-state index -> row (-1: none)
        self._init_step_staging(device)
        self.vattn_rows = RequestRows(self.vattn)  # request id -> row, blocks mapped
        self._pending_reads: dict[int, int] | None = None  # {row: block slots} the launched step may read
        if self.vattn_cfg.fa3_decode_tokens:
            _dispatch_long_decodes_piecewise(self)
        self.reset_timers()
        logger.info("vAttention KV: %d blocks of %d tokens (%d MiB), %d rows x %d tokens, %.1f GiB reserved",
                    kv_cache_config.num_blocks, layout.block_size, layout.block_bytes >> 20, rows,
                    layout.row_tokens, layout.total_bytes / 2**30)
        note = first_start_note(cfg, torch.cuda.get_device_capability(device))
        if note:
            logger.info("vAttention: %s", note)
        return kv_caches

    def _init_step_staging(self, device) -> None:
        """What prepare_attn last sent to the GPU (sent again only when it changes), the stream
        and flag value the GPU last waited on, and each token's row start on the GPU."""
        self._staged: dict[str, np.ndarray] = {}  # "rows" (block-table buffer), "row_starts" (_row_starts)
        self._row_starts = torch.zeros(self.block_tables.slot_mappings.shape[1], dtype=torch.int64, device=device)
        self._waited: tuple[int, int] | None = None
        self._step_reads = ops.StepReads(self.vattn.layout.block_size)  # each step's {row: slots read}

    def _stage(self, name: str, array: np.ndarray, dst: torch.Tensor) -> None:
        """Copy `array` into the GPU buffer `dst` unless it is what was last sent under `name`."""
        last = self._staged.get(name)
        if last is None or not np.array_equal(array, last):
            dst.copy_(torch.from_numpy(array).pin_memory(), non_blocking=True)
            self._staged[name] = array

    def _resolved_spares(self, cfg: VattnConfig, vllm_config, num_blocks: int) -> int:
        """The spares the worker took out of vLLM's KV budget (determine_available_memory), so that
        both agree; resolved here against vLLM's blocks only where the worker did not profile."""
        if self.vattn_spare_blocks is not None:
            return self.vattn_spare_blocks
        self.vattn_spare_blocks = spares = _spare_blocks(cfg, vllm_config, num_blocks)
        if spares:
            logger.info("vAttention: %d spare KV blocks beside vLLM's %d (no KV budget was profiled)",
                        spares, num_blocks)
        return spares

    def lend_unused_blocks(self) -> int:
        """VATTN_LEND_BLOCKS: lend the frames of vLLM's never-used blocks as spares (after the
        warm-up, which used some of the lowest ids)."""
        cfg, mgr = self.vattn_cfg, self.vattn
        want = cfg.lend_blocks_for(self.vllm_config.scheduler_config.max_num_batched_tokens,
                                   mgr.layout.block_size, mgr.pool.num_blocks)
        if not want:
            return 0
        lent = mgr.lend_unused(want)
        logger.info("vAttention: lent the frames of %d never-used KV blocks as spares (VATTN_LEND_BLOCKS=%s "
                    "asked for %d); each returns when vLLM hands its block out", lent, cfg.lend_blocks, want)
        return lent

    def _vattn_builders(self) -> list:
        return [group.get_metadata_builder(0) for groups in getattr(self, "attn_groups", ()) for group in groups]

    # -- accounting ------------------------------------------------------------------------
    def reset_timers(self) -> None:
        """Time the engine thread spends on page mapping (planning, driver calls, waiting for the
        native thread) against the time it spends in execute_model, from now on; in stream mode also
        the GPU's time blocked at the mapping flag."""
        self.map_seconds = 0.0
        self.prepare_seconds = 0.0
        self.execute_seconds = 0.0
        self.steps = 0
        self.mixed_rules = {"fa2-graphs": 0, "fa2": 0}  # ops.plan_reads' rule in fa2-graphs' mixed steps
        # VATTN_FA3_DECODE_TOKENS' decode steps: run FA3 (fa2: planned otherwise, which a decode-only
        # batch never is), and those of them that mapped guard slots on their path (NOTES #130)
        self.fa3_decodes = {"fa3": 0, "fa2": 0, "mapped": 0}
        self.hook_seconds = dict.fromkeys(HOOK_PARTS, 0.0)
        for builder in self._vattn_builders():
            builder.build_seconds = 0.0
        path = _trace_path(getattr(getattr(self, "vattn_cfg", None), "step_trace", ""))
        first = self.step_trace is None  # (reset_timers runs at KV allocation and again after warm-up)
        self.step_trace = StepTrace(path) if path and self.vattn is not None else None
        if first and self.step_trace is not None and not getattr(getattr(self, "vllm_config", None),
                                                                 "shutdown_timeout", 1):
            logger.warning("vAttention: VATTN_STEP_TRACE is written when the engine shuts down, and with "
                           "shutdown_timeout 0 (vLLM's default) `vllm serve` may kill the engine first; "
                           "pass --shutdown-timeout 30")
        if self.vattn is not None and self.vattn.stream_mode:
            self.flag_timer = StreamWaitTimer(keep_all=self.step_trace is not None)

    def vattn_report(self) -> dict:
        s = self.vattn.stats()
        # the engine thread's time in our hooks: prepare_attn (rows, slot mapping, the mapping calls
        # counted in map_seconds) and the attention metadata build
        build = sum(b.build_seconds for b in self._vattn_builders())
        s.update(steps=self.steps, map_seconds=round(self.map_seconds, 4),
                 prepare_attn_seconds=round(self.prepare_seconds, 4), metadata_build_seconds=round(build, 4),
                 execute_seconds=round(self.execute_seconds, 4),
                 map_share=round(self.map_seconds / self.execute_seconds, 5) if self.execute_seconds else None,
                 mixed_steps_one_launch=self.mixed_rules["fa2-graphs"], mixed_steps_two_launches=self.mixed_rules["fa2"],
                 long_decode_steps_fa3=self.fa3_decodes["fa3"], long_decode_steps_fa2=self.fa3_decodes["fa2"],
                 long_decode_steps_mapped=self.fa3_decodes["mapped"],
                 hook_seconds={k: round(v, 6) for k, v in (self.hook_seconds or {}).items()})
        if self.flag_timer is not None:
            self.flag_timer.collect(wait=True)
            s.update(self.flag_timer.report())
        return s

    def _account(self, part: str, since: float) -> None:
        """Mapping time since `since`, for map_seconds and for its part in hook_seconds."""
        dt = time.perf_counter() - since
        self.map_seconds += dt
        self.hook_seconds[part] += dt

    # -- request lifecycle -----------------------------------------------------------------
    def _remove_request(self, req_id: str) -> bool:
        idx = self.req_states.req_id_to_index.get(req_id)
        removed = super()._remove_request(req_id)
        if removed:
            t = time.perf_counter()
            if self.vattn_rows.remove(req_id) is not None and idx is not None:
                self._row_np[idx] = -1
            self._account("remove", t)
        return removed

    def add_requests(self, scheduler_output) -> None:
        super().add_requests(scheduler_output)  # re-added requests went through _remove_request first
        t = time.perf_counter()
        for new in scheduler_output.scheduled_new_reqs:
            idx = self.req_states.req_id_to_index[new.req_id]
            self._row_np[idx] = self.vattn_rows.admit(new.req_id, new.block_ids[0], new.num_computed_tokens)
        if scheduler_output.scheduled_new_reqs:
            self.vattn.start_mappings()  # the native thread maps while vLLM prepares the step's inputs
        self._account("admit", t)

    def update_requests(self, scheduler_output) -> None:
        super().update_requests(scheduler_output)
        t = time.perf_counter()
        reqs = scheduler_output.scheduled_cached_reqs
        for req_id, new_ids in zip(reqs.req_ids, reqs.new_block_ids):
            if new_ids is not None and new_ids[0]:
                # a running request's new blocks are for tokens not computed yet; the V2 runner gets
                # resumed requests as new ones, but if one came here nothing would be assumed of it
                self.vattn_rows.extend(req_id, new_ids[0], fresh=req_id not in reqs.resumed_req_ids)
        self._account("extend", t)

    # -- per-step attention inputs ---------------------------------------------------------
    def prepare_attn(self, input_batch):
        t0 = time.perf_counter()
        bt = self.block_tables.input_block_tables[0]
        slots = self.block_tables.slot_mappings[0]
        n, padded_reqs = input_batch.num_reqs, input_batch.num_reqs_after_padding
        n_tok, padded_tok = input_batch.num_tokens, input_batch.num_tokens_after_padding
        rows = np.zeros(padded_reqs, dtype=np.int32)
        rows[:n] = self._row_np[input_batch.idx_mapping_np]
        row_len = self.vattn.layout.row_tokens
        # each token's row start (row * row_len), on the CPU: the GPU then adds the positions (one
        # kernel) to give slot = row * row_len + position
        row_starts = np.repeat(rows[:n].astype(np.int64) * row_len, input_batch.num_scheduled_tokens)
        seq_lens = input_batch.seq_lens_cpu_upper_bound[:n].numpy()
        t = time.perf_counter()
        cfg, live = self.vattn_cfg, rows[:n]
        # (_fa3_decode: a long-context decode step outside a full CUDA graph, execute_model)
        rule, fa3, extents = ops.plan_reads(
            seq_lens, input_batch.num_scheduled_tokens, cfg.decode_kernel, cfg.guard_tokens, row_len,
            live, self.vattn, clip_to_view=cfg.fa3_guard == "clipped", long_decode=self._fa3_decode)
        decode_fa3 = rule == "fa3" and self._fa3_decode
        if self._fa3_decode:
            self.fa3_decodes["fa3" if decode_fa3 else "fa2"] += 1
        if cfg.decode_kernel == "fa2-graphs":  # (the other kernels' rule never changes: the builders have it)
            if ops.is_mixed(input_batch.num_scheduled_tokens):
                self.mixed_rules[rule] += 1  # its mixed steps: one FA3 launch ("fa2-graphs") or two ("fa2")
            for builder in self._vattn_builders():
                builder.mixed_kernel = rule  # the metadata is built under the rule whose reads were mapped
                builder.decode_fa3 = decode_fa3
        mapped = 0  # guard slots mapped on this step's path
        if decode_fa3:  # (spares for the guard slots it lacks, from free rows: not the zero page, NOTES #135)
            self.vattn.spare_guards(live[fa3], extents[fa3])
        for row, extent in zip(live[fa3].tolist(), extents[fa3].tolist()):
            mapped += self.vattn.ensure_readable(row, extent)  # FA3 over-reads: a guard behind the end
        if self._fa3_decode and mapped:
            self.fa3_decodes["mapped"] += 1
        self._pending_reads = self._step_reads(live, extents)
        hooks = self.hook_seconds
        t1 = time.perf_counter()
        hooks["rows"] += t - t0
        hooks["extents"] += t1 - t
        if self.vattn.stream_mode:
            # The GPU, not this thread, waits for the native thread to finish this step's mappings;
            # a step that planned nothing keeps the last number, which this stream already waited for.
            seq = self.vattn.publish()
            stream = torch.cuda.current_stream()
            t2 = time.perf_counter()
            hooks["publish"] += t2 - t1
            if (seq, stream.cuda_stream) != self._waited:
                self.flag_timer.around(stream, lambda: self.vattn.driver.stream_wait(
                    stream.cuda_stream, self.vattn.flag_device_address, seq))
                self._waited = (seq, stream.cuda_stream)
                hooks["stream_wait"] += time.perf_counter() - t2
        else:
            self.vattn.sync()  # every mapping this step needs is in place before anything is launched
            hooks["publish"] += time.perf_counter() - t1
        t3 = time.perf_counter()
        self.map_seconds += t3 - t

        # The batch's rows and each token's row start go to the GPU only when they changed (in a
        # decode step they rarely do: same requests, one token each); the slots are computed anew.
        self._stage("rows", rows, bt.view(-1)[:padded_reqs])
        self._stage("row_starts", row_starts, self._row_starts[:n_tok])
        torch.add(self._row_starts[:n_tok], input_batch.positions[:n_tok], out=slots[:n_tok])
        if padded_tok > n_tok:
            slots[n_tok:padded_tok].fill_(-1)
        block_tables = (bt[:padded_reqs],)
        t4 = time.perf_counter()
        hooks["stage"] += t4 - t3
        self.prepare_seconds += t4 - t0
        return block_tables, self.block_tables.slot_mappings[:, :padded_tok]

    def prepare_dummy_attn(self, input_batch):
        bt = self.block_tables.input_block_tables[0]
        bt.view(-1)[:bt.shape[0]].fill_(DUMMY_ROW)
        for builder in self._vattn_builders():  # (the dummy row is readable throughout: any rule would do)
            builder.mixed_kernel = ops.mixed_rule(self.vattn_cfg.decode_kernel)
            builder.decode_fa3 = False  # (a capture replays FA2 in decode graphs)
        self._staged.pop("rows", None)  # the buffer holds the dummy row now
        return super().prepare_dummy_attn(input_batch)

    def _is_long_decode(self, scheduler_output) -> bool:
        """VATTN_FA3_DECODE_TOKENS: is this step decode-only, with its requests' contexts adding up
        to the threshold and averaging VATTN_FA3_DECODE_ROW_TOKENS (ops.long_decode)? Its CUDA-graph
        dispatch then takes the piecewise graph (_dispatch_long_decodes_piecewise) and prepare_attn
        runs it in FA3, mapping the guard slots not in place (ops.plan_reads)."""
        cfg = getattr(self, "vattn_cfg", None)  # (None in vLLM's profiling run, before the KV cache)
        if cfg is None or not cfg.fa3_decode_tokens or scheduler_output.scheduled_new_reqs:
            return False
        c, sched = scheduler_output.scheduled_cached_reqs, scheduler_output.num_scheduled_tokens
        return ops.long_decode((sched.get(r, 0) for r in c.req_ids), c.num_computed_tokens, cfg.fa3_decode_tokens,
                               cfg.fa3_decode_row_tokens)

    def execute_model(self, scheduler_output, *args, **kwargs):
        t = time.perf_counter()
        self._pending_reads = None
        self._fa3_decode = self._is_long_decode(scheduler_output)
        trace = self.step_trace
        if trace is not None:
            st, flags = self.vattn.mapper.stats, self.flag_timer
            before = (st.block_maps, st.drains, flags.issued if flags else 0, self.prepare_seconds, self._hook_parts())
        out = super().execute_model(scheduler_output, *args, **kwargs)
        if self._pending_reads:
            t_fence = time.perf_counter()
            fence = (self.vattn.step_fence(torch.cuda.current_stream().cuda_stream) if self.vattn.value_fences
                     else EventFence())
            self.vattn.record_read_slots(fence, self._pending_reads)
            self._pending_reads = None
            t_warm = time.perf_counter()
            self.hook_seconds["fence"] += t_warm - t_fence
            if self.vattn.pool.spare_frames or self.vattn.guard_ahead:
                # the step is launched, so the GPU is busy: plan the rows the next new requests get
                # and the guards running rows outgrew (the native thread maps them while no step
                # waits for it). A step with prefill chunks keeps the engine thread on the critical
                # path to its end (its execute_model lasts about as long as its GPU work, NOTES #100):
                # there warm() may leave the planning to the next decode-only step. After a long decode
                # step the next ones read each row only up to the longest (FA3's clipped view): guards
                # may reach that far where whole ones are over their share (NOTES #135)
                self.vattn.warm(defer=self.vattn_cfg.warm_defer and has_prefill(scheduler_output),
                                clip_guards=self._fa3_decode)
                self._account("warm", t_warm)
        end = time.perf_counter()
        self.execute_seconds += end - t
        self.steps += 1
        if trace is not None:
            issued = flags.issued if flags else 0
            parts = [a - b for a, b in zip(self._hook_parts(), before[4])]
            # the step's hooks in all: prepare_attn (its parts rows ... stage, and the moments between
            # them), then the parts outside it (the request hooks, the fence, warm(), the metadata build)
            hooks = self.prepare_seconds - before[3] + sum(p for k, p in zip(TRACE_PARTS, parts)
                                                           if k not in PREPARE_PARTS)
            _trace_step(trace, t, end, scheduler_output, st.block_maps - before[0], st.drains - before[1],
                        issued - 1 if issued > before[2] else -1, hooks, parts)
        return out

    def _hook_parts(self) -> list[float]:
        """Seconds in each of our hooks' parts since the last reset, in TRACE_PARTS order."""
        hs = self.hook_seconds or {}
        return [hs.get(k, 0.0) for k in HOOK_PARTS] + [sum(b.build_seconds for b in self._vattn_builders())]

    def shutdown(self) -> None:
        if self.vattn is not None:
            torch.cuda.synchronize()
            logger.info("vAttention mapper stats: %s", self.vattn_report())
            if self.step_trace is not None:  # (vattn_report collected every flag wait; an OSError is
                # logged and the KV memory still released below)
                _write_trace(self.step_trace, self.flag_timer.all_ms if self.flag_timer else None)
            self.vattn.close()
            self.vattn.driver.close()  # releases the primary-context reference CudaDriver retained
            self.vattn = None
        super().shutdown()


class VattnWorker(Worker):
    def init_device(self):
        super().init_device()
        runner = self.model_runner
        if not isinstance(runner, V2ModelRunner):
            raise ConfigError("vAttention runs on vLLM's V2 model runner; this worker built "
                              f"{type(runner).__name__}. Unset VLLM_USE_V2_MODEL_RUNNER=0")
        # The runner was built by vLLM's own init_device; we only add behaviour (no new __init__ state).
        runner.__class__ = VattnModelRunner

    def determine_available_memory(self) -> int:
        """vLLM's KV budget less the spare frames (VATTN_SPARE_BLOCKS) the memory manager creates
        beyond vLLM's blocks, so that both together take what vLLM alone would. The count is
        resolved here, once, and handed to the runner, which creates them."""
        available = super().determine_available_memory()
        cfg = VattnConfig.from_env()
        per_block = sum(spec.page_size_bytes for spec in self.get_kv_cache_spec().values())
        budget = available // per_block if per_block else 0
        override = getattr(self.vllm_config.cache_config, "num_gpu_blocks_override", None)
        if override:  # vLLM will make this many blocks, whatever the memory would hold
            budget = min(budget, override)
        spares = _spare_blocks(cfg, self.vllm_config, budget) if per_block else 0
        self.model_runner.vattn_spare_blocks = spares
        if spares:
            available -= spares * per_block
            if available < per_block:
                given = "" if cfg.spare_blocks == spares else f" ({spares} blocks)"
                raise ConfigError(f"VATTN_SPARE_BLOCKS={cfg.spare_blocks}{given}, {spares * per_block / 2**30:.1f} "
                                  "GiB, leaves no KV budget; lower it or raise --gpu-memory-utilization")
            logger.info("vAttention: %d spare KV blocks (%.2f GiB, VATTN_SPARE_BLOCKS=%s) kept out of vLLM's "
                        "KV budget", spares, spares * per_block / 2**30, cfg.spare_blocks)
        return available

    def vattn_report(self, reset: bool = False) -> dict | None:
        """Mapper counters and mapping time since the last reset (for benchmarks, via collective_rpc)."""
        runner = self.model_runner
        if getattr(runner, "vattn", None) is None:
            return None
        rep = runner.vattn_report()
        if reset:
            runner.vattn.reset_stats()
            runner.reset_timers()
        return rep

    def compile_or_warm_up_model(self):
        """vLLM's warm-up runs real requests through the runner (V2: up to max_num_seqs 2-token
        prefills, each given FA3's guard); those mappings are start-up cost, so they are logged
        apart and the serving counters start at zero, and the spares its guards took are freed."""
        out = super().compile_or_warm_up_model()
        runner = self.model_runner
        if getattr(runner, "vattn", None) is not None:
            if runner.vattn.pool.spare_frames:
                runner.vattn.reclaim_spares()  # the warm-up's guard slots took spares: serving starts with all free
            runner.lend_unused_blocks()
            logger.info("vAttention warm-up mapper stats: %s", self.vattn_report(reset=True))
        return out


class TracedModelRunner(V2ModelRunner):
    """Stock vLLM's runner, unchanged but for VATTN_STEP_TRACE: each step's start, execute_model time,
    new requests and scheduled tokens, in vAttention's trace format (no block maps, DRAINs or flag
    waits), so that the A/B suite's baseline server is traced like vAttention's and bench.serve_hits
    can set their steps side by side. Only a stock run that asks for a trace gets it (selection)."""

    step_trace: StepTrace | None = None  # set after vLLM's warm-up (TracedWorker)

    def execute_model(self, scheduler_output, *args, **kwargs):
        t = time.perf_counter()
        out = super().execute_model(scheduler_output, *args, **kwargs)
        if self.step_trace is not None:
            _trace_step(self.step_trace, t, time.perf_counter(), scheduler_output)
        return out

    def shutdown(self) -> None:
        if self.step_trace is not None:
            _write_trace(self.step_trace, None)
            self.step_trace = None
        super().shutdown()


class TracedWorker(Worker):
    """vLLM's worker with the TracedModelRunner: a stock run (vAttention not selected) with VATTN_STEP_TRACE."""

    def init_device(self):
        super().init_device()
        if isinstance(self.model_runner, V2ModelRunner):
            self.model_runner.__class__ = TracedModelRunner
        else:
            logger.warning("VATTN_STEP_TRACE traces vLLM's V2 model runner only; this run's steps are not traced")

    def compile_or_warm_up_model(self):
        out = super().compile_or_warm_up_model()  # (its warm-up steps are not traced)
        if isinstance(self.model_runner, TracedModelRunner):
            self.model_runner.step_trace = StepTrace(_trace_path(VattnConfig.from_env().step_trace))
        return out
