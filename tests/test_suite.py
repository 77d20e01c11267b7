"""The A/B suite's orchestration on a CPU: resuming across calls, the JSON schema of issue 4,
ratios with spread, failed runs recorded without stopping the suite. (Measurements are the
device's job; here the engine run is replaced by a function with known outputs.)"""

import json

import pytest

from vllm_vattention.bench import suite as S

ENV = {"gpu": "TEST GPU", "driver": "1", "commit": "abc", "vllm": "0.25.0", "torch": "x", "date": "2026-11-27"}
RATE = {"stock-fa3": 10.0, "vattn-fa2": 11.0, "vattn-per-layer": 9.0}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def fake_job(clock, fail=(), expect_tp=1, fail_after=None):
    """A job with known outputs; serving workloads go to on_row one by one, as run_job's do.
    fail_after=n: the job raises after handing over n rows."""
    def job(model, group, workloads, system, out_dir, timeout, tp=1, on_row=None):
        assert tp == expect_tp
        clock.t += S.job_seconds(workloads)
        if system in fail:
            raise RuntimeError(f"{system} crashed")
        rep_noise = 0.1 * (clock.t % 3)  # small run-to-run spread
        mapper = {"map_share": 0.004, "driver_seconds": 0.1, "execute_seconds": 20.0, "block_maps": 10,
                  "zero_maps": 2, "hazard_waits": 0} if system.startswith("vattn") else None
        rows = [{k: None for k in S.METRICS} | {"workload": w.name, "requests_per_s": RATE[system] + rep_noise,
                                                 "total_tokens_per_s": 1000.0, "output_tokens_per_s": 100.0,
                                                 "max_concurrent_requests": 50, "mapper": mapper,
                                                 "worker_calls": {"execute_model": {"calls": 100, "seconds": 0.5,
                                                                                    "ms_per_call": 5.0}}}
                for w in workloads]
        if group == "serve" and on_row:
            for i, r in enumerate(rows):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError(f"{system} cut off")
                on_row(dict(r))
        return rows
    return job


def quiet(*_):
    pass


def test_rounds_keep_baseline_and_candidate_together():
    w = [S.Workload("a", "offline", 8, 8, 1), S.Workload("s", "serve", 8, 8, 1, request_rate=1.0)]
    suite = S.Suite("m", w, ["stock-fa3", "vattn-fa2", "vattn-per-layer"], reps=3, extra_reps=1)
    rounds = suite.rounds()
    assert rounds[0] == [("offline", "stock-fa3", 0), ("offline", "vattn-fa2", 0)]
    assert [("offline", "vattn-per-layer", 0)] in rounds and [("offline", "vattn-per-layer", 1)] not in rounds
    jobs = [j for r in rounds for j in r]
    assert len(jobs) == len(set(jobs)) == 2 * (3 + 3 + 1)


def test_resumes_across_calls_and_writes_the_schema(tmp_path):
    path = str(tmp_path / "r.json")
    w = [S.Workload("a", "offline", 8, 8, 1), S.Workload("b", "offline", 8, 8, 1)]
    suite = S.Suite("m", w, ["stock-fa3", "vattn-fa2"], reps=3)
    clock = FakeClock()
    per_job = S.job_seconds(w)
    said = []
    left = S.run(suite, path, max_seconds=4.5 * per_job, job=fake_job(clock), env=ENV, clock=clock, log=said.append)
    assert left == 6 - 4  # two rounds of two jobs fit
    # the stop says why: the next round's estimate against the time left
    assert said[-1] == (f"[suite] stopping: 2 job(s) left for the next call (the next round, 2 job(s), is estimated "
                        f"at {2 * per_job:.0f} s; {0.5 * per_job:.0f} s left)")
    said.clear()  # a round that no call of this length can hold is told apart
    assert S.run(S.Suite("m", w, ["stock-fa3", "vattn-fa2"], reps=1), str(tmp_path / "x.json"), max_seconds=per_job,
                 job=fake_job(FakeClock()), env=ENV, clock=FakeClock(), log=said.append) == 2
    assert said[-1] == f"[suite] that round is longer than a whole call of {per_job:.0f} s: run fewer systems at once"
    resumed = S.Suite("m", w, ["stock-fa3", "vattn-fa2"], reps=3)
    resumed.results = json.load(open(path))["results"]
    clock2 = FakeClock()
    assert S.run(resumed, path, 10_000, job=fake_job(clock2), env=ENV, clock=clock2, log=quiet) == 0
    doc = json.load(open(path))
    assert {"gpu", "commit", "vllm", "results"} <= doc.keys()
    assert len(doc["results"]) == 12  # 2 workloads x 2 systems x 3 reps
    for r in doc["results"]:
        assert set(S.METRICS) <= r.keys() and r["system"] in S.SYSTEMS
    assert len({(r["workload"], r["system"], r["rep"]) for r in doc["results"]}) == 12  # nothing ran twice


def test_a_job_is_planned_for_its_workloads_only(tmp_path):
    """A call that runs one workload plans for one workload, not for the whole group's five."""
    one = [S.Workload("a", "offline", 8, 8, 1)]
    five = one * 4 + [S.Workload("capacity-300-tokens", "capacity", 280, 20, 0)]
    assert S.job_seconds(five) - S.job_seconds(one) == 3 * S.WORKLOAD_SECONDS["offline"] + S.WORKLOAD_SECONDS["capacity"]
    suite = S.Suite("m", one, ["stock-fa3", "vattn-fa2", "vattn-per-layer"], reps=1,
                    paired=("vattn-fa2", "vattn-per-layer"))
    clock = FakeClock()
    left = S.run(suite, str(tmp_path / "r.json"), max_seconds=3 * S.job_seconds(one) + 1, job=fake_job(clock),
                 env=ENV, clock=clock, log=quiet)
    assert left == 0  # the round's three jobs fit in three one-workload estimates


def test_a_round_is_planned_from_what_its_jobs_took_before(tmp_path):
    """Recorded job times longer than the fixed estimate are planned for, so a call does not start a
    round its time limit would cut off (twice on an H100: a fresh machine's first engine took 162 s
    where 111 s were planned). Only jobs of the same system and workloads count."""
    path = str(tmp_path / "r.json")
    w = [S.Workload("a", "offline", 8, 8, 1), S.Workload("b", "offline", 8, 8, 1)]
    fixed = S.job_seconds(w)
    suite = S.Suite("m", w, ["stock-fa3", "vattn-fa2"], reps=2)
    clock = FakeClock()
    assert S.run(suite, path, max_seconds=2.5 * fixed, job=fake_job(clock), env=ENV, clock=clock, log=quiet) == 2
    assert S.planned_seconds(suite.results, w, "vattn-fa2") == fixed  # fake jobs take exactly the estimate
    for r in suite.results:  # as if rep 0 had run on a fresh machine
        r["job_seconds"] = 1.5 * fixed if r["system"] == "vattn-fa2" else r["job_seconds"]
    suite.results.append({"workload": "a", "system": "stock-fa3", "rep": 9, "call": 1, "job_seconds": 9 * fixed})
    assert S.planned_seconds(suite.results, w, "vattn-fa2") == 1.5 * fixed
    suite.results.append({"workload": "a", "system": "vattn-fa2", "rep": 7, "call": 1, "job_seconds": 3 * fixed})
    suite.results.append({"workload": "b", "system": "vattn-fa2", "rep": 7, "call": 1, "job_seconds": 3 * fixed})
    assert S.planned_seconds(suite.results, w, "vattn-fa2") == 3 * fixed  # a call's first round: the longest
    assert S.planned_seconds(suite.results, w, "vattn-fa2", first=False) == 2.25 * fixed  # later: the median
    del suite.results[-2:]
    assert S.planned_seconds(suite.results, w, "stock-fa3") == fixed  # a job of other workloads: not counted
    assert S.planned_seconds(suite.results, w[:1], "stock-fa3") == 9 * fixed
    suite.results.pop()
    clock2 = FakeClock()
    left = S.run(suite, path, max_seconds=2.4 * fixed, job=fake_job(clock2), env=ENV, clock=clock2, log=quiet)
    assert left == 2 and clock2.t == 0  # 2.5 x fixed planned: the round waits for the next call
    assert S.run(suite, path, max_seconds=2.6 * fixed, job=fake_job(clock2), env=ENV, clock=clock2, log=quiet) == 0


