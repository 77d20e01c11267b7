"""vAttention's memory manager: contiguous virtual KV rows over on-demand physical pages.

Nothing in this package imports vLLM. `views` imports torch; the rest needs only the standard library.
"""

from .driver import CudaDriver, Driver
from .fake_driver import FakeDriver, FakeDriverError
from .layout import LAYOUTS, KVGeometry, Layout, make_layout, preferred_block_size
from .manager import RECLAIM_POLICIES, KVMemoryManager
from .mapper import ZERO, Fence, RowMapper
from .pool import PagePool
from .requests import RequestRows

PAGE_SIZE = 2 << 20  # the CUDA VMM granularity on every NVIDIA GPU we know

__all__ = [
    "CudaDriver", "Driver", "FakeDriver", "FakeDriverError", "KVGeometry", "Layout", "LAYOUTS",
    "make_layout", "preferred_block_size", "KVMemoryManager", "RECLAIM_POLICIES", "ZERO", "Fence",
    "RowMapper", "PagePool", "RequestRows", "PAGE_SIZE",
]
