"""The model runner's per-step attention inputs (VattnModelRunner.prepare_attn) on a CPU: the
block-table buffer gets each request's row (padding: the dummy row), the slot mapping
row * row_len + position (padding: -1), and every row FA3 reads is readable up to its extent.
(The synchronous mapping mode, CPU tensors, pin_memory as a no-op; the stream mode's flag wait
needs a GPU and is covered by tests/gpu.)"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import PAGE, SMALL
from vllm_vattention.config import VattnConfig
from vllm_vattention.memory import FakeDriver, KVMemoryManager, make_layout
from vllm_vattention.worker import DUMMY_ROW, VattnModelRunner


PINNED = []  # what prepare_attn sent to the GPU (pin_memory stands in for the host-to-device copy)


@pytest.fixture
def runner(monkeypatch):
    PINNED.clear()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: PINNED.append(self.clone()) or self)  # no CUDA here
    driver = FakeDriver(PAGE, capacity=1 << 30)
    lay = make_layout("interleaved", SMALL, PAGE, rows=6, min_row_tokens=160)
    mgr = KVMemoryManager(driver, lay, num_blocks=64)
    assert mgr.acquire_row() == DUMMY_ROW
    r = object.__new__(VattnModelRunner)
    r.vattn = mgr
    r.vattn_cfg = VattnConfig(background_map=False, decode_kernel="fa2")
    max_reqs, max_tokens = 8, 64
    r.block_tables = SimpleNamespace(input_block_tables=[torch.full((max_reqs, 4), 99, dtype=torch.int32)],
                                     slot_mappings=torch.full((1, max_tokens), 77, dtype=torch.int64))
    r._row_np = np.full(max_reqs, -1, dtype=np.int64)
    r._init_step_staging("cpu")
    r.reset_timers()
    yield r
    mgr.close()
    assert driver.leaks() == []


def test_rows_slots_and_fa3_extents(runner):
    mgr, bs = runner.vattn, runner.vattn.layout.block_size
    row_len = mgr.layout.row_tokens
    # request states 0..2 hold rows; 0 and 2 decode one token, 1 prefills 5 tokens (FA3)
    rows = [mgr.acquire_row() for _ in range(3)]
    seq = [2 * bs + 3, bs + 5, 7]
    for i, (row, n) in enumerate(zip(rows, seq)):
        mgr.set_blocks(row, list(range(10 * i, 10 * i + -(-n // bs))))
        runner._row_np[i] = row
    order = np.array([2, 0, 1])  # the batch's order of request states (decodes first)
    q = np.array([1, 1, 5])
    positions = np.concatenate([np.arange(seq[s] - k, seq[s]) for s, k in zip(order, q)])
    batch = SimpleNamespace(num_reqs=3, num_reqs_after_padding=4, num_tokens=int(q.sum()), num_tokens_after_padding=8,
                            idx_mapping_np=order, num_scheduled_tokens=q,
                            seq_lens_cpu_upper_bound=torch.tensor([seq[s] for s in order]),
                            positions=torch.from_numpy(np.concatenate([positions, np.zeros(1)]).astype(np.int64)))
    (bt,), slots = runner.prepare_attn(batch)
    want_rows = [rows[s] for s in order]
    # the backend reads the first entries of the flat buffer (VattnMetadataBuilder: reshape(-1)[:num_reqs])
    assert bt.reshape(-1)[:4].tolist() == want_rows + [DUMMY_ROW]  # padded to 4 requests with the dummy row
    token_rows = np.repeat(want_rows, q)
    assert slots[0].tolist() == (token_rows * row_len + positions).tolist() + [-1]  # 7 tokens padded to 8
    # FA3 (the prefill) may read past its sequence; clipped to the view, the longest FA3 row (the
    # only one here) needs nothing more than its own blocks, the decodes (FA2) read what they hold
    assert runner._pending_reads == {want_rows[0]: -(-seq[2] // bs), want_rows[1]: -(-seq[0] // bs),
                                     want_rows[2]: -(-seq[1] // bs)}  # in block slots
    mgr.mapper.check_invariants()
    # its time went to the parts of prepare_attn (the sync mode has no stream wait), and adds up
    parts = runner.vattn_report()["hook_seconds"]
    assert all(parts[k] > 0 for k in ("rows", "extents", "publish", "stage")) and parts["stream_wait"] == 0
    assert sum(parts.values()) <= runner.prepare_seconds + 1e-4


def test_fa2_graphs_mixed_step_runs_one_launch_only_over_guarded_decode_rows(runner):
    """VATTN_DECODE_KERNEL=fa2-graphs (NOTES #110): prepare_attn tells every metadata builder the
    rule of the step (ops.plan_reads) and maps for that rule only. Unguarded decode rows: fa2's rule,
    nothing mapped past a decode row's blocks, its reads its tokens; once their guards are readable:
    one FA3 launch, the decode rows read up to their FA3 extent."""
    mgr, bs = runner.vattn, runner.vattn.layout.block_size
    runner.vattn_cfg = VattnConfig(background_map=False, decode_kernel="fa2-graphs")
    b = SimpleNamespace(mixed_kernel="unset", build_seconds=0.0)
    runner.attn_groups = [[SimpleNamespace(get_metadata_builder=lambda i: b)]]
    rows = [mgr.acquire_row() for _ in range(3)]
    seq = [2 * bs + 3, bs + 5, 3 * bs + 7]  # states 0 and 1 decode, 2 prefills 7 tokens (the longest)
    for i, (row, n) in enumerate(zip(rows, seq)):
        mgr.set_blocks(row, list(range(10 * i, 10 * i + -(-n // bs))))
        runner._row_np[i] = row
    q = np.array([1, 1, 7])
    positions = np.concatenate([np.arange(s - k, s) for s, k in zip(seq, q)])
    batch = SimpleNamespace(num_reqs=3, num_reqs_after_padding=3, num_tokens=9, num_tokens_after_padding=9,
                            idx_mapping_np=np.arange(3), num_scheduled_tokens=q,
                            seq_lens_cpu_upper_bound=torch.tensor(seq), positions=torch.from_numpy(positions))
    guard = runner.vattn_cfg.guard_tokens
    row_len = mgr.layout.row_tokens
    fa3_ext = [min(s + guard, row_len, max(seq)) for s in seq]  # (clipped to the longest FA3 sequence)
    runner.prepare_attn(batch)
    assert b.mixed_kernel == "fa2"
    # nothing mapped past the decode rows' blocks (they read only their tokens)
    assert all(x is None for r, n in zip(rows[:2], seq) for x in mgr.mapper.slots[r][-(-n // bs):])
    assert runner._pending_reads[rows[0]] == -(-seq[0] // bs) and runner._pending_reads[rows[1]] == -(-seq[1] // bs)
    # the decode rows' guards in place (as guard_ahead leaves them): the step runs as one launch
    for row, ext in zip(rows[:2], fa3_ext[:2]):
        mgr.ensure_readable(row, ext)
    mgr.sync()
    runner.prepare_attn(batch)
    assert b.mixed_kernel == "fa2-graphs"
    assert runner._pending_reads == {r: -(-e // bs) for r, e in zip(rows, fa3_ext)}
    assert runner.vattn_report()["mixed_steps_one_launch"] == 1 and runner.vattn_report()["mixed_steps_two_launches"] == 1
    mgr.mapper.check_invariants()


def test_unpadded_batch_leaves_the_slots_beyond_it_alone(runner):
    mgr = runner.vattn
    row = mgr.acquire_row()
    mgr.set_blocks(row, [5])
    runner._row_np[0] = row
    batch = SimpleNamespace(num_reqs=1, num_reqs_after_padding=1, num_tokens=1, num_tokens_after_padding=1,
                            idx_mapping_np=np.array([0]), num_scheduled_tokens=np.array([1]),
                            seq_lens_cpu_upper_bound=torch.tensor([4]), positions=torch.tensor([3, 0]))
    (bt,), slots = runner.prepare_attn(batch)
    assert bt.reshape(-1)[:1].tolist() == [row]
    assert slots[0].tolist() == [row * mgr.layout.row_tokens + 3]
    assert runner.block_tables.slot_mappings[0, 1:].eq(77).all()  # untouched: nothing was padded


def decode_batch(rows_of_states, seq):
    n = len(rows_of_states)
    return SimpleNamespace(num_reqs=n, num_reqs_after_padding=n, num_tokens=n, num_tokens_after_padding=n,
                           idx_mapping_np=np.arange(n), num_scheduled_tokens=np.ones(n, dtype=np.int32),
                           seq_lens_cpu_upper_bound=torch.tensor(seq), positions=torch.tensor(seq) - 1)


def test_decode_steps_send_rows_only_when_they_change(runner, monkeypatch):
    """A decode step of the same requests sends nothing to the GPU but computes the slots anew; a
    change of the batch, or a dummy run (which fills the buffer with the dummy row), sends again."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    mgr = runner.vattn
    row_len = mgr.layout.row_tokens
    rows = [mgr.acquire_row() for _ in range(2)]
    for i, row in enumerate(rows):
        mgr.set_blocks(row, [i])
        runner._row_np[i] = row
    bt = runner.block_tables.input_block_tables[0]

    def step(seq, expect_sent):
        PINNED.clear()
        _, slots = runner.prepare_attn(decode_batch(rows, seq))
        assert len(PINNED) == expect_sent
        assert bt.reshape(-1)[:2].tolist() == rows
        assert slots[0].tolist() == [r * row_len + s - 1 for r, s in zip(rows, seq)]
    step([5, 9], expect_sent=2)  # rows and row starts
    step([6, 10], expect_sent=0)  # the same requests: slots from the positions alone
    step([7, 11], expect_sent=0)
    monkeypatch.setattr(GPUModelRunner, "prepare_dummy_attn", lambda self, b: None)
    runner.prepare_dummy_attn(None)
    assert bt.reshape(-1)[:2].tolist() == [DUMMY_ROW, DUMMY_ROW]
    step([8, 12], expect_sent=1)  # the rows again (their starts on the GPU are unchanged)
    rows.reverse()  # the batch's order changed
    runner._row_np[:2] = rows
    step([13, 9], expect_sent=2)


def test_a_decode_step_that_reads_the_same_slots_hands_the_last_steps_reads_on(runner):
    """The fence's {row: slots read} is rebuilt only when a row crosses into a new block (or the
    batch changes); otherwise the last step's dict is handed on unchanged."""
    mgr = runner.vattn
    bs = mgr.layout.block_size
    rows = [mgr.acquire_row() for _ in range(2)]
    for i, row in enumerate(rows):
        mgr.set_blocks(row, [2 * i, 2 * i + 1])
        runner._row_np[i] = row
    runner.prepare_attn(decode_batch(rows, [bs + 1, bs + 2]))
    first = runner._pending_reads
    assert first == {rows[0]: 2, rows[1]: 2}
    runner.prepare_attn(decode_batch(rows, [bs + 2, bs + 3]))
    assert runner._pending_reads is first  # same slots: no new dict
    mgr.set_blocks(rows[1], [9], start=2)
    runner.prepare_attn(decode_batch(rows, [bs + 3, 2 * bs + 1]))  # row 1 crosses into its third block
    assert runner._pending_reads == {rows[0]: 2, rows[1]: 3} and first == {rows[0]: 2, rows[1]: 2}
    runner._row_np[:2] = rows[::-1]
    runner.prepare_attn(decode_batch(rows[::-1], [2 * bs + 1, bs + 3]))  # the batch's order changed
    assert list(runner._pending_reads) == rows[::-1]


def test_step_trace_records_each_steps_new_requests_tokens_and_maps(runner, monkeypatch, tmp_path):
    """VATTN_STEP_TRACE: execute_model appends one record per step (after vLLM's own warm-up, whose
    end resets the timers), with the block maps planned on the step's path; no flag wait in the
    synchronous mode (-1)."""
    import dataclasses
    import json

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    mgr = runner.vattn
    assert runner.step_trace is None  # not asked for
    runner.vattn_cfg = dataclasses.replace(runner.vattn_cfg, step_trace=str(tmp_path / "steps.json"))
    runner.reset_timers()
    row = mgr.acquire_row()

    def fake_step(self, so):  # stands in for vLLM's step: admitting maps the new request's blocks
        if so.scheduled_new_reqs:
            mgr.set_blocks(row, [1, 2, 3])
            self.prepare_seconds += 0.002  # as if prepare_attn took 2 ms
            self.hook_seconds["admit"] += 0.0005  # and the admission hook 0.5 ms
        return "out"
    monkeypatch.setattr(GPUModelRunner, "execute_model", fake_step)
    assert runner.execute_model(SimpleNamespace(scheduled_new_reqs=["a"], total_num_scheduled_tokens=40)) == "out"
    runner.execute_model(SimpleNamespace(scheduled_new_reqs=[], total_num_scheduled_tokens=1))
    steps = runner.step_trace.steps
    assert [s[2:7] for s in steps] == [(1, 40, 3, 0, -1), (0, 1, 0, 0, -1)]
    assert 0 <= steps[0][0] <= steps[1][0] and all(s[1] >= 0 for s in steps)
    # our hooks' share of each step: prepare_attn and the request hooks (plus the fence and warm(),
    # which the synchronous mode does not run here), not the rest of vLLM's step
    assert steps[0][7] == pytest.approx(2.5, abs=0.05) and steps[1][7] == pytest.approx(0.0, abs=0.05)
    # the admitting step's hooks part by part (TRACE_PARTS); none kept for the other step
    from vllm_vattention.worker import TRACE_PARTS
    parts = dict(zip(TRACE_PARTS, steps[0][8]))
    assert parts["admit"] == pytest.approx(0.5, abs=0.05) and sum(parts.values()) == pytest.approx(0.5, abs=0.05)
    assert steps[1][8] == [0.0] * len(TRACE_PARTS)  # a decode step keeps its parts too (here: none spent)
    runner.step_trace.write(None)
    assert json.load(open(tmp_path / "steps.json"))["steps"][0][2:7] == [1, 40, 3, 0, -1]


def test_execute_model_asks_warm_for_clipped_guards_after_a_long_decode_step_only(runner, monkeypatch):
    """After a long decode step (VATTN_FA3_DECODE_TOKENS), whose FA3 view ends at its longest row, warm()
    is told so (clip_guards: guards up to that row where whole ones are over their share, NOTES #135);
    after any other step it is not."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    runner.vattn_cfg = VattnConfig(background_map=False, decode_kernel="fa2-graphs", fa3_decode_tokens=100,
                                   fa3_decode_row_tokens=0)
    calls = []
    monkeypatch.setattr(runner.vattn, "warm", lambda defer=False, clip_guards=False: calls.append(clip_guards))
    monkeypatch.setattr(runner.vattn, "guard_ahead", 2)  # (fa2-graphs keeps guards ahead: warm() runs)
    from vllm_vattention import worker
    monkeypatch.setattr(worker, "EventFence", lambda: "fence")  # (a CUDA event: no GPU here)
    monkeypatch.setattr(runner.vattn, "record_read_slots", lambda fence, reads: None)

    def fake_step(self, so):  # stands in for vLLM's step: prepare_attn left the step's reads
        self._pending_reads = {1: 2}
        return "out"
    monkeypatch.setattr(GPUModelRunner, "execute_model", fake_step)

    def out(computed, sched=1):
        ids = [f"r{i}" for i in range(len(computed))]
        return SimpleNamespace(scheduled_new_reqs=[], total_num_scheduled_tokens=sched * len(ids),
                               scheduled_cached_reqs=SimpleNamespace(req_ids=ids, num_computed_tokens=list(computed)),
                               num_scheduled_tokens=dict.fromkeys(ids, sched), scheduled_spec_decode_tokens={})
    runner.execute_model(out([60, 60]))  # long: 122 tokens of context
    runner.execute_model(out([10, 10]))  # decode-only, short
    runner.execute_model(out([60, 60], sched=4))  # prefill chunks: not decode-only
    assert calls == [True, False, False]


def test_step_trace_warns_when_the_server_may_kill_the_engine_before_it_is_written(runner, monkeypatch):
    """The trace is written at engine shutdown: with vLLM's --shutdown-timeout 0 the server kills
    the engine at once, so asking for a trace then logs how to keep it."""
    import dataclasses

    from vllm_vattention import worker
    warnings: list[str] = []
    monkeypatch.setattr(worker.logger, "warning", lambda msg, *a: warnings.append(msg % a))
    runner.vattn_cfg = dataclasses.replace(runner.vattn_cfg, step_trace="/tmp/steps.json")
    for timeout, warned in ((0, True), (30, False)):
        runner.vllm_config = SimpleNamespace(shutdown_timeout=timeout)
        runner.step_trace = None  # (as before the first reset)
        warnings.clear()
        runner.reset_timers()
        assert runner.step_trace is not None
        assert any("--shutdown-timeout 30" in w for w in warnings) == warned
    # the reset after vLLM's warm-up starts a new trace without saying it again
    runner.vllm_config = SimpleNamespace(shutdown_timeout=0)
    warnings.clear()
    runner.reset_timers()
    assert runner.step_trace is not None and warnings == []


def test_stock_runner_traces_steps_in_the_same_format(monkeypatch, tmp_path):
    """TracedModelRunner (a stock run with VATTN_STEP_TRACE): one record per step with no block maps,
    DRAINs or flag wait, nothing before vLLM's warm-up ends, written at shutdown; bench.serve_hits
    reads it as it reads vAttention's."""
    import json

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm_vattention.bench.serve_hits import ttft_windows
    from vllm_vattention.worker import StepTrace, TracedModelRunner
    monkeypatch.setattr(GPUModelRunner, "execute_model", lambda self, so: "out")
    monkeypatch.setattr(GPUModelRunner, "shutdown", lambda self: None)
    r = object.__new__(TracedModelRunner)
    assert r.execute_model(SimpleNamespace(scheduled_new_reqs=["w"], total_num_scheduled_tokens=2)) == "out"
    r.step_trace = StepTrace(str(tmp_path / "steps.json"))  # (TracedWorker: after the warm-up)
    r.execute_model(SimpleNamespace(scheduled_new_reqs=["a", "b"], total_num_scheduled_tokens=2048))
    r.execute_model(SimpleNamespace(scheduled_new_reqs=[], total_num_scheduled_tokens=2))
    assert [s[2:] for s in r.step_trace.steps] == [(2, 2048, 0, 0, -1, 0.0, None), (0, 2, 0, 0, -1, 0.0, None)]
    t0 = r.step_trace.t0
    r.shutdown()
    assert r.step_trace is None
    trace = json.load(open(tmp_path / "steps.json"))
    assert len(trace["steps"]) == 2 and trace["flag_waits_ms"] is None
    # a request that arrived just before the first step and got its first token after the second
    end = trace["steps"][1][0] + trace["steps"][1][1] / 1e3
    win = ttft_windows({"t0": t0, "start_s": [-1e-6], "ttft_ms": [(end + 1e-3) * 1e3]}, trace)[0]
    assert win["steps"] == 2 and win["block_maps"] == 0 and win["flag_ms"] == 0


def test_a_long_decode_step_runs_fa3_and_maps_the_guards_it_lacks_up_to_the_longest_row(runner):
    """VATTN_FA3_DECODE_TOKENS (NOTES #128, #129): a decode step execute_model found long (_fa3_decode)
    runs FA3 over every row: the builders are told (decode_fa3). With VATTN_FA3_GUARD=clipped (the
    default) its view ends at the longest row, so a shorter row reads up to that row's end and no
    further; the slots it lacks there are mapped on the step's path (long_decode_steps_mapped), and
    a later step finds them in place."""
    mgr, bs = runner.vattn, runner.vattn.layout.block_size
    runner.vattn_cfg = VattnConfig(background_map=False, decode_kernel="fa2-graphs", fa3_decode_tokens=1)
    runner.reset_timers()
    b = SimpleNamespace(mixed_kernel="unset", decode_fa3="unset", build_seconds=0.0)
    runner.attn_groups = [[SimpleNamespace(get_metadata_builder=lambda i: b)]]
    rows = [mgr.acquire_row() for _ in range(2)]
    seq = [3 * bs + 3, bs + 1]  # 4 blocks and 2
    for i, (row, n) in enumerate(zip(rows, seq)):
        mgr.set_blocks(row, list(range(10 * i, 10 * i + -(-n // bs))))
        runner._row_np[i] = row
    batch = SimpleNamespace(num_reqs=2, num_reqs_after_padding=2, num_tokens=2, num_tokens_after_padding=2,
                            idx_mapping_np=np.arange(2), num_scheduled_tokens=np.array([1, 1]),
                            seq_lens_cpu_upper_bound=torch.tensor(seq),
                            positions=torch.tensor([s - 1 for s in seq]))
    runner._fa3_decode = True
    asked = []  # spare_guards: spares freed from free rows for the slots it lacks first (NOTES #135)
    spare_guards = mgr.spare_guards
    mgr.spare_guards = lambda r, n: asked.append((list(r), list(n))) or spare_guards(r, n)
    runner.prepare_attn(batch)
    assert asked == [(rows, [max(seq)] * 2)]  # (no spares here: it frees none)
    assert b.decode_fa3 is True and b.mixed_kernel == "fa3"
    view_slots = -(-max(seq) // bs)  # 4: the shorter row's third and fourth slots are its guard
    assert runner._pending_reads == dict.fromkeys(rows, view_slots)
    assert None not in mgr.mapper.slots[rows[1]][2:4]  # mapped for the step (no spare here: the zero page)
    assert all(x is None for r in rows for x in mgr.mapper.slots[r][view_slots:])  # nothing past the view
    report = runner.vattn_report()
    assert (report["long_decode_steps_fa3"], report["long_decode_steps_fa2"], report["long_decode_steps_mapped"]) \
        == (1, 0, 1)
    mgr.sync()
    runner.prepare_attn(batch)  # the guard in place now: nothing mapped on the step's path
    report = runner.vattn_report()
    assert (report["long_decode_steps_fa3"], report["long_decode_steps_mapped"]) == (2, 1)
    runner._fa3_decode = False  # a step that is not long: FA2 as ever, reading no guard
    runner.prepare_attn(batch)
    assert b.decode_fa3 is False and b.mixed_kernel == "fa2-graphs"
    assert runner._pending_reads == {r: -(-n // bs) for r, n in zip(rows, seq)}
    mgr.mapper.check_invariants()


def test_long_decode_steps_take_the_piecewise_graph_and_others_are_dispatched_as_before():
    """The runner's CUDA-graph dispatch, wrapped once (idempotent): a long decode step is dispatched
    as a batch of mixed lengths (no full decode graph matches it: vLLM takes the piecewise one);
    every other step reaches vLLM's dispatch unchanged."""
    from vllm_vattention.worker import _dispatch_long_decodes_piecewise
    seen = []
    manager = SimpleNamespace(dispatch=lambda *a, **k: seen.append((a, k)) or "desc")
    runner = SimpleNamespace(cudagraph_manager=manager, _fa3_decode=False)
    _dispatch_long_decodes_piecewise(runner)
    wrapped = manager.dispatch
    _dispatch_long_decodes_piecewise(runner)
    assert manager.dispatch is wrapped
    assert manager.dispatch(64, 64, 1, 0) == "desc" and seen[-1] == ((64, 64, 1, 0), {})
    runner._fa3_decode = True
    assert manager.dispatch(64, 64, 1, num_active_loras=0) == "desc"
    assert seen[-1] == ((64, 64, None), {"num_active_loras": 0})


def test_execute_model_finds_long_decode_steps_from_the_scheduler_output():
    """_is_long_decode: only with VATTN_FA3_DECODE_TOKENS, only decode-only steps with no new request,
    contexts from the scheduler's computed tokens (+1 each), averaging VATTN_FA3_DECODE_ROW_TOKENS;
    off before the KV cache exists and with VATTN_FA3_DECODE_TOKENS=0."""
    r = object.__new__(VattnModelRunner)
    assert r._is_long_decode(SimpleNamespace(scheduled_new_reqs=[])) is False  # (profiling run: no config)

    def out(computed, new=(), sched=None):
        ids = [f"r{i}" for i in range(len(computed))]
        return SimpleNamespace(scheduled_new_reqs=list(new),
                               scheduled_cached_reqs=SimpleNamespace(req_ids=ids, num_computed_tokens=list(computed)),
                               num_scheduled_tokens=sched or dict.fromkeys(ids, 1))
    r.vattn_cfg = VattnConfig(decode_kernel="fa2-graphs", fa3_decode_tokens=100, fa3_decode_row_tokens=0)
    assert r._is_long_decode(out([60, 38])) and not r._is_long_decode(out([60, 37]))  # 61 + 39 = 100; 99
    assert not r._is_long_decode(out([60, 39], new=["n"]))  # a new request's prefill in the step
    assert not r._is_long_decode(out([60, 39], sched={"r0": 1, "r1": 4}))  # a chunk: not decode-only
    r.vattn_cfg = VattnConfig(decode_kernel="fa2-graphs", fa3_decode_tokens=100, fa3_decode_row_tokens=50)
    assert r._is_long_decode(out([60, 39])) and not r._is_long_decode(out([60, 37]))  # averages 50.5; 49.5
    r.vattn_cfg = VattnConfig(decode_kernel="fa2-graphs")  # the defaults: 450K tokens, 6,144 a request
    assert r._is_long_decode(out([8300] * 64)) and not r._is_long_decode(out([2200] * 256))
    r.vattn_cfg = VattnConfig(decode_kernel="fa2-graphs", fa3_decode_tokens=0)
    assert not r._is_long_decode(out([10_000] * 64))  # off
