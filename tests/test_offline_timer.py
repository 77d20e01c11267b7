"""The offline benchmark's per-step timer: the wrapper it puts on a worker instance counts and
times each call, passes arguments and results through, and is installed once."""

import time

from vllm_vattention.bench.offline import install_step_timer, read_step_timer


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
