"""Our CUDA platform: exactly vLLM's CudaPlatform until vAttention is selected."""

from __future__ import annotations

from vllm.platforms.cuda import CudaPlatform

from .selection import apply_if_selected


class VattnPlatform(CudaPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        apply_if_selected(vllm_config)
