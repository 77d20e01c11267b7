"""bench.timeline: GPU idle gaps in a torch.profiler trace, by what ended them."""

import gzip
import json

import pytest

from vllm_vattention.bench import timeline as T


def _trace():
    k = lambda name, ts, dur, corr: {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": 7,  # noqa: E731
                                     "ts": ts, "dur": dur, "args": {"correlation": corr}}
    launch = lambda ts, corr: {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1,  # noqa: E731
                               "tid": 11, "ts": ts, "dur": 5, "args": {"correlation": corr}}
    return {"traceEvents": [
        k("k1", 0, 100, 1), launch(0, 1),
        k("k2", 150, 100, 2), launch(90, 2),  # queued before the GPU went idle at 100: a wait on the GPU
        k("k3", 300, 100, 3), launch(280, 3),  # launched 30 us into the gap at 250: the CPU was late
        k("k4", 400, 100, 4), launch(300, 4),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "pid": 0, "tid": 7, "ts": 450, "dur": 70,
         "args": {"correlation": 5}}, launch(310, 5),
        k("k5", 600, 50, 6),  # no launch in the trace
        {"ph": "X", "cat": "cpu_op", "name": "execute_model", "pid": 1, "tid": 11, "ts": 200, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "prepare_attn", "pid": 1, "tid": 11, "ts": 240, "dur": 30},
        {"ph": "X", "cat": "cpu_op", "name": "other_thread", "pid": 1, "tid": 12, "ts": 240, "dur": 30},
        {"ph": "i", "name": "instant", "ts": 5},
    ]}


@pytest.mark.parametrize("gz", [False, True])
def test_gaps_are_split_by_whether_the_cpu_or_the_gpu_held_the_next_work(tmp_path, gz):
    path = tmp_path / ("t.json.gz" if gz else "t.json")
    data = json.dumps(_trace())
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(data)
    else:
        path.write_text(data)
    r = T.analyze(T.load(str(path)))
    assert r["span_ms"] == pytest.approx(0.65) and r["busy_ms"] == pytest.approx(0.47)
    assert r["gaps"] == 3
    assert r["idle_ms"] == pytest.approx({"gpu_waited": 0.05, "cpu_late": 0.05, "unknown": 0.08})
    by_cause = {g["cause"]: g for g in r["longest"]}
    assert by_cause["cpu_late"]["next"] == "k3" and by_cause["cpu_late"]["at_ms"] == pytest.approx(0.25)
    assert by_cause["cpu_late"]["cpu_inside"] == ["execute_model", "prepare_attn"]  # the launching thread's only
    assert by_cause["gpu_waited"]["next"] == "k2" and by_cause["gpu_waited"]["launch"] == "cudaLaunchKernel"
    assert r["longest"][0]["cause"] == "unknown"  # longest first
    md = T.markdown({"t": r})
    assert "| t | 0.7 | 0.5 | 72.3% | 3 |" in md and "execute_model > prepare_attn" in md


def test_a_trace_without_gpu_work_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]}))
    with pytest.raises(ValueError, match="no GPU activity"):
        T.analyze(T.load(str(path)))


def test_cli_writes_markdown_and_json(tmp_path):
    paths = []
    for system in ("tl-stock", "tl-vattn"):  # vLLM names both runs' traces alike: the folder tells them apart
        (tmp_path / system).mkdir()
        paths.append(tmp_path / system / "rank0.1700000.pt.trace.json")
        paths[-1].write_text(json.dumps(_trace()))
    out = tmp_path / "tl.md"
    T.main([str(p) for p in paths] + ["--out", str(out), "--top", "2"])
    rep = json.loads((tmp_path / "tl.json").read_text())
    assert list(rep) == ["tl-stock:rank0", "tl-vattn:rank0"] and len(rep["tl-vattn:rank0"]["longest"]) == 2
    assert out.read_text().startswith("| trace |")


def test_the_offline_benchmark_asks_vllm_for_a_trace_of_the_chosen_steps(tmp_path):
    from vllm_vattention.bench.offline import timeline_profiler
    c = timeline_profiler(str(tmp_path / "tl"), delay=300, steps=30)
    assert c.profiler == "torch" and c.torch_profiler_dir == str(tmp_path / "tl")
    assert (c.delay_iterations, c.max_iterations) == (300, 30) and c.ignore_frontend
    assert not c.torch_profiler_with_stack  # stacks would slow the traced steps further
    assert timeline_profiler(str(tmp_path / "tl"), delay=0, steps=5, with_stack=True).torch_profiler_with_stack


