import pytest

from vllm_vattention.config import DEFAULT_FA3_DECODE_ROW_TOKENS, DEFAULT_FA3_DECODE_TOKENS, VattnConfig
from vllm_vattention.errors import ConfigError


def test_defaults():
    c = VattnConfig.from_env({})
    assert (c.requested_by_env, c.layout, c.reclaim, c.decode_kernel, c.background_map, c.fa3_guard) == \
        (False, "interleaved", "deferred", "fa2-graphs", "stream", "clipped")
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
    ({"VATTN_DECODE_KERNEL": "fa4"}, "VATTN_DECODE_KERNEL='fa4' .* fa2, fa3, fa2-graphs"),
    ({"VATTN_DECODE_KERNEL": "fa2-graphs", "VATTN_KEEP_GUARDS": "0"},
     "VATTN_KEEP_GUARDS=0 with VATTN_DECODE_KERNEL=fa2-graphs .* leave VATTN_KEEP_GUARDS unset"),
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


def test_spare_blocks_default_to_auto_in_stream_mode_only():
    assert VattnConfig.from_env({}).spare_blocks == "auto"  # the default since benchmarks/NOTES.md #29
    assert VattnConfig().spare_blocks == "auto"
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "1"}).spare_blocks == 0  # not given: none
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "0"}).spare_blocks == 0
    assert VattnConfig(background_map=False).spare_blocks == 0
    assert VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "0"}).spare_blocks == 0  # how to turn them off
    assert VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "512"}).spare_blocks == 512
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS=512 needs VATTN_BACKGROUND_MAP=stream"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "512", "VATTN_BACKGROUND_MAP": "1"})
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS='many' is not supported; use a whole number >= 0 or auto"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "many"})
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS='-3' is not supported"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "-3"})


def test_auto_spares_are_one_steps_worth_of_blocks_within_two_percent_of_the_budget():
    auto = VattnConfig.from_env({"VATTN_SPARE_BLOCKS": " Auto "})
    assert auto.spare_blocks == "auto"
    # vLLM's default step on an 8B model with an H200's budget (57,174 + 1,024 blocks): the suite's 1024
    assert auto.spare_blocks_for(16384, 16, budget_blocks=58_198) == 1024
    assert auto.spare_blocks_for(8192, 48, budget_blocks=10**6) == 171  # rounded up
    # a small budget caps them at 2% of its blocks (a 24 GB card: one 8192-token step would be 25%)
    assert auto.spare_blocks_for(8192, 16, budget_blocks=2048) == 40
    assert auto.spare_blocks_for(8192, 16, budget_blocks=49) == 0
    assert VattnConfig.from_env({}).spare_blocks_for(16384, 16, budget_blocks=58_198) == 1024
    # a number given is taken as given (the worker says when it leaves no budget)
    assert VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "64"}).spare_blocks_for(16384, 16, budget_blocks=100) == 64
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "1"}).spare_blocks_for(16384, 16, budget_blocks=10**6) == 0
    with pytest.raises(ConfigError, match="VATTN_SPARE_BLOCKS=auto needs VATTN_BACKGROUND_MAP=stream"):
        VattnConfig.from_env({"VATTN_SPARE_BLOCKS": "auto", "VATTN_BACKGROUND_MAP": "0"})


