"""The CUDA virtual-memory-management (VMM) calls we use, behind one small interface.

`CudaDriver` calls libcuda through ctypes. ctypes drops the GIL for the duration of every
foreign call, so a Python mapping thread overlaps with the thread that launches kernels.
`FakeDriver` (fake_driver.py) has the same methods for CPU tests.

Addresses are plain ints (CUdeviceptr); physical allocations are opaque int handles.
Every size and offset must be a multiple of `granularity`.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Protocol

from ..errors import DriverError, OutOfAddressSpaceError, OutOfPagesError


class Driver(Protocol):
    granularity: int

    def reserve(self, size: int) -> int: ...
    def free_reservation(self, va: int, size: int) -> None: ...
    def create(self, size: int) -> int: ...
    def release(self, handle: int) -> None: ...
    def map(self, va: int, size: int, handle: int, offset: int = 0) -> None: ...
    def set_access(self, va: int, size: int, writable: bool = True) -> None: ...
    def unmap(self, va: int, size: int) -> None: ...
    def memset_zero(self, va: int, size: int) -> None: ...
    def mem_info(self) -> tuple[int, int]: ...
    def native_table(self): ...  # (DriverTable, keepalive) for the native mapping thread
    # stream mode (VATTN_BACKGROUND_MAP=stream): the GPU waits on a host flag the native thread sets
    def event_sync(self, event: int) -> None: ...
    def host_flag(self) -> tuple[int, int]: ...  # (host address, device address) of a zeroed uint32
    def free_host_flag(self, host_addr: int) -> None: ...
    def stream_wait(self, stream: int, device_addr: int, value: int) -> None: ...
    # VATTN_FENCE=value: the stream writes `value` into a host word once its earlier work is done
    def stream_write(self, stream: int, device_addr: int, value: int) -> None: ...


# CUresult values we treat specially.
CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2

_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_ACCESS_READ = 1  # CU_MEM_ACCESS_FLAGS_PROT_READ
_ACCESS_READWRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_GRANULARITY_MINIMUM = 0


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _MemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _MemLocation), ("flags", ctypes.c_int)]


def _load_libcuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise DriverError(
            "dlopen(libcuda.so.1)", -1, "CUDA_ERROR_NO_DEVICE",
            "no NVIDIA driver on this machine; vAttention needs a CUDA GPU "
            "(unset VLLM_ATTENTION_BACKEND to run stock vLLM)") from e


class CudaDriver:
    """VMM calls on one device, through the device's primary context (the one torch uses)."""

    def __init__(self, device: int = 0):
        self.device = device
        self._cu = _load_libcuda()
        # The same library, called without releasing the GIL: for calls that only enqueue and return
        # in microseconds on the engine thread's per-step path (benchmarks/NOTES.md #31: a ctypes
        # call that releases the GIL hands it to any runnable Python thread, e.g. vLLM's output
        # serializer, and waits until that thread lets go).
        self._cu_keep_gil = ctypes.PyDLL(self._cu._name)
        self._tls = threading.local()
        self._check("cuInit", self._cu.cuInit(0))
        dev = ctypes.c_int()
        self._check("cuDeviceGet", self._cu.cuDeviceGet(ctypes.byref(dev), device))
        self._dev = dev.value
        ctx = ctypes.c_void_p()
        self._check("cuDevicePrimaryCtxRetain",
                    self._cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._dev))
        self._ctx = ctx
        self._prop = _AllocationProp()
        self._prop.type = _PINNED
        self._prop.location = _MemLocation(_LOCATION_DEVICE, self._dev)
        self._access = {
            w: _AccessDesc(_MemLocation(_LOCATION_DEVICE, self._dev), _ACCESS_READWRITE if w else _ACCESS_READ)
            for w in (True, False)
        }
        gran = ctypes.c_size_t()
        self._ensure_context()
        self._check("cuMemGetAllocationGranularity", self._cu.cuMemGetAllocationGranularity(
            ctypes.byref(gran), ctypes.byref(self._prop), _GRANULARITY_MINIMUM))
        self.granularity = gran.value

    # -- helpers -------------------------------------------------------------------
    def _error_name(self, code: int) -> str:
        s = ctypes.c_char_p()
        if self._cu.cuGetErrorName(code, ctypes.byref(s)) == 0 and s.value:
            return s.value.decode()
        return f"CUresult {code}"

    def _check(self, call: str, code: int, detail: str = "") -> None:
        if code != CUDA_SUCCESS:
            raise DriverError(call, code, self._error_name(code), detail)

    def _ensure_context(self) -> None:
        # The primary context must be current in every thread that calls the driver.
        if not getattr(self._tls, "ready", False):
            self._check("cuCtxSetCurrent", self._cu.cuCtxSetCurrent(self._ctx))
            self._tls.ready = True

    # -- Driver interface ------------------------------------------------------------
    def reserve(self, size: int) -> int:
        self._ensure_context()
        ptr = ctypes.c_uint64()
        code = self._cu.cuMemAddressReserve(
            ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(self.granularity),
            ctypes.c_uint64(0), ctypes.c_ulonglong(0))
        if code != CUDA_SUCCESS:
            raise OutOfAddressSpaceError(
                f"cuMemAddressReserve of {size / 2**30:.1f} GiB failed with {self._error_name(code)}; "
                "lower --max-model-len or --max-num-seqs (rows x row length must fit the GPU's "
                "virtual address space)")
        return ptr.value

    def free_reservation(self, va: int, size: int) -> None:
        self._ensure_context()
        self._check("cuMemAddressFree", self._cu.cuMemAddressFree(ctypes.c_uint64(va), ctypes.c_size_t(size)))

    def create(self, size: int) -> int:
        self._ensure_context()
        h = ctypes.c_ulonglong()
        code = self._cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(size), ctypes.byref(self._prop),
                                    ctypes.c_ulonglong(0))
        if code == CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfPagesError(f"cuMemCreate of {size} bytes: the GPU has no free memory left; "
                                  "lower --gpu-memory-utilization or the KV budget")
        self._check("cuMemCreate", code, f"size={size}")
        return h.value

    def release(self, handle: int) -> None:
        self._ensure_context()
        self._check("cuMemRelease", self._cu.cuMemRelease(ctypes.c_ulonglong(handle)))

    def map(self, va: int, size: int, handle: int, offset: int = 0) -> None:
        self._ensure_context()
        self._check("cuMemMap", self._cu.cuMemMap(
            ctypes.c_uint64(va), ctypes.c_size_t(size), ctypes.c_size_t(offset),
            ctypes.c_ulonglong(handle), ctypes.c_ulonglong(0)), f"va={va:#x} size={size}")

    def set_access(self, va: int, size: int, writable: bool = True) -> None:
        self._ensure_context()
        self._check("cuMemSetAccess", self._cu.cuMemSetAccess(
            ctypes.c_uint64(va), ctypes.c_size_t(size), ctypes.byref(self._access[writable]),
            ctypes.c_size_t(1)), f"va={va:#x} size={size}")

    def unmap(self, va: int, size: int) -> None:
        self._ensure_context()
        self._check("cuMemUnmap", self._cu.cuMemUnmap(ctypes.c_uint64(va), ctypes.c_size_t(size)),
                    f"va={va:#x} size={size}")

    def memset_zero(self, va: int, size: int) -> None:
        self._ensure_context()
        self._check("cuMemsetD8", self._cu.cuMemsetD8_v2(ctypes.c_uint64(va), ctypes.c_ubyte(0),
                                                         ctypes.c_size_t(size)))
        self._check("cuCtxSynchronize", self._cu.cuCtxSynchronize())

    def event_sync(self, event: int) -> None:
        self._ensure_context()
        self._check("cuEventSynchronize", self._cu.cuEventSynchronize(ctypes.c_void_p(event)))

    def host_flag(self) -> tuple[int, int]:
        """A zeroed 32-bit word of pinned host memory that the GPU can read (for cuStreamWaitValue32)."""
        self._ensure_context()
        p = ctypes.c_void_p()
        self._check("cuMemHostAlloc", self._cu.cuMemHostAlloc(ctypes.byref(p), ctypes.c_size_t(64),
                                                             ctypes.c_uint(0x01 | 0x02)))  # PORTABLE | DEVICEMAP
        ctypes.memset(p.value, 0, 64)
        d = ctypes.c_uint64()
        self._check("cuMemHostGetDevicePointer", self._cu.cuMemHostGetDevicePointer_v2(
            ctypes.byref(d), p, ctypes.c_uint(0)))
        return p.value, d.value

    def free_host_flag(self, host_addr: int) -> None:
        self._ensure_context()
        self._check("cuMemFreeHost", self._cu.cuMemFreeHost(ctypes.c_void_p(host_addr)))

    def stream_wait(self, stream: int, device_addr: int, value: int) -> None:
        """Work enqueued on `stream` after this starts once the word at device_addr >= value."""
        self._ensure_context()
        self._check("cuStreamWaitValue32", self._cu_keep_gil.cuStreamWaitValue32_v2(
            ctypes.c_void_p(stream), ctypes.c_uint64(device_addr), ctypes.c_uint32(value & 0xFFFFFFFF),
            ctypes.c_uint(0)))  # CU_STREAM_WAIT_VALUE_GEQ

    def stream_write(self, stream: int, device_addr: int, value: int) -> None:
        """Once the work enqueued on `stream` so far is done, the stream stores `value` into the
        32-bit word at device_addr (a host_flag's: the CPU sees it in pinned memory), after a
        system-wide memory barrier (cuStreamWriteValue32's default)."""
        self._ensure_context()
        self._check("cuStreamWriteValue32", self._cu_keep_gil.cuStreamWriteValue32_v2(
            ctypes.c_void_p(stream), ctypes.c_uint64(device_addr), ctypes.c_uint32(value & 0xFFFFFFFF),
            ctypes.c_uint(0)))  # CU_STREAM_WRITE_VALUE_DEFAULT

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        self._ensure_context()
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._check("cuMemGetInfo", self._cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)))
        return free.value, total.value

    def native_table(self):
        """libcuda's entry points for the native mapping thread (memory/native.py)."""
        from .native import DriverTable
        cu = self._cu
        fn = lambda f: ctypes.cast(f, ctypes.c_void_p)  # noqa: E731
        table = DriverTable(fn(cu.cuMemMap), fn(cu.cuMemUnmap), fn(cu.cuMemSetAccess), fn(cu.cuCtxSetCurrent),
                            self._ctx, ctypes.addressof(self._access[True]), ctypes.addressof(self._access[False]),
                            fn(cu.cuEventSynchronize))
        return table, (self._access,)

    def close(self) -> None:
        if self._ctx:
            self._cu.cuDevicePrimaryCtxRelease_v2(self._dev)
            self._ctx = None
