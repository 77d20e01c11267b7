"""GPU tests: `pytest -m gpu tests/gpu`. Without a CUDA GPU they fail (never skip)."""

import pytest
import torch

from vllm_vattention.memory import PAGE_SIZE, CudaDriver, KVGeometry, KVMemoryManager, make_layout

LLAMA3_8B = KVGeometry(num_layers=32, num_kv_heads=8, head_size=128, dtype_bytes=2)


@pytest.fixture(scope="session")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA GPU and none is visible; run them on the device machine")
    torch.cuda.init()
    torch.empty(1, device="cuda")  # create torch's (primary) context first
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def driver(cuda):
    return CudaDriver(cuda.index)


@pytest.fixture
def manager_factory(driver):
    made = []

    def make(layout="interleaved", rows=8, max_tokens=4096, num_blocks=160, geometry=LLAMA3_8B, **kw):
        lay = make_layout(layout, geometry, PAGE_SIZE, rows=rows, min_row_tokens=max_tokens)
        m = KVMemoryManager(driver, lay, num_blocks, **kw)
        made.append(m)
        return m

    yield make
    torch.cuda.synchronize()
    for m in made:
        m.close()
