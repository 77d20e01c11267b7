"""Stock FA2/FA3 over VMM-backed rows give the same output as over ordinary memory, and match a
float32 reference; KV writes land in the right rows; sequences ending at or just past a page
boundary, with only the pages they need mapped (plus FA3's guard), read nothing unmapped
(run this file under compute-sanitizer too: see README)."""

import pytest
import torch

from vllm_vattention.attention import ops
from vllm_vattention.memory.views import layer_views

HQ, HK, D = 32, 8, 128
SCALE = D ** -0.5


def _bf16_tolerance(ref):
    # bf16 inputs and outputs: one bf16 ulp of the output scale, times a margin for accumulation order.
    return 4 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()


def _setup(m, cuda, seq_lens, q_lens, guard):
    """Rows with only the blocks they need, K/V written through vLLM's cache kernel."""
    bs = m.layout.block_size
    views = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)
    k_rows, v_rows = views[3]
    rows, next_block = [], 0
    for n in seq_lens:
        r = m.acquire_row()
        nb = -(-n // bs)
        m.set_blocks(r, list(range(next_block, next_block + nb)))
        next_block += nb
        m.ensure_readable(r, min(n + guard, m.layout.row_tokens))
        rows.append(r)
    m.sync()
    total = sum(seq_lens)
    k = torch.randn(total, HK, D, device=cuda, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.cat([torch.arange(n, device=cuda) + r * m.layout.row_tokens for r, n in zip(rows, seq_lens)])
    ops.write_kv(k, v, k_rows, v_rows, slots)
    rows_t = torch.tensor(rows, dtype=torch.int32, device=cuda)
    lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=cuda)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=cuda)
    q = torch.randn(sum(q_lens), HQ, D, device=cuda, dtype=torch.bfloat16)
    return k_rows, v_rows, k, v, rows_t, lens_t, cu_q, q


