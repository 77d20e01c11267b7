"""ctypes binding of csrc/mapper.cpp: a C++ thread that runs VMM calls without the GIL.

The driver's entry points come as a table of C function pointers: libcuda's on a GPU
(`CudaDriver.native_table`), or callbacks into the fake driver in CPU tests (`fake_table`).
"""

from __future__ import annotations

import array
import ctypes
import importlib.util
import itertools
import sys
from typing import Sequence

from ..errors import DriverError
from .executor import ACCESS_RO, ACCESS_RW, DRAIN, DRAIN_ROW, MAP, SIGNAL, UNMAP, WAIT_EVENT, WAIT_VALUE, Op

KIND_NAMES = {MAP: "map", UNMAP: "unmap", ACCESS_RW: "access_rw", ACCESS_RO: "access_ro", SIGNAL: "signal",
              WAIT_EVENT: "wait_event", DRAIN: "drain", WAIT_VALUE: "wait_value", DRAIN_ROW: "drain_row"}
MAP_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64,
                          ctypes.c_uint64)
UNMAP_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t)
ACCESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t)
CONTEXT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
EVENT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class DriverTable(ctypes.Structure):
    _fields_ = [("map", ctypes.c_void_p), ("unmap", ctypes.c_void_p), ("set_access", ctypes.c_void_p),
                ("set_context", ctypes.c_void_p), ("context", ctypes.c_void_p),
                ("access_rw", ctypes.c_void_p), ("access_ro", ctypes.c_void_p), ("event_sync", ctypes.c_void_p)]


class _COp(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("pad", ctypes.c_int32), ("va", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("handle", ctypes.c_uint64)]


# _COp's bytes are four little-endian uint64 words (kind and pad read as one: kinds are small and
# >= 0, pad is zero): `pack` builds them from the mapper's (kind, va, size, handle) tuples as one
# array.array, which takes ~3.6 us for 33 ops on the CPU, against ~10 us for a numpy structured
# array plus its ctypes pointer and 2.4x that for a ctypes Structure per op.
assert ctypes.sizeof(_COp) == 4 * 8 and sys.byteorder == "little"


def pack(ops: Sequence[Op]) -> array.array:
    """The ops as csrc/mapper.cpp's vattn_op array (four uint64 words each)."""
    return array.array("Q", itertools.chain.from_iterable(ops))


_LIB = None
_LIB_KEEP_GIL = None


def load_library() -> ctypes.CDLL:
    """The compiled csrc/mapper.cpp (built by `pip install`, as the extension vllm_vattention._mapper).
    Its blocking entry points (create, wait, destroy) release the GIL while they run; see
    `load_library_keeping_gil` for the others."""
    global _LIB, _LIB_KEEP_GIL
    if _LIB is None:
        spec = importlib.util.find_spec("vllm_vattention._mapper")
        if spec is None or not spec.origin:
            raise ImportError("vllm_vattention._mapper is not built; reinstall with `pip install -e .` "
                              "(needs a C++ compiler) or set VATTN_BACKGROUND_MAP=0")
        lib, keep = ctypes.CDLL(spec.origin), ctypes.PyDLL(spec.origin)
        lib.vattn_mapper_create.restype = ctypes.c_void_p
        lib.vattn_mapper_create.argtypes = [ctypes.POINTER(DriverTable)]
        lib.vattn_mapper_wait.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64,
                                          ctypes.POINTER(ctypes.c_uint64)]
        lib.vattn_mapper_destroy.argtypes = [ctypes.c_void_p]
        lib.vattn_null_driver_table.argtypes = [ctypes.POINTER(DriverTable)]
        for name in ("vattn_mapper_submit", "vattn_mapper_submit_background"):  # (handle, vattn_op*, n)
            getattr(keep, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
        keep.vattn_mapper_poll.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
        keep.vattn_mapper_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                            ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
        keep.vattn_mapper_slowest.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double), ctypes.c_int,
                                              ctypes.c_int]
        keep.vattn_mapper_set_rows.argtypes = [ctypes.c_void_p] + [ctypes.c_uint64] * 5
        keep.vattn_mapper_hold_background.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _LIB, _LIB_KEEP_GIL = lib, keep
    return _LIB


