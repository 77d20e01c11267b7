"""vattn-kbench's CPU side: shapes, row lengths, bytes read, and the report (the timing runs on a GPU)."""

import time

import pytest

from vllm_vattention.bench import kbench as K


def test_shapes_rows_and_bytes():
    assert K.parse_shapes("24x16384,128X1024") == [(24, 16384), (128, 1024)]
    with pytest.raises(ValueError, match="shape '24-16384' is not BATCHxCONTEXT"):
        K.parse_shapes("24-16384")
    with pytest.raises(ValueError, match="must be positive"):
        K.parse_shapes("0x16")
    assert K.row_tokens_for(16384) == 17664  # + 1024 out + 256 guard, rounded up to 256
    assert K.row_tokens_for(1000) == 2304
    assert K.kv_bytes(24, 16384) == 24 * 16384 * 8 * 128 * 2 * 2  # K and V, bf16, one layer


def test_report_picks_the_heuristic_and_the_best_split_per_layout():
    def r(layout, system, s, ms, diff=0.001, note=""):
        return {"batch": 24, "context": 16384, "row_tokens": 17664, "layout": layout, "system": system,
                "num_splits": s, "ms": ms, "tb_per_s": None, "max_abs_diff_vs_paged_fa3": diff, "note": note}
    res = {"gpu": "G", "driver": "d", "torch": "t", "vllm": "v", "commit": "c", "date": "x", "splits": [0, 2, 4],
           "results": [r("paged", "paged-fa3", None, 0.40, 0.0), r("interleaved", "fa2", 0, 0.44),
                       r("interleaved", "fa2", 2, 0.42, 0.003), r("interleaved", "fa2", 4, 0.36),
                       r("interleaved", "fa3-rows", None, 0.50, 0.004),
                       r("per_layer", "fa2", None, None, None, "out of memory (99 GiB)")]}
    md = K.markdown(res)
    # FA3 over rows has its own columns; it is not taken for a split count (its num_splits is None)
    assert ("| 24 x 16384 | 17664 | interleaved | 0.4000 | 0.4400 | 4 | 0.3600 | 1.111x | 0.909x | 0.5000 | 0.800x "
            "| 0.0040 |") in md
    assert "| 24 x 16384 | 17664 | per_layer | 0.4000 | - | - | - | - | - | - | - | out of memory (99 GiB) |" in md
    assert "| 24 x 16384 | interleaved | 0.4400 | 0.4200 | 0.3600 |" in md
    # an older run without FA3 over rows: its cells are '-'
    old = {**res, "results": [x for x in res["results"] if x["system"] != "fa3-rows"]}
    assert "| 0.909x | - | - | 0.0030 |" in K.markdown(old)


def test_every_kernel_reads_the_same_keys_and_values():
    """The plumbing on the CPU with stand-in kernels (float32 attention): the paged cache, filled
    through the shuffled block table, and both row layouts hold the same keys and values, so every
    stand-in's output equals the paged one's; splits reach the FA2 call; timings are recorded."""
    import torch

    from vllm_vattention.attention import ops

    def paged(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k, softmax_scale, causal, block_table, out, fa_version):
        assert fa_version == 3 and max_k == 64 and causal
        k_rows = k_cache[block_table.long()].flatten(1, 2)  # [batch, blocks * 16, heads, dim]
        v_rows = v_cache[block_table.long()].flatten(1, 2)
        rows = torch.arange(q.shape[0], dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_q, seqused_k, rows, softmax_scale))

    seen_splits = []

    def fa2(q, k_rows, v_rows, out, seq_lens, rows, scale, num_splits=0):
        assert k_rows.shape[1] == 64  # whole rows, as a CUDA-graph decode step passes them
        seen_splits.append(num_splits)
        cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu, seq_lens, rows, scale))

    def fa3(q, k_rows, v_rows, out, cu_seqlens_q, seq_lens, rows, max_query_len, scale):
        assert k_rows.shape[1] == 64 and max_query_len == 1  # whole rows, one query token each
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_seqlens_q, seq_lens, rows, scale))

    res = K.run_shape(3, 40, 64, [0, 2], ["interleaved", "per_layer"], device="cpu", timer=lambda fn: (fn(), 0.5)[1],
                      paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3)
    assert [(r["layout"], r["system"], r["num_splits"]) for r in res] == [
        ("paged", "paged-fa3", None), ("interleaved", "fa2", 0), ("interleaved", "fa2", 2),
        ("interleaved", "fa3-rows", None), ("per_layer", "fa2", 0), ("per_layer", "fa2", 2),
        ("per_layer", "fa3-rows", None)]
    assert seen_splits == [0, 0, 2, 2] * 2  # per layout and count: the timed call, then the checked one
    assert all(r["ms"] == 0.5 and r["max_abs_diff_vs_paged_fa3"] <= 1e-2 for r in res)
    assert res[1]["tb_per_s"] == pytest.approx(K.kv_bytes(3, 40) / 1e9 / 0.5)


