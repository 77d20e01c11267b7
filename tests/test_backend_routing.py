"""The metadata builder's routing of a batch to the kernels (VattnMetadataBuilder._build), on a CPU:
which requests run FA2 and which FA3, FA3's query offsets and both views' row lengths, for each
VATTN_DECODE_KERNEL, on a decode batch (CUDA-graph replay: whole rows) and a mixed one (eager)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_vattention.attention import backend, ops
from vllm_vattention.attention.backend import VattnMetadataBuilder
from vllm_vattention.config import VattnConfig

ROW_LEN = 4096


SHAPE = (32, 8, 128, torch.bfloat16)  # query heads, KV heads, head size, dtype


def builder(decode_kernel: str, mixed: str | None = None, **cfg) -> VattnMetadataBuilder:
    """mixed: the rule the model runner set for the step (ops.plan_reads), else the builder's own."""
    b = object.__new__(VattnMetadataBuilder)  # (its __init__ needs vLLM's config objects)
    cfg.setdefault("fa3_schedule", True)
    b.cfg, b.row_len, b.build_seconds = VattnConfig(decode_kernel=decode_kernel, **cfg), ROW_LEN, 0.0
    b.mixed_kernel = mixed or ops.mixed_rule(decode_kernel)
    b.fa3_shape, b.schedules = SHAPE, []
    # (VATTN_FA2_ORDER=longest-first's buffers, as __init__ makes them for max_num_seqs requests)
    b._order_bufs = backend._order_buffers(16, "cpu") if b.cfg.fa2_order == "longest-first" else None

    def scheduler(*args):  # ops.fa3_schedule's arguments, recorded; a tensor the forward can be told apart by
        b.schedules.append(args)
        return torch.full((5,), len(b.schedules), dtype=torch.int32)
    b.fa3_scheduler = scheduler
    return b


def batch(query_lens: list[int], seq_lens: list[int]) -> SimpleNamespace:
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    n = len(query_lens)
    return SimpleNamespace(num_reqs=n, num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens),
                           max_seq_len=max(seq_lens), query_start_loc=qsl, query_start_loc_cpu=qsl,
                           seq_lens=seq, seq_lens_cpu_upper_bound=seq, slot_mapping=torch.zeros(int(qsl[-1])),
                           block_table_tensor=torch.arange(10, 10 + n, dtype=torch.int32).view(n, 1))


MIXED = ([1, 1, 64], [1000, 2000, 600])  # two decodes (vLLM puts them first), then a 64-token prefill chunk


@pytest.mark.parametrize("kernel, mixed, decodes, fa3_qsl", [
    ("fa2", None, 2, [0, 64]),  # FA2 for the decodes, FA3 for the prefill (its offsets from 0)
    ("fa3", None, 0, [0, 1, 2, 66]),  # everything in FA3
    # one FA3 launch for the whole mixed batch, when the model runner found every decode row guarded
    ("fa2-graphs", "fa2-graphs", 0, [0, 1, 2, 66]),
    ("fa2-graphs", None, 2, [0, 64]),  # else (and unless told) as fa2: decode rows need no guard
])
def test_a_mixed_batch(kernel, mixed, decodes, fa3_qsl):
    m = batch(*MIXED)
    md = builder(kernel, mixed)._build(m)
    assert md.num_decodes == decodes and md.prefill_query_start_loc.tolist() == fa3_qsl
    assert md.rows.tolist() == [10, 11, 12]
    assert md.kv_len == 2304  # the longest sequence + the guard (256), to 256: rows sliced (eager)
    # the clipped FA3 view: its longest sequence (a decode's, when decodes run in FA3)
    assert md.fa3_kv_len == (600 if decodes else 2000)
    # FA3's offsets: the batch's own tensor when FA3's part starts at the batch's start (no kernel to
    # subtract an offset), a new one otherwise
    assert (md.prefill_query_start_loc.data_ptr() == m.query_start_loc.data_ptr()) == (decodes == 0)