def test_ratios_spread_and_report(tmp_path):
    path = str(tmp_path / "r.json")
    w = [S.Workload("a", "offline", 8, 8, 1), S.Workload("capacity-300-tokens", "capacity", 280, 20, 0)]
    suite = S.Suite("m", w, ["stock-fa3", "vattn-fa2", "vattn-per-layer"], reps=3)
    clock = FakeClock()
    S.run(suite, path, 1e9, job=fake_job(clock, fail=("vattn-per-layer",)), env=ENV, clock=clock, log=quiet)
    rows = {r["system"]: r for r in S.summarize(suite.results) if r["workload"] == "a"}
    assert rows["stock-fa3"]["ratio"] == 1.0
    assert 1.05 < rows["vattn-fa2"]["ratio"] < 1.15 and rows["vattn-fa2"]["significant"]
    assert "vattn-per-layer" not in rows  # failed runs carry no numbers
    doc = json.load(open(path))
    md = S.markdown(doc)
    assert "TEST GPU" in md and "commit abc" in md and "Geometric mean of vattn-fa2" in md
    assert "vattn-per-layer: " in md and "crashed" in md  # failures are reported, not hidden
    assert "| capacity-300-tokens | vattn-fa2 | 3 | 50 |" in md
    assert "| a | vattn-fa2 | 3 | 0.40% |" in md  # mapping share of execute_model time
    assert "| a | stock-fa3 | 3 | 100 | 5.000 | nan |" in md  # worker time per call, every system


def test_tensor_parallel_size_reaches_every_job(tmp_path):
    path = str(tmp_path / "r.json")
    suite = S.Suite("m", [S.Workload("a", "offline", 8, 8, 1)], ["stock-fa3", "vattn-fa2"], reps=1, tp=2)
    clock = FakeClock()
    assert S.run(suite, path, 1e9, job=fake_job(clock, expect_tp=2), env=ENV, clock=clock, log=quiet) == 0
    assert json.load(open(path))["tensor_parallel_size"] == 2 and len(suite.results) == 2


def test_mapper_stats_from_a_server_log():
    log = ("INFO vAttention warm-up mapper stats: {'zero_maps': 9, 'map_share': 0.5}\n"
           "INFO vAttention mapper stats: {'zero_maps': 3, 'map_share': 0.01}\n")
    assert S._mapper_stats(log) == {"zero_maps": 3, "map_share": 0.01}
    assert S._mapper_stats("nothing") is None


def test_capacity_from_the_startup_log():
    log = "GPU KV cache size: 457,504 tokens\n"
    assert S._kv_capacity(log, 300, 16) == 457504 // 16 // 19
    assert S._kv_capacity(log + "vAttention KV: 447 blocks of 1024 tokens", 300, S._block_size(log + "vAttention KV: 447 blocks of 1024 tokens")) == 446


def test_engine_env_clears_the_selecting_variables_and_applies_the_systems(monkeypatch):
    from vllm_vattention.bench.env import engine_env
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "VATTENTION")
    monkeypatch.setenv("VATTN_LAYOUT", "per_layer")
    monkeypatch.setenv("KEEP_ME", "1")
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    env = engine_env({"VATTN_DECODE_KERNEL": "fa3"}, ("VLLM_ATTENTION_BACKEND", "VATTN_LAYOUT"))
    assert "VLLM_ATTENTION_BACKEND" not in env and "VATTN_LAYOUT" not in env
    assert env["VATTN_DECODE_KERNEL"] == "fa3" and env["KEEP_ME"] == "1"
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    assert engine_env({}, ())["VLLM_USE_FLASHINFER_SAMPLER"] == "1"  # a user's choice is kept


def test_paired_systems_run_every_repetition_with_the_baseline():
    w = [S.Workload("a", "offline", 8, 8, 1)]
    suite = S.Suite("m", w, ["stock-fa3", "vattn-fa2", "vattn-stream-clipped", "vattn-per-layer"], reps=3,
                    paired=("vattn-fa2", "vattn-stream-clipped"))
    rounds = suite.rounds()
    for rep in range(3):
        assert rounds[rep] == [("offline", s, rep) for s in ("stock-fa3", "vattn-fa2", "vattn-stream-clipped")]
    assert rounds[3:] == [[("offline", "vattn-per-layer", 0)]]


def test_no_system_setting_leaks_from_the_callers_environment(monkeypatch):
    monkeypatch.setenv("VATTN_FA3_GUARD", "clipped")
    monkeypatch.setenv("VATTN_BACKGROUND_MAP", "stream")
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "VATTENTION")
    stock = S.engine_env(S.SYSTEMS["stock-fa3"]["env"], S.SYSTEM_VARS)
    assert not {"VATTN_FA3_GUARD", "VATTN_BACKGROUND_MAP", "VLLM_ATTENTION_BACKEND"} & stock.keys()
    cand = S.engine_env(S.SYSTEMS["vattn-stream-clipped"]["env"], S.SYSTEM_VARS)
    assert cand["VATTN_FA3_GUARD"] == "clipped" and cand["VATTN_BACKGROUND_MAP"] == "stream"


def test_a_single_run_has_no_spread_to_lie_outside():
    res = [{"workload": "a", "system": "stock-fa3", "requests_per_s": 10.0},
           {"workload": "a", "system": "vattn-fa2", "requests_per_s": 9.0}]
    rows = {r["system"]: r for r in S.summarize(res)}
    assert rows["vattn-fa2"]["ratio"] == 0.9 and rows["vattn-fa2"]["significant"] is None
    res += [{"workload": "a", "system": "stock-fa3", "requests_per_s": 10.2},
            {"workload": "a", "system": "vattn-fa2", "requests_per_s": 9.1}]
    assert {r["system"]: r for r in S.summarize(res)}["vattn-fa2"]["significant"] is True


def test_results_stem_and_nearest_rank():
    from vllm_vattention.bench.env import nearest_rank, results_stem
    assert results_stem("out", {"date": "2026-11-27", "gpu": "NVIDIA H200"}, "-tp2") == "out/2026-11-27-NVIDIA-H200-tp2"
    assert results_stem("out", {"date": "d", "gpu": None}) == "out/d-cpu"
    assert nearest_rank(list(range(1, 101)), 0.99) == 99 and nearest_rank([5], 0.99) == 5


