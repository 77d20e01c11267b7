"""A CPU stand-in for CudaDriver with the same interface, strict about misuse.

It keeps a page table (virtual page -> (handle, page within handle, access)) and real bytes per
handle, so tests can check that aliasing shows the same bytes in two rows. Everything the real
driver would reject, or that would be a bug on a GPU (double map, unmap of unmapped memory, use of
a released handle, access before cuMemSetAccess, writes through a read-only mapping), raises
FakeDriverError. `leaks()` lists what was not given back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..errors import OutOfAddressSpaceError, OutOfPagesError


class FakeDriverError(AssertionError):
    """Misuse of the driver that the real one would reject or that would corrupt memory."""


@dataclass
class _Handle:
    size: int
    data: bytearray | None = None  # allocated on first write, to keep big pools cheap
    released: bool = False
    maps: int = 0


@dataclass
class _Reservation:
    size: int
    freed: bool = False


@dataclass
class _Pte:
    handle: int
    page: int  # page index inside the handle
    access: int = 0  # 0 none, 1 read, 3 read-write


@dataclass
class FakeStats:
    calls: dict = field(default_factory=dict)

    def bump(self, name: str, pages: int = 1) -> None:
        self.calls[name] = self.calls.get(name, 0) + pages


class FakeDriver:
    def __init__(self, granularity: int = 4096, capacity: int = 1 << 40, va_limit: int = 1 << 47):
        self.granularity = granularity
        self.capacity = capacity  # bytes of "device memory"
        self.va_limit = va_limit
        self._lock = threading.Lock()
        self._next_va = 1 << 32
        self._next_handle = 1
        self._reservations: dict[int, _Reservation] = {}
        self._handles: dict[int, _Handle] = {}
        self._ptes: dict[int, _Pte] = {}  # virtual page number -> entry
        self._used = 0
        self.stats = FakeStats()
        self._events: dict[int, object] = {}  # event handle -> fence (stream mode)
        self._flags: dict[int, object] = {}  # host flag address -> buffer
        self.waits: list[tuple[int, int, int]] = []  # (stream, flag address, value) the GPU would wait for
        self.writes: list[tuple[int, int, int]] = []  # (stream, word address, value) the GPU would write
        self.hold_writes = False  # True: stream writes wait for release_writes() (steps still running)
        self._held_writes: list[tuple[int, int]] = []

    # -- helpers -------------------------------------------------------------------------
    def _aligned(self, *values: int) -> None:
        for v in values:
            if v % self.granularity:
                raise FakeDriverError(f"{v:#x} is not a multiple of the granularity {self.granularity}")

    def _pages(self, va: int, size: int) -> range:
        self._aligned(va, size)
        if size <= 0:
            raise FakeDriverError(f"size {size} must be positive")
        return range(va // self.granularity, (va + size) // self.granularity)

    def _reserved(self, va: int, size: int) -> None:
        for base, r in self._reservations.items():
            if not r.freed and base <= va and va + size <= base + r.size:
                return
        raise FakeDriverError(f"[{va:#x}, {va + size:#x}) is not inside one live reservation")

    def _handle(self, handle: int) -> _Handle:
        h = self._handles.get(handle)
        if h is None:
            raise FakeDriverError(f"unknown handle {handle}")
        if h.released:
            raise FakeDriverError(f"handle {handle} was released")
        return h

    # -- Driver interface ------------------------------------------------------------------
    def reserve(self, size: int) -> int:
        with self._lock:
            self._aligned(size)
            if self._next_va + size > self.va_limit:
                raise OutOfAddressSpaceError(f"fake reserve of {size} bytes exceeds the VA limit")
            va = self._next_va
            self._next_va += size + self.granularity  # a gap, so ranges never touch
            self._reservations[va] = _Reservation(size)
            self.stats.bump("reserve")
            return va

    def free_reservation(self, va: int, size: int) -> None:
        with self._lock:
            r = self._reservations.get(va)
            if r is None or r.freed or r.size != size:
                raise FakeDriverError(f"free_reservation({va:#x}, {size}) matches no live reservation")
            if any(vpn in self._ptes for vpn in self._pages(va, size)):
                raise FakeDriverError(f"reservation {va:#x} freed while pages are still mapped")
            r.freed = True
            self.stats.bump("free_reservation")

    def create(self, size: int) -> int:
        with self._lock:
            self._aligned(size)
            if self._used + size > self.capacity:
                raise OutOfPagesError(f"fake device is full ({self._used} + {size} > {self.capacity})")
            self._used += size
            h = self._next_handle
            self._next_handle += 1
            self._handles[h] = _Handle(size)
            self.stats.bump("create")
            return h

    def release(self, handle: int) -> None:
        with self._lock:
            h = self._handle(handle)
            if h.maps:
                raise FakeDriverError(f"handle {handle} released while mapped {h.maps} page(s)")
            h.released = True
            self._used -= h.size
            self.stats.bump("release")

    def map(self, va: int, size: int, handle: int, offset: int = 0) -> None:
        with self._lock:
            h = self._handle(handle)
            if offset != 0:  # cuMemMap: "offset ... currently must be zero" (seen on H100, driver 580)
                raise FakeDriverError(f"map at offset {offset}: the driver maps allocations whole (offset 0)")
            if size != h.size:
                raise FakeDriverError(f"map of {size} bytes of handle {handle} ({h.size} bytes): map it whole")
            self._reserved(va, size)
            pages = self._pages(va, size)
            for vpn in pages:
                if vpn in self._ptes:
                    raise FakeDriverError(f"double map at {vpn * self.granularity:#x}")
            for i, vpn in enumerate(pages):
                self._ptes[vpn] = _Pte(handle, i)
            h.maps += len(pages)
            self.stats.bump("map", len(pages))

    def set_access(self, va: int, size: int, writable: bool = True) -> None:
        with self._lock:
            pages = self._pages(va, size)
            for vpn in pages:
                if vpn not in self._ptes:
                    raise FakeDriverError(f"set_access on unmapped page {vpn * self.granularity:#x}")
            for vpn in pages:
                self._ptes[vpn].access = 3 if writable else 1
            self.stats.bump("set_access", len(pages))
            self.stats.bump("set_access_calls")

    def unmap(self, va: int, size: int) -> None:
        with self._lock:
            pages = self._pages(va, size)
            for vpn in pages:
                if vpn not in self._ptes:
                    raise FakeDriverError(f"unmap of unmapped page {vpn * self.granularity:#x}")
            for vpn in pages:
                pte = self._ptes.pop(vpn)
                self._handles[pte.handle].maps -= 1
            self.stats.bump("unmap", len(pages))

    def memset_zero(self, va: int, size: int) -> None:
        self.write(va, bytes(size))

    def mem_info(self) -> tuple[int, int]:
        return self.capacity - self._used, self.capacity

    # -- stream mode: events and the host flag ---------------------------------------------
    def register_event(self, fence) -> int:
        """A handle for a fence (what a CUevent is to the real driver)."""
        with self._lock:
            h = len(self._events) + 1
            self._events[h] = fence
        return h

    def event_sync(self, event: int) -> None:
        fence = self._events.get(event)
        if fence is None:
            raise FakeDriverError(f"event_sync on unknown event {event}")
        self.stats.bump("event_sync")
        fence.wait()

    def host_flag(self) -> tuple[int, int]:
        import ctypes
        buf = ctypes.create_string_buffer(64)
        self._flags[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf), ctypes.addressof(buf)

    def free_host_flag(self, host_addr: int) -> None:
        if self._flags.pop(host_addr, None) is None:
            raise FakeDriverError(f"free_host_flag of unknown flag {host_addr:#x}")

    def stream_wait(self, stream: int, device_addr: int, value: int) -> None:
        """Records what the GPU would wait for; `waits` lets tests check it."""
        self.waits.append((stream, device_addr, value))

    def stream_write(self, stream: int, device_addr: int, value: int) -> None:
        """Records the write in `writes`, and stores it at once (a GPU with no work in flight), unless
        `hold_writes` is set: then it waits until release_writes(), as a step still running would."""
        import ctypes
        if device_addr not in self._flags:
            raise FakeDriverError(f"stream_write to {device_addr:#x}, which is not a host_flag's word")
        self.writes.append((stream, device_addr, value))
        if self.hold_writes:
            self._held_writes.append((device_addr, value))
        else:
            ctypes.c_uint32.from_address(device_addr).value = value & 0xFFFFFFFF

    def release_writes(self, count: int | None = None) -> None:
        """Store the first `count` held stream writes (all by default), in order: those steps end."""
        import ctypes
        count = len(self._held_writes) if count is None else count
        for addr, value in self._held_writes[:count]:
            ctypes.c_uint32.from_address(addr).value = value & 0xFFFFFFFF
        del self._held_writes[:count]

    def native_table(self):
        """Callbacks into this fake for the native mapping thread; misuse is kept in native_errors."""
        from .native import fake_table
        table, keepalive, self.native_errors = fake_table(self)
        return table, keepalive

    # -- what a kernel would do: byte access through the page table ------------------------
    def _walk(self, va: int, n: int, need: int):
        g = self.granularity
        pos = va
        while pos < va + n:
            pte = self._ptes.get(pos // g)
            if pte is None or (pte.access & need) != need:
                kind = "write" if need == 3 else "read"
                raise FakeDriverError(f"illegal {kind} at {pos:#x} (unmapped or no access)")
            h = self._handles[pte.handle]
            if h.released:
                raise FakeDriverError(f"access at {pos:#x} through released handle {pte.handle}")
            start = pos % g
            take = min(g - start, va + n - pos)
            yield h, pte.page * g + start, take
            pos += take

    def read(self, va: int, n: int) -> bytes:
        out = bytearray()
        with self._lock:
            for h, off, take in self._walk(va, n, 1):
                out += h.data[off:off + take] if h.data is not None else bytes(take)
        return bytes(out)

    def write(self, va: int, data: bytes) -> None:
        with self._lock:
            pos = 0
            for h, off, take in self._walk(va, len(data), 3):
                if h.data is None:
                    h.data = bytearray(h.size)
                h.data[off:off + take] = data[pos:pos + take]
                pos += take

    # -- inspection -------------------------------------------------------------------------
    def mapping_at(self, va: int) -> tuple[int, int, int] | None:
        """(handle, byte offset inside the handle, access) of the page holding va, or None."""
        pte = self._ptes.get(va // self.granularity)
        if pte is None:
            return None
        return pte.handle, pte.page * self.granularity + va % self.granularity, pte.access

    def leaks(self) -> list[str]:
        out = [f"reservation {va:#x} ({r.size} bytes)" for va, r in self._reservations.items() if not r.freed]
        out += [f"handle {h} ({x.size} bytes)" for h, x in self._handles.items() if not x.released]
        out += [f"{len(self._ptes)} mapped page(s)"] if self._ptes else []
        out += [f"host flag {a:#x}" for a in self._flags]
        return out
