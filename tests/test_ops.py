import numpy as np

from vllm_vattention.attention import ops


def test_fa2_decode_rows_need_no_guard_fa3_rows_do():
    q = np.array([1, 1, 5, 300])
    seq = np.array([17, 1000, 5, 4000])
    fa3, ext = ops.read_extents(seq, q, "fa2", guard_tokens=256, row_len=4096)
    assert fa3.tolist() == [False, False, True, True]
    assert ext.tolist() == [17, 1000, 261, 4096]  # clipped to the row
    fa3, ext = ops.read_extents(seq, q, "fa3", guard_tokens=256, row_len=4096)
    assert fa3.all() and ext.tolist() == [273, 1256, 261, 4096]


def test_clipped_guard_spares_the_longest_fa3_row_and_clips_the_others():
    q = np.array([1, 1, 5, 300, 40])
    seq = np.array([17, 5000, 700, 1200, 1190])
    assert ops.fa3_view_len(seq, q, ops.fa3_mask(q, "fa2")) == 1200
    fa3, ext = ops.read_extents(seq, q, "fa2", guard_tokens=256, row_len=8192, clip_to_view=True)
    assert fa3.tolist() == [False, False, True, True, True]
    # decode rows (FA2) unchanged; longest FA3 row: no guard; the others: up to the view's end
    assert ext.tolist() == [17, 5000, 956, 1200, 1200]
    _, plain = ops.read_extents(seq, q, "fa2", guard_tokens=256, row_len=8192)
    assert plain.tolist() == [17, 5000, 956, 1456, 1446]


def test_decode_only_batches_are_never_clipped():
    q = np.array([1, 1, 1])
    seq = np.array([10, 20, 30])
    assert ops.fa3_view_len(seq, q, ops.fa3_mask(q, "fa3")) is None  # CUDA graphs replay whole rows
    _, ext = ops.read_extents(seq, q, "fa3", guard_tokens=256, row_len=4096, clip_to_view=True)
    assert ext.tolist() == [266, 276, 286]


def test_fa2_graphs_runs_a_mixed_batch_all_in_fa3_and_a_decode_batch_all_in_fa2():
    """VATTN_DECODE_KERNEL=fa2-graphs: one FA3 launch per layer for a batch with any prefill (its
    decode rows then get FA3's guard), FA2 alone for a decode-only batch (no guard)."""
    seq, q = np.array([1000, 2000, 600]), np.array([1, 1, 64])
    fa3, ext = ops.read_extents(seq, q, "fa2-graphs", guard_tokens=256, row_len=4096)
    assert fa3.tolist() == [True, True, True] and ext.tolist() == [1256, 2256, 856]
    # clipped: the view ends at the longest FA3 sequence (a decode's here), which needs no guard
    fa3, ext = ops.read_extents(seq, q, "fa2-graphs", guard_tokens=256, row_len=4096, clip_to_view=True)
    assert ext.tolist() == [1256, 2000, 856]
    decode = np.array([1, 1, 1])
    fa3, ext = ops.read_extents(seq, decode, "fa2-graphs", guard_tokens=256, row_len=4096)
    assert fa3.tolist() == [False, False, False] and ext.tolist() == seq.tolist()


def test_plan_reads_runs_fa2_graphs_mixed_batch_as_one_launch_only_when_no_guard_needs_the_zero_page():
    """ops.plan_reads (NOTES #110, #112): fa2-graphs' one FA3 launch for a mixed batch needs every
    decode row readable up to its FA3 extent (guards_ready) and the prefill rows' guard slots all
    spares (guards_fit); each is asked about exactly its rows and extents, and when either says no,
    the step runs under fa2's rule (decode rows read only their tokens)."""
    seq, q, rows = np.array([1000, 2000, 600]), np.array([1, 1, 64]), np.array([7, 3, 5])
    asked = []

    class Guards:
        def __init__(self, ready, fit):
            self.ready, self.fit = ready, fit

        def guards_ready(self, r, ext):
            asked.append(("ready", r.tolist(), ext.tolist()))
            return self.ready

        def guards_fit(self, r, ext):
            asked.append(("fit", r.tolist(), ext.tolist()))
            return self.fit

    rule, fa3, ext = ops.plan_reads(seq, q, "fa2-graphs", 256, 4096, rows, Guards(True, True))
    assert rule == "fa2-graphs" and fa3.all() and ext.tolist() == [1256, 2256, 856]
    assert asked == [("ready", [7, 3], [1256, 2256]), ("fit", [5], [856])]
    two = ("fa2", *(a.tolist() for a in ops.read_extents(seq, q, "fa2", 256, 4096, clip_to_view=True)))
    for ready, fit in ((False, True), (True, False)):
        asked.clear()
        rule, fa3, ext = ops.plan_reads(seq, q, "fa2-graphs", 256, 4096, rows, Guards(ready, fit), clip_to_view=True)
        assert rule == "fa2" and fa3.tolist() == [False, False, True] and ext.tolist() == [1000, 2000, 600]
        assert (rule, fa3.tolist(), ext.tolist()) == two
        # clipped to the view of the one launch (the decodes' longest row: 2000), the prefill row's
        # guard is what the decodes lengthen: 856, where under fa2's rule it reads 600 and no guard
        assert asked[-1] == (("fit", [5], [856]) if ready else ("ready", [7, 3], [1256, 2000]))
    assert ops.mixed_rule("fa2-graphs") == "fa2" and ops.mixed_rule("fa3") == "fa3"
    # nothing to ask: decode-only (FA2, CUDA graphs) and prefill-only batches, and the other kernels
    asked.clear()
    for kernel, qs in (("fa2-graphs", np.array([1, 1, 1])), ("fa2-graphs", np.array([5, 9, 64])),
                       ("fa2", q), ("fa3", q)):
        rule, fa3, ext = ops.plan_reads(seq, qs, kernel, 256, 4096, rows, Guards(False, False))
        want = ops.read_extents(seq, qs, kernel, 256, 4096)
        assert rule == kernel and fa3.tolist() == want[0].tolist() and ext.tolist() == want[1].tolist()
    assert asked == []


