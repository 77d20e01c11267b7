"""Plugin activation and configuration errors, on real vLLM 0.25 config objects (CPU)."""

import copy
import json
import os

import pytest

from vllm_vattention import plugin
from vllm_vattention.config import VattnConfig
from vllm_vattention.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-llama-kv8b")
YI6B = os.path.join(ROOT, "models", "yi-6b")
ON = {"VLLM_ATTENTION_BACKEND": "VATTENTION"}


@pytest.fixture(scope="module")
def vllm_config_factory():
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.config.attention import AttentionConfig

    plugin.register()
    models = {}
    real_v2 = VllmConfig.__dict__["use_v2_model_runner"]

    def make(model=TINY, max_model_len=4096, block_size=None, kv_cache_dtype="auto", backend=None,
             max_num_seqs=64, **model_kw):
        key = (model, max_model_len, tuple(sorted(model_kw.items())))
        if key not in models:
            models[key] = ModelConfig(model=model, max_model_len=max_model_len, skip_tokenizer_init=True, **model_kw)
        cache = CacheConfig(block_size=block_size, cache_dtype=kv_cache_dtype)
        att = AttentionConfig(backend=AttentionBackendEnum[backend] if backend else None)
        patched = VllmConfig.__dict__["use_v2_model_runner"]
        VllmConfig.use_v2_model_runner = real_v2  # construct as vLLM would on this machine
        try:
            return VllmConfig(model_config=copy.deepcopy(models[key]), cache_config=cache, attention_config=att,
                              device_config=DeviceConfig(device="cuda"),
                              scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                                               is_encoder_decoder=False))
        finally:
            VllmConfig.use_v2_model_runner = patched

    return make


@pytest.fixture
def v2_runner(monkeypatch):
    """On a CPU vLLM picks the V1 runner (no Triton driver); on a GPU it picks V2 for Llama."""
    from vllm.config import VllmConfig
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))


def test_register_is_idempotent_and_points_custom_at_our_backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    plugin.register()
    plugin.register()
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_PATH
    cls = AttentionBackendEnum.CUSTOM.get_class()
    assert cls.get_name() == "CUSTOM"


def test_the_backend_variable_is_a_known_vllm_variable(monkeypatch):
    """vLLM 0.25 warns about (or, with --fail-on-environ-validation, refuses) VLLM_* variables it
    does not know; registering the plugin declares ours."""
    from vllm import envs
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "VATTENTION")
    monkeypatch.delitem(envs.environment_variables, "VLLM_ATTENTION_BACKEND", raising=False)
    with pytest.raises(ValueError, match="Unknown vLLM environment variable detected: VLLM_ATTENTION_BACKEND"):
        envs.validate_environ(hard_fail=True)
    plugin.register()
    plugin.register()
    envs.validate_environ(hard_fail=True)
    assert envs.environment_variables["VLLM_ATTENTION_BACKEND"]() == "VATTENTION"
    assert envs.compile_factors()  # every known variable's value still hashes


def test_entry_points_are_installed():
    from importlib.metadata import entry_points
    general = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    platform = {e.name: e.value for e in entry_points(group="vllm.platform_plugins")}
    assert general["vattention"] == "vllm_vattention.plugin:register"
    assert platform["vattention"] == "vllm_vattention.plugin:platform_plugin"


def test_platform_plugin_stays_out_without_cuda():
    # This CPU machine has no NVIDIA driver: vLLM's CUDA platform would not load, so neither do we.
    from vllm.platforms import cuda_platform_plugin
    assert cuda_platform_plugin() is None
    assert plugin.platform_plugin() is None


def test_not_selected_leaves_vllm_untouched(vllm_config_factory, v2_runner):
    from vllm_vattention.selection import is_selected
    vc = vllm_config_factory()
    before = (vc.cache_config.block_size, vc.parallel_config.worker_cls, vc.attention_config.backend)
    assert not is_selected(vc, VattnConfig.from_env({}))
    assert (vc.cache_config.block_size, vc.parallel_config.worker_cls, vc.attention_config.backend) == before