def _step_trace(stall_us: int):
    """Two engine steps; the second step's first kernel waits `stall_us` after the first step ends."""
    ev = []
    ann = lambda name, ts, dur: {"ph": "X", "cat": "user_annotation", "name": name, "pid": 1, "tid": 11,  # noqa: E731
                                 "ts": ts, "dur": dur}
    ev += [ann("execute_context_4(4096)_generation_0(0)", 0, 50), ann("execute_context_0(0)_generation_4(4)", 60, 20)]
    for corr, (ts, dur, launch) in enumerate([(10, 100, 5), (120, 30, 55),  # step 0 (the second: its sampling)
                                              (150 + stall_us, 40, 65), (190 + stall_us, 10, 70)]):  # step 1
        ev.append({"ph": "X", "cat": "kernel", "name": f"k{corr}", "pid": 0, "tid": 7, "ts": ts, "dur": dur,
                   "args": {"correlation": corr}})
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 11, "ts": launch,
                   "dur": 2, "args": {"correlation": corr}})
    ev.append({"ph": "X", "cat": "kernel", "name": "orphan", "pid": 0, "tid": 7, "ts": 0, "dur": 1, "args": {}})
    return ev


def test_per_step_spans_show_which_step_a_system_loses_time_in(tmp_path):
    a, b = T.per_step(_step_trace(0)), T.per_step(_step_trace(30))
    assert [s["name"][:17] for s in a] == ["execute_context_4", "execute_context_0"]
    assert a[0]["gpu_span_ms"] == pytest.approx(0.14) and a[0]["busy_ms"] == pytest.approx(0.13)  # 10-150, a 10 us hole
    assert a[0]["cpu_ms"] == pytest.approx(0.05) and a[0]["idle_before_ms"] is None
    assert a[1]["idle_before_ms"] == pytest.approx(0.0) and b[1]["idle_before_ms"] == pytest.approx(0.03)
    assert b[1]["gpu_span_ms"] == pytest.approx(0.05) and b[1]["gpu_start_ms"] == pytest.approx(0.17)
    paths = []
    for system, stall in (("tl-stock", 0), ("tl-vattn", 30)):
        (tmp_path / system).mkdir()
        paths.append(tmp_path / system / "rank0.1.pt.trace.json")
        paths[-1].write_text(json.dumps({"traceEvents": _step_trace(stall)}))
    T.main([str(p) for p in paths] + ["--out", str(tmp_path / "tl.md")])
    md = (tmp_path / "tl.md").read_text()
    assert "| 1 | execute_context_0(0)_generation_4(4) | 0.050 | 0.050 | +0.000 | 0.0 | 0.03 |" in md
    assert json.loads((tmp_path / "tl.json").read_text())["tl-vattn:rank0"]["steps"][1]["idle_before_ms"] == 0.03


