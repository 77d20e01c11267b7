"""The CUSTOM attention backend: contiguous KV rows, stock non-paged FlashAttention kernels.

The KV tensor each layer receives is [2, rows, row_len, kv_heads, head_size] (K and V views over
the virtual reservation). Kernels get, per request, its row and its sequence length; they never see
a block table. The model runner (worker.py) hands the rows as the first num_reqs entries of the (persistent,
contiguous) block-table buffer and the slots (row * row_len + position) in `slot_mapping`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from ..config import VattnConfig
from . import ops

SUPPORTED_HEAD_SIZES = [64, 80, 96, 112, 128, 160, 192, 256]


class _LayerKV:
    """One layer's KV cache as the kernels take it: its K and V rows, and each kernel's cut of them
    to a row length (kv_len changes every 256 tokens). Made once per layer and length rather than in
    each call (benchmarks/NOTES.md #103: tensor views were most of our forward's own CPU time in an
    eager step, 32 layers each)."""

    __slots__ = ("cache", "k", "v", "_cuts")

    def __init__(self, cache: torch.Tensor):
        self.cache = cache
        self.k, self.v = cache.unbind(0)
        self._cuts: dict[str, tuple] = {}  # kernel -> (length, K cut, V cut)

    def cut(self, kernel: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows cut to `length` tokens for `kernel`'s call, made again when the length changes."""
        c = self._cuts.get(kernel)
        if c is None or c[0] != length:
            k, v = self.k, self.v
            c = self._cuts[kernel] = (length, k, v) if length == k.shape[1] else (length, k[:, :length], v[:, :length])
        return c[1], c[2]


class VattnBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return VattnImpl

    @staticmethod
    def get_builder_cls():
        return VattnMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list:
        return [MultipleOf(1)]  # kernels never see blocks

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # What the bytes would be in vLLM's own layout; only used for sizing (we allocate ourselves).
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return SUPPORTED_HEAD_SIZES

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        from ..selection import geometry_of, vattn_block_size
        vllm_config = get_current_vllm_config()
        return vattn_block_size(VattnConfig.from_env(), geometry_of(vllm_config))

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8


@dataclass
class VattnMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    rows: torch.Tensor  # int32 [num_reqs]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    num_decodes: int  # leading requests (and tokens) with one query token that run FA2
    num_reqs: int
    prefill_query_start_loc: torch.Tensor | None  # int32, the FA3 part's cu_seqlens_q (from 0)
    kv_len: int  # row length the kernels see (rows sliced to it when not under a CUDA graph)
    fa3_kv_len: int  # row length of FA3's view (kv_len, or the longest FA3 sequence with VATTN_FA3_GUARD=clipped)
    fa3_schedule: torch.Tensor | None = None  # FA3's scheduler metadata for this step (eager FA3 parts only)
    # VATTN_FA2_ORDER=longest-first: the FA2 part's order, longest sequence first (int64 [num_decodes]),
    # and its lengths and rows in that order; None: FA2 runs the batch as vLLM ordered it
    decode_order: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        # the same for every layer: sliced once per step here, not in each layer's forward
        nd, n = self.num_decodes, self.num_actual_tokens
        self.slots_used = self.slot_mapping[:n]
        self.decode_seq_lens, self.decode_rows = self.seq_lens[:nd], self.rows[:nd]
        self.decode_perm = None
        if self.decode_order is not None:
            self.decode_perm, self.decode_seq_lens, self.decode_rows = self.decode_order
        self.prefill_seq_lens, self.prefill_rows = self.seq_lens[nd:self.num_reqs], self.rows[nd:self.num_reqs]