def test_running_server_is_stopped_and_its_log_kept(tmp_path):
    import sys
    port = S.free_port()
    script = tmp_path / "srv.py"
    script.write_text(
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "print('server up', flush=True)\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    with S.RunningServer([sys.executable, str(script)], {}, port, 30) as server:
        assert server._proc.poll() is None  # healthy and running inside the block
    assert server._proc.poll() is not None and "server up" in server.log
    failing = S.RunningServer([sys.executable, "-c", "print('bad flag'); raise SystemExit(2)"], {}, S.free_port(), 30)
    try:
        with failing:
            raise AssertionError("the block must not run when the server does not start")
    except RuntimeError as e:
        assert "exited during start-up" in str(e)
    assert "bad flag" in failing.log


def test_running_server_that_logs_more_than_a_pipe_holds_does_not_block(tmp_path):
    # vLLM logs every request; the first version read the server's output through a pipe only at
    # the end, so a server that wrote more than the pipe holds (64 KiB) blocked on its next write
    # (a 1000-request replay hung on the device). 2 MiB before it listens, more on every request.
    import sys
    import urllib.request
    port = S.free_port()
    script = tmp_path / "chatty.py"
    script.write_text(
        "import http.server, sys\n"
        "print('x' * (2 << 20), flush=True)\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        print('y' * (256 << 10), flush=True)\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    log_path = tmp_path / "server.log"
    with S.RunningServer([sys.executable, str(script)], {}, port, 30, str(log_path)) as server:
        for _ in range(8):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                assert r.status == 200
        assert log_path.stat().st_size > (2 << 20)  # on disk while the server runs
    assert len(server.log) > (2 << 20) + 8 * (256 << 10)


def test_gpu_time_blocked_at_the_flag_is_reported_for_stream_mode_only():
    base = {"map_share": 0.01, "driver_seconds": 0.1, "execute_seconds": 5.0, "block_maps": 10, "zero_maps": 2,
            "hazard_waits": 1}
    res = [{"workload": "a", "system": "vattn-fa2", "mapper": base, "error": None, "elapsed_s": 10.0},
           *({"workload": "a", "system": "vattn-stream-clipped", "error": None, "elapsed_s": 10.0,
              "mapper": {**base, "gpu_flag_wait_seconds": t, "flag_waits": 100, "flag_stalls": 3,
                         "native_driver_seconds": 2 * t, "native_event_wait_seconds": t / 10}} for t in (0.2, 0.4, 0.3))]
    rows = {r["system"]: r for r in S.mapping_rows(res)}
    assert rows["vattn-fa2"]["gpu_flag_wait"] is None and rows["vattn-stream-clipped"]["gpu_flag_wait"] == 0.3
    assert rows["vattn-fa2"]["native_driver"] is None and rows["vattn-stream-clipped"]["native_driver"] == 0.6
    md = S.markdown({"results": res})
    # the flag's share of the run's wall time: 0.3 s of 10 s
    assert "| a | vattn-stream-clipped | 3 | 1.00% | 0.100 | 5.00 | 10 | 2 | 1 | 0.300 | 3.00% | 0.600 | 0.030 |" in md
    assert "| a | vattn-fa2 | 1 | 1.00% | 0.100 | 5.00 | 10 | 2 | 1 | - | - | - | - |" in md


def test_flag_share_of_older_results_comes_from_the_request_rate():
    """Results written before elapsed_s was kept: wall time = the workload's requests / req/s."""
    w = S.WORKLOADS[0]
    r = {"workload": w.name, "system": "vattn-fa2", "error": None, "requests_per_s": w.num_prompts / 20.0,
         "mapper": {"map_share": 0.01, "driver_seconds": 0.1, "execute_seconds": 5.0, "block_maps": 10,
                    "zero_maps": 2, "hazard_waits": 0, "gpu_flag_wait_seconds": 0.5}}
    assert S.mapping_rows([r])[0]["flag_share"] == pytest.approx(0.5 / 20.0)


def test_profile_report_compares_every_run_with_the_first(tmp_path):
    from vllm_vattention.bench import profile as P

    def run(wall, gpu, attn):
        return {"phases": [{"phase": "decode", "wall_ms_per_step": wall, "gpu_ms_per_step": gpu, "gpu_busy": gpu / wall,
                            "attention_ms_per_step": attn, "attention_share_of_gpu": attn / gpu}]}
    paths = []
    for name, r in (("stock", run(20.0, 10.0, 5.0)), ("vattn", run(22.0, 9.5, 4.5))):
        paths.append(str(tmp_path / f"{name}.json"))
        json.dump(r, open(paths[-1], "w"))
    out = tmp_path / "t.md"
    P.main(["--report", *paths, "--out", str(out)])
    md = out.read_text()
    assert "| decode | stock | 20.00 | 10.00 | 50% | 5.00 | 50.0% |" in md
    assert "| decode | vattn / stock | 1.100x | 0.950x | | 0.900x | |" in md
    assert "prepare_attn ms/step" not in md  # no run carried our hooks' times


def test_profile_report_shows_our_hooks_per_step(tmp_path):
    from types import SimpleNamespace

    from vllm_vattention.bench import profile as P

    class FakeLLM:  # what ours() asks of vLLM's LLM
        def __init__(self, backend):
            self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(attention_config=SimpleNamespace(backend=backend)))
            self.calls = []

        def collective_rpc(self, method, kwargs):
            self.calls.append((method, kwargs))
            return [{"steps": 4, "prepare_attn_seconds": 0.002, "map_seconds": 0.001, "metadata_build_seconds": 0.0002}]

    assert P.ours(FakeLLM("AttentionBackendEnum.FLASH_ATTN")) is None
    llm = FakeLLM("AttentionBackendEnum.CUSTOM")
    assert P.ours(llm, reset=True)["steps"] == 4 and llm.calls == [("vattn_report", {"reset": True})]
    run = {"phases": [{"phase": "decode", "wall_ms_per_step": 6.0, "gpu_ms_per_step": 3.0, "gpu_busy": 0.5,
                       "attention_ms_per_step": 1.0, "attention_share_of_gpu": 0.33,
                       "our_hooks_ms_per_step": {"prepare_attn": 0.5, "map": 0.25, "metadata_build": 0.05}}]}
    path = tmp_path / "vattn.json"
    json.dump(run, open(path, "w"))
    P.main(["--report", str(path), "--out", str(tmp_path / "t.md")])
    assert "| decode | vattn | 0.500 | 0.250 | 0.050 |" in (tmp_path / "t.md").read_text()


def test_cpu_profile_names_the_functions_that_take_the_time(tmp_path):
    """--cpu-profile's attribution: the function that does a step's work (a pure-Python loop, no
    calls of its own) tops the own-time list, once per step, and the report prints it."""
    import cProfile

    from vllm_vattention.bench import profile as P

    def busy(n):
        x = 0
        for i in range(n):
            x += i * i
        return x

    def step():
        busy(200_000)
        sum(range(1000))

    prof = cProfile.Profile()
    with prof:
        for _ in range(4):
            step()
    fns = P.top_functions(prof, steps=4)
    assert fns[0]["function"].endswith("(busy)") and fns[0]["calls"] == 1.0
    assert fns[0]["self_ms"] > 10 * max(f["self_ms"] for f in fns[1:])  # the loop, not the small sum
    assert fns[0]["cum_ms"] >= fns[0]["self_ms"]
    run = {"phases": [{"phase": "decode", "wall_ms_per_step": 6.0, "gpu_ms_per_step": 3.0, "gpu_busy": 0.5,
                       "attention_ms_per_step": 1.0, "attention_share_of_gpu": 0.33,
                       "cpu_top_functions_ms_per_step": fns}]}
    path = tmp_path / "vattn.json"
    json.dump(run, open(path, "w"))
    P.main(["--report", str(path), "--out", str(tmp_path / "t.md")])
    md = (tmp_path / "t.md").read_text()
    assert "### decode, vattn: engine-thread functions by own time" in md and "(busy)` |" in md


def test_merge_runs_made_side_by_side_keeps_each_repetition_with_its_baseline(tmp_path):
    paths = []
    for gpu_index in range(2):
        suite = S.Suite("m", [S.Workload("a", "offline", 8, 8, 1)], ["stock-fa3", "vattn-fa2"], reps=2)
        clock = FakeClock()
        path = str(tmp_path / f"g{gpu_index}.json")
        S.run(suite, path, 1e9, job=fake_job(clock), env=ENV, clock=clock, log=quiet)
        paths.append(path)
    out = tmp_path / "merged"
    S.main(["--merge", *paths, "--out", str(out), "--tag", "pair"])
    merged = json.load(open(next(out.glob("*-pair.json"))))
    reps = sorted({(r["system"], r["rep"], r["source"]) for r in merged["results"]})
    assert reps == [(s, rep, f"g{rep // 2}.json") for s in ("stock-fa3", "vattn-fa2") for rep in range(4)]
    assert "| a | vattn-fa2 | 4 |" in next(out.glob("*-pair.md")).read_text()  # medians over all four
    other = json.load(open(paths[1]))
    other["commit"] = "different"
    json.dump(other, open(paths[1], "w"))
    with pytest.raises(ValueError, match="commit"):
        S.main(["--merge", *paths, "--out", str(out)])


def test_worker_table_shows_our_hooks_per_step_next_to_the_whole_call():
    calls = {"execute_model": {"calls": 100, "seconds": 0.5, "ms_per_call": 5.0},
             "sample_tokens": {"calls": 99, "seconds": 0.1, "ms_per_call": 1.0}}
    mapper = {"map_share": 0.1, "driver_seconds": 0.01, "execute_seconds": 0.5, "block_maps": 1, "zero_maps": 0,
              "hazard_waits": 0, "steps": 100, "prepare_attn_seconds": 0.12, "metadata_build_seconds": 0.03}
    res = [{"workload": "a", "system": "stock-fa3", "worker_calls": calls, "error": None},
           {"workload": "a", "system": "vattn-fa2", "worker_calls": calls, "mapper": mapper, "error": None}]
    rows = {r["system"]: r for r in S.step_rows(res)}
    assert rows["stock-fa3"]["prepare_ms"] is None
    assert rows["vattn-fa2"]["prepare_ms"] == pytest.approx(1.2) and rows["vattn-fa2"]["build_ms"] == pytest.approx(0.3)
    md = S.markdown({"results": res})
    assert "| a | vattn-fa2 | 1 | 100 | 5.000 | 1.000 | 1.200 | 0.300 |" in md
    assert "| a | stock-fa3 | 1 | 100 | 5.000 | 1.000 | - | - |" in md


def test_hook_parts_table_gives_each_part_per_step_as_the_median_of_repetitions():
    def run(extend_s):
        return {"workload": "a", "system": "vattn-fa2", "error": None,
                "mapper": {"steps": 200, "hook_seconds": {"extend": extend_s, "publish": 0.02}}}
    res = [run(0.1), run(0.3), run(0.2), {"workload": "a", "system": "stock-fa3", "error": None},
           {**run(9.0), "error": "boom"}]  # stock (no hooks) and a failed run are left out
    (row,) = S.hook_rows(res)
    assert row["n"] == 3 and row["ms"] == pytest.approx({"extend": 1.0, "publish": 0.1})
    assert "| a | vattn-fa2 | 3 | 1.000 | 0.100 | 1.100 |" in S.markdown({"results": res})


def test_spare_frames_table_shows_how_the_spares_worked_per_workload():
    def run(swaps, inflight, longest):
        return {"workload": "a", "system": "vattn-fa2", "error": None,
                "mapper": {"spare_frames": 572, "swaps": swaps, "warm_maps": swaps + 10, "pad_maps": 4,
                           "warm_calls": 38, "warm_stopped_in_flight": 0, "warm_stopped_no_spare": 38,
                           "lent_taken": swaps // 100, "inflight_max": inflight, "flag_longest_ms": [[longest, 3], [1.0, 9]],
                           "spares_at": {"running": inflight, "warm": 500, "idle": 0, "free": 72 - inflight,
                                         "zero_row": 0}}}
    old = {"workload": "a", "system": "vattn-fa2", "error": None, "mapper": {"spare_frames": 572, "swaps": 1}}
    res = [run(300, 3, 80.9), run(100, 2, 40.0), run(200, 7, 60.0), old,  # old: before the counters, left out
           {"workload": "a", "system": "stock-fa3", "error": None}]
    (row,) = S.spare_rows(res)
    assert row["n"] == 3 and row["swaps"] == 200 and row["warm_maps"] == 210
    assert row["inflight_max"] == 7 and row["longest_stall_ms"] == 80.9
    assert row["spares_at"] == "3/500/0/69/0"  # medians of where the spares ended up
    assert row["lent_taken"] == 2  # (VATTN_LEND_BLOCKS: lent blocks vLLM handed out)
    assert "| a | vattn-fa2 | 3 | 572 | 200 | 210 | 4 | 38 | 0 | 38 | 2 | 7 | 80.9 | 3/500/0/69/0 |" in S.markdown({"results": res})


def test_hazard_table_shows_waits_and_stale_guards_replaced():
    def run(waits, secs, admitted, extended):
        return {"workload": "serve", "system": "vattn-fa2", "error": None,
                "mapper": {"hazard_waits": waits, "native_event_wait_seconds": secs,
                           "admit_stale_replaced": admitted, "warm_stale_guards": extended,
                           "grow_swaps": 1400 + waits, "grow_maps": 450, "grow_unmaps": 420}}
    res = [run(20, 0.05, 60, 140), run(30, 0.2, 50, 100), run(10, 0.1, 70, 120),
           {"workload": "serve", "system": "vattn-fa2", "error": None, "mapper": {"hazard_waits": 90}},  # before #126
           {"workload": "serve", "system": "stock-fa3", "error": None}]
    (row,) = S.hazard_rows(res)
    assert (row["n"], row["hazard_waits"], row["admit_stale_replaced"], row["warm_stale_guards"]) == (3, 20, 60, 120)
    assert "| serve | vattn-fa2 | 3 | 20 | 0.100 | 60 | 120 | 1420 / 450 / 420 |" in S.markdown({"results": res})


def test_mixed_steps_table_counts_fa2_graphs_one_and_two_launch_steps():
    def run(one, two, skipped):
        return {"workload": "a", "system": "vattn-fa2-graphs", "error": None,
                "mapper": {"mixed_steps_one_launch": one, "mixed_steps_two_launches": two,
                           "warm_guards_over_budget": skipped}}
    default = {"workload": "a", "system": "vattn-fa2", "error": None,  # (the default: no mixed-step rule)
               "mapper": {"mixed_steps_one_launch": 0, "mixed_steps_two_launches": 0}}
    res = [run(90, 10, 0), run(80, 20, 4), run(100, 6, 2), default, {"workload": "a", "system": "stock-fa3", "error": None}]
    (row,) = S.mixed_rule_rows(res)
    assert (row["system"], row["n"], row["one"], row["two"], row["over_budget"]) == ("vattn-fa2-graphs", 3, 90, 10, 2)
    assert row["share"] == pytest.approx(0.9)
    assert "| a | vattn-fa2-graphs | 3 | 90 | 10 | 90% | 2 |" in S.markdown({"results": res})
    assert "mixed steps" not in S.markdown({"results": [default]})


def test_admission_table_gives_each_new_requests_swaps_and_maps_per_admission():
    def run(n, swaps, maps, unmaps, drains):
        return {"workload": "serve", "system": "vattn-fa2", "error": None,
                "mapper": {"admissions": n, "admit_swaps": swaps, "admit_maps": maps, "admit_unmaps": unmaps,
                           "drains": drains, "drains_skipped": 2}}
    res = [run(100, 6400, 0, 0, 100), run(120, 3840, 3840, 3000, 130), run(110, 5500, 1540, 1100, 120),
           {"workload": "serve", "system": "vattn-fa2", "error": None, "mapper": {"swaps": 5}},  # older: left out
           {"workload": "serve", "system": "stock-fa3", "error": None}]
    (row,) = S.admit_rows(res)
    assert row["n"] == 3 and row["admissions"] == 110
    assert (row["swaps"], row["maps"], row["unmaps"], row["drains"]) == (50.0, 14.0, 10.0, 120)
    assert "| serve | vattn-fa2 | 3 | 110 | 50.0 | 14.0 | 10.0 | 120 | 2 |" in S.markdown({"results": res})


def test_slowest_batch_table_puts_the_native_threads_worst_batch_beside_the_longest_stall():
    def run(batches, stall):
        return {"workload": "a", "system": "vattn-fa2", "error": None,
                "mapper": {"native_slowest_batches": batches, "flag_longest_ms": [stall]}}
    res = [run([[12.0, 10.0, 2.0, 1.5, "access_rw", 65, 300]], [30.0, 305]),
           run([[80.0, 1.0, 79.0, 75.0, "map", 65, 616, 12.5, 3.25, 0.0, 4, 31], [5.0, 0.0, 5.0, 1.0, "map", 3, 2]],
               [79.6, 616]),
           run([], [1.0, 3]),  # no batch kept: left out
           {"workload": "a", "system": "stock-fa3", "error": None}]
    (row,) = S.slow_batch_rows(res)
    assert row["n"] == 2 and row["batch"][0] == 80.0 and row["stall"] == [79.6, 616]
    # CPU ms, run-queue ms and switches where the native thread measured them (NOTES #141); the
    # background ops its drains ran where it counted them (NOTES #143)
    assert ("| a | vattn-fa2 | 2 | 80.0 | 1.0 | 79.0 | map 75.0 ms | 65 | - | 616 | 3.2 | 0.0 | 4 / 31 | 79.6 (616) |"
            in S.markdown({"results": res}))
    older = [run([[12.0, 10.0, 2.0, 1.5, "access_rw", 65, 300]], [30.0, 305])]  # 7 values: from before
    assert "| a | vattn-fa2 | 1 | 12.0 | 10.0 | 2.0 | access_rw 1.5 ms | 65 | - | 300 | - | - | - | 30.0 (305) |" in S.markdown(
        {"results": older})
    drained = [run([[36.9, 0.0, 36.9, 2.0, "access_rw", 3, 738, 9.5, 36.9, 0.0, 3, 0, 1180]], [36.9, 518])]
    assert "| a | vattn-fa2 | 1 | 36.9 | 0.0 | 36.9 | access_rw 2.0 ms | 3 | 1180 | 738 | 36.9 | 0.0 | 3 / 0 | 36.9 (518) |" in (
        S.markdown({"results": drained}))


def test_a_serving_job_cut_off_keeps_its_rates_and_runs_again(tmp_path):
    """The device's time limit kills a call mid-job (seen: the second server's first rate finished,
    then the call ended and the job's rows were lost). Rows are now saved as each rate completes,
    marked partial; a later call runs the job again and replaces them; a job that fails keeps the
    rates it measured and records the error on the rest."""
    path = str(tmp_path / "r.json")
    w = [S.Workload("rate-4", "serve", 8, 8, 1, request_rate=4.0), S.Workload("rate-16", "serve", 8, 8, 1, request_rate=16.0)]
    suite = S.Suite("m", w, ["stock-fa3", "vattn-fa2"], reps=1)
    clock = FakeClock()
    inner = fake_job(clock)

    def killed_after_one_rate(model, group, workloads, system, out_dir, timeout, tp=1, on_row=None):
        if system == "stock-fa3":
            return inner(model, group, workloads, system, out_dir, timeout, tp, on_row)
        on_row(inner(model, group, workloads[:1], system, out_dir, timeout, tp)[0])
        raise KeyboardInterrupt  # stands for the call's SIGKILL: nothing after this line runs

    with pytest.raises(KeyboardInterrupt):
        S.run(suite, path, 1e9, job=killed_after_one_rate, env=ENV, clock=clock, log=quiet)
    saved = json.load(open(path))["results"]
    ours = [r for r in saved if r["system"] == "vattn-fa2"]
    assert [(r["workload"], r["partial"], r["requests_per_s"]) for r in ours] == [("rate-4", True, ours[0]["requests_per_s"])]
    assert ours[0]["requests_per_s"] > 0
    assert not any(r.get("partial") for r in saved if r["system"] == "stock-fa3")

    resumed = S.Suite("m", w, ["stock-fa3", "vattn-fa2"], reps=1)
    resumed.results = saved
    assert resumed.done("serve", "stock-fa3", 0) and not resumed.done("serve", "vattn-fa2", 0)
    assert S.run(resumed, path, 1e9, job=fake_job(clock), env=ENV, clock=clock, log=quiet) == 0
    final = json.load(open(path))["results"]
    ours = [(r["workload"], r.get("partial"), r["error"]) for r in final if r["system"] == "vattn-fa2"]
    assert sorted(ours) == [("rate-16", None, None), ("rate-4", None, None)]
    assert len([r for r in final if r["system"] == "stock-fa3"]) == 2  # the baseline did not run again

    failing = S.Suite("m", w, ["stock-fa3", "vattn-fa2"], reps=1)
    S.run(failing, str(tmp_path / "f.json"), 1e9, job=fake_job(clock, fail_after=1), env=ENV, clock=clock, log=quiet)
    rows = {(r["system"], r["workload"]): r for r in failing.results}
    assert rows[("vattn-fa2", "rate-4")]["error"] is None and rows[("vattn-fa2", "rate-4")]["requests_per_s"] > 0
    assert "cut off" in rows[("vattn-fa2", "rate-16")]["error"] and rows[("vattn-fa2", "rate-16")]["requests_per_s"] is None
    assert not any(r.get("partial") for r in failing.results)


def test_paired_ratios_compare_runs_of_one_call():
    """Machines drift between calls (seen: a third call ran stock 2-3% slower than the first two);
    each repetition's candidate against the baseline of the same call shows what the medians blur.
    Runs of different calls never pair."""
    rows = []
    for rep, call, base in ((0, 100, 30.0), (1, 200, 30.0), (2, 300, 29.4)):
        rows.append({"workload": "w", "system": "stock-fa3", "rep": rep, "call": call, "requests_per_s": base})
        rows.append({"workload": "w", "system": "vattn-fa2", "rep": rep, "call": call, "requests_per_s": base * 0.99})
    rows.append({"workload": "w", "system": "vattn-fa2", "rep": 3, "call": 400, "requests_per_s": 40.0})  # no baseline
    rows.append({"workload": "w", "system": "vattn-per-layer", "rep": 0, "call": 999, "requests_per_s": 30.0})
    by = {r["system"]: r for r in S.summarize(rows)}
    assert by["vattn-fa2"]["paired"] == pytest.approx([0.99, 0.99, 0.99])
    assert by["vattn-fa2"]["significant"] is False  # the unpaired spreads overlap
    assert by["vattn-per-layer"]["paired"] == [] and by["stock-fa3"]["paired"] == []
    md = S.markdown({"results": rows, "model": "m"})
    assert "| 0.990x (0.990-0.990, 3) |" in md
    # results written before rows carried their call pair by repetition alone
    old = [{k: v for k, v in r.items() if k != "call"} for r in rows[:6]]
    assert S.summarize(old)[1]["paired"] == pytest.approx([0.99, 0.99, 0.99])


def test_every_systems_environment_is_a_valid_configuration():
    """A system's variables are read by VattnConfig in the engine: a bad value (or a pair the
    config refuses) would fail only on the device, after the machine was staged."""
    from vllm_vattention.config import ConfigError, VattnConfig

    for name, spec in S.SYSTEMS.items():
        cfg = VattnConfig.from_env(S.engine_env(spec["env"], S.SYSTEM_VARS))
        assert cfg.requested_by_env == ("VLLM_ATTENTION_BACKEND" in spec["env"]), name
    cfg = VattnConfig.from_env(S.SYSTEMS["vattn-per-layer-s4"]["env"])
    assert (cfg.layout, cfg.fa2_splits) == ("per_layer", 4)
    with pytest.raises(ConfigError, match="VATTN_FA2_SPLITS=129"):
        VattnConfig.from_env({**S.SYSTEMS["vattn-per-layer-s4"]["env"], "VATTN_FA2_SPLITS": "129"})


def test_every_systems_engine_flags_are_taken_by_the_offline_runner():
    """The suite appends a system's engine flags to offline.py's command line: each must parse."""
    from vllm_vattention.bench import offline

    for name, spec in S.SYSTEMS.items():
        args = offline.parser().parse_args(["--model", "m", "--workloads", "[]", "--out", "o", *spec["args"]])
        assert args.model == "m", name
    args = offline.parser().parse_args(["--model", "m", "--workloads", "[]", "--out", "o", *S.SYSTEMS["vattn-bs32"]["args"]])
    assert args.block_size == 32
    assert offline.parser().parse_args(["--model", "m", "--workloads", "[]", "--out", "o",
                                        *S.SYSTEMS["stock-flashinfer"]["args"]]).attention_backend == "FLASHINFER"


def test_a_mixed_workload_draws_lengths_per_request_and_the_fixed_ones_stay_as_they_were():
    """The mixed workload's spec carries its minimums; offline.py draws each request's lengths in
    [min, len] (seeded, the same each run), and a fixed workload's lengths are all alike."""
    from vllm_vattention.bench import offline

    mixed = next(w for w in S.WORKLOADS if w.name == "mixed-64-4096-in")
    assert mixed.spec() == ["mixed-64-4096-in", 4096, 512, 300, 64, 32]
    ins, outs = offline.lengths(mixed.spec(), seed=4)
    assert len(ins) == len(outs) == 300 and (ins, outs) == offline.lengths(mixed.spec(), seed=4)
    assert min(ins) >= 64 and max(ins) <= 4096 and min(outs) >= 32 and max(outs) <= 512
    assert len(set(ins)) > 200 and 1500 < sum(ins) / 300 < 2600  # spread over the range, mean ~2,080
    fixed = next(w for w in S.WORKLOADS if w.name == "1024-in-128-out")
    assert fixed.spec() == ["1024-in-128-out", 1024, 128, 300]
    assert offline.lengths(fixed.spec(), seed=0) == ([1024] * 300, [128] * 300)


def _phases(head, spans_ms, tail, steps):
    return {"steps": steps, "head_ms": head, "tail_ms": tail, "buckets": [list(b) for b in spans_ms]}


def test_phase_table_pairs_each_run_with_the_baselines_of_its_call():
    def run(system, rep, call, head, b0, b1, tail, steps=4, last=(2, 4)):
        return {"workload": "a", "system": system, "rep": rep, "call": call, "error": None,
                "step_phases": _phases(head, [(0, 1, b0), (1, 2, b1), (*last, 10.0)], tail, steps)}
    res = [run("stock-fa3", 0, 1, 5.0, 30.0, 10.0, 2.0), run("vattn-fa2", 0, 1, 5.5, 40.0, 10.0, 2.0),
           run("stock-fa3", 1, 2, 9.0, 20.0, 10.0, 2.0), run("vattn-fa2", 1, 2, 9.0, 24.0, 11.0, 1.0),
           # rep 2 has no baseline in its call: left out; a failed run of rep 1 does not replace the good one
           run("vattn-fa2", 2, 3, 0.0, 99.0, 99.0, 0.0), {**run("vattn-fa2", 1, 2, 0, 0, 0, 0), "error": "boom"}]
    (row,) = S.phase_rows(res)
    assert row["system"] == "vattn-fa2" and row["n"] == 2 and row["steps"] == "4/4"
    ms = row["ms"]
    assert list(ms) == ["before first step", "step 0", "step 1", "steps 2-3", "after last step", "whole run"]
    assert ms["before first step"] == pytest.approx(0.25) and ms["step 0"] == pytest.approx(7.0)
    assert ms["step 1"] == pytest.approx(0.5) and ms["after last step"] == pytest.approx(-0.5)
    # the whole run's difference is the sum of its parts, per pair, then the median
    assert ms["whole run"] == pytest.approx((10.5 + 4.0) / 2)
    md = S.markdown({"results": res})
    assert "## a: where the run's time differs from stock-fa3's" in md
    assert "| vattn-fa2 | 2 | 4/4 | +0.2 | +7.0 | +0.5 | +0.0 | -0.5 | +7.2 |" in md


def test_phase_table_compares_a_last_span_only_when_both_runs_have_it_whole():
    base = {"workload": "a", "system": "stock-fa3", "rep": 0, "call": 1, "error": None,
            "step_phases": _phases(1.0, [(0, 1, 5.0), (1, 2, 5.0), (2, 4, 10.0)], 1.0, 4)}
    cand = {**base, "system": "vattn-fa2",
            "step_phases": _phases(1.0, [(0, 1, 6.0), (1, 2, 5.0), (2, 4, 10.0), (4, 5, 3.0)], 1.0, 5)}
    (row,) = S.phase_rows([base, cand])
    assert row["steps"] == "5/4" and "step 4" not in row["ms"]
    assert row["ms"]["step 0"] == pytest.approx(1.0) and row["ms"]["whole run"] == pytest.approx(4.0)
    # stock alone, or runs without phases (older results): no rows, no section
    assert S.phase_rows([base]) == [] and S.phase_rows([{**base, "step_phases": None}]) == []


FAKE_VLLM_CLI = """
import http.server, json, sys, urllib.request
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
if args[0] == "serve":
    scrapes = [0]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
            if self.path == "/metrics":  # each scrape: 3 more requests, 20 ms TTFT, 5 ms queued, 10 ms prefill
                scrapes[0] += 1; k = scrapes[0]
                text = ["# HELP vllm:time_to_first_token_seconds TTFT", "# TYPE vllm:time_to_first_token_seconds histogram"]
                for name, ms in (("time_to_first_token", 20), ("request_queue_time", 5), ("request_prefill_time", 10),
                                 ("inter_token_latency", 2)):
                    for engine, share in (("0", 2), ("1", 1)):  # two label sets: summed
                        lab = '{engine="%s",model_name="m"}' % engine
                        text += [f'vllm:{name}_seconds_bucket{{engine="{engine}",le="0.5"}} {share * k}',
                                 f"vllm:{name}_seconds_count{lab} {share * k}.0",
                                 f"vllm:{name}_seconds_sum{lab} {share * k * ms / 1000}"]
                text.append("vllm:num_requests_running 3.0")
                self.wfile.write("\\n".join(text).encode())
        def log_message(self, *a): pass
    print("GPU KV cache size: 1,600 tokens", flush=True)
    import os
    # the worker writes the trace at shutdown, which a real server given no --shutdown-timeout may
    # kill first (a missing flag makes args.index raise: the server dies); here it is written at once
    if os.environ.get("VATTN_STEP_TRACE") and int(args[args.index("--shutdown-timeout") + 1]) > 0:
        json.dump({"steps": []}, open(os.environ["VATTN_STEP_TRACE"], "w"))
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
else:  # bench serve: the server it was given must answer
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
    rate = float(args[args.index("--request-rate") + 1])
    if args[args.index("--dataset-name") + 1] == "custom":  # report the prompts it was given, as the throughput
        prompts = [json.loads(line)["prompt"] for line in open(args[args.index("--dataset-path") + 1])]
        assert "--skip-chat-template" in args and args[args.index("--custom-output-len") + 1] == "8"
        rate = 2.0 * len(set(prompts))
        json.dump(prompts, open(args[args.index("--result-filename") + 1] + ".prompts", "w"))
    detail = {}
    if "--save-detailed" in args:  # two requests, listed out of their start order
        detail = {"start_times": [100.5, 100.0], "ttfts": [0.030, 0.020], "itls": [[0.005, 0.007], [0.004]],
                  "input_lens": [8, 9], "output_lens": [5, 2]}  # the first streamed 5 tokens in 3 chunks
    json.dump({"request_throughput": rate / 2, "output_throughput": 1.0, "total_token_throughput": 2.0,
               "median_ttft_ms": 10.0 * rate, "p99_ttft_ms": 20.0, "median_tpot_ms": 5.0, "p99_tpot_ms": 6.0,
               "mean_tpot_ms": 0.5 * rate, **detail}, open(args[args.index("--result-filename") + 1], "w"))
"""


def test_serving_jobs_side_by_side_each_get_a_port_of_their_own(tmp_path):
    """suite_pair runs a suite per GPU at once; with one fixed port the second server could not
    listen while the first ran (and its client would have measured the first). Each job now takes
    a free port, passed to both its server and its client: here while another server holds the
    port every job used to take."""
    import http.server
    import sys
    import threading
    cli = tmp_path / "fake_vllm.py"
    cli.write_text(FAKE_VLLM_CLI)
    try:  # the port every job used to take, held by another server (or already taken on this machine)
        busy = http.server.HTTPServer(("127.0.0.1", 8190), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=busy.serve_forever, daemon=True).start()
    except OSError:
        busy = None
    try:
        w = [S.Workload("rate-4", "serve", 8, 8, 1, request_rate=4.0), S.Workload("rate-16", "serve", 8, 8, 1, request_rate=16.0)]
        rows = S._run_serve([sys.executable, str(cli)], "m", w, "stock-fa3", {}, str(tmp_path / "raw.json"), 60)
    finally:
        if busy:
            busy.shutdown()
    assert [(r["workload"], r["requests_per_s"], r["ttft_p50_ms"]) for r in rows] == [("rate-4", 2.0, 40.0), ("rate-16", 8.0, 160.0)]
    assert [r["tpot_mean_ms"] for r in rows] == [2.0, 8.0]  # vLLM's mean TPOT, kept beside its p50 (NOTES #112)
    assert rows[0]["max_concurrent_requests"] == 1600 // 16 // 1  # 8+8 tokens: one 16-token block each
    # the server's own histograms over each run (scraped before and after it; NOTES #107)
    assert rows[0]["server"] == {"ttft_ms_mean": pytest.approx(20.0), "queue_ms_mean": pytest.approx(5.0),
                                 "prefill_ms_mean": pytest.approx(10.0), "itl_ms_mean": pytest.approx(2.0), "requests": 3}
    assert rows[1]["server"]["requests"] == 3
    (split,) = [m for m in S.server_rows([{**r, "system": "stock-fa3", "ttft_mean_ms": 26.0} for r in rows[:1]])]
    assert (split["client"], split["outside"]) == (26.0, pytest.approx(6.0)) and split["frontend"] == pytest.approx(5.0)
    md = S.markdown({"results": [{**rows[0], "system": "stock-fa3", "rep": 0, "call": 1, "error": None, "ttft_mean_ms": 26.0}]})
    assert "## Where TTFT went" in md and "| rate-4 | stock-fa3 | 1 | 26.0 | 20.0 | 5.0 | 10.0 | 6.0 | 5.0 | 2.0 |" in md
    assert "## TPOT mean ms (lower is better)" in md and "| rate-4 | stock-fa3 | 1 | 2.00 |" in md
    # each request's TTFT and TPOT, in the order they were sent (NOTES #73)
    # TPOT is vLLM's: (latency - TTFT) / (tokens - 1), not the mean gap between chunks (NOTES #106)
    assert rows[0]["per_request"] == {"t0": 100.0, "start_s": [0.0, 0.5], "ttft_ms": [20.0, 30.0],
                                      "tpot_ms": [4.0, 3.0], "chunks": [2, 3], "input_len": [9, 8]}
    # stock's server is traced too (worker.TracedWorker), in a file of its own beside the run's
    assert rows[0]["step_trace"].startswith("steps-stock-fa3-") and (tmp_path / rows[0]["step_trace"]).exists()
    # the CPU the server's processes and the client used over each run (NOTES #149): the fake server is
    # one process, the root; the client is a Python process that ran (its start-up alone takes CPU)
    for r in rows:
        assert [p["root"] for p in r["cpu"]["procs"]] == [True] and r["cpu"]["wall_s"] > 0
        assert r["cpu"]["client_cpu_s"] > 0.01 and r["cpu"]["procs"][0]["cpu_s"] >= 0
    (c,) = S.cpu_rows([{**rows[0], "system": "stock-fa3"}])
    assert c["engine_s"] is None and c["others_s"] == 0 and c["client_s"] == rows[0]["cpu"]["client_cpu_s"]
    assert c["mapper_s"] == 0  # stock's server: no mapping thread
    assert "## CPU over each serving run" in md


def test_cpu_rows_take_the_busiest_process_below_the_api_server_as_the_engine_and_median_over_repetitions():
    def run(rep, api, engine, helper, client, machine):
        procs = [{"pid": 10, "name": "vllm", "root": True, "cpu_s": api, "busiest_thread": "vllm",
                  "busiest_thread_s": api * 0.9, "busiest_thread_share": api * 0.9 / 20.0},
                 {"pid": 12, "name": "resource_tracker", "root": False, "cpu_s": helper, "busiest_thread": "python3",
                  "busiest_thread_s": helper, "busiest_thread_share": helper / 20.0},
                 {"pid": 11, "name": "VLLM::EngineCor", "root": False, "cpu_s": engine, "busiest_thread": "VLLM::EngineCor",
                  "busiest_thread_s": engine * 0.7, "busiest_thread_share": engine * 0.7 / 20.0,
                  "threads_by_name": {"VLLM::EngineCor": engine * 0.8, "vattn-mapper": engine / 10}}]
        return {"workload": "serve-rate-16", "system": "vattn-fa2", "rep": rep, "call": rep + 1, "error": None,
                "requests_per_s": 15.0, "cpu": {"wall_s": 20.0, "procs": procs, "machine_busy_cpus": machine, "cpus": 16,
                                                "client_cpu_s": client}}
    res = [run(0, 18.0, 25.0, 0.5, 6.0, 3.0), run(1, 19.0, 27.0, 0.25, 7.0, 3.5), run(2, 20.0, 26.0, 0.75, 8.0, 4.0)]
    (c,) = S.cpu_rows(res + [{**run(3, 99.0, 99.0, 9.0, 99.0, 9.0), "error": "failed"}])  # a failed run is left out
    assert (c["n"], c["engine_name"], c["cpus"]) == (3, "VLLM::EngineCor", 16)
    assert (c["api_s"], c["engine_s"], c["others_s"], c["client_s"], c["machine"]) == (19.0, 26.0, 0.5, 7.0, 3.5)
    assert c["mapper_s"] == pytest.approx(2.6)  # the native thread's, by its name
    assert c["api_thread"] == pytest.approx(19.0 * 0.9 / 20.0) and c["engine_thread"] == pytest.approx(26.0 * 0.7 / 20.0)
    md = S.markdown({"results": res})
    assert "| serve-rate-16 | vattn-fa2 | 3 | 20.0 | 19.0 | 86% | 26.0 (VLLM::EngineCor) | 91% | 2.6 | 0.5 | 7.0 | 3.5 (16) |" in md


def test_per_request_needs_every_list_and_equal_lengths():
    d = {"start_times": [1.0, 2.0], "ttfts": [0.01, 0.02], "itls": [[], [0.002]], "input_lens": [4, 4],
         "output_lens": [1, 2]}
    assert S.per_request(d)["tpot_ms"] == [None, 2.0]  # a one-token output has no TPOT
    assert S.per_request({**d, "output_lens": [1, 5]})["tpot_ms"] == [None, 0.5]  # 4 tokens after the first, 1 chunk
    assert S.per_request({**d, "output_lens": [1]}) is None
    assert S.per_request({**d, "ttfts": [0.01]}) is None
    assert S.per_request({k: v for k, v in d.items() if k != "itls"}) is None


def test_a_distinct_serving_workload_sends_prompts_that_share_no_block(tmp_path):
    """vllm bench serve's random prompts over the repository's 536-token tokenizer share prefixes
    (NOTES #71); the -distinct workloads send a custom dataset of random words instead: as many
    prompts as asked, each of input_len tokens, no two alike in their first block; the file is
    removed after the run."""
    import os
    import sys
    from transformers import AutoTokenizer
    model = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "llama-3.1-8b")
    cli = tmp_path / "fake_vllm.py"
    cli.write_text(FAKE_VLLM_CLI)
    raw = str(tmp_path / "raw.json")
    w = [S.Workload("d", "serve", 32, 8, 6, request_rate=4.0, dataset="distinct")]
    rows = S._run_serve([sys.executable, str(cli)], model, w, "vattn-fa2", {"VLLM_ATTENTION_BACKEND": "VATTENTION"},
                        raw, 60)
    assert rows[0]["requests_per_s"] == 6  # six distinct prompts reached the client
    # a vAttention server is asked for its step trace, beside the run's other files
    assert rows[0]["step_trace"].startswith("steps-vattn-fa2-") and (tmp_path / rows[0]["step_trace"]).exists()
    prompts = json.load(open(raw + ".prompts"))
    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert [len(i) for i in ids] == [32] * 6
    assert len({tuple(i[:16]) for i in ids}) == 6
    assert not list(tmp_path.glob("*.jsonl"))
    assert {x.name for x in S.WORKLOADS if x.dataset == "distinct"} == {"serve-rate-4-distinct", "serve-rate-16-distinct"}


