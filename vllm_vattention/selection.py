"""Whether vAttention is selected, what it refuses, and the vLLM settings it makes.

No CUDA import here, so all of it runs (and is tested) on a CPU; platform.py calls `apply_if_selected`.
"""

from __future__ import annotations

import logging

import torch

from .config import VattnConfig, check_variables, options_set
from .errors import ConfigError
from .memory import PAGE_SIZE, KVGeometry, preferred_block_size

logger = logging.getLogger("vllm.vattention")  # under vLLM's logger, so its handlers print us

WORKER_PATH = "vllm_vattention.worker.VattnWorker"
TRACED_WORKER_PATH = "vllm_vattention.worker.TracedWorker"  # stock vLLM with VATTN_STEP_TRACE
STOCK_WORKERS = ("auto", "vllm.v1.worker.gpu_worker.Worker")
# Virtual address space we allow one rank to reserve. Hopper exposes 2^49 bytes of GPU VA; we keep
# well under it so that torch's allocator and other libraries still find room (tests/gpu probes it).
MAX_RESERVATION_BYTES = 1 << 46  # 64 TiB
_DTYPE_BYTES = {torch.float16: 2, torch.bfloat16: 2}


def is_selected(vllm_config, cfg: VattnConfig) -> bool:
    """Selected by VLLM_ATTENTION_BACKEND=VATTENTION or --attention-backend CUSTOM (ours)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from .plugin import BACKEND_PATH
    att = vllm_config.attention_config
    if cfg.requested_by_env:
        if att.backend not in (None, AttentionBackendEnum.CUSTOM):
            raise ConfigError(
                f"VLLM_ATTENTION_BACKEND=VATTENTION conflicts with --attention-backend "
                f"{att.backend.name}; pass one of them (or --attention-backend CUSTOM)")
        att.backend = AttentionBackendEnum.CUSTOM
    if att.backend != AttentionBackendEnum.CUSTOM:
        return False
    try:
        path = AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:
        path = None
    if path != BACKEND_PATH:
        if cfg.requested_by_env:
            raise ConfigError(f"VLLM_ATTENTION_BACKEND=VATTENTION, but the CUSTOM backend is {path!r}, "
                              "registered by another plugin; uninstall one of them")
        return False
    return True


def geometry_of(vllm_config) -> KVGeometry:
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    dtype = kv_dtype_of(vllm_config)
    return KVGeometry(num_layers=mc.get_num_layers(pc), num_kv_heads=mc.get_num_kv_heads(pc),
                      head_size=mc.get_head_size(), dtype_bytes=_DTYPE_BYTES[dtype])


def kv_dtype_of(vllm_config) -> torch.dtype:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype in ("auto", None):
        return vllm_config.model_config.dtype
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}[cache_dtype]


def vattn_block_size(cfg: VattnConfig, geometry: KVGeometry) -> int:
    return preferred_block_size(cfg.layout, geometry, PAGE_SIZE)


def row_tokens(max_model_len: int, guard_tokens: int, block_size: int) -> int:
    return -(-(max_model_len + guard_tokens) // block_size) * block_size


def validate_and_apply(vllm_config, cfg: VattnConfig) -> None:
    """Refuse what we cannot serve (naming the setting and the fix); set block size and worker."""
    import vllm

    from .compat import check_vllm_version
    check_vllm_version(vllm.__version__)
    mc, cc, pc, sc = (vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config,
                      vllm_config.scheduler_config)
    if mc is None:
        return
    off = "unset VLLM_ATTENTION_BACKEND (and --attention-backend) to serve it with stock vLLM"
    if mc.use_mla:
        raise ConfigError(f"{mc.model}: MLA attention (DeepSeek-style) is not supported by vAttention; {off}")
    if mc.is_hybrid or mc.is_attention_free:
        raise ConfigError(f"{mc.model}: hybrid or attention-free models are not supported by vAttention; {off}")
    if mc.is_encoder_decoder:
        raise ConfigError(f"{mc.model}: encoder-decoder models are not supported by vAttention; {off}")
    if mc.get_sliding_window() is not None:
        raise ConfigError(f"{mc.model}: sliding-window attention (window {mc.get_sliding_window()}) "
                          f"is not supported by vAttention; {off}")
    if cc.cache_dtype not in ("auto", "bfloat16", "float16", "half"):
        raise ConfigError(f"--kv-cache-dtype {cc.cache_dtype} is not supported by vAttention yet; "
                          "use --kv-cache-dtype auto (the model's fp16/bf16)")
    if mc.dtype not in _DTYPE_BYTES:
        raise ConfigError(f"--dtype {mc.dtype} is not supported by vAttention; use --dtype bfloat16 or float16")
    if vllm_config.speculative_config is not None:
        raise ConfigError(f"speculative decoding is not supported by vAttention yet; {off}")
    if pc.pipeline_parallel_size > 1 or pc.decode_context_parallel_size > 1:
        raise ConfigError("vAttention supports tensor parallelism only; use --pipeline-parallel-size 1 "
                          "and --decode-context-parallel-size 1")
    if not vllm_config.use_v2_model_runner:
        raise ConfigError("vAttention runs on vLLM's V2 model runner; unset VLLM_USE_V2_MODEL_RUNNER=0 "
                          "(the V1 runner is not supported)")
    geometry = geometry_of(vllm_config)
    head_size = geometry.head_size
    from .attention.backend import SUPPORTED_HEAD_SIZES
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ConfigError(f"head size {head_size} is not supported; vAttention's kernels take {SUPPORTED_HEAD_SIZES}")
    unit = vattn_block_size(cfg, geometry)
    if cc.user_specified_block_size:
        if cc.block_size % unit:
            raise ConfigError(
                f"--block-size {cc.block_size} does not fill whole 2 MiB pages for this model with "
                f"VATTN_LAYOUT={cfg.layout} ({geometry.token_bytes} bytes of KV per token on each "
                f"rank); use a multiple of {unit}, or leave --block-size unset")
    else:
        cc.block_size = unit
    rows = cfg.num_rows(sc.max_num_seqs)
    total = rows * row_tokens(mc.max_model_len, cfg.guard_tokens, cc.block_size) * geometry.token_bytes
    if total > MAX_RESERVATION_BYTES:
        raise ConfigError(
            f"vAttention would reserve {total / 2**40:.1f} TiB of virtual memory ({rows} rows = "
            f"--max-num-seqs {sc.max_num_seqs} + VATTN_EXTRA_ROWS, x --max-model-len {mc.max_model_len} "
            f"tokens x {geometry.token_bytes} bytes), over the {MAX_RESERVATION_BYTES / 2**40:.0f} TiB "
            "we allow per GPU; lower --max-model-len or --max-num-seqs, or set VATTN_EXTRA_ROWS=0")
    pc.worker_cls = WORKER_PATH
    given = options_set()
    logger.info("vAttention selected: layout=%s block_size=%d rows=%d reclaim=%s decode=%s fa3_decode_tokens=%d "
                "fa3_schedule=%s; options given: %s", cfg.layout, cc.block_size, rows, cfg.reclaim, cfg.decode_kernel,
                cfg.fa3_decode_tokens, int(cfg.fa3_schedule),
                " ".join(f"{k}={v}" for k, v in given.items()) or "none (the defaults)")


def trace_stock(vllm_config, cfg: VattnConfig) -> None:
    """VATTN_STEP_TRACE on a stock run (vAttention not selected): vLLM's own worker and runner with
    the step trace only (worker.TracedWorker), so an A/B's baseline server is traced as ours is.
    A worker class someone else chose is left alone. Idempotent: vLLM checks the config again in
    the engine process, where the traced worker is already chosen (it warned "not traced" there,
    while the trace was written)."""
    pc = vllm_config.parallel_config
    if pc.worker_cls == TRACED_WORKER_PATH:
        return
    if pc.worker_cls not in STOCK_WORKERS:
        logger.warning("VATTN_STEP_TRACE=%s: not traced, the worker class is %s (not vLLM's own)",
                       cfg.step_trace, pc.worker_cls)
        return
    pc.worker_cls = TRACED_WORKER_PATH
    logger.info("VATTN_STEP_TRACE=%s: stock vLLM's steps are traced (vAttention is not selected)", cfg.step_trace)


def first_start_note(cfg: VattnConfig, capability: tuple[int, int]) -> str | None:
    """What the first start costs on this GPU, or None. vLLM 0.25.0's FA2 library carries sm_80 code
    and compute_80 PTX only (its FA3 library: sm_90 code), so on a GPU of compute capability 9 or
    later the driver compiles each FA2 kernel from PTX the first time it runs. Measured on an H200:
    engine start 92-122 s instead of 6-20 s, once per machine; ~26 MB land in the driver's JIT cache."""
    if not cfg.decode_kernel.startswith("fa2") or capability[0] < 9:
        return None
    return (f"decode={cfg.decode_kernel} on a compute capability {capability[0]}.{capability[1]} GPU: vLLM's FA2 kernels ship as "
            "sm_80 code and PTX, so the CUDA driver compiles the ones used at the first start on this "
            "machine (about 1.5-2 minutes on an H200), then reuses them from its JIT cache (~/.nv/ComputeCache, "
            "or $CUDA_CACHE_PATH; keep it across container restarts). VATTN_DECODE_KERNEL=fa3 avoids it.")


def apply_if_selected(vllm_config) -> None:
    """The platform's check_and_update_config addition; a no-op unless vAttention is selected."""
    cfg = VattnConfig.from_env()
    if not is_selected(vllm_config, cfg):
        if cfg.step_trace:
            trace_stock(vllm_config, cfg)
        return
    check_variables()
    if not torch.cuda.is_available():
        raise ConfigError("vAttention needs a CUDA GPU, and none is visible to this process "
                          "(check CUDA_VISIBLE_DEVICES); unset VLLM_ATTENTION_BACKEND to run without it")
    validate_and_apply(vllm_config, cfg)