def test_controls_in_order_blocks_and_padded_rows_read_the_same_data():
    """The controls of NOTES #73: paged FA3 over blocks in order gets the same block table a row has
    (0, 1, 2, ... per sequence) and the same answer; padded rows give the kernels a view of
    row_tokens over a longer stride, and read the same keys and values."""
    import torch

    from vllm_vattention.attention import ops

    tables, strides = [], []

    def paged(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k, softmax_scale, causal, block_table, out, fa_version):
        tables.append(block_table.clone())
        k_rows = k_cache[block_table.long()].flatten(1, 2)
        v_rows = v_cache[block_table.long()].flatten(1, 2)
        rows = torch.arange(q.shape[0], dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_q, seqused_k, rows, softmax_scale))

    def fa2(q, k_rows, v_rows, out, seq_lens, rows, scale, num_splits=0):
        assert k_rows.shape[1] == 64
        strides.append(k_rows.stride(0) // k_rows.stride(1))  # row stride in tokens
        cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu, seq_lens, rows, scale))

    def fa3(q, k_rows, v_rows, out, cu_seqlens_q, seq_lens, rows, max_query_len, scale):
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_seqlens_q, seq_lens, rows, scale))

    res = K.run_shape(3, 40, 64, [0], ["per_layer"], device="cpu", timer=lambda fn: (fn(), 0.25)[1],
                      paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3,
                      paged_orders=("sequential", "shuffled"), row_pads=(0, 16))
    assert [(r["layout"], r["system"]) for r in res] == [
        ("paged", "paged-fa3"), ("paged", "paged-fa3-seq"), ("per_layer", "fa2"), ("per_layer", "fa3-rows"),
        ("per_layer+pad16", "fa2"), ("per_layer+pad16", "fa3-rows")]
    in_order = tables[-1]
    assert in_order.tolist() == [[b * 4 + j for j in range(4)] for b in range(3)]  # 64 tokens = 4 blocks a row
    assert sorted(tables[0].flatten().tolist()) == list(range(12)) and not torch.equal(tables[0], in_order)
    assert set(strides) == {64, 80}
    assert all(r["max_abs_diff_vs_paged_fa3"] <= 1e-2 for r in res)
    md = K.markdown({"gpu": "G", "driver": "d", "torch": "t", "vllm": "v", "commit": "c", "date": "x",
                     "splits": [0], "results": res})
    assert "| 3 x 40 | 0.2500 | 0.2500 | 1.000x | 0.0000 |" in md
    assert "| 3 x 40 | 64 | per_layer+pad16 | 0.2500 |" in md
    with pytest.raises(SystemExit, match="--paged-orders random"):
        K.main(["--paged-orders", "random", "--out", "/tmp/kb-x"])
    with pytest.raises(SystemExit, match="--row-pads 0,-1"):
        K.main(["--row-pads", "0,-1", "--out", "/tmp/kb-x"])