def test_profile_refuses_phases_that_do_not_fit_max_model_len():
    from vllm_vattention.bench import profile as P
    P.check_fits("decode-4x1k,mixed-4x1k+1k", 30, 1216)  # serving's geometry in the suite: fits
    with pytest.raises(SystemExit, match="decode-24x16k needs 16452 tokens.*--max-model-len 1216"):
        P.check_fits("decode-24x16k", 30, 1216)
    with pytest.raises(SystemExit, match="unknown --phases.*nope"):
        P.check_fits("decode-4x1k,nope", 30, 1216)


def test_profile_runs_the_64x8k_decode_phase_only_when_named():
    """decode-64x8k (8192-in-256-out's decode steps) needs ~75 GB of KV: a plain run leaves it out,
    --phases picks it, and it fits the suite's 8192/256 engine (max_model_len 8,512 + 256)."""
    from vllm_vattention.bench import profile as P
    default = [p[0] for p in P.chosen_phases("")]
    assert "decode-64x8k" not in default and "decode-24x16k" in default and len(default) == len(P.PHASES) - 1
    # named phases run in PHASES' order, whatever order --phases gives them in
    assert [p[0] for p in P.chosen_phases("decode-4x1k,decode-64x8k")] == ["decode-64x8k", "decode-4x1k"]
    P.check_fits("decode-64x8k", 30, 8768)
    with pytest.raises(SystemExit, match="decode-64x8k needs 8300 tokens.*--max-model-len 8192"):
        P.check_fits("decode-64x8k", 30, 8192)


