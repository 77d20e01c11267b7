"""The KV memory manager: one reservation, a page pool, rows, and the mapper. No vLLM here.

Typical use, once per step:

    row = mgr.acquire_row()                  # a new request
    mgr.set_blocks(row, block_ids)           # its block list (only changed slots are remapped)
    mgr.ensure_readable(row, read_tokens)    # a guard behind the end, for kernels that over-read
    ... launch the step ...
    mgr.record_reads(fence, {row: read_tokens})
    mgr.release_row(row)                     # finished or preempted

With `background="stream"`, the launching thread does not wait for the mappings at all:

    seq = mgr.publish()                      # after the step's set_blocks / ensure_readable
    driver.stream_wait(stream, mgr.flag_device_address, seq)   # the GPU waits, not the CPU

and with `value_fences=True` a step's fence is a word the stream writes after the step, which the
native thread polls when an unmap must wait for that step (mapper.HostWordFence):

    mgr.record_reads(mgr.step_fence(stream), {row: read_tokens})

`reclaim="deferred"` (default) leaves a released row's slots mapped: a later request in that row
whose blocks are the same pays nothing, and stale slots are only ever read past a sequence's end
(masked). `reclaim="eager"` unmaps them once no step in flight reads them.

`spare_blocks=S` (stream mode) creates S frames more than blocks and keeps the rows that
`acquire_row` hands out next mapped with them ahead of time, in the background (`warm()`, once per
step): a fresh block put in such a slot moves into that frame (mapper.py), so a new request's first
mappings cost no driver call while its step waits. How deep a row is warmed follows the recent new
requests' fresh blocks. A few spares (PAD_RESERVE) are kept mapped nowhere for
`ensure_readable`'s guard slots, which a growing row fills next (mapper.py). `lend_unused(n)` adds
the frames of up to n blocks never handed out to the spares, until the blocks are handed out: more
rows warm in a burst of new requests, with no memory taken from the KV budget.

    mgr.set_blocks(row, block_ids, fresh_from=ceil(num_computed_tokens / block_size))
    seq = mgr.publish(); ... launch the step ...; mgr.warm()
"""

from __future__ import annotations

import ctypes
import itertools
from collections import deque
from typing import Callable, Iterator, Sequence

from ..errors import MappingError, OutOfAddressSpaceError
from .driver import Driver
from .executor import SIGNAL, SyncExecutor
from .layout import Layout
from .mapper import Fence, HostWordFence, RowMapper
from .pool import PagePool

RECLAIM_POLICIES = ("deferred", "eager")
# warm()'s outcomes, counted (stats()): calls that planned, that found nothing changed, that stopped at
# a row a step in flight still reads or at the end of the spares mapped nowhere; the last depth
_WARM_COUNTS = ("warm_calls", "warm_unchanged", "warm_deferred", "warm_stopped_in_flight", "warm_stopped_no_spare",
                "warm_depth", "warm_guards_over_budget", "warm_stale_guards",
                "warm_guards_clipped", "warm_guard_spares_freed")
# new requests' blocks (set_blocks from slot 0): admissions, blocks moved into spares, mapped, unmapped first;
# and the admissions that took the free row still mapping their prefix hits (acquire_row)
_ADMIT_COUNTS = ("admissions", "admit_swaps", "admit_maps", "admit_unmaps", "prefix_rows_taken", "admit_stale_replaced")
# running requests' growth (set_blocks past slot 0): blocks moved into spares, mapped (while the step waits),
# and what was unmapped first (a stale frame or the zero page: after a wait for any step over-reading it)
_GROW_COUNTS = ("grow_swaps", "grow_maps", "grow_unmaps")


def _ints(xs):
    """A sequence of plain ints (numpy arrays' items are not: their arithmetic costs more per item)."""
    return xs.tolist() if hasattr(xs, "tolist") else xs