def test_worker_takes_the_spares_out_of_vllms_kv_budget(monkeypatch):
    """VattnWorker.determine_available_memory: vLLM's budget less the spare frames (auto: one
    step's blocks, at most 2% of the budget's), the count handed to the runner that creates them,
    and a clear error when a number given would leave no budget."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_worker import Worker

    from vllm_vattention.worker import VattnWorker

    per_layer = 2 << 20  # one block's K and V in one layer (made up: the arithmetic is what is tested)
    worker = object.__new__(VattnWorker)
    worker.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=16384),
                                         cache_config=SimpleNamespace(block_size=16))
    worker.model_runner = SimpleNamespace()
    monkeypatch.setattr(worker, "get_kv_cache_spec",
                        lambda: {f"layer{i}": SimpleNamespace(page_size_bytes=per_layer) for i in range(4)}, raising=False)
    per_block = 4 * per_layer
    monkeypatch.setattr(Worker, "determine_available_memory", lambda self: 1 << 40)  # 131,072 blocks
    monkeypatch.delenv("VATTN_SPARE_BLOCKS", raising=False)
    monkeypatch.delenv("VATTN_BACKGROUND_MAP", raising=False)
    assert worker.determine_available_memory() == (1 << 40) - 1024 * per_block  # the default: auto
    assert worker.model_runner.vattn_spare_blocks == 1024
    monkeypatch.setattr(Worker, "determine_available_memory", lambda self: 100 << 30)  # 12,800 blocks
    assert worker.determine_available_memory() == (100 << 30) - 256 * per_block  # 2% of them
    assert worker.model_runner.vattn_spare_blocks == 256
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "10")
    assert worker.determine_available_memory() == (100 << 30) - 10 * per_block
    assert worker.model_runner.vattn_spare_blocks == 10
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "0")
    assert worker.determine_available_memory() == 100 << 30
    assert worker.model_runner.vattn_spare_blocks == 0
    monkeypatch.setattr(Worker, "determine_available_memory", lambda self: 1 << 30)  # 128 blocks
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "auto")
    assert worker.determine_available_memory() == (1 << 30) - 2 * per_block  # auto never takes it all
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "2048")
    with pytest.raises(ConfigError, match=r"VATTN_SPARE_BLOCKS=2048, 16.0 GiB, leaves no KV budget; lower it"):
        worker.determine_available_memory()
    monkeypatch.setenv("VATTN_SPARE_BLOCKS", "auto")
    # --num-gpu-blocks-override: vLLM makes that many blocks, so 2% of those
    worker.vllm_config.cache_config.num_gpu_blocks_override = 500
    monkeypatch.setattr(Worker, "determine_available_memory", lambda self: 1 << 40)
    assert worker.determine_available_memory() == (1 << 40) - 10 * per_block


def test_the_runner_creates_the_spares_the_worker_took_out():
    """One resolution: the runner creates exactly the count the worker's budget excluded; only where
    vLLM did not profile a budget does it resolve auto itself, against vLLM's blocks."""
    from types import SimpleNamespace

    from vllm_vattention.worker import VattnModelRunner

    vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=16384),
                                  cache_config=SimpleNamespace(block_size=16))
    runner = object.__new__(VattnModelRunner)
    runner.vattn_spare_blocks = 300  # what determine_available_memory resolved
    assert runner._resolved_spares(VattnConfig(), vllm_config, num_blocks=10**6) == 300
    unprofiled = object.__new__(VattnModelRunner)
    assert unprofiled._resolved_spares(VattnConfig(), vllm_config, num_blocks=10_000) == 200  # 2% cap
    assert unprofiled.vattn_spare_blocks == 200
    assert object.__new__(VattnModelRunner)._resolved_spares(VattnConfig(spare_blocks=0), vllm_config, 10_000) == 0


def test_keep_guards_setting():
    # the default kernel, fa2-graphs: guards kept unless said otherwise (decode rows are FA3's in a
    # one-launch mixed step); 0 with it is refused, naming the kernel that allows it
    assert VattnConfig.from_env({}).keep_guards is True
    assert VattnConfig.from_env({"VATTN_DECODE_KERNEL": "fa2-graphs"}).keep_guards is True
    with pytest.raises(ConfigError, match="use VATTN_DECODE_KERNEL=fa2"):
        VattnConfig.from_env({"VATTN_KEEP_GUARDS": "0"})
    assert VattnConfig.from_env({"VATTN_DECODE_KERNEL": "fa2"}).keep_guards is False
    assert VattnConfig.from_env({"VATTN_DECODE_KERNEL": "fa2", "VATTN_KEEP_GUARDS": "1"}).keep_guards is True
    assert VattnConfig.from_env({"VATTN_DECODE_KERNEL": "fa3"}).keep_guards is False
    assert VattnConfig().keep_guards is True and VattnConfig(decode_kernel="fa2").keep_guards is False
    # and its guards are extended ahead, FA3's guard in block slots (256 tokens: 16 of 16, 8 of 32)
    assert VattnConfig(decode_kernel="fa2-graphs").guard_ahead_slots(16) == 16
    assert VattnConfig(decode_kernel="fa2-graphs", guard_tokens=200).guard_ahead_slots(32) == 7
    assert VattnConfig(decode_kernel="fa2").guard_ahead_slots(16) == 0
    assert VattnConfig(decode_kernel="fa3").guard_ahead_slots(16) == 0
    with pytest.raises(ConfigError, match="VATTN_KEEP_GUARDS='2' is not a boolean"):
        VattnConfig.from_env({"VATTN_KEEP_GUARDS": "2"})


