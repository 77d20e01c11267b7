"""vLLM entry points (pyproject.toml). Both run in every vLLM process and must stay cheap."""

from __future__ import annotations

BACKEND_PATH = "vllm_vattention.attention.backend.VattnBackend"
PLATFORM_PATH = "vllm_vattention.platform.VattnPlatform"


def register() -> None:
    """`vllm.general_plugins`: register our backend as AttentionBackendEnum.CUSTOM. Idempotent.

    A CUSTOM backend that another plugin registered is left alone: then our platform stays inert.
    """
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum, register_backend
    current = _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM)
    if current in (None, BACKEND_PATH):
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _declare_backend_variable()
    # Opt-in prefix-cache eviction order (default "lru": vLLM's, nothing patched). This entry point
    # runs in the engine-core process too, where the scheduler's block pool lives.
    from .config import VattnConfig
    cfg = VattnConfig.from_env()
    if cfg.prefix_eviction != "lru":
        from .prefix_eviction import install
        install(cfg.prefix_eviction, cfg.prefix_min_users)


def platform_plugin() -> str | None:
    """`vllm.platform_plugins`: our CUDA platform wherever vLLM's own CUDA platform would run.

    It must take over whenever CUDA is present, because `--attention-backend CUSTOM` is only known
    after the platform is chosen. Until vAttention is selected it behaves exactly like vLLM's
    CudaPlatform (it only adds to check_and_update_config). vLLM swallows exceptions raised here,
    so this function only detects; configuration errors are raised in check_and_update_config.
    """
    from vllm.platforms import cuda_platform_plugin
    return PLATFORM_PATH if cuda_platform_plugin() is not None else None


def _declare_backend_variable() -> None:
    """Make VLLM_ATTENTION_BACKEND a known vLLM variable again. vLLM 0.25 dropped it from its table
    (`vllm.envs.environment_variables`), so at start it warned "Unknown vLLM environment variable
    detected: VLLM_ATTENTION_BACKEND" (read by users as "ignored", though we honour it) and refused
    to start under `--fail-on-environ-validation`. One entry, added if missing (idempotent); its
    value also joins vLLM's torch.compile cache key, as every known variable does. It can go if vLLM
    lets plugins declare their variables, or if vLLM takes the variable back."""
    import os

    from vllm import envs

    from .config import BACKEND_ENV
    envs.environment_variables.setdefault(BACKEND_ENV, lambda: os.getenv(BACKEND_ENV))