class KVMemoryManager:
    WARM_HISTORY = 64  # new requests whose fresh block counts set the warm depth
    WARM_ROWS = 64  # at most this many rows are kept warm (bounds warm()'s scan when requests are short)
    # spares warm() leaves mapped nowhere for guard slots (at most this many, and 1/32 of the spares):
    # FA3 over-reads at most 256 tokens (16 slots) past each prefill row but the longest (ops.read_extents)
    PAD_RESERVE = 16
    # warm()'s first planning calls are kept (stats' warm_trace): depth, slots warm, rows looked at,
    # rows in flight, spares freed from idle rows - how the first wave of requests found the rows
    WARM_TRACE = 24
    ADMIT_TRACE = 24
    # a spare this many slots past a running request's blocks is kept for its growth (the next block
    # moves into it); spares further out go back to warm() (NOTES #42)
    GROWTH_KEEP = 2

    # growth_ahead: when spares mapped nowhere run out, the rows after the first this many free rows
    # give up their warm spares to running requests' growth slots (a running request will grow; a
    # warm row waits for a new request)
    GROWTH_WARM_ROWS = 4
    # warm()'s alias scan (_free_aliases: every spare, once per call) runs when rows were acquired or
    # released since the last one, else at most once in this many calls: with growth_ahead a decode
    # step's swaps mark warm() stale at almost every step, and the scan was most of its time
    ALIAS_SCAN_EVERY = 8
    # the scan looks at every spare only every this many scans, or when the warm depth or the
    # window changed; the others look at the spares that can have become free since: frames that
    # became spares (swaps, lends), spares in rows acquired, released or whose guard was let go,
    # and those a step in flight kept last time (each scan was ~1-2 ms of the engine thread with
    # 2,048 spares, most of warm(), and found what these hold: NOTES #78). The periodic full scan is
    # a safety net: at 8 it freed nothing the others missed in any of ten CPU-harness workloads
    # (every count the same at 8, 64 and never) and was most of the admitting steps' p90 (NOTES #99)
    ALIAS_FULL_EVERY = 64
    # after growth slots last ran short of spares, warm() keeps only GROWTH_WARM_ROWS free rows warm for
    # this many calls (two blocks of decode steps: the next wave of growth) unless a new request takes
    # a row, so that spares do not move back and forth between free rows and growth slots at every wave
    GROWTH_HOLD = 32
    # warm(defer=True) (a step whose engine thread is on the critical path: one carrying prefill
    # chunks) leaves its planning to a later call while the next this many rows acquire_row() hands
    # out are warm to the depth (a burst of new requests still finds warm rows: at most 5-8 were
    # admitted in one step at 16 requests/s, NOTES #100, #101) - or, when more rows than that were
    # taken between two of the last BURST_HISTORY calls, that many (at most WARM_ROWS): offline, a
    # step admits 16 requests of 1,024 tokens, and a call that deferred with 8 rows warm left the
    # other 8 to be mapped while the next step waited (NOTES #115)
    DEFER_READY_ROWS = 8
    BURST_HISTORY = 8
    # guard_ahead: running rows' guards are extended only while all of them could be spares within
    # this share of the spares (the rest warm new requests' rows: NOTES #110)
    GUARD_SPARE_SHARE = 0.5

    def __init__(self, driver: Driver, layout: Layout, num_blocks: int, reclaim: str = "deferred",
                 background: bool | str = False, spare_blocks: int = 0, growth_ahead: bool = False,
                 keep_guards: bool = False, prefix_rows: bool = True, guard_ahead: int = 0,
                 bounded_scan: bool = True, value_fences: bool = False, stale_guards: bool = True,
                 row_drains: bool = False):
        if reclaim not in RECLAIM_POLICIES:
            raise ValueError(f"reclaim={reclaim!r}; use one of {RECLAIM_POLICIES}")
        if background not in (False, True, "stream"):
            raise ValueError(f"background={background!r}; use False, True or 'stream'")
        if guard_ahead and not keep_guards:
            raise ValueError("guard_ahead needs keep_guards (a guard mapped ahead would be let go at once)")
        if value_fences and background != "stream":
            raise ValueError("value_fences needs background='stream' (only the native thread waits on them)")
        if layout.page_size % driver.granularity:
            raise ValueError(f"page size {layout.page_size} is not a multiple of the driver's "
                             f"granularity {driver.granularity}")
        self.driver = driver
        self.layout = layout
        self.reclaim = reclaim
        self.base_va = 0
        self.pool: PagePool | None = None
        try:
            self.base_va = driver.reserve(layout.total_bytes)
        except OutOfAddressSpaceError as e:
            raise OutOfAddressSpaceError(
                f"{layout.rows} rows x {layout.row_tokens} tokens x {layout.geometry.token_bytes} "
                f"bytes/token = {layout.total_bytes / 2**40:.2f} TiB of virtual memory could not be "
                f"reserved ({e}); lower --max-num-seqs or --max-model-len") from e
        try:
            self.pool = PagePool(driver, num_blocks, layout.block_bytes // layout.chunk_bytes(),
                                 layout.chunk_bytes(), spares=spare_blocks)
        except BaseException:
            driver.free_reservation(self.base_va, layout.total_bytes)
            raise
        self.stream_mode = background == "stream"
        self._flag_host = self.flag_device_address = 0
        self._seq = 0
        self._handed_over: deque[tuple[int, list]] = deque()  # (seq, fences the native thread waits on)
        if background:
            from .native import NativeExecutor
            executor = NativeExecutor(*driver.native_table())
        else:
            executor = SyncExecutor(driver)
        if self.stream_mode:
            self._flag_host, self.flag_device_address = driver.host_flag()
        # value_fences: the word each step's stream writes its number into when the step is done
        self.value_fences = value_fences
        # stale_guards (with guard_ahead): spares in place of the stale frames a prefix row's guard holds
        self.stale_guards = stale_guards
        self._done_host = self._done_device = self._done_seq = 0
        if value_fences:
            self._done_host, self._done_device = driver.host_flag()
        self.mapper = RowMapper(layout, self.pool, self.base_va, executor, defer_waits=self.stream_mode)
        if row_drains and background:  # (VATTN_ROW_DRAIN: a row's change waits for its own background ops only)
            executor.set_rows(self.base_va, *layout.row_regions(), layout.rows)
            self.mapper.row_drains = True
        self._free_rows: deque[int] = deque(range(layout.rows))
        self._active: set[int] = set()
        self._zero_rows: set[int] = set()  # reserve_zero_row()'s: never a spare's place
        # per row, since it was acquired: slots its request's blocks reach, slots made readable
        self._held_end = [0] * layout.rows
        self._guard_end = [0] * layout.rows
        # rows given a guard past their blocks (ensure_readable) since the last warm(): a guard is kept
        # only while its row keeps getting one, i.e. while FA3 reads past its end (prefill); then
        # warm() lets go of it
        self._guarded_now: set[int] = set()
        self._guarded: set[int] = set()  # the rows guarded before the last warm()
        self._let_go: set[int] = set()  # rows whose guard was let go while a step in flight read it
        self.keep_guards = keep_guards  # (VATTN_KEEP_GUARDS: the former rule, every guard kept while its request runs)
        # slots past each running row's blocks that warm() keeps readable in the background (0: off),
        # for kernels that over-read every row in some steps (VATTN_DECODE_KERNEL=fa2-graphs: FA3 in
        # mixed steps); with keep_guards, since a guard extended ahead must not be let go again
        self.guard_ahead = guard_ahead
        # the slots a guard extended ahead spans: one more than guard_ahead, since a row's next block
        # arrives in the step that reads past it, before warm() can extend the guard again (else one
        # step in 16 of each row's would find it short)
        self.guard_slots = guard_ahead + 1 if guard_ahead else 0
        self._ahead_rows: dict[int, None] = {}  # running rows whose blocks grew since their guard was extended
        # warm(clip_guards=True): the next steps read every running row only up to the longest one's end
        # (a long decode step's clipped FA3 view), so guards over their share may still fit up to there
        self._clip_guards = False
        self._guards_deferred = False  # the last call with rows in _ahead_rows left them to the next (warm(defer))
        self._closed = False
        self._recent_fresh: deque[int] = deque(maxlen=self.WARM_HISTORY)  # fresh blocks of new requests
        self.prefer_prefix_rows = prefix_rows and reclaim == "deferred"  # (VATTN_PREFIX_ROWS; eager keeps no mappings)
        self.bounded_scan = bounded_scan  # (VATTN_BOUNDED_SCAN: _free_aliases)
        self._warm_stale = True  # something warm() depends on changed since it last finished its work
        self.pad_reserve = min(self.PAD_RESERVE, spare_blocks // 32)
        # growth_ahead (stream mode with spares): warm() keeps the slot past each running request's
        # blocks mapped with a spare, so that its next block (decode growth) moves in without a
        # driver call while its step waits. Rows whose growth slot may lack one, oldest first:
        self.growth_ahead = growth_ahead
        self._grow: dict[int, None] = {}
        self._grow_blocked = False  # the last try found no spare; set again where _warm_stale is
        self._scan_due, self._scan_countdown = True, 0  # warm()'s alias scan: rows changed / calls left
        # what a scan of some spares looks at (_alias_candidates): rows acquired, released or whose
        # guard was let go; frames a step in flight kept from being freed; scans left before a full
        # one, and the (depth, window) the last full one saw
        self._touched: set[int] = set()
        self._alias_retry: set[int] = set()
        self._full_scans_in, self._alias_basis = 0, None
        # warm() calls; the last in which growth slots ran short; the last before a row was acquired
        self._calls, self._short_at, self._acquired_at = 0, -self.GROWTH_HOLD, 0
        # rows acquire_row() handed out since the last warm() call, and in each of the last calls
        self._taken, self._bursts = 0, deque([0], maxlen=self.BURST_HISTORY)
        self._zero_counters()

    # -- rows --------------------------------------------------------------------------
    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def acquire_row(self, blocks: Sequence[int] = (), cached: int = 0) -> int:
        """A free row for a new request. FIFO (the longest-idle row: least likely to be in flight,
        and the next warm one) - unless the request's first `cached` `blocks` are prefix-cache hits
        and a free row still maps most of them at the same slots (deferred reclamation kept the
        mappings of the request that computed them): then that row, if it costs fewer block maps
        than a warm row would (a warm row maps every hit; its spares only help fresh blocks)."""
        if not self._free_rows:
            raise MappingError(
                f"all {self.layout.rows} rows are in use; more requests run at once than rows were "
                "reserved for (rows follow --max-num-seqs)")
        row = self._prefix_row(blocks, cached) if cached and self.prefer_prefix_rows else None
        if row is None:
            row = self._free_rows.popleft()
        else:
            self._free_rows.remove(row)
            self.admit_counts["prefix_rows_taken"] += 1
        self._active.add(row)
        self._touched.add(row)
        self._held_end[row] = self._guard_end[row] = 0
        self._warm_stale = self._scan_due = True
        self._grow_blocked = False
        self._acquired_at = self._calls
        self._taken += 1
        return row

    def _prefix_row(self, blocks: Sequence[int], cached: int) -> int | None:
        """The free row that maps the longest run of `blocks`' frames from slot 0, if taking it maps
        fewer blocks than a warm row: (len(blocks) - run) against `cached` (NOTES #71). Rows a step
        in flight may still read are left out (their stale slots would need a hazard wait)."""
        frames = self.pool.frames(blocks[:cached])
        users = self.mapper.where.get(frames[0]) if frames and frames[0] is not None else None
        if not users:
            return None
        best, best_run = None, 0
        slots_of = self.mapper.slots
        for r, s in users:
            if s != 0 or r in self._active or r in self._zero_rows:
                continue
            slots, run = slots_of[r], 1
            while run < len(frames) and slots[run] == frames[run]:
                run += 1
            if run > best_run:
                best, best_run = r, run
        if best is None or len(blocks) - best_run >= cached:
            return None
        self.mapper.retire()
        return best if self.mapper.read_bound(best) == 0 else None

    def reserve_zero_row(self) -> int:
        """A row for dummy runs, CUDA-graph capture and padded batch entries: acquired for good and
        backed by the read-only zero page in every slot. Never spare frames: no request ever grows
        into this row, so a spare put there (as ensure_readable's guard would) stays out of warm()'s
        reach for the engine's life (on the H100 this took 548 of 572 spares, NOTES #42)."""
        row = self.acquire_row()
        self._zero_rows.add(row)
        self.mapper.ensure_readable(row, self.layout.blocks_per_row)  # no pad: the zero page only
        self.sync()
        return row

    def release_row(self, row: int) -> None:
        if row not in self._active:
            raise MappingError(f"row {row} is not in use")
        self._active.remove(row)
        self._grow.pop(row, None)
        self._ahead_rows.pop(row, None)
        self._guarded.discard(row)
        self._guarded_now.discard(row)
        self._touched.add(row)
        self._warm_stale = self._scan_due = True
        self._grow_blocked = False
        if self.reclaim == "eager":
            self.mapper.clear_row(row)
        self._free_rows.append(row)

    # -- mappings ----------------------------------------------------------------------
    def _require_active(self, row: int) -> None:
        if row not in self._active:
            raise MappingError(f"row {row} is not in use; acquire_row() first")

    def set_blocks(self, row: int, blocks: Sequence[int], start: int = 0, fresh_from: int | None = None) -> None:
        """Slots [start, start + len(blocks)) of `row` will hold `blocks` (maps only what differs).
        blocks[fresh_from:] hold no content yet (tokens not computed): they may move into spare
        frames (mapper.set_blocks); None: every block's content counts."""
        self._require_active(row)
        admission = start == 0 and fresh_from is not None  # a new request's blocks
        if admission:
            self._recent_fresh.append(max(0, len(blocks) - fresh_from))
        self._held_end[row] = max(self._held_end[row], start + len(blocks))
        if self.growth_ahead:
            self._grow[row] = None
        if self.guard_ahead:
            self._ahead_rows[row] = None
        st = self.mapper.stats
        swaps, maps, unmaps = st.swaps, st.block_maps, st.block_unmaps
        warm_before = (sum(1 for f in self.mapper.slots[row][:len(blocks)] if f in self.pool.spare_frames)
                       if admission and len(self.admit_trace) < self.ADMIT_TRACE else None)
        self.mapper.set_blocks(row, list(blocks), start, fresh_from, live_rows=self._active)
        # how the blocks got into place: moved into spares (no driver call) or mapped while their step
        # waits, and what was unmapped first (a stale slot of the row's last user)
        got = (st.swaps - swaps, st.block_maps - maps, st.block_unmaps - unmaps)
        if start > 0:  # a running request's growth
            g = self.grow_counts
            g["grow_swaps"] += got[0]
            g["grow_maps"] += got[1]
            g["grow_unmaps"] += got[2]
        if admission:
            c = self.admit_counts
            c["admissions"] += 1
            c["admit_swaps"] += got[0]
            c["admit_maps"] += got[1]
            c["admit_unmaps"] += got[2]
            if warm_before is not None:  # (row, blocks, fresh, slots holding a spare before, swaps, maps, unmaps)
                self.admit_trace.append((row, len(blocks), len(blocks) - fresh_from, warm_before, *got))
        if (admission and self.guard_ahead and self.stale_guards
                and self.mapper.replace_stale(row, len(blocks), self._cold_spares())):
            # a row taken for its prefix hits maps its last user's next block in the new request's first
            # growth slot; left there, this step over-reads it as FA3's guard, and a prompt ending on a
            # block boundary grows into it in the next step: an unmap that waits for this one (49 of the
            # CPU harness's 103 hazard waits in serving, NOTES #124). A spare there now, in this step's
            # ops (the ones the step waits for anyway), and the growth moves into it
            self.admit_counts["admit_stale_replaced"] += 1
        if self.mapper.stats.swaps != swaps:  # spares changed hands
            self._grow_blocked = False
            # (with growth_ahead a running request's growth swaps almost every step; the spare it frees
            # goes to its next growth slot, so the free rows' warm state need not be checked again)
            if not (self.growth_ahead and start > 0):
                self._warm_stale = True

    def warm(self, defer: bool = False, clip_guards: bool = False) -> int:
        """Map spare frames, in the background, into the rows acquire_row() hands out next, each as
        deep as the most fresh blocks a recent new request had, until no spare is left unmapped.
        Call once per step, after the step's mappings were published (the rows taken between two
        calls are a step's burst: _defer_rows). Returns slots now warm. With growth_ahead, running
        requests' growth slots are served first (_warm_growth); with guard_ahead, running rows'
        guards are extended first (_extend_guards: with spares only, while they fit
        GUARD_SPARE_SHARE of them). defer: the caller's thread is short of time now; while the next
        rows are warm (as many as recent steps took, at least DEFER_READY_ROWS: _defer_rows), the
        planning waits for a call without it. guard_ahead's extensions wait one call, not two in a
        row (offline, nearly every step carries prefill chunks, and a guard not extended is mapped
        by the next step that reads past it, on its path: ensure_readable; NOTES #109). clip_guards:
        the coming steps read each running row only up to the longest running row's end (the
        caller's long decode steps: FA3's view clipped there); where whole guards are over their
        share of the spares, guards then reach that far (_clipped_guards), with spares freed for
        them from the free rows handed out last (_free_spares_for_guards; NOTES #135)."""
        self._bursts.append(self._taken)
        self._taken = 0
        self._clip_guards = clip_guards
        if self._ahead_rows or (clip_guards and len(self._active) > len(self._zero_rows)):
            if defer and not self._guards_deferred:
                self._guards_deferred = True
            else:
                self._guards_deferred = False
                self._extend_guards()
        if not self.pool.spare_frames:
            return 0
        self._calls += 1
        if len(self.pool.respared) > 4 * len(self.pool.spare_frames):  # no scan for long: the next is full
            self.pool.respared.clear()
            self._full_scans_in = 0
        self._drop_stale_guards()
        short_now = False
        if self._grow:
            short_now = self._warm_growth() > 0
            if short_now:
                self._short_at = self._calls
        # held narrow only while no new request took a row since (admissions need the warm rows)
        growth_short = short_now or (self._calls < self._short_at + self.GROWTH_HOLD
                                     and self._acquired_at <= self._short_at)
        if not self._recent_fresh:
            return 0
        counts = self.warm_counts
        self._scan_countdown -= 1
        scan_now = self._scan_due or self._scan_countdown <= 0
        # growth slots short of spares need the alias scan below to free some (at its pace)
        if not self._warm_stale and not (short_now and scan_now):
            counts["warm_unchanged"] += 1
            return 0  # (nothing changed since a call that did all it could: a decode step's usual case)
        depth = max(self._recent_fresh)
        counts["warm_depth"] = depth
        if depth == 0:
            return 0
        if defer and not growth_short and self._rows_ready(depth, self._defer_rows()):
            counts["warm_deferred"] += 1  # (still stale: the next call without defer plans)
            return 0
        counts["warm_calls"] += 1
        bounds = self.mapper.read_bounds()
        in_flight = {r for r, n in bounds.items() if n}
        # running requests' growth slots short of spares: the free rows after the first few give theirs up
        window = list(itertools.islice(self._free_rows, self.GROWTH_WARM_ROWS if growth_short else self.WARM_ROWS))
        got: dict[int, int] = {}  # row -> slots warm in it
        stop = self._warm_window(window, depth, in_flight, got)
        freed = 0
        if growth_short and stop is None:
            stop = next(itertools.islice(self._free_rows, len(window), None), None)  # free the rest for growth
        if stop is not None and stop not in in_flight and scan_now:
            # Out of spares mapped nowhere. A fresh block's former frame is a spare, but usually still
            # mapped where it was: in the row of the request that last used it (deferred reclamation),
            # or warmed deeper than the requests that took the rows since needed. Unmap such aliases
            # where nothing reads them, and warm on with them now (their unmaps run first: the
            # background queue keeps order).
            self._scan_due, self._scan_countdown = False, self.ALIAS_SCAN_EVERY
            rest = window[window.index(stop):] if stop in window else []  # (growth: stop may lie past it)
            freed = self._free_aliases(depth, bounds, set(got), self._alias_candidates(depth, len(window)),
                                       None if growth_short else window, len(window) - len(rest))
            if freed:
                self._grow_blocked = False
                if rest:
                    stop = self._warm_window(rest, depth, in_flight, got)
        if stop is None:
            self._warm_stale = False  # done until something changes
        else:
            counts["warm_stopped_in_flight" if stop in in_flight else "warm_stopped_no_spare"] += 1
            # an idle row still read by a step in flight frees up without a call here
            self._warm_stale = not in_flight <= self._active  # (a row is active or free)
        if self._let_go:
            # guards let go of while a step in flight still read them: their spares free up without a
            # call here either, so the next call looks again (a scan at its pace takes them then)
            held, keep = self._held_end, self.GROWTH_KEEP
            self._let_go = {r for r in self._let_go if r in self._active and bounds.get(r, 0) > held[r] + keep}
            if self._let_go:
                self._warm_stale = self._scan_due = True
        warm = sum(got.values())
        self._trace_warm(depth, warm, len(got), len(in_flight), freed)
        return warm

    def _defer_rows(self) -> int:
        """How many of the next rows must be warm for warm(defer=True) to leave its planning: the
        most rows taken between two of the last BURST_HISTORY calls, at least DEFER_READY_ROWS and at
        most WARM_ROWS (the most warm() keeps warm)."""
        return min(self.WARM_ROWS, max(self.DEFER_READY_ROWS, *self._bursts))

    def _rows_ready(self, depth: int, n: int) -> bool:
        """The next `n` rows acquire_row() hands out hold spares in their first `depth` slots
        (planned: a row's next change waits for its background ops)."""
        rows = list(itertools.islice(self._free_rows, n))
        return len(rows) == n and all(self.mapper.holds_spares(r, depth) for r in rows)

    def _drop_stale_guards(self) -> None:
        """A running request's guard (FA3's over-read slots past its blocks, often holding spares:
        ensure_readable) is needed only in the steps FA3 reads its row: its prefill. Once a step
        passes without one (the request decodes with FA2, which reads no further than its tokens),
        the guard's slots become what warm() may take spares back from (_free_aliases), after any
        step in flight that reads them. With mixed prompt lengths every prefill row but the longest
        gets a guard, and those guards held most spares for their requests' lives (NOTES #62)."""
        now, self._guarded_now = self._guarded_now, set()
        if self.keep_guards and not (self.guard_ahead and not self._guards_in_budget()):
            # guard_ahead over its share extends nothing, so mixed steps run fa2's two launches and
            # decode rows need no guard: the guards of prefill chunks are let go as without
            # keep_guards (those extended ahead stay: letting them go too measured worse at
            # 1024-in-128-out, where rows later fit the share again; NOTES #110)
            return
        stale, self._guarded = self._guarded - now, now
        if not stale:
            return
        held, guard = self._held_end, self._guard_end
        for r in stale:
            guard[r] = min(guard[r], held[r])
        self._let_go |= stale
        self._touched |= stale
        self._warm_stale = self._scan_due = True  # spares may be free to take back

    def _extend_guards(self) -> None:
        """guard_ahead: each running row whose blocks grew gets its guard extended to guard_ahead + 1
        slots past its blocks, in the background, with spares mapped nowhere past the pad reserve
        (a row for which too few are left keeps its guard as it is, and waits for a later call), so
        that a step in which a kernel would over-read every row finds the guards in place
        (guards_ready) instead of mapping them while it waits. Only while the running rows' guards
        could all be spares within GUARD_SPARE_SHARE of the spares: with more rows, steps would
        seldom find all of them guarded, and the spares serve new requests' rows better (warm();
        NOTES #110). A row a step in flight reads past the guard's start (none should: reads end
        at the guard) waits for the next call.

        A guard that reaches far enough may still hold stale frames: a row taken for its prefix hits
        (acquire_row) still maps its last user's later blocks past the new request's, and those
        count as readable. The row's growth into such a slot is an unmap that waits for every step
        in flight that over-read it (a hazard wait; all of them in the CPU harness's serving runs,
        NOTES #124). Those that no step in flight reads become spares here, like any guard slot;
        the rest wait for a later call (warm_stale_guards counts the rows done)."""
        cap, rows = None, self._ahead_rows
        if not self._guards_in_budget():
            cap = self._clipped_guards()
            if cap is None:
                self.warm_counts["warm_guards_over_budget"] += 1  # (the rows stay listed: a later call)
                return
            rows = self._running_rows()  # (a row's guard reaches further when the longest row grows)
            self.warm_counts["warm_guards_clipped"] += 1
        mapper, held, guard, bpr = self.mapper, self._held_end, self._guard_end, self.layout.blocks_per_row
        mapper.retire()
        if cap is not None:
            self._free_spares_for_guards(self._clipped_need(cap), self._spares_past_reserve)
        spans, later, stale = [], {}, set()  # stale: rows whose guard so far holds stale frames
        for row in rows:
            h, want = held[row], min(held[row] + self.guard_slots, bpr, cap or bpr)
            start = max(guard[row], h)
            if self.stale_guards and h < start and mapper.holds_stale(row, h, min(start, want)):
                start = h
                stale.add(row)
            if start >= want:
                continue
            bound = mapper.read_bound(row)
            if bound > start:
                later[row] = None
                if row not in stale or bound >= want:
                    continue
                start = bound  # the stale slots no step in flight reads now; the others in a later call
            spans.append((row, start, want))
        done = mapper.guard_ahead(spans, self._spares_past_reserve()) if spans else 0
        for row, _, want in spans[:done]:
            guard[row] = max(guard[row], want)
        later.update((row, None) for row, _, _ in spans[done:])
        self._ahead_rows = later
        if stale:
            self.warm_counts["warm_stale_guards"] += sum(1 for row, _, _ in spans[:done] if row in stale)

    def _guards_in_budget(self) -> bool:
        """Could every running row's guard (guard_slots each) be spares within GUARD_SPARE_SHARE of them?"""
        return len(self._active) * self.guard_slots <= self.GUARD_SPARE_SHARE * len(self.pool.spare_frames)

    def _clipped_guards(self) -> int | None:
        """warm(clip_guards=True) with whole guards over their share: the slot every running row's
        guard ends at instead, one past the longest running row's blocks (its next block arrives in
        the step that reads it), if those guards fit GUARD_SPARE_SHARE of the spares; else None.
        A long decode step's FA3 view ends at its longest row (ops.plan_reads), so the others read
        no further; a slot it reads that holds no spare is mapped on its path, mostly the zero page
        out of spares, and the row's growth there is an unmap that waits for the steps reading it
        (NOTES #132, #135)."""
        rows = self._running_rows() if self._clip_guards and self.guard_slots else ()
        if not rows:
            return None
        held, gs = self._held_end, self.guard_slots
        cap = min(max(held[r] for r in rows) + 1, self.layout.blocks_per_row)
        need = sum(max(0, min(held[r] + gs, cap) - held[r]) for r in rows)
        return cap if need <= self.GUARD_SPARE_SHARE * len(self.pool.spare_frames) else None

    def spare_guards(self, rows: Sequence[int], num_tokens: Sequence[int]) -> int:
        """Before a step that reads `rows` up to `num_tokens` and maps the guard slots missing on its
        path (ensure_readable): free as many spares as those slots from the free rows handed out last
        (_free_spares_for_guards), so that they are spares, not the zero page. For a long decode step
        (VATTN_FA3_DECODE_TOKENS) that finds its guards short: the first one after the prefills, before
        any warm() call clipped the guards (NOTES #135). Returns how many were freed."""
        need = self._guard_holes(rows, num_tokens)
        return self._free_spares_for_guards(need, self._cold_spares) if need else 0

    def _guard_holes(self, rows: Sequence[int], num_tokens: Sequence[int]) -> int:
        """The slots ensure_readable would map to make each of `rows` readable up to its `num_tokens`."""
        bs, mapper = self.layout.block_size, self.mapper
        return sum(mapper.holes(row, -(-tokens // bs)) for row, tokens in zip(_ints(rows), _ints(num_tokens)))

    def _free_spares_for_guards(self, need: int, cold: Callable[[], Iterator[int]]) -> int:
        """Clipped guards (_clipped_guards) are spares or nothing, and in an offline run warm rows hold
        nearly every spare (2,032 of 2,048 at 8192-in-256-out, NOTES #132): unmap, in the background,
        spares from the free rows acquire_row() hands out last, deepest slot first, until `cold()` (the
        cold spares the caller's guards take) yields `need`. Slots a step in flight reads are left alone
        (no wait). A spare freed here may be mapped into a guard slot before its unmap has run: two
        mappings of one frame for a moment, and the free row's slot is read by nothing. Returns how many
        were freed."""
        short = need - sum(1 for _ in itertools.islice(cold(), need))
        if short <= 0:
            return 0
        where = self.mapper.where
        order = {r: i for i, r in enumerate(self._free_rows)}
        bounds = self.mapper.read_bounds()
        donors = []  # (row's place in the free list, slot, frame): in free rows only, not read in flight
        for f in self.pool.spare_frames:
            slots = where.get(f)
            if slots and all(r in order and s >= bounds.get(r, 0) for r, s in slots):
                r, s = max(slots, key=lambda x: (order[x[0]], x[1]))
                donors.append((order[r], s, f))
        donors.sort(reverse=True)
        free_rows = set(order)
        freed = self.mapper.unmap_aliases([f for _, _, f in donors], lambda r, s: r in free_rows, short)
        if freed:
            self.warm_counts["warm_guard_spares_freed"] += freed
            self._warm_stale = True  # (the rows they came from are short now)
        return freed

    def _running_rows(self) -> list[int]:
        """The rows requests hold (the active ones but reserve_zero_row's, which never take a spare)."""
        zero = self._zero_rows
        return [r for r in self._active if r not in zero]

    def _guard_reserve(self, whole: int) -> int:
        """The cold spares warm rows leave for running rows' guards: `whole` while whole guards fit
        their share (the caller's count), with clipped guards (_clipped_guards) the slots still to
        map up to the cap, else none."""
        if not self.guard_slots or not self._active:
            return 0
        if self._guards_in_budget():
            return whole
        cap = self._clipped_guards()
        return 0 if cap is None else self._clipped_need(cap)

    def _clipped_need(self, cap: int) -> int:
        """The guard slots still to map for every running row's guard to end at `cap` (_clipped_guards)."""
        held, guard, gs = self._held_end, self._guard_end, self.guard_slots
        return sum(max(0, min(held[r] + gs, cap) - max(held[r], guard[r])) for r in self._running_rows())

    def guards_ready(self, rows: Sequence[int], num_tokens: Sequence[int]) -> bool:
        """Is each of `rows` readable up to its `num_tokens` (its blocks and its guard mapped, or
        planned: ensure_readable then waits for those) without mapping anything for the step?"""
        bs = self.layout.block_size
        for row, tokens in zip(_ints(rows), _ints(num_tokens)):
            slots = -(-tokens // bs)
            # (raise_readable: a row's growth into a guard slot that held no spare left its mark low)
            if self.mapper.raise_readable(row, slots) < slots:
                return False
        return True

    def guards_fit(self, rows: Sequence[int], num_tokens: Sequence[int]) -> bool:
        """Could ensure_readable give each of `rows` its slots up to `num_tokens` with spare frames
        alone (every unmapped slot a spare mapped nowhere, none the zero page)? fa2-graphs asks this
        of a one-launch mixed step's prefill rows, whose guards its decodes lengthen (ops.plan_reads,
        NOTES #112). Costs the rows' slots past their readable marks, and at most that many spares."""
        need = self._guard_holes(rows, num_tokens)
        return sum(1 for _ in itertools.islice(self._cold_spares(), need)) == need  # (need 0: islice asks for none)

    def _warm_growth(self) -> int:
        """growth_ahead: a spare mapped nowhere (past the pad reserve), in the background, in the
        slot past each running request's blocks (rows in _grow, oldest first) that no step in
        flight reads. Returns how many rows still wait for one; warm() then keeps only
        GROWTH_WARM_ROWS free rows warm, and frees the spares of the others for them (a running
        request grows into its slot within a block of tokens; a warm row waits for a new request)."""
        if self._grow_blocked:
            return len(self._grow)
        mapper = self.mapper
        slots, spare, held, bpr = mapper.slots, self.pool.spare_frames, self._held_end, self.layout.blocks_per_row
        mapper.retire()
        todo = []
        for row in list(self._grow):
            s = held[row]
            cur = slots[row][s] if s < bpr else None
            if s >= bpr or cur in spare:
                del self._grow[row]  # at the row's end, or its growth slot holds a spare already
            elif cur is None or mapper.read_bound(row) <= s:
                todo.append((row, s))  # (else a step in flight reads the slot: next time)
        if todo:
            done = self.mapper.map_ahead(todo, self._spares_past_reserve())
            for row, _ in todo[:done]:
                del self._grow[row]
            # out of spares mapped nowhere: none to be had until spares change hands (a swap, a
            # released row, aliases freed)
            self._grow_blocked = done < len(todo)
        return len(self._grow)

    def _warm_window(self, rows: list[int], depth: int, in_flight: set[int], got: dict[int, int]) -> int | None:
        """Warm `rows` in order, `depth` slots each, with spares mapped nowhere (past the pad
        reserve); returns the row it stopped at (out of spares, or still read in flight), None if
        all are warm."""
        spares = self._spares_past_reserve()
        # running rows' guards still to be extended keep first call on the cold spares: in serving
        # nearly every spare sits in a warm row, and a guard is spares or nothing (NOTES #110)
        reserve = self._guard_reserve(len(self._ahead_rows) * self.guard_slots)
        if reserve:
            spares = itertools.islice(spares, reserve, None)
        for row in rows:
            got[row] = self.mapper.warm(row, depth, spares, row in in_flight)
            if got[row] < depth:
                return row
        return None

    def _alias_candidates(self, depth: int, window: int) -> list[int] | None:
        """The spares the next alias scan looks at: None (all of them) every ALIAS_FULL_EVERY scans
        and when the warm depth or the window's size differ from the last full scan's; else those
        whose slots can have become free to unmap since: frames that became spares, spares mapped
        in rows acquired, released or let go of, and those a step in flight kept from being freed
        last time."""
        pool = self.pool
        if self._full_scans_in <= 0 or self._alias_basis != (depth, window):
            self._full_scans_in, self._alias_basis = self.ALIAS_FULL_EVERY, (depth, window)
            frames = None
        else:
            self._full_scans_in -= 1
            spare, slots = pool.spare_frames, self.mapper.slots
            cand = {f for f in pool.respared if f in spare} | {f for f in self._alias_retry if f in spare}
            for r in self._touched | self._let_go:
                cand.update(f for f in slots[r] if f in spare)
            frames = sorted(cand)
        pool.respared.clear()
        self._touched.clear()
        self._alias_retry.clear()
        return frames

    def _free_aliases(self, depth: int, bounds: dict[int, int], window: set[int],
                      frames: list[int] | None = None, order: list[int] | None = None, stop: int = 0) -> int:
        """Unmap, in the background, the spares mapped only where nothing reads them and no request
        will before the slot is mapped again: no step in flight reads the slot, and it lies in an
        idle row, past `depth` in the rows warm() has just warmed (`window`), or in a running request's
        row past its blocks, its guard and GROWTH_KEEP slots of growth. Spares in the rows
        further down (the rows acquire_row() hands out later) move up to the rows before them.
        With bounded_scan (VATTN_BOUNDED_SCAN, the default since NOTES #120), a full scan given
        `order` (warm()'s window of rows, in the order acquire_row() hands them out; it stopped at
        order[stop]) frees only as many as the rows from there on can use (_alias_need), the least
        needed first (_donor_key): freeing every alias moved spares back and forth in batches of
        ~2,000 background ops that a step's DRAIN then ran on its path (NOTES #117, #118). Returns
        how many."""
        active, held, guard, keep, zero = self._active, self._held_end, self._guard_end, self.GROWTH_KEEP, self._zero_rows
        retry, slots = self._alias_retry, self.mapper.slots

        def slot_ok(r: int, s: int) -> bool:
            if s < bounds.get(r, 0):
                retry.add(slots[r][s])  # read by a step in flight: look again next time
                return False
            if r in zero:
                return False
            if r in active:
                return s >= held[r] + keep and s >= guard[r]
            return s >= depth or r not in window

        spares = self.pool.spare_frames if frames is None else frames
        limit = None
        if order and frames is None and self.bounded_scan:  # (a scan of some spares frees few: only a full one is bounded)
            pos = {r: i for i, r in enumerate(order)}
            limit = self._alias_need(depth, order[stop:], pos)
            spares = sorted(spares, key=self._donor_key(depth, pos))
        # (it skips spares mapped nowhere)
        return self.mapper.unmap_aliases(spares, slot_ok, limit)

    def _alias_need(self, depth: int, short: list[int], pos: dict[int, int]) -> int:
        """How many spares an alias scan frees for the rows `short` (in acquire order; `pos`: the
        warm window's rows by position): they are warmed in turn, `depth` slots each, while the
        spares that can move to them suffice - those in running rows (some of which they keep), in
        rows further down (past the window: all of them) and past `depth` in the rows before -
        plus the cold spares' reserves: the pad reserve, and with guard_ahead a guard's worth per
        running row (_warm_window keeps those of the rows still to extend; keeping them for every
        running row kept more steps at one launch in the CPU harness, NOTES #118)."""
        n = len(pos)
        held, past = [0] * (n + 1), [0] * (n + 1)  # by position; n: idle rows past the window
        where, active, zero, running = self.mapper.where, self._active, self._zero_rows, 0
        for f in self.pool.spare_frames:
            for r, s in where.get(f, ()):
                if r in active:
                    running += 1
                    continue
                if r in zero:
                    continue
                p = pos.get(r, n)
                held[p] += 1
                past[p] += s >= depth
        behind = list(itertools.accumulate(reversed(held)))[::-1] + [0]  # behind[p]: held at p and after
        before = list(itertools.accumulate(past))  # before[p]: past depth at p and before
        d = min(depth, self.layout.blocks_per_row)
        need = limit = 0
        for r in short:
            p = pos[r]
            need += d - (held[p] - past[p])
            can = running + behind[p + 1] + before[p]
            if need >= can:  # the rows up to the one before this one are served; this one in part
                limit = max(limit, can)
                break
            limit = need
        reserve = self.pad_reserve
        reserve += self._guard_reserve(len(self._active) * self.guard_slots if self._ahead_rows else 0)
        return limit + reserve

    def _donor_key(self, depth: int, pos: dict[int, int]):
        """Sort key for an alias scan's spares, the first to free first: those in running rows
        (past what they keep), then slots past `depth`, then the rest; within each, the rows
        acquire_row() hands out last first (rows past the window before any in it), the deepest
        slot first."""
        where, active, far = self.mapper.where, self._active, len(pos)

        def key(f: int) -> tuple[int, int, int]:
            slots = where.get(f)
            if not slots:
                return (3, 0, 0)  # mapped nowhere (skipped)
            r, s = min(slots)
            if r in active:
                return (0, 0, -s)
            return (1 if s >= depth else 2, -pos.get(r, far), -s)
        return key

    def _trace_warm(self, *outcome: int) -> None:
        """The first WARM_TRACE planning calls since the counters were reset, for stats()."""
        if len(self.warm_trace) < self.WARM_TRACE:
            self.warm_trace.append(outcome)

    def reclaim_spares(self) -> int:
        """Unmap every spare frame from the rows no request holds, after every step in flight, so that
        all spares are mapped nowhere and warm() can place them; returns how many were freed. For the
        end of start-up: vLLM's warm-up requests leave guard slots holding spares in rows that
        acquire_row() hands out last (warm() would free them only as they come up)."""
        self.mapper.wait_all()
        idle = set(self._free_rows)
        freed = self.mapper.unmap_aliases(self.pool.spare_frames, lambda r, s: r in idle)
        self.sync()
        self._warm_stale = True
        self._grow_blocked = False
        return freed

    def lend_unused(self, count: int) -> int:
        """Lend the frames of up to `count` blocks that were never handed out (the highest ids above
        any set so far, whose frames are mapped nowhere) as spares, until the blocks are handed out
        (pool.lend). More rows are warmed at once (a burst of new requests, as when an engine starts
        with a queue, needs no driver call while its steps wait) without taking memory from vLLM's
        KV budget. It pays off because vLLM hands out a never-used block only when no lower one is
        free (its free queue starts in id order and freed blocks go to its back), so the highest ids
        stay unused longest; once the pool has been used through, nothing is lent, and each lent
        block handed out costs what any fresh block costs. Returns how many were lent."""
        pool, where = self.pool, self.mapper.where
        picked = []
        for b in range(pool.num_blocks - 1, pool.max_seen, -1):
            if len(picked) >= count:
                break
            f = pool.frame(b)
            if f is not None and f not in where:
                picked.append(b)
        self._warm_stale = True
        self._grow_blocked = False
        return pool.lend(picked)

    def _cold_spares(self):
        """Spare frames mapped nowhere (warm() and guard slots take these)."""
        return self.mapper.cold_spares()

    def _spares_past_reserve(self):
        """The cold spares that work planned in the background may take: all but the first
        pad_reserve, which stay for the guard slots a step maps while it waits (ensure_readable)."""
        return itertools.islice(self._cold_spares(), self.pad_reserve, None)

    def ensure_readable(self, row: int, num_tokens: int) -> int:
        """Tokens [0, num_tokens) of `row` will be readable: where nothing is mapped, a spare frame
        mapped nowhere (the row's next fresh block moves into it: mapper.py), else the zero page.
        Returns how many slots that maps (0: all readable already)."""
        self._require_active(row)
        pad = self._cold_spares if self.pool.spare_frames else None
        slots = -(-num_tokens // self.layout.block_size)
        self._guard_end[row] = max(self._guard_end[row], slots)
        if slots > self._held_end[row]:  # a guard past its blocks (FA3 over-reads this step)
            self._guarded_now.add(row)
        return self.mapper.ensure_readable(row, slots, pad)

    def record_reads(self, fence: Fence, reads: dict[int, int]) -> None:
        """A launched step may read tokens [0, reads[row]) of each row until `fence` completes."""
        bs = self.layout.block_size
        self.mapper.record_reads(fence, {r: -(-n // bs) for r, n in reads.items()})

    def record_read_slots(self, fence: Fence, slots: dict[int, int]) -> None:
        """record_reads in block slots: slots [0, slots[row]) of each row. The dict is kept as it
        is (the caller must not change it; it may hand the same one on for the next step)."""
        self.mapper.record_reads(fence, slots)

    def sync(self) -> None:
        """Wait until every planned mapping is in place (before launching the step that needs it).
        With background=True the driver calls run on a native thread; otherwise this is free."""
        self.mapper.flush()
        self.mapper.executor.wait()

    def publish(self) -> int:
        """Stream mode: queue a signal after every mapping planned so far and return its sequence
        number; a GPU stream that waits for the flag to reach it (driver.stream_wait) runs after
        those mappings. With nothing planned since the last signal (a decode step in which no
        request crossed into a new block: most of them), no signal is queued and the last number
        is returned: a stream that already waited for it needs no new wait. Raises the native
        thread's first error, if any, without waiting."""
        if not self.stream_mode:
            raise MappingError("publish() needs background='stream' (VATTN_BACKGROUND_MAP=stream)")
        self.mapper.executor.poll()
        if self.mapper.pending_step_ops():
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self.mapper.flush(signal=(SIGNAL, self._flag_host, 0, self._seq))  # the step's mappings, then its signal
        if self.mapper.handed_over:
            self._handed_over.append((self._seq, self.mapper.handed_over))
            self.mapper.handed_over = []
        done = self.flag_value()
        while self._handed_over and self._handed_over[0][0] <= done:
            self._handed_over.popleft()  # the native thread has waited on them: drop the references
        return self._seq

    def start_mappings(self) -> None:
        """Stream mode: hand the ops planned so far to the native thread now, without a signal (the
        step's publish() signals them with the rest). A head start for a step's largest mappings
        (its new requests'), which otherwise wait for publish at the end of the step's preparation.
        Other modes hand each change over as it is planned."""
        if self.stream_mode:
            self.mapper.flush()

    def flag_value(self) -> int:
        return ctypes.c_uint32.from_address(self._flag_host).value if self._flag_host else 0

    def step_fence(self, stream: int) -> HostWordFence:
        """value_fences: a fence for the work enqueued on `stream` so far (call it right after a
        step's launch): the stream writes the next number into the done word once that work is
        done (driver.stream_write), and the fence is done when the word has reached it."""
        if not self.value_fences:
            raise MappingError("step_fence() needs value_fences=True (VATTN_FENCE=value)")
        self._done_seq = (self._done_seq + 1) & 0xFFFFFFFF
        self.driver.stream_write(stream, self._done_device, self._done_seq)
        return HostWordFence(self._done_host, self._done_seq)

    # -- inspection and shutdown --------------------------------------------------------
    def address(self, row: int, token: int, layer: int, kv: int, head: int = 0) -> int:
        return self.base_va + self.layout.element_offset(row, token, layer, kv, head)

    def stats(self) -> dict:
        s = self.mapper.stats.as_dict()
        s.update(rows=self.layout.rows, active_rows=len(self._active), num_blocks=self.pool.num_blocks,
                 spare_frames=len(self.pool.spare_frames), lent_blocks=self.pool.lent,
                 block_size=self.layout.block_size, pages_per_block=self.layout.pages_per_block,
                 bounded_scan=int(self.bounded_scan),  # (which scan ran: a suite JSON's mapper stats tell)
                 reserved_bytes=self.layout.total_bytes, **self.warm_counts,
                 warm_trace=[list(t) for t in self.warm_trace], spares_at=self.spares_at(),
                 **self.admit_counts, admit_trace=[list(t) for t in self.admit_trace], **self.grow_counts)
        native = getattr(self.mapper.executor, "stats", None)
        if native is not None:  # the native thread's own time (background modes)
            s.update(native())
        return s

    def spares_at(self) -> dict[str, int]:
        """Where the spare frames are now, each counted once, at the first place that maps it in
        this order: "zero_row" (never: a spare there is stranded), "running" (a request's row: its
        guard or growth slots), "warm" (the next WARM_ROWS free rows, below the warm depth: ready for
        the next requests), "idle" (other free rows: to be taken back) and "free" (mapped nowhere).
        A report of the stranding NOTES #42 found only by its effects."""
        where, out = self.mapper.where, dict.fromkeys(("zero_row", "running", "warm", "idle", "free"), 0)
        window = set(itertools.islice(self._free_rows, self.WARM_ROWS))
        depth = max(self._recent_fresh, default=0)
        for f in self.pool.spare_frames:
            places = where.get(f)
            if not places:
                out["free"] += 1
            elif any(r in self._zero_rows for r, _ in places):
                out["zero_row"] += 1
            elif any(r in self._active for r, _ in places):
                out["running"] += 1
            elif any(r in window and s < depth for r, s in places):
                out["warm"] += 1
            else:
                out["idle"] += 1
        return out

    def reset_stats(self) -> None:
        """Counters start again from zero (e.g. after start-up)."""
        self.mapper.stats = type(self.mapper.stats)()
        self._zero_counters()
        native = getattr(self.mapper.executor, "stats", None)
        if native is not None:
            native(reset=True)

    def _zero_counters(self) -> None:
        """warm()'s and the admissions' counters and traces (stats()), from zero."""
        self.warm_counts = dict.fromkeys(_WARM_COUNTS, 0)
        self.warm_trace: list[tuple[int, ...]] = []
        self.admit_counts = dict.fromkeys(_ADMIT_COUNTS, 0)
        self.grow_counts = dict.fromkeys(_GROW_COUNTS, 0)
        self.admit_trace: list[tuple[int, ...]] = []  # the first ADMIT_TRACE admissions

    def close(self) -> None:
        """Unmap everything (after every step in flight), release all memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.mapper.flush()
            self.mapper.executor.wait()
            self.mapper.clear_all()
        finally:
            self.mapper.executor.close()
        self._handed_over.clear()
        for name in ("_flag_host", "_done_host"):
            if getattr(self, name):
                self.driver.free_host_flag(getattr(self, name))
                setattr(self, name, 0)
        self.pool.close()
        self.driver.free_reservation(self.base_va, self.layout.total_bytes)
