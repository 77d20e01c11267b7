"""The metadata builder's routing of a batch to the kernels (VattnMetadataBuilder._build), on a CPU:
which requests run FA2 and which FA3, FA3's query offsets and both views' row lengths, for each
VATTN_DECODE_KERNEL, on a decode batch (CUDA-graph replay: whole rows) and a mixed one (eager)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_vattention.attention.backend import VattnMetadataBuilder
from vllm_vattention.config import VattnConfig

ROW_LEN = 4096


def builder(decode_kernel: str) -> VattnMetadataBuilder:
    b = object.__new__(VattnMetadataBuilder)  # (its __init__ needs vLLM's config objects)
    b.cfg, b.row_len, b.build_seconds = VattnConfig(decode_kernel=decode_kernel), ROW_LEN, 0.0
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


@pytest.mark.parametrize("kernel, decodes, fa3_qsl", [
    ("fa2", 2, [0, 64]),  # FA2 for the decodes, FA3 for the prefill (its offsets from 0)
    ("fa3", 0, [0, 1, 2, 66]),  # everything in FA3
    ("fa2-graphs", 0, [0, 1, 2, 66]),  # one FA3 launch for the whole mixed batch
])
def test_a_mixed_batch(kernel, decodes, fa3_qsl):
    m = batch(*MIXED)
    md = builder(kernel)._build(m)
    assert md.num_decodes == decodes and md.prefill_query_start_loc.tolist() == fa3_qsl
    assert md.rows.tolist() == [10, 11, 12]
    assert md.kv_len == 2304  # the longest sequence + the guard (256), to 256: rows sliced (eager)
    # the clipped FA3 view: its longest sequence (a decode's, when decodes run in FA3)
    assert md.fa3_kv_len == (600 if kernel == "fa2" else 2000)
    # FA3's offsets: the batch's own tensor when FA3's part starts at the batch's start (no kernel to
    # subtract an offset), a new one otherwise
    assert (md.prefill_query_start_loc.data_ptr() == m.query_start_loc.data_ptr()) == (decodes == 0)


@pytest.mark.parametrize("kernel, decodes", [("fa2", 3), ("fa2-graphs", 3), ("fa3", 0)])
def test_a_decode_batch_runs_whole_rows(kernel, decodes):
    """A decode-only batch may be a CUDA-graph replay: whole rows, and fa2-graphs runs FA2 like fa2."""
    md = builder(kernel)._build(batch([1, 1, 1], [1000, 2000, 600]))
    assert md.num_decodes == decodes and md.kv_len == ROW_LEN and md.fa3_kv_len == ROW_LEN
    assert (md.prefill_query_start_loc is None) == bool(decodes)