@pytest.mark.parametrize("how", ["env", "flag"])
def test_selected_by_env_or_flag_sets_block_size_and_worker(vllm_config_factory, v2_runner, how):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm_vattention.selection import WORKER_PATH, is_selected, validate_and_apply
    vc = vllm_config_factory(backend="CUSTOM" if how == "flag" else None)
    cfg = VattnConfig.from_env(ON if how == "env" else {})
    assert is_selected(vc, cfg)
    assert vc.attention_config.backend == AttentionBackendEnum.CUSTOM
    validate_and_apply(vc, cfg)
    assert vc.cache_config.block_size == 16  # one 2 MiB page of Llama-3-8B-shaped KV
    assert vc.parallel_config.worker_cls == WORKER_PATH


def test_the_start_log_names_the_options_given(vllm_config_factory, v2_runner, monkeypatch):
    """The "vAttention selected" line lists the VATTN_ options set in the environment (an A/B run's
    log then says which system it was), or says none were."""
    import logging

    from vllm_vattention.selection import logger, validate_and_apply
    seen = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for k in [k for k in os.environ if k.startswith("VATTN_")]:
            monkeypatch.delenv(k)
        validate_and_apply(vllm_config_factory(), VattnConfig.from_env(ON))
        monkeypatch.setenv("VATTN_ROW_DRAIN", "1")
        monkeypatch.setenv("VATTN_FA2_SPLITS", "4")
        validate_and_apply(vllm_config_factory(), VattnConfig.from_env())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [m for m in seen if m.startswith("vAttention selected")]
    assert len(lines) == 2
    assert lines[0].endswith("options given: none (the defaults)")
    assert lines[1].endswith("options given: VATTN_FA2_SPLITS=4 VATTN_ROW_DRAIN=1")


def test_block_size_follows_kv_heads_and_layout(vllm_config_factory, v2_runner):
    from vllm_vattention.selection import validate_and_apply
    vc = vllm_config_factory(model=YI6B)
    validate_and_apply(vc, VattnConfig.from_env(ON))
    assert vc.cache_config.block_size == 32  # 4 KV heads: 64 KiB per token
    vc = vllm_config_factory()
    validate_and_apply(vc, VattnConfig.from_env({**ON, "VATTN_LAYOUT": "per_layer"}))
    assert vc.cache_config.block_size == 1024


def test_env_conflicting_with_another_backend_flag(vllm_config_factory):
    from vllm_vattention.selection import is_selected
    vc = vllm_config_factory(backend="FLASH_ATTN")
    with pytest.raises(ConfigError, match="conflicts with --attention-backend FLASH_ATTN"):
        is_selected(vc, VattnConfig.from_env(ON))


def test_selected_without_gpu_raises_in_check_and_update_config(vllm_config_factory, monkeypatch):
    from vllm_vattention.selection import apply_if_selected
    vc = vllm_config_factory()
    before = (vc.cache_config.block_size, vc.parallel_config.worker_cls)
    apply_if_selected(vc)  # not selected: nothing changes
    assert (vc.cache_config.block_size, vc.parallel_config.worker_cls) == before
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "VATTENTION")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        apply_if_selected(vc)