@pytest.mark.parametrize("kernel, decodes", [("fa2", 3), ("fa2-graphs", 3), ("fa3", 0)])
def test_a_decode_batch_runs_whole_rows(kernel, decodes):
    """A decode-only batch may be a CUDA-graph replay: whole rows, and fa2-graphs runs FA2 like fa2."""
    md = builder(kernel)._build(batch([1, 1, 1], [1000, 2000, 600]))
    assert md.num_decodes == decodes and md.kv_len == ROW_LEN and md.fa3_kv_len == ROW_LEN
    assert (md.prefill_query_start_loc is None) == bool(decodes)


@pytest.mark.parametrize("kernel", ["fa2", "fa3", "fa2-graphs"])
def test_a_mixed_batch_schedules_fa3_once_for_every_layer(kernel):
    """FA3's scheduler metadata is computed in build (once per step) from exactly what the layers'
    FA3 call gets: its part's offsets and lengths, the batch's longest query, the view's row length."""
    b = builder(kernel)
    md = b._build(batch(*MIXED))
    assert len(b.schedules) == 1
    qsl, seq_lens, max_q, kv_len, *shape = b.schedules[0]
    assert qsl is md.prefill_query_start_loc and seq_lens.tolist() == md.prefill_seq_lens.tolist()
    assert max_q == md.max_query_len == 64 and kv_len == md.fa3_kv_len and tuple(shape) == SHAPE
    assert md.fa3_schedule.tolist() == [1] * 5


@pytest.mark.parametrize("kernel", ["fa2", "fa3", "fa2-graphs"])
def test_no_schedule_for_decode_batches_or_when_turned_off(kernel):
    """Decode batches may be CUDA-graph replays (FA3 there keeps its own scheduling); and
    VATTN_FA3_SCHEDULE=0 leaves FA3 to schedule in each call."""
    b = builder(kernel)
    assert b._build(batch([1, 1, 1], [1000, 2000, 600])).fa3_schedule is None
    off = builder(kernel, fa3_schedule=False)
    assert off._build(batch(*MIXED)).fa3_schedule is None
    assert b.schedules == [] and off.schedules == []


def test_forward_hands_every_layer_the_steps_schedule(monkeypatch):
    """Each layer's FA3 call gets the step's schedule (the same tensor); FA2's decodes get none."""
    from vllm_vattention.attention import backend, ops
    calls = {"fa3": [], "fa2": 0}
    monkeypatch.setattr(ops, "write_kv", lambda *a, **k: None)
    monkeypatch.setattr(ops, "fa3_varlen", lambda *a, schedule=None, **k: calls["fa3"].append(schedule))

    def fa2(*a, **k):
        calls["fa2"] += 1
    monkeypatch.setattr(ops, "fa2_decode", fa2)
    md = builder("fa2")._build(batch(*MIXED))
    impl = backend.VattnImpl(32, 128, 0.088, num_kv_heads=8)
    n, kv = md.num_actual_tokens, torch.zeros(2, 16, ROW_LEN, 1, 1)  # (the kernels are stand-ins)
    for _ in range(3):  # three layers
        impl.forward(None, torch.zeros(n, 32 * 128), None, None, kv, md, torch.zeros(n, 32 * 128))
    assert calls["fa2"] == 3 and len(calls["fa3"]) == 3
    assert all(s is md.fa3_schedule for s in calls["fa3"])


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


