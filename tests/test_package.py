import os

import pytest

import vllm_vattention

PKG = os.path.dirname(vllm_vattention.__file__)


def test_every_module_folder_is_a_regular_package():
    """A folder without __init__.py is left out of the wheel by setuptools' find_packages."""
    for folder, _, files in os.walk(PKG):
        if "__pycache__" in folder:
            continue
        if any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, f"{folder} has modules but no __init__.py"


@pytest.mark.parametrize("sub", ["memory", "evict"])
def test_memory_manager_and_eviction_simulator_do_not_import_vllm(sub):
    """The memory manager and the eviction simulator know nothing of vLLM (the glue lives in
    worker/platform/selection)."""
    for name in os.listdir(os.path.join(PKG, sub)):
        if name.endswith(".py"):
            src = open(os.path.join(PKG, sub, name)).read()
            assert "import vllm" not in src and "from vllm" not in src, name