def test_write_kv_lands_in_rows(manager_factory, cuda):
    m = manager_factory(rows=6)
    seq_lens = [17, 33, 5]
    k_rows, v_rows, k, v, rows, _, _, _ = _setup(m, cuda, seq_lens, [1, 1, 1], guard=0)
    torch.cuda.synchronize()
    off = 0
    for r, n in zip(rows.tolist(), seq_lens):
        assert torch.equal(k_rows[r, :n], k[off: off + n])
        assert torch.equal(v_rows[r, :n], v[off: off + n])
        off += n


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
@pytest.mark.parametrize("seq_lens, q_lens", [
    ([16, 32, 17, 1000, 1024, 1025], [1] * 6),  # decode: ends at, and one past, 16-token pages
    ([300, 48, 16, 129], [300, 16, 1, 1]),  # mixed prefill + decode
])
def test_fa3_and_fa2_over_vmm_match_ordinary_memory_and_reference(manager_factory, cuda, layout, seq_lens, q_lens):
    m = manager_factory(layout=layout, rows=8, max_tokens=2048, num_blocks=256 if layout == "interleaved" else 16)
    k_rows, v_rows, _, _, rows, lens, cu_q, q = _setup(m, cuda, seq_lens, q_lens, guard=ops.FA3_MAX_OVERREAD)
    # Ordinary cudaMalloc memory with the same contents: everything the rows have readable
    # (their blocks, then the zero guard), zeros elsewhere.
    plain_k, plain_v = torch.zeros_like(k_rows), torch.zeros_like(v_rows)
    for r, n in zip(rows.tolist(), seq_lens):
        e = min(n + ops.FA3_MAX_OVERREAD, k_rows.shape[1])
        plain_k[r, :e], plain_v[r, :e] = k_rows[r, :e], v_rows[r, :e]
    ref = ops.reference_attention(q, k_rows, v_rows, cu_q, lens, rows, SCALE)
    tol = _bf16_tolerance(ref)

    out_vmm = ops.fa3_varlen(q, k_rows, v_rows, torch.empty_like(q), cu_q, lens, rows, max(q_lens), SCALE)
    out_plain = ops.fa3_varlen(q, plain_k, plain_v, torch.empty_like(q), cu_q, lens, rows, max(q_lens), SCALE)
    torch.cuda.synchronize()
    assert torch.equal(out_vmm, out_plain)
    assert (out_vmm.float() - ref).abs().max().item() <= tol

    if max(q_lens) == 1:
        out2 = ops.fa2_decode(q, k_rows, v_rows, torch.empty_like(q), lens, rows, SCALE)
        out2_plain = ops.fa2_decode(q, plain_k, plain_v, torch.empty_like(q), lens, rows, SCALE)
        torch.cuda.synchronize()
        assert torch.equal(out2, out2_plain)
        assert (out2.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("seq_lens, q_lens", [
    ([300, 48, 16, 129], [300, 16, 1, 1]),  # a prefill, a chunk, decodes
    ([3900, 3000, 17], [1, 1, 17]),  # long rows, few query tiles: FA3 splits them (its dynamic split)
])
def test_fa3_given_the_steps_schedule_equals_fa3_scheduling_itself(manager_factory, cuda, seq_lens, q_lens):
    """The backend computes FA3's scheduler metadata once per step (ops.fa3_schedule) and hands it
    to every layer: each layer's output is bit for bit what FA3 gives when it schedules the call
    itself, also on the layers after the first (the metadata's semaphore is reset by each call)."""
    m = manager_factory(rows=4, max_tokens=4096, num_blocks=512)
    k_rows, v_rows, _, _, rows, lens, cu_q, q = _setup(m, cuda, seq_lens, q_lens, guard=ops.FA3_MAX_OVERREAD)
    view = min(k_rows.shape[1], -(-(max(seq_lens) + 256) // 256) * 256)  # the builder's sliced view
    kv = (k_rows[:, :view], v_rows[:, :view])
    own = ops.fa3_varlen(q, *kv, torch.empty_like(q), cu_q, lens, rows, max(q_lens), SCALE)
    schedule = ops.fa3_schedule(cu_q, lens, max(q_lens), view, HQ, HK, D, torch.bfloat16)
    layers = [ops.fa3_varlen(q, *kv, torch.empty_like(q), cu_q, lens, rows, max(q_lens), SCALE, schedule=schedule)
              for _ in range(3)]
    ref = ops.reference_attention(q, k_rows, v_rows, cu_q, lens, rows, SCALE)
    torch.cuda.synchronize()
    for out in layers:
        assert torch.equal(out, own)
    assert (own.float() - ref).abs().max().item() <= _bf16_tolerance(ref)


@pytest.mark.parametrize("num_splits", [0, 1, 3, 8])
def test_fa2_decode_split_counts_match_the_reference(manager_factory, cuda, num_splits):
    """VATTN_FA2_SPLITS: any split count gives the same attention over vAttention's rows (sequences
    shorter than a split, one page past a boundary, and long ones in one batch)."""
    m = manager_factory(rows=4, max_tokens=2048, num_blocks=256)  # (194 blocks used)
    k_rows, v_rows, _, _, rows, lens, cu_q, q = _setup(m, cuda, [5, 17, 1025, 2000], [1] * 4, guard=0)
    out = ops.fa2_decode(q, k_rows, v_rows, torch.empty_like(q), lens, rows, SCALE, num_splits=num_splits)
    ref = ops.reference_attention(q, k_rows, v_rows, cu_q, lens, rows, SCALE)
    torch.cuda.synchronize()
    assert (out.float() - ref).abs().max().item() <= _bf16_tolerance(ref)


@pytest.mark.parametrize("seq_len", [16, 17, 32, 176, 177, 1024, 1025])
def test_fa2_decode_needs_no_guard(manager_factory, cuda, seq_len):
    """Only the sequence's own pages are mapped: FA2 must not touch anything else."""
    m = manager_factory(rows=4, max_tokens=2048)
    k_rows, v_rows, _, _, rows, lens, cu_q, q = _setup(m, cuda, [seq_len], [1], guard=0)
    out = ops.fa2_decode(q, k_rows, v_rows, torch.empty_like(q), lens, rows, SCALE)
    ref = ops.reference_attention(q, k_rows, v_rows, cu_q, lens, rows, SCALE)
    torch.cuda.synchronize()
    assert (out.float() - ref).abs().max().item() <= _bf16_tolerance(ref)


@pytest.mark.parametrize("seq_len, q_len", [(16, 1), (17, 1), (176, 1), (177, 1), (1024, 1), (1025, 1),
                                            (48, 16), (128, 128), (200, 200)])
def test_fa3_with_the_guard_reads_only_mapped_memory(manager_factory, cuda, seq_len, q_len):
    m = manager_factory(rows=4, max_tokens=2048)
    k_rows, v_rows, _, _, rows, lens, cu_q, q = _setup(m, cuda, [seq_len], [q_len], guard=ops.FA3_MAX_OVERREAD)
    out = ops.fa3_varlen(q, k_rows, v_rows, torch.empty_like(q), cu_q, lens, rows, q_len, SCALE)
    ref = ops.reference_attention(q, k_rows, v_rows, cu_q, lens, rows, SCALE)
    torch.cuda.synchronize()
    assert (out.float() - ref).abs().max().item() <= _bf16_tolerance(ref)


@pytest.mark.parametrize("seq_lens, q_lens", [([17], [17]), ([1025], [300]), ([2000, 1025, 48], [500, 25, 16]),
                                              ([2000, 1025, 48], [1, 1, 1]), ([1030, 1025, 1000], [1, 1, 1])])
def test_fa3_view_clipped_to_the_longest_sequence_needs_no_guard_there(manager_factory, cuda, seq_lens, q_lens):
    """VATTN_FA3_GUARD=clipped: the FA3 view ends at the longest FA3 sequence; that row has only its
    own blocks mapped, the others readable up to the view's end (ops.read_extents). Decode-only
    batches are VATTN_FA3_DECODE_TOKENS' long decode steps (eager, all FA3: NOTES #130). Run under
    compute-sanitizer: an over-read past the view would be an illegal address."""
    import numpy as np
    m = manager_factory(rows=4, max_tokens=4096, num_blocks=256)  # 2000 + 1025 + 48 tokens: 193 blocks
    seq, ql = np.array(seq_lens), np.array(q_lens)
    eager = bool((ql == 1).all())
    kernel = "fa3" if eager else "fa2"
    _, ext = ops.read_extents(seq, ql, kernel, ops.FA3_MAX_OVERREAD, m.layout.row_tokens, clip_to_view=True,
                              eager=eager)
    view = ops.fa3_view_len(seq, ql, ops.fa3_mask(ql, kernel), eager=eager)
    bs = m.layout.block_size
    views = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)
    k_rows, v_rows = views[3]
    rows, nxt = [], 0
    for n, e in zip(seq_lens, ext.tolist()):
        r = m.acquire_row()
        nb = -(-n // bs)
        m.set_blocks(r, list(range(nxt, nxt + nb)))
        nxt += nb
        m.ensure_readable(r, e)
        rows.append(r)
    m.sync()
    k = torch.randn(sum(seq_lens), HK, D, device=cuda, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.cat([torch.arange(n, device=cuda) + r * m.layout.row_tokens for r, n in zip(rows, seq_lens)])
    ops.write_kv(k, v, k_rows, v_rows, slots)
    rows_t = torch.tensor(rows, dtype=torch.int32, device=cuda)
    lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=cuda)
    cu_q = torch.tensor([0] + list(np.cumsum(q_lens)), dtype=torch.int32, device=cuda)
    q = torch.randn(sum(q_lens), HQ, D, device=cuda, dtype=torch.bfloat16)
    out = ops.fa3_varlen(q, k_rows[:, :view], v_rows[:, :view], torch.empty_like(q), cu_q, lens_t, rows_t,
                         max(q_lens), SCALE)
    ref = ops.reference_attention(q, k_rows, v_rows, cu_q, lens_t, rows_t, SCALE)
    torch.cuda.synchronize()
    assert (out.float() - ref).abs().max().item() <= _bf16_tolerance(ref)


def test_mixed_batch_split_fa2_decodes_fa3_prefills(manager_factory, cuda):
    """How the backend runs a mixed batch: decodes (first) through FA2 with no guard behind them,
    prefills through FA3 with the guard; together equal to the float32 reference."""
    m = manager_factory(rows=8, max_tokens=2048)
    seq_lens, q_lens = [33, 1024, 200, 48], [1, 1, 200, 16]
    bs = m.layout.block_size
    views = layer_views(m.base_va, m.layout, torch.bfloat16, cuda)
    k_rows, v_rows = views[7]
    rows, nxt = [], 0
    for n, ql in zip(seq_lens, q_lens):
        r = m.acquire_row()
        nb = -(-n // bs)
        m.set_blocks(r, list(range(nxt, nxt + nb)))
        nxt += nb
        if ql > 1:
            m.ensure_readable(r, n + ops.FA3_MAX_OVERREAD)
        rows.append(r)
    k = torch.randn(sum(seq_lens), 8, 128, device=cuda, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.cat([torch.arange(n, device=cuda) + r * m.layout.row_tokens for r, n in zip(rows, seq_lens)])
    ops.write_kv(k, v, k_rows, v_rows, slots)
    rows_t = torch.tensor(rows, dtype=torch.int32, device=cuda)
    lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=cuda)
    cu = torch.tensor([0, 1, 2, 202, 218], dtype=torch.int32, device=cuda)
    q = torch.randn(218, 32, 128, device=cuda, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    ops.fa2_decode(q[:2], k_rows, v_rows, out[:2], lens_t[:2], rows_t[:2], SCALE)
    ops.fa3_varlen(q[2:], k_rows, v_rows, out[2:], cu[2:] - 2, lens_t[2:], rows_t[2:], 200, SCALE)
    ref = ops.reference_attention(q, k_rows, v_rows, cu, lens_t, rows_t, SCALE)
    torch.cuda.synchronize()
    assert (out.float() - ref).abs().max().item() <= _bf16_tolerance(ref)


@pytest.mark.parametrize("seq_lens, q_lens", [([16, 17, 1000, 33], [1, 1, 1, 1]), ([300, 48, 129], [300, 16, 1])])
def test_matches_stock_vllm_paged_fa3_on_the_same_data(manager_factory, cuda, seq_lens, q_lens):
    """What stock vLLM's FLASH_ATTN backend runs (paged FA3, shuffled 16-token blocks) against what
    ours runs, on the same q, k, v: the difference stays within the two kernels' own distance
    from the float32 reference."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    m = manager_factory(rows=8, max_tokens=2048)
    k_rows, v_rows, k, v, rows, lens, cu_q, q = _setup(m, cuda, seq_lens, q_lens, guard=ops.FA3_MAX_OVERREAD)
    bs = 16
    nblk = [-(-n // bs) for n in seq_lens]
    perm = torch.randperm(sum(nblk) + 8, device=cuda)[:sum(nblk)]
    kp = torch.zeros(sum(nblk) + 8, bs, 8, 128, device=cuda, dtype=torch.bfloat16)
    vp = torch.zeros_like(kp)
    bt = torch.zeros(len(seq_lens), max(nblk), dtype=torch.int32, device=cuda)
    off = tok = 0
    for i, n in enumerate(seq_lens):
        ids = perm[off:off + nblk[i]]
        bt[i, :nblk[i]] = ids.int()
        pos = torch.arange(n, device=cuda)
        kp[ids[pos // bs], pos % bs] = k[tok:tok + n]
        vp[ids[pos // bs], pos % bs] = v[tok:tok + n]
        off += nblk[i]
        tok += n
    stock = flash_attn_varlen_func(q, kp, vp, max(q_lens), cu_q, max(seq_lens), seqused_k=lens, block_table=bt,
                                   causal=True, softmax_scale=SCALE, fa_version=3)
    ours = torch.empty_like(q)
    if max(q_lens) == 1:  # what our backend runs: FA2 for decode batches, FA3 otherwise
        ops.fa2_decode(q, k_rows, v_rows, ours, lens, rows, SCALE)
    else:
        ops.fa3_varlen(q, k_rows, v_rows, ours, cu_q, lens, rows, max(q_lens), SCALE)
    ref = ops.reference_attention(q, k_rows, v_rows, cu_q, lens, rows, SCALE)
    torch.cuda.synchronize()
    err_stock = (stock.float() - ref).abs().max().item()
    err_ours = (ours.float() - ref).abs().max().item()
    assert (ours.float() - stock.float()).abs().max().item() <= err_stock + err_ours + 1e-6
    assert err_ours <= _bf16_tolerance(ref)


def test_kbench_over_plain_and_vmm_rows_matches_paged_fa3(cuda):
    """vattn-kbench's variants read the same keys and values as its paged FA3 baseline: plain rows
    (padded and not), paged FA3 over in-order blocks, and the engine's own VMM rows (NOTES #74, #77)."""
    from vllm_vattention.bench import kbench

    res = kbench.run_shape(4, 100, 256, [0, 2], ["interleaved", "vmm"], paged_orders=("shuffled", "sequential"),
                           row_pads=(0, 16), vmm_row_tokens=288, timer=lambda fn: (fn(), 1.0)[1],
                           spread=90, longest_first=True)
    got = {(r["layout"], r["system"], r["num_splits"]) for r in res}
    assert ("paged", "paged-fa3-seq", None) in got and ("interleaved+pad16", "fa2", 2) in got
    # (FA2 over the batch sorted longest first, its output scattered back: NOTES #138)
    assert ("vmm (288-token rows), longest first", "fa2", 2) in got
    assert ("vmm (288-token rows)", "fa3-rows", None) in got
    assert all(r["ms"] == 1.0 and r["max_abs_diff_vs_paged_fa3"] < 2e-2 for r in res), res