def test_growth_ahead_setting():
    """VATTN_GROWTH_AHEAD: off by default, 1 turns it on, stream mode only; a bad value names itself."""
    assert VattnConfig.from_env({}).growth_ahead is False
    assert VattnConfig.from_env({"VATTN_GROWTH_AHEAD": "1"}).growth_ahead is True
    with pytest.raises(ConfigError, match="VATTN_GROWTH_AHEAD=1 needs VATTN_BACKGROUND_MAP=stream"):
        VattnConfig.from_env({"VATTN_GROWTH_AHEAD": "1", "VATTN_BACKGROUND_MAP": "1"})
    with pytest.raises(ConfigError, match="VATTN_GROWTH_AHEAD='maybe' is not a boolean"):
        VattnConfig.from_env({"VATTN_GROWTH_AHEAD": "maybe"})


def test_stale_guards_setting():
    """VATTN_STALE_GUARDS: on by default (NOTES #126), 0 keeps a prefix row's stale frames in its guard."""
    assert VattnConfig.from_env({}).stale_guards is True and VattnConfig().stale_guards is True
    assert VattnConfig.from_env({"VATTN_STALE_GUARDS": "0"}).stale_guards is False
    with pytest.raises(ConfigError, match="VATTN_STALE_GUARDS='sometimes' is not a boolean"):
        VattnConfig.from_env({"VATTN_STALE_GUARDS": "sometimes"})


def test_fence_setting():
    """VATTN_FENCE: event by default, value (host words the GPU writes, NOTES #124) in stream mode
    only; a bad value names itself and the choices."""
    assert VattnConfig.from_env({}).fence == "event" == VattnConfig().fence
    assert VattnConfig.from_env({"VATTN_FENCE": "value"}).fence == "value"
    with pytest.raises(ConfigError, match="VATTN_FENCE=value needs VATTN_BACKGROUND_MAP=stream"):
        VattnConfig.from_env({"VATTN_FENCE": "value", "VATTN_BACKGROUND_MAP": "1"})
    with pytest.raises(ConfigError, match="VATTN_FENCE.*'word'.*event.*value"):
        VattnConfig.from_env({"VATTN_FENCE": "word"})


