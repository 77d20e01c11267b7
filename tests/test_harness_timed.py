"""The CPU harness's --timed model of the native thread (benchmarks/cpu_sched_overhead.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
H = pytest.importorskip("cpu_sched_overhead")  # (imports vLLM's scheduler: present wherever the tests run)

from vllm_vattention.memory.executor import ACCESS_RW, DRAIN, MAP, SIGNAL, UNMAP  # noqa: E402

PAGE = 2 << 20


def test_background_ops_run_while_idle_and_a_drain_runs_the_queue_up_to_its_mark():
    clock = [0.0, 0.0]
    ex = H._TimedExecutor(clock)
    unmap = (UNMAP, 0, PAGE, 0)
    assert ex.run_background([unmap] * 100) == 100  # 100 x 27.2 us = 2.72 ms of work from t=0
    clock[0] = 0.001  # 1 ms later: 37 of them have run, the 37th... runs past 1 ms
    ex.run([(MAP, 0, PAGE, 1), (ACCESS_RW, 0, 2 * PAGE, 0), (SIGNAL, 0, 0, 0)])
    assert ex.ran == 37 and ex.drained == 0
    # the batch waited for the op in progress, then ran: map 4.7 us + set_access over 2 pages 56.2 us
    assert ex.critical_done == pytest.approx(37 * 27.2e-6 + 4.7e-6 + 2 * 28.1e-6)
    ex.run([(DRAIN, 0, 0, 90)])  # the step needs the first 90 background ops: 53 more run first
    assert ex.ran == 90 and ex.drained == 53
    assert ex.critical_done == pytest.approx(90 * 27.2e-6 + 4.7e-6 + 2 * 28.1e-6)
    clock[0] = 1.0  # long after: the rest ran while the thread had nothing else
    ex.run([])
    assert ex.ran == 100 and ex.critical_done == pytest.approx(1.0)


def test_flag_model_bounds_the_wait_by_the_step_before():
    # (planned at s, modeled ms, new requests, ms its batch ran past planning (None: none), drained)
    timeline = [(0.0, 6.0, 1, 2.0, 0), (0.006, 5.0, 0, None, 0), (0.011, 5.0, 1, 7.5, 40), (0.016, 5.0, 0, 0.5, 0)]
    m = H.flag_model(timeline)
    # at most: every late ms (2 + 7.5 + 0.5); at least: past the step before's ms (2 - 0, 7.5 - 5, 0.5 - 5 -> 0)
    assert m["wait_s_at_most"] == pytest.approx(0.010) and m["wait_s_at_least"] == pytest.approx(0.0045)
    assert m["longest_ms_at_least"] == 2.5 and m["steps_over_1ms_at_least"] == 2 and m["steps_with_a_batch"] == 3
    assert m["admitting_wait_s_at_least"] == pytest.approx(0.0045) and m["most_drained_in_a_step"] == 40
    assert sum(m["wait_s_at_least_by_quarter"]) == pytest.approx(0.0045)


def test_each_steps_hooks_are_reported_apart_for_admitting_steps():
    """The harness's per-step hook time (what the step trace's hooks_ms measures on a server, less the
    driver's calls), split by whether the step admits requests: an admission plans a row and its
    blocks, so its step's hooks take longer than a decode step's."""
    r = H.run("serve-rate-4", 57174, None, serve_prompts="distinct", warmup=False)
    adm, other = r["admitting_hooks_ms_p50"], r["other_steps_hooks_ms_p50"]
    assert r["admitting_steps"] > 0 and adm > 0 and other > 0
    assert r["admitting_hooks_ms_p90"] >= adm and r["other_steps_hooks_ms_p90"] >= other
    assert adm > other
    assert H._p50_p90([]) == {"p50": 0.0, "p90": 0.0} and H._p50_p90([3.0, 1.0, 2.0]) == {"p50": 2.0, "p90": 3.0}
    assert H._p50_p90([1.0] * 8 + [5.0, 6.0])["p90"] == 5.0  # nearest rank, as serve_hits' p90 for the server
    # and by part, per kind of admitting step (as the step trace's hook_parts_ms, NOTES #93/#94): 1,024-token
    # prompts with no shared block are all prefill admissions; an admission plans its row in "admit"
    parts = r["admitting_parts_ms_p50"]
    assert list(parts) == ["new, >= 256 tokens"] and list(parts["new, >= 256 tokens"]) == list(H.PHASES)
    assert parts["new, >= 256 tokens"]["admit"] > 0 and parts["new, >= 256 tokens"]["remove"] >= 0
    # the other steps by part too: decode steps admit nothing, and extend rows as requests grow
    other = r["other_steps_parts_ms_p50"]
    assert list(other) == list(H.PHASES) and other["admit"] < parts["new, >= 256 tokens"]["admit"]
    assert other["read_extents"] > 0


def test_long_decode_steps_run_fa3_in_the_harness_by_default_and_not_with_0():
    """--fa3-decode-tokens (VATTN_FA3_DECODE_TOKENS, NOTES #130, the default's 450K since #133): the harness
    plans each long decode step as the worker does (ops.long_decode, plan_reads(long_decode=True)); every
    one runs FA3, its guard slots mapped on its path where they were not in place; with 0 no step is long."""
    kw = dict(warmup=False, keep_guards=True)
    r = H.run("8192-in-256-out", 57174, None, **kw)
    long = r["long_decode_steps_by_rule"]
    assert list(long) == ["fa3"] and 200 <= long["fa3"] < r["steps"]  # 64 x ~8.3K decode steps: ~531K tokens
    assert r["pad_maps"] > 0  # (their guards, up to the longest row)
    # with clipped guards (NOTES #135) those are mostly spares, mapped in the background: few zero-page
    # slots, so few growths into one wait for a step in flight (here 49 and 26, against 565 and 208)
    rc = H.run("8192-in-256-out", 57174, None, clip_guards=False, **kw)
    assert rc["long_decode_steps_by_rule"] == long and rc["zero_maps"] > 100 and rc["hazard_waits"] > 30
    assert 5 * r["zero_maps"] < rc["zero_maps"] and 5 * r["hazard_waits"] < rc["hazard_waits"]
    assert r["guard_ahead_maps"] > rc["guard_ahead_maps"]
    r0 = H.run("8192-in-256-out", 57174, None, fa3_decode_tokens=0, **kw)
    assert "long_decode_steps_by_rule" not in r0 and r0["zero_maps"] == 0
    # fa2 has no such path: the harness takes the plugin's default for the kernel (0)
    r2 = H.run("8192-in-256-out", 57174, None, decode_kernel="fa2", warmup=False)
    assert "long_decode_steps_by_rule" not in r2


def test_mixed_lengths_stay_on_fa2_by_the_average_per_request():
    """VATTN_FA3_DECODE_ROW_TOKENS (NOTES #134): mixed-64-4096-in's decode-only steps reach 450K tokens of
    context, but over ~2K-token rows. Without the average they would run FA3, every row shorter than the
    longest taking its whole guard on the step's path, mostly the zero page (out of spares), and each
    growth into it an unmap that waits for the step in flight; with the default average none is long."""
    kw = dict(warmup=False, keep_guards=True)
    r = H.run("mixed-64-4096-in", 57174, None, **kw)
    assert r.get("long_decode_steps_by_rule", {}) == {}
    r0 = H.run("mixed-64-4096-in", 57174, None, fa3_decode_row_tokens=0, **kw)
    assert r0["long_decode_steps_by_rule"]["fa3"] > 100
    # (15 zero-page slots and 1 hazard wait without the long steps, from mixed steps; 6,484 and 223 with them)
    assert r0["zero_maps"] > 100 * max(r["zero_maps"], 1) and r0["hazard_waits"] > 100 * max(r["hazard_waits"], 1)


def test_a_row_drain_runs_only_its_rows_ops_up_to_the_mark():
    """VATTN_ROW_DRAIN in the model (NOTES #143): behind a long queue, a step that changes row 1 waits
    for row 1's ops only; an op of no row ahead of them keeps the queue's order."""
    from vllm_vattention.memory.executor import DRAIN_ROW, WAIT_EVENT
    clock = [0.0, 0.0]
    ex = H._TimedExecutor(clock)
    row_bytes = 64 * PAGE
    ex.set_rows(0, 1, 4 * row_bytes, row_bytes, 4)
    ex.run_background([(UNMAP, 0, PAGE, 0)] * 100)  # row 0: 2.72 ms of unmaps
    mark = ex.run_background([(MAP, row_bytes + i * PAGE, PAGE, 1) for i in range(4)]  # row 1's warming
                             + [(ACCESS_RW, row_bytes, 4 * PAGE, 0)])
    ex.run([(DRAIN_ROW, 0, 1, mark)])  # at t=0: only row 1's five ops run first
    assert ex.drained == 5 and ex.critical_done == pytest.approx(4 * 4.7e-6 + 4 * 28.1e-6)
    clock[0] = 1.0
    ex.run([])  # row 0's ran in idle time; row 1's are not run twice
    assert ex.ran == 105 and ex.t == pytest.approx(1.0)
    ex2 = H._TimedExecutor([0.0, 0.0])
    ex2.set_rows(0, 1, 4 * row_bytes, row_bytes, 4)
    ex2.run_background([(UNMAP, 0, PAGE, 0)] * 10 + [(WAIT_EVENT, 0, 0, 7)])  # a wait: no row
    mark = ex2.run_background([(MAP, row_bytes, PAGE, 1)])
    ex2.run([(DRAIN_ROW, 0, 1, mark)])
    assert ex2.drained == 12 and ex2.critical_done == pytest.approx(10 * 27.2e-6 + 4.7e-6)
