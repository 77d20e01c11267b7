"""Where every byte of every row's KV lives inside one reservation.

A *row* is one request's KV: `row_tokens` token positions, contiguous in virtual memory per
(layer, K/V) view. A *block* is vLLM's allocation unit: `block_size` tokens whose KV on this rank
(every layer, K and V) fills a whole number of physical pages. Slot j of a row holds tokens
[j*block_size, (j+1)*block_size); mapping a block into a slot maps the block's pages at the slot's
`chunks` in order.

Two layouts:
- `interleaved`: a token's K and V of all layers are stored together
  ([rows, row_tokens, layers, 2, heads, head_size]); a block is one contiguous range, and its size
  is the smallest whole number of pages (16 tokens = one 2 MiB page for Llama-3-8B).
- `per_layer` (the paper's): one region per (layer, K/V), each [rows, row_tokens, heads, head_size];
  a block has one chunk in every region, so it spans 2*layers pages (1024 tokens for Llama-3-8B).

Every per-(layer, K/V) view is [rows, row_tokens, heads, head_size] with a unit last stride, which
is what the non-paged FlashAttention kernels need.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import ConfigError

LAYOUTS = ("interleaved", "per_layer")
MAX_BLOCK_SIZE = 2048  # tokens; beyond this, per-request rounding wastes too much memory


@dataclass(frozen=True)
class KVGeometry:
    """The KV shape of one rank: what one token costs across all layers."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_size", "dtype_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"KVGeometry.{name}={getattr(self, name)} must be positive")

    @functools.cached_property  # (frozen: computed once; the mapper asks for it per slot)
    def head_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_size * self.dtype_bytes

    @functools.cached_property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V in every layer."""
        return 2 * self.num_layers * self.head_bytes


@dataclass(frozen=True)
class ViewSpec:
    """A strided view of the reservation: offset in bytes, shape and strides in elements."""

    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _min_tokens(unit_bytes: int, page_size: int) -> int:
    """Smallest token count whose bytes (unit_bytes per token) fill whole pages."""
    return page_size // math.gcd(page_size, unit_bytes)


class Layout:
    name: str

    def __init__(self, geometry: KVGeometry, page_size: int, rows: int, min_row_tokens: int,
                 block_size: int | None = None):
        if rows <= 0:
            raise ConfigError(f"rows={rows} must be positive")
        self.geometry = geometry
        self.page_size = page_size
        self.rows = rows
        unit = self.min_block_size()
        if block_size is None:
            block_size = unit
        if block_size % unit:
            raise ConfigError(
                f"block size {block_size} does not fill whole {page_size >> 20} MiB pages with the "
                f"{self.name} layout ({geometry.token_bytes} bytes of KV per token); use a multiple "
                f"of {unit} tokens, or leave --block-size unset")
        if block_size > MAX_BLOCK_SIZE:
            raise ConfigError(
                f"the {self.name} layout needs blocks of {block_size} tokens for this model "
                f"({geometry.token_bytes} bytes of KV per token, {page_size} byte pages), more than "
                f"{MAX_BLOCK_SIZE}; try VATTN_LAYOUT=interleaved")
        self.block_size = block_size
        self.blocks_per_row = -(-min_row_tokens // block_size)
        self.row_tokens = self.blocks_per_row * block_size
        self.block_bytes = block_size * geometry.token_bytes
        self.pages_per_block = self.block_bytes // page_size

    # subclass API ---------------------------------------------------------------------
    def min_block_size(self) -> int:
        raise NotImplementedError

    def chunk_bytes(self) -> int:
        """Size of each contiguous piece a block occupies in a row."""
        raise NotImplementedError

    def chunks(self, row: int, slot: int) -> list[int]:
        """Byte offsets (from the reservation base) of block slot `slot` of `row`, in page order."""
        raise NotImplementedError

    def view(self, layer: int, kv: int) -> ViewSpec:
        """[rows, row_tokens, heads, head_size] view of layer `layer`'s K (kv=0) or V (kv=1)."""
        raise NotImplementedError

    def row_regions(self) -> tuple[int, int, int]:
        """(regions, region_bytes, row_bytes): from the reservation base, `regions` regions of
        region_bytes, each holding every row in order, row_bytes apiece; the row of an offset is
        (offset % region_bytes) // row_bytes (the native thread's DRAIN_ROW, csrc/mapper.cpp)."""
        raise NotImplementedError

    def element_offset(self, row: int, token: int, layer: int, kv: int, head: int) -> int:
        """Byte offset of (row, token, layer, kv, head, dim 0), from the view math."""
        v = self.view(layer, kv)
        elems = row * v.strides[0] + token * v.strides[1] + head * v.strides[2]
        return v.offset + elems * self.geometry.dtype_bytes

    # shared -----------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self.rows * self.row_tokens * self.geometry.token_bytes

    def _check(self, row: int, slot: int) -> None:
        if not (0 <= row < self.rows and 0 <= slot < self.blocks_per_row):
            raise IndexError(f"row {row} slot {slot} outside {self.rows} rows x {self.blocks_per_row} slots")


