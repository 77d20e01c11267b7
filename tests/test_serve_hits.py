"""Serving TTFT split by prefix hits (bench.serve_hits): the replay of the server's prefix cache and
the per-class report, on made-up prompts and times."""

import pytest

from vllm_vattention.bench import serve_hits as H


def test_leading_hits_follow_the_prefix_chain():
    a = list(range(48))            # 3 blocks of 16
    b = a[:32] + [99] * 16         # shares a's first two blocks
    c = [7] + a[1:48]              # same later blocks as a, but its first differs: no hit at all
    d = a[:16] + [5] * 16 + a[32:48]  # block 2 equals a's, but its parent differs: one hit
    seen = set()
    assert H.leading_hits([a, b, c, d, a], 16, seen) == [0, 2, 0, 1, 3]
    assert H.leading_hits([b], 16, seen) == [3]  # `seen` carries over (one server, two workloads)
    assert H.hit_class(0, 48, 16) == "no hit" and H.hit_class(2, 48, 16) == "some hits"
    assert H.hit_class(3, 50, 16) == "whole prompt"  # the partial last block is recomputed either way


def test_report_replays_each_servers_workloads_in_order_and_compares_classes():
    prompts = {"serve-rate-4": [list(range(32)), list(range(32)), [9] * 32],
               "serve-rate-16": [list(range(32)), [8] * 32]}

    def per(ttfts):
        return {"start_s": list(range(len(ttfts))), "ttft_ms": ttfts, "tpot_ms": [5.0] * len(ttfts),
                "input_len": [32] * len(ttfts)}

    res = []
    for system, scale in (("stock-fa3", 1.0), ("vattn-fa2", 2.0)):
        # listed rate-16 first: the replay still runs rate-4 first (the suite's order), so rate-16's
        # first prompt hits what rate-4 wrote
        res.append({"workload": "serve-rate-16", "system": system, "rep": 0, "call": 1,
                    "per_request": per([10 * scale, 40.0])})
        res.append({"workload": "serve-rate-4", "system": system, "rep": 0, "call": 1,
                    "per_request": per([40.0, 10 * scale, 40.0])})
    res.append({"workload": "serve-rate-4-distinct", "system": "stock-fa3", "rep": 0, "call": 1,
                "per_request": per([1.0])})  # custom prompts: not replayed
    rows = H.classify(res, lambda name, n, i, o: prompts[name])
    # the client sends each workload's first prompt once before the run (its test request), so
    # the first measured request already hits it
    assert [r["class"] for r in rows if r["workload"] == "serve-rate-4" and r["system"] == "stock-fa3"] == [
        "whole prompt", "whole prompt", "no hit"]
    assert [r["class"] for r in rows if r["workload"] == "serve-rate-16" and r["system"] == "vattn-fa2"] == [
        "whole prompt", "no hit"]
    assert {(r["workload"], r["system"]) for r in rows} == {
        (w, s) for w in ("serve-rate-4", "serve-rate-16") for s in ("stock-fa3", "vattn-fa2")}
    md = H.markdown(rows)
    assert "| serve-rate-4 | whole prompt | 2 | stock-fa3 | 25.00 | 1.000x | 5.00 | 1.000x |" in md
    assert "| serve-rate-4 | whole prompt | 2 | vattn-fa2 | 30.00 | 1.200x | 5.00 | 1.000x |" in md
    assert "| serve-rate-4 | no hit | 1 | vattn-fa2 | 40.00 | 1.000x |" in md
    # a result whose request count differs from the rebuilt prompts is refused, not misaligned
    res[1]["per_request"] = per([1.0, 2.0])
    with pytest.raises(ValueError, match="2 requests measured, 3 prompts rebuilt"):
        H.classify(res, lambda name, n, i, o: prompts[name])