def load_library_keeping_gil() -> ctypes.PyDLL:
    """The same library for the entry points that never block (submit, poll, stats: a short critical
    section the native thread never holds across a driver call, an event wait or a Python callback),
    called without releasing the GIL. They run on the engine thread every step, and a ctypes call that
    releases the GIL hands it to any runnable Python thread (vLLM's output serializer runs while the
    next step is prepared) and then waits for that thread to let go (benchmarks/NOTES.md #31)."""
    load_library()
    return _LIB_KEEP_GIL


class NativeExecutor:
    def __init__(self, table: DriverTable, keepalive: tuple = ()):
        self._lib = load_library()
        self._fast = load_library_keeping_gil()
        self._table = table
        self._keepalive = keepalive  # callbacks and descriptors the table points at
        self._handle = self._lib.vattn_mapper_create(ctypes.byref(table))
        if not self._handle:
            raise RuntimeError("vattn_mapper_create failed (incomplete driver table)")
        self.ops_done = 0
        self.background_submitted = 0
        self._poll_text = ctypes.create_string_buffer(256)

    def run(self, ops: Sequence[Op]) -> None:
        self._submit(self._fast.vattn_mapper_submit, ops)

    def run_background(self, ops: Sequence[Op]) -> int:
        """Queue ops to run while no step's ops wait (executor.py); returns the running total, for DRAIN."""
        self._submit(self._fast.vattn_mapper_submit_background, ops)
        self.background_submitted += len(ops)
        return self.background_submitted

    def set_rows(self, base: int, regions: int, region_bytes: int, row_bytes: int, rows: int) -> None:
        """Where rows lie, for DRAIN_ROW (csrc/mapper.cpp): `regions` regions of `region_bytes` from
        `base`, each `rows` rows of `row_bytes`. Background ops submitted from now on know their row."""
        if self._fast.vattn_mapper_set_rows(self._handle, base, regions, region_bytes, row_bytes, rows):
            raise ValueError(f"vattn_mapper_set_rows: {regions} regions of {region_bytes} bytes cannot hold "
                             f"{rows} rows of {row_bytes} bytes")

    def hold_background(self, on: bool = True) -> None:
        """Tests: background ops run only where a DRAIN / DRAIN_ROW asks for them or in wait(), never
        in idle time, so that a step missing a drain finds its mappings missing (csrc/mapper.cpp)."""
        if self._fast.vattn_mapper_hold_background(self._handle, int(on)):
            raise RuntimeError("vattn_mapper_hold_background: no native mapping thread")

    def _submit(self, fn, ops: Sequence[Op]) -> None:
        words = pack(ops)  # the native side copies the ops before it returns
        if fn(self._handle, words.buffer_info()[0] if ops else None, len(ops)):
            raise RuntimeError("the native mapping thread has stopped")

    def wait(self) -> None:
        text = ctypes.create_string_buffer(256)
        done = ctypes.c_uint64()
        rc = self._lib.vattn_mapper_wait(self._handle, text, 256, ctypes.byref(done))
        self.ops_done = done.value
        _raise_if_failed(rc, text)

    def poll(self) -> None:
        """Raise the first error of the native thread so far, without waiting for it."""
        text = self._poll_text  # (once per step: written only when there is an error)
        _raise_if_failed(self._fast.vattn_mapper_poll(self._handle, text, 256), text)

    SLOWEST = 8  # csrc/mapper.cpp kSlowest

    def stats(self, reset: bool = False) -> dict:
        """What the native thread itself spent: seconds in driver calls (map, unmap, set access) and
        in WAIT_EVENT (a step in flight still reading a slot to unmap), with call counts; and the
        batches that took longest from submission to done (`native_slowest_batches`: latency,
        queued and running ms, the slowest op's ms and kind, the batch's ops, its index, and its
        submission in seconds of CLOCK_MONOTONIC, the clock of time.perf_counter and of the step
        trace on Linux; then, while it ran: the thread's CPU ms, its ms waiting for a CPU on the run
        queue (None where the kernel has no schedstat), its voluntary and involuntary context
        switches: a spinning driver call is CPU time, a sleeping one voluntary switches, a starved
        thread run-queue time; NOTES #141; and the background ops its DRAIN or DRAIN_ROW ops ran,
        NOTES #143)."""
        ns, calls = (ctypes.c_uint64 * 7)(), (ctypes.c_uint64 * 7)()
        if self._fast.vattn_mapper_stats(self._handle, ns, calls, int(reset)):
            raise RuntimeError("vattn_mapper_stats: the native mapping thread is closed")
        w = 13  # values per batch (csrc/mapper.cpp kSlowRow)
        rows = (ctypes.c_double * (w * self.SLOWEST))()
        n = self._fast.vattn_mapper_slowest(self._handle, rows, self.SLOWEST, int(reset))

        def batch(r: list) -> list:
            return ([round(x, 3) for x in r[:4]] + [KIND_NAMES.get(int(r[4]), "-"), int(r[5]), int(r[6]), round(r[7], 6),
                     round(r[8], 3), None if r[9] < 0 else round(r[9], 3), int(r[10]), int(r[11]), int(r[12])])
        slowest = [batch(rows[w * i:w * (i + 1)]) for i in range(max(n, 0))]
        s = lambda *kinds: round(sum(ns[k] for k in kinds) / 1e9, 6)  # noqa: E731
        return {"native_map_seconds": s(MAP), "native_unmap_seconds": s(UNMAP),
                "native_access_seconds": s(ACCESS_RW, ACCESS_RO),
                "native_driver_seconds": s(MAP, UNMAP, ACCESS_RW, ACCESS_RO),
                "native_event_wait_seconds": s(WAIT_EVENT),
                "native_driver_calls": sum(calls[k] for k in (MAP, UNMAP, ACCESS_RW, ACCESS_RO)),
                "native_event_waits": calls[WAIT_EVENT], "native_slowest_batches": slowest}

    def close(self) -> None:
        if self._handle:
            self._lib.vattn_mapper_destroy(self._handle)
            self._handle = None


