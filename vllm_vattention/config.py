"""Every option of the plugin, read and checked in one place. Nothing else reads the environment.

| variable | values | default | meaning |
|---|---|---|---|
| VLLM_ATTENTION_BACKEND | VATTENTION | unset | turn vAttention on (vLLM 0.25 dropped this variable; we honour it) |
| VATTN_LAYOUT | interleaved, per_layer | interleaved | how a token's KV is laid out in a row |
| VATTN_RECLAIM | deferred, eager | deferred | keep a released row's pages mapped, or unmap them |
| VATTN_DECODE_KERNEL | fa2, fa3, fa2-graphs | fa2-graphs | fa2-graphs: FA2 in decode-only batches (the CUDA-graph steps; long-context ones run FA3: VATTN_FA3_DECODE_TOKENS), FA3 for the whole of a mixed batch (one launch per layer) when every decode row's guard is in place already and the prefill rows' guards can all be spare frames, else as fa2 (guards are kept while requests run, VATTN_KEEP_GUARDS defaulting to 1, and extended in the background as rows grow, with spares only, while the running rows' guards fit half the spares); fa2: FA2 for every one-token query, FA3 for the rest (two launches per layer in a mixed batch; the default before benchmarks/NOTES.md #114); fa3: FA3 for everything (every row guarded). benchmarks/NOTES.md #89, #90, #101, #104, #105, #110, #112, #114 |
| VATTN_FA3_DECODE_TOKENS | integer >= 0 | 450000 with VATTN_DECODE_KERNEL=fa2-graphs, else 0 | with VATTN_DECODE_KERNEL=fa2-graphs: a decode-only step whose requests' contexts add up to at least this many tokens runs FA3 over the rows (one launch per layer, outside a full CUDA graph: vLLM's piecewise graphs) instead of FA2 in a full graph, FA3's view ending at the longest row (after such a step warm() extends every running row's guard up to the longest row's end with spare frames in the background, where whole guards are over their share: benchmarks/NOTES.md #135; guard slots still missing are mapped on the step's path). 0: never. The default since benchmarks/NOTES.md #133: on an H200, 8192-in-256-out (64 x ~8.3K decode) went from 0.989x of stock (FA2, same call) to 0.998x, 0.999x and 1.000x (three pairs), output checked against stock (#132). 450K tokens keeps 16K decode (24 x ~16.4K, where FA2 over rows beat FA3 over rows by 10%: #122) and every other suite workload on FA2; where FA3 decode is at least FA2's equal in the measured kernel tables (#133). Measured for Llama-3.1-8B's 8 KV heads of 128 on one GPU; set it for other shapes from vattn-kbench |
| VATTN_FA3_DECODE_ROW_TOKENS | integer >= 0 | 6144 with VATTN_DECODE_KERNEL=fa2-graphs, else 0 | VATTN_FA3_DECODE_TOKENS' decode steps must also average this many tokens of context per request: batches of many short rows stay on FA2, the faster kernel there, and need no guard slots mapped on the step's path (benchmarks/NOTES.md #134). 0: no such condition |
| VATTN_FA3_SCHEDULE | 0, 1 | 0 | 1: FA3's scheduler metadata computed once per mixed step and handed to every layer (as stock vLLM does), not by each layer's FA3 call; benchmarks/NOTES.md #91; measured on an H200 with no gain (#96), so off |
| VATTN_FA2_SPLITS | integer 0-128 | 0 | FA2 decode: the parts each sequence's keys are split into (0: FA2's own heuristic, from the batch, the heads and the row length); `vattn-kbench` sweeps it |
| VATTN_FA2_ORDER | as-is, longest-first | as-is | FA2 decode: longest-first hands FA2 the batch sorted by context length, longest first (sorted once per step on the GPU; each layer gathers its queries into that order and scatters its output back: two small copies per layer), so that FA2's blocks for the longest sequences start first and short ones fill the end. Batches of very different lengths (mixed-64-4096-in: 65-4,608 tokens) ran FA2 at 0.870x of paged FA3's speed against 0.968x at even lengths (benchmarks/NOTES.md #137, #138). Measured on an H200 (#139): sorted, the kernel alone was no faster (0.861x against 0.867x at mixed lengths; 0.942x against 0.980x at even ones, gathers in); end to end 0.968x against 0.959x on mixed-64-4096-in (one pair) and 0.977x against 0.986x on 512/1024. So off; kept for A/B runs |
| VATTN_BACKGROUND_MAP | 0, 1, stream | stream | 0: driver calls on the engine thread before the step launches; 1: on a native thread (no GIL), joined before the step launches; stream: on that thread, and the GPU stream waits for them (cuStreamWaitValue32 on a host flag), the CPU never joins |
| VATTN_EXTRA_ROWS | integer >= 0 | max_num_seqs | rows beyond max_num_seqs, so a new request rarely waits for a row still read by a step in flight |
| VATTN_GUARD_TOKENS | integer >= 192 | 256 | readable tokens kept past each sequence end for kernels that over-read (FA3) |
| VATTN_FA3_GUARD | always, clipped | clipped | always: a zero page behind every FA3 row; clipped: FA3's view of a prefill batch ends at its longest FA3 sequence, whose row then needs no guard (relies on TMA clipping; clean under compute-sanitizer on an H200) |
| VATTN_SPARE_BLOCKS | integer >= 0, or auto | auto in stream mode, else 0 | stream mode: this many KV blocks of memory are kept as spare frames, mapped ahead of time into the rows new requests get next, so a new request's fresh blocks need no driver call while its step waits (memory/manager.py); vLLM's KV budget shrinks by as much. auto: the blocks one step's tokens fill (--max-num-batched-tokens / block size), at most AUTO_SPARE_SHARE (2%) of the KV budget's blocks |
| VATTN_LEND_BLOCKS | integer >= 0, or auto | auto in stream mode, else 0 | stream mode: the frames of up to this many of vLLM's KV blocks that were never handed out also serve as spare frames, until vLLM hands the blocks out (more rows warm at once in a burst of new requests; no memory leaves the KV budget; memory/manager.py lend_unused). auto: the blocks one step's tokens fill, at most AUTO_LEND_SHARE (1/4) of the KV budget's blocks. The default since benchmarks/NOTES.md #58 (H100: 1024-in/128-out 0.976x -> 0.994x of stock, output checked against stock, #54) |
| VATTN_GROWTH_AHEAD | 0, 1 | 0 | stream mode: warm() keeps the slot past each running request's blocks mapped with a spare frame (in the background), so that its next block (decode growth, one every block_size tokens) moves in without a driver call while its step waits; short of spares, only a few free rows stay warm for new requests (memory/manager.py _warm_growth). Off until measured on a GPU (CPU harness: benchmarks/NOTES.md #61) |
| VATTN_KEEP_GUARDS | 0, 1 | 1 with VATTN_DECODE_KERNEL=fa2-graphs (0 refused there), else 0 | 1: keep FA3's over-read guard past a running request's blocks (and the spare frames in it) for the request's life, the rule before benchmarks/NOTES.md #62 (with fa2-graphs, only while the running rows' guards fit half the spares: #110); 0: let it go once the request decodes (FA2 reads no further than its tokens), so its spares warm rows for new requests. For A/B runs (suite system vattn-keep-guards) |
| VATTN_PREFIX_ROWS | 0, 1 | 1 | 1: a new request whose first blocks are prefix-cache hits gets the free row that still maps them at the same slots (deferred reclamation kept the mappings of the request that computed them), when that maps fewer blocks than a warm row, which must map every hit while the step waits (benchmarks/NOTES.md #71); 0: rows in FIFO order only. For A/B runs (suite system vattn-fifo-rows) |
| VATTN_WARM_DEFER | 0, 1 | 1 | 1: in a step that carries prefill chunks (its engine thread is on the critical path) warm() plans nothing while the next rows new requests get are warm already (8, or as many as one of the last 8 steps took if more: #115); the planning and its driver calls move to the next decode-only step, whose CPU time hides behind the GPU (benchmarks/NOTES.md #100), and with fa2-graphs the extension of running rows' guards waits one call, never two in a row (#109); 0: warm() plans after every step. For A/B runs (suite system vattn-warm-now) |
| VATTN_BOUNDED_SCAN | 0, 1 | 1 | 1: when warm() runs out of spares mapped nowhere, a full alias scan frees only as many spares as the rows it stopped at need, the least needed first (past the warm depth, in the rows handed out last); 0: it frees every spare outside the rows warm() reached, which at 16 requests/s moved ~2,000 spares back and forth in single background batches that a step's DRAIN ran on its path (benchmarks/NOTES.md #117, #118). The default since an H200 serving pair: the longest waits at the mapping flag 24 ms against 62 ms, TPOT held (#120); 0 for A/B runs (suite system vattn-full-scan) |
| VATTN_STALE_GUARDS | 0, 1 | 1 | 1: with VATTN_DECODE_KERNEL=fa2-graphs, the stale frames in a running request's guard (a row taken for its prefix hits still maps its last user's later blocks there) become spare frames: the first growth slot in the admitting step's own ops, the rest by warm()'s guard extension once no step in flight reads them; the request's growth then moves into them instead of unmapping a frame steps in flight over-read (a hazard wait). CPU harness, both serving rates in one server: hazard waits 103 -> 20, steps whose GPU waits for their own mappings 1,170 -> 779, growth maps 61 -> 12 and 1,011 -> 456 (4 / 16 req/s), one-launch mixed steps and offline counts unchanged (benchmarks/NOTES.md #126). 0: the stale frames stay, for A/B runs (suite system vattn-stale-guards-kept) |
| VATTN_ROW_DRAIN | 0, 1 | 0 | with the native mapping thread: a step that changes a row with background ops still queued (a new request in a warm row, a guard) runs only that row's (DRAIN_ROW), not every op queued before them; on an H200 a serving step's 3-op batch ran 36.9 ms (its slowest op 2 ms: the rest was queued background work its DRAIN ran), and the GPU waited that long at the mapping flag (benchmarks/NOTES.md #143). On an H200 it is correct but gains nothing measurable: the longest stalls were then single slow set_access calls of the same length (NOTES #146); off (suite system vattn-row-drain) |
| VATTN_FENCE | event, value | event | stream mode: how a step in flight reports that it is done, for an unmap that must wait for it (a hazard wait, on the native thread). event: a CUDA event, which the native thread waits on with cuEventSynchronize; value: the step's stream writes its number into a host word (cuStreamWriteValue32), which the native thread polls with no driver call (mapper.HostWordFence). On an H200 one cuEventSynchronize returned at least 33 ms after its event completed, while the GPU waited at the mapping flag behind it (benchmarks/NOTES.md #124). CPU-tested, not yet measured on a GPU; suite system vattn-value-fence |
| VATTN_STEP_TRACE | a file path in an existing folder | unset | each serving step's timing, our hooks' share (and by part), written as JSON at shutdown (worker.StepTrace); on a stock run vLLM's own runner with only this trace |
| VATTN_PREFIX_EVICTION | lru, discard-lru, second-chance, adaptive | lru | prefix-cache eviction order in vLLM's scheduler (prefix_eviction.py); works with any attention backend |
| VATTN_PREFIX_MIN_USERS | integer >= 2 | 2 | the one bit: a cached block used by at least this many requests is "keep" (discard-lru: not evicted before the others; second-chance: one more pass through the free queue; adaptive: in the list evicted second, by a share learned from misses) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from .errors import ConfigError
from .memory.layout import LAYOUTS
from .memory.manager import RECLAIM_POLICIES
from .prefix_eviction import DEFAULT_MIN_USERS, MODES as PREFIX_EVICTION_MODES  # that module imports vLLM only when installing

BACKEND_ENV = "VLLM_ATTENTION_BACKEND"
BACKEND_VALUE = "VATTENTION"
# VATTN_SPARE_BLOCKS=auto takes at most this share of the KV budget's blocks, so that the spares never
# cost more than 2% of the requests that fit (issue 4's capacity floor is 0.98x of stock).
AUTO_SPARE_SHARE = 0.02
# VATTN_LEND_BLOCKS=auto lends at most this share of vLLM's blocks (the highest ids: the last it hands out)
AUTO_LEND_SHARE = 0.25
DECODE_KERNELS = ("fa2", "fa3", "fa2-graphs")
FA2_ORDERS = ("as-is", "longest-first")  # VATTN_FA2_ORDER
FENCES = ("event", "value")  # VATTN_FENCE
# VATTN_FA3_DECODE_TOKENS with fa2-graphs: decode-only steps with this much context (summed over the batch) run FA3
# over the rows. Kernel tables on H200s: FA3 read 64 x 8.3K (532K tokens) 1.2% faster than FA2 over the engine's
# rows and 64 x 16K 4.6% faster; FA2 was faster at 24 x 16K (393K, by 10%) and 16 x 16K, and at 128 x 4K (512K) by
# 1-2% without map churn, which costs FA2 2.3% and FA3 nothing (DESIGN.md, benchmarks/NOTES.md #122, #129, #133)
DEFAULT_FA3_DECODE_TOKENS = 450_000
# VATTN_FA3_DECODE_ROW_TOKENS with fa2-graphs: such a step's contexts must also average this many tokens per request.
# FA2 was the faster kernel in every batch of rows up to 4K (32/128 x 1K, 32/128 x 4K: DESIGN.md), FA3 at 64 x 8.3K
# and 64 x 16K; and each row shorter than the batch's longest needs its guard mapped on the step's path
# (benchmarks/NOTES.md #134: the CPU harness's mixed 64-4,096-token workload, 222 long steps, 7,054 zero-page slots)
DEFAULT_FA3_DECODE_ROW_TOKENS = 6144


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, default).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={env[name]!r} is not supported; use one of: {', '.join(choices)}")
    return value


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; set a whole number >= {minimum}") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below {minimum}; set a whole number >= {minimum}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def _spares(env: Mapping[str, str], name: str, default: int | str | None) -> int | str | None:
    raw = env.get(name)
    if raw is not None and raw.strip().lower() == "auto":
        return "auto"
    try:
        return _int(env, name, default)
    except ConfigError:
        raise ConfigError(f"{name}={raw!r} is not supported; use a whole number >= 0 or auto") from None


# VATTN_* variables that are not options of the plugin: the repository's own tools read them
# (bench/env.py: the commit a result names; tests: how many examples and seeds to draw)
TOOL_VARIABLES = ("VATTN_COMMIT", "VATTN_HYPOTHESIS_EXAMPLES", "VATTN_SCHED_SEEDS")


class _Reads(dict):
    """An empty environment that notes every name looked up in it (option_variables)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, name, default=None):
        self.names.add(name)
        return default