def test_forward_hands_the_kernels_the_views_slicing_gives_and_makes_the_kv_views_once(monkeypatch):
    """What reaches the three kernels (ops._KERNELS, stood in for) is what slicing each call gave
    before NOTES #103: FA2 the decodes' queries and outputs as [nd, 1, heads, head_size] and K/V
    rows cut to kv_len; FA3 the rest and rows cut to fa3_kv_len. The K/V views are made once per
    layer and length: the same objects at the next call, new ones when the length or the layer's
    cache tensor changes."""
    from vllm_vattention.attention import backend, ops
    got = []
    monkeypatch.setattr(ops, "_KERNELS", (lambda *a: got.append(("fa2", a)), lambda *a: got.append(("fa3", a)) or [a[6]],
                                          lambda *a: got.append(("write", a))))
    h, kvh, d = 4, 2, 8
    md = builder("fa2")._build(batch(*MIXED))  # two decodes, a 64-token chunk
    n, nd = md.num_actual_tokens, md.num_decodes
    impl = backend.VattnImpl(h, d, 0.1, num_kv_heads=kvh)
    kv = torch.zeros(2, 16, ROW_LEN, kvh, d)
    q, out = torch.randn(n + 6, h * d), torch.zeros(n + 6, h * d)  # padded past n, as a graph size may be
    key = torch.randn(n + 6, kvh, d)
    impl.forward(None, q, key, key, kv, md, out)
    (w, wa), (f2, a2), (f3, a3) = got
    assert (w, f2, f3) == ("write", "fa2", "fa3")
    assert _same_view(wa[0], key[:n]) and _same_view(wa[2], kv[0]) and _same_view(wa[3], kv[1])
    assert _same_view(a2[0], q[:nd].view(nd, 1, h, d)) and _same_view(a2[12], out[:nd].view(nd, 1, h, d))
    assert _same_view(a2[1], kv[0][:, :md.kv_len]) and _same_view(a2[2], kv[1][:, :md.kv_len])
    assert _same_view(a3[0], q[nd:n].view(n - nd, h, d)) and _same_view(a3[6], out[nd:n].view(n - nd, h, d))
    assert _same_view(a3[1], kv[0][:, :md.fa3_kv_len]) and _same_view(a3[2], kv[1][:, :md.fa3_kv_len])
    assert md.kv_len != md.fa3_kv_len  # (two different views)
    got.clear()
    impl.forward(None, q, key, key, kv, md, out)  # the next layer call: the same K/V view objects
    assert got[1][1][1] is a2[1] and got[2][1][2] is a3[2]
    longer = builder("fa2")._build(batch([1, 1, 64], [1000, 2400, 1900]))  # kv_len moves on
    got.clear()
    impl.forward(None, q, key, key, kv, longer, out)
    assert longer.kv_len > md.kv_len and _same_view(got[1][1][1], kv[0][:, :longer.kv_len])
    assert _same_view(got[2][1][1], kv[0][:, :longer.fa3_kv_len])
    kv2 = torch.zeros_like(kv)  # another cache tensor: views over it
    got.clear()
    impl.forward(None, q, key, key, kv2, longer, out)
    assert _same_view(got[1][1][1], kv2[0][:, :longer.kv_len]) and _same_view(got[0][1][2], kv2[0])


def test_a_long_decode_step_outside_a_full_graph_runs_fa3_with_its_view_clipped_to_the_longest_row():
    """VATTN_FA3_DECODE_TOKENS (NOTES #128, #129): when the model runner found a decode-only step long
    enough (decode_fa3), the builder routes the whole batch to FA3, as decode_kernel fa3 does. The
    step runs eagerly, so with VATTN_FA3_GUARD=clipped FA3's view ends at the longest row (the
    extents ops.plan_reads gave the memory manager); with =always it spans whole rows. The next step
    is FA2 again unless told."""
    b = builder("fa2-graphs")
    b.decode_fa3 = True
    m = batch([1, 1, 1], [1000, 2000, 600])
    md = b._build(m)
    assert md.num_decodes == 0 and md.prefill_query_start_loc is m.query_start_loc
    assert md.kv_len == ROW_LEN and md.fa3_kv_len == 2000 and md.fa3_schedule is None
    seq, q = np.array([1000, 2000, 600]), np.ones(3, dtype=np.int64)
    _, _, ext = ops.plan_reads(seq, q, "fa2-graphs", 256, ROW_LEN, np.arange(3), None, clip_to_view=True,
                               long_decode=True)
    assert ext.max() == md.fa3_kv_len  # (no row is read past what the manager was asked to map)
    always = builder("fa2-graphs", fa3_guard="always")
    always.decode_fa3 = True
    assert always._build(m).fa3_kv_len == ROW_LEN
    b.decode_fa3 = False
    assert builder("fa2-graphs")._build(m).num_decodes == 3 and b._build(m).num_decodes == 3


