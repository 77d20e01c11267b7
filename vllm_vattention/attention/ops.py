"""Stock, non-paged FlashAttention kernels over contiguous KV rows (the ops inside the vLLM wheel).

Shapes (all on the GPU, fp16 or bf16 unless said):
- q: [num_tokens, num_heads, head_size], tokens of request i at [cu_seqlens_q[i], cu_seqlens_q[i+1])
- k_rows, v_rows: [rows, row_len, num_kv_heads, head_size], last stride 1, any other strides
- rows: int32 [num_reqs], the row of each request; seq_lens: int32 [num_reqs], KV tokens to attend
- out: like q, written in place

Which kernel reads what (DESIGN.md, re-measured by tests/gpu): FA2 `fwd_kvcache` never reads
past `seq_lens`; FA3 `fwd` with `kv_batch_idx` reads whole key tiles, up to one tile (<= 192
tokens for head sizes we accept) past each sequence's end, clipped to `row_len`. The caller keeps
those tokens readable (`read_extents`).
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np
import torch

FA3_MAX_OVERREAD = 192  # tokens; FA3's largest key tile for head sizes <= 256


_KERNELS: tuple | None = None


def _kernels() -> tuple:
    """(FA2 fwd_kvcache, FA3 fwd, reshape_and_cache_flash): the wheel's ops, looked up once. Every
    layer of every eager step calls them, and the per-call imports and op-namespace lookups were a
    part of our forward's CPU time (benchmarks/NOTES.md #103)."""
    global _KERNELS
    if _KERNELS is None:
        import vllm._custom_ops  # noqa: F401  (loads _C_cache_ops)
        import vllm.vllm_flash_attn  # noqa: F401  (loads _vllm_fa2_C and _vllm_fa3_C)
        _KERNELS = (torch.ops._vllm_fa2_C.fwd_kvcache, torch.ops._vllm_fa3_C.fwd,
                    torch.ops._C_cache_ops.reshape_and_cache_flash)
    return _KERNELS


def fa3_mask(query_lens: np.ndarray, decode_kernel: str) -> np.ndarray:
    """Which requests run FA3. fa2: single-token queries go to FA2 (it reads nothing past the
    sequence, so those rows need no guard), everything else to FA3. fa3: all. fa2-graphs: a batch of
    single-token queries only (a decode step, replayed from a CUDA graph) all FA2, any other batch
    all FA3 (one launch per layer; its decode rows need FA3's guard)."""
    one = query_lens == 1
    if decode_kernel == "fa2":
        return ~one
    if decode_kernel == "fa2-graphs":
        return np.full(len(query_lens), not one.all(), dtype=bool)
    return np.ones(len(query_lens), dtype=bool)


def fa3_view_len(seq_lens: np.ndarray, query_lens: np.ndarray, fa3: np.ndarray,
                 eager: bool = False) -> int | None:
    """With VATTN_FA3_GUARD=clipped: the row length of the FA3 view of a batch that has a prefill
    (the longest FA3 sequence), or None where the view cannot be narrowed (no prefill: decode-only
    batches replay CUDA graphs over whole rows). `fa3`: the batch's `fa3_mask`. eager: a decode-only
    batch known to run outside a full CUDA graph (VATTN_FA3_DECODE_TOKENS' long decode steps), whose
    view is narrowed as a prefill's."""
    if not fa3.any() or not (eager or (query_lens > 1).any()):
        return None
    return int(seq_lens[fa3].max())