def option_variables() -> frozenset[str]:
    """Every VATTN_ variable VattnConfig.from_env reads: learnt by reading an empty environment, so
    the list cannot fall behind from_env."""
    reads = _Reads()
    VattnConfig.from_env(reads)
    return frozenset(n for n in reads.names if n.startswith("VATTN_"))


def options_set(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The plugin's options given in the environment, by name (for the start-up log line)."""
    env = os.environ if env is None else env
    return {n: env[n] for n in sorted(option_variables()) if n in env}


def check_variables(env: Mapping[str, str] | None = None) -> None:
    """With vAttention selected, a VATTN_ variable that is neither an option nor one of the tools'
    is a typo or an option this version no longer has: a ConfigError naming it (and the option it
    is closest to), where ignoring it would run the default silently."""
    import difflib

    env = os.environ if env is None else env
    known = option_variables()
    unknown = sorted(n for n in env if n.startswith("VATTN_") and n not in known and n not in TOOL_VARIABLES)
    if unknown:
        hints = []
        suffixes = sorted(n[len("VATTN_"):] for n in known)  # (the shared prefix would make any name look close)
        for name in unknown:
            close = difflib.get_close_matches(name[len("VATTN_"):], suffixes, n=1, cutoff=0.6)
            hints.append(f"{name} (did you mean VATTN_{close[0]}?)" if close else name)
        raise ConfigError(f"unknown vAttention variable(s): {', '.join(hints)}; vllm-vattention reads "
                          f"{', '.join(sorted(known))}; unset or rename the variable (README.md, Options)")


def _step_blocks(max_num_batched_tokens: int, block_size: int, blocks: int, share: float) -> int:
    """auto: the blocks one step's tokens fill, at most `share` of `blocks`."""
    return min(-(-max_num_batched_tokens // block_size), int(blocks * share))


def _map_mode(env: Mapping[str, str], name: str, default: bool | str) -> bool | str:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip().lower() == "stream":
        return "stream"
    try:
        return _flag(env, name, False)
    except ConfigError:
        raise ConfigError(f"{name}={raw!r} is not supported; use 0, 1 or stream") from None


@dataclass(frozen=True)
class VattnConfig:
    requested_by_env: bool = False
    layout: str = "interleaved"
    reclaim: str = "deferred"
    decode_kernel: str = "fa2-graphs"
    fa2_splits: int = 0
    fa2_order: str = "as-is"  # VATTN_FA2_ORDER: FA2 decode over the batch as vLLM orders it, or longest first (#138)
    # VATTN_FA3_DECODE_TOKENS: decode steps with this much context run FA3 (0: never); None: not given, which means
    # DEFAULT_FA3_DECODE_TOKENS with decode_kernel fa2-graphs and 0 otherwise (benchmarks/NOTES.md #133)
    fa3_decode_tokens: int | None = None
    fa3_decode_row_tokens: int | None = None  # VATTN_FA3_DECODE_ROW_TOKENS (as fa3_decode_tokens: NOTES #134)
    background_map: bool | str = "stream"  # False, True (native thread) or "stream"
    extra_rows: int | None = None
    guard_tokens: int = 256
    fa3_guard: str = "clipped"
    # FA3's scheduler metadata once per step for every layer (ops.fa3_schedule); off: no gain measured
    # on an H200 (benchmarks/NOTES.md #91, #96)
    fa3_schedule: bool = False
    # a count or "auto" (resolved by spare_blocks_for() once the step size and the KV budget are known);
    # None: not given, which means auto in stream mode and 0 otherwise (benchmarks/NOTES.md #29)
    spare_blocks: int | str | None = None
    lend_blocks: int | str | None = None  # a count or "auto" (lend_blocks_for()); None: as spare_blocks
    growth_ahead: bool = False
    keep_guards: bool | None = None  # None: not given, which means on for decode_kernel fa2-graphs only
    prefix_rows: bool = True
    warm_defer: bool = True
    bounded_scan: bool = True  # (the default since benchmarks/NOTES.md #120)
    fence: str = "event"  # VATTN_FENCE: event (CUDA events) or value (host words: NOTES #124)
    stale_guards: bool = True  # VATTN_STALE_GUARDS (NOTES #126)
    row_drains: bool = False  # VATTN_ROW_DRAIN (NOTES #143)
    prefix_eviction: str = "lru"
    prefix_min_users: int = DEFAULT_MIN_USERS
    step_trace: str = ""  # VATTN_STEP_TRACE: a JSON file each serving step's timing is written to at shutdown

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "VattnConfig":
        env = os.environ if env is None else env
        backend = env.get(BACKEND_ENV, "").strip()
        return cls(
            requested_by_env=backend.upper() == BACKEND_VALUE,
            layout=_choice(env, "VATTN_LAYOUT", LAYOUTS, "interleaved"),
            reclaim=_choice(env, "VATTN_RECLAIM", RECLAIM_POLICIES, "deferred"),
            decode_kernel=_choice(env, "VATTN_DECODE_KERNEL", DECODE_KERNELS, "fa2-graphs"),
            fa2_splits=_int(env, "VATTN_FA2_SPLITS", 0),
            fa2_order=_choice(env, "VATTN_FA2_ORDER", FA2_ORDERS, "as-is"),
            fa3_decode_tokens=_int(env, "VATTN_FA3_DECODE_TOKENS", None),
            fa3_decode_row_tokens=_int(env, "VATTN_FA3_DECODE_ROW_TOKENS", None),
            background_map=_map_mode(env, "VATTN_BACKGROUND_MAP", "stream"),
            extra_rows=_int(env, "VATTN_EXTRA_ROWS", None),
            # FA3 reads up to one key tile (<= 192 tokens, ops.FA3_MAX_OVERREAD) past a sequence's end.
            guard_tokens=_int(env, "VATTN_GUARD_TOKENS", 256, minimum=192),
            fa3_guard=_choice(env, "VATTN_FA3_GUARD", ("always", "clipped"), "clipped"),
            fa3_schedule=_flag(env, "VATTN_FA3_SCHEDULE", False),
            spare_blocks=_spares(env, "VATTN_SPARE_BLOCKS", None),
            lend_blocks=_spares(env, "VATTN_LEND_BLOCKS", None),
            growth_ahead=_flag(env, "VATTN_GROWTH_AHEAD", False),
            keep_guards=_flag(env, "VATTN_KEEP_GUARDS", None),
            prefix_rows=_flag(env, "VATTN_PREFIX_ROWS", True),
            warm_defer=_flag(env, "VATTN_WARM_DEFER", True),
            bounded_scan=_flag(env, "VATTN_BOUNDED_SCAN", True),
            fence=_choice(env, "VATTN_FENCE", FENCES, "event"),
            stale_guards=_flag(env, "VATTN_STALE_GUARDS", True),
            row_drains=_flag(env, "VATTN_ROW_DRAIN", False),
            prefix_eviction=_choice(env, "VATTN_PREFIX_EVICTION", PREFIX_EVICTION_MODES, "lru"),
            prefix_min_users=_int(env, "VATTN_PREFIX_MIN_USERS", DEFAULT_MIN_USERS, minimum=2),
            step_trace=env.get("VATTN_STEP_TRACE", "").strip(),
        )

    def __post_init__(self) -> None:
        if self.keep_guards is None:
            object.__setattr__(self, "keep_guards", self.decode_kernel == "fa2-graphs")
        elif not self.keep_guards and self.decode_kernel == "fa2-graphs":
            raise ConfigError("VATTN_KEEP_GUARDS=0 with VATTN_DECODE_KERNEL=fa2-graphs would map every decode "
                              "row's FA3 guard again in each mixed step (while that step waits); leave "
                              "VATTN_KEEP_GUARDS unset, or use VATTN_DECODE_KERNEL=fa2")
        if self.spare_blocks is None:
            object.__setattr__(self, "spare_blocks", "auto" if self.background_map == "stream" else 0)
        elif self.spare_blocks and self.background_map != "stream":
            raise ConfigError(f"VATTN_SPARE_BLOCKS={self.spare_blocks} needs VATTN_BACKGROUND_MAP=stream (the "
                              "spares are mapped by the native thread while no step waits); set it, or "
                              "VATTN_SPARE_BLOCKS=0")
        if self.fence == "value" and self.background_map != "stream":
            raise ConfigError("VATTN_FENCE=value needs VATTN_BACKGROUND_MAP=stream (only the native thread waits "
                              "on a step's host word); set it, or VATTN_FENCE=event")
        if self.row_drains and not self.background_map:
            raise ConfigError("VATTN_ROW_DRAIN=1 needs the native mapping thread (VATTN_BACKGROUND_MAP=stream or 1): "
                              "without it background ops run at once and there is nothing to drain; unset it")
        if self.growth_ahead and self.background_map != "stream":
            raise ConfigError("VATTN_GROWTH_AHEAD=1 needs VATTN_BACKGROUND_MAP=stream (growth slots are mapped "
                              "ahead by the native thread); set it, or VATTN_GROWTH_AHEAD=0")
        if self.step_trace and not os.path.isdir(os.path.dirname(os.path.abspath(self.step_trace))):
            raise ConfigError(f"VATTN_STEP_TRACE={self.step_trace!r}: its folder does not exist; create it or "
                              "name a file in an existing folder")
        graphs = self.decode_kernel == "fa2-graphs"
        for name, attr, default in (("VATTN_FA3_DECODE_TOKENS", "fa3_decode_tokens", DEFAULT_FA3_DECODE_TOKENS),
                                    ("VATTN_FA3_DECODE_ROW_TOKENS", "fa3_decode_row_tokens",
                                     DEFAULT_FA3_DECODE_ROW_TOKENS)):
            value = getattr(self, attr)
            if value is None:
                object.__setattr__(self, attr, default if graphs else 0)
            elif value and not graphs:
                raise ConfigError(f"{name}={value} chooses between fa2-graphs' two decode paths, but "
                                  f"VATTN_DECODE_KERNEL={self.decode_kernel}; unset one of them")
        if self.fa2_order != "as-is" and self.decode_kernel == "fa3":
            raise ConfigError(f"VATTN_FA2_ORDER={self.fa2_order} orders FA2's decode batches, but "
                              "VATTN_DECODE_KERNEL=fa3 runs none; unset one of them")
        if self.fa2_splits > 128:
            raise ConfigError(f"VATTN_FA2_SPLITS={self.fa2_splits} is above FA2's limit of 128; use 0 (FA2's "
                              "heuristic) to 128")
        if self.lend_blocks is None:  # not given: on wherever lent frames can be used (NOTES.md #58)
            object.__setattr__(self, "lend_blocks", "auto" if self.background_map == "stream" else 0)
        elif self.lend_blocks and self.background_map != "stream":
            raise ConfigError(f"VATTN_LEND_BLOCKS={self.lend_blocks} needs VATTN_BACKGROUND_MAP=stream (lent "
                              "frames are spares, mapped ahead by the native thread); set it, or VATTN_LEND_BLOCKS=0")

    def spare_blocks_for(self, max_num_batched_tokens: int, block_size: int, budget_blocks: int) -> int:
        """How many spare frames to create: the number given, or with auto as many blocks as one
        step's tokens fill (the most fresh blocks a single step can hand out), but no more than
        AUTO_SPARE_SHARE of `budget_blocks` (the blocks the KV budget holds before spares are taken
        out of it)."""
        if self.spare_blocks == "auto":
            return _step_blocks(max_num_batched_tokens, block_size, budget_blocks, AUTO_SPARE_SHARE)
        return int(self.spare_blocks)

    def lend_blocks_for(self, max_num_batched_tokens: int, block_size: int, num_blocks: int) -> int:
        """How many never-used blocks to lend as spares: the number given, or with auto as many as
        one step's tokens fill, at most AUTO_LEND_SHARE of vLLM's `num_blocks` (lend_unused lends
        fewer when fewer were never handed out)."""
        if self.lend_blocks == "auto":
            return _step_blocks(max_num_batched_tokens, block_size, num_blocks, AUTO_LEND_SHARE)
        return int(self.lend_blocks)

    def guard_ahead_slots(self, block_size: int) -> int:
        """Slots past each running row's blocks that warm() keeps readable ahead of the steps that
        read them (memory manager's guard_ahead): FA3's guard in block slots with fa2-graphs, whose
        mixed steps over-read every row (an extent of seq + guard_tokens tokens ends at most this many
        slots past the row's blocks); 0 otherwise."""
        return -(-self.guard_tokens // block_size) if self.decode_kernel == "fa2-graphs" else 0

    def num_rows(self, max_num_seqs: int) -> int:
        extra = max_num_seqs if self.extra_rows is None else self.extra_rows
        return max_num_seqs + extra