class VattnMetadataBuilder(AttentionMetadataBuilder[VattnMetadata]):
    # Decode batches run the same kernels with the same full-row views at capture and at replay.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    # VATTN_FA3_DECODE_TOKENS: this decode-only step runs FA3 over the rows (eagerly, outside a full
    # graph; the model runner mapped its guards), set by the model runner's prepare_attn each step,
    # like mixed_kernel
    decode_fa3: bool = False

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cfg = VattnConfig.from_env()
        self.row_len: int | None = None  # set by the model runner once rows exist
        # what ops.fa3_schedule needs beyond the batch: this rank's heads, the head size, the dtype
        self.fa3_shape = (vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config),
                          kv_cache_spec.num_kv_heads, kv_cache_spec.head_size, kv_cache_spec.dtype)
        self.fa3_scheduler = ops.fa3_schedule
        self.build_seconds = 0.0  # engine-thread time in build(), read and reset by the model runner
        # the rule the next mixed batch runs under (ops.plan_reads): set by the model runner's
        # prepare_attn each step; fa2-graphs runs one FA3 launch only when every decode row is guarded
        self.mixed_kernel = ops.mixed_rule(self.cfg.decode_kernel)
        self._init_reorder_batch_threshold(1)
        # VATTN_FA2_ORDER=longest-first: the FA2 part's order and its lengths and rows in it, in buffers made
        # once for the largest batch, so that a full CUDA graph captured over them reads each step's order
        self._order_bufs = None
        if self.cfg.fa2_order == "longest-first":
            cap = vllm_config.compilation_config.max_cudagraph_capture_size or 0
            self._order_bufs = _order_buffers(max(vllm_config.scheduler_config.max_num_seqs, cap), device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> VattnMetadata:
        t = time.perf_counter()
        try:
            return self._build(common_attn_metadata)
        finally:
            self.build_seconds += time.perf_counter() - t

    def _build(self, m: CommonAttentionMetadata) -> VattnMetadata:
        row_len = self.row_len or 0
        prefill_qsl = None
        fa3_kv_len = None
        if m.max_query_len == 1:
            # Decode batches may be replayed from a CUDA graph: fixed shapes (whole rows), and every
            # (padded) request in one kernel.
            kv_len = row_len
            if self.cfg.decode_kernel in ("fa2", "fa2-graphs") and not self.decode_fa3:
                num_decodes = m.num_reqs
            else:  # (decode_fa3: a long-context decode step outside a full graph, VATTN_FA3_DECODE_TOKENS)
                num_decodes, prefill_qsl = 0, m.query_start_loc
                if self.decode_fa3 and self.cfg.fa3_guard == "clipped":
                    # it runs eagerly: the view ends at the longest row, as the extents the model
                    # runner gave the memory manager (ops.plan_reads, long_decode)
                    q = np.ones(m.num_reqs, dtype=np.int64)
                    fa3_kv_len = min(kv_len, ops.fa3_view_len(_cpu_seq_lens(m), q, q == 1, eager=True))
        else:
            # Mixed batches run eagerly: rows sliced to the longest sequence plus FA3's over-read.
            # vLLM orders a batch decodes first; with decode_kernel fa2 those run FA2 and need no
            # guard, with fa2-graphs the whole batch runs FA3 (ops.fa3_mask) if the model runner
            # found every decode row guarded this step (mixed_kernel, ops.plan_reads), else as fa2.
            kv_len = min(row_len, -(-(m.max_seq_len + self.cfg.guard_tokens) // 256) * 256)
            qsl = m.query_start_loc_cpu[:m.num_reqs + 1].numpy()
            query_lens = qsl[1:] - qsl[:-1]
            fa3 = ops.fa3_mask(query_lens, self.mixed_kernel)
            num_decodes = int(np.argmax(fa3)) if fa3.any() else m.num_reqs
            if fa3[num_decodes:].sum() != m.num_reqs - num_decodes:
                raise AssertionError("vLLM's batch is not ordered decodes first")
            if num_decodes < m.num_reqs:
                prefill_qsl = m.query_start_loc[num_decodes:m.num_reqs + 1]
                if num_decodes:  # (a kernel: only when FA3's part does not start at the batch's start)
                    prefill_qsl = prefill_qsl - num_decodes
            if self.cfg.fa3_guard == "clipped":
                # the same numbers the model runner gave the memory manager (worker.prepare_attn)
                view = ops.fa3_view_len(_cpu_seq_lens(m), query_lens, fa3)
                if view is not None:
                    fa3_kv_len = min(kv_len, view)
        fa3_kv_len = kv_len if fa3_kv_len is None else fa3_kv_len
        rows = m.block_table_tensor.reshape(-1)[:m.num_reqs]
        order = None
        if num_decodes and self.cfg.fa2_order == "longest-first":
            order = self._longest_first(m.seq_lens[:num_decodes], rows[:num_decodes])
        schedule = None
        if m.max_query_len > 1 and prefill_qsl is not None and self.cfg.fa3_schedule:
            # Eager FA3 (mixed batches): its scheduling once here rather than in each layer's call, as
            # stock vLLM does. Decode batches with decode_kernel fa3 may be CUDA-graph replays, whose
            # captured FA3 keeps computing its own (a tensor made here would not be the captured one).
            schedule = self.fa3_scheduler(prefill_qsl, m.seq_lens[num_decodes:m.num_reqs], m.max_query_len,
                                          fa3_kv_len, *self.fa3_shape)
        return VattnMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len, query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
            rows=rows, slot_mapping=m.slot_mapping, decode_order=order,
            num_decodes=num_decodes, num_reqs=m.num_reqs, prefill_query_start_loc=prefill_qsl, kv_len=kv_len,
            fa3_kv_len=fa3_kv_len, fa3_schedule=schedule)

    def _longest_first(self, seq_lens: torch.Tensor, rows: torch.Tensor):
        """The FA2 part sorted by length, longest first, on the GPU (no wait for the host): its order,
        and its lengths and rows in that order, in this builder's buffers (the same tensors at each
        step of a batch size, as a CUDA graph captured over them needs). FA2 starts a sequence's
        blocks in the batch's order (NOTES #138): longest first, the short ones fill the end."""
        n = seq_lens.shape[0]
        if n > self._order_bufs[0].shape[0]:  # (max_num_seqs or the largest graph: no batch is larger)
            raise AssertionError(f"VATTN_FA2_ORDER: a batch of {n} requests, over the {self._order_bufs[0].shape[0]} "
                                 "the order buffers were made for")
        perm, lens, rws = (b[:n] for b in self._order_bufs)
        perm.copy_(torch.argsort(seq_lens, descending=True, stable=True))
        torch.index_select(seq_lens, 0, perm, out=lens)
        torch.index_select(rows, 0, perm, out=rws)
        return perm, lens, rws


def _order_buffers(n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VATTN_FA2_ORDER's buffers for up to n requests: the order (int64), lengths and rows (int32)."""
    return (torch.zeros(n, dtype=torch.int64, device=device), torch.zeros(n, dtype=torch.int32, device=device),
            torch.zeros(n, dtype=torch.int32, device=device))


def _cpu_seq_lens(m: CommonAttentionMetadata) -> np.ndarray:
    """The batch's sequence lengths on the CPU as vLLM's model runner gave them to ours
    (worker.prepare_attn reads the same upper bounds), for VATTN_FA3_GUARD=clipped's view."""
    if m.seq_lens_cpu_upper_bound is None:
        raise AssertionError("VATTN_FA3_GUARD=clipped needs vLLM's seq_lens_cpu_upper_bound")
    return m.seq_lens_cpu_upper_bound[:m.num_reqs].numpy()


class VattnImpl(AttentionImpl[VattnMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kwargs) -> None:
        from ..errors import ConfigError
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        unsupported = {
            "alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap, "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
        }
        for name, value in unsupported.items():
            if value not in (None, 0, 0.0):
                raise ConfigError(f"vAttention does not support {name}={value!r} yet; unset "
                                  "VLLM_ATTENTION_BACKEND to serve this model with stock vLLM")
        if attn_type != AttentionType.DECODER:
            raise ConfigError(f"vAttention serves decoder attention only, not {attn_type}")
        self.fa2_splits = VattnConfig.from_env().fa2_splits  # FA2 decode's split count (0: its heuristic)
        self._kv: _LayerKV | None = None  # this layer's K/V views

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: VattnMetadata, output: torch.Tensor,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vAttention does not fuse output quantization")
        if attn_metadata is None:  # memory profiling run: no KV exists yet
            return output.fill_(0)
        md = attn_metadata
        n, nd = md.num_actual_tokens, md.num_decodes
        kv = self._kv
        if kv is None or kv.cache is not kv_cache:  # (the same tensor at every step, once allocated)
            kv = self._kv = _LayerKV(kv_cache)
        if key is not None and value is not None:
            if key.shape[0] != n:  # (padded to a CUDA graph's size)
                key, value = key[:n], value[:n]
            ops.write_kv(key, value, kv.k, kv.v, md.slots_used,
                         getattr(layer, "_k_scale", None), getattr(layer, "_v_scale", None))
        h, d = self.num_heads, self.head_size
        if nd:  # one query token each: tokens [0, nd)
            k, v = kv.cut("fa2", md.kv_len)
            q, o = query.view(-1, 1, h, d), output.view(-1, 1, h, d)
            if nd != q.shape[0]:
                q, o = q[:nd], o[:nd]
            if md.decode_perm is None:
                ops.fa2_decode(q, k, v, o, md.decode_seq_lens, md.decode_rows, self.scale, self.fa2_splits)
            else:  # VATTN_FA2_ORDER=longest-first: queries into the step's order, the output back from it
                q_sorted = q.index_select(0, md.decode_perm)
                o_sorted = torch.empty_like(q_sorted)
                ops.fa2_decode(q_sorted, k, v, o_sorted, md.decode_seq_lens, md.decode_rows, self.scale,
                               self.fa2_splits)
                o.index_copy_(0, md.decode_perm, o_sorted)
        if md.prefill_query_start_loc is not None:  # the rest, tokens [nd, n)
            k, v = kv.cut("fa3", md.fa3_kv_len)
            q, o = query.view(-1, h, d), output.view(-1, h, d)
            if nd or n != q.shape[0]:
                q, o = q[nd:n], o[nd:n]
            ops.fa3_varlen(q, k, v, o, md.prefill_query_start_loc, md.prefill_seq_lens,
                           md.prefill_rows, md.max_query_len, self.scale, schedule=md.fa3_schedule)
        return output