def read_extents(seq_lens: np.ndarray, query_lens: np.ndarray, decode_kernel: str, guard_tokens: int,
                 row_len: int, clip_to_view: bool = False, eager: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(FA3 mask, tokens of each row the step may read: the sequence, plus FA3's over-read).

    clip_to_view (VATTN_FA3_GUARD=clipped): FA3 loads K/V tiles with TMA against the view's shape,
    so nothing past the view's row length (`fa3_view_len`) is read: the longest FA3 row needs no
    guard, the others only up to that length. Checked on an H200 under compute-sanitizer
    (tests/gpu/test_kernels_gpu.py -k clipped: no read past the view). eager: as fa3_view_len's.
    """
    fa3 = fa3_mask(query_lens, decode_kernel)
    ext = np.minimum(seq_lens + np.where(fa3, guard_tokens, 0), row_len)
    view = fa3_view_len(seq_lens, query_lens, fa3, eager) if clip_to_view else None
    if view is not None:
        ext = np.where(fa3, np.minimum(ext, view), ext)
    return fa3, ext


class Guards(Protocol):
    """What plan_reads asks of the memory manager (memory.KVMemoryManager) about rows and extents."""

    def guards_ready(self, rows: np.ndarray, num_tokens: np.ndarray) -> bool: ...

    def guards_fit(self, rows: np.ndarray, num_tokens: np.ndarray) -> bool: ...


def plan_reads(seq_lens: np.ndarray, query_lens: np.ndarray, decode_kernel: str, guard_tokens: int,
               row_len: int, rows: np.ndarray, guards: Guards, clip_to_view: bool = False,
               long_decode: bool = False) -> tuple[str, np.ndarray, np.ndarray]:
    """(the kernel rule the step runs under, its FA3 mask, each row's read extent): read_extents,
    except that fa2-graphs runs a mixed batch as one FA3 launch only where no guard would be mapped
    on the step's path but spare frames: `guards` (the memory manager) says that every decode row of
    `rows` is readable up to its extent already (guards_ready: its guard extended in the background,
    guard_ahead), and that the prefill rows' guard slots, which the decodes may lengthen (the clipped
    view ends at the launch's longest row), can all be spares (guards_fit). Otherwise the step runs
    under fa2's rule (FA2 for the decodes, whose rows then need no guard), so that no guard is the
    zero page: a row that grows into a zero-page slot a step in flight over-reads must wait for that
    step before the unmap (NOTES #110, #112). The metadata builder must build the step under the
    same rule (worker.prepare_attn tells it).

    long_decode (VATTN_FA3_DECODE_TOKENS: a decode-only step outside a full CUDA graph, NOTES #128,
    #130): the rule is "fa3", FA3 over every row, its view narrowed to the longest row with
    clip_to_view (the step runs eagerly), so that a row needs a guard only up to the longest row's
    end. The guard slots not readable already are mapped on the step's path (spares, else the zero
    page), as with decode kernel fa3: #128 ran FA2 instead whenever a guard was missing, and on an
    H200 that was every step of 8192-in-256-out (guard extension is over its share of the spares
    with 64 rows)."""
    if long_decode and (query_lens == 1).all():
        fa3, ext = read_extents(seq_lens, query_lens, "fa3", guard_tokens, row_len, clip_to_view, eager=True)
        return "fa3", fa3, ext
    fa3, ext = read_extents(seq_lens, query_lens, decode_kernel, guard_tokens, row_len, clip_to_view)
    if decode_kernel != "fa2-graphs" or not fa3.any():
        return decode_kernel, fa3, ext
    decodes = query_lens == 1
    if not decodes.any() or (guards.guards_ready(rows[decodes], ext[decodes])
                             and guards.guards_fit(rows[~decodes], ext[~decodes])):
        return decode_kernel, fa3, ext
    fa3, ext = read_extents(seq_lens, query_lens, "fa2", guard_tokens, row_len, clip_to_view)
    return "fa2", fa3, ext


def long_decode(num_scheduled: Iterable[int], num_computed: Iterable[int], min_tokens: int,
                min_row_tokens: int = 0) -> bool:
    """VATTN_FA3_DECODE_TOKENS: is this step decode-only (one new token per request) with contexts
    adding up to at least `min_tokens` (0: never) and averaging at least `min_row_tokens` per request
    (VATTN_FA3_DECODE_ROW_TOKENS)? Such a step runs FA3 over the rows outside a full CUDA graph
    (worker.VattnModelRunner), where FA2's graph replay would read them slower (NOTES #122, #133).
    The average keeps out batches of many short rows: FA2 reads those faster, and each row shorter
    than the longest needs its whole guard mapped on the step's path, mostly the zero page (#134)."""
    if not min_tokens:
        return False
    total = n = 0
    for q, c in zip(num_scheduled, num_computed):
        if q != 1:
            return False
        total += c + 1
        n += 1
    return n > 0 and total >= min_tokens and total >= n * min_row_tokens


def is_mixed(query_lens: np.ndarray) -> bool:
    """A batch of decodes (one-token queries) beside prefill chunks: the steps in which plan_reads'
    rule matters (fa2-graphs: one FA3 launch or fa2's two)."""
    one = query_lens == 1
    return bool(one.any()) and not one.all()


def mixed_rule(decode_kernel: str) -> str:
    """The rule a mixed batch is built under when no step said otherwise (plan_reads): fa2-graphs'
    one launch needs every decode row guarded, which only plan_reads checks; fa2's needs nothing."""
    return "fa2" if decode_kernel == "fa2-graphs" else decode_kernel


class StepReads:
    """Each step's {row: block slots it may read} (for its fence: memory.KVMemoryManager.record_read_slots)
    from the rows and read extents in tokens. Most decode steps read the same slots as the step
    before (a row crosses into a new block every block_size tokens); then the last step's dict is
    handed on, not built again for every row of the batch (the mapper never changes it)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._last: tuple[np.ndarray, np.ndarray, dict[int, int]] | None = None

    def __call__(self, rows: np.ndarray, extents: np.ndarray) -> dict[int, int]:
        slots = -(-extents // self.block_size)
        last = self._last
        if last is not None and np.array_equal(last[0], rows) and np.array_equal(last[1], slots):
            return last[2]
        reads = dict(zip(rows.tolist(), slots.tolist()))
        self._last = (rows.copy(), slots, reads)
        return reads


def write_kv(key: torch.Tensor, value: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Store key/value [n, kv_heads, head_size] at slots row * row_len + position (-1: skip).

    vLLM's reshape_and_cache_flash with each row taken as one 'block' of row_len tokens; it reads the
    cache's block, token and head strides, so the interleaved views work as they are. The scales are
    unused with an unquantized cache ("auto"), but the op takes them: the backend passes the layer's
    own (`layer._k_scale`), so no tensor is made per layer and step (a fill kernel each, also inside
    decode CUDA graphs); without them (tests) ones are made here.
    """
    if k_scale is None or v_scale is None:
        k_scale = v_scale = torch.ones((), dtype=torch.float32, device=key.device)
    _kernels()[2](key, value, k_rows, v_rows, slot_mapping, "auto", k_scale, v_scale)


def fa3_schedule(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, kv_len: int,
                 num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> torch.Tensor:
    """FA3's scheduler metadata for one batch (tiles per request, dynamic split counts), computed
    once per step and passed to every layer's `fa3_varlen`, as stock vLLM's FLASH_ATTN builder does.
    Without it each layer's FA3 call allocates the metadata and launches its own prepare kernel.
    The arguments must be the ones fa3_varlen gets (`kv_len` is its views' row length,
    k_rows.shape[1]): FA3 checks only the metadata's size. Not for CUDA-graph replays (a fresh tensor
    each call)."""
    from vllm.vllm_flash_attn.flash_attn_interface import get_scheduler_metadata
    return get_scheduler_metadata(
        batch_size=cu_seqlens_q.shape[0] - 1, max_seqlen_q=max_query_len, max_seqlen_k=kv_len,
        num_heads_q=num_heads, num_heads_kv=num_kv_heads, headdim=head_size, cache_seqlens=seq_lens,
        qkv_dtype=dtype, cu_seqlens_q=cu_seqlens_q, page_size=None, causal=True, window_size=(-1, -1),
        num_splits=0)


def fa3_varlen(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, out: torch.Tensor,
               cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor,
               max_query_len: int, scale: float, causal: bool = True,
               schedule: torch.Tensor | None = None) -> torch.Tensor:
    """Mixed prefill + decode in one launch. k_rows.shape[1] is FA3's max_seqlen_k. `schedule`:
    `fa3_schedule` of the same batch (None: FA3 computes it in this call)."""
    return _kernels()[1](
        q, k_rows, v_rows, None, None, None, out,
        cu_seqlens_q, None, None, None, seq_lens,
        max_query_len, k_rows.shape[1], None, rows, None,
        None, None, None, None, None, None,
        scale, causal, -1, -1, 0.0, True, schedule, 0, None, 0, None, 1, 0, None)[0]


def fa2_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, out: torch.Tensor,
               seq_lens: torch.Tensor, rows: torch.Tensor, scale: float, num_splits: int = 0) -> torch.Tensor:
    """One query token per request: q and out [num_reqs, num_heads, head_size], or [num_reqs, 1,
    num_heads, head_size] as the kernel takes them (the backend's views: no reshape per call).
    num_splits: how many parts each sequence's keys are split into (0: FA2's heuristic, from the
    batch, heads and k_rows.shape[1]; VATTN_FA2_SPLITS)."""
    q4, out4 = (q, out) if q.dim() == 4 else (q.unsqueeze(1), out.unsqueeze(1))
    _kernels()[0](q4, k_rows, v_rows, None, None, seq_lens, None, None, rows,
                  None, None, None, out4, scale, True, -1, -1, 0.0, True, num_splits)
    return out


def reference_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """float32 causal attention, query tokens aligned to the end of each sequence (for tests)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    hq, hk = q.shape[1], k_rows.shape[2]
    cu, lens, rws = cu_seqlens_q.tolist(), seq_lens.tolist(), rows.tolist()
    for i, (row, n) in enumerate(zip(rws, lens)):
        qi = q[cu[i]:cu[i + 1]].float()
        ki = k_rows[row, :n].float().repeat_interleave(hq // hk, dim=1)
        vi = v_rows[row, :n].float().repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        ql = qi.shape[0]
        mask = torch.arange(n, device=q.device)[None, :] > (torch.arange(ql, device=q.device)[:, None] + n - ql)
        s.masked_fill_(mask[None], float("-inf"))
        out[cu[i]:cu[i + 1]] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vi)
    return out