def test_memory_calls_are_listed_by_name_and_thread_with_the_longest_placed_in_their_step():
    """NOTES #141: another thread pinning host memory made the native thread's VMM calls take up to
    34 ms on an H200. The report lists the trace's memory-management calls, runtime and driver, by
    name (threads, calls, total and longest), and the longest with the step they fell in; launches
    and other calls are left out."""
    api = lambda name, ts, dur, tid, cat="cuda_runtime": {"ph": "X", "cat": cat, "name": name, "pid": 1,  # noqa: E731
                                                          "tid": tid, "ts": ts, "dur": dur, "args": {}}
    step = lambda i, ts, dur: {"ph": "X", "cat": "user_annotation", "name": f"execute_context_{i}(8)_generation_0(0)",  # noqa: E731
                               "pid": 1, "tid": 11, "ts": ts, "dur": dur}
    events = [{"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 1000, "dur": 10, "args": {}},
              step(0, 1000, 500), step(1, 2000, 500),
              api("cudaHostAlloc", 1100, 3000, 11), api("cudaHostAlloc", 2100, 500, 11),
              api("cuMemSetAccess", 2150, 20000, 40, "cuda_driver"), api("cudaFreeHost", 1600, 100, 12),
              api("cudaLaunchKernel", 1200, 5, 11), api("cudaMemcpyAsync", 1300, 50, 11)]
    mem = T.memory_calls(events, top=3)
    assert [(b["name"], b["calls"], b["total_ms"], b["max_ms"], b["threads"]) for b in mem["by_name"]] == [
        ("cuMemSetAccess", 1, 20.0, 20.0, [40]), ("cudaHostAlloc", 2, 3.5, 3.0, [11]), ("cudaFreeHost", 1, 0.1, 0.1, [12])]
    assert mem["longest"] == [{"at_ms": 1.15, "ms": 20.0, "name": "cuMemSetAccess", "tid": 40, "step": 1},
                              {"at_ms": 0.1, "ms": 3.0, "name": "cudaHostAlloc", "tid": 11, "step": 0},
                              {"at_ms": 1.1, "ms": 0.5, "name": "cudaHostAlloc", "tid": 11, "step": 1}]
    md = T.markdown({"v": {"span_ms": 1.0, "busy_ms": 0.5, "busy_share": 0.5, "gaps": 0,
                           "idle_ms": {"cpu_late": 0, "gpu_waited": 0, "unknown": 0}, "longest": [], "memory_calls": mem}})
    assert "| cudaHostAlloc | 2 | 3.500 | 3.000 | 11 |" in md and "| 1.15 | 20.0 | cuMemSetAccess | 40 | 1 |" in md
    free = T.memory_calls([e for e in events if e["name"] != "cuMemSetAccess"] + [api("cudaMalloc", 1700, 10, 11)])
    assert free["longest"][-1]["step"] is None  # at 1700: between step 0's end (1500) and step 1's start


def test_native_batches_are_placed_in_the_trace_by_the_clock_mark_with_the_calls_made_while_they_ran(tmp_path):
    """NOTES #143: the native thread's slowest batches carry their submission on CLOCK_MONOTONIC; the
    offline benchmark marks that clock in the trace (an annotation named CLOCK_MARK + the instant),
    and the report lists, per batch, the traced API calls of every thread that overlapped its
    running span, by time inside it."""
    from vllm_vattention.bench.offline import CLOCK_MARK
    api = lambda name, ts, dur, tid: {"ph": "X", "cat": "cuda_runtime", "name": name, "pid": 1, "tid": tid,  # noqa: E731
                                      "ts": ts, "dur": dur, "args": {}}
    # the mark at trace us 5000 says CLOCK_MONOTONIC 100.0 s: trace us = 5000 + 1e6 * (monotonic - 100)
    events = [{"ph": "X", "cat": "user_annotation", "name": f"{CLOCK_MARK}100.000000000", "pid": 1, "tid": 11,
               "ts": 5000, "dur": 1},
              {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 5000, "dur": 10, "args": {}},
              {"ph": "X", "cat": "user_annotation", "name": "execute_context_0(0)_generation_8(8)", "pid": 1,
               "tid": 11, "ts": 6000, "dur": 30000},
              api("cudaHostAlloc", 9000, 25000, 12),  # began before the batch ran (queued until 10000)
              api("cudaHostAlloc", 34000, 3000, 12),  # ends 1000 us into... after the batch: 34000-35000 inside
              api("cudaLaunchKernel", 20000, 10, 11), api("cudaLaunchKernel", 21000, 10, 11),
              api("cudaEventQuery", 40000, 5, 13)]  # after the batch: not counted
    # [latency, queued, running ms, slowest op ms, kind, ops, index, submitted s, CPU ms, run-queue ms, vol, invol]
    batches = [[29.0, 4.0, 25.0, 25.0, "access_rw", 3, 7, 100.001, 12.5, 0.0, 6, 0, 40],
               [1.0, 0.0, 1.0, 1.0, "map", 1, 9, 99.0, 1.0, 0.0, 0, 0]]  # a second before the mark
    near = T.beside_batches(events, batches, top=2)
    b = near[0]
    assert (b["at_ms"], b["in_trace"], b["step"], b["cpu_ms"], b["voluntary"], b["drained"]) == (5.0, True, 0, 12.5, 6, 40)
    assert near[1]["drained"] is None  # (a batch from before the native thread counted them)
    # running from 10000 to 35000: the first alloc 24 ms inside, the second 1 ms; the launches 0.02 ms (top 2 only)
    assert b["calls"] == [{"name": "cudaHostAlloc", "calls": 2, "inside_ms": 25.0, "threads": [12]},
                          {"name": "cudaLaunchKernel", "calls": 2, "inside_ms": 0.02, "threads": [11]}]
    assert near[1]["in_trace"] is False and near[1]["calls"] == []
    assert T.beside_batches([e for e in events if not e["name"].startswith(CLOCK_MARK)], batches) is None
    # the CLI reads the batches from the offline JSON's profiled workload
    (tmp_path / "tl-vattn").mkdir()
    trace = tmp_path / "tl-vattn" / "rank0.1.pt.trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    run = tmp_path / "tl-vattn.json"
    run.write_text(json.dumps({"results": [{"profiled": True, "mapper": {"native_slowest_batches": batches}}]}))
    (tmp_path / "tl-stock").mkdir()  # another system's trace (its own mark): the batches are not its
    other = tmp_path / "tl-stock" / "rank0.1.pt.trace.json"
    other.write_text(json.dumps({"traceEvents": events}))
    T.main([str(other), str(trace), "--out", str(tmp_path / "tl.md"), "--batches", str(run)])
    rep = json.loads((tmp_path / "tl.json").read_text())
    assert rep["tl-stock:rank0"]["native_batches"] is None and len(rep["tl-vattn:rank0"]["native_batches"]) == 2
    md = (tmp_path / "tl.md").read_text()
    assert "| 5.0 | 0 | 29.0 | 25.0 | 12.5 | 6 | 40 | cudaHostAlloc 25.0 (2, 12); cudaLaunchKernel 0.02 (2, 11) |" in md
    assert "| outside the trace | - | 1.0 | 1.0 | 1.0 | 0 | - | none |" in md


def test_the_clock_mark_names_the_monotonic_instant_it_was_taken_at():
    import time

    import torch

    from vllm_vattention.bench.offline import CLOCK_MARK, clock_marker
    before = time.monotonic()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = clock_marker(None)
    marks = [e.name for e in prof.events() if e.name.startswith(CLOCK_MARK)]
    assert len(marks) == 1 and float(marks[0][len(CLOCK_MARK):]) == pytest.approx(t, abs=1e-6)
    assert before <= t <= time.monotonic()


def test_cpu_ops_that_waited_for_the_gpu_are_found_with_the_lazy_module_load_inside():
    """NOTES #145: in both systems the lm_head's aten::mm of each prefill step with a new batch size
    blocked until the step's forward had finished: CUDA's lazy loading of that shape's GEMM kernel
    waits for the device. An op counts when GPU work launched before it was pending at its start and
    the last of it finished within the slack before its end; only the innermost op counts."""
    def k(corr, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "pid": 0, "tid": 7, "ts": ts, "dur": dur,
                "args": {"correlation": corr}}

    def launch(corr, ts):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 11, "ts": ts, "dur": 5,
                "args": {"correlation": corr}}

    def op(name, ts, dur, tid=11, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}
    events = [k(1, 0, 40_000), launch(1, 0), k(2, 40_000, 20_000), launch(2, 100),  # GPU busy until 60 ms
              op("forward", 150, 80_000, cat="python_function"),
              op("aten::linear", 200, 60_000), op("aten::matmul", 210, 59_980), op("aten::mm", 220, 59_960),  # ends 60.18 ms
              {"ph": "X", "cat": "overhead", "name": "Lazy Function Loading", "pid": 0, "tid": 0, "ts": 59_990, "dur": 160},
              k(3, 60_300, 100), launch(3, 60_100),
              op("aten::copy_", 61_000, 9_000),  # nothing pending when it began: not a wait
              k(4, 70_000, 1_000), launch(4, 69_000),
              op("aten::index", 69_500, 30_000),  # pending at its start, but ended 28.5 ms after the GPU did
              op("aten::mm", 100_000, 6_000, tid=12)]  # another thread, nothing pending
    w = T.gpu_waits(events, min_ms=5, top=3)
    assert w["by_name"] == [{"name": "aten::mm", "ops": 1, "total_ms": 59.96, "lazy_loads": 1}]
    assert w["lazy_loads_in_trace"] == 1
    assert w["longest"] == [{"at_ms": 0.22, "ms": 59.96, "name": "aten::mm", "tid": 11, "lazy_load": True,
                             "caller": "forward"}]
    md = T.markdown({"v": {"span_ms": 1.0, "busy_ms": 0.5, "busy_share": 0.5, "gaps": 0,
                           "idle_ms": {"cpu_late": 0, "gpu_waited": 0, "unknown": 0}, "longest": [], "gpu_waits": w}})
    assert "| aten::mm | 1 | 60.0 | 1 |" in md and "| 0.22 | 59.96 | aten::mm | 11 | yes | forward |" in md
