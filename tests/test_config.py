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
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS='many' is not an integer"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "many"})
