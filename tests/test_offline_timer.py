"""The offline benchmark's per-step timer: the wrapper it puts on a worker instance counts and
times each call, passes arguments and results through, and is installed once."""

import time

import pytest

from vllm_vattention.bench.offline import install_step_timer, read_step_spans, read_step_timer, step_phases


class Worker:
    def execute_model(self, x, scale=1):
        time.sleep(0.002)
        return x * scale

    def sample_tokens(self, grammar=None):
        return grammar


def test_timer_counts_and_times_calls_and_resets():
    w = Worker()
    assert install_step_timer(w) and install_step_timer(w)  # the second call does not wrap twice
    assert w.execute_model(3, scale=2) == 6 and w.execute_model(1) == 1 and w.sample_tokens("g") == "g"
    got = read_step_timer(w)
    assert got["execute_model"]["calls"] == 2 and got["sample_tokens"]["calls"] == 1
    assert got["execute_model"]["seconds"] >= 0.004 and got["execute_model"]["ms_per_call"] >= 2.0
    assert read_step_timer(w) == {}  # reset


def test_an_exception_is_timed_and_raised():
    class Failing:
        def execute_model(self):
            raise RuntimeError("boom")
    w = Failing()
    install_step_timer(w)
    try:
        w.execute_model()
    except RuntimeError:
        pass
    else:
        raise AssertionError("the wrapper swallowed the error")
    assert read_step_timer(w)["execute_model"]["calls"] == 1


def test_vllm_dispatch_reaches_the_timed_methods():
    # vLLM's executors call worker methods by name through run_method (getattr on the same object
    # collective_rpc passes to a function): the instance wrapper must be what they find.
    from vllm.v1.serial_utils import run_method
    w = Worker()
    assert run_method(w, install_step_timer, (), {})
    assert run_method(w, "execute_model", (4,), {"scale": 3}) == 12
    assert run_method(w, read_step_timer, (), {})["execute_model"]["calls"] == 1


def test_timer_keeps_each_step_span_in_order_and_resets():
    w = Worker()
    install_step_timer(w)
    t0 = time.monotonic()
    for i in range(3):
        w.execute_model(i)
        w.sample_tokens()  # not a step: no span
    spans = read_step_spans(w)
    assert len(spans) == 3
    assert t0 <= spans[0][0] and all(a < b for a, b in spans)  # each ends after it starts
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(2))  # in call order
    assert all(b - a >= 0.002 for a, b in spans)  # the sleep inside the call is in its span
    assert read_step_spans(w) == []
    assert read_step_spans(object()) == []  # a worker without the timer


def test_step_phases_split_the_wall_time_exactly():
    # 10 steps: step i starts at 1.0 + 0.1 i and lasts 0.04 s; the workload ran [0.5, 2.5)
    spans = [(1.0 + 0.1 * i, 1.04 + 0.1 * i) for i in range(10)]
    ph = step_phases(spans, 0.5, 2.5)
    assert ph["steps"] == 10
    assert [(lo, hi) for lo, hi, _ in ph["buckets"]] == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    assert ph["head_ms"] == pytest.approx(500.0)
    # a span's time runs from its first step's start to the next span's first start
    assert [ms for *_, ms in ph["buckets"]] == pytest.approx([100.0, 100.0, 200.0, 400.0, 140.0])
    assert ph["tail_ms"] == pytest.approx(2500.0 - 1940.0)
    assert ph["head_ms"] + ph["tail_ms"] + sum(b[2] for b in ph["buckets"]) == pytest.approx(2000.0)


@pytest.mark.parametrize("n", [1, 2, 3, 1024, 1034])
def test_step_phase_spans_double_and_cover_every_step(n):
    spans = [(float(i), i + 0.5) for i in range(n)]
    b = step_phases(spans, -1.0, n + 1.0)["buckets"]
    assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    assert [lo for lo, *_ in b[1:]] == [1 << k for k in range(len(b) - 1)]
    assert sum(ms for *_, ms in b) == pytest.approx(1e3 * (n - 0.5))


def test_step_phases_of_a_workload_without_steps_is_all_head():
    assert step_phases([], 2.0, 3.0) == {"steps": 0, "head_ms": pytest.approx(1000.0), "tail_ms": 0.0, "buckets": []}


def test_spans_come_back_through_vllms_engine_output_encoding(monkeypatch):
    # collective_rpc's result crosses from the engine process as a UtilityResult inside
    # EngineCoreOutputs; the spans must arrive as the worker read them
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # as offline.py sets it
    from vllm.v1.engine import EngineCoreOutputs, UtilityOutput
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder, UtilityResult
    w = Worker()
    install_step_timer(w)
    w.execute_model(1)
    w.execute_model(2)
    spans = read_step_spans(w)
    msg = EngineCoreOutputs(utility_output=UtilityOutput(call_id=7, result=UtilityResult(spans)))
    got = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(msg)).utility_output.result.result
    assert got == spans and step_phases(got, spans[0][0], spans[-1][1])["steps"] == 2
