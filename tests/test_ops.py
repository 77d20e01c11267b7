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