def test_a_misspelt_variable_is_refused_once_vattention_is_selected_and_ignored_otherwise(vllm_config_factory,
                                                                                         monkeypatch):
    """VATTN_ROWDRAIN=1 would otherwise run the default silently: with vAttention selected it is a
    ConfigError naming the variable and the option it is closest to (before the GPU check, so a CPU
    sees it); in a stock run the plugin stays inert."""
    from vllm_vattention.selection import apply_if_selected
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)
    monkeypatch.setenv("VATTN_ROWDRAIN", "1")
    vc = vllm_config_factory()
    before = (vc.cache_config.block_size, vc.parallel_config.worker_cls)
    apply_if_selected(vc)  # stock: nothing refused, nothing changed
    assert (vc.cache_config.block_size, vc.parallel_config.worker_cls) == before
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "VATTENTION")
    with pytest.raises(ConfigError, match=r"unknown vAttention variable\(s\): VATTN_ROWDRAIN \(did you mean VATTN_ROW_DRAIN\?\)"):
        apply_if_selected(vc)
    monkeypatch.delenv("VATTN_ROWDRAIN")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):  # the next check: the variables passed
        apply_if_selected(vc)


@pytest.mark.parametrize("kwargs, env, match", [
    (dict(block_size=24), {}, r"--block-size 24 .* multiple of 16"),
    (dict(kv_cache_dtype="fp8"), {}, r"--kv-cache-dtype fp8"),
    (dict(dtype="float32"), {}, r"--dtype torch.float32"),
    (dict(max_model_len=16384, max_num_seqs=1024), {"VATTN_EXTRA_ROWS": "100000"},
     r"TiB of virtual memory .* lower --max-model-len or --max-num-seqs"),
])
def test_config_errors_name_the_value_and_the_fix(vllm_config_factory, v2_runner, kwargs, env, match):
    from vllm_vattention.selection import validate_and_apply
    vc = vllm_config_factory(**kwargs)
    with pytest.raises(ConfigError, match=match):
        validate_and_apply(vc, VattnConfig.from_env({**ON, **env}))


def test_unsupported_vllm_version(vllm_config_factory, v2_runner, monkeypatch):
    import vllm
    from vllm_vattention.selection import validate_and_apply
    monkeypatch.setattr(vllm, "__version__", "0.26.1")
    with pytest.raises(ConfigError, match=r"supports vLLM 0.25.x, but vLLM 0.26.1 .* vllm==0.25.0"):
        validate_and_apply(vllm_config_factory(), VattnConfig.from_env(ON))


def test_v1_runner_is_refused(vllm_config_factory):
    from vllm_vattention.selection import validate_and_apply
    vc = vllm_config_factory()
    assert not vc.use_v2_model_runner  # what vLLM picks on this CPU machine
    with pytest.raises(ConfigError, match="V2 model runner"):
        validate_and_apply(vc, VattnConfig.from_env(ON))


def test_sliding_window_model_is_refused(vllm_config_factory, v2_runner, tmp_path):
    cfg = json.load(open(os.path.join(TINY, "config.json")))
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=1024)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from vllm_vattention.selection import validate_and_apply
    with pytest.raises(ConfigError, match="sliding-window attention .* stock vLLM"):
        validate_and_apply(vllm_config_factory(model=str(tmp_path)), VattnConfig.from_env(ON))


def test_custom_backend_of_another_plugin_is_left_alone(vllm_config_factory, monkeypatch):
    from vllm.v1.attention.backends import registry
    from vllm_vattention.selection import is_selected
    monkeypatch.setitem(registry._ATTN_OVERRIDES, registry.AttentionBackendEnum.CUSTOM, "other.Backend")
    plugin.register()  # must not overwrite it
    assert registry._ATTN_OVERRIDES[registry.AttentionBackendEnum.CUSTOM] == "other.Backend"
    assert not is_selected(vllm_config_factory(backend="CUSTOM"), VattnConfig.from_env({}))
    with pytest.raises(ConfigError, match="another plugin"):
        is_selected(vllm_config_factory(), VattnConfig.from_env(ON))