def test_ttft_windows_line_requests_up_with_the_servers_steps():
    """Both clocks are time.perf_counter on one machine: a request that arrived at 1000.10 s with a
    TTFT of 25 ms saw the steps begun in [1000.10, 1000.125]."""
    trace = {"t0": 1000.0, "fields": ["start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait"],
             "steps": [[0.095, 5.0, 0, 3, 0, 0, -1], [0.102, 6.0, 1, 1027, 4, 1, 0], [0.110, 5.5, 0, 4, 1, 0, 1],
                       [0.130, 5.0, 0, 4, 0, 0, -1]],
             "flag_waits_ms": [2.5, 0.25]}
    per = {"t0": 1000.1, "start_s": [0.0, 0.05], "ttft_ms": [25.0, 10.0], "tpot_ms": [5.0, 5.0], "input_len": [1024, 1024]}
    first, late = H.ttft_windows(per, trace)
    assert first == {"steps": 2, "execute_ms": 11.5, "flag_ms": 2.75, "block_maps": 5, "drains": 1,
                     "to_first_step_ms": pytest.approx(2.0)}
    assert late["steps"] == 0 and late["to_first_step_ms"] is None  # after the last step traced
    rows = [{"workload": "serve-rate-4", "class": "no hit", "system": "vattn-fa2", "ttft_ms": 25.0, "window": first}]
    assert "| serve-rate-4 | no hit | vattn-fa2 | 1 | 25.00 | 2.00 | 11.50 | 2.75 | 5.00 | 1.00 | 2.00 |" in \
        H.window_markdown(rows)


def test_classify_attaches_windows_from_the_results_trace():
    per = {"t0": 1000.1, "start_s": [0.0], "ttft_ms": [25.0], "tpot_ms": [5.0], "input_len": [32]}
    trace = {"t0": 1000.0, "fields": ["start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait"],
             "steps": [[0.11, 5.0, 1, 32, 2, 0, -1]], "flag_waits_ms": []}
    res = [{"workload": "serve-rate-4", "system": "vattn-fa2", "rep": 0, "call": 1, "per_request": per,
            "step_trace": "steps-x.json"},
           {"workload": "serve-rate-4", "system": "stock-fa3", "rep": 0, "call": 1, "per_request": per,
            "step_trace": None}]
    loaded = []
    rows = H.classify(res, lambda name, n, i, o: [list(range(32))],
                      load_trace=lambda name: loaded.append(name) or trace)
    assert loaded == ["steps-x.json"]
    assert rows[0]["window"]["block_maps"] == 2 and rows[1]["window"] is None


