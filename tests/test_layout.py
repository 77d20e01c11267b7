import random

import pytest

from vllm_vattention.errors import ConfigError
from vllm_vattention.memory import KVGeometry, make_layout, preferred_block_size

MiB2 = 2 << 20
LLAMA3_8B = KVGeometry(num_layers=32, num_kv_heads=8, head_size=128, dtype_bytes=2)


@pytest.mark.parametrize("geometry, layout, block, pages", [
    (LLAMA3_8B, "interleaved", 16, 1),  # 16 tokens x 128 KiB = one 2 MiB page
    (LLAMA3_8B, "per_layer", 1024, 64),  # the paper's: one page per (layer, K/V), 1024 tokens
    (KVGeometry(32, 4, 128, 2), "interleaved", 32, 1),  # Yi-6B: 4 KV heads
    (KVGeometry(32, 4, 128, 2), "per_layer", 2048, 64),
    (KVGeometry(60, 8, 128, 2), "interleaved", 128, 15),  # Yi-34B: 240 KiB/token does not divide 2 MiB
    (KVGeometry(32, 4, 128, 2), "interleaved", 32, 1),  # Llama-3-8B at TP=2: 4 heads per rank
    (KVGeometry(60, 4, 128, 2), "interleaved", 256, 15),  # Yi-34B at TP=2: 120 KiB/token per rank
    (KVGeometry(80, 1, 128, 2), "interleaved", 256, 5),  # Llama-3-70B at TP=8
])
def test_block_size_fills_whole_pages(geometry, layout, block, pages):
    lay = make_layout(layout, geometry, MiB2, rows=2, min_row_tokens=5000)
    assert lay.block_size == block
    assert lay.pages_per_block == pages
    assert lay.block_bytes == pages * MiB2 == block * geometry.token_bytes
    assert lay.row_tokens % block == 0 and lay.row_tokens >= 5000
    assert preferred_block_size(layout, geometry, MiB2) == block


def test_block_size_must_be_a_multiple_of_the_page_unit():
    with pytest.raises(ConfigError, match=r"block size 24 .* multiple of 16"):
        make_layout("interleaved", LLAMA3_8B, MiB2, rows=1, min_row_tokens=100, block_size=24)
    assert make_layout("interleaved", LLAMA3_8B, MiB2, 1, 100, block_size=32).pages_per_block == 2


def test_block_size_too_large_is_refused_with_the_fix():
    odd = KVGeometry(num_layers=1, num_kv_heads=1, head_size=8, dtype_bytes=2)  # 16 B/head: 131072 tokens
    with pytest.raises(ConfigError, match="VATTN_LAYOUT=interleaved"):
        make_layout("per_layer", odd, MiB2, rows=1, min_row_tokens=10)


def test_unknown_layout_names_the_choices():
    with pytest.raises(ConfigError, match="interleaved, per_layer"):
        make_layout("paged", LLAMA3_8B, MiB2, 1, 10)


@pytest.mark.parametrize("name", ["interleaved", "per_layer"])
def test_every_element_lies_in_its_blocks_chunks(name):
    """The view math and the chunk math agree: token t of row r lives in slot t // block_size."""
    geo = KVGeometry(num_layers=3, num_kv_heads=2, head_size=64, dtype_bytes=2)
    lay = make_layout(name, geo, 4096, rows=3, min_row_tokens=50)
    size = lay.chunk_bytes()
    rng = random.Random(0)
    for _ in range(500):
        row, tok = rng.randrange(lay.rows), rng.randrange(lay.row_tokens)
        layer, kv, head = rng.randrange(3), rng.randrange(2), rng.randrange(2)
        addr = lay.element_offset(row, tok, layer, kv, head)
        last = addr + geo.head_size * geo.dtype_bytes - 1
        chunks = lay.chunks(row, tok // lay.block_size)
        assert any(c <= addr and last < c + size for c in chunks), (row, tok, layer, kv, head)


@pytest.mark.parametrize("name", ["interleaved", "per_layer"])
def test_chunks_tile_the_reservation_without_overlap(name):
    geo = KVGeometry(num_layers=2, num_kv_heads=2, head_size=64, dtype_bytes=2)
    lay = make_layout(name, geo, 4096, rows=3, min_row_tokens=40)
    spans = sorted(c for r in range(lay.rows) for s in range(lay.blocks_per_row) for c in lay.chunks(r, s))
    size = lay.chunk_bytes()
    assert all(c % 4096 == 0 for c in spans)
    assert all(b - a >= size for a, b in zip(spans, spans[1:]))
    assert len(spans) * size == lay.total_bytes  # every byte belongs to exactly one chunk


@pytest.mark.parametrize("name", ["interleaved", "per_layer"])
def test_views_are_flash_attention_shaped(name):
    lay = make_layout(name, LLAMA3_8B, MiB2, rows=4, min_row_tokens=8192)
    for layer in (0, 31):
        for kv in (0, 1):
            v = lay.view(layer, kv)
            assert v.shape == (4, lay.row_tokens, 8, 128)
            assert v.strides[-1] == 1 and v.strides[-2] == 128
            end = v.offset + sum((n - 1) * s for n, s in zip(v.shape, v.strides)) * 2 + 2
            assert end <= lay.total_bytes