def test_longest_first_sorts_the_fa2_part_into_the_same_buffers_at_every_step():
    """VATTN_FA2_ORDER=longest-first (NOTES #138): the FA2 part's order is the sequences longest first
    (ties in vLLM's order), with each sequence's own row beside its length; two steps of one batch size
    get the same tensors (a full CUDA graph captured over the first reads the second's), and the
    default leaves FA2 the batch as vLLM ordered it."""
    b = builder("fa2-graphs", fa2_order="longest-first")
    md = b._build(batch([1, 1, 1, 1], [1000, 2000, 600, 2000]))
    assert md.num_decodes == 4
    assert md.decode_perm.tolist() == [1, 3, 0, 2]
    assert md.decode_seq_lens.tolist() == [2000, 2000, 1000, 600] and md.decode_rows.tolist() == [11, 13, 10, 12]
    first = [t.data_ptr() for t in (md.decode_perm, md.decode_seq_lens, md.decode_rows)]
    md2 = b._build(batch([1, 1, 1, 1], [5, 7, 900, 6]))
    assert md2.decode_perm.tolist() == [2, 1, 3, 0] and md2.decode_rows.tolist() == [12, 11, 13, 10]
    assert [t.data_ptr() for t in (md2.decode_perm, md2.decode_seq_lens, md2.decode_rows)] == first
    # a mixed batch run as fa2 (decodes in FA2): only its FA2 part is ordered
    mixed = builder("fa2", fa2_order="longest-first")._build(batch(*MIXED))
    assert mixed.num_decodes == 2 and mixed.decode_perm.tolist() == [1, 0] and mixed.decode_rows.tolist() == [11, 10]
    assert mixed.prefill_rows.tolist() == [12]
    plain = builder("fa2-graphs")._build(batch([1, 1, 1], [1000, 2000, 600]))
    assert plain.decode_perm is None and plain.decode_rows.tolist() == [10, 11, 12]
    # a batch larger than the buffers (made for max_num_seqs or the largest graph) is an error, not new buffers
    with pytest.raises(AssertionError, match="a batch of 17 requests, over the 16"):
        b._build(batch([1] * 17, list(range(100, 117))))


def test_longest_first_gives_every_sequence_its_own_attention_output(monkeypatch):
    """The forward gathers the queries into the step's order, runs FA2 there and scatters the output
    back: each sequence's output is what the batch as vLLM ordered it gives (float32 reference kernel
    standing in for FA2, over rows of different lengths)."""
    from vllm_vattention.attention import backend, ops
    monkeypatch.setattr(ops, "write_kv", lambda *a, **k: None)

    def fa2(q, k_rows, v_rows, out, seq_lens, rows, scale, num_splits=0):
        cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        out.copy_(ops.reference_attention(q.squeeze(1), k_rows, v_rows, cu, seq_lens, rows, scale).unsqueeze(1))
    monkeypatch.setattr(ops, "fa2_decode", fa2)
    h, kvh, d, n = 4, 2, 8, 5
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 16, ROW_LEN, kvh, d, generator=g)
    q = torch.randn(n, h * d, generator=g)
    lens = [30, 700, 5, 700, 64]
    outs = {}
    for order in ("as-is", "longest-first"):
        md = builder("fa2-graphs", fa2_order=order)._build(batch([1] * n, lens))
        out = torch.zeros(n, h * d)
        backend.VattnImpl(h, d, 0.3, num_kv_heads=kvh).forward(None, q, None, None, kv, md, out)
        outs[order] = out
    assert outs["as-is"].abs().sum() > 0
    torch.testing.assert_close(outs["longest-first"], outs["as-is"])
