"""The stream-mode GPU wait timer (worker.StreamWaitTimer) with stand-in CUDA events: pairs are read
only once complete, never synchronized unless asked, stalls counted, events reused."""

from vllm_vattention.worker import StreamWaitTimer


class FakeEvent:
    """A timing event whose GPU timestamp is set by the test when 'the GPU reaches it'."""
    made = 0

    def __init__(self):
        FakeEvent.made += 1
        self.t = None  # ms, once reached
        self.synced = False

    def record(self, stream):
        self.t, self.stream = None, stream

    def query(self):
        return self.t is not None

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, end):
        assert self.t is not None and end.t is not None, "read before completion"
        return end.t - self.t


def test_waits_are_read_when_complete_and_stalls_counted():
    FakeEvent.made = 0
    timer = StreamWaitTimer(make_event=FakeEvent)
    order = []
    timer.around("s", lambda: order.append("wait"))  # step 1
    (a1, b1) = timer._pending[0]
    assert order == ["wait"] and a1.stream == b1.stream == "s"
    timer.around("s", lambda: None)  # step 2: step 1's pair not complete yet, nothing read
    assert timer.waits == 0 and len(timer._pending) == 2
    a1.t, b1.t = 10.0, 10.003  # 3 us: not blocked
    (a2, b2) = timer._pending[1]
    a2.t = 20.0  # the GPU reached step 2's wait but is still blocked there
    timer.collect()
    assert timer.waits == 1 and timer.stalls == 0 and len(timer._pending) == 1
    b2.t = 22.5  # blocked 2.5 ms
    timer.around("s", lambda: None)  # step 3 reuses step 1's two events
    assert FakeEvent.made == 4 and timer.waits == 2 and timer.stalls == 1
    assert abs(timer.seconds - (3e-6 + 2.5e-3)) < 1e-9
    a3, b3 = timer._pending[0]
    assert {a3, b3} <= {a1, b1} and not b3.synced
    a3.t = b3.t = 30.0
    timer.collect(wait=True)
    assert b3.synced and timer.waits == 3 and not timer._pending
    assert timer.report() == {"gpu_flag_wait_seconds": round(3e-6 + 2.5e-3, 4), "flag_waits": 3, "flag_stalls": 1,
                              "flag_longest_ms": [[2.5, 1]]}  # the stall, and that it was the second wait


def test_the_longest_stalls_are_kept_with_their_place_in_the_run():
    timer = StreamWaitTimer(make_event=FakeEvent)
    lengths_ms = [0.01, 4.0, 0.02, 9.0] + [1.0 + k / 100 for k in range(20)] + [6.0]
    for ms in lengths_ms:
        timer.around("s", lambda: None)
        a, b = timer._pending[-1]
        a.t, b.t = 100.0, 100.0 + ms
    timer.collect()
    assert timer.waits == len(lengths_ms) and timer.stalls == len(lengths_ms) - 2  # 10 and 20 us are not stalls
    top = timer.report()["flag_longest_ms"]
    assert [i for _, i in top[:3]] == [3, 24, 1]  # 9, 6 and 4 ms, where they happened
    assert [ms for ms, _ in top] == [9.0, 6.0, 4.0, 1.19, 1.18, 1.17, 1.16, 1.15]
    assert len(top) == StreamWaitTimer.TOP


def test_every_wait_is_kept_by_index_when_steps_are_traced():
    timer = StreamWaitTimer(make_event=FakeEvent, keep_all=True)
    for k in range(3):
        timer.around("s", lambda: None)
        a, b = timer._pending[-1]
        a.t, b.t = 10.0 * k, 10.0 * k + (k + 1) * 0.5
    assert timer.issued == 3
    timer.collect(wait=True)
    assert timer.all_ms == [0.5, 1.0, 1.5]
    assert StreamWaitTimer(make_event=FakeEvent).all_ms is None  # not kept otherwise


def test_step_trace_keeps_each_step_and_writes_json(tmp_path):
    import json

    from vllm_vattention.worker import TRACE_PARTS, StepTrace
    now = [100.0]
    trace = StepTrace(str(tmp_path / "steps.json"), clock=lambda: now[0])
    trace.add(100.5, 100.5061, 2, 2048, 3, 1, 0, 0.0012, [0.001, 0.0002])  # (an admitting step's parts)
    trace.add(100.51, 100.515, 0, 2, 0, 0, -1)  # (no hooks time given: 0; no parts)
    trace.MAX_STEPS = 2
    trace.add(100.52, 100.525, 0, 2, 0, 0, -1)  # past the cap: counted, not kept
    trace.write([0.25])
    d = json.load(open(tmp_path / "steps.json"))
    assert d["t0"] == 100.0 and d["fields"] == list(StepTrace.FIELDS) and d["dropped_steps"] == 1
    assert d["steps"] == [[0.5, 6.1, 2, 2048, 3, 1, 0, 1.2, [1.0, 0.2]], [0.51, 5.0, 0, 2, 0, 0, -1, 0.0, None]]
    assert d["hook_parts"] == list(TRACE_PARTS) and TRACE_PARTS[-1] == "build"
    assert d["flag_waits_ms"] == [0.25]


def test_step_trace_write_that_fails_leaves_no_trace_file(tmp_path):
    """A write that stops half-way (here: a value JSON cannot hold; on a server: the engine killed
    while writing) leaves no file at the trace's path, not a truncated one; a good write leaves no
    temporary file behind."""
    import pytest

    from vllm_vattention.worker import StepTrace
    path = tmp_path / "steps.json"
    trace = StepTrace(str(path))
    trace.add(trace.t0, trace.t0 + 0.001, 0, 1, 0, 0, -1)
    with pytest.raises(TypeError):
        trace.write([object()])
    assert list(tmp_path.iterdir()) == []  # neither the trace nor its temporary file
    trace.write([0.5])
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["steps.json"]