def test_cli_reads_the_result_and_its_traces_from_the_results_folder(tmp_path, monkeypatch, capsys):
    import json
    per = {"t0": 1000.1, "start_s": [0.0], "ttft_ms": [25.0], "tpot_ms": [5.0], "input_len": [32]}
    trace = {"t0": 1000.0, "fields": ["start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait"],
             "steps": [[0.11, 5.0, 1, 32, 2, 0, 0]], "flag_waits_ms": [1.5]}
    (tmp_path / "steps-v.json").write_text(json.dumps(trace))
    res = {"results": [{"workload": "serve-rate-4", "system": s, "rep": 0, "call": 1, "per_request": per,
                        "step_trace": "steps-v.json" if s == "vattn-fa2" else None}
                       for s in ("stock-fa3", "vattn-fa2")]}
    (tmp_path / "r.json").write_text(json.dumps(res))
    monkeypatch.setattr(H, "bench_serve_prompts", lambda model, n, i, o: [list(range(32))])
    H.main([str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| serve-rate-4 | whole prompt | 1 | vattn-fa2 | 25.00 | 1.000x |" in out  # the test request cached it
    assert "| serve-rate-4 | whole prompt | vattn-fa2 | 1 | 25.00 | 1.00 | 5.00 | 1.50 | 2.00 | 0.00 | 10.00 |" in out
    # a committed trace is kept compressed (steps-v.json.gz): read in place of the missing .json
    import gzip
    with gzip.open(tmp_path / "steps-v.json.gz", "wt") as f:
        f.write(json.dumps(trace))
    (tmp_path / "steps-v.json").unlink()
    H.main([str(tmp_path / "r.json")])
    assert "| serve-rate-4 | whole prompt | vattn-fa2 | 1 | 25.00 | 1.00 | 5.00 | 1.50 | 2.00 | 0.00 | 10.00 |" in \
        capsys.readouterr().out
    (tmp_path / "steps-v.json.gz").unlink()
    # a trace cut off mid-write (an engine killed at shutdown): the classes are still reported,
    # without the step windows, and stderr says which file it could not read
    (tmp_path / "steps-v.json").write_text(json.dumps(trace)[:40])
    H.main([str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert "| serve-rate-4 | whole prompt | 1 | vattn-fa2 | 25.00 | 1.000x |" in captured.out
    assert "What the server's steps did" not in captured.out and "steps-v.json: not a whole trace" in captured.err


def test_by_time_compares_each_slice_of_the_run_with_the_baselines_same_slice():
    """Requests in send order, cut into equal slices; repetitions pooled; any dataset (a -distinct
    workload has no hit classes but has per-request times)."""
    def per(ttft, tpot):
        return {"t0": 0.0, "start_s": list(range(len(ttft))), "ttft_ms": ttft, "tpot_ms": tpot, "input_len": [8] * len(ttft)}
    res = [{"workload": "serve-rate-4-distinct", "system": "stock-fa3", "per_request": per([10, 10, 20, 20], [5, 5, 5, None])},
           {"workload": "serve-rate-4-distinct", "system": "vattn-fa2", "per_request": per([30, 30, 20, 20], [5, 5, 6, 6])},
           {"workload": "serve-rate-4-distinct", "system": "vattn-fa2", "per_request": per([50, 50, 20, 20], [5, 5, 6, 6])},
           {"workload": "serve-rate-4", "system": "stock-fa3", "per_request": None}]  # kept no times: left out
    out = H.by_time(res, parts=2)
    lines = [line for line in out.splitlines() if line.startswith("| serve")]
    assert lines == ["| serve-rate-4-distinct | 0-1 | stock-fa3 | 10.00 | 1.000x | 5.00 | 1.000x |",
                     "| serve-rate-4-distinct | 0-1 | vattn-fa2 | 40.00 | 4.000x | 5.00 | 1.000x |",  # 30, 30, 50, 50 pooled
                     "| serve-rate-4-distinct | 2-3 | stock-fa3 | 20.00 | 1.000x | 5.00 | 1.000x |",  # a one-token output: no TPOT
                     "| serve-rate-4-distinct | 2-3 | vattn-fa2 | 20.00 | 1.000x | 6.00 | 1.200x |"]


def test_step_kinds_split_each_traced_run_by_what_its_steps_scheduled():
    """Steps inside the run's window (first arrival to the last request's last token) by kind, with
    the time to the next step; steps outside it (another workload's) are left out."""
    per = {"t0": 1000.0, "start_s": [0.0, 0.01], "ttft_ms": [20.0, 20.0], "tpot_ms": [0.04, 0.04],
           "input_len": [1024, 1024]}  # serve-rate-4: 128 tokens out, the last ends at 1000.01 + 0.02 + 0.00508
    fields = ["start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait"]
    trace = {"t0": 1000.0, "fields": fields, "flag_waits_ms": None,
             "steps": [[-0.5, 9.0, 1, 1024, 0, 0, -1],  # before the run: left out
                       [0.000, 20.0, 1, 1024, 0, 0, -1], [0.022, 1.0, 0, 1, 0, 0, -1],
                       [0.027, 3.0, 1, 40, 0, 0, -1], [0.033, 1.5, 0, 2, 0, 0, -1], [0.034, 1.0, 0, 2, 0, 0, -1],
                       [0.5, 9.0, 0, 2, 0, 0, -1]]}  # after it: left out
    res = [{"workload": "serve-rate-4", "system": s, "rep": 0, "per_request": per, "step_trace": f"steps-{s}.json"}
           for s in ("stock-fa3", "vattn-fa2")]
    rows = H.step_kinds(res, lambda name: trace)
    mine = {(r["system"], r["kind"]): r for r in rows}
    assert len(rows) == 6  # both systems, three kinds each (the last step in the window has no next)
    big, new_short, none = (mine[("vattn-fa2", k)] for k in H.STEP_KINDS[::-1])
    assert big["steps"] == 1 and big["to_next_ms_p50"] == pytest.approx(22.0) and big["execute_ms_p50"] == 20.0
    assert new_short["steps"] == 1 and new_short["to_next_ms_p50"] == pytest.approx(6.0)
    assert none["steps"] == 2 and none["to_next_ms_p50"] == pytest.approx(3.0)  # 5 and 1 ms
    assert none["to_next_s_sum"] == pytest.approx(0.006)
    md = H.step_kinds_markdown(rows)
    assert "| serve-rate-4 | stock-fa3 | 0 | new, >= 256 tokens | 1 | 20.00 | - | - | 22.00 | 0.02 |" in md
    # a trace with our hooks' time per step (NOTES #88) gets that column filled
    hooked = {**trace, "fields": fields + ["hooks_ms"], "steps": [st + [0.75] for st in trace["steps"]]}
    (row,) = [r for r in H.step_kinds(res[1:], lambda name: hooked) if r["kind"] == "new, < 256 tokens"]
    assert row["hooks_ms_p50"] == 0.75 and "| 3.00 | 0.75 | 0.75 | 6.00 |" in H.step_kinds_markdown([row])
    # and its tail: the 90th percentile by nearest rank (one slow step in ten does not show, two do; NOTES #99)
    assert H.p90([1.0] * 9 + [5.0]) == 1.0 and H.p90([1.0] * 8 + [5.0, 6.0]) == 5.0 and H.p90([2.0]) == 2.0
    assert H.step_kind(0, 5000) == "no new request" and H.step_kind(2, 255) == "new, < 256 tokens"
    # the backlog signs per run: at most one request was admitted per step here
    assert all(r["max_admitted"] == 1 and r["steps_admitting_3"] == 0 for r in rows)
    assert "| serve-rate-4 | vattn-fa2 | 0 | 1 | 0 |" in md
    burst = {**trace, "steps": trace["steps"][:2] + [[0.024, 30.0, 4, 4096, 0, 0, -1]] + trace["steps"][2:]}
    (r0,) = [r for r in H.step_kinds(res[:1], lambda name: burst) if r["kind"] == "new, >= 256 tokens"][:1]
    assert r0["max_admitted"] == 4 and r0["steps_admitting_3"] == 1


def test_step_kinds_show_each_kinds_hooks_part_by_part():
    """A trace with each step's hooks split by part (worker.TRACE_PARTS, NOTES #93, #98): the median
    of each part per step kind, in a table of its own; steps without parts (decode steps in traces
    before #98, stock's trace) add none, and a trace without the field gives no table."""
    from vllm_vattention.worker import TRACE_PARTS
    per = {"t0": 1000.0, "start_s": [0.0, 0.01], "ttft_ms": [20.0, 20.0], "tpot_ms": [0.04, 0.04],
           "input_len": [1024, 1024]}
    fields = ["start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait", "hooks_ms", "hook_parts_ms"]
    p = lambda warm, extents: [0.0] * 4 + [extents] + [0.0] * 4 + [warm, 0.01]  # noqa: E731 (TRACE_PARTS order)
    trace = {"t0": 1000.0, "fields": fields, "hook_parts": list(TRACE_PARTS), "flag_waits_ms": None,
             "steps": [[0.000, 20.0, 1, 1024, 0, 0, -1, 2.0, p(0.5, 1.0)], [0.022, 1.0, 0, 1, 0, 0, -1, 0.3, None],
                       [0.027, 3.0, 1, 40, 0, 0, -1, 1.0, p(0.2, 0.4)], [0.030, 3.0, 1, 40, 0, 0, -1, 1.0, p(0.4, 0.6)],
                       [0.033, 1.5, 0, 2, 0, 0, -1, 0.2, None], [0.034, 1.0, 0, 2, 0, 0, -1, 0.2, None]]}
    res = [{"workload": "serve-rate-4", "system": "vattn-fa2", "rep": 0, "per_request": per, "step_trace": "s.json"}]
    rows = {r["kind"]: r for r in H.step_kinds(res, lambda name: trace)}
    assert rows["no new request"]["hook_parts_ms_p50"] is None
    short = rows["new, < 256 tokens"]["hook_parts_ms_p50"]
    assert short["warm"] == pytest.approx(0.3) and short["extents"] == pytest.approx(0.5) and short["build"] == 0.01
    assert list(rows["new, >= 256 tokens"]["hook_parts_ms_p50"]) == list(TRACE_PARTS)
    md = H.step_kinds_markdown(list(rows.values()))
    assert "part by part" in md and "| serve-rate-4 | vattn-fa2 | 0 | new, < 256 tokens | 0.000 |" in md
    assert "| no new request |" not in md.split("part by part")[1]
    # a trace with decode steps' parts too (#98): their kind gets a row of its own
    now = {**trace, "steps": [st[:8] + [p(0.05, 0.02) if st[8] is None else st[8]] for st in trace["steps"]]}
    rows = {r["kind"]: r for r in H.step_kinds(res, lambda name: now)}
    assert rows["no new request"]["hook_parts_ms_p50"]["warm"] == pytest.approx(0.05)
    assert "| serve-rate-4 | vattn-fa2 | 0 | no new request | 0.000 | 0.000 | 0.000 | 0.000 | 0.020 |" in \
        H.step_kinds_markdown(list(rows.values())).split("part by part")[1]
    old = {**trace, "fields": fields[:-1], "steps": [st[:-1] for st in trace["steps"]]}
    assert "part by part" not in H.step_kinds_markdown(H.step_kinds(res, lambda name: old))


def test_admission_tells_requests_held_before_the_engine_from_those_it_queued():
    """Each request's send to the step that admitted it, and how many steps before that had room
    for it: a request admitted after steps with room was not in the engine's queue yet (NOTES #107).
    The k-th admitted request is the k-th sent; a step too full for the prompt is not room."""
    per = {"t0": 1000.0, "start_s": [0.0, 0.1, 0.2], "ttft_ms": [30.0] * 3, "tpot_ms": [5.0] * 3,
           "input_len": [1024, 1024, 1024], "chunks": [128, 65, 2]}
    fields = ["start_s", "ms", "new_reqs", "tokens"]
    steps = [[-0.3, 20.0, 1, 1024]]  # the test prompt before the run: left out
    for i in range(1, 61):  # a step every 5 ms
        t = round(0.005 * i, 3)
        new = 1 if t in (0.005, 0.105, 0.3) else 0
        steps.append([t, 2.0, new, 1024 + new if new else (7500 if t == 0.25 else 2)])
    trace = {"t0": 1000.0, "fields": fields, "steps": steps}
    res = [{"workload": "serve-rate-4", "system": "vattn-fa2", "rep": 0, "per_request": per, "step_trace": "s.json"},
           {"workload": "serve-rate-4", "system": "stock-fa3", "rep": 0, "per_request": per}]  # no trace: no row
    (row,) = H.admission(res, lambda name: trace)
    assert row["requests"] == 3 and row["wait_ms_p50"] == pytest.approx(5.0) and row["wait_ms_p90"] == pytest.approx(100.0)
    # request 2 (sent at 0.2): steps from 0.215 to 0.295 had room, but for the 7,500-token one
    assert row["room_steps_p90"] == 16 and row["room_steps_p50"] == 0
    assert row["held_upstream"] == pytest.approx(1 / 3)
    assert row["chunks_per_token"] == pytest.approx(65 / 128)  # serve-rate-4 streams 128 tokens
    # a smaller token budget leaves no room anywhere: nothing held
    (tight,) = H.admission(res, lambda name: trace, batch_tokens=1000)
    assert tight["held_upstream"] == 0
    md = H.admission_markdown([row])
    assert "| serve-rate-4 | vattn-fa2 | 0 | 3 | 5.0 | 100.0 | 0 | 16 | 33% | 0.51 |" in md
    # a suite before NOTES #106 kept no chunk counts
    (old,) = H.admission([{**res[0], "per_request": {k: v for k, v in per.items() if k != "chunks"}}], lambda n: trace)
    assert old["chunks_per_token"] is None and "| 33% | - |" in H.admission_markdown([old])


def test_flag_stalls_show_the_longest_waits_with_the_steps_before_them_once_per_server():
    """The n longest waits at the mapping flag of each traced server (one trace serves both of its
    workloads: reported once), each with the steps ahead of it and warm()'s part of their hooks,
    beside the server's slowest native-thread batches (NOTES #117). Stock's trace (no waits) adds none."""
    from vllm_vattention.worker import TRACE_PARTS
    fields = ["start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait", "hooks_ms", "hook_parts_ms"]
    p = lambda warm: [0.0] * 9 + [warm, 0.0]  # noqa: E731 (TRACE_PARTS order: warm is 10th)
    trace = {"t0": 1000.0, "fields": fields, "hook_parts": list(TRACE_PARTS), "flag_waits_ms": [0.5, 57.9, 1.0],
             "steps": [[0.00, 2.0, 0, 8, 0, 0, 0, 0.4, p(0.1)], [0.01, 34.0, 1, 1032, 64, 1, -1, 8.7, p(7.5)],
                       [0.05, 3.8, 0, 9, 4, 0, -1, 1.6, p(0.7)], [0.06, 23.8, 1, 1033, 1, 8, 1, 1.4, p(0.05)],
                       [0.09, 2.0, 0, 10, 0, 0, 2, 0.5, p(0.1)]]}
    stock = {**trace, "flag_waits_ms": None, "steps": [st[:7] + [0.0, None] for st in trace["steps"]]}
    per = {"t0": 1000.0, "start_s": [0.0], "ttft_ms": [20.0], "tpot_ms": [5.0], "input_len": [1024]}
    slow = [[58.0, 20.8, 37.2, 2.5, "access_rw", 20, 1032], [55.4, 0.0, 55.4, 10.6, "unmap", 128, 651]]
    res = [{"workload": w, "system": s, "rep": 0, "per_request": per, "step_trace": f"{s}.json",
            "mapper": {"native_slowest_batches": slow} if s == "vattn-fa2" else None}
           for w in ("serve-rate-4", "serve-rate-16") for s in ("stock-fa3", "vattn-fa2")]
    traces = {"vattn-fa2.json": trace, "stock-fa3.json": stock}
    rows = H.flag_stalls(res, traces.get, n=2, before=2)
    assert [(r["wait"], r["step"], r["own"]) for r in rows] == [(1, 1, False), (1, 2, False), (1, 3, True),
                                                                (2, 2, False), (2, 3, False), (2, 4, True)]
    assert {r["server"] for r in rows} == {"vattn-fa2.json"}
    assert rows[0]["warm_ms"] == 7.5 and rows[0]["block_maps"] == 64 and rows[2]["drains"] == 8
    md = H.flag_stalls_markdown(rows)
    assert "| vattn-fa2.json | **57.9** | 3 | 0.060 | 23.80 | 1 | 1033 | 1 | 8 | 1.40 | 0.05 |" in md
    assert "| vattn-fa2.json |  | 1 | 0.010 | 34.00 | 1 | 1032 | 64 | 1 | 8.70 | 7.50 |" in md
    assert md.count("[58.0, 20.8, 37.2, 2.5, 'access_rw', 20, 1032]") == 1
    # a trace without parts: warm() unknown, the rest the same
    bare = {**trace, "fields": fields[:-1], "steps": [st[:-1] for st in trace["steps"]]}
    rows = H.flag_stalls(res, {"vattn-fa2.json": bare}.get, n=1, before=0)
    assert [(r["step"], r["warm_ms"], r["hooks_ms"]) for r in rows] == [(3, None, 1.4)]


def test_the_slowest_batches_are_placed_in_the_trace_by_their_submission_time():
    """A native batch's 8th value is its submission on CLOCK_MONOTONIC (the trace's clock): the
    report places it in the step then running and gives that step's wait at the mapping flag, so a
    long hazard wait can be read against the GPU's stall (NOTES #124). Entries from before have 7
    values and are printed as they were."""
    fields = ["start_s", "ms", "new_reqs", "tokens", "block_maps", "drains", "flag_wait", "hooks_ms"]
    trace = {"t0": 1000.0, "fields": fields, "flag_waits_ms": [0.5, 57.9, 1.0],
             "steps": [[0.00, 2.0, 0, 8, 0, 0, 0, 0.4], [0.01, 34.0, 1, 1032, 64, 1, -1, 8.7],
                       [0.05, 3.8, 0, 9, 4, 0, -1, 1.6], [0.06, 23.8, 1, 1033, 1, 8, 1, 1.4],
                       [0.09, 2.0, 0, 10, 0, 0, 2, 0.5]]}
    slow = [[45.1, 0.1, 45.0, 44.3, "wait_value", 16, 1454, 1000.0612], [12.0, 0.0, 12.0, 11.9, "unmap", 4, 9, 1000.02],
            [3.0, 0.0, 3.0, 2.9, "unmap", 4, 2, 999.5, 0.4, None, 3, 0], [2.0, 0.0, 2.0, 1.9, "map", 2, 1],
            [36.9, 0.0, 36.9, 2.0, "access_rw", 3, 738, 1000.09, 36.9, 0.0, 3, 0, 1180]]
    per = {"t0": 1000.0, "start_s": [0.0], "ttft_ms": [20.0], "tpot_ms": [5.0], "input_len": [1024]}
    res = [{"workload": "serve-rate-4", "system": "vattn-fa2", "rep": 0, "per_request": per, "step_trace": "v.json",
            "mapper": {"native_slowest_batches": slow}}]
    rows = H.flag_stalls(res, {"v.json": trace}.get, n=5, before=0)
    assert rows[0]["slowest_at"] == [(0.0612, 3, 57.9), (0.02, 1, None), (-0.5, None, None), None, (0.09, 4, 1.0)]
    md = H.flag_stalls_markdown(rows)
    assert ("[45.1, 0.1, 45.0, 44.3, 'wait_value', 16, 1454] at 0.061 s, step 3 (flag wait 57.9 ms); "
            "[12.0, 0.0, 12.0, 11.9, 'unmap', 4, 9] at 0.020 s, step 1; "
            "[3.0, 0.0, 3.0, 2.9, 'unmap', 4, 2] at -0.500 s, before the first step "
            "[CPU 0.4 ms, waiting for a CPU ? ms, switches 3 / 0]; [2.0, 0.0, 2.0, 1.9, 'map', 2, 1]; "
            "[36.9, 0.0, 36.9, 2.0, 'access_rw', 3, 738] at 0.090 s, step 4 (flag wait 1.0 ms) [CPU 36.9 ms, waiting for a CPU 0.0 ms, "
            "switches 3 / 0, drained 1180 background ops]") in md