def _raise_if_failed(rc: int, text) -> None:
    if rc:
        raise DriverError("native mapping thread", rc, f"CUresult {rc}", text.value.decode())


def null_table() -> tuple[DriverTable, tuple]:
    """A table whose driver calls do nothing and succeed (csrc/mapper.cpp): what the engine thread
    spends handing ops over, measured without a GPU and without the fake driver's Python callbacks."""
    lib = load_library()
    table = DriverTable()
    lib.vattn_null_driver_table(ctypes.byref(table))
    return table, ()


def fake_table(driver) -> tuple[DriverTable, tuple, list]:
    """A table whose entries call a FakeDriver (CPU tests). Exceptions become error code 999 and
    are kept in the returned list, in order."""
    errors: list[BaseException] = []

    def guard(fn):
        def call(*args):
            try:
                fn(*args)
                return 0
            except BaseException as e:  # noqa: BLE001 - reported through the error code
                errors.append(e)
                return 999
        return call

    rw, ro = ctypes.c_int(3), ctypes.c_int(1)
    cbs = (
        MAP_FN(guard(lambda va, size, off, h, flags: driver.map(va, size, h, off))),
        UNMAP_FN(guard(driver.unmap)),
        ACCESS_FN(guard(lambda va, size, desc, n: driver.set_access(
            va, size, ctypes.cast(desc, ctypes.POINTER(ctypes.c_int))[0] == 3))),
    )
    event_cb = EVENT_FN(guard(lambda ev: driver.event_sync(ev)))
    table = DriverTable(*(ctypes.cast(c, ctypes.c_void_p) for c in cbs), None, None,
                        ctypes.cast(ctypes.pointer(rw), ctypes.c_void_p), ctypes.cast(ctypes.pointer(ro), ctypes.c_void_p),
                        ctypes.cast(event_cb, ctypes.c_void_p))
    cbs = cbs + (event_cb,)
    return table, cbs + (rw, ro), errors