def test_vmm_rows_are_planned_as_the_engine_has_them():
    """plan_vmm_rows: one row per sequence, its blocks a share of one shuffled permutation of the
    pool (frames from anywhere), FA3's guard behind the sequence as the zero page, nothing else."""
    import torch

    from helpers import PAGE, SMALL
    from vllm_vattention.memory import FakeDriver, KVMemoryManager, make_layout
    from vllm_vattention.memory.mapper import ZERO
    driver = FakeDriver(PAGE, capacity=1 << 28)
    lay = make_layout("interleaved", SMALL, PAGE, rows=3, min_row_tokens=20 * 16)
    bs = lay.block_size
    m = KVMemoryManager(driver, lay, num_blocks=3 * 5)
    try:
        rows = K.plan_vmm_rows(m, 3, 4 * bs + 1, guard=2 * bs, gen=torch.Generator().manual_seed(0))
        assert sorted(rows) == [0, 1, 2]
        frames = [m.mapper.slots[r] for r in rows]
        held = [f[:5] for f in frames]
        assert sorted(x for h in held for x in h) == sorted(m.pool.frame(b) for b in range(15))
        assert held != [[m.pool.frame(b) for b in range(5 * i, 5 * i + 5)] for i in range(3)]  # shuffled
        # 4 blocks + 1 token: 5 blocks; the guard of 2 blocks reaches token 6 * bs + 1: slots 5-6 zero
        assert all(f[5:7] == [ZERO] * 2 and all(x is None for x in f[7:]) for f in frames)
        m.mapper.check_invariants()
    finally:
        m.close()


def test_vmm_layout_goes_through_its_own_rows_and_closes_them():
    """run_shape's 'vmm' variant takes its rows from vmm_rows (replaced here by rows of a plain
    tensor at other indices), times FA2 and FA3 over them with those row indices, labels the rows'
    length, and closes them."""
    import torch

    from vllm_vattention.attention import ops

    def paged(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k, softmax_scale, causal, block_table, out, fa_version):
        k_rows = k_cache[block_table.long()].flatten(1, 2)
        v_rows = v_cache[block_table.long()].flatten(1, 2)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_q, seqused_k, torch.arange(q.shape[0]), softmax_scale))

    used_rows, closed = [], []

    def fake_vmm(batch, context, row_tokens, k_src, v_src, dev, churn=False):
        assert row_tokens == 96 and not churn
        store = torch.zeros(2, batch + 2, row_tokens, K.HKV, K.D, dtype=torch.bfloat16)
        rows = torch.arange(batch, dtype=torch.int32) + 2  # rows 2.. (row 0, 1 unused)
        store[0, rows.long(), :context] = k_src
        store[1, rows.long(), :context] = v_src
        return store[0], store[1], rows, lambda: closed.append(True), None

    def fa2(q, k_rows, v_rows, out, seq_lens, rows, scale, num_splits=0):
        used_rows.append(rows.tolist())
        out.copy_(ops.reference_attention(q, k_rows, v_rows, torch.arange(q.shape[0] + 1, dtype=torch.int32),
                                          seq_lens, rows, scale))

    def fa3(q, k_rows, v_rows, out, cu_seqlens_q, seq_lens, rows, max_query_len, scale):
        used_rows.append(rows.tolist())
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_seqlens_q, seq_lens, rows, scale))

    res = K.run_shape(3, 40, 64, [0], ["vmm"], device="cpu", timer=lambda fn: (fn(), 0.3)[1],
                      paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3, vmm_row_tokens=96, vmm_rows_fn=fake_vmm,
                      row_pads=(0, 16))  # pads do not apply to vmm rows
    assert [(r["layout"], r["system"]) for r in res] == [
        ("paged", "paged-fa3"), ("vmm (96-token rows)", "fa2"), ("vmm (96-token rows)", "fa3-rows")]
    assert used_rows and all(u == [2, 3, 4] for u in used_rows) and closed == [True]
    assert all(r["max_abs_diff_vs_paged_fa3"] <= 1e-2 for r in res)


