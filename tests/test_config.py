import pytest

from vllm_vattention.config import VattnConfig
from vllm_vattention.errors import ConfigError


def test_defaults():
    c = VattnConfig.from_env({})
    assert (c.requested_by_env, c.layout, c.reclaim, c.decode_kernel, c.background_map, c.fa3_guard) == \
        (False, "interleaved", "deferred", "fa2", "stream", "clipped")
    assert c.num_rows(128) == 256


def test_values_are_parsed():
    c = VattnConfig.from_env({"VLLM_ATTENTION_BACKEND": "vattention", "VATTN_LAYOUT": "PER_LAYER",
                              "VATTN_RECLAIM": "eager", "VATTN_DECODE_KERNEL": "fa3",
                              "VATTN_BACKGROUND_MAP": "1", "VATTN_EXTRA_ROWS": "0", "VATTN_GUARD_TOKENS": "512"})
    assert c.requested_by_env and c.layout == "per_layer" and c.reclaim == "eager"
    assert c.decode_kernel == "fa3" and c.background_map and c.num_rows(8) == 8 and c.guard_tokens == 512


def test_stream_map_mode():
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "Stream"}).background_map == "stream"
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "0"}).background_map is False
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "1"}).background_map is True
    assert VattnConfig.from_env({"VATTN_FA3_GUARD": "always"}).fa3_guard == "always"
    with pytest.raises(ConfigError, match="VATTN_BACKGROUND_MAP='later'"):
        VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "later"})


def test_other_backend_names_do_not_select_us():
    assert not VattnConfig.from_env({"VLLM_ATTENTION_BACKEND": "FLASH_ATTN"}).requested_by_env


@pytest.mark.parametrize("env, match", [
    ({"VATTN_LAYOUT": "paged"}, "VATTN_LAYOUT='paged' .* interleaved, per_layer"),
    ({"VATTN_RECLAIM": "never"}, "VATTN_RECLAIM='never' .* deferred, eager"),
    ({"VATTN_DECODE_KERNEL": "fa4"}, "VATTN_DECODE_KERNEL='fa4' .* fa2, fa3"),
    ({"VATTN_BACKGROUND_MAP": "maybe"}, "VATTN_BACKGROUND_MAP='maybe' .* use 0, 1 or stream"),
    ({"VATTN_EXTRA_ROWS": "many"}, "VATTN_EXTRA_ROWS='many' is not an integer"),
    ({"VATTN_GUARD_TOKENS": "64"}, "VATTN_GUARD_TOKENS=64 is below 192"),
])
def test_bad_values_name_the_variable_and_the_choices(env, match):
    with pytest.raises(ConfigError, match=match):
        VattnConfig.from_env(env)


def test_guard_floor_is_fa3s_overread_bound():
    from vllm_vattention.attention.ops import FA3_MAX_OVERREAD
    assert VattnConfig.from_env({"VATTN_GUARD_TOKENS": str(FA3_MAX_OVERREAD)}).guard_tokens == FA3_MAX_OVERREAD
    with pytest.raises(ConfigError):
        VattnConfig.from_env({"VATTN_GUARD_TOKENS": str(FA3_MAX_OVERREAD - 1)})


def test_spare_blocks_need_stream_mode():
    assert VattnConfig.from_env({}).spare_blocks == 0
    assert VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "512"}).spare_blocks == 512
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS=512 needs VATTN_BACKGROUND_MAP=stream"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "512", "VATTN_BACKGROUND_MAP": "1"})
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS='many' is not supported; use a whole number >= 0 or auto"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "many"})
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS='-3' is not supported"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "-3"})


def test_auto_spares_are_one_steps_worth_of_blocks():
    auto = VattnConfig.from_env({"VATTN_SPARE_BLOCKS": " Auto "})
    assert auto.spare_blocks == "auto"
    assert auto.spare_blocks_for(16384, 16) == 1024  # vLLM's default step on an 8B model: the suite's 1024
    assert auto.spare_blocks_for(8192, 48) == 171  # rounded up
    assert VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "64"}).spare_blocks_for(16384, 16) == 64
    assert VattnConfig.from_env({}).spare_blocks_for(16384, 16) == 0
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS=auto needs VATTN_BACKGROUND_MAP=stream"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "auto", "VATTN_BACKGROUND_MAP": "0"})


def test_worker_takes_the_spares_out_of_vllms_kv_budget(monkeypatch):
    """VattnWorker.determine_available_memory: vLLM's budget less the spare frames (auto: one
    step's blocks), and a clear error when the spares would leave no budget."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_worker import Worker

    from vllm_vattention.worker import VattnWorker

    per_layer = 2 << 20  # one block's K and V in one layer (made up: the arithmetic is what is tested)
    worker = object.__new__(VattnWorker)
    worker.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=16384),
                                         cache_config=SimpleNamespace(block_size=16))
    monkeypatch.setattr(worker, "get_kv_cache_spec",
                        lambda: {f"layer{i}": SimpleNamespace(page_size_bytes=per_layer) for i in range(4)}, raising=False)
    monkeypatch.setattr(Worker, "determine_available_memory", lambda self: 100 << 30)
    per_block = 4 * per_layer
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "auto")
    assert worker.determine_available_memory() == (100 << 30) - 1024 * per_block
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "10")
    assert worker.determine_available_memory() == (100 << 30) - 10 * per_block
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "0")
    assert worker.determine_available_memory() == 100 << 30
    monkeypatch.setattr(Worker, "determine_available_memory", lambda self: 1 << 30)
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "auto")
    with pytest.raises(ConfigError, match=r"VATTN_SPARE_BLOCKS=auto \(1024 blocks\), 8.0 GiB, leaves no KV budget"):
        worker.determine_available_memory()
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "2048")
    with pytest.raises(ConfigError, match=r"VATTN_SPARE_BLOCKS=2048, 16.0 GiB, leaves no KV budget; lower it"):
        worker.determine_available_memory()