def test_profile_hit_phase_sends_copies_of_its_first_prompts():
    """mixed-16x1k+hit: the late prompt repeats the phase's first prompt token for token (a whole
    prefix-cache hit for vLLM); other phases' prompts are random and distinct."""
    import random
    from vllm_vattention.bench import profile as P
    rng = random.Random(0)
    first = P.make_prompts(rng, 16, 1024, [])
    assert len(first) == 16 and all(len(p) == 1024 for p in first) and len({tuple(p) for p in first}) == 16
    late = P.make_prompts(rng, 2, P.HIT, first)
    assert late == first[:2] and late[0] is not first[0]
    with pytest.raises(ValueError, match="first prompts"):
        P.make_prompts(rng, 1, P.HIT, [])
    P.check_fits("mixed-16x1k+hit", 30, 1216)


def test_profile_runs_each_phase_unmeasured_first(tmp_path, monkeypatch):
    """--warm-passes: each phase runs that many times unmeasured (its requests added, stepped and
    aborted) before the measured pass, so that first-use costs fall outside it; one report entry per
    phase, from the last pass; request ids name the pass. On a stand-in engine (no GPU here)."""
    import json
    import sys
    import types

    import torch

    from vllm_vattention.bench import profile as P
    added, aborted, steps = [], [], [0]

    class Engine:
        vllm_config = types.SimpleNamespace(attention_config=types.SimpleNamespace(backend="FLASH_ATTN"))

        def add_request(self, rid, prompt, params):
            added.append(rid)
            return rid

        def step(self):
            steps[0] += 1

        def abort_request(self, ids, internal=False):
            aborted.append(list(ids))

    class LLM:
        def __init__(self, **kw):
            self.llm_engine = Engine()

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw))
    monkeypatch.setitem(sys.modules, "vllm.inputs", types.SimpleNamespace(TokensPrompt=lambda **kw: kw))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    class NoKernels:  # torch.profiler.profile's CUDA activity needs a GPU
        def __init__(self, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return []
    monkeypatch.setattr(torch.profiler, "profile", NoKernels)
    out = tmp_path / "prof.json"
    P.main(["--out", str(out), "--phases", "mixed-4x1k+1k", "--max-model-len", "2200", "--warm-passes", "2"])
    report = json.load(open(out))
    assert [p["phase"] for p in report["phases"]] == ["mixed-4x1k+1k"]
    assert [rid.split("-")[2] for rid in added] == ["p0"] * 5 + ["p1"] * 5 + ["p2"] * 5  # 4 requests + 1 late each
    assert [a[0].split("-")[2] for a in aborted] == ["p0", "p1", "p2"]
    assert steps[0] == 3 * (20 + 4 + 3)  # per pass: the warm steps, the phase's 4 steps, 3 after the abort


def test_the_scrape_after_a_run_waits_for_its_last_requests(monkeypatch):
    """vLLM records queue and prefill times when a request finishes, which can trail the client's
    last token: the scrape after a run polls until the run's requests are all counted (or gives
    up after its wait and returns what it has)."""
    seen = iter([5, 8, 10, 10])
    monkeypatch.setattr(S, "scrape_histograms", lambda port: {k: (0.01 * c, c) for c in [next(seen)] for k in S.SERVER_HISTOGRAMS})
    monkeypatch.setattr(S.time, "sleep", lambda s: None)
    before = {k: (0.0, 0) for k in S.SERVER_HISTOGRAMS}
    assert S._scrape_after(1, before, 10)["queue"][1] == 10  # the third scrape had them all
    monkeypatch.setattr(S, "scrape_histograms", lambda port: {k: (0.0, 2) for k in S.SERVER_HISTOGRAMS})
    assert S._scrape_after(1, before, 10, wait_s=0.0)["queue"][1] == 2  # gave up: what it had
    assert S.histogram_means(before, None) is None and S.histogram_means(None, before) is None
    # no request in a histogram: no mean, not a division by zero
    assert S.histogram_means(before, before)["ttft_ms_mean"] is None


def test_long_decode_table_shows_the_steps_kernels_and_their_guards_cost():
    """NOTES #130-#135: the long decode steps by kernel, beside their guards' cost; runs without any
    long decode step (other workloads, stock, runs from before the counters) are left out."""
    def run(fa3, zero, clipped, waits):
        return {"workload": "8192-in-256-out", "system": "vattn-fa2", "error": None,
                "mapper": {"long_decode_steps_fa3": fa3, "long_decode_steps_fa2": 0, "long_decode_steps_mapped": 14,
                           "zero_maps": zero, "guard_ahead_maps": 1800, "warm_guards_clipped": clipped,
                           "warm_guard_spares_freed": 40,
                           "hazard_waits": waits, "gpu_flag_wait_seconds": 0.05}}
    none = {"workload": "1024-in-128-out", "system": "vattn-fa2", "error": None,
            "mapper": {"long_decode_steps_fa3": 0, "long_decode_steps_fa2": 0, "zero_maps": 3}}
    res = [run(228, 0, 225, 0), run(228, 4, 226, 2), run(227, 2, 224, 1), none,
           {"workload": "8192-in-256-out", "system": "stock-fa3", "error": None}]
    (row,) = S.long_decode_rows(res)
    assert (row["workload"], row["n"], row["long_decode_steps_fa3"], row["zero_maps"], row["hazard_waits"]) == \
        ("8192-in-256-out", 3, 228, 2, 1)
    assert "| 8192-in-256-out | vattn-fa2 | 3 | 228 / 0 | 14 | 2 | 1800 | 225 | 40 | 1 | 0.050 |" in S.markdown({"results": res})