def test_map_churn_maps_and_unmaps_a_frame_on_the_native_thread_until_the_block_ends():
    """MapChurn over the fake driver through the real native thread: while the block runs, triples
    of map / set access / unmap at one VA keep coming (the fake driver would raise on a map over a
    mapped VA or an unmap of an unmapped one); after it, the VA is unmapped and the rate is known."""
    from helpers import PAGE
    from vllm_vattention.memory import FakeDriver
    from vllm_vattention.memory.native import NativeExecutor
    driver = FakeDriver(PAGE, capacity=1 << 24)
    va, handle = driver.reserve(4 * PAGE), driver.create(PAGE)
    ex = NativeExecutor(*driver.native_table())
    churn = K.MapChurn(ex, va + PAGE, PAGE, handle, triples=4)
    try:
        with churn:
            deadline = time.perf_counter() + 5
            while churn.calls < 3 * 12 and time.perf_counter() < deadline:
                time.sleep(0.005)
        assert churn.calls >= 36 and churn.calls % 12 == 0 and churn.calls_per_ms > 0
        assert driver.mapping_at(va + PAGE) is None and not driver.native_errors
        with churn:  # a second block: the slot is free again at its start, and again at its end
            time.sleep(0.01)
        assert churn.calls % 12 == 0 and driver.mapping_at(va + PAGE) is None and not driver.native_errors
    finally:
        churn.close()


def test_map_churn_raises_the_native_threads_error_on_the_timing_thread():
    """A churn that cannot map (here: its VA is mapped already) stops, and the block raises."""
    from helpers import PAGE
    from vllm_vattention.errors import DriverError
    from vllm_vattention.memory import FakeDriver
    from vllm_vattention.memory.native import NativeExecutor
    driver = FakeDriver(PAGE, capacity=1 << 24)
    va, handle = driver.reserve(2 * PAGE), driver.create(PAGE)
    driver.map(va, PAGE, handle)
    churn = K.MapChurn(NativeExecutor(*driver.native_table()), va, PAGE, handle, triples=1)
    try:
        with pytest.raises(DriverError, match="native mapping thread"):
            with churn:
                time.sleep(0.05)
    finally:
        churn.close()


def test_churn_takes_a_row_no_sequence_uses_and_a_sequences_frame():
    import torch

    from helpers import PAGE, SMALL
    from vllm_vattention.memory import FakeDriver, KVMemoryManager, make_layout
    from vllm_vattention.memory.executor import ACCESS_RW, MAP, UNMAP
    driver = FakeDriver(PAGE, capacity=1 << 28)
    lay = make_layout("interleaved", SMALL, PAGE, rows=3, min_row_tokens=8 * 16)
    m = KVMemoryManager(driver, lay, num_blocks=2 * 3)
    try:
        rows = K.plan_vmm_rows(m, 2, 3 * lay.block_size, guard=16, gen=torch.Generator().manual_seed(0))
        churn = K.churn_at_free_row(m, executor=None, rows=rows)
        (free,) = set(range(3)) - set(rows)
        (off,) = lay.chunks(free, 0)
        frame = m.mapper.slots[rows[0]][0]
        assert churn.ops[:3] == [(MAP, m.base_va + off, lay.chunk_bytes(), m.pool.handles(frame)[0]),
                                 (ACCESS_RW, m.base_va + off, lay.chunk_bytes(), 0),
                                 (UNMAP, m.base_va + off, lay.chunk_bytes(), 0)]
        with pytest.raises(ValueError, match="no free row for the map churn: the layout has 3 rows"):
            K.churn_at_free_row(m, None, [0, 1, 2])
    finally:
        m.close()


