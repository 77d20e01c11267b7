"""Multi-GPU tests: `pytest -m gpu2 tests/gpu_multi` on a machine with >= 2 GPUs (they fail, never
skip, with fewer). Multicast stays off (NCCL/NVSHMEM/torch symmetric memory), also in the
processes vLLM starts."""

import os

import pytest
import torch

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.fixture(scope="session")
def two_gpus():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        pytest.fail(f"tensor-parallel tests need 2 CUDA GPUs; this machine has {n}")
    os.environ.update(MULTICAST_OFF)
    return n