def test_step_trace_on_a_stock_run_picks_the_traced_worker_only(vllm_config_factory, v2_runner, monkeypatch,
                                                                 tmp_path):
    """VATTN_STEP_TRACE without vAttention: vLLM's own worker becomes the traced one (block size and
    backend untouched); without the variable, or with a worker class someone else chose, nothing changes."""
    from vllm_vattention.selection import TRACED_WORKER_PATH, apply_if_selected
    for k in ("VLLM_ATTENTION_BACKEND", "VATTN_STEP_TRACE"):
        monkeypatch.delenv(k, raising=False)
    vc = vllm_config_factory()
    vc.parallel_config.worker_cls = "vllm.v1.worker.gpu_worker.Worker"  # (CudaPlatform's choice for "auto")
    apply_if_selected(vc)
    assert vc.parallel_config.worker_cls == "vllm.v1.worker.gpu_worker.Worker"
    monkeypatch.setenv("VATTN_STEP_TRACE", str(tmp_path / "steps.json"))
    before = (vc.cache_config.block_size, vc.attention_config.backend)
    apply_if_selected(vc)
    assert vc.parallel_config.worker_cls == TRACED_WORKER_PATH
    assert (vc.cache_config.block_size, vc.attention_config.backend) == before
    # vLLM checks the config again in the engine process: the traced worker stays, with no warning
    # that it is not traced (a stock server's log said so while it wrote its trace)
    import logging
    seen = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    from vllm_vattention.selection import logger
    logger.addHandler(handler)
    try:
        apply_if_selected(vc)
    finally:
        logger.removeHandler(handler)
    assert vc.parallel_config.worker_cls == TRACED_WORKER_PATH and not [m for m in seen if "not traced" in m]
    other = vllm_config_factory()
    other.parallel_config.worker_cls = "my.own.Worker"
    apply_if_selected(other)
    assert other.parallel_config.worker_cls == "my.own.Worker"


def test_metadata_builder_reads_fa3s_shape_from_vllms_config(vllm_config_factory, v2_runner):
    """The builder's own __init__ on real config objects: what ops.fa3_schedule needs beyond the
    batch (this rank's query heads, the KV heads, the head size, the dtype) comes from vLLM's model
    config and the layer group's KV spec."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_vattention.attention import ops
    from vllm_vattention.attention.backend import VattnMetadataBuilder
    cfg = vllm_config_factory(max_model_len=2048)
    mc = cfg.model_config
    spec = FullAttentionSpec(block_size=16, num_kv_heads=mc.get_num_kv_heads(cfg.parallel_config),
                             head_size=mc.get_head_size(), dtype=torch.bfloat16)
    b = VattnMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], cfg, torch.device("cpu"))
    hf = json.load(open(os.path.join(TINY, "config.json")))
    assert b.fa3_shape == (hf["num_attention_heads"], hf["num_key_value_heads"],
                           hf["head_dim"], torch.bfloat16)
    assert b.fa3_scheduler is ops.fa3_schedule and b.cfg.fa3_schedule is False


def test_metadata_builder_makes_the_fa2_order_buffers_for_the_largest_batch(vllm_config_factory, v2_runner,
                                                                             monkeypatch):
    """VATTN_FA2_ORDER=longest-first: the builder's own __init__ makes the order buffers once, for
    max_num_seqs requests or vLLM's largest CUDA-graph size, whichever is more; the default makes none."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_vattention.attention.backend import VattnMetadataBuilder
    cfg = vllm_config_factory(max_model_len=2048)
    mc = cfg.model_config
    spec = FullAttentionSpec(block_size=16, num_kv_heads=mc.get_num_kv_heads(cfg.parallel_config),
                             head_size=mc.get_head_size(), dtype=torch.bfloat16)
    assert VattnMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], cfg, torch.device("cpu"))._order_bufs is None
    monkeypatch.setenv("VATTN_FA2_ORDER", "longest-first")
    b = VattnMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], cfg, torch.device("cpu"))
    want = max(cfg.scheduler_config.max_num_seqs, cfg.compilation_config.max_cudagraph_capture_size or 0)
    assert [(t.shape[0], t.dtype) for t in b._order_bufs] == [(want, torch.int64), (want, torch.int32),
                                                              (want, torch.int32)]