def test_map_churn_times_fa2_and_fa3_again_and_reports_them_beside_the_quiet_rows():
    """run_shape with map_churn: vmm rows' FA2 (first split count) and FA3 are timed once more
    inside the churn block, labelled '+ map churn' with the rate; the report compares them with the
    same kernels' quiet times."""
    import torch

    from vllm_vattention.attention import ops

    def paged(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k, softmax_scale, causal, block_table, out, fa_version):
        k_rows = k_cache[block_table.long()].flatten(1, 2)
        v_rows = v_cache[block_table.long()].flatten(1, 2)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_q, seqused_k, torch.arange(q.shape[0]), softmax_scale))

    class Churn:
        inside = False
        calls_per_ms = 12.5

        def __enter__(self):
            Churn.inside = True
            return self

        def __exit__(self, *exc):
            Churn.inside = False

    def fake_vmm(batch, context, row_tokens, k_src, v_src, dev, churn=False):
        assert churn
        store = torch.zeros(2, batch, row_tokens, K.HKV, K.D, dtype=torch.bfloat16)
        store[0, :, :context] = k_src
        store[1, :, :context] = v_src
        return store[0], store[1], torch.arange(batch, dtype=torch.int32), lambda: None, Churn()

    def fa2(q, k_rows, v_rows, out, seq_lens, rows, scale, num_splits=0):
        out.copy_(ops.reference_attention(q, k_rows, v_rows, torch.arange(q.shape[0] + 1, dtype=torch.int32),
                                          seq_lens, rows, scale))

    def fa3(q, k_rows, v_rows, out, cu_seqlens_q, seq_lens, rows, max_query_len, scale):
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_seqlens_q, seq_lens, rows, scale))

    res = K.run_shape(2, 40, 64, [0, 2], ["vmm"], device="cpu", timer=lambda fn: (fn(), 0.6 if Churn.inside else 0.5)[1],
                      paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3, vmm_rows_fn=fake_vmm, map_churn=True)
    churned = [r for r in res if r["layout"] == "vmm (64-token rows) + map churn"]
    assert [(r["system"], r["num_splits"], r["ms"], r["note"]) for r in churned] == [
        ("fa2", 0, 0.6, "12.5 driver calls/ms"), ("fa3-rows", None, 0.6, "12.5 driver calls/ms")]
    assert all(r["max_abs_diff_vs_paged_fa3"] <= 1e-2 for r in churned)
    md = K.markdown({"gpu": "G", "driver": "d", "torch": "t", "vllm": "v", "commit": "c", "date": "x",
                     "splits": [0, 2], "results": res})
    assert "| 2 x 40 | vmm (64-token rows) | FA2 (splits 0) | 0.5000 | 0.6000 | 1.200x | 12.5 |" in md
    assert "| 2 x 40 | vmm (64-token rows) | FA3 over rows | 0.5000 | 0.6000 | 1.200x | 12.5 |" in md


def test_map_churn_needs_the_vmm_layout():
    with pytest.raises(SystemExit, match="--map-churn needs the vmm layout"):
        K.main(["--layouts", "interleaved", "--map-churn", "--out", "/tmp/unused-kbench"])


def test_spread_draws_contexts_from_the_whole_range_and_every_kernel_reads_each_own_length():
    """--spread (mixed-64-4096-in's decode batches: 64 to 4,600 tokens per sequence): the kernels get
    lengths from context - spread + 1 to context, all of them the same lengths, and still agree with
    paged FA3; the row and the table name the range and the mean."""
    import torch

    from vllm_vattention.attention import ops

    seen = {}

    def paged(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k, softmax_scale, causal, block_table, out, fa_version):
        seen["paged"] = seqused_k.clone()
        k_rows = k_cache[block_table.long()].flatten(1, 2)
        v_rows = v_cache[block_table.long()].flatten(1, 2)
        rows = torch.arange(q.shape[0], dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_q, seqused_k, rows, softmax_scale))

    def fa2(q, k_rows, v_rows, out, seq_lens, rows, scale, num_splits=0):
        seen["fa2"] = seq_lens.clone()
        cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu, seq_lens, rows, scale))

    def fa3(q, k_rows, v_rows, out, cu_seqlens_q, seq_lens, rows, max_query_len, scale):
        seen["fa3"] = seq_lens.clone()
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_seqlens_q, seq_lens, rows, scale))

    res = K.run_shape(16, 48, 64, [0], ["per_layer"], device="cpu", timer=lambda fn: (fn(), 0.5)[1],
                      paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3, spread=40)
    lens = seen["paged"]
    assert torch.equal(lens, seen["fa2"]) and torch.equal(lens, seen["fa3"])
    assert 9 <= int(lens.min()) and int(lens.max()) <= 48 and int(lens.max()) - int(lens.min()) > 20
    assert all(r["spread"] == 40 and r["mean_context"] == round(lens.float().mean().item()) for r in res)
    assert all(r["max_abs_diff_vs_paged_fa3"] <= 1e-2 for r in res)
    md = K.markdown({"gpu": "G", "driver": "d", "torch": "t", "vllm": "v", "commit": "c", "date": "x",
                     "splits": [0], "results": res})
    assert f"| 16 x 48 (9-48, mean {res[0]['mean_context']}) | 64 | per_layer |" in md
    # the default stays a decode batch's last tokens; a spread past the context is clipped to it
    K.run_shape(4, 48, 64, [0], ["per_layer"], device="cpu", timer=lambda fn: (fn(), 0.5)[1],
                paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3)
    assert int(seen["paged"].min()) > 48 - 12
    res = K.run_shape(4, 48, 64, [0], ["per_layer"], device="cpu", timer=lambda fn: (fn(), 0.5)[1],
                      paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3, spread=500)
    assert res[0]["spread"] == 47 and int(seen["paged"].min()) >= 1
    with pytest.raises(ValueError, match="spread -1"):
        K.run_shape(4, 48, 64, [0], ["per_layer"], device="cpu", paged_kernel=paged, spread=-1)