class InterleavedLayout(Layout):
    name = "interleaved"

    def min_block_size(self) -> int:
        return _min_tokens(self.geometry.token_bytes, self.page_size)

    def chunk_bytes(self) -> int:
        return self.block_bytes

    def chunks(self, row: int, slot: int) -> list[int]:
        self._check(row, slot)
        return [(row * self.row_tokens + slot * self.block_size) * self.geometry.token_bytes]

    def row_regions(self) -> tuple[int, int, int]:
        return 1, self.total_bytes, self.row_tokens * self.geometry.token_bytes

    def view(self, layer: int, kv: int) -> ViewSpec:
        g = self.geometry
        head_elems = g.num_kv_heads * g.head_size
        token_elems = 2 * g.num_layers * head_elems
        return ViewSpec(
            offset=(2 * layer + kv) * head_elems * g.dtype_bytes,
            shape=(self.rows, self.row_tokens, g.num_kv_heads, g.head_size),
            strides=(self.row_tokens * token_elems, token_elems, g.head_size, 1))


class PerLayerLayout(Layout):
    name = "per_layer"

    def min_block_size(self) -> int:
        return _min_tokens(self.geometry.head_bytes, self.page_size)

    @property
    def region_bytes(self) -> int:
        return self.rows * self.row_tokens * self.geometry.head_bytes

    def chunk_bytes(self) -> int:
        return self.block_size * self.geometry.head_bytes

    def chunks(self, row: int, slot: int) -> list[int]:
        self._check(row, slot)
        inside = (row * self.row_tokens + slot * self.block_size) * self.geometry.head_bytes
        return [r * self.region_bytes + inside for r in range(2 * self.geometry.num_layers)]

    def row_regions(self) -> tuple[int, int, int]:
        return 2 * self.geometry.num_layers, self.region_bytes, self.row_tokens * self.geometry.head_bytes

    def view(self, layer: int, kv: int) -> ViewSpec:
        g = self.geometry
        return ViewSpec(
            offset=(2 * layer + kv) * self.region_bytes,
            shape=(self.rows, self.row_tokens, g.num_kv_heads, g.head_size),
            strides=(self.row_tokens * g.num_kv_heads * g.head_size, g.num_kv_heads * g.head_size,
                     g.head_size, 1))


def make_layout(name: str, geometry: KVGeometry, page_size: int, rows: int, min_row_tokens: int,
                block_size: int | None = None) -> Layout:
    cls = {"interleaved": InterleavedLayout, "per_layer": PerLayerLayout}.get(name)
    if cls is None:
        raise ConfigError(f"VATTN_LAYOUT={name!r} is not a layout; use one of {', '.join(LAYOUTS)}")
    return cls(geometry, page_size, rows, min_row_tokens, block_size)


def preferred_block_size(name: str, geometry: KVGeometry, page_size: int) -> int:
    """The smallest page-aligned block size of a layout, without building one."""
    return make_layout(name, geometry, page_size, rows=1, min_row_tokens=1).block_size
