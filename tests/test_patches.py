"""The upstream drafts in patches/ stay valid against the pinned vLLM: each applies cleanly to the
installed vLLM 0.25.0 file it targets, the patched module imports, and what it adds is there and is
used. The block-pool draft also keeps vLLM's block order with its default policy."""

import importlib.util
import os
import random
import shutil
import subprocess
import sys

import pytest
import vllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "patches")
VLLM_DIR = os.path.dirname(vllm.__file__)


def patched_module(tmp_path, diff: str, target: str, name: str):
    """Apply patches/<diff> to a copy of vllm/<target> and import the result as module `name`."""
    work = tmp_path / "tree"
    dst = work / "vllm" / target
    dst.parent.mkdir(parents=True)
    shutil.copy(os.path.join(VLLM_DIR, target), dst)
    p = subprocess.run(["git", "apply", "-p1", os.path.join(PATCHES, diff)], cwd=work, capture_output=True, text=True)
    assert p.returncode == 0, f"{diff} no longer applies to vLLM {vllm.__version__}'s {target}:\n{p.stderr}"
    spec = importlib.util.spec_from_file_location(name, dst)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod, dst.read_text()


def test_every_draft_is_tested():
    assert sorted(f for f in os.listdir(PATCHES) if f.endswith(".diff")) == [
        "vllm-block-pool-eviction-policy.diff", "vllm-v2-runner-kv-allocation-hook.diff"]


def test_kv_allocation_hook_applies_and_is_what_initialize_kv_cache_calls(tmp_path):
    mod, text = patched_module(tmp_path, "vllm-v2-runner-kv-allocation-hook.diff", "v1/worker/gpu/model_runner.py",
                               "patched_v2_model_runner")
    runner = mod.GPUModelRunner
    assert callable(getattr(runner, "init_kv_cache_tensors", None))
    init_body = text.split("def initialize_kv_cache(", 1)[1].split("\n    def ", 1)[0]
    assert "self.init_kv_cache_tensors()" in init_body and "init_kv_cache(" not in init_body.replace(
        "init_kv_cache_tensors(", "")
    # our worker's override would take the hook's place with the same arguments init_kv_cache gets
    hook_body = text.split("def init_kv_cache_tensors(", 1)[1].split("\n    def ", 1)[0]
    assert "return init_kv_cache(" in hook_body


def test_eviction_policy_draft_keeps_vllms_order_by_default(tmp_path):
    """Stock BlockPool and the patched one, driven by the same random allocations, hashings, prefix
    hits and frees, hand out the same block ids and find the same cached blocks."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    mod, _ = patched_module(tmp_path, "vllm-block-pool-eviction-policy.diff", "v1/core/block_pool.py",
                            "patched_block_pool")
    assert all(hasattr(mod.EvictionPolicy, h) for h in ("on_free", "before_allocate", "on_touch", "on_lookup_miss"))
    pools = [BlockPool(64, True, 16), mod.BlockPool(64, True, 16)]
    rng = random.Random(0)
    held: list[list[list]] = [[], []]  # per pool: block lists in the same order
    hashes, hits = [], 0
    for step in range(400):
        op = rng.random()
        if op < 0.45 and pools[0].get_num_free_blocks() >= 3:
            got = [p.get_new_blocks(3) for p in pools]
            assert [b.block_id for b in got[0]] == [b.block_id for b in got[1]], step
            for j in range(3):
                if rng.random() < 0.7:  # a full block: cached under its hash
                    h = f"s{step}-{j}".encode()  # a block hash; the pool keys it with the group id
                    hashes.append(h)
                    for i in (0, 1):
                        got[i][j].set_block_hash(make_block_hash_with_group_id(h, 0))
                        pools[i].cached_block_hash_to_block.insert(make_block_hash_with_group_id(h, 0), got[i][j])
            for i in (0, 1):
                held[i].append(got[i])
        elif op < 0.6 and hashes:  # a prefix hit
            h = rng.choice(hashes)
            found = [p.get_cached_block(h, [0]) for p in pools]
            assert (found[0] is None) == (found[1] is None), step
            if found[0] is not None:
                hits += 1
                assert [b.block_id for b in found[0]] == [b.block_id for b in found[1]]
                for i in (0, 1):
                    pools[i].touch(found[i])
                    held[i].append(list(found[i]))
        elif held[0]:
            k = rng.randrange(len(held[0]))
            for i in (0, 1):
                pools[i].free_blocks(held[i].pop(k))
    assert hits > 10  # the cached path ran (evicted hashes miss on both)
    assert pools[0].get_num_free_blocks() == pools[1].get_num_free_blocks()
    order = [[b.block_id for b in p.free_block_queue.get_all_free_blocks()] for p in pools]
    assert order[0] == order[1]
