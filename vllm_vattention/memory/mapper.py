"""Makes each row's block slots point at the right physical memory, changing only what differs.

Slot states: unmapped (None), the shared read-only zero page (ZERO), or a frame (pool.py: the
memory a block's content lives in; frame b for block b unless spare frames are in use). A frame may
be mapped in several rows at once (aliasing: a shared prefix, or a stale slot of a released row
that deferred reclamation kept mapped).

Spare frames (pool.py): a slot of a row no request holds yet can be given a spare frame ahead of
time, in the background (`warm`). When a fresh block (one whose tokens are not computed yet) is
then put in that slot, the block moves into the spare frame (`pool.swap`) instead of its own frame
being mapped there: no driver call while a step waits. Not when a live row already maps the block:
a request admitted in the same step may have hit it (vLLM caches a block as soon as the tokens that
fill it are scheduled), and that row must see what the computing request writes.

Hazard: cuMemUnmap does not wait for kernels that are running. Every step that reads rows reports
how many slots of each row it may read, with a fence (a CUDA event recorded after the step). Before
a slot is unmapped, the mapper waits for every unfinished fence whose step reads that slot.
`stats.hazard_waits` counts those waits; the fast path has none. When the executor defers waits
(stream mode), the wait is not done here: a WAIT_EVENT op ahead of the unmaps makes the native
thread wait, and the engine thread goes on.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Callable, Container, Iterable, Iterator, Protocol, Sequence

from ..errors import MappingError
from .executor import ACCESS_RO, ACCESS_RW, DRAIN, DRAIN_ROW, MAP, UNMAP, WAIT_EVENT, WAIT_VALUE, Op
from .layout import Layout
from .pool import PagePool

ZERO = -1  # slot state: the shared zero page


class Fence(Protocol):
    """Completion of a step on the device (a CUDA event in production, or a HostWordFence)."""

    def done(self) -> bool: ...
    def wait(self) -> None: ...
    # stream mode only: the handle the native thread synchronizes on (a CUevent); a fence that has a
    # native_wait_op() gives the native thread that op instead
    native_handle: int


class HostWordFence:
    """A step's completion as its stream reports it: after the step's work the stream writes
    `value` into a 32-bit word of pinned host memory (cuStreamWriteValue32: manager.step_fence).
    Done once the word has reached `value` (sequence numbers: wrap-around aware). The native thread
    waits for it by polling that word (WAIT_VALUE), with no driver call and so no driver lock
    (benchmarks/NOTES.md #124); done() is a memory read, not an event query."""

    native_handle = 0
    TIMEOUT_S = 120.0  # wait(), as the native thread's WAIT_VALUE: no step takes this long; a word never written raises

    def __init__(self, host_addr: int, value: int):
        self.host_addr, self.value = host_addr, value & 0xFFFFFFFF
        self._word = ctypes.c_uint32.from_address(host_addr)

    def done(self) -> bool:
        return (self._word.value - self.value) & 0xFFFFFFFF < 0x80000000

    def wait(self) -> None:
        deadline = time.perf_counter() + self.TIMEOUT_S
        while not self.done():
            if time.perf_counter() > deadline:
                raise MappingError(f"the GPU did not report step {self.value} within {self.TIMEOUT_S:.0f} s "
                                   f"(host word at {self.host_addr:#x} is {self._word.value})")
            time.sleep(20e-6)

    def native_wait_op(self) -> Op:
        return (WAIT_VALUE, self.host_addr, 0, self.value)


@dataclass
class MapperStats:
    block_maps: int = 0  # blocks mapped into a slot (each costs pages_per_block pages)
    block_unmaps: int = 0
    zero_maps: int = 0  # slots given the zero page
    swaps: int = 0  # fresh blocks moved into the spare frame their slot already mapped (no driver call)
    warm_maps: int = 0  # spare frames mapped ahead of time into rows no request holds (background)
    growth_maps: int = 0  # spare frames mapped ahead of time past a running request's blocks (background)
    pad_maps: int = 0  # spare frames mapped, instead of the zero page, past a live row's end (over-read guard)
    guard_ahead_maps: int = 0  # of the guard slots, those mapped in the background ahead of a step (guard_ahead)
    lent_taken: int = 0  # lent blocks handed out (each took a spare frame: pool.lend)
    hazard_waits: int = 0  # times an unmap had to wait for a step in flight
    inflight_max: int = 0  # most steps in flight at once (launched, fence not yet seen done)
    driver_seconds: float = 0.0  # wall time the calling thread spent handing calls to the executor
    drains: int = 0  # step changes that waited for a row's background ops (DRAIN), none done or not
    drains_skipped: int = 0  # step changes to a row with background ops pending that touched none of their slots

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RowMapper:
    RETIRE_NEWEST_FROM = 4  # with more steps in flight than this, retire() first asks the newest fence
    def __init__(self, layout: Layout, pool: PagePool, base_va: int, executor, defer_waits: bool = False):
        self.executor = executor  # runs the planned driver calls (executor.py)
        self._ops: list[Op] = []  # planned driver calls, run by the executor at the end of each call
        self.layout = layout
        self.pool = pool
        self.base_va = base_va
        self.slots: list[list[int | None]] = [[None] * layout.blocks_per_row for _ in range(layout.rows)]
        self.where: dict[int, set[tuple[int, int]]] = {}  # block id -> {(row, slot)} that map it
        # every spare frame mapped nowhere is in here (and some that no longer are: cold_spares()
        # drops those as it meets them): the spares at the start, then each spare whose last mapping
        # was unmapped, and each frame that became a spare (pool.take_new_spares)
        self._cold: set[int] = set(pool.spare_frames)
        self._cold_prune_at = 2 * len(self._cold) + 64  # cold_spares() drops stale candidates past this size
        self._inflight: deque[tuple[Fence, dict[int, int]]] = deque()
        self._readable = [0] * layout.rows  # slots [0, _readable[row]) are known to be mapped
        self.stats = MapperStats()
        self.defer_waits = defer_waits  # stream mode: WAIT_EVENT ops for the native thread, not fence.wait()
        self.handed_over: list[Fence] = []  # fences the native thread waits on (kept alive until it has)
        # row -> (background ops to run before a change that reaches `lo`, lo: the lowest slot those
        # ops touch); a change only below lo needs no DRAIN (_drain_warming)
        self._warming: dict[int, tuple[int, int]] = {}
        # DRAIN_ROW in place of DRAIN: a row's change waits for its own background ops only (the
        # executor knows where rows lie: set_rows; VATTN_ROW_DRAIN, NOTES #143)
        self.row_drains = False
        self.unsignaled = False  # step ops went to the executor since the manager last published a signal

    # -- fences ----------------------------------------------------------------------------
    def record_reads(self, fence: Fence, reads: dict[int, int]) -> None:
        """A step that may read slots [0, reads[row]) of each row was launched; `fence` completes after it.
        Finished steps are dropped first, so the list holds only steps in flight even when no slot is
        unmapped for a long time (e.g. a long decode). `reads` is kept as it is: the caller must not
        change it afterwards."""
        self.retire()
        self._inflight.append((fence, reads))
        if len(self._inflight) > self.stats.inflight_max:
            self.stats.inflight_max = len(self._inflight)

    def retire(self) -> None:
        """Forget the steps in flight whose fences are done (each done() is an event query on a GPU:
        callers retire once, then ask read_bound() for each row)."""
        q = self._inflight
        if len(q) > self.RETIRE_NEWEST_FROM and q[-1][0].done():
            # Fences complete in launch order, so the newest done means every one is; without this, a
            # fence that never reported done would keep every later step's rows "in flight" for good
            # (suspected for the H100's stranded spares, NOTES #39; the dummy row was the cause, #42)
            q.clear()
            return
        while q and q[0][0].done():
            q.popleft()

    def _wait_readers(self, row: int, slot: int) -> None:
        """(The public methods that unmap retire finished steps once, before their loop: a fence's
        done() is an event query on the GPU, and one per slot cost more than the rest of the check.)"""
        last = -1
        for i, (_, reads) in enumerate(self._inflight):
            if reads.get(row, 0) > slot:
                last = i
        if last >= 0:
            # Fences complete in launch order: waiting on the last reader covers the earlier ones.
            fence = self._inflight[last][0]
            if self.defer_waits:
                native_op = getattr(fence, "native_wait_op", None)
                self._ops.append(native_op() if native_op else (WAIT_EVENT, 0, 0, fence.native_handle))
                self.handed_over.append(fence)
            else:
                fence.wait()
            self.stats.hazard_waits += 1
            for _ in range(last + 1):
                self._inflight.popleft()

    def wait_all(self) -> None:
        while self._inflight:
            self._inflight.popleft()[0].wait()

    # -- slot changes ----------------------------------------------------------------------
    def _unmap_slot(self, row: int, slot: int) -> None:
        old = self.slots[row][slot]
        if old is None:
            return
        self._wait_readers(row, slot)
        size = self.layout.chunk_bytes()
        for off in self.layout.chunks(row, slot):
            self._ops.append((UNMAP, self.base_va + off, size, 0))
        self.slots[row][slot] = None
        self._readable[row] = min(self._readable[row], slot)
        if old != ZERO:
            self.stats.block_unmaps += 1
            users = self.where[old]
            users.discard((row, slot))
            if not users:
                del self.where[old]
                if old in self.pool.spare_frames:
                    self._cold.add(old)

    def _map_slots(self, row: int, items: list[tuple[int, int]], counter: str = "block_maps") -> None:
        """Map (slot, target) pairs of one row: every cuMemMap first, then one cuMemSetAccess per
        contiguous run of equal access (the driver charges set_access per page, but less per page
        over a range: 26.5 vs 31.9 us on H100)."""
        if not items:
            return
        size = self.layout.chunk_bytes()
        chunks, zero, base = self.layout.chunks, self.pool.zero_handle, self.base_va
        emit = self._ops.append
        one = self.pool.single_chunk_handles  # one chunk per block (interleaved): its handle by frame
        first, n = items[0][0], len(items)
        if one is not None and all(s == first + k and t != ZERO for k, (s, t) in enumerate(items)):
            # the usual case (a request's growth, a warmed row, a guard of spares): frames for the
            # consecutive slots [first, first + n), one run, so one set_access
            row_va = base + chunks(row, first + n - 1)[0] - (first + n - 1) * size  # checks row and last slot
            self._ops.extend([(MAP, row_va + s * size, size, one[t]) for s, t in items])
            emit((ACCESS_RW, row_va + first * size, n * size, 0))
            pieces = ()
        elif one is not None:
            # the common layout, done with arithmetic: slot s of the row starts s chunks into it
            hi = first if n == 1 else max(s for s, _ in items)
            row_va = base + chunks(row, hi)[0] - hi * size  # chunks() checks the row and highest slot
            pieces = ((row_va + slot * size, one[target] if target != ZERO else zero, target != ZERO)
                      for slot, target in items)
        else:
            handles_of = self.pool.handles
            pieces = ((base + off, handle, target != ZERO) for slot, target in items
                      for off, handle in zip(chunks(row, slot),
                                             handles_of(target) if target != ZERO else itertools.repeat(zero)))
        runs: list[list] = []  # [va, size, writable]
        end, last_writable = -1, None
        for va, handle, writable in pieces:
            emit((MAP, va, size, handle))
            if va == end and writable == last_writable:
                runs[-1][1] += size
            else:
                runs.append([va, size, writable])
            end, last_writable = va + size, writable
        for va, n, writable in runs:
            emit((ACCESS_RW if writable else ACCESS_RO, va, n, 0))
        slots, where, stats = self.slots[row], self.where, self.stats
        frames = 0
        for slot, target in items:
            slots[slot] = target
            if target == ZERO:
                stats.zero_maps += 1
            else:
                frames += 1
                where.setdefault(target, set()).add((row, slot))
        if frames:
            setattr(stats, counter, getattr(stats, counter) + frames)

    def set_blocks(self, row: int, blocks: Sequence[int], start: int = 0, fresh_from: int | None = None,
                   live_rows: Container[int] | None = None) -> int:
        """Make slots [start, start + len(blocks)) of `row` hold `blocks`. blocks[fresh_from:] are
        fresh: their content is dead (vLLM has just handed them out for tokens not computed yet), so
        they may move into a spare frame their slot already maps - unless another row in
        `live_rows` (None: any row) maps the block's frame. That happens within one step: vLLM
        caches a running request's blocks when it schedules the tokens that fill them, so a request
        admitted in the same step may hit a block that is still fresh for the request computing it;
        moving the block would leave the hit mapping a spare. Returns slots changed."""
        if start + len(blocks) > self.layout.blocks_per_row:
            raise MappingError(
                f"row {row} needs {start + len(blocks)} blocks but rows hold {self.layout.blocks_per_row} "
                f"({self.layout.row_tokens} tokens); the request is longer than max_model_len")
        frames = self.pool.frames(blocks)  # validates every id before anything changes
        self._drain_warming(row, start + len(blocks))
        current = self.slots[row]
        changes = []
        spare = self.pool.spare_frames
        cold = None
        for j, (b, f) in enumerate(zip(blocks, frames)):
            cur = current[start + j]
            if f is None:  # a lent block, handed out for the first time (its content is dead: it had none)
                self.stats.lent_taken += 1
                if cur in spare:
                    self.pool.swap(b, cur)
                    self.stats.swaps += 1
                    continue
                if cold is None:
                    cold = self._spares_for_lent(live_rows)
                f = next(cold)  # (raises when none is left, which pool.lent's count rules out)
                self.pool.swap(b, f)  # then mapped here like any block's frame
            elif cur == f:
                continue
            elif fresh_from is not None and j >= fresh_from and cur in spare and not self._mapped_live(f, live_rows):
                self.pool.swap(b, cur)  # b now lives where this slot already points
                self.stats.swaps += 1
                continue
            changes.append((start + j, f))
        if any(current[slot] is not None for slot, _ in changes):
            self.retire()  # only an unmap asks which steps in flight read a slot (an event query each)
        for slot, _ in changes:
            self._unmap_slot(row, slot)
        if changes:
            self._map_slots(row, changes)
        self._flush()
        return len(changes)

    def cold_spares(self) -> Iterator[int]:
        """Spare frames mapped nowhere, each checked as it is reached (the caller may map the ones
        it took before asking for the next). Costs what the cold spares and the frames that changed
        since the last call number, not what all spares do: warm(), growth and guard slots call it
        every step, and most spares are mapped (warm rows) in steady state."""
        cold, spare, where = self._cold, self.pool.spare_frames, self.where
        cold |= self.pool.take_new_spares()
        if len(cold) > self._cold_prune_at:
            # callers that stop early leave candidates unchecked, and frames keep becoming spares (a
            # swap per fresh block): drop all stale ones once the set doubled since the last time, so
            # it stays within a constant of the cold spares (pruning every call measured slower)
            self._cold = cold = {f for f in cold if f in spare and f not in where}
            self._cold_prune_at = 2 * len(cold) + 64
        for f in sorted(cold):  # (lowest first: the order does not matter, but a fixed one helps tests)
            if f in spare and f not in where:
                yield f
            else:  # (mapped or no longer a spare: an unmap or take_new_spares adds it back)
                cold.discard(f)

    def _spares_for_lent(self, live_rows: Container[int] | None) -> Iterator[int]:
        """Spare frames for lent blocks handed out where no spare is mapped: those mapped nowhere
        first, then those mapped only in rows not in `live_rows` (warm rows), then any (the pool
        holds at least one spare per lent block). A spare taken from a slot leaves that slot mapping
        a block's frame, as a released row's stale slot does: warm() and set_blocks() treat it so
        (replaced, after the steps that read it), and reads of it are masked (an idle row, or past a
        running row's end: a guard slot, whose row then pays a remap when it grows there)."""
        yield from self.cold_spares()
        spare = self.pool.spare_frames
        snapshot = list(spare)  # (checked again as each is taken: the caller's swaps take spares too)
        if live_rows is not None:
            yield from (f for f in snapshot if f in spare and not self._mapped_live(f, live_rows))
        yield from (f for f in snapshot if f in spare)
        raise MappingError(f"no spare frame left for a lent block ({self.pool.lent} lent): a bug")

    def _mapped_live(self, frame: int, live_rows: Container[int] | None) -> bool:
        """Does a row whose mappings are live (None: any row) map `frame`?"""
        users = self.where.get(frame)
        if not users:
            return False
        return live_rows is None or any(r in live_rows for r, _ in users)

    def _flush(self) -> None:
        """End of a change: hand its ops to the executor, except in stream mode, where a step's ops
        are handed over at once when it is published (one submission per step, not per request)."""
        if not self.defer_waits:
            self.flush()

    def flush(self, signal: Op | None = None) -> None:
        """Hand every op planned so far to the executor; `signal` (stream mode's SIGNAL op), if
        given, goes last in the same submission, and every op handed over so far is signaled."""
        if self._ops or signal is not None:
            ops, self._ops = self._ops, []
            if signal is not None:
                ops.append(signal)
            t = time.perf_counter()
            self.executor.run(ops)
            self.stats.driver_seconds += time.perf_counter() - t
            self.unsignaled = signal is None

    def pending_step_ops(self) -> bool:
        """Were step ops planned, or handed to the executor, since the last signal (publish)?"""
        return bool(self._ops) or self.unsignaled

    def ensure_readable(self, row: int, num_slots: int, pad: Callable[[], Iterator[int]] | None = None) -> int:
        """Give every unmapped slot in [0, num_slots) something readable, so over-reads cannot fault:
        a spare frame from `pad()` (spares mapped nowhere; called only if there is a hole) while it
        yields, else the zero page. A spare is the better guard: the row usually grows into these
        slots a step later, and a fresh block then moves into the spare already there (no driver
        call), where the zero page would have to be unmapped first - after waiting for the step in
        flight that over-reads it, and the next step's signal waits for that (NOTES #38). The guard is
        read masked either way (a spare holds zeros or a dead block's finite KV, as vLLM's stale
        paged blocks do)."""
        num_slots = min(num_slots, self.layout.blocks_per_row)
        self._drain_warming(row, num_slots)
        holes = self._fill_holes(row, self._readable[row], num_slots, pad or (lambda: iter(())))
        self._flush()
        self._readable[row] = max(self._readable[row], num_slots)
        return len(holes)

    def _fill_holes(self, row: int, start: int, end: int, spares: Callable[[], Iterator[int]]) -> list[int]:
        """Plan a mapping for every unmapped slot of `row` in [start, end): a spare frame from
        `spares()` (called only if there is a hole) while it yields, else the zero page. Returns
        the slots it mapped (the holes)."""
        holes = self._holes(row, start, end)
        if holes:
            got = list(itertools.islice(spares(), len(holes)))
            self._map_slots(row, list(zip(holes, got)), counter="pad_maps")  # the first holes
            self._map_slots(row, [(s, ZERO) for s in holes[len(got):]])  # the rest, if spares ran out
        return holes

    def guard_ahead(self, spans: Sequence[tuple[int, int, int]], cold: Iterator[int]) -> int:
        """Background: ensure_readable's guard, planned before a step needs it. For each (row, start,
        end) of `spans` in order, every unmapped slot in [start, end) gets a spare frame from `cold`
        (spares mapped nowhere); a span for which too few are left, and every span after it, is not
        touched (a guard of spares or none: the zero page would make the row's growth there an
        unmap that waits for the steps over-reading it, NOTES #110). The caller guarantees that no
        step in flight reads these slots (read_bounds()); a step that will read them waits for
        these ops (ensure_readable's DRAIN), as a change of the row does. Returns the spans done."""
        self.flush()  # nothing planned for a step may end up in the background queue
        rows: dict[int, int] = {}  # row -> the lowest slot mapped
        done = maps = 0
        spare = self.pool.spare_frames
        for row, start, end in spans:
            end = min(end, self.layout.blocks_per_row)
            current = self.slots[row]
            # every slot that holds no spare: unmapped, the zero page, or a stale frame (a released
            # row's block, kept by deferred reclamation). The row grows into these slots while steps
            # in flight over-read them, so a slot holding no spare would be unmapped then after a
            # wait for those steps; here nothing reads them (the caller's guarantee): no wait
            todo = [s for s in range(start, end) if current[s] not in spare]
            got = list(itertools.islice(cold, len(todo)))
            if len(got) < len(todo):
                break  # (the spares taken from `cold` but not mapped stay mapped nowhere: cold still)
            if todo:
                for s in todo:
                    self._unmap_slot(row, s)  # (nothing mapped: nothing to do)
                self._map_slots(row, list(zip(todo, got)), counter="pad_maps")
                rows[row] = todo[0]
                maps += len(todo)
            self.raise_readable(row, end)
            done += 1
        self.stats.guard_ahead_maps += maps
        self._flush_background(rows)
        return done

    def replace_stale(self, row: int, slot: int, cold: Iterator[int]) -> bool:
        """If `slot` of `row` maps something other than a spare (the zero page, or a frame some block
        owns), map the next spare of `cold` (spares mapped nowhere) there instead, as a step's ops:
        the row's next fresh block then moves into it. With no spare left it stays. Returns whether
        it was replaced."""
        if slot >= self.layout.blocks_per_row or not self.holds_stale(row, slot, slot + 1):
            return False
        f = next(cold, None)
        if f is None:
            return False
        self._drain_warming(row, slot + 1)  # (background ops planned for the slot run first)
        self.retire()
        self._unmap_slot(row, slot)
        self._map_slots(row, [(slot, f)], counter="pad_maps")
        self.raise_readable(row, slot + 1)
        self._flush()
        return True

    def holds_stale(self, row: int, start: int, end: int) -> bool:
        """Does a slot of `row` in [start, end) map something other than a spare (the zero page, or
        a frame some block owns)? The row's growth into it would unmap it first."""
        spare = self.pool.spare_frames
        return any(f is not None and f not in spare for f in self.slots[row][start:end])

    def raise_readable(self, row: int, end: int) -> int:
        """Move `row`'s readable mark up to `end` if every slot below it is mapped (or planned to
        be): an unmap lowers the mark (_unmap_slot), and a slot mapped again afterwards, e.g. the
        row's growth into a guard slot that held no spare, leaves it low although the row is
        readable. Costs the slots between the mark and `end`. Returns the mark."""
        lo = self._readable[row]
        if lo < end and all(s is not None for s in self.slots[row][lo:end]):
            self._readable[row] = lo = end
        return lo

    def _holes(self, row: int, start: int, end: int) -> list[int]:
        """`row`'s unmapped slots in [start, end)."""
        current = self.slots[row]
        return [s for s in range(start, end) if current[s] is None]

    def holes(self, row: int, end: int) -> int:
        """How many of `row`'s slots below `end` (past its readable mark) are unmapped: what
        ensure_readable(row, end) would map."""
        return len(self._holes(row, self._readable[row], min(end, self.layout.blocks_per_row)))

    # -- spare frames, mapped ahead of time ------------------------------------------------
    def holds_spares(self, row: int, num_slots: int) -> bool:
        """Every one of `row`'s first `num_slots` slots maps (or is planned to map) a spare frame:
        the row is warm that deep (one set operation instead of a lookup per slot in Python)."""
        return self.pool.spare_frames.issuperset(self.slots[row][:num_slots])

    def warm(self, row: int, num_slots: int, cold: Iterator[int], read: bool) -> int:
        """Plan, as background ops, spare frames from `cold` (spares mapped nowhere) for slots
        [0, num_slots) of `row`, a row no request holds. A slot that holds a spare already is kept;
        one that holds something else is replaced only if no step in flight reads the row (`read`
        False: then its unmap needs no wait). Returns how many slots hold a spare afterwards; the
        ops go to the executor's background queue, and the row's next change waits for them."""
        num_slots = min(num_slots, self.layout.blocks_per_row)
        self.flush()  # nothing planned for a step may end up in the background queue
        # (no retire() here: the caller decided `read` from read_bounds(), which retired; one
        # event query per warmed row was most of warm()'s driver calls)
        if self.holds_spares(row, num_slots):  # a warm row's usual case
            return num_slots
        current = self.slots[row]
        spare = self.pool.spare_frames
        items, ready = [], 0
        for s in range(num_slots):
            cur = current[s]
            if cur in spare:
                ready += 1
                continue
            if cur is not None and read:
                continue
            f = next(cold, None)
            if f is None:
                break
            if cur is not None:
                self._unmap_slot(row, s)
            items.append((s, f))
        if items:
            self._map_slots(row, items, counter="warm_maps")
            self._flush_background({row: items[0][0]})
        return ready + len(items)

    def map_ahead(self, items: Sequence[tuple[int, int]], cold: Iterator[int]) -> int:
        """Background: a spare frame from `cold` (spares mapped nowhere) into each (row, slot) of
        `items`, in order, replacing what the slot maps; the caller guarantees that no step in
        flight reads these slots (read_bounds()), so no unmap waits. For the slot a running
        request's row grows into next: its next fresh block then moves into the spare (set_blocks)
        instead of being mapped while its step waits. Each row's next change waits for these ops
        (DRAIN). Returns how many slots were given a spare (fewer if `cold` ran out)."""
        self.flush()  # nothing planned for a step may end up in the background queue
        rows: dict[int, int] = {}  # row -> the lowest slot changed
        done = 0
        for row, slot in items:
            f = next(cold, None)
            if f is None:
                break
            if self.slots[row][slot] is not None:
                self._unmap_slot(row, slot)
            self._map_slots(row, [(slot, f)], counter="growth_maps")
            rows[row] = min(slot, rows.get(row, slot))
            done += 1
        self._flush_background(rows)
        return done

    def rows_in_flight(self) -> set[int]:
        """Rows that a step still running may read."""
        return {r for r, n in self.read_bounds().items() if n}

    def read_bound(self, row: int) -> int:
        """read_bounds()[row] without building the dict (a few rows per step; call retire() first)."""
        return max((reads.get(row, 0) for _, reads in self._inflight), default=0)

    def read_bounds(self) -> dict[int, int]:
        """{row: n}: a step still running may read slots [0, n) of the row (rows it reads nothing of
        are left out)."""
        self.retire()
        out: dict[int, int] = {}
        get = out.get
        for _, reads in self._inflight:
            for r, n in reads.items():
                if n > get(r, 0):
                    out[r] = n
        return out

    def unmap_aliases(self, frames: Iterable[int], slot_ok, limit: int | None = None) -> int:
        """Background: for each spare frame, unmap every slot that maps it if `slot_ok(row, slot)`
        holds for all of them (the caller's: no step in flight reads the slot and none will before
        it is mapped again, so no unmap needs a wait); the frame is then mapped nowhere and can warm
        another row. Stops once `limit` frames (None: no limit) were freed. Returns how many frames
        were freed so."""
        self.flush()
        self.retire()
        freed, rows = 0, {}  # rows: row -> the lowest slot unmapped
        spare, where = self.pool.spare_frames, self.where
        for f in frames:  # (warm() calls this with every spare each time it runs short: kept lean)
            if limit is not None and freed >= limit:
                break
            if f not in spare:
                raise ValueError(f"frame {f} is not a spare")
            slots = where.get(f)
            if not slots:
                continue
            if len(slots) == 1:  # the usual case: a spare mapped in one slot
                ((r, s),) = slots
                if not slot_ok(r, s):
                    continue
                todo = ((r, s),)
            else:
                todo = sorted(slots)
                if not all(slot_ok(r, s) for r, s in todo):
                    continue
            for r, s in todo:
                self._unmap_slot(r, s)  # no step in flight reads the slot: no wait is planned
                rows[r] = min(s, rows.get(r, s))
            freed += 1
        self._flush_background(rows)
        return freed

    def _flush_background(self, rows: dict[int, int]) -> None:
        """Hand the ops planned for `rows` ({row: the lowest slot they touch}) to the background
        queue; a later change of a row that reaches that slot waits for them (DRAIN)."""
        if self._ops:
            ops, self._ops = self._ops, []
            t = time.perf_counter()
            upto = self.executor.run_background(ops)
            self.stats.driver_seconds += time.perf_counter() - t
            warming = self._warming
            for r, lo in rows.items():
                before = warming.get(r)
                warming[r] = (upto, lo if before is None else min(lo, before[1]))

    def _drain_warming(self, row: int, end: int | None = None) -> None:
        """Before a change to slots below `end` of `row` (None: any slot) is planned, and before the
        step that reads them: the row's background ops must have run, if any touches one of those
        slots. DRAIN runs the background queue up to the row's last op, every other row's queued
        before it included (with row_drains, DRAIN_ROW runs only the row's own), so a change that
        touches none of the row's pending slots (e.g. a running request's growth below slots the
        alias scan unmapped past its end) need not wait for it (NOTES #68)."""
        entry = self._warming.get(row)
        if entry is None:
            return
        upto, lo = entry
        if end is not None and end <= lo:
            self.stats.drains_skipped += 1
            return
        del self._warming[row]
        self.stats.drains += 1
        self._ops.append((DRAIN_ROW, 0, row, upto) if self.row_drains else (DRAIN, 0, 0, upto))

    def clear_row(self, row: int, from_slot: int = 0) -> None:
        """Unmap slots [from_slot, end) of `row`, waiting for any step that still reads them."""
        self._drain_warming(row)
        self.retire()
        for s in range(from_slot, self.layout.blocks_per_row):
            self._unmap_slot(row, s)
        self._flush()

    def clear_all(self) -> None:
        self.wait_all()
        for r in range(self.layout.rows):
            self.clear_row(r)
        self.flush()
        self.executor.wait()

    # -- inspection ------------------------------------------------------------------------
    def mapped_slots(self, row: int) -> Iterable[tuple[int, int]]:
        return ((s, t) for s, t in enumerate(self.slots[row]) if t is not None)

    def check_invariants(self) -> None:
        """The reverse index agrees with the slot table (used by the tests)."""
        seen: dict[int, set[tuple[int, int]]] = {}
        for r, row in enumerate(self.slots):
            for s, t in enumerate(row):
                if t is not None and t != ZERO:
                    seen.setdefault(t, set()).add((r, s))
        if seen != self.where:
            raise MappingError(f"reverse index out of sync: {seen} != {self.where}")
        lost = {f for f in self.pool.spare_frames if f not in seen} - self._cold - self.pool.new_spares
        if lost:
            raise MappingError(f"spare frames mapped nowhere but not tracked as cold: {sorted(lost)}")
        for r, row in enumerate(self.slots):
            if any(t is None for t in row[:self._readable[r]]):
                raise MappingError(f"row {r}: a slot below the readable mark {self._readable[r]} is unmapped")