def test_longest_first_runs_fa2_over_the_sorted_batch_and_scatters_its_output_back():
    """--longest-first: FA2 gets the batch sorted by length, longest first (rows and lengths in that
    order, the query gathered), and the output lands back in each sequence's own place, so it still
    agrees with paged FA3's; the kernel alone is timed too, and the table shows the variant as a layout."""
    import torch

    from vllm_vattention.attention import ops

    calls = []

    def paged(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k, softmax_scale, causal, block_table, out, fa_version):
        k_rows = k_cache[block_table.long()].flatten(1, 2)
        v_rows = v_cache[block_table.long()].flatten(1, 2)
        rows = torch.arange(q.shape[0], dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_q, seqused_k, rows, softmax_scale))

    def fa2(q, k_rows, v_rows, out, seq_lens, rows, scale, num_splits=0):
        calls.append((seq_lens.clone(), rows.clone()))
        cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu, seq_lens, rows, scale))

    def fa3(q, k_rows, v_rows, out, cu_seqlens_q, seq_lens, rows, max_query_len, scale):
        out.copy_(ops.reference_attention(q, k_rows, v_rows, cu_seqlens_q, seq_lens, rows, scale))

    res = K.run_shape(12, 48, 64, [0, 2], ["per_layer"], device="cpu", timer=lambda fn: (fn(), 0.5)[1],
                      paged_kernel=paged, fa2_kernel=fa2, fa3_kernel=fa3, spread=40, longest_first=True)
    assert [(r["layout"], r["system"], r["num_splits"]) for r in res] == [
        ("paged", "paged-fa3", None), ("per_layer", "fa2", 0), ("per_layer", "fa2", 2),
        ("per_layer, longest first", "fa2", 0), ("per_layer, longest first", "fa2", 2), ("per_layer", "fa3-rows", None)]
    as_drawn_lens, as_drawn_rows = calls[0]
    sorted_lens, sorted_rows = calls[-1]
    assert not torch.equal(as_drawn_lens, sorted_lens)  # (12 draws from 40 lengths: not already sorted)
    assert sorted_lens.tolist() == sorted(as_drawn_lens.tolist(), reverse=True)
    # each sequence keeps its own row: the pairs are the same, in another order
    assert sorted(zip(sorted_lens.tolist(), sorted_rows.tolist())) == sorted(zip(as_drawn_lens.tolist(), as_drawn_rows.tolist()))
    assert all(r["max_abs_diff_vs_paged_fa3"] <= 1e-2 for r in res)
    assert [r.get("kernel_ms") for r in res if "longest" in r["layout"]] == [0.5, 0.5]
    md = K.markdown({"gpu": "G", "driver": "d", "torch": "t", "vllm": "v", "commit": "c", "date": "x",
                     "splits": [0, 2], "results": res})
    assert "| per_layer, longest first | 0.5000 | 0.5000 | 0 | 0.5000 | 1.000x | 1.000x | - | - |" in md
