"""Everything that depends on the vLLM version lives here."""

from __future__ import annotations

from .errors import ConfigError

SUPPORTED_VLLM = "0.25"


def check_vllm_version(version: str) -> None:
    """We hook vLLM internals (model runner, attention metadata) that change between minors."""
    parts = version.split(".")
    if ".".join(parts[:2]) != SUPPORTED_VLLM:
        raise ConfigError(
            f"vllm-vattention supports vLLM {SUPPORTED_VLLM}.x, but vLLM {version} is installed; "
            f"install vllm=={SUPPORTED_VLLM}.0 or unset VLLM_ATTENTION_BACKEND")