def test_long_decode_counts_the_contexts_of_a_decode_only_step():
    """VATTN_FA3_DECODE_TOKENS: a step is a long decode when every request has one new token and
    their contexts (computed tokens + the new one) add up to the threshold; 0 turns it off."""
    from vllm_vattention.attention.ops import long_decode
    assert long_decode([1] * 64, [8300] * 64, 450_000)  # 8192-in-256-out's decode steps: 531K tokens
    assert not long_decode([1] * 24, [16400] * 24, 450_000)  # 16K decode: 394K
    assert not long_decode([1, 1, 7], [300_000, 300_000, 10], 450_000)  # a prefill chunk in the step
    assert long_decode([1, 1], [99, 100], 201) and not long_decode([1, 1], [99, 99], 201)
    assert not long_decode([], [], 1) and not long_decode([1] * 64, [8300] * 64, 0)
    # VATTN_FA3_DECODE_ROW_TOKENS (NOTES #134): the contexts must also average this many per request
    assert long_decode([1] * 64, [8300] * 64, 450_000, 6144)
    assert not long_decode([1] * 256, [2200] * 256, 450_000, 6144)  # 563K tokens of ~2.2K rows: FA2's
    assert long_decode([1] * 256, [2200] * 256, 450_000)  # (without the average it would be long)
    assert long_decode([1, 1], [6142, 6144], 1, 6144) and not long_decode([1, 1], [6141, 6144], 1, 6144)


def test_plan_reads_runs_a_long_decode_step_in_fa3_with_its_view_clipped():
    """long_decode (VATTN_FA3_DECODE_TOKENS, NOTES #128, #129): a decode-only step runs FA3 over every
    row ("fa3"), guards in place or not (the caller maps what is missing), each row read up to its
    seq + the guard, clipped to the longest row with clip_to_view (the step runs eagerly), whole
    guards without; a batch with a prefill chunk is planned as without long_decode."""
    seq, rows = np.array([1000, 2000]), np.array([7, 3])

    class Guards:
        def __init__(self, ready):
            self.ready = ready

        def guards_ready(self, r, ext):
            return self.ready

        def guards_fit(self, r, ext):
            return True

    q = np.array([1, 1])
    for ready in (True, False):
        rule, fa3, ext = ops.plan_reads(seq, q, "fa2-graphs", 256, 4096, rows, Guards(ready), clip_to_view=True,
                                        long_decode=True)
        assert (rule, fa3.tolist(), ext.tolist()) == ("fa3", [True, True], [1256, 2000])
    rule, fa3, ext = ops.plan_reads(seq, q, "fa2-graphs", 256, 4096, rows, Guards(False), long_decode=True)
    assert (rule, fa3.tolist(), ext.tolist()) == ("fa3", [True, True], [1256, 2256])
    rule, _, ext = ops.plan_reads(seq, q, "fa2-graphs", 256, 4096, rows, Guards(True), clip_to_view=True)
    assert rule == "fa2-graphs" and ext.tolist() == [1000, 2000]  # not long: FA2, no guard
    rule, _, _ = ops.plan_reads(seq, np.array([1, 9]), "fa2-graphs", 256, 4096, rows, Guards(True),
                                long_decode=True)  # a chunk in the step: the mixed-batch rule
    assert rule == "fa2-graphs"
    # the view is narrowed only for a decode-only batch known to run eagerly
    assert ops.fa3_view_len(seq, q, np.array([True, True])) is None
    assert ops.fa3_view_len(seq, q, np.array([True, True]), eager=True) == 2000