def test_lend_blocks_setting_and_the_runner_lends_after_start_up(driver):
    """VATTN_LEND_BLOCKS: auto by default in stream mode (off in the other modes, where no spares are
    used), a number or auto (one step's blocks, at most a quarter of vLLM's), only in stream mode
    when given; the runner lends that many never-used blocks' frames as spares."""
    from types import SimpleNamespace

    from helpers import make_manager
    from vllm_vattention.worker import VattnModelRunner

    assert VattnConfig.from_env({}).lend_blocks == "auto" == VattnConfig().lend_blocks
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "1"}).lend_blocks == 0  # not given: no error
    assert VattnConfig.from_env({"VATTN_BACKGROUND_MAP": "0"}).lend_blocks == 0
    assert VattnConfig.from_env({"VATTN_LEND_BLOCKS": "0"}).lend_blocks == 0
    auto = VattnConfig.from_env({"VATTN_LEND_BLOCKS": "auto"})
    assert auto.lend_blocks_for(16384, 16, num_blocks=28_023) == 1024
    assert auto.lend_blocks_for(16384, 16, num_blocks=1000) == 250
    assert VattnConfig.from_env({"VATTN_LEND_BLOCKS": "7"}).lend_blocks_for(16384, 16, num_blocks=10) == 7
    with pytest.raises(ConfigError, match="VATTN_LEND_BLOCKS=auto needs VATTN_BACKGROUND_MAP=stream"):
        VattnConfig.from_env({"VATTN_LEND_BLOCKS": "auto", "VATTN_BACKGROUND_MAP": "1"})
    with pytest.raises(ConfigError, match="VATTN_LEND_BLOCKS='-3' is not supported"):
        VattnConfig.from_env({"VATTN_LEND_BLOCKS": "-3"})

    runner = object.__new__(VattnModelRunner)
    runner.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=64))
    runner.vattn = make_manager(driver, rows=4, num_blocks=40, spare_blocks=2, background="stream")
    runner.vattn_cfg = VattnConfig(lend_blocks=0)
    assert runner.lend_unused_blocks() == 0 and runner.vattn.pool.lent == 0  # off
    runner.vattn_cfg = auto
    bs = runner.vattn.layout.block_size
    assert runner.lend_unused_blocks() == min(-(-64 // bs), 10)  # one step's blocks, a quarter of 40 at most
    assert runner.vattn.pool.frame(39) is None and runner.vattn.pool.frame(0) == 0  # the highest ids
    runner.vattn.close()


def test_fa2_splits_setting_reaches_the_attention_impl(monkeypatch):
    """VATTN_FA2_SPLITS: 0 (FA2's heuristic) by default, 0-128 given; the attention impl reads it."""
    from vllm_vattention.attention.backend import VattnImpl

    assert VattnConfig.from_env({}).fa2_splits == 0
    with pytest.raises(ConfigError, match="VATTN_FA2_SPLITS=129 is above FA2's limit of 128"):
        VattnConfig.from_env({"VATTN_FA2_SPLITS": "129"})
    with pytest.raises(ConfigError, match="VATTN_FA2_SPLITS='two' is not an integer"):
        VattnConfig.from_env({"VATTN_FA2_SPLITS": "two"})
    monkeypatch.setenv("VATTN_FA2_SPLITS", "4")
    assert VattnImpl(32, 128, 0.088, num_kv_heads=8).fa2_splits == 4
    monkeypatch.delenv("VATTN_FA2_SPLITS")
    assert VattnImpl(32, 128, 0.088, num_kv_heads=8).fa2_splits == 0


def test_step_trace_names_a_file_in_an_existing_folder(tmp_path):
    assert VattnConfig.from_env({}).step_trace == ""
    path = str(tmp_path / "steps.json")
    assert VattnConfig.from_env({"VATTN_STEP_TRACE": path}).step_trace == path
    with pytest.raises(ConfigError, match="VATTN_STEP_TRACE=.*nowhere/steps.json.*folder does not exist"):
        VattnConfig.from_env({"VATTN_STEP_TRACE": str(tmp_path / "nowhere" / "steps.json")})


def test_fa3_schedule_setting():
    """VATTN_FA3_SCHEDULE: off by default (not yet measured on a GPU, NOTES.md #91), 1 turns it on; a
    bad value names itself."""
    assert VattnConfig.from_env({}).fa3_schedule is False
    assert VattnConfig.from_env({"VATTN_FA3_SCHEDULE": "1"}).fa3_schedule is True
    with pytest.raises(ConfigError, match="VATTN_FA3_SCHEDULE='yes please' is not a boolean"):
        VattnConfig.from_env({"VATTN_FA3_SCHEDULE": "yes please"})


def test_fa3_decode_tokens_setting():
    """VATTN_FA3_DECODE_TOKENS: 450K tokens by default with the default decode kernel (NOTES #133), 0 (off)
    with another kernel unless given; 0 turns it off; given with another kernel it would choose nothing,
    so it is refused, naming both variables."""
    assert VattnConfig.from_env({}).fa3_decode_tokens == 450_000 == DEFAULT_FA3_DECODE_TOKENS
    assert VattnConfig.from_env({"VATTN_FA3_DECODE_TOKENS": "0"}).fa3_decode_tokens == 0
    assert VattnConfig.from_env({"VATTN_FA3_DECODE_TOKENS": "100000"}).fa3_decode_tokens == 100_000
    for kernel in ("fa2", "fa3"):
        assert VattnConfig.from_env({"VATTN_DECODE_KERNEL": kernel}).fa3_decode_tokens == 0
        assert VattnConfig(decode_kernel=kernel).fa3_decode_tokens == 0
        assert VattnConfig(decode_kernel=kernel).fa3_decode_row_tokens == 0
    # VATTN_FA3_DECODE_ROW_TOKENS (NOTES #134): the average per request, 6144 by default with fa2-graphs
    assert VattnConfig.from_env({}).fa3_decode_row_tokens == 6144 == DEFAULT_FA3_DECODE_ROW_TOKENS
    assert VattnConfig.from_env({"VATTN_FA3_DECODE_ROW_TOKENS": "0"}).fa3_decode_row_tokens == 0
    with pytest.raises(ConfigError, match="VATTN_FA3_DECODE_ROW_TOKENS=8 .*VATTN_DECODE_KERNEL=fa3"):
        VattnConfig.from_env({"VATTN_FA3_DECODE_ROW_TOKENS": "8", "VATTN_DECODE_KERNEL": "fa3"})
    with pytest.raises(ConfigError, match="VATTN_FA3_DECODE_ROW_TOKENS='many' is not an integer"):
        VattnConfig.from_env({"VATTN_FA3_DECODE_ROW_TOKENS": "many"})
    with pytest.raises(ConfigError, match="VATTN_FA3_DECODE_TOKENS=5 .*VATTN_DECODE_KERNEL=fa2"):
        VattnConfig.from_env({"VATTN_FA3_DECODE_TOKENS": "5", "VATTN_DECODE_KERNEL": "fa2"})
    with pytest.raises(ConfigError, match="VATTN_FA3_DECODE_TOKENS=-1 is below 0"):
        VattnConfig.from_env({"VATTN_FA3_DECODE_TOKENS": "-1"})


def test_fa2_order_is_checked_and_refused_where_no_fa2_decode_runs():
    assert VattnConfig.from_env({}).fa2_order == "as-is"
    assert VattnConfig.from_env({"VATTN_FA2_ORDER": "Longest-First"}).fa2_order == "longest-first"
    with pytest.raises(ConfigError, match="VATTN_FA2_ORDER='shortest'.*as-is, longest-first"):
        VattnConfig.from_env({"VATTN_FA2_ORDER": "shortest"})
    with pytest.raises(ConfigError, match="VATTN_FA2_ORDER=longest-first.*VATTN_DECODE_KERNEL=fa3"):
        VattnConfig.from_env({"VATTN_FA2_ORDER": "longest-first", "VATTN_DECODE_KERNEL": "fa3"})


def test_the_option_list_is_what_from_env_reads_and_every_option_is_documented():
    """option_variables() is learnt from from_env itself; README's options table and config.py's own
    table must name each of them (and nothing else), so a new option cannot go undocumented."""
    import os
    import re

    from vllm_vattention import config
    opts = config.option_variables()
    assert {"VATTN_LAYOUT", "VATTN_ROW_DRAIN", "VATTN_STEP_TRACE", "VATTN_PREFIX_MIN_USERS"} <= opts
    assert not opts & set(config.TOOL_VARIABLES)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    readme_table = set(re.findall(r"^\| `(VATTN_[A-Z0-9_]+)` \|", readme, re.M))
    doc_table = set(re.findall(r"^\| (VATTN_[A-Z0-9_]+) \|", config.__doc__, re.M))
    assert readme_table == opts and doc_table == opts


def test_unknown_variables_name_the_closest_option_and_tool_variables_pass():
    from vllm_vattention.config import check_variables
    check_variables({"VATTN_LAYOUT": "interleaved", "VATTN_COMMIT": "abc", "VATTN_SCHED_SEEDS": "4", "OTHER": "x"})
    with pytest.raises(ConfigError, match=r"VATTN_SPARE_BLOCK \(did you mean VATTN_SPARE_BLOCKS\?\)") as e:
        check_variables({"VATTN_SPARE_BLOCK": "64", "VATTN_ZZZ": "1"})
    # both named, the one close to no option without a guess
    assert "(did you mean VATTN_SPARE_BLOCKS?), VATTN_ZZZ; vllm-vattention reads VATTN_BACKGROUND_MAP" in str(e.value)


def test_options_set_lists_only_the_plugins_options_in_name_order():
    from vllm_vattention.config import options_set
    assert options_set({"VATTN_ROW_DRAIN": "1", "VATTN_COMMIT": "abc", "VATTN_LAYOUT": "per_layer", "HOME": "/"}) == {
        "VATTN_LAYOUT": "per_layer", "VATTN_ROW_DRAIN": "1"}
    assert list(options_set({"VATTN_ROW_DRAIN": "1", "VATTN_LAYOUT": "x"})) == ["VATTN_LAYOUT", "VATTN_ROW_DRAIN"]
    assert options_set({}) == {}
